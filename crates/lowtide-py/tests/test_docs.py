"""The Python blocks of the docs marked ``<!-- runnable -->`` run as written, so the examples
users copy stay true. Skipped without torch and the frameworks they use (failing instead in
CI, whose test command installs them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import import_or_skip

DOCS = Path(__file__).resolve().parents[3] / "docs"
_BLOCK = re.compile(r"<!-- runnable -->\n```python\n(.*?)```", re.S)


def _blocks() -> list:
    found = []
    for doc in sorted(DOCS.glob("*.md")):
        for number, match in enumerate(_BLOCK.finditer(doc.read_text()), 1):
            found.append(pytest.param(match[1], id=f"{doc.name}-{number}"))
    return found


def test_the_docs_have_runnable_blocks():
    assert len(_blocks()) >= 2


@pytest.mark.parametrize("code", _blocks())
def test_a_runnable_block_runs(code, tmp_path, monkeypatch):
    for module in re.findall(r"^import (.+)$", code, re.M):
        for name in module.split(","):
            name = name.strip().split(" as ")[0]
            import_or_skip(name, "scripts/test installs the packages the docs use")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})

"""``python -m lowtide.comfyui.demo`` at its tiny size: stock ComfyUI uncapped and ComfyUI with
lowtide's loader under a generous cap, each in a child process in its own memory cgroup; the
JSON report's structure, the same image from both, nothing written for unchanged weights.

The demo's targets (cap, wall time) are a benchmark's and are not asserted here. Needs a
ComfyUI source tree and its packages (skips without them, fails in CI), and a memory cgroup
(root and a memory controller: the machine's, not the project's, so it skips without one
even in CI, saying why)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import comfyui_or_skip

comfyui_or_skip()

from lowtide.demo import cgroup_problem  # noqa: E402

RUN_KEYS = {
    "strategy",
    "cap_bytes",
    "status",
    "reason",
    "wall_s",
    "workflow_s",
    "cgroup_peak_bytes",
    "oom_kills",
    "process_rss_bytes",
    "peak_rss_bytes",
    "read_bytes",
    "rchar",
    "write_bytes",
    "image_sha256",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    problem = cgroup_problem()
    if problem is not None:
        print(f"test_comfyui_demo: skipped: {problem}")
        pytest.skip(f"the demo needs a memory cgroup (root and a memory controller): {problem}")
    cache = tmp_path_factory.mktemp("cache")
    command = [sys.executable, "-m", "lowtide.comfyui.demo", "--size", "tiny", "--cap", "4GiB"]
    command += ["--strategy", "stock-uncapped", "--strategy", "lowtide"]
    command += ["--json", "--cache-dir", str(cache)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Generated once into the cache directory given, nothing anywhere else.
    assert sorted(p.parent.name for p in cache.rglob("*.safetensors")) == ["checkpoints", "loras"]
    return json.loads(done.stdout)


def test_the_report_has_every_run_and_figure(report):
    assert report["size"] == "tiny"
    assert report["capped"] is True and report["cgroup_problem"] is None
    assert report["cap_bytes"] == 4 << 30
    assert Path(report["checkpoint"]).stat().st_size == report["checkpoint_bytes"]
    runs = {run["strategy"]: run for run in report["runs"]}
    assert list(runs) == ["stock-uncapped", "lowtide"]
    for run in runs.values():
        assert RUN_KEYS <= set(run), run
        assert run["status"] == "ok", run["reason"]
        assert run["cgroup_peak_bytes"] > 0
        assert run["read_bytes"] >= 0 and run["write_bytes"] >= 0
    assert runs["stock-uncapped"]["cap_bytes"] is None
    assert runs["lowtide"]["cap_bytes"] == 4 << 30
    assert set(report["verdicts"]) == {"cap", "writes", "wall"}
    for verdict in report["verdicts"].values():
        assert isinstance(verdict["target"], str) and verdict["met"] in (True, False)


def test_lowtide_gives_stock_comfyuis_image(report):
    stock, ours = report["runs"]
    assert len(ours["image_sha256"]) == 64
    assert ours["image_sha256"] == stock["image_sha256"]
    assert report["verdicts"]["cap"]["same_image"] is True


def test_lowtide_writes_nothing_for_unchanged_weights(report):
    ours = report["runs"][1]["lowtide"]
    assert ours["bytes_read_source"] > 0
    assert ours["unchanged_written_bytes"] == 0
    assert ours["bytes_written"] == ours["bytes_spilled"]
    assert report["verdicts"]["writes"]["met"] is True
    # Its settings were derived from the cap: the budget fits under it beside the reserve.
    assert ours["ram_budget"] + ours["reserve_ram"] < 4 << 30

"""Shared fixtures: synthetic safetensors files written by the reference implementation."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import lowtide


def import_or_skip(name: str, hint: str):
    """The module `name`; tests that need it skip without it (saying `hint`), but fail in CI
    (CI=true), whose test command installs it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{name} is not installed, and CI requires the tests that use it to run")
        pytest.skip(f"{name} is not installed ({hint})")


def comfyui_or_skip() -> None:
    """Skips the calling test module without a ComfyUI source tree ($LOWTIDE_COMFYUI, or
    ../shared/comfyui next to the repository) or the packages it needs for SD1.x workflows;
    fails instead in CI (CI=true), whose test command installs them."""
    import importlib.util

    from lowtide.comfyui import _headless

    why = None
    missing = [
        name
        for name in ("torch", "torchvision", "torchsde", "einops", "av", "scipy", "transformers")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        why = f"{', '.join(missing)} not installed (scripts/test installs ComfyUI's packages)"
    elif _headless.find_comfyui() is None:
        where = os.environ.get(_headless.ENV_VAR) or "../shared/comfyui next to the repository"
        why = f"no ComfyUI source tree at {where} (set ${_headless.ENV_VAR} to a v0.3.64 checkout)"
    if why is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{why}; CI requires the ComfyUI tests to run", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def _proc_io(field: str) -> int:
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields[field])


def write_bytes() -> int:
    """Bytes this process has caused to be written to storage (``/proc/self/io``)."""
    return _proc_io("write_bytes")


def read_bytes() -> int:
    """Bytes this process has caused to be read from storage (``/proc/self/io``): reads served
    by the page cache do not count."""
    return _proc_io("read_bytes")


def torch_or_skip():
    """The torch module; tests that need it skip without it, but fail in CI (CI=true)."""
    return import_or_skip("torch", "scripts/test installs it unless told not to")


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """A small model: a few dtypes and shapes, each tensor 4 KiB or less."""
    rng = np.random.default_rng(7)
    tensors = {
        "a.f32": rng.standard_normal((16, 32)).astype(np.float32),
        "b.f16": rng.standard_normal((8, 8)).astype(np.float16),
        "c.i64": np.arange(24, dtype=np.int64).reshape(2, 3, 4),
        "d.u8": rng.integers(0, 255, size=(100,), dtype=np.uint8),
        "e.bool": rng.integers(0, 2, size=(3, 5)).astype(np.bool_),
        "f.scalar": np.array(3.5, dtype=np.float64),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.fixture
def store(tmp_path: Path):
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        yield store

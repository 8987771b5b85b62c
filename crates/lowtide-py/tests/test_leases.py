"""`Model.leases`: many tensors pinned at once, read as one stream (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import lowtide
from lowtide.bench import make_cold


def write_model(path: Path, count: int, mib: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    tensors = {
        f"blocks.{i}.w": rng.standard_normal((mib << 18,), dtype=np.float32) for i in range(count)
    }
    save_file(tensors, str(path))
    return tensors


def test_leases_read_a_cold_model_as_one_stream_in_file_order(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    tensors = write_model(path, 12, 2)
    if not make_cold(path):
        pytest.skip("the page cache kept the file after POSIX_FADV_DONTNEED")
    with lowtide.Store(ram_budget="256MiB", spill_dir=tmp_path) as store:
        model = store.open_model(path)
        leases = model.leases()
        with safe_open(str(path), "np") as reference:
            assert [lease.name for lease in leases] == list(reference.keys())
        for lease in leases:
            assert np.array_equal(np.from_dlpack(lease), tensors[lease.name]), lease.name
        assert all(model.info(name).pins == 1 for name in tensors)
        stats = store.stats()
        if stats["restores_queued"] == 0:
            pytest.skip("no io_uring or no O_DIRECT here: every tensor was read alone")
        # All but those sharing a page with the header (cached when it was read).
        assert stats["restores_queued"] >= 10, stats
        for lease in leases:
            lease.close()
        assert all(model.info(name).pins == 0 for name in tensors)


def test_named_leases_come_in_the_order_asked(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    tensors = write_model(path, 6, 1)
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        model = store.open_model(path)
        names = ["blocks.4.w", "blocks.1.w", "blocks.5.w"]
        leases = model.leases(names)
        assert [lease.name for lease in leases] == names
        for lease in leases:
            assert np.array_equal(np.from_dlpack(lease), tensors[lease.name])


def test_leases_are_all_or_none(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    tensors = write_model(path, 6, 2)
    with lowtide.Store(ram_budget="7MiB", spill_dir=tmp_path) as store:
        model = store.open_model(path)
        with pytest.raises(lowtide.OverBudget):
            model.leases()  # 12 MiB in a 7 MiB budget
        assert all(model.info(name).pins == 0 for name in tensors)
        with pytest.raises(lowtide.NoSuchTensor, match=r"blocks\.9\.w"):
            model.leases(["blocks.0.w", "blocks.9.w"])
        assert all(model.info(name).pins == 0 for name in tensors)
        # Three fit, and the store goes on as before.
        leases = model.leases(["blocks.0.w", "blocks.1.w", "blocks.2.w"])
        assert [np.array_equal(np.from_dlpack(x), tensors[x.name]) for x in leases] == [True] * 3

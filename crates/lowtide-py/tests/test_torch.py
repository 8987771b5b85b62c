"""PyTorch views: dtypes against the reference, zero copy, pins, writes. Skipped without torch
(failing instead in CI)."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
from conftest import torch_or_skip
from safetensors import safe_open

import lowtide


@pytest.fixture
def torch():
    return torch_or_skip()


@pytest.fixture
def torch_model(torch, tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    tensors = {
        "bf16": torch.randn(4, 8, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(3, 3, generator=gen).to(torch.float16),
        "f32": torch.randn(5, generator=gen),
        "f64": torch.randn(2, 2, generator=gen, dtype=torch.float64),
        "i8": torch.arange(-8, 8, dtype=torch.int8),
        "i16": torch.arange(12, dtype=torch.int16).reshape(3, 4),
        "i32": torch.arange(6, dtype=torch.int32),
        "i64": torch.arange(6, dtype=torch.int64).reshape(1, 6),
        "u8": torch.arange(200, 210, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(3, generator=gen, dtype=torch.complex64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            tensors[name] = torch.randn(16, generator=gen).to(getattr(torch, name))
    for name in ("uint16", "uint32", "uint64"):
        tensors[name] = torch.arange(4, dtype=torch.int32).to(getattr(torch, name))
    path = tmp_path / "torch.safetensors"
    save_file(tensors, str(path))
    return path


def _bytes(torch, tensor):
    return tensor.reshape(-1).view(torch.uint8)


def test_every_dtype_matches_the_reference(torch, store, torch_model):
    model = store.open_model(torch_model)
    with safe_open(str(torch_model), "pt") as reference:
        for name in reference.keys():
            expected = reference.get_tensor(name)
            got = model.torch(name)
            assert got.dtype == expected.dtype, name
            assert got.shape == expected.shape, name
            # Byte for byte (NaNs included), whatever the dtype.
            assert torch.equal(_bytes(torch, got), _bytes(torch, expected)), name


def test_torch_view_is_zero_copy_writable_and_pinned(torch, store, torch_model):
    model = store.open_model(torch_model)
    lease = model.lease("f32")
    tensor = torch.from_dlpack(lease)
    assert tensor.data_ptr() == lease.data_ptr
    frombuffer = torch.frombuffer(lease, dtype=torch.float32)
    assert frombuffer.data_ptr() == lease.data_ptr
    assert np.from_dlpack(lease).ctypes.data == lease.data_ptr
    gc.collect()
    del lease
    gc.collect()
    assert model.info("f32").pins == 1
    tensor.mul_(2)  # an in-place write never faults: the memory is the store's own RAM copy
    assert torch.equal(frombuffer, tensor)
    del tensor
    assert model.info("f32").pins == 1  # frombuffer keeps the lease object
    del frombuffer
    gc.collect()
    assert model.info("f32").pins == 0


def test_mark_dirty_keeps_writes_through_a_tensor(torch, store, torch_model):
    model = store.open_model(torch_model)
    with safe_open(str(torch_model), "pt") as reference:
        original = reference.get_tensor("bf16")
    view = model.torch("bf16")
    view.add_(1)  # ComfyUI patches weights in place like this
    expected = view.clone()
    model.mark_dirty("bf16")  # while the tensor is alive: no copy
    assert model.info("bf16").clean is False
    del view
    gc.collect()
    store.free_memory("1GiB")
    assert model.info("bf16").tiers == ["spilled"]
    assert torch.equal(model.torch("bf16"), expected)
    gc.collect()
    model.replace("bf16", original)
    assert torch.equal(model.torch("bf16"), original)


def test_replace_and_derive_take_tensors(torch, store, torch_model):
    model = store.open_model(torch_model)
    new = torch.full((4, 8), 7.0, dtype=torch.bfloat16)
    model.replace("bf16", new)
    assert torch.equal(model.torch("bf16"), new)
    gc.collect()
    with pytest.raises(TypeError):
        model.replace("bf16", torch.zeros(4, 4, dtype=torch.float32))
    info = store.derive(model, "made", torch.arange(10, dtype=torch.int16).reshape(2, 5))
    assert (info.dtype, info.shape) == ("I16", (2, 5))
    assert torch.equal(model.torch("made"), torch.arange(10, dtype=torch.int16).reshape(2, 5))
    strided = torch.arange(20, dtype=torch.float32).reshape(4, 5)[:, 1]
    model.derive("strided", strided)
    assert torch.equal(model.torch("strided"), strided)


def test_budget_errors_reach_torch_callers(torch, tmp_path, torch_model):
    with lowtide.Store(ram_budget=32, spill_dir=tmp_path) as store:
        model = store.open_model(torch_model)
        with pytest.raises(lowtide.OverBudget) as err:
            model.torch("bf16")
        assert isinstance(err.value, MemoryError) and err.value.name == "bf16"

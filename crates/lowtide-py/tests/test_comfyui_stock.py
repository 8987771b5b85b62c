"""Stock ComfyUI, headless and in-process (``lowtide.comfyui``): the synthetic SD1.5 files are
what ComfyUI takes them for, and its text-to-image workflow is deterministic and sees a LoRA.
These are the baseline that lowtide's own loader nodes are compared against, bit for bit.

Needs a ComfyUI source tree (``$LOWTIDE_COMFYUI``, or ``../shared/comfyui`` next to the
repository) and the packages scripts/test installs for it; skips without them, but fails in
CI (CI=true)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from conftest import comfyui_or_skip

from lowtide.comfyui import _headless, _synthetic, _workflows

comfyui_or_skip()


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> _headless.Headless:
    """ComfyUI, prepared once for this module (its state is per process)."""
    return _headless.prepare(tmp_path_factory.mktemp("comfyui"))


@pytest.fixture(scope="module")
def checkpoint(comfy: _headless.Headless) -> Path:
    return _synthetic.write_checkpoint(comfy.checkpoints_dir)


@pytest.fixture(scope="module")
def lora(comfy: _headless.Headless) -> Path:
    """A LoRA for the UNet and the text encoder, so both patch paths run."""
    return _synthetic.write_lora(comfy.loras_dir, text_encoder=True)


@pytest.fixture(scope="module")
def stock_png(checkpoint: Path) -> bytes:
    [image] = _headless.run_workflow(_workflows.text_to_image(checkpoint.name)).images
    return image.png


def test_the_synthetic_checkpoint_is_sd15_to_comfyui(checkpoint: Path):
    assert _synthetic.detect(checkpoint) == "SD15"
    layout = _synthetic.checkpoint_layout()
    unet = sum(
        math.prod(t.shape) for k, t in layout.items() if k.startswith(_synthetic.UNET_PREFIX)
    )
    assert 18.7e6 < unet < 18.8e6
    assert 450e6 < checkpoint.stat().st_size < 452e6
    # The same content key, the same file: written once.
    assert _synthetic.write_checkpoint(checkpoint.parent) == checkpoint


def test_comfyui_loads_every_weight_from_the_synthetic_checkpoint(
    checkpoint: Path, caplog: pytest.LogCaptureFixture
):
    """ComfyUI leaves a weight missing from a checkpoint uninitialised, and says so only in a
    warning: none may appear."""
    import comfy.sd

    with caplog.at_level(logging.WARNING):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint))
    assert model is not None and clip is not None and vae is not None
    assert [r.getMessage() for r in caplog.records if "missing" in r.getMessage().lower()] == []
    del model, clip, vae


def test_the_stock_workflow_gives_the_same_bytes_every_run(checkpoint: Path, stock_png: bytes):
    [again] = _headless.run_workflow(_workflows.text_to_image(checkpoint.name)).images
    assert again.png == stock_png
    pixels = again.pixels()
    assert pixels.shape == (64, 64, 3)
    # An image, not a flat or saturated field: a change in the weights shows in it.
    assert pixels.std() > 10
    assert ((pixels == 0) | (pixels == 255)).mean() < 0.5


def test_a_lora_changes_the_image(checkpoint: Path, lora: Path, stock_png: bytes):
    workflow = _workflows.text_to_image(checkpoint.name, lora_name=lora.name, lora_strength=1.0)
    assert workflow[_workflows.LORA]["class_type"] == "LoraLoader"
    [image] = _headless.run_workflow(workflow).images
    assert image.png != stock_png
    assert (image.pixels() != _headless.SavedImage("", Path(), stock_png).pixels()).mean() > 0.1


def test_comfyui_refuses_a_workflow_naming_a_missing_checkpoint(comfy: _headless.Headless):
    with pytest.raises(_headless.WorkflowInvalid, match="not in list"):
        _headless.run_workflow(_workflows.text_to_image("no-such-model.safetensors"))


def test_a_node_that_raises_fails_the_run_with_comfyuis_message(comfy: _headless.Headless):
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"not.a.model": np.zeros(4, np.float16)}, comfy.checkpoints_dir / "junk.safetensors")
    with pytest.raises(_headless.WorkflowFailed) as failed:
        _headless.run_workflow(_workflows.text_to_image("junk.safetensors"))
    assert failed.value.node_id == _workflows.LOADER
    assert failed.value.node_type == "CheckpointLoaderSimple"


def test_custom_nodes_load_as_comfyui_loads_them(comfy: _headless.Headless, tmp_path: Path):
    pack = tmp_path / "lowtide_test_pack"
    pack.mkdir()
    (pack / "__init__.py").write_text(
        "class Echo:\n"
        "    RETURN_TYPES = ('STRING',)\n"
        "    FUNCTION = 'run'\n"
        "    CATEGORY = 'lowtide/test'\n"
        "    @classmethod\n"
        "    def INPUT_TYPES(cls):\n"
        "        return {'required': {'text': ('STRING', {})}}\n"
        "    def run(self, text):\n"
        "        return (text,)\n"
        "NODE_CLASS_MAPPINGS = {'LowtideTestEcho': Echo}\n"
    )
    (tmp_path / "broken.py").write_text("import lowtide_no_such_module\n")
    (tmp_path / "notes.txt").write_text("not a module\n")
    results = {r.path.name: r for r in _headless.load_custom_nodes(tmp_path)}
    assert sorted(results) == ["broken.py", "lowtide_test_pack"]
    assert results["lowtide_test_pack"].ok
    assert not results["broken.py"].ok
    assert "lowtide_no_such_module" in results["broken.py"].log
    import nodes

    assert "LowtideTestEcho" in nodes.NODE_CLASS_MAPPINGS

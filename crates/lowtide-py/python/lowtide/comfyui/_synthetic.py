"""Seeded SD1.5-shaped checkpoints and LoRAs that a real ComfyUI loads and runs.

Every key and shape comes from ComfyUI's own classes, built on ``meta`` (no memory): its
``UNetModel`` with an SD1.5 configuration, its CLIP-L text model (``sd1_clip_config.json``) and
its ``AutoencoderKL`` with the SD1.x VAE configuration. ComfyUI does not initialise weights (its
layers skip ``reset_parameters``), so a key left out of a file would be whatever memory held:
the files hold every key ComfyUI loads from an SD1.5 checkpoint. The one weight it never loads
from one, CLIP's ``text_projection``, feeds only the projected pooled output SD1.5 discards.

Two sizes:

- ``"tiny"``: the smallest UNet ComfyUI v0.3.64 detects as SD1.5: 320 channels, one level
  (``channel_mult [1]``), one res block and one transformer in it, no middle block (18.7 M
  parameters); CLIP-L and the VAE at their fixed sizes (123.1 M and 83.7 M). 451 MB of fp16.
- ``"full"``: the real SD1.5 UNet (``channel_mult [1, 2, 4, 4]``, two res blocks a level,
  transformers in the first three levels, a middle block: 859.5 M parameters). 2.13 GB of fp16.

Files are written tensor by tensor (one tensor in memory at a time), named by a hash of what
they hold (layout, seed, dtype, the generator's version), and reused when present: tests and
demos generate each once per directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lowtide.comfyui._headless import import_comfyui

Size = Literal["tiny", "full"]

# Part of every file's content key: bump it when the values written for a layout change.
_GENERATOR_VERSION = 1

_UNET_BASE: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

_UNET_LEVELS: dict[str, dict[str, Any]] = {
    "tiny": {
        "num_res_blocks": [1],
        "channel_mult": [1],
        "transformer_depth": [1],
        "transformer_depth_output": [1, 1],
        "transformer_depth_middle": -2,  # no middle block
    },
    "full": {
        "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "transformer_depth_middle": 1,
    },
}

# ComfyUI's default SD1.x VAE (``comfy.sd.VAE`` for a state dict without a config).
_VAE_DDCONFIG: dict[str, Any] = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."

_DTYPES = {"F16": 2, "F32": 4}


@dataclass(frozen=True)
class Tensor:
    """One tensor of a layout: its shape, and how it is filled (``"normal"``: N(0, 0.02);
    ``"ones"``, ``"zeros"``: a norm's weight and bias)."""

    shape: tuple[int, ...]
    fill: Literal["normal", "ones", "zeros"] = "normal"


def unet_config(size: Size = "tiny") -> dict[str, Any]:
    """The UNet configuration ComfyUI's ``detect_unet_config`` reports for a checkpoint of
    ``size`` (before ``supported_models.SD15`` adds ``num_heads`` and ``num_head_channels``)."""
    if size not in _UNET_LEVELS:
        raise ValueError(f"size must be one of {sorted(_UNET_LEVELS)}, not {size!r}")
    return {**_UNET_BASE, **_UNET_LEVELS[size]}


def _unet(size: Size) -> Any:
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = comfy.supported_models.SD15(unet_config(size)).unet_config
    return UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)


def _clip() -> Any:
    import comfy.clip_model
    import comfy.ops
    import torch

    config_file = Path(comfy.clip_model.__file__).with_name("sd1_clip_config.json")
    config = json.loads(config_file.read_text())
    with torch.device("meta"):
        return comfy.clip_model.CLIPTextModel(config, None, "meta", comfy.ops.manual_cast)


def _vae() -> Any:
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(ddconfig=dict(_VAE_DDCONFIG), embed_dim=4)


def _layout_of(module: Any, prefix: str, skip: Iterable[str] = ()) -> dict[str, Tensor]:
    import torch

    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    fills: dict[str, Literal["ones", "zeros"]] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, norms):
            fills[f"{name}.weight"] = "ones"
            fills[f"{name}.bias"] = "zeros"
    skipped = set(skip)
    return {
        prefix + name: Tensor(tuple(value.shape), fills.get(name, "normal"))
        for name, value in module.state_dict().items()
        if name not in skipped
    }


def checkpoint_layout(
    size: Size = "tiny", comfyui: str | os.PathLike[str] | None = None
) -> dict[str, Tensor]:
    """Every key of an SD1.5 checkpoint of ``size`` with the names ComfyUI loads
    (``model.diffusion_model.*``, ``cond_stage_model.transformer.text_model.*``,
    ``first_stage_model.*``), sorted by name. Imports ComfyUI (:func:`import_comfyui`)."""
    import_comfyui(comfyui)
    layout = {
        **_layout_of(_unet(size), UNET_PREFIX),
        # Not loadable from an SD1 checkpoint (ComfyUI renames it into text_model.*, where
        # nothing takes it); it feeds only the projected pooled output that SD1.5 discards.
        **_layout_of(_clip(), CLIP_PREFIX, skip=["text_projection.weight"]),
        **_layout_of(_vae(), VAE_PREFIX),
    }
    return dict(sorted(layout.items()))


def _content_key(kind: str, layout: dict[str, Tensor], dtype: str, **params: Any) -> str:
    text = json.dumps(
        {
            "kind": kind,
            "version": _GENERATOR_VERSION,
            "dtype": dtype,
            "params": params,
            "layout": [[name, list(t.shape), t.fill] for name, t in layout.items()],
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write(
    path: Path,
    layout: dict[str, Tensor],
    dtype: str,
    make: Callable[[str, Tensor], Any],
    metadata: dict[str, str],
) -> None:
    """Writes a safetensors file tensor by tensor: ``make(name, tensor)`` returns each as a
    torch tensor (any float dtype; cast to ``dtype`` here) when its turn comes. Written to a
    temporary name and renamed, so a reader never sees a partial file."""
    import torch

    torch_dtype = {"F16": torch.float16, "F32": torch.float32}[dtype]
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in layout.items():
        nbytes = math.prod(tensor.shape) * _DTYPES[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as out:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            for name, tensor in layout.items():
                value = make(name, tensor).to(torch_dtype).contiguous()
                if tuple(value.shape) != tensor.shape:
                    raise AssertionError(f"{name}: made {tuple(value.shape)}, not {tensor.shape}")
                out.write(value.reshape(-1).view(torch.uint8).numpy().data)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def _filler(seed: int) -> Callable[[str, Tensor], Any]:
    """Values for a checkpoint: N(0, 0.02) from one generator seeded with ``seed``, drawn in
    the layout's order; norms' weights 1 and biases 0."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def make(name: str, tensor: Tensor) -> Any:
        if tensor.fill == "ones":
            return torch.ones(tensor.shape)
        if tensor.fill == "zeros":
            return torch.zeros(tensor.shape)
        return torch.randn(tensor.shape, generator=generator) * 0.02

    return make


def write_checkpoint(
    directory: str | os.PathLike[str],
    size: Size = "tiny",
    *,
    seed: int = 0,
    comfyui: str | os.PathLike[str] | None = None,
) -> Path:
    """An fp16 SD1.5 checkpoint of ``size`` in ``directory`` (created), seeded: the same bytes
    for the same ComfyUI layout, ``size`` and ``seed``. Written once; a file already there
    under the same content key is returned as is. Imports ComfyUI."""
    layout = checkpoint_layout(size, comfyui)
    key = _content_key("checkpoint", layout, "F16", size=size, seed=seed)
    path = Path(directory) / f"sd15-{size}-{key}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"written_by": "lowtide.comfyui", "size": size, "seed": str(seed)}
        _write(path, layout, "F16", _filler(seed), metadata)
    return path


def lora_layout(
    size: Size = "tiny",
    *,
    rank: int = 4,
    text_encoder: bool = False,
    comfyui: str | os.PathLike[str] | None = None,
) -> dict[str, Tensor]:
    """A kohya LoRA's keys for every linear and convolution weight of the UNet of ``size``
    (51 modules for ``"tiny"``, 282 for ``"full"``), named as kohya does:
    ``lora_unet_<diffusers name>`` with
    ``.lora_down.weight`` (rank x in [x k x k]), ``.lora_up.weight`` (out x rank [x 1 x 1])
    and ``.alpha`` (a scalar); with ``text_encoder`` also ``lora_te_text_model_encoder_layers_*``
    for CLIP's attention and MLP (72 modules). Sorted by name. Imports ComfyUI."""
    import_comfyui(comfyui)
    import comfy.lora
    import comfy.supported_models
    import comfy.utils

    targets: dict[str, tuple[int, ...]] = {}
    unet = _unet(size).state_dict()
    config = comfy.supported_models.SD15(unet_config(size)).unet_config
    for diffusers, ldm in comfy.utils.unet_to_diffusers(config).items():
        if diffusers.endswith(".weight") and ldm in unet and unet[ldm].ndim in (2, 4):
            stem = diffusers[: -len(".weight")].replace(".", "_")
            targets[f"lora_unet_{stem}"] = tuple(unet[ldm].shape)
    if text_encoder:
        clip = _clip().state_dict()
        for layer in range(1000):
            if f"text_model.encoder.layers.{layer}.mlp.fc1.weight" not in clip:
                break
            for part, kohya in comfy.lora.LORA_CLIP_MAP.items():
                shape = tuple(clip[f"text_model.encoder.layers.{layer}.{part}.weight"].shape)
                targets[f"lora_te_text_model_encoder_layers_{layer}_{kohya}"] = shape
    layout: dict[str, Tensor] = {}
    for stem, shape in targets.items():
        out_features, in_features, *kernel = shape
        ones = [1] * len(kernel)
        layout[f"{stem}.lora_down.weight"] = Tensor((rank, in_features, *kernel))
        layout[f"{stem}.lora_up.weight"] = Tensor((out_features, rank, *ones))
        layout[f"{stem}.alpha"] = Tensor(())
    return dict(sorted(layout.items()))


def write_lora(
    directory: str | os.PathLike[str],
    size: Size = "tiny",
    *,
    rank: int = 4,
    text_encoder: bool = False,
    seed: int = 1,
    comfyui: str | os.PathLike[str] | None = None,
) -> Path:
    """An fp16 kohya LoRA (:func:`lora_layout`) in ``directory``, seeded and written once
    like :func:`write_checkpoint`. ``alpha`` is ``rank`` (scale 1); ``lora_down`` and
    ``lora_up`` are N(0, 0.05), so at strength 1 each patched weight moves by about a quarter
    of its own spread: an image changes visibly."""
    import torch

    layout = lora_layout(size, rank=rank, text_encoder=text_encoder, comfyui=comfyui)
    key = _content_key("lora", layout, "F16", size=size, rank=rank, seed=seed)
    suffix = "-te" if text_encoder else ""
    path = Path(directory) / f"lora-{size}-r{rank}{suffix}-{key}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(seed)

        def make(name: str, tensor: Tensor) -> Any:
            if name.endswith(".alpha"):
                return torch.tensor(float(rank))
            return torch.randn(tensor.shape, generator=generator) * 0.05

        metadata = {"written_by": "lowtide.comfyui", "ss_network_dim": str(rank)}
        metadata["ss_network_alpha"] = str(rank)
        _write(path, layout, "F16", make, metadata)
    return path


def detect(
    checkpoint: str | os.PathLike[str], comfyui: str | os.PathLike[str] | None = None
) -> str:
    """The model class ComfyUI's own detection picks for ``checkpoint`` (``"SD15"`` for the
    files written here), from its header alone: ComfyUI's ``model_detection`` reads only key
    names and shapes, so the tensors are handed to it on ``meta``. Raises ``ValueError`` when
    ComfyUI detects nothing."""
    import_comfyui(comfyui)
    import comfy.model_detection
    import torch

    header = _read_header(Path(checkpoint))
    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    state = {
        name: torch.empty(
            info["shape"], dtype=dtypes.get(info["dtype"], torch.float32), device="meta"
        )
        for name, info in header.items()
        if name != "__metadata__"
    }
    prefix = comfy.model_detection.unet_prefix_from_state_dict(state)
    config = comfy.model_detection.model_config_from_unet(state, prefix)
    if config is None:
        raise ValueError(f"ComfyUI detects no model in {checkpoint}")
    return type(config).__name__


def _read_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header: dict[str, Any] = json.loads(file.read(length))
    return header

"""API-format ComfyUI workflows (the ``prompt`` dict its ``/prompt`` endpoint takes): node id
-> ``{"class_type": ..., "inputs": ...}``, where an input ``[node_id, slot]`` is another node's
output. Plain data: building one imports nothing from ComfyUI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Node ids in :func:`text_to_image`'s workflow, for reading its outputs or patching it.
LOADER = "1"
LORA = "2"
POSITIVE = "3"
NEGATIVE = "4"
LATENT = "5"
SAMPLER = "6"
DECODE = "7"
SAVE = "8"


def text_to_image(
    ckpt_name: str,
    *,
    loader: str = "CheckpointLoaderSimple",
    loader_inputs: Mapping[str, Any] | None = None,
    lora_name: str | None = None,
    lora_strength: float = 1.0,
    lora_strength_clip: float | None = None,
    lora_loader: str = "LoraLoader",
    positive: str = "a lighthouse on a cliff at dawn",
    negative: str = "blurry",
    size: int = 64,
    batch_size: int = 1,
    seed: int = 42,
    steps: int = 2,
    cfg: float = 7.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    filename_prefix: str = "lowtide",
) -> dict[str, dict[str, Any]]:
    """The text-to-image workflow: ``loader`` (``ckpt_name``) -> ``LoraLoader`` (only with
    ``lora_name``) -> ``CLIPTextEncode`` x2 -> ``EmptyLatentImage`` (``size`` x ``size``) ->
    ``KSampler`` (``steps``, ``sampler_name``, fixed ``seed``) -> ``VAEDecode`` ->
    ``SaveImage``. A new dict each call; node ids are this module's constants.

    ``loader``: any node class whose outputs are (MODEL, CLIP, VAE), as
    ``CheckpointLoaderSimple``'s are; it gets ``{"ckpt_name": ckpt_name, **loader_inputs}``.
    ``lora_strength_clip``: Default: ``lora_strength``."""
    if lora_strength_clip is None:
        lora_strength_clip = lora_strength
    model: list[Any] = [LOADER, 0]
    clip: list[Any] = [LOADER, 1]
    prompt: dict[str, dict[str, Any]] = {
        LOADER: {
            "class_type": loader,
            "inputs": {"ckpt_name": ckpt_name, **(loader_inputs or {})},
        },
    }
    if lora_name is not None:
        prompt[LORA] = {
            "class_type": lora_loader,
            "inputs": {
                "model": model,
                "clip": clip,
                "lora_name": lora_name,
                "strength_model": lora_strength,
                "strength_clip": lora_strength_clip,
            },
        }
        model, clip = [LORA, 0], [LORA, 1]
    prompt[POSITIVE] = {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": clip}}
    prompt[NEGATIVE] = {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": clip}}
    prompt[LATENT] = {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": size, "height": size, "batch_size": batch_size},
    }
    prompt[SAMPLER] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "seed": seed,
            "steps": steps,
            "cfg": cfg,
            "sampler_name": sampler_name,
            "scheduler": scheduler,
            "positive": [POSITIVE, 0],
            "negative": [NEGATIVE, 0],
            "latent_image": [LATENT, 0],
            "denoise": 1.0,
        },
    }
    prompt[DECODE] = {
        "class_type": "VAEDecode",
        "inputs": {"samples": [SAMPLER, 0], "vae": [LOADER, 2]},
    }
    prompt[SAVE] = {
        "class_type": "SaveImage",
        "inputs": {"images": [DECODE, 0], "filename_prefix": filename_prefix},
    }
    return prompt

"""ComfyUI nodes: loaders whose models keep their weights in a lowtide store.

``LowtideCheckpointLoader`` is ``CheckpointLoaderSimple`` and ``LowtideUNETLoader`` is
``UNETLoader``, with the same inputs and outputs, so every stock node (``LoraLoader``,
``KSampler``, ``CLIPTextEncode``, ``VAEDecode``) takes what they return. Weights are read from
the model file when a model computes, up to the store's RAM budget, and streamed per layer
beyond it; unloading an unchanged weight writes nothing; a LoRA keeps no backup.

The store is one per ComfyUI process, made at the first load from the environment:

- ``LOWTIDE_RAM_BUDGET``: the most RAM lowtide's weights may hold ("6GiB"). Default: half of
  the memory available when ComfyUI starts (the smaller of ``MemAvailable`` and the cgroup's
  headroom).
- ``LOWTIDE_RESERVE_RAM``: keep this much memory available to everything else; patched weights
  are spilled and unchanged ones dropped below it. Default: a tenth of that available memory,
  at most 2 GiB.
- ``LOWTIDE_SPILL_DIR``: where patched weights are spilled (an unnamed file, reserved before it
  is written). Default: ComfyUI's temp directory.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import folder_paths

import lowtide
from lowtide.comfyui.loader import load_checkpoint, load_diffusion_model

_store: lowtide.Store | None = None
_store_lock = threading.Lock()


def settings() -> dict[str, Any]:
    """The store's settings from the environment, with the defaults filled in (bytes)."""
    available = _available_memory()
    budget = os.environ.get("LOWTIDE_RAM_BUDGET")
    reserve = os.environ.get("LOWTIDE_RESERVE_RAM")
    spill_dir = os.environ.get("LOWTIDE_SPILL_DIR") or folder_paths.get_temp_directory()
    return {
        "ram_budget": lowtide.parse_size(budget) if budget else available // 2,
        "reserve_ram": lowtide.parse_size(reserve) if reserve else min(available // 10, 2 << 30),
        "spill_dir": spill_dir,
    }


def store() -> lowtide.Store:
    """The process's store, made from :func:`settings` at the first call."""
    global _store
    with _store_lock:
        if _store is None or _store.closed:
            config = settings()
            os.makedirs(config["spill_dir"], exist_ok=True)
            _store = lowtide.Store(**config)
        return _store


def use_store(store: lowtide.Store | None) -> None:
    """Makes the loaders use ``store`` from now on (None: a new one from the environment at
    the next load). Models loaded before keep the store they were loaded into."""
    global _store
    with _store_lock:
        _store = store


def _available_memory() -> int:
    with lowtide.Store(ram_budget=1) as probe:  # only to read the memory
        reading = probe.memory()
    return int(reading["available"])


class LowtideCheckpointLoader:
    """``CheckpointLoaderSimple`` with the weights in lowtide's store."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 - ComfyUI's name
        return {
            "required": {
                "ckpt_name": (
                    folder_paths.get_filename_list("checkpoints"),
                    {"tooltip": "The checkpoint to load; its weights are read when used."},
                ),
            }
        }

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = (
        "The model used for denoising latents.",
        "The CLIP model used for encoding text prompts.",
        "The VAE model used for encoding and decoding images to and from latent space.",
    )
    FUNCTION = "load_checkpoint"
    CATEGORY = "loaders/lowtide"
    DESCRIPTION = (
        "Loads a checkpoint like Load Checkpoint, keeping its weights in lowtide's store: read "
        "from the file when used, dropped (never written) when RAM runs short, LoRAs applied "
        "without backups."
    )

    def load_checkpoint(self, ckpt_name: str) -> tuple[Any, Any, Any]:
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        loaded = load_checkpoint(
            path, store(), embedding_directory=folder_paths.get_folder_paths("embeddings")
        )
        return (loaded.model, loaded.clip, loaded.vae)


class LowtideUNETLoader:
    """``UNETLoader`` (Load Diffusion Model) with the weights in lowtide's store."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 - ComfyUI's name
        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = "loaders/lowtide"
    DESCRIPTION = "Loads a diffusion model like Load Diffusion Model, with lowtide's store."

    def load_unet(self, unet_name: str) -> tuple[Any]:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        return (load_diffusion_model(path, store()).model,)


NODE_CLASS_MAPPINGS = {
    "LowtideCheckpointLoader": LowtideCheckpointLoader,
    "LowtideUNETLoader": LowtideUNETLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LowtideCheckpointLoader": "Load Checkpoint (lowtide)",
    "LowtideUNETLoader": "Load Diffusion Model (lowtide)",
}

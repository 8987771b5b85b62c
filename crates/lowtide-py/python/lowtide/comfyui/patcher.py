"""``LowtideModelPatcher``: ComfyUI's ``ModelPatcher`` for a model whose weights a lowtide
store holds (bound by :mod:`lowtide.comfyui.loader`).

It translates ComfyUI's calls into :mod:`lowtide.torch`'s and holds no policy of its own:

- ``load`` (what ``load_models_gpu`` ends in) patches the weights that have patches, then
  loads the model's weights up to what the store leaves room for; the rest stream in per
  layer as the model computes. Other lowtide models are unloaded first, their unchanged
  weights kept as the store's cache (dropped, never written, when it needs the room): ComfyUI
  computes with one model at a time.
- ``patch_weight_to_device`` computes a patched weight as ComfyUI does, with its own
  ``comfy.lora.calculate_weight`` in float32 and its rounding to the dtype stock ComfyUI holds
  the weight in, and hands the result to lowtide as a patched tensor. No backup of the
  original is kept: ``unpatch_model`` discards the patched tensors and the weights are read
  from the model file again.
- ``partially_unload`` and ``detach`` (ComfyUI unloading the model) let weights go:
  unchanged ones with nothing written, patched ones kept by lowtide (in RAM, or its spill
  file when RAM runs short). A ``detach`` that keeps the patches (a clone taking the model's
  place, a patcher collected) leaves the weights where they are, as stock ComfyUI does.
- ``clone`` (``LoraLoader``) shares the binding: clones are patch sets over one model.

Its module ``.to()`` is never called with weights that are not loaded (they are on ``meta``
and come in by their layer's forward).
"""

from __future__ import annotations

import weakref
from typing import Any

import comfy.float
import comfy.lora
import comfy.model_patcher
import torch

from lowtide.torch import ManagedModule

_ACTIVE: weakref.WeakSet[ManagedModule] = weakref.WeakSet()
"""The managed models loaded by a ``load`` and not unloaded since."""


class LowtideModelPatcher(comfy.model_patcher.ModelPatcher):  # type: ignore[misc]
    """A ``ModelPatcher`` whose model's weights lowtide holds (``model.lowtide``, a
    :class:`lowtide.torch.ManagedModule`, set by :mod:`lowtide.comfyui.loader`)."""

    @property
    def managed(self) -> ManagedModule:
        """The binding of this model's weights, shared by its clones."""
        managed: ManagedModule = self.model.lowtide
        return managed

    def patch_weight_to_device(
        self, key: str, device_to: Any = None, inplace_update: bool = False
    ) -> None:
        if key not in self.patches:
            return
        managed = self.managed
        if key not in managed.names:  # a tensor of ComfyUI's own, not from the file
            super().patch_weight_to_device(key, device_to, inplace_update)
            return
        _, set_func, convert_func = comfy.model_patcher.get_key_weight(self.model, key)
        if set_func is not None:
            raise NotImplementedError(
                f"{key}: its layer sets patched weights itself (set_{key.rsplit('.', 1)[-1]}); "
                "lowtide's loaders bind plain layers only"
            )
        managed.revert(key)  # patches are computed from the file's weight, as stock does
        with managed.hold(key) as weight:  # the file's weight, as stock ComfyUI reads it
            work = weight.to(torch.float32, copy=True)
            del weight  # no reference past the hold: the weight may be let go
        if convert_func is not None:
            work = convert_func(work, inplace=True)
        out = comfy.lora.calculate_weight(self.patches[key], work, key)
        # Rounded to the dtype stock ComfyUI holds the model's weights in (float32 on the CPU
        # for a UNet and a VAE), not to the file's: the same bits as stock.
        stock_dtype: torch.dtype = self.model.lowtide_stock_dtype
        seed = comfy.model_patcher.string_to_seed(key)
        managed.set_weight(key, comfy.float.stochastic_rounding(out, stock_dtype, seed=seed))

    def load(
        self,
        device_to: Any = None,
        lowvram_model_memory: int = 0,
        force_patch_weights: bool = False,
        full_load: bool = False,
    ) -> None:
        with self.use_ejected():
            self.unpatch_hooks()
            managed = self.managed
            for other in list(_ACTIVE):
                if other is not managed:  # its patches stay: lowtide keeps them
                    other.unload(keep_cached=True)
                    other.module.model_loaded_weight_memory = 0  # type: ignore[assignment]
                    _ACTIVE.discard(other)
            if force_patch_weights or self.model.current_weight_patches_uuid != self.patches_uuid:
                for key in list(self.patches):
                    self.patch_weight_to_device(key, device_to=device_to)
            device = torch.device(device_to) if device_to is not None else managed.device
            loaded = managed.load(device)
            _ACTIVE.add(managed)
            self.model.device = device
            self.model.model_lowvram = False
            self.model.lowvram_patch_counter = 0
            self.model.model_loaded_weight_memory = loaded
            self.model.current_weight_patches_uuid = self.patches_uuid
            for callback in self.get_all_callbacks(comfy.model_patcher.CallbacksMP.ON_LOAD):
                callback(self, device_to, lowvram_model_memory, force_patch_weights, full_load)
            self.apply_hooks(self.forced_hooks, force_apply=True)

    def unpatch_model(self, device_to: Any = None, unpatch_weights: bool = True) -> None:
        if unpatch_weights:
            self.managed.unpatch()  # the file's weights again: nothing written, no backup
        # ComfyUI's own bookkeeping (object patches, hooks), without moving the module: its
        # weights stay where lowtide has them.
        super().unpatch_model(device_to=None, unpatch_weights=unpatch_weights)
        if unpatch_weights and device_to is not None:
            self.model.device = device_to

    def partially_unload(self, device_to: Any, memory_to_free: int = 0) -> int:
        freed = self.managed.unload(memory_to_free, keep_cached=True)
        self.model.model_loaded_weight_memory = self.managed.loaded_bytes
        return freed

    def detach(self, unpatch_all: bool = True) -> Any:
        model = super().detach(unpatch_all)
        if unpatch_all:  # ComfyUI unloading the model; not a clone taking its place
            self.managed.unload(keep_cached=True)
            self.model.model_loaded_weight_memory = 0
            _ACTIVE.discard(self.managed)
        return model

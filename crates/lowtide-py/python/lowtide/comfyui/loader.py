"""ComfyUI models whose weights a lowtide store holds, built by ComfyUI's own loaders.

ComfyUI's ``comfy.sd.load_state_dict_guess_config`` detects the model, builds it and loads
a state dict into it. Here it gets a state dict of ``meta`` tensors made from the file's
header (nothing read) and builds the model with its parameters on ``meta``
(:func:`lowtide.torch.init_empty`); every ``load_state_dict`` call it makes is watched, so
that each parameter is bound by :func:`lowtide.torch.manage` to the file tensor ComfyUI put
there, whatever names ComfyUI gave it.

Weights keep the file's dtype and are cast per layer to the dtype ComfyUI computes in: the
UNet is built with the file's dtype (ComfyUI then picks its ``manual_cast`` layers), the text
encoder is ComfyUI's ``manual_cast`` already, and the VAE's layers are switched to casting
(``comfy_cast_weights``). Casting a float16 weight to float32 is exact, so each layer
computes with the values stock ComfyUI computes with; patched weights are rounded to the
dtype stock ComfyUI holds them in (:mod:`lowtide.comfyui.patcher`). Images match stock
ComfyUI's bit for bit where stock holds weights in a dtype at least as wide as the file's
(on the CPU: float32 UNet and VAE, float16 text encoder, from float16 or float32 files).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import comfy.model_detection
import comfy.model_management
import comfy.sd
import comfy.utils
import torch
from torch import nn

import lowtide
import lowtide.torch as lt
from lowtide.comfyui.patcher import LowtideModelPatcher
from lowtide.torch._binding import torch_dtype

_KEEP_BYTES = 64 << 10
"""Parameters up to this size keep the value their module's code made, for those the file
does not hold (a computed scalar); larger ones made by ComfyUI's layers are uninitialised."""


class LoadError(lowtide.LowtideError, ValueError):
    """A model file lowtide's ComfyUI loaders cannot bind: not a checkpoint ComfyUI
    detects, or weights ComfyUI converts while loading (their values are not the file's)."""


@dataclass
class Loaded:
    """What a loader made: ComfyUI's objects, and what lowtide knows of them."""

    model: Any  # a LowtideModelPatcher, or None
    clip: Any  # a comfy.sd.CLIP, or None
    vae: Any  # a comfy.sd.VAE, or None
    managed: list[lt.ManagedModule] = field(default_factory=list)
    unfilled: list[str] = field(default_factory=list)
    """Tensors ComfyUI expects and the file does not hold: they keep the value ComfyUI's code
    gave them where it computed one (up to 64 KiB, such as CLIP's ``logit_scale``), else
    zeros (stock ComfyUI leaves those uninitialised)."""


def load_checkpoint(
    path: str | os.PathLike[str],
    store: lowtide.Store,
    *,
    output_vae: bool = True,
    output_clip: bool = True,
    embedding_directory: Any = None,
) -> Loaded:
    """Loads a checkpoint (UNet, text encoder, VAE) as ``CheckpointLoaderSimple`` does, with
    its weights bound to ``path`` in ``store``; nothing is read until a model computes."""
    source = store.open_model(path)
    try:
        with _bound(source) as state_dict:
            out = comfy.sd.load_state_dict_guess_config(
                state_dict.tensors,
                output_vae=output_vae,
                output_clip=output_clip,
                embedding_directory=embedding_directory,
                model_options={"dtype": state_dict.unet_dtype()},
                te_model_options={"initial_device": torch.device("meta")},
            )
        if out is None:
            raise LoadError(f"{path}: ComfyUI does not detect a model in it", attrs={"path": path})
        patcher, clip, vae = out[:3]
        loaded = Loaded(model=None, clip=clip, vae=vae)
        if patcher is not None:
            loaded.model = _managed_patcher(patcher, patcher.model, store, source, state_dict)
            loaded.model.model.lowtide_stock_dtype = state_dict.stock_unet_dtype(patcher.model)
            loaded.managed.append(loaded.model.managed)
        if clip is not None:
            clip.patcher = _managed_patcher(
                clip.patcher, clip.cond_stage_model, store, source, state_dict
            )
            clip.cond_stage_model.lowtide_stock_dtype = comfy.model_management.text_encoder_dtype(
                clip.patcher.load_device
            )
            loaded.managed.append(clip.patcher.managed)
        if vae is not None:
            for module in vae.first_stage_model.modules():
                if hasattr(module, "comfy_cast_weights"):
                    module.comfy_cast_weights = True  # cast per layer to the VAE's dtype
            vae.patcher = _managed_patcher(
                vae.patcher, vae.first_stage_model, store, source, state_dict
            )
            vae.first_stage_model.lowtide_stock_dtype = vae.vae_dtype
            loaded.managed.append(vae.patcher.managed)
        loaded.unfilled = state_dict.unfilled
        return loaded
    except BaseException:
        source.close()
        raise


def load_diffusion_model(path: str | os.PathLike[str], store: lowtide.Store) -> Loaded:
    """Loads a diffusion model alone (a UNet or transformer file), as ``UNETLoader`` does."""
    source = store.open_model(path)
    try:
        with _bound(source) as state_dict:
            patcher = comfy.sd.load_diffusion_model_state_dict(
                state_dict.tensors, model_options={"dtype": state_dict.unet_dtype("")}
            )
        if patcher is None:
            raise LoadError(
                f"{path}: ComfyUI does not detect a diffusion model in it", attrs={"path": path}
            )
        model = _managed_patcher(patcher, patcher.model, store, source, state_dict)
        model.model.lowtide_stock_dtype = state_dict.stock_unet_dtype(patcher.model, "")
        return Loaded(model=model, clip=None, vae=None, managed=[model.managed])
    except BaseException:
        source.close()
        raise


class _StateDict:
    """The file's tensors as ``meta`` tensors, and which parameter ComfyUI loaded each into."""

    def __init__(self, source: lowtide.Model) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        for info in source.tensors():
            dtype = torch_dtype(info.dtype, info.name)
            self.tensors[info.name] = torch.empty(info.shape, dtype=dtype, device="meta")
        self.tensors_seen = dict(self.tensors)  # ComfyUI pops what it loads
        self.origin = {id(t): key for key, t in self.tensors.items()}
        self.bound: dict[int, str] = {}  # id(parameter) -> file key
        self.converted: set[int] = set()  # id(parameter) loaded from a tensor ComfyUI made
        self.made: dict[int, torch.Tensor] = {}  # id(meta parameter) -> the value code made
        self.unfilled: list[str] = []

    def keep_made(self, meta: nn.Parameter, made: nn.Parameter) -> None:
        if made.nbytes <= _KEEP_BYTES:
            self.made[id(meta)] = made.detach()

    def _prefix(self, prefix: str | None) -> str:
        if prefix is None:
            prefix = comfy.model_detection.unet_prefix_from_state_dict(self.tensors_seen)
        return prefix

    def unet_dtype(self, prefix: str | None = None) -> torch.dtype:
        """The dtype most of the diffusion model's weights have in the file."""
        dtype: torch.dtype = comfy.utils.weight_dtype(self.tensors_seen, self._prefix(prefix))
        return dtype

    def stock_unet_dtype(self, model: Any, prefix: str | None = None) -> torch.dtype:
        """The dtype stock ComfyUI would hold this diffusion model's weights in, chosen the
        way its loader chooses it."""
        prefix = self._prefix(prefix)
        dtype: torch.dtype = comfy.model_management.unet_dtype(
            model_params=comfy.utils.calculate_parameters(self.tensors_seen, prefix),
            supported_dtypes=list(model.model_config.supported_inference_dtypes),
            weight_dtype=comfy.utils.weight_dtype(self.tensors_seen, prefix),
        )
        return dtype

    def record(self, module: nn.Module, state_dict: Any) -> None:
        own = module.state_dict(keep_vars=True)
        for name, tensor in state_dict.items():
            target = own.get(name)
            if target is None or not isinstance(tensor, torch.Tensor):
                continue
            key = self.origin.get(id(tensor))
            if key is None:
                self.converted.add(id(target))
            else:
                self.bound[id(target)] = key


@contextlib.contextmanager
def _bound(source: lowtide.Model) -> Iterator[_StateDict]:
    """Runs ComfyUI's loading with parameters on ``meta`` and its ``load_state_dict`` calls
    recorded. Patches ``nn.Module.load_state_dict`` while it lasts (one loader at a time)."""
    state = _StateDict(source)
    original = nn.Module.load_state_dict

    def load_state_dict(module: nn.Module, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        state.record(module, state_dict)
        return original(module, state_dict, *args, **kwargs)

    nn.Module.load_state_dict = load_state_dict  # type: ignore[method-assign,assignment]
    try:
        with lt.init_empty(on_meta=state.keep_made):
            yield state
    finally:
        nn.Module.load_state_dict = original  # type: ignore[method-assign]


def _managed_patcher(
    patcher: Any, module: nn.Module, store: lowtide.Store, source: lowtide.Model, state: _StateDict
) -> LowtideModelPatcher:
    """Binds ``module``'s weights to the file and wraps it in a :class:`LowtideModelPatcher`
    with ``patcher``'s devices and settings."""
    names: dict[str, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        key = state.bound.get(id(tensor))
        if key is not None:
            names[name] = key
            if tensor.dtype != state.tensors_seen[key].dtype:
                _set_dtype(module, name, state.tensors_seen[key].dtype)
        elif tensor.device.type == "meta":
            if id(tensor) in state.converted:
                raise LoadError(
                    f"{name}: ComfyUI converts this weight while loading it (its values are "
                    "not the file's), which lowtide's loaders cannot bind; use ComfyUI's "
                    "stock loader for this model",
                    attrs={"name": name},
                )
            # Expected by ComfyUI and absent from the file: the value its code made (stock
            # ComfyUI keeps that), or zeros where that was uninitialised memory.
            _fill(module, name, state.made.get(id(tensor)))
            state.unfilled.append(name)
    managed = lt.manage(module, store, source, key_map=names.get, strict=False)
    # Embedding tables are read outside their own forward (ComfyUI's CLIP reads its position
    # embedding's weight in its parent's): loaded first whenever the model loads.
    managed.keep_loaded(
        f"{name}.weight"
        for name, sub in module.named_modules()
        if isinstance(sub, nn.Embedding) and f"{name}.weight" in names
    )
    module.lowtide = managed  # type: ignore[assignment]  # for the patcher and its clones
    wrapped = LowtideModelPatcher(
        module,
        load_device=patcher.load_device,
        offload_device=patcher.offload_device,
        size=patcher.size,
        weight_inplace_update=patcher.weight_inplace_update,
    )
    wrapped.hook_mode = patcher.hook_mode
    wrapped.is_clip = patcher.is_clip
    return wrapped


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def _set_dtype(module: nn.Module, name: str, dtype: torch.dtype) -> None:
    """Gives a meta parameter the file's dtype: its layer casts it when it computes."""
    owner, attr = _owner(module, name)
    old = getattr(owner, attr)
    meta = torch.empty(old.shape, dtype=dtype, device="meta")
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(meta, requires_grad=old.requires_grad)
    else:
        owner._buffers[attr] = meta


def _fill(module: nn.Module, name: str, made: torch.Tensor | None) -> None:
    owner, attr = _owner(module, name)
    old = getattr(owner, attr)
    value = torch.zeros(old.shape, dtype=old.dtype)
    if made is not None:
        value.copy_(made)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[attr] = value

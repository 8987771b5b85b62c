"""Binding a module's parameters and buffers to the tensors of its model files, by name,
and building modules whose parameters are on ``meta``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import lowtide
from lowtide._frameworks import _TORCH
from lowtide.torch._errors import BindError

Files = str | os.PathLike[str] | lowtide.Model | Iterable[str | os.PathLike[str] | lowtide.Model]


@dataclass(eq=False)
class Slot:
    """One managed weight: where it lives in the module and in the store. Hashed by
    identity."""

    name: str  # its name in the module (`blocks.0.attn.to_q.weight`)
    key: str  # its name in the model file
    model: lowtide.Model
    owners: list[tuple[nn.Module, str]]
    buffer: bool
    requires_grad: bool  # as the module had it
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    tensor: torch.Tensor | None = None  # on the device while loaded
    resident: bool = False  # loaded by `load`, kept across forwards
    last_use: int = 0
    patched: bool = False  # its bytes differ from the file's (a LoRA merged, or set)
    device_dirty: bool = False  # the device copy has writes lowtide does not hold yet
    patch_key: str | None = None  # the derived tensor holding a value set with set_weight
    file_dtype: torch.dtype = field(init=False)  # `dtype` and `nbytes` follow a set value
    file_nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.file_dtype, self.file_nbytes = self.dtype, self.nbytes

    @property
    def stored(self) -> str:
        """The store's name for the bytes the module computes with."""
        return self.patch_key if self.patch_key is not None else self.key


@dataclass
class Binding:
    """What :func:`bind` found: the managed weights, the ones each module owns (by module
    ``id``), and the module's own real tensors that no file holds."""

    slots: list[Slot]
    by_module: dict[int, list[Slot]]
    others: list[tuple[nn.Module, str, bool]]  # (owner, attribute, is a buffer)


@contextlib.contextmanager
def init_empty(
    on_meta: Callable[[nn.Parameter, nn.Parameter], None] | None = None,
) -> Iterator[None]:
    """Modules built inside get their parameters on ``meta`` (shape, dtype and
    ``requires_grad`` kept; no memory allocated, no initialisation computed) and their buffers
    as their own code makes them. Build a module under it before :func:`manage`. Patches
    ``nn.Module.register_parameter`` while it lasts: do not build modules in other threads
    meanwhile. ``on_meta(meta, made)`` sees each parameter as the module's code made it
    before its ``meta`` replacement takes its place."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(
                torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
            )
            if on_meta is not None:
                on_meta(meta, param)
            param = meta
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def bind(
    module: nn.Module,
    models: list[lowtide.Model],
    key_map: Callable[[str], str | None] | None,
    strict: bool,
) -> Binding:
    """Matches ``module``'s parameters and persistent buffers to the tensors of ``models`` by
    name (``key_map`` gives a name's key); checks every one (see :func:`lowtide.torch.manage`)
    and changes nothing: raises :class:`BindError` or returns the binding."""
    for model in models:
        if is_gguf(model.path):
            raise BindError(
                f"{model.path} is a GGUF file: lowtide.torch binds safetensors files only "
                "(GGUF tensors are quantized blocks in GGUF's names); read its tensors "
                "with Model.torch or Model.numpy",
                attrs={"path": model.path},
            )
    where: dict[str, lowtide.Model] = {}
    for model in models:
        for file_key in model.names():
            where.setdefault(file_key, model)
    slots: list[Slot] = []
    by_module: dict[int, list[Slot]] = {}
    by_tensor: dict[int, Slot] = {}
    missing: list[str] = []  # module names, with the key looked up where it differs
    missing_keys: list[str] = []
    skipped: list[str] = []
    for module_name, sub in module.named_modules(remove_duplicate=False):
        for attr, tensor, is_buffer in tensors_of(sub, persistent_only=True):
            name = f"{module_name}.{attr}" if module_name else attr
            slot = by_tensor.get(id(tensor))
            if slot is not None:  # tied: one weight, several owners
                if (sub, attr) not in slot.owners:
                    slot.owners.append((sub, attr))
                    by_module.setdefault(id(sub), []).append(slot)
                continue
            key = key_map(name) if key_map is not None else name
            if key is None:
                skipped.append(name)
                continue
            found = where.get(key)
            if found is None:
                missing.append(name if key == name else f"{name} (key {key})")
                missing_keys.append(key)
                continue
            info = found.info(key)
            dtype = torch_dtype(info.dtype, key)
            shape = tuple(tensor.shape)
            if info.shape != shape or dtype != tensor.dtype:
                raise BindError(
                    f"{name}: the module has {tensor.dtype} {list(shape)}, "
                    f"{found.path} has `{key}` as {info.dtype} {list(info.shape)}",
                    attrs={"name": name, "key": key, "path": found.path},
                )
            slot = Slot(
                name=name,
                key=key,
                model=found,
                owners=[(sub, attr)],
                buffer=is_buffer,
                requires_grad=tensor.requires_grad,
                shape=shape,
                dtype=dtype,
                nbytes=info.nbytes,
            )
            by_tensor[id(tensor)] = slot
            slots.append(slot)
            by_module.setdefault(id(sub), []).append(slot)
    if missing and strict:
        raise BindError(
            f"{len(missing)} weights are not in the model files: {shown(missing)}"
            + prefix_hint(missing_keys, where),
            attrs={"missing": missing},
        )
    if not slots:
        raise BindError(
            "no weight of the module was bound to the model files "
            f"({len(missing)} not found, {len(skipped)} left out by key_map); "
            f"the module has {shown(missing + skipped)}, the files have "
            f"{shown(list(where))}" + prefix_hint(missing_keys, where),
            attrs={"missing": missing},
        )
    others = _unmanaged(module, by_tensor)
    return Binding(slots=slots, by_module=by_module, others=others)


def _unmanaged(module: nn.Module, managed: dict[int, Slot]) -> list[tuple[nn.Module, str, bool]]:
    """The module's real tensors that no file holds (computed buffers), which move with the
    module between devices; refuses a tensor on ``meta`` that no file fills."""
    others: list[tuple[nn.Module, str, bool]] = []
    unfilled: list[str] = []
    seen: set[int] = set()
    for module_name, sub in module.named_modules(remove_duplicate=False):
        for attr, tensor, is_buffer in tensors_of(sub, persistent_only=False):
            if id(tensor) in managed:
                continue
            if tensor.device.type != "meta":
                others.append((sub, attr, is_buffer))
                continue
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            name = f"{module_name}.{attr}" if module_name else attr
            if not is_buffer:
                kind = "parameter"
            elif attr in sub._non_persistent_buffers_set:
                kind = "buffer the files never hold"
            else:
                kind = "buffer"
            unfilled.append(f"{name} ({kind})")
    if unfilled:
        raise BindError(
            f"{len(unfilled)} tensors of the module are on `meta` and not in the model "
            f"files, so nothing would fill them: {shown(unfilled, 12)}. Build the module "
            "under lowtide.torch.init_empty() instead of torch.device('meta'), so that "
            "its own code computes its buffers, or assign real tensors to these before "
            "manage()",
            attrs={"unfilled": unfilled},
        )
    return others


def place(slot: Slot, tensor: torch.Tensor) -> None:
    """Puts ``tensor`` into the module at every place the weight has."""
    value: torch.Tensor = (
        tensor if slot.buffer else nn.Parameter(tensor, requires_grad=slot.requires_grad)
    )
    for owner, attr in slot.owners:
        if slot.buffer:
            owner._buffers[attr] = value
        else:
            owner._parameters[attr] = value  # type: ignore[assignment]


def tensors_of(sub: nn.Module, persistent_only: bool) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """``(attribute, tensor, is_buffer)`` of a module's own parameters and buffers."""
    for attr, param in sub._parameters.items():
        if param is not None:
            yield attr, param, False
    for attr, buf in sub._buffers.items():
        if buf is not None and not (persistent_only and attr in sub._non_persistent_buffers_set):
            yield attr, buf, True


def meta_of(slot: Slot) -> torch.Tensor:
    return torch.empty(slot.shape, dtype=slot.dtype, device="meta")


def shown(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def prefix_hint(missing: list[str], keys: Mapping[str, Any]) -> str:
    """How to map the keys looked up to the files' keys when they differ by a common prefix
    (``bert.``, ``model.``), else an empty string. ``missing`` holds the keys looked up."""
    if not missing:
        return ""
    wanted = set(missing)
    added: dict[str, int] = {}  # the files' keys are `prefix + key`
    for key in keys:
        for at in [i + 1 for i, c in enumerate(key) if c == "."]:
            if key[at:] in wanted:
                added[key[:at]] = added.get(key[:at], 0) + 1
    removed: dict[str, int] = {}  # the files' keys are the keys without `prefix`
    for key in wanted:
        for at in [i + 1 for i, c in enumerate(key) if c == "."]:
            if key[at:] in keys:
                removed[key[:at]] = removed.get(key[:at], 0) + 1
    best_added = max(added.items(), key=lambda kv: kv[1], default=("", 0))
    best_removed = max(removed.items(), key=lambda kv: kv[1], default=("", 0))
    if max(best_added[1], best_removed[1]) * 2 < len(wanted):
        return ""
    if best_added[1] >= best_removed[1]:
        prefix, count = best_added
        return (
            f". The files' keys start with {prefix!r} where the keys looked up do not "
            f"({count} of them match with it): map them with {prefix!r} + name in key_map"
        )
    prefix, count = best_removed
    return (
        f". The keys looked up start with {prefix!r} where the files' keys do not "
        f"({count} of them match without it): map them with "
        f"name.removeprefix({prefix!r}) in key_map"
    )


def is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # a directory of shards, an index
        return False


def torch_dtype(name: str, key: str) -> torch.dtype:
    attr = _TORCH.get(name)
    if attr is None or not hasattr(torch, attr):
        raise BindError(f"{key}: dtype {name} has no torch equivalent", attrs={"key": key})
    return getattr(torch, attr)


def as_list(files: Files) -> list[str | os.PathLike[str] | lowtide.Model]:
    if isinstance(files, (str, os.PathLike, lowtide.Model)):
        return [files]
    return list(files)


def open_all(
    store: lowtide.Store, files: list[str | os.PathLike[str] | lowtide.Model]
) -> list[lowtide.Model]:
    models: list[lowtide.Model] = []
    try:
        for f in files:
            models.append(f if isinstance(f, lowtide.Model) else store.open_model(f))
    except BaseException:
        for model, f in zip(models, files, strict=False):
            if model is not f:
                model.close()
        raise
    return models

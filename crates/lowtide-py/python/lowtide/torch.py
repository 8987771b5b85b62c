"""``lowtide.torch``: the weights of a ``torch.nn.Module`` managed by a lowtide :class:`Store`.

:func:`manage` binds every parameter and persistent buffer of a module to a tensor of its
model files by name, without reading anything, and leaves them on the ``meta`` device. Then:

- :meth:`ManagedModule.load` materialises weights on a device up to a byte budget; the rest
  come in when a submodule's forward needs them and leave after it, so a model larger than
  the budget still runs;
- :meth:`ManagedModule.unload` frees them again: an unchanged weight is let go with nothing
  written (lowtide reads it again from the file), a patched one stays in lowtide's RAM while the
  budget and the reserve allow and goes to the spill file when they do not;
- :meth:`ManagedModule.patch` merges a LoRA into the weights; the merged weights become
  lowtide's dirty tensors. :meth:`ManagedModule.unpatch` returns to the file's weights without
  any backup copy.

Build the module under :func:`init_empty`: its parameters are created on ``meta`` (nothing
allocated), while its buffers are computed by its own code as usual. Buffers that are not in
the model files (``position_ids``, a rotary ``inv_freq``) then hold what the module computes.
A module built under ``torch.device("meta")`` has those buffers on ``meta`` too, and
:func:`manage` refuses it, naming each tensor nothing would fill.

On the CPU a loaded weight *is* lowtide's RAM copy, used by torch in place through DLPack (no
second copy): it stays pinned while the module holds it. On CUDA a weight is uploaded from
lowtide's RAM copy (read with ``O_DIRECT`` when cold), which is then evictable at once::

    import lowtide, lowtide.torch

    store = lowtide.Store(ram_budget="12GiB", reserve_ram="2GiB")
    with lowtide.torch.init_empty():
        unet = UNet(config)
    managed = lowtide.torch.manage(unet, store, "unet.safetensors")
    managed.load("cpu", budget="6GiB")     # what does not fit streams in per submodule
    managed.patch("style.safetensors", 0.8)
    image = unet(latents, t, text)         # an ordinary forward
    managed.unload()                       # unchanged weights: nothing written
    managed.unpatch()                      # the file's weights again, no backup kept

Each parameter keeps the ``requires_grad`` the module gave it, so a managed module computes
exactly what the same module loaded the ordinary way computes.

Threads: forwards of one managed module may run in several threads at once; a weight is let
go only when no running forward uses it. Each thread's streamed weights need room of their
own: when the store cannot hold them all, a forward raises :class:`lowtide.OverBudget`,
never computes with a missing weight. :meth:`~ManagedModule.patch`,
:meth:`~ManagedModule.unpatch`, :meth:`~ManagedModule.close` and a
:meth:`~ManagedModule.load` to another device raise :class:`ForwardRunning` while a forward
runs. An exception in a forward, ``KeyboardInterrupt`` included, leaves no weight held.

Parameters read by a module other than the one that owns them (a tied embedding read through
another module's ``forward``) must be loaded with :meth:`ManagedModule.load`; a forward only
brings in weights of the module it belongs to.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lowtide
from lowtide._frameworks import _TORCH

__all__ = [
    "BindError",
    "ForwardRunning",
    "LoraError",
    "LoraReport",
    "ManagedModule",
    "init_empty",
    "manage",
    "merge_lora",
]

_Files = str | os.PathLike[str] | lowtide.Model | Iterable[str | os.PathLike[str] | lowtide.Model]
_Lora = str | os.PathLike[str] | Mapping[str, torch.Tensor]


class BindError(lowtide.LowtideError, ValueError):
    """A module that cannot be bound to its model files: a weight missing from them or of
    another shape or dtype, no weight matched at all, a tensor that nothing would fill, or a
    file ``lowtide.torch`` does not take. The module is left as it was."""


class LoraError(lowtide.LowtideError, ValueError):
    """A LoRA that cannot be merged: no pair matches a managed weight, a pair whose shapes do
    not fit its weight, a rank of 0, a strength or alpha that is not finite, an adapter config
    that cannot be used. Checked before any weight changes: nothing was patched."""


class ForwardRunning(lowtide.LowtideError, RuntimeError):
    """A call that changes which weights a module computes with (``patch``, ``unpatch``,
    ``close``, ``load`` to another device) made while a forward of the module runs, in this
    thread or another. Nothing was changed: call it again once the forward returned."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what}: a forward of the managed module is running; call it between forwards",
            retryable=True,
        )


@dataclass(eq=False)
class _Slot:
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
    patched: bool = False  # its bytes differ from the file's (a LoRA merged)
    device_dirty: bool = False  # the device copy has writes lowtide does not hold yet


@dataclass
class LoraReport:
    """What :meth:`ManagedModule.patch` did."""

    patched: list[str] = field(default_factory=list)
    """Module weights a LoRA pair was merged into."""
    unmatched: list[str] = field(default_factory=list)
    """LoRA key stems that named no managed weight (left alone)."""


@contextlib.contextmanager
def init_empty() -> Iterator[None]:
    """Modules built inside get their parameters on ``meta`` (shape, dtype and
    ``requires_grad`` kept; no memory allocated, no initialisation computed) and their buffers
    as their own code makes them. Build a module under it before :func:`manage`. Patches
    ``nn.Module.register_parameter`` while it lasts: do not build modules in other threads
    meanwhile."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            meta = torch.empty_like(param, device="meta")
            param = nn.Parameter(meta, requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def manage(
    module: nn.Module,
    store: lowtide.Store,
    files: _Files,
    *,
    key_map: Callable[[str], str | None] | None = None,
    strict: bool = True,
) -> ManagedModule:
    """Binds ``module``'s parameters and persistent buffers to the tensors of ``files`` (paths
    of safetensors files, shard directories or indexes, or models already opened in
    ``store``) and puts them on the ``meta`` device. Nothing is read.

    ``key_map(name)`` gives a parameter's key in the files (default: its name), or None to
    leave it unmanaged. With ``strict`` (the default) every parameter must be found, with
    the file's shape and dtype; otherwise unmatched ones are left as they are. Raises
    :class:`BindError` when a weight does not match, when nothing matched, and when a tensor
    of the module is on ``meta`` and not in the files (nothing would fill it: build the
    module under :func:`init_empty`).
    """
    return ManagedModule(module, store, files, key_map=key_map, strict=strict)


def merge_lora(
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    alpha: float | None,
    strength: float,
) -> torch.Tensor:
    """``weight + up @ down * (strength * (alpha / rank))``, computed in float32 on
    ``weight``'s device and returned in ``weight``'s dtype (a new tensor). Conv weights are
    handled by flattening; ``alpha`` defaults to the rank. Raises :class:`LoraError` for a
    rank of 0 or a strength or alpha that is not finite."""
    rank = down.shape[0] if down.dim() else 0
    if rank == 0:
        raise LoraError(f"a LoRA of rank 0 (down has shape {list(down.shape)})")
    scaling = 1.0 if alpha is None else _finite(float(alpha), "alpha") / rank
    return _merge(weight, down, up, _finite(float(strength), "strength") * scaling)


def _merge(
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """``weight + delta * scale`` in float32, ``delta = up @ down`` (transposed for
    ``fan_in_fan_out`` weights, stored as inputs x outputs), as PEFT's merge computes it."""
    device = weight.device
    delta = up.to(device, torch.float32).flatten(1) @ down.to(device, torch.float32).flatten(1)
    if fan_in_fan_out:
        delta = delta.T
    merged = weight.to(torch.float32) + delta.reshape(weight.shape) * scale
    return merged.to(weight.dtype)


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise LoraError(f"a LoRA {what} of {value}: it must be a finite number")
    return value


class ManagedModule:
    """A module whose weights lowtide holds; see the module docstring. Made by
    :func:`manage`."""

    def __init__(
        self,
        module: nn.Module,
        store: lowtide.Store,
        files: _Files,
        *,
        key_map: Callable[[str], str | None] | None = None,
        strict: bool = True,
    ) -> None:
        self.module = module
        """The managed module."""
        self.store = store
        """The store holding its weights."""
        self.device = torch.device("cpu")
        self._slots: list[_Slot] = []
        self._by_module: dict[int, list[_Slot]] = {}
        self._others: list[tuple[nn.Module, str, bool]] = []  # unmanaged real tensors
        self._wrapped: list[tuple[nn.Module, Any]] = []  # (module, its own `forward` or None)
        self._lock = threading.RLock()
        self._frames: dict[int, list[_Slot]] = {}  # running forwards -> the weights they use
        self._tokens = itertools.count()
        self._loose: set[_Slot] = set()  # loaded for a forward, let go after it
        self._clock = 0
        files = _as_list(files)  # once: an iterator is read once
        given = [f for f in files if isinstance(f, lowtide.Model)]
        self._models = _open_all(store, files)
        try:
            self._bind(key_map, strict)
        except BaseException:
            for model in self._models:
                if not any(model is g for g in given):
                    model.close()  # opened here: its file is closed again
            raise

    # --- binding ----------------------------------------------------------------------------

    def _bind(self, key_map: Callable[[str], str | None] | None, strict: bool) -> None:
        for model in self._models:
            if _is_gguf(model.path):
                raise BindError(
                    f"{model.path} is a GGUF file: lowtide.torch binds safetensors files only "
                    "(GGUF tensors are quantized blocks in GGUF's names); read its tensors "
                    "with Model.torch or Model.numpy",
                    attrs={"path": model.path},
                )
        where: dict[str, lowtide.Model] = {}
        for model in self._models:
            for file_key in model.names():
                where.setdefault(file_key, model)
        by_tensor: dict[int, _Slot] = {}
        missing: list[str] = []  # module names, with the key looked up where it differs
        missing_keys: list[str] = []
        skipped: list[str] = []
        for module_name, sub in self.module.named_modules(remove_duplicate=False):
            for attr, tensor, is_buffer in _tensors_of(sub, persistent_only=True):
                name = f"{module_name}.{attr}" if module_name else attr
                slot = by_tensor.get(id(tensor))
                if slot is not None:  # tied: one weight, several owners
                    if (sub, attr) not in slot.owners:
                        slot.owners.append((sub, attr))
                        self._by_module.setdefault(id(sub), []).append(slot)
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
                dtype = _torch_dtype(info.dtype, key)
                shape = tuple(tensor.shape)
                if info.shape != shape or dtype != tensor.dtype:
                    raise BindError(
                        f"{name}: the module has {tensor.dtype} {list(shape)}, "
                        f"{found.path} has `{key}` as {info.dtype} {list(info.shape)}",
                        attrs={"name": name, "key": key, "path": found.path},
                    )
                slot = _Slot(
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
                self._slots.append(slot)
                self._by_module.setdefault(id(sub), []).append(slot)
        if missing and strict:
            raise BindError(
                f"{len(missing)} weights are not in the model files: {_shown(missing)}"
                + _prefix_hint(missing_keys, where),
                attrs={"missing": missing},
            )
        if not self._slots:
            raise BindError(
                "no weight of the module was bound to the model files "
                f"({len(missing)} not found, {len(skipped)} left out by key_map); "
                f"the module has {_shown(missing + skipped)}, the files have "
                f"{_shown(list(where))}" + _prefix_hint(missing_keys, where),
                attrs={"missing": missing},
            )
        self._check_filled(by_tensor)
        for slot in self._slots:
            self._place(slot, _meta(slot))
        for sub in self.module.modules():
            slots = self._by_module.get(id(sub))
            if slots:
                self._wrap(sub, slots)

    def _check_filled(self, managed: dict[int, _Slot]) -> None:
        """Refuses a module with a tensor on ``meta`` that no file fills; records the real
        unmanaged ones, which move with the module between devices."""
        unfilled: list[str] = []
        seen: set[int] = set()
        for module_name, sub in self.module.named_modules(remove_duplicate=False):
            for attr, tensor, is_buffer in _tensors_of(sub, persistent_only=False):
                if id(tensor) in managed:
                    continue
                if tensor.device.type != "meta":
                    self._others.append((sub, attr, is_buffer))
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
                f"files, so nothing would fill them: {_shown(unfilled, 12)}. Build the module "
                "under lowtide.torch.init_empty() instead of torch.device('meta'), so that "
                "its own code computes its buffers, or assign real tensors to these before "
                "manage()",
                attrs={"unfilled": unfilled},
            )

    def _wrap(self, sub: nn.Module, slots: list[_Slot]) -> None:
        """Makes ``sub.forward`` bring its weights in first and let go of the streamed ones
        after it, whatever way it ends (``KeyboardInterrupt`` included). Torch's forward
        hooks cannot: an ``always_call`` hook is skipped on ``BaseException``."""
        forward = sub.forward
        tokens = self._tokens

        def managed_forward(*args: Any, **kwargs: Any) -> Any:
            token = next(tokens)
            try:
                self._enter(token, slots)
                return forward(*args, **kwargs)
            finally:
                # One C call, done before any signal handler can run again.
                self._frames.pop(token, None)
                self._settle()

        managed_forward.__wrapped__ = forward  # type: ignore[attr-defined]
        self._wrapped.append((sub, sub.__dict__.get("forward")))
        sub.forward = managed_forward  # type: ignore[method-assign]

    def _place(self, slot: _Slot, tensor: torch.Tensor) -> None:
        value: torch.Tensor = (
            tensor if slot.buffer else nn.Parameter(tensor, requires_grad=slot.requires_grad)
        )
        for owner, attr in slot.owners:
            if slot.buffer:
                owner._buffers[attr] = value
            else:
                owner._parameters[attr] = value  # type: ignore[assignment]

    # --- forwards ---------------------------------------------------------------------------

    def _enter(self, token: int, slots: list[_Slot]) -> None:
        with self._lock:
            self._frames[token] = slots
            self._clock += 1
            for slot in slots:
                slot.last_use = self._clock
            for slot in slots:
                if slot.tensor is None:
                    self._bring(slot)

    def _settle(self) -> None:
        """Lets go of streamed weights that no running forward uses."""
        with self._lock:
            if not self._loose:
                return
            busy = self._busy()
            for slot in [s for s in self._loose if s not in busy]:
                self._drop(slot)

    def _busy(self) -> set[_Slot]:
        # `list()` copies the frames in one C call: other threads add and remove them.
        return {slot for frame in list(self._frames.values()) for slot in frame}

    def _refuse_while_running(self, what: str) -> None:
        if self._frames:
            raise ForwardRunning(what)

    # --- moving weights ---------------------------------------------------------------------

    def _fetch(self, slot: _Slot) -> torch.Tensor:
        host = slot.model.torch(slot.key)
        if self.device.type == "cpu":
            return host  # lowtide's RAM copy itself, pinned while the module holds it
        device = host.to(self.device)
        del host  # the RAM copy is unpinned: clean, lowtide may drop it at once
        return device

    def _bring(self, slot: _Slot, resident: bool = False) -> None:
        """Loads one weight, making room by letting go of idle ones if the store is full."""
        tensor = self._with_room(slot.nbytes, lambda: self._fetch(slot), keep=slot)
        # The module first, then the slot: interrupted between the two, the weight is
        # loaded again by the next forward instead of missing from the module.
        self._place(slot, tensor)
        slot.tensor = tensor
        slot.resident = resident
        if not resident:
            self._loose.add(slot)

    def _with_room(self, nbytes: int, fetch: Callable[[], Any], keep: _Slot | None = None) -> Any:
        """``fetch()``, retried after letting go of idle loaded weights while the store says
        it is over its budget or under its reserve; raises when nothing idle is left."""
        while True:
            try:
                return fetch()
            except (lowtide.OverBudget, lowtide.UnderReserve):
                if not self._make_room(nbytes, keep=keep):
                    raise

    def _make_room(self, nbytes: int, keep: _Slot | None = None) -> bool:
        """Lets go of idle loaded weights, least recently used first, until ``nbytes`` are
        free; returns whether any was let go."""
        busy = self._busy()
        idle = [s for s in self._slots if s.tensor is not None and s not in busy and s is not keep]
        idle.sort(key=lambda s: (s.patched, s.last_use))
        freed = 0
        for slot in idle:
            if freed >= nbytes:
                break
            self._drop(slot)
            freed += slot.nbytes
        if freed:
            self.store.free_memory(max(freed, nbytes))
        return freed > 0

    def _drop(self, slot: _Slot) -> None:
        """Takes a weight off the device. Patched bytes that only the device holds go to
        lowtide first (RAM, or the spill file under pressure)."""
        tensor = slot.tensor
        if tensor is None:
            return
        if slot.device_dirty:
            slot.model.replace(slot.key, tensor)
            slot.device_dirty = False
        slot.tensor = None
        slot.resident = False
        self._loose.discard(slot)
        self._place(slot, _meta(slot))

    # --- the API ----------------------------------------------------------------------------

    @property
    def loaded_bytes(self) -> int:
        """Bytes of weights on the device now."""
        return sum(s.nbytes for s in self._slots if s.tensor is not None)

    @property
    def total_bytes(self) -> int:
        """Bytes of all managed weights."""
        return sum(s.nbytes for s in self._slots)

    @property
    def names(self) -> list[str]:
        """The managed weights' names in the module, in module order."""
        return [s.name for s in self._slots]

    @property
    def in_use(self) -> list[str]:
        """The weights that running forwards use now (empty between forwards)."""
        busy = self._busy()
        return [s.name for s in self._slots if s in busy]

    def load(self, device: str | torch.device = "cpu", budget: int | str | None = None) -> int:
        """Materialises weights on ``device`` in module order, up to ``budget`` bytes (a size
        such as ``"4GiB"``); the rest are loaded by their submodule's forward and let go after
        it. Returns the bytes loaded.

        On the CPU the loaded weights are pinned in the store's ``ram_budget``, and streamed
        ones need room beside them: the largest set of weights one submodule streams. The
        default budget is the most that leaves that room. A ``budget`` that leaves less
        raises :class:`lowtide.ConfigError` (every forward would let the loaded weights go to
        make room and read the whole model again)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        limit = None if budget is None else lowtide.parse_size(budget)
        with self._lock:
            if device != self.device:
                self._refuse_while_running(f"load({str(device)!r})")
                for slot in self._slots:
                    self._drop(slot)
                self._move_others(device)
                self.device = device
            plan = self._plan(limit)
            used = self.loaded_bytes
            for slot in self._slots:
                if slot.tensor is not None:
                    slot.resident = True
                    self._loose.discard(slot)
                    continue
                if slot not in plan:
                    continue
                try:
                    self._bring(slot, resident=True)
                except (lowtide.OverBudget, lowtide.UnderReserve):
                    break  # the rest come in on demand
                used += slot.nbytes
            return used

    def _plan(self, limit: int | None) -> set[_Slot]:
        """The weights to load: in module order, up to ``limit``, leaving the store room for
        the largest submodule's streamed weights (on the CPU)."""

        def pick(cap: int) -> set[_Slot]:
            used = self.loaded_bytes
            chosen = set()
            for slot in self._slots:
                if slot.tensor is None and used + slot.nbytes <= cap:
                    chosen.add(slot)
                    used += slot.nbytes
            return chosen

        def room_needed(chosen: set[_Slot]) -> tuple[int, int]:
            pinned = sum(s.nbytes for s in self._slots if s in chosen or s.tensor is not None)
            streamed = max(
                (
                    sum(s.nbytes for s in set(group) if s.tensor is None and s not in chosen)
                    for group in self._by_module.values()
                ),
                default=0,
            )
            return pinned, streamed

        if self.device.type != "cpu":  # RAM copies are transient: the device bounds it
            return pick(self.total_bytes if limit is None else limit)
        ram = self.store.ram_budget
        if limit is not None:
            chosen = pick(limit)
            pinned, streamed = room_needed(chosen)
            if streamed and pinned + streamed > ram:
                raise lowtide.ConfigError(
                    f"load(budget={limit}) would pin {pinned} bytes of weights, and a forward "
                    f"streams up to {streamed} more for one submodule: the store's ram_budget "
                    f"of {ram} bytes cannot hold both, so every forward would let the loaded "
                    f"weights go and read the model again. Use a budget of at most "
                    f"{max(ram - streamed, 0)} bytes (or none: the most that fits), or a larger "
                    "ram_budget",
                    attrs={"requested": limit, "available": max(ram - streamed, 0)},
                )
            return chosen
        cap = ram
        for _ in range(8):  # streaming more can only raise the room needed: a few rounds
            chosen = pick(cap)
            pinned, streamed = room_needed(chosen)
            if not streamed or pinned + streamed <= ram:
                break
            cap = max(ram - streamed, 0)
        return chosen

    def _move_others(self, device: torch.device) -> None:
        """Moves the module's own (unmanaged) tensors, such as computed buffers, to
        ``device``."""
        for owner, attr, is_buffer in self._others:
            table = owner._buffers if is_buffer else owner._parameters
            tensor = table[attr]
            if tensor is None or tensor.device == device:
                continue
            moved = tensor.to(device)
            if not is_buffer:
                moved = nn.Parameter(moved, requires_grad=tensor.requires_grad)
            table[attr] = moved  # type: ignore[assignment]

    def unload(self, nbytes: int | str | None = None, *, keep_cached: bool = False) -> int:
        """Frees at least ``nbytes`` of loaded weights (default: all), unchanged ones first,
        least recently used first; weights running forwards use stay. Unchanged weights are
        let go with nothing written; patched ones go to lowtide's RAM, and to the spill file
        when the available memory is under the store's reserve. The module stays usable: its
        next forward brings weights back.

        With ``keep_cached`` the store keeps the unchanged weights' RAM copies as a cache
        under its budget (evicted in policy order when other loads need the room, never
        written), so that a reload costs no I/O; by default their RAM is freed at once.
        Returns the bytes taken off the device."""
        want = None if nbytes is None else lowtide.parse_size(nbytes)
        with self._lock:
            busy = self._busy()
            loaded = [s for s in self._slots if s.tensor is not None and s not in busy]
            loaded.sort(key=lambda s: (s.patched, s.last_use))
            freed = 0
            for slot in loaded:
                if want is not None and freed >= want:
                    break
                self._drop(slot)
                freed += slot.nbytes
            if keep_cached:
                pass
            elif want is None and not busy:
                for model in self._models:
                    self.store.release(model)  # clean copies: dropped, nothing written
            elif self.device.type == "cpu" and freed:
                self.store.free_memory(freed)
            self.store.relieve_reserve()  # dirty copies to the spill file if under the reserve
            return freed

    def patch(self, lora: _Lora, strength: float = 1.0, *, prefix: str | None = None) -> LoraReport:
        """Merges a LoRA into the weights on the current device: ``W += up @ down *
        (strength * scaling)`` for every pair whose name matches a managed weight.

        ``lora`` is a safetensors file, a PEFT adapter directory (``adapter_model.
        safetensors`` with its ``adapter_config.json``) or a state dict, in kohya naming
        (``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) or
        diffusers/PEFT naming (``<module>.lora_A.weight``, ``.lora_B.weight``, or
        ``.lora.down/up.weight``), with an optional prefix such as ``unet.`` (or ``prefix``).
        ``scaling`` is the pair's ``alpha / rank``: kohya files carry alpha; for PEFT naming
        it comes from ``adapter_config.json`` beside the file (``lora_alpha``, ``r``,
        ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ``fan_in_fan_out``) and is 1
        without one.

        Every pair is checked (shapes, rank, finite strength and alpha) before any weight
        changes: :class:`LoraError` leaves the module as it was. Merged weights become
        lowtide's dirty tensors: kept in RAM or spilled, never dropped. Stacks with earlier
        patches."""
        strength = _finite(float(strength), "strength")
        with self._lock:
            self._refuse_while_running("patch")
            config = _adapter_config(lora)
            pairs, lora_model = self._lora_pairs(lora, prefix)
            try:
                weights = {_normal(s.name.removesuffix(".weight")): s for s in self._slots}
                report = LoraReport()
                work = []
                for stem, pair in sorted(pairs.items()):
                    slot = weights.get(_normal(stem))
                    if slot is None or slot.buffer:
                        report.unmatched.append(stem)
                        continue
                    scale, transposed = _scaling(pair, config, slot, stem)
                    work.append((slot, pair, strength * scale, transposed))
                if not work:
                    raise LoraError(
                        "no LoRA pair matched a managed weight "
                        f"(LoRA stems: {_shown(report.unmatched, 5)}; "
                        f"weights: {_shown(self.names, 5)})"
                    )
                for slot, pair, scale, transposed in work:
                    self._merge_into(slot, pair, scale, transposed)
                    report.patched.append(slot.name)
            finally:
                if lora_model is not None:
                    lora_model.close()
            return report

    def _merge_into(self, slot: _Slot, pair: _Pair, scale: float, transposed: bool) -> None:
        transient = slot.tensor is None
        if transient:
            self._bring(slot)
        assert slot.tensor is not None
        with torch.no_grad():
            slot.tensor.copy_(_merge(slot.tensor, pair.down(), pair.up(), scale, transposed))
        if self.device.type == "cpu":
            slot.model.mark_dirty(slot.key)  # the RAM copy written in place is the tensor
        else:
            slot.device_dirty = True
        slot.patched = True
        if transient:
            self._drop(slot)

    def unpatch(self) -> int:
        """Returns every patched weight to the file's bytes, with no backup copy: lowtide
        drops the patched copy (RAM or spilled) and reads the weight from the file when it is
        next needed. Resident weights are loaded again at once. Returns the weights
        reverted."""
        with self._lock:
            self._refuse_while_running("unpatch")
            count = 0
            for slot in self._slots:
                if not slot.patched:
                    continue
                resident = slot.resident and slot.tensor is not None
                slot.device_dirty = False  # the device's patched bytes are discarded
                self._drop(slot)
                slot.model.revert(slot.key)
                slot.patched = False
                count += 1
                if resident:
                    self._bring(slot, resident=True)
            return count

    def close(self) -> None:
        """Gives the module its own ``forward`` methods back and takes every weight off the
        device (the module is left with ``meta`` weights)."""
        with self._lock:
            self._refuse_while_running("close")
            for sub, own in self._wrapped:
                if own is None:
                    del sub.forward
                else:
                    sub.forward = own  # type: ignore[method-assign]
            self._wrapped.clear()
            for slot in self._slots:
                slot.device_dirty = False
                self._drop(slot)

    def __repr__(self) -> str:
        return (
            f"ManagedModule({type(self.module).__name__}, {len(self._slots)} weights, "
            f"{self.loaded_bytes} of {self.total_bytes} bytes on {self.device})"
        )

    # --- LoRA files -------------------------------------------------------------------------

    def _lora_pairs(
        self, lora: _Lora, prefix: str | None
    ) -> tuple[dict[str, _Pair], lowtide.Model | None]:
        """LoRA stems (module names, prefix removed) -> their pair, the tensors as callables
        so that a file's tensors are read only when merged."""
        lora_model = None
        if isinstance(lora, Mapping):
            keys = list(lora)

            def shape(key: str) -> tuple[int, ...]:
                return tuple(lora[key].shape)  # type: ignore[index]

            def get(key: str) -> torch.Tensor:
                return lora[key]  # type: ignore[index]
        else:
            path = Path(lora)
            lora_model = self.store.open_model(
                path / "adapter_model.safetensors" if path.is_dir() else path
            )
            keys = lora_model.names()
            model = lora_model

            def shape(key: str) -> tuple[int, ...]:
                return tuple(model.info(key).shape)

            def get(key: str) -> torch.Tensor:
                info = model.info(key)
                # A copy of its own: the LoRA's RAM copy is let go at once.
                return self._with_room(info.nbytes, lambda: model.torch(key).clone())

        try:
            found: dict[str, dict[str, str]] = {}
            for key in keys:
                match = _LORA_KEY.match(key)
                if match is None:
                    continue
                stem = _strip_prefix(match["stem"], prefix)
                found.setdefault(stem, {})[_ROLES[match["role"]]] = key
            pairs: dict[str, _Pair] = {}
            for stem, roles in found.items():
                if "down" not in roles or "up" not in roles:
                    continue
                alpha = None
                if "alpha" in roles:
                    alpha = _finite(float(get(roles["alpha"]).float().item()), "alpha")
                pairs[stem] = _Pair(
                    down_key=roles["down"],
                    down_shape=shape(roles["down"]),
                    up_shape=shape(roles["up"]),
                    alpha=alpha,
                    down=functools.partial(get, roles["down"]),
                    up=functools.partial(get, roles["up"]),
                )
            if not pairs:
                raise LoraError("no LoRA down/up pairs found (kohya or diffusers/PEFT naming)")
        except BaseException:
            if lora_model is not None:
                lora_model.close()
            raise
        return pairs, lora_model


@dataclass
class _Pair:
    """A LoRA's down/up pair for one weight; the tensors are read when called."""

    down_key: str
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]
    alpha: float | None  # kohya's per-pair alpha, when the file has it
    down: Callable[[], torch.Tensor]
    up: Callable[[], torch.Tensor]


@dataclass
class _AdapterConfig:
    """What a PEFT ``adapter_config.json`` says about the scaling of its pairs."""

    path: str
    r: int
    alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    rslora: bool
    fan_in_fan_out: bool


def _adapter_config(lora: _Lora) -> _AdapterConfig | None:
    """The PEFT adapter config beside (or inside) a LoRA path, if there is one."""
    if isinstance(lora, Mapping):
        return None
    path = Path(lora)
    path = path / "adapter_config.json" if path.is_dir() else path.parent / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.get("use_dora"):
            raise LoraError(f"{path}: DoRA adapters (use_dora) cannot be merged by lowtide.torch")
        r = raw.get("r", 8)
        config = _AdapterConfig(
            path=str(path),
            r=r,
            alpha=_finite(float(raw.get("lora_alpha", r)), "lora_alpha"),
            rank_pattern={str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()},
            alpha_pattern={
                str(k): _finite(float(v), "alpha_pattern value")
                for k, v in (raw.get("alpha_pattern") or {}).items()
            },
            rslora=bool(raw.get("use_rslora", False)),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        )
    except LoraError:
        raise
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise LoraError(f"{path}: not a usable PEFT adapter config ({err})") from err
    if not isinstance(config.r, int) or config.r <= 0:
        raise LoraError(f"{path}: r must be a positive integer, not {config.r!r}")
    return config


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's lookup: the first pattern that matches the end of the module's name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _scaling(
    pair: _Pair, config: _AdapterConfig | None, slot: _Slot, stem: str
) -> tuple[float, bool]:
    """A pair's ``alpha / rank`` (PEFT's ``scaling``) and whether its weight is stored
    inputs x outputs; checks that the pair fits the weight."""
    rank = pair.down_shape[0] if pair.down_shape else 0
    if rank == 0:
        raise LoraError(f"{pair.down_key}: a LoRA of rank 0 (shape {list(pair.down_shape)})")
    transposed = False
    if pair.alpha is not None:
        scaling = pair.alpha / rank
    elif config is not None:
        module = slot.name.removesuffix(".weight")
        r = _pattern_value(config.rank_pattern, module, config.r)
        alpha = _pattern_value(config.alpha_pattern, module, config.alpha)
        if r != rank:
            raise LoraError(
                f"{pair.down_key}: {config.path} gives rank {r} for {module}, the file's "
                f"pair has rank {rank}"
            )
        scaling = alpha / math.sqrt(r) if config.rslora else alpha / r
        transposed = config.fan_in_fan_out
    else:
        scaling = 1.0
    out_dim, in_dims = (1, 0) if transposed else (0, 1)
    fits = (
        len(pair.up_shape) >= 2
        and math.prod(pair.up_shape[1:]) == rank
        and len(slot.shape) >= 2
        and pair.up_shape[0] == slot.shape[out_dim]
        and math.prod(pair.down_shape[1:])
        == (slot.shape[0] if transposed else math.prod(slot.shape[in_dims:]))
    )
    if not fits:
        raise LoraError(
            f"{stem}: a LoRA pair with down {list(pair.down_shape)} and up "
            f"{list(pair.up_shape)} does not fit {slot.name} {list(slot.shape)}"
        )
    return scaling, transposed


def _tensors_of(sub: nn.Module, persistent_only: bool) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """``(attribute, tensor, is_buffer)`` of a module's own parameters and buffers."""
    for attr, param in sub._parameters.items():
        if param is not None:
            yield attr, param, False
    for attr, buf in sub._buffers.items():
        if buf is not None and not (persistent_only and attr in sub._non_persistent_buffers_set):
            yield attr, buf, True


def _meta(slot: _Slot) -> torch.Tensor:
    return torch.empty(slot.shape, dtype=slot.dtype, device="meta")


def _shown(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _prefix_hint(missing: list[str], keys: Mapping[str, Any]) -> str:
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


def _is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # a directory of shards, an index
        return False


_LORA_KEY = re.compile(
    r"^(?P<stem>.+?)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha|lora_A\.weight|"
    r"lora_B\.weight|lora\.down\.weight|lora\.up\.weight)$"
)
_ROLES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "alpha": "alpha",
}
_PREFIXES = (
    "lora_unet_",
    "lora_te1_",
    "lora_te2_",
    "lora_te_",
    "lora_transformer_",
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    "unet.",
    "transformer.",
    "text_encoder.",
)


def _strip_prefix(stem: str, prefix: str | None) -> str:
    if prefix is not None:
        return stem.removeprefix(prefix)
    for known in _PREFIXES:
        if stem.startswith(known):
            return stem[len(known) :]
    return stem


def _normal(name: str) -> str:
    """Kohya names replace the dots of module paths with underscores: compare that way."""
    return name.replace(".", "_")


def _torch_dtype(name: str, key: str) -> torch.dtype:
    attr = _TORCH.get(name)
    if attr is None or not hasattr(torch, attr):
        raise BindError(f"{key}: dtype {name} has no torch equivalent", attrs={"key": key})
    return getattr(torch, attr)


def _as_list(files: _Files) -> list[str | os.PathLike[str] | lowtide.Model]:
    if isinstance(files, (str, os.PathLike, lowtide.Model)):
        return [files]
    return list(files)


def _open_all(
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

"""A module whose weights a lowtide store holds: forwards that bring weights in and let them
go, loads to a budget, unloads that write nothing for unchanged weights, LoRA patches."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

import lowtide
from lowtide._frameworks import to_torch
from lowtide.torch._binding import Files, Slot, as_list, bind, meta_of, open_all, place, shown
from lowtide.torch._errors import BindError, ForwardRunning, LoraError
from lowtide.torch._lora import (
    Lora,
    LoraReport,
    Pair,
    adapter_config,
    finite,
    lora_pairs,
    merge,
    normal,
    scaling,
)


def manage(
    module: nn.Module,
    store: lowtide.Store,
    files: Files,
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


class ManagedModule:
    """A module whose weights lowtide holds; see the module docstring. Made by
    :func:`manage`."""

    def __init__(
        self,
        module: nn.Module,
        store: lowtide.Store,
        files: Files,
        *,
        key_map: Callable[[str], str | None] | None = None,
        strict: bool = True,
    ) -> None:
        self.module = module
        """The managed module."""
        self.store = store
        """The store holding its weights."""
        self.device = torch.device("cpu")
        self._wrapped: list[tuple[nn.Module, Any]] = []  # (module, its own `forward` or None)
        self._lock = threading.RLock()
        self._frames: dict[int, list[Slot]] = {}  # running forwards -> the weights they use
        self._tokens = itertools.count()
        self._loose: set[Slot] = set()  # loaded for a forward, let go after it
        self._clock = 0
        _LIVE.add(self)
        files = as_list(files)  # once: an iterator is read once
        given = [f for f in files if isinstance(f, lowtide.Model)]
        self._models = open_all(store, files)
        try:
            binding = bind(module, self._models, key_map, strict)
        except BaseException:
            for model in self._models:
                if not any(model is g for g in given):
                    model.close()  # opened here: its file is closed again
            raise
        self._slots = binding.slots
        self._by_module = binding.by_module
        self._others = binding.others  # the module's own tensors, moved with it
        self._by_name = {slot.name: slot for slot in self._slots}
        self._always: set[Slot] = set()  # read outside their module's forward: see keep_loaded
        for slot in self._slots:
            place(slot, meta_of(slot))
        for sub in module.modules():
            slots = self._by_module.get(id(sub))
            if slots:
                self._wrap(sub, slots)

    def _wrap(self, sub: nn.Module, slots: list[Slot]) -> None:
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

    # --- forwards ---------------------------------------------------------------------------

    def _enter(self, token: int, slots: list[Slot]) -> None:
        with self._lock:
            self._frames[token] = slots
            self._clock += 1
            for slot in slots:
                slot.last_use = self._clock
            missing = [slot for slot in slots if slot.tensor is None]
            if len(missing) > 1:
                self._bring_streamed(missing, resident=False)
            for slot in missing:
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

    def _busy(self) -> set[Slot]:
        # `list()` copies the frames in one C call: other threads add and remove them.
        return {slot for frame in list(self._frames.values()) for slot in frame}

    def _refuse_while_running(self, what: str) -> None:
        if self._frames:
            raise ForwardRunning(what)

    # --- moving weights ---------------------------------------------------------------------

    def _fetch(self, slot: Slot) -> torch.Tensor:
        return self._on_device(slot.model.torch(slot.stored))

    def _on_device(self, host: torch.Tensor) -> torch.Tensor:
        """``host``, a tensor over lowtide's RAM copy, as the module uses it: on the CPU the
        RAM copy itself, pinned while the module holds it; elsewhere a copy on the device,
        after which ``host`` goes and the RAM copy is unpinned (clean: lowtide may drop it at
        once)."""
        if self.device.type == "cpu":
            return host
        return host.to(self.device)

    def _install(self, slot: Slot, tensor: torch.Tensor, resident: bool) -> None:
        # The module first, then the slot: interrupted between the two, the weight is
        # loaded again by the next forward instead of missing from the module.
        place(slot, tensor)
        slot.tensor = tensor
        slot.resident = resident
        if not resident:
            self._loose.add(slot)

    def _bring_streamed(self, slots: list[Slot], resident: bool = True) -> int:
        """Loads ``slots`` (``resident``, or let go after the forward) in batches read as
        one stream each (:meth:`lowtide.Model.leases`: the next weights' reads in flight
        while one completes), each batch of one model file and at most a quarter of the
        store's ``ram_budget`` when the weights go on to another device. Stops at the first
        batch the store has no room for (the caller loads the rest one by one, making room).
        Returns the bytes loaded."""
        cap = self.store.ram_budget if self.device.type == "cpu" else self.store.ram_budget // 4
        batches: list[list[Slot]] = []
        for slot in slots:
            last = batches[-1] if batches else None
            if (
                last is None
                or last[0].model is not slot.model
                or sum(s.nbytes for s in last) + slot.nbytes > cap
            ):
                batches.append([slot])
            else:
                last.append(slot)
        loaded = 0
        for batch in batches:
            try:
                leases = batch[0].model.leases([slot.stored for slot in batch])
            except (lowtide.OverBudget, lowtide.UnderReserve):
                break
            for slot, lease in zip(batch, leases, strict=True):
                self._install(slot, self._on_device(to_torch(lease)), resident)
                loaded += slot.nbytes
            del leases  # on another device: the RAM copies are unpinned
        return loaded

    def _bring(self, slot: Slot, resident: bool = False) -> None:
        """Loads one weight, making room by letting go of idle ones if the store is full."""
        tensor = self._with_room(slot.nbytes, lambda: self._fetch(slot), keep=slot)
        self._install(slot, tensor, resident)

    def _with_room(self, nbytes: int, fetch: Callable[[], Any], keep: Slot | None = None) -> Any:
        """``fetch()``, retried after letting go of idle loaded weights while the store says
        it is over its budget or under its reserve; raises when nothing idle is left."""
        while True:
            try:
                return fetch()
            except (lowtide.OverBudget, lowtide.UnderReserve):
                if not self._make_room(nbytes, keep=keep):
                    raise

    def _make_room(self, nbytes: int, keep: Slot | None = None) -> bool:
        """Lets go of idle loaded weights, least recently used first, until ``nbytes`` are
        free; returns whether any was let go."""
        busy = self._busy()
        idle = [
            s
            for s in self._slots
            if s.tensor is not None and s not in busy and s is not keep and s not in self._always
        ]
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

    def _drop(self, slot: Slot) -> None:
        """Takes a weight off the device. Patched bytes that only the device holds go to
        lowtide first (RAM, or the spill file under pressure)."""
        tensor = slot.tensor
        if tensor is None:
            return
        if slot.device_dirty:
            slot.model.replace(slot.stored, tensor)
            slot.device_dirty = False
        slot.tensor = None
        slot.resident = False
        self._loose.discard(slot)
        place(slot, meta_of(slot))

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
    def patched(self) -> list[str]:
        """The weights whose values differ from the file's now (a LoRA merged, or set)."""
        return [s.name for s in self._slots if s.patched]

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
            todo = [slot for slot in self._slots if slot.tensor is None and slot in plan]
            used += self._bring_streamed(todo, resident=True)
            for slot in todo:
                if slot.tensor is not None:
                    continue
                try:
                    self._bring(slot, resident=True)
                except (lowtide.OverBudget, lowtide.UnderReserve):
                    break  # the rest come in on demand
                used += slot.nbytes
            return used

    def _plan(self, limit: int | None) -> set[Slot]:
        """The weights to load: in module order, up to ``limit``, leaving the store room for
        the largest submodule's streamed weights (on the CPU)."""

        def pick(cap: int) -> set[Slot]:
            chosen = {s for s in self._always if s.tensor is None}  # whatever the budget
            used = self.loaded_bytes + sum(s.nbytes for s in chosen)
            for slot in self._slots:
                if slot.tensor is None and slot not in chosen and used + slot.nbytes <= cap:
                    chosen.add(slot)
                    used += slot.nbytes
            return chosen

        def room_needed(chosen: set[Slot]) -> tuple[int, int]:
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

    def patch(self, lora: Lora, strength: float = 1.0, *, prefix: str | None = None) -> LoraReport:
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
        strength = finite(float(strength), "strength")
        with self._lock:
            self._refuse_while_running("patch")
            config = adapter_config(lora)
            pairs, lora_model = lora_pairs(lora, prefix, self.store, self._with_room)
            try:
                weights = {normal(s.name.removesuffix(".weight")): s for s in self._slots}
                report = LoraReport()
                work = []
                for stem, pair in sorted(pairs.items()):
                    slot = weights.get(normal(stem))
                    if slot is None or slot.buffer:
                        report.unmatched.append(stem)
                        continue
                    scale, transposed = scaling(pair, config, slot, stem)
                    work.append((slot, pair, strength * scale, transposed))
                if not work:
                    raise LoraError(
                        "no LoRA pair matched a managed weight "
                        f"(LoRA stems: {shown(report.unmatched, 5)}; "
                        f"weights: {shown(self.names, 5)})"
                    )
                for slot, pair, scale, transposed in work:
                    self._merge_into(slot, pair, scale, transposed)
                    report.patched.append(slot.name)
            finally:
                if lora_model is not None:
                    lora_model.close()
            return report

    def _merge_into(self, slot: Slot, pair: Pair, scale: float, transposed: bool) -> None:
        transient = slot.tensor is None
        if transient:
            self._bring(slot)
        assert slot.tensor is not None
        with torch.no_grad():
            slot.tensor.copy_(merge(slot.tensor, pair.down(), pair.up(), scale, transposed))
        if self.device.type == "cpu":
            slot.model.mark_dirty(slot.stored)  # the RAM copy written in place is the tensor
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
                self._revert(slot)
                count += 1
                if resident:
                    self._bring(slot, resident=True)
            return count

    def _revert(self, slot: Slot) -> None:
        """The file's weight again: a value set in another dtype is discarded, a weight
        patched in place reverted; nothing is written either way."""
        if slot.patch_key is not None:
            slot.model.discard(slot.patch_key)
            slot.patch_key = None
            slot.dtype, slot.nbytes = slot.file_dtype, slot.file_nbytes
        elif slot.patched:
            slot.model.revert(slot.key)
        slot.patched = False

    def keep_loaded(self, names: Iterable[str]) -> None:
        """Declares weights that code reads outside their own module's forward (a position
        embedding read by its parent's ``forward``): a forward only brings in the weights of
        the module it belongs to, so these are loaded by every :meth:`load` first, whatever
        its budget, and never let go to make room for streamed ones. :meth:`unload` still
        lets them go; the next :meth:`load` brings them back."""
        with self._lock:
            self._always |= {self._slot(name) for name in names}

    def revert(self, name: str) -> None:
        """Returns one weight (its name in the module) to the file's bytes, as
        :meth:`unpatch` does for all; nothing is written."""
        with self._lock:
            self._refuse_while_running("revert")
            slot = self._slot(name)
            if not slot.patched:
                return
            resident = slot.resident and slot.tensor is not None
            slot.device_dirty = False
            self._drop(slot)
            self._revert(slot)
            if resident:
                self._bring(slot, resident=True)

    def set_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Makes ``tensor`` the weight ``name`` (its name in the module) until
        :meth:`unpatch`: a patch computed outside (ComfyUI's LoRA math), of the weight's
        shape and in any dtype the module computes with. lowtide holds one copy of it as a
        patched tensor (in RAM while the budget allows, spilled when it does not, never
        dropped); no copy of the file's weight is kept: :meth:`unpatch` reads it again."""
        with self._lock:
            self._refuse_while_running("set_weight")
            slot = self._slot(name)
            if tuple(tensor.shape) != slot.shape:
                raise BindError(
                    f"{name}: a weight of shape {list(tensor.shape)} set for one of shape "
                    f"{list(slot.shape)}",
                    attrs={"name": name},
                )
            data = tensor.detach().to("cpu").contiguous()
            resident = slot.resident and slot.tensor is not None
            self._drop(slot)
            self._revert(slot)
            stored = f"{slot.key}#patched"
            self._with_room(data.nbytes, lambda: slot.model.derive(stored, data), keep=slot)
            slot.patch_key, slot.patched = stored, True
            slot.dtype, slot.nbytes = data.dtype, data.nbytes
            if resident:
                self._bring(slot, resident=True)

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[torch.Tensor]:
        """The weight ``name`` (its name in the module) as the module computes with it,
        brought in if it is not loaded and kept while the block runs, as a forward keeps its
        weights. Read it; do not keep it past the block."""
        slot = self._slot(name)
        token = next(self._tokens)
        try:
            self._enter(token, [slot])
            assert slot.tensor is not None
            yield slot.tensor
        finally:
            self._frames.pop(token, None)
            self._settle()

    def _slot(self, name: str) -> Slot:
        slot = self._by_name.get(name)
        if slot is None:
            raise BindError(f"{name} is not a managed weight of this module", attrs={"name": name})
        return slot

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


_LIVE: weakref.WeakSet[ManagedModule] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child has only the thread that forked: forwards other threads were running
    do not exist there, and a lock they held would never be released."""
    for managed in list(_LIVE):
        managed._lock = threading.RLock()
        managed._frames.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)

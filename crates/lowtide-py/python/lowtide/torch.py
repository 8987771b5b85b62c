"""``lowtide.torch``: the weights of a ``torch.nn.Module`` managed by a lowtide :class:`Store`.

:func:`manage` binds every parameter and persistent buffer of a module to a tensor of its
model files by name, without reading anything, and leaves them on the ``meta`` device. Then:

- :meth:`ManagedModule.load` materialises weights on a device up to a byte budget; the rest
  come in when a submodule's forward needs them (forward pre-hooks) and leave after it, so a
  model larger than the budget still runs;
- :meth:`ManagedModule.unload` frees them again: an unchanged weight is let go with nothing
  written (lowtide reads it again from the file), a patched one stays in lowtide's RAM while the
  budget and the reserve allow and goes to the spill file when they do not;
- :meth:`ManagedModule.patch` merges a LoRA into the weights; the merged weights become
  lowtide's dirty tensors. :meth:`ManagedModule.unpatch` returns to the file's weights without
  any backup copy.

On the CPU a loaded weight *is* lowtide's RAM copy, used by torch in place through DLPack (no
second copy): it stays pinned while the module holds it. On CUDA a weight is uploaded from
lowtide's RAM copy (read with ``O_DIRECT`` when cold), which is then evictable at once::

    import lowtide, lowtide.torch

    store = lowtide.Store(ram_budget="12GiB", reserve_ram="2GiB")
    with torch.device("meta"):
        unet = UNet(config)
    managed = lowtide.torch.manage(unet, store, "unet.safetensors")
    managed.load("cpu", budget="6GiB")     # what does not fit streams in per submodule
    managed.patch("style.safetensors", 0.8)
    image = unet(latents, t, text)         # an ordinary forward
    managed.unload()                       # unchanged weights: nothing written
    managed.unpatch()                      # the file's weights again, no backup kept

Parameters read by a module other than the one that owns them (a tied embedding read through
another module's ``forward``) must be loaded with :meth:`ManagedModule.load`; hooks only bring
in weights of the module whose ``forward`` runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import lowtide
from lowtide._frameworks import _TORCH

__all__ = ["LoraReport", "ManagedModule", "manage", "merge_lora"]

_Files = str | os.PathLike[str] | lowtide.Model | Iterable[str | os.PathLike[str] | lowtide.Model]


@dataclass(eq=False)
class _Slot:
    """One managed weight: where it lives in the module and in the store."""

    name: str  # its name in the module (`blocks.0.attn.to_q.weight`)
    key: str  # its name in the model file
    model: lowtide.Model
    owners: list[tuple[nn.Module, str]]
    buffer: bool
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    tensor: torch.Tensor | None = None  # on the device while loaded
    resident: bool = False  # loaded by `load`, kept across forwards
    in_use: int = 0  # forwards of its module running now
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
    the file's shape and dtype; otherwise unmatched ones are left as they are.
    """
    return ManagedModule(module, store, files, key_map=key_map, strict=strict)


def merge_lora(
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    alpha: float | None,
    strength: float,
) -> torch.Tensor:
    """``weight + strength * alpha / rank * up @ down``, computed in float32 on ``weight``'s
    device and returned in ``weight``'s dtype (a new tensor). Conv weights are handled by
    flattening; ``alpha`` defaults to the rank."""
    rank = down.shape[0]
    scale = strength * (rank if alpha is None else float(alpha)) / rank
    device = weight.device
    delta = up.to(device, torch.float32).flatten(1) @ down.to(device, torch.float32).flatten(1)
    merged = weight.to(torch.float32) + delta.reshape(weight.shape) * scale
    return merged.to(weight.dtype)


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
        self._models = _open_all(store, files)
        self._slots: list[_Slot] = []
        self._by_module: dict[int, list[_Slot]] = {}
        self._hooks: list[Any] = []
        self._clock = 0
        self._bind(key_map, strict)

    # --- binding ----------------------------------------------------------------------------

    def _bind(self, key_map: Callable[[str], str | None] | None, strict: bool) -> None:
        where: dict[str, lowtide.Model] = {}
        for model in self._models:
            for key in model.names():
                where.setdefault(key, model)
        by_tensor: dict[int, _Slot] = {}
        missing: list[str] = []
        for module_name, sub in self.module.named_modules(remove_duplicate=False):
            entries = [(attr, p, False) for attr, p in sub._parameters.items()]
            entries += [
                (attr, b, True)
                for attr, b in sub._buffers.items()
                if attr not in sub._non_persistent_buffers_set
            ]
            for attr, tensor, is_buffer in entries:
                if tensor is None:
                    continue
                name = f"{module_name}.{attr}" if module_name else attr
                slot = by_tensor.get(id(tensor))
                if slot is not None:  # tied: one weight, several owners
                    if (sub, attr) not in slot.owners:
                        slot.owners.append((sub, attr))
                        self._by_module.setdefault(id(sub), []).append(slot)
                    continue
                mapped = key_map(name) if key_map is not None else name
                if mapped is None:
                    continue
                key = mapped
                found = where.get(key)
                if found is None:
                    missing.append(name if key == name else f"{name} (key {key})")
                    continue
                info = found.info(key)
                dtype = _torch_dtype(info.dtype)
                shape = tuple(tensor.shape)
                if info.shape != shape or dtype != tensor.dtype:
                    raise ValueError(
                        f"{name}: the module has {tensor.dtype} {list(shape)}, "
                        f"{found.path} has `{key}` as {info.dtype} {list(info.shape)}"
                    )
                slot = _Slot(
                    name=name,
                    key=key,
                    model=found,
                    owners=[(sub, attr)],
                    buffer=is_buffer,
                    shape=shape,
                    dtype=dtype,
                    nbytes=info.nbytes,
                )
                by_tensor[id(tensor)] = slot
                self._slots.append(slot)
                self._by_module.setdefault(id(sub), []).append(slot)
        if missing and strict:
            shown = ", ".join(missing[:8]) + (
                f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            )
            raise KeyError(f"{len(missing)} weights are not in the model files: {shown}")
        for slot in self._slots:
            self._place(slot, torch.empty(slot.shape, dtype=slot.dtype, device="meta"))
        for sub in self.module.modules():
            if id(sub) in self._by_module:
                self._hooks.append(sub.register_forward_pre_hook(self._before))
                # Called also when the forward raises, so that its weights are not held as
                # in use for good.
                self._hooks.append(sub.register_forward_hook(self._after, always_call=True))

    def _place(self, slot: _Slot, tensor: torch.Tensor) -> None:
        value: torch.Tensor = tensor if slot.buffer else nn.Parameter(tensor, requires_grad=False)
        for owner, attr in slot.owners:
            if slot.buffer:
                owner._buffers[attr] = value
            else:
                owner._parameters[attr] = value  # type: ignore[assignment]

    # --- hooks ------------------------------------------------------------------------------

    def _before(self, sub: nn.Module, _args: Any) -> None:
        self._clock += 1
        slots = self._by_module[id(sub)]
        for slot in slots:
            slot.in_use += 1
            slot.last_use = self._clock
        try:
            for slot in slots:
                if slot.tensor is None:
                    self._bring(slot)
        except BaseException:
            for slot in slots:
                slot.in_use -= 1
            raise

    def _after(self, sub: nn.Module, _args: Any, _out: Any) -> None:
        for slot in self._by_module[id(sub)]:
            slot.in_use -= 1
            if slot.in_use == 0 and not slot.resident and slot.tensor is not None:
                self._drop(slot)

    # --- moving weights ---------------------------------------------------------------------

    def _fetch(self, slot: _Slot) -> torch.Tensor:
        host = slot.model.torch(slot.key)
        if self.device.type == "cpu":
            return host  # lowtide's RAM copy itself, pinned while the module holds it
        device = host.to(self.device)
        del host  # the RAM copy is unpinned: clean, lowtide may drop it at once
        return device

    def _bring(self, slot: _Slot) -> None:
        """Loads one weight, making room by letting go of idle ones if the store is full."""
        tensor = self._with_room(slot.nbytes, lambda: self._fetch(slot), keep=slot)
        slot.tensor = tensor
        self._place(slot, tensor)

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
        idle = [s for s in self._slots if s.tensor is not None and s.in_use == 0 and s is not keep]
        idle.sort(key=lambda s: (s.patched, s.last_use))
        freed = 0
        for slot in idle:
            if freed >= nbytes:
                break
            slot.resident = False
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
        self._place(slot, torch.empty(slot.shape, dtype=slot.dtype, device="meta"))

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

    def load(self, device: str | torch.device = "cpu", budget: int | str | None = None) -> int:
        """Materialises weights on ``device`` in module order, up to ``budget`` bytes (a size
        such as ``"4GiB"``; default: as many as the store has room for). Weights left out are
        loaded by their submodule's forward and let go after it. Returns the bytes loaded."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device != self.device:
            for slot in self._slots:
                slot.resident = False
                self._drop(slot)
            self.device = device
        limit = None if budget is None else lowtide.parse_size(budget)
        used = self.loaded_bytes
        for slot in self._slots:
            if slot.tensor is not None:
                slot.resident = True
                continue
            if limit is not None and used + slot.nbytes > limit:
                continue
            try:
                slot.tensor = self._fetch(slot)
            except (lowtide.OverBudget, lowtide.UnderReserve):
                break  # the rest come in on demand
            self._place(slot, slot.tensor)
            slot.resident = True
            used += slot.nbytes
        return used

    def unload(self, nbytes: int | str | None = None, *, keep_cached: bool = False) -> int:
        """Frees at least ``nbytes`` of loaded weights (default: all), unchanged ones first,
        least recently used first. Unchanged weights are let go with nothing written; patched
        ones go to lowtide's RAM, and to the spill file when the available memory is under the
        store's reserve. The module stays usable: its next forward brings weights back.

        With ``keep_cached`` the store keeps the unchanged weights' RAM copies as a cache
        under its budget (evicted in policy order when other loads need the room, never
        written), so that a reload costs no I/O; by default their RAM is freed at once.
        Returns the bytes taken off the device."""
        want = None if nbytes is None else lowtide.parse_size(nbytes)
        loaded = [s for s in self._slots if s.tensor is not None and s.in_use == 0]
        loaded.sort(key=lambda s: (s.patched, s.last_use))
        freed = 0
        for slot in loaded:
            if want is not None and freed >= want:
                break
            slot.resident = False
            self._drop(slot)
            freed += slot.nbytes
        if keep_cached:
            pass
        elif want is None:
            for model in self._models:
                self.store.release(model)  # clean copies: dropped, nothing written
        elif self.device.type == "cpu" and freed:
            self.store.free_memory(freed)
        self.store.relieve_reserve()  # dirty copies to the spill file if under the reserve
        return freed

    def patch(
        self,
        lora: str | os.PathLike[str] | Mapping[str, torch.Tensor],
        strength: float = 1.0,
        *,
        prefix: str | None = None,
    ) -> LoraReport:
        """Merges a LoRA into the weights on the current device: ``W += strength * alpha /
        rank * up @ down`` for every pair whose name matches a managed weight. ``lora`` is a
        safetensors file or a state dict, in kohya naming (``lora_unet_<module>.lora_down.
        weight``, ``.lora_up.weight``, ``.alpha``) or diffusers/PEFT naming
        (``<module>.lora_A.weight``, ``.lora_B.weight``, or ``.lora.down/up.weight``), with an
        optional prefix such as ``unet.`` (or ``prefix``). Merged weights become lowtide's
        dirty tensors: kept in RAM or spilled, never dropped. Stacks with earlier patches."""
        pairs, lora_model = self._lora_pairs(lora, prefix)
        weights = {_normal(s.name.removesuffix(".weight")): s for s in self._slots}
        report = LoraReport()
        try:
            for stem, (down, up, alpha) in sorted(pairs.items()):
                slot = weights.get(stem)
                if slot is None or slot.buffer:
                    report.unmatched.append(stem)
                    continue
                self._merge(slot, down(), up(), alpha, strength)
                report.patched.append(slot.name)
        finally:
            if lora_model is not None:
                self.store.release(lora_model)
        if not report.patched:
            shown = ", ".join(report.unmatched[:5])
            raise ValueError(f"no LoRA pair matched a managed weight (LoRA stems: {shown})")
        return report

    def _merge(
        self,
        slot: _Slot,
        down: torch.Tensor,
        up: torch.Tensor,
        alpha: float | None,
        strength: float,
    ) -> None:
        transient = slot.tensor is None
        slot.in_use += 1
        try:
            if transient:
                self._bring(slot)
            assert slot.tensor is not None
            merged = merge_lora(slot.tensor, down, up, alpha, strength)
            slot.tensor.copy_(merged)
            if self.device.type == "cpu":
                slot.model.mark_dirty(slot.key)  # the RAM copy written in place is the tensor
            else:
                slot.device_dirty = True
            slot.patched = True
        finally:
            slot.in_use -= 1
        if transient:
            self._drop(slot)

    def unpatch(self) -> int:
        """Returns every patched weight to the file's bytes, with no backup copy: lowtide
        drops the patched copy (RAM or spilled) and reads the weight from the file when it is
        next needed. Resident weights are loaded again at once. Returns the weights
        reverted."""
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
                slot.tensor = self._fetch(slot)
                self._place(slot, slot.tensor)
        return count

    def close(self) -> None:
        """Removes the hooks and takes every weight off the device (the module is left with
        ``meta`` weights)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for slot in self._slots:
            slot.resident = False
            slot.device_dirty = False
            self._drop(slot)

    def __repr__(self) -> str:
        return (
            f"ManagedModule({type(self.module).__name__}, {len(self._slots)} weights, "
            f"{self.loaded_bytes} of {self.total_bytes} bytes on {self.device})"
        )

    # --- LoRA files -------------------------------------------------------------------------

    def _lora_pairs(
        self, lora: str | os.PathLike[str] | Mapping[str, torch.Tensor], prefix: str | None
    ) -> tuple[dict[str, tuple[Any, Any, float | None]], lowtide.Model | None]:
        """LoRA stems (normalised module names) -> (down, up, alpha), the tensors as
        callables so that a file's tensors are read only when merged."""
        lora_model = None
        if isinstance(lora, Mapping):
            keys = list(lora)

            def get(key: str) -> torch.Tensor:
                return lora[key]  # type: ignore[index]
        else:
            lora_model = self.store.open_model(lora)
            keys = lora_model.names()
            model = lora_model

            def get(key: str) -> torch.Tensor:
                info = model.info(key)
                # A copy of its own: the LoRA's RAM copy is let go at once.
                return self._with_room(info.nbytes, lambda: model.torch(key).clone())

        found: dict[str, dict[str, str]] = {}
        for key in keys:
            match = _LORA_KEY.match(key)
            if match is None:
                continue
            stem = _strip_prefix(match["stem"], prefix)
            role = _ROLES[match["role"]]
            found.setdefault(_normal(stem), {})[role] = key
        pairs: dict[str, tuple[Any, Any, float | None]] = {}
        for stem, roles in found.items():
            if "down" not in roles or "up" not in roles:
                continue
            alpha = float(get(roles["alpha"]).float().item()) if "alpha" in roles else None
            pairs[stem] = (
                lambda k=roles["down"]: get(k),
                lambda k=roles["up"]: get(k),
                alpha,
            )
        if not pairs:
            if lora_model is not None:
                self.store.release(lora_model)
            raise ValueError("no LoRA down/up pairs found (kohya or diffusers/PEFT naming)")
        return pairs, lora_model


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


def _torch_dtype(name: str) -> torch.dtype:
    attr = _TORCH.get(name)
    if attr is None or not hasattr(torch, attr):
        raise ValueError(f"dtype {name} has no torch equivalent")
    return getattr(torch, attr)


def _open_all(store: lowtide.Store, files: _Files) -> list[lowtide.Model]:
    if isinstance(files, (str, os.PathLike, lowtide.Model)):
        files = [files]
    return [f if isinstance(f, lowtide.Model) else store.open_model(f) for f in files]

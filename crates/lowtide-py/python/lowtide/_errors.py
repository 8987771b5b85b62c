"""Exceptions raised by lowtide, one class per Rust error variant, grouped by the Rust areas.

Every exception keeps the Rust message (with its causes) as ``str(err)``, says whether the same
call may succeed later (``retryable``, the Rust ``is_retryable()``) and carries the variant's
fields as attributes (``name``, ``requested``, ``available``, ``path``...).
"""

from __future__ import annotations

import builtins
from typing import Any


class LowtideError(Exception):
    """Base class of every lowtide error."""

    retryable: bool
    """Whether the same call may succeed later with nothing changed by the caller."""

    def __init__(
        self, message: str, retryable: bool = False, attrs: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        for key, value in (attrs or {}).items():
            setattr(self, key, value)


class ConfigError(LowtideError, ValueError):
    """An impossible or contradictory store setting."""


# Handles: a name or handle that leads nowhere.
class HandleError(LowtideError, LookupError):
    """A handle or name that does not lead to a tensor, model or device of this store."""


class NoSuchTensor(HandleError, KeyError):
    """A model has no tensor of that name (``model``, ``name``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownHandle(HandleError):
    """A model, tensor or device that is not (or no longer) in this store."""


# Updates: a change of a tensor refused; the tensor is unchanged.
class UpdateError(LowtideError):
    """A change of a tensor refused; the tensor is unchanged."""


class DuplicateName(UpdateError, ValueError):
    """A derived tensor would shadow an existing name (``model``, ``name``)."""


class ByteLength(UpdateError, ValueError):
    """Bytes that do not match the dtype and shape (``expected``, ``actual`` bytes)."""


class BadShape(UpdateError, ValueError):
    """A shape whose byte size overflows or is not a whole number of bytes."""


class Pinned(UpdateError):
    """The tensor is pinned by leases, arrays or tensors that are still alive (``pins``)."""


class NotFromFile(UpdateError, ValueError):
    """Only tensors opened from a file can be reverted to it."""


class NotInRam(UpdateError):
    """``mark_dirty`` of a tensor without a RAM copy: there are no writes to keep."""


class SpillFailed(UpdateError, OSError):
    """A dirty tensor could not be written to the spill file; it keeps its RAM copy."""


# Memory: no room for a copy; nothing was allocated.
class StoreMemoryError(LowtideError, builtins.MemoryError):
    """Not enough memory for a copy (budget, reserve, device, allocator)."""


class OverBudget(StoreMemoryError):
    """Another RAM copy would exceed the budget (``requested``, ``available``, ``budget``)."""


class UnderReserve(StoreMemoryError):
    """A new RAM copy would take available memory under the reserve (``reserve``)."""


class DeviceFull(StoreMemoryError):
    """The device cannot hold the tensor even after unloading what it can."""


class AllocFailed(StoreMemoryError):
    """The allocator refused a RAM copy (``requested`` bytes)."""


# Restores: a tensor's bytes could not be brought back; the tensor is where it was.
class RestoreError(LowtideError):
    """A tensor's bytes could not be brought back into RAM or onto a device."""


class SpillReadFailed(RestoreError, OSError):
    """Reading a spilled tensor failed; a retry may succeed."""


class Lost(RestoreError):
    """A spilled tensor's bytes are corrupt and it has no recipe: they are gone."""


class NoCopy(RestoreError):
    """No copy of the tensor can serve the request (``tier``)."""


class RecipeMismatch(RestoreError, ValueError):
    """A recipe produced the wrong number of bytes."""


# Sources: model files.
class SourceError(LowtideError):
    """A model file could not be opened, validated or read."""


class SourceIoError(SourceError, OSError):
    """The file could not be opened, read or mapped (``path``, ``op``)."""


class MalformedModel(SourceError, ValueError):
    """The file is not a valid safetensors file, or a sharded model is inconsistent."""


class SourceChanged(SourceError):
    """The file changed (truncated, rewritten) since it was opened (``path``, ``change``)."""


__all__ = [
    "AllocFailed",
    "BadShape",
    "ByteLength",
    "ConfigError",
    "DeviceFull",
    "DuplicateName",
    "HandleError",
    "Lost",
    "LowtideError",
    "MalformedModel",
    "NoCopy",
    "NoSuchTensor",
    "NotFromFile",
    "NotInRam",
    "OverBudget",
    "Pinned",
    "RecipeMismatch",
    "RestoreError",
    "SourceChanged",
    "SourceError",
    "SourceIoError",
    "SpillFailed",
    "SpillReadFailed",
    "StoreMemoryError",
    "UnderReserve",
    "UnknownHandle",
    "UpdateError",
]

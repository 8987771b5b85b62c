"""Exceptions raised by lowtide, one class per Rust error variant, grouped by the Rust areas.

Every exception keeps the Rust message (with its causes) as ``str(err)``, says whether the same
call may succeed later (``retryable``, the Rust ``is_retryable()``) and carries the variant's
fields as attributes (``name``, ``requested``, ``available``, ``path``...).

The classes that are also ``OSError`` (:class:`SourceIoError`, :class:`SpillFailed`,
:class:`SpillReadFailed`) set ``errno``, ``strerror`` and ``filename`` as ``OSError`` does, and
an instance is also of the builtin subclass for its ``errno``: a missing model file raises a
:class:`SourceIoError` that ``except FileNotFoundError`` catches, a denied one a
``PermissionError``.
"""

from __future__ import annotations

import builtins
import os
from typing import Any

# (lowtide class, builtin OSError subclass) -> the class deriving from both.
_WITH_BUILTIN: dict[tuple[type, type], type] = {}


def _exception(name: str, message: str, retryable: bool, attrs: dict[str, Any]) -> LowtideError:
    """The exception the extension raises: an instance of the class ``name`` or, for an
    ``OSError`` class with an ``errno``, of a subclass that also derives from the builtin
    ``OSError`` subclass that ``OSError(errno, ...)`` would be (``FileNotFoundError`` for
    ENOENT). Python's ``OSError`` picks that subclass only when called as ``OSError``."""
    cls = globals()[name]
    errno = attrs.get("errno")
    if errno is not None and issubclass(cls, OSError):
        builtin = type(OSError(errno, ""))
        if builtin is not OSError and not issubclass(cls, builtin):
            key = (cls, builtin)
            if key not in _WITH_BUILTIN:
                # Named like `cls`, so that tracebacks show the lowtide class.
                namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
                _WITH_BUILTIN[key] = type(cls.__name__, (cls, builtin), namespace)
            cls = _WITH_BUILTIN[key]
    error: LowtideError = cls(message, retryable, attrs)
    return error


class LowtideError(Exception):
    """Base class of every lowtide error."""

    retryable: bool
    """Whether the same call may succeed later with nothing changed by the caller."""

    def __init__(
        self, message: str, retryable: bool = False, attrs: dict[str, Any] | None = None
    ) -> None:
        attrs = attrs or {}
        errno = attrs.get("errno")
        if isinstance(self, OSError) and errno is not None:
            # `errno`, `strerror` and `filename` as `OSError(errno, strerror, filename)` sets
            # them; `str(err)` stays the Rust message (see `__str__`).
            filename = attrs.get("filename")
            extra = () if filename is None else (filename,)
            super().__init__(errno, os.strerror(errno), *extra)
        else:
            super().__init__(message)
        self._message = message
        self._attrs = attrs
        self.retryable = retryable
        for key, value in attrs.items():
            if key not in ("errno", "filename"):
                setattr(self, key, value)

    def __str__(self) -> str:
        return self._message

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from the fields the extension gave (`args` may be OSError's).
        cls = type(self)
        if cls in _WITH_BUILTIN.values():
            cls = cls.__bases__[0]
        if globals().get(cls.__name__) is not cls:
            # A subclass defined elsewhere.
            return (cls, (self._message, self.retryable, self._attrs))
        return (_exception, (cls.__name__, self._message, self.retryable, self._attrs))


class ConfigError(LowtideError, ValueError):
    """An impossible or contradictory store setting."""


class StoreClosed(LowtideError, ValueError):
    """A call on a store after its ``close()`` (a ``ValueError``, as for a closed file)."""


class Forked(LowtideError, RuntimeError):
    """A call on a store in a child forked from the process that opened it (``multiprocessing``
    with the ``fork`` start method, PyTorch ``DataLoader`` workers): its spill file, I/O and
    threads are the parent's, so the child may not use it; open a new ``Store`` in the child
    (``owner_pid``: the process that opened it, ``pid``: this one)."""


class UnsupportedDtype(LowtideError, TypeError):
    """Data whose dtype has no safetensors name (such as NumPy's ``complex128`` or
    ``datetime64``), so its bytes cannot be stored as a tensor (``dtype``: the array's)."""


# Handles: a name or handle that leads nowhere.
class HandleError(LowtideError, LookupError):
    """A handle or name that does not lead to a tensor, model or device of this store."""


class NoSuchTensor(HandleError, KeyError):
    """A model has no tensor of that name (``model``, ``name``)."""


class UnknownHandle(HandleError):
    """A model, tensor or device that is not (or no longer) in this store: a closed model
    (``path``), or a handle of another store (``model``, ``tensor`` or ``device``)."""


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


class FromFile(UpdateError, ValueError):
    """Only derived tensors can be discarded; a tensor opened from a file is reverted."""


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
    """The file could not be opened, read or mapped (``path``, ``op``; ``errno``,
    ``strerror`` and ``filename`` as for ``OSError``). A missing file is also a
    ``FileNotFoundError``, a denied one a ``PermissionError``."""


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
    "Forked",
    "FromFile",
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
    "StoreClosed",
    "StoreMemoryError",
    "UnderReserve",
    "UnknownHandle",
    "UnsupportedDtype",
    "UpdateError",
]

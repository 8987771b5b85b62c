"""Type stubs of the extension module (`lowtide._lowtide`); see the package docstring.

Checked against the built module by ``python -m mypy.stubtest lowtide._lowtide`` (in
``scripts/test``).
"""

import sys
from collections.abc import Sequence
from os import PathLike
from typing import Any, Self, final

from lowtide._types import (
    FreeOutcome,
    MemoryReading,
    PrefetchOutcome,
    ReleaseOutcome,
    Size,
    StoreStats,
)

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer

__all__ = ["Lease", "Model", "Prefetch", "Store", "TensorInfo", "__version__", "parse_size"]

__version__: str

def parse_size(size: Size) -> int:
    """Parses a size such as ``"8GiB"``, ``"512MB"`` or ``1024`` into bytes."""

@final
class Store:
    """Model weights under a RAM budget; a context manager that closes the store.

    ``ram_budget``: the most bytes of RAM copies (default: half the available memory).
    ``reserve_ram``: keep the system's available memory above this (default 0, off).
    ``spill_dir``: directory of the unnamed spill file (default: the temp directory).
    ``spill_max``: the most bytes the spill file may hold (default: no limit).
    ``pressure``: watch memory pressure (PSI) on a thread (default: on iff ``reserve_ram``).
    ``mapped_readahead``: mapped reads use the kernel's readahead (default False).
    ``keep_streamed_cached``: weights restored again and again (or of a model larger than
    the budget) are read through the page cache and left there while memory is plentiful, so
    that the next restore reads nothing from the disk (default True); False reads everything
    not cached with ``O_DIRECT`` and leaves nothing cached.
    Raises :class:`lowtide.ConfigError` for impossible settings. Once closed, every call
    but ``close()`` raises :class:`lowtide.StoreClosed` (a ``ValueError``).

    A store belongs to the process that opened it. In a forked child (``multiprocessing``
    with the ``fork`` start method, ``DataLoader`` workers) its calls that read, write or
    look up tensors raise :class:`lowtide.Forked`, and ``close()`` or freeing it releases
    nothing the parent uses: open a new ``Store`` in the child.

    A ``reserve_ram`` above all the memory there is (up to ``2**64 - 1``) is never met: every
    new RAM copy is refused with :class:`lowtide.UnderReserve`.
    """

    def __new__(
        cls,
        ram_budget: Size | None = None,
        reserve_ram: Size | None = None,
        spill_dir: str | PathLike[str] | None = None,
        spill_max: Size | None = None,
        pressure: bool | None = None,
        mapped_readahead: bool = False,
        keep_streamed_cached: bool = True,
    ) -> Self: ...
    @property
    def ram_budget(self) -> int:
        """The RAM budget in bytes."""
    @property
    def reserve_ram(self) -> int:
        """The RAM reserve in bytes (0 when off). Settable (a size; 0 turns it off): applied
        by the next allocation, the pressure monitor's next tick or :meth:`relieve_reserve`."""
    @reserve_ram.setter
    def reserve_ram(self, size: Size) -> None: ...
    @property
    def closed(self) -> bool:
        """Whether the store was closed."""
    def open_model(self, path: str | PathLike[str]) -> Model:
        """Opens a ``.safetensors`` file, a directory of shards, a shard index or a ``.gguf``
        file: validated and mapped, no tensor data read. Its files stay open until
        :meth:`Model.close` (or a ``with`` block, or the store's :meth:`close`, or the model
        object being freed). A missing file raises :class:`lowtide.SourceIoError`, which is
        also a ``FileNotFoundError`` (``errno``, ``filename`` set)."""
    def release(self, model: Model) -> ReleaseOutcome:
        """Drops the clean copies of every unpinned tensor of ``model``; writes nothing; the
        model stays open (see :meth:`Model.close`)."""
    def free_memory(self, nbytes: Size) -> FreeOutcome:
        """Evicts at least ``nbytes`` of RAM copies in policy order if it can (clean ones
        dropped, dirty ones spilled). Returns what it freed (see :class:`lowtide.FreeOutcome`
        for each key)."""
    def relieve_reserve(self) -> FreeOutcome:
        """Frees RAM copies until the available memory is back above ``reserve_ram``: clean
        copies dropped, dirty ones spilled, in policy order (what the pressure monitor does
        on its ticks). Returns what it freed, as :meth:`free_memory` does."""
    def memory(self) -> MemoryReading:
        """The reading the governor acts on: ``available`` bytes (the smaller of
        ``mem_available`` and the memory cgroup's headroom), ``mem_available``,
        ``cgroup_limit`` and ``cgroup_usage`` (None outside a limited cgroup)."""
    def prefetch(self, model: Model) -> Prefetch:
        """Restores ``model``'s tensors into RAM in the background, never evicting."""
    def derive(
        self,
        model: Model,
        name: str,
        data: Any,
        dtype: str | None = None,
        shape: list[int] | tuple[int, ...] | None = None,
    ) -> TensorInfo:
        """Registers a new dirty tensor from a torch tensor, a NumPy array or any buffer
        (one copy). ``dtype`` (a safetensors name such as ``"BF16"``) and ``shape`` default
        to the array's."""
    def stats(self) -> StoreStats:
        """The store's counters now (see :class:`lowtide.StoreStats` for each key)."""
    def wait_released(self) -> None:
        """Waits until the copies dropped so far were given back to the system."""
    def close(self) -> None:
        """Closes every unpinned model and the store; live views keep their copies. Returns
        once the memory of the copies it dropped is back with the system."""
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> bool: ...

@final
class Model:
    """A model opened in a store; a context manager that closes it.

    Its files stay open until :meth:`close`, the end of a ``with`` block, or the store's
    :meth:`Store.close`. A model object freed while open (no reference left) is closed then,
    as a file object is, unless arrays, tensors or leases made from it still pin its tensors:
    then it stays open until the store closes.
    """

    @property
    def path(self) -> str:
        """The path the model was opened from."""
    @property
    def closed(self) -> bool:
        """Whether it was closed (by :meth:`close` or with its store)."""
    def close(self) -> None:
        """Closes the model: frees its copies (dirty ones included) and spill extents and
        closes its files. Later calls on it raise :class:`lowtide.UnknownHandle` (naming its
        ``path``). Raises :class:`lowtide.Pinned` while a lease, array or tensor made from it
        is alive; the model then stays open and usable. Closing again does nothing."""
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> bool:
        """Closes the model; :class:`lowtide.Pinned` is raised only when no other exception
        leaves the block."""
    def tensors(self) -> list[TensorInfo]:
        """Every tensor now, ordered by name."""
    def names(self) -> list[str]:
        """The tensor names, ordered."""
    def info(self, name: str) -> TensorInfo:
        """One tensor's info now (raises :class:`lowtide.NoSuchTensor`)."""
    def lease(self, name: str) -> Lease:
        """Pins a RAM copy of the tensor (read from the file or the spill file if needed)."""
    def leases(self, names: Sequence[str] | None = None) -> list[Lease]:
        """Pins RAM copies of the named tensors (all of the model's, in file order, without
        names) and returns a lease on each, in that order. They are read as one stream: the
        reads of the next tensors are in flight while one completes, in requests shaped for
        the disk from the store's own measurements. All or none: on the first error (such as
        :class:`lowtide.OverBudget`) the leases taken so far are let go and the error raised."""
    def numpy(self, name: str) -> Any:
        """A NumPy array over the pinned RAM copy, no copy (BF16 and float8 as their bits:
        ``uint16``/``uint8``; ggml quantized types as ``uint8`` blocks, the innermost
        dimension in bytes, as the reference GGUF reader shows them). Pinned while the array
        or any view of it lives."""
    def torch(self, name: str, device: Any = None) -> Any:
        """A torch tensor over the pinned RAM copy, no copy; on another ``device``, a copy
        there. Writable: writes change the RAM copy only (see :meth:`Lease.mark_dirty`)."""
    def replace(self, name: str, data: Any) -> None:
        """Replaces the tensor's bytes with ``data``'s (one copy); it becomes dirty. Raises
        :class:`lowtide.Pinned` while views of it are alive."""
    def derive(
        self,
        name: str,
        data: Any,
        dtype: str | None = None,
        shape: list[int] | tuple[int, ...] | None = None,
    ) -> TensorInfo:
        """Like :meth:`Store.derive` for this model."""
    def mark_dirty(self, name: str) -> None:
        """Keeps writes made in place through the tensor's views (``copy_``, ``+=``): its RAM
        copy becomes its only copy, spilled when evicted, never dropped. Nothing is copied;
        views may stay alive. Raises :class:`lowtide.NotInRam` without a RAM copy."""
    def revert(self, name: str) -> int:
        """Reverts a patched tensor to its bytes in the file; returns bytes freed."""
    def discard(self, name: str) -> int:
        """Removes a derived tensor: its copies (RAM, spilled) are freed, nothing is written,
        and its name can be derived again; returns bytes freed. Raises
        :class:`lowtide.FromFile` for a tensor opened from a file (revert it) and
        :class:`lowtide.Pinned` while views of it live."""
    def spill(self, name: str) -> int:
        """Spills a dirty tensor's RAM copy now; returns RAM bytes freed."""
    def release(self) -> ReleaseOutcome:
        """Like :meth:`Store.release` for this model."""
    def prefetch(self) -> Prefetch:
        """Like :meth:`Store.prefetch` for this model."""
    def __len__(self) -> int: ...
    def __contains__(self, name: str, /) -> bool: ...

@final
class TensorInfo:
    """What the store knows about one tensor at one moment."""

    name: str
    """Name within its model."""
    dtype: str
    """The file's dtype name, such as ``"BF16"``; in a GGUF file the ggml type, such as
    ``"F16"`` or ``"Q4_K"``."""
    shape: tuple[int, ...]
    """Shape, outermost dimension first (for GGUF, the file's ``ne`` reversed); for a
    quantized type the logical shape in elements."""
    nbytes: int
    """Length in bytes."""
    clean: bool
    """Its bytes equal its extent in the file."""
    tiers: list[str]
    """Where copies are now, fastest first: ``"device"``, ``"ram"``, ``"mapped"``,
    ``"spilled"`` (the file itself is not listed)."""
    pins: int
    """Live pins: one per lease still held by the lease or by arrays made from it."""
    @property
    def in_ram(self) -> bool:
        """Whether it has a RAM copy now."""

@final
class Lease(Buffer):
    """A pinned RAM copy of one tensor, for ``numpy.from_dlpack``, ``torch.from_dlpack``,
    ``memoryview`` or any buffer consumer (writable, no copy). A context manager: leaving the
    block ends the lease's own pin; arrays made from it keep theirs."""

    @property
    def name(self) -> str:
        """The tensor's name."""
    @property
    def dtype(self) -> str:
        """The file's dtype name."""
    @property
    def shape(self) -> tuple[int, ...]:
        """The shape."""
    @property
    def nbytes(self) -> int:
        """Length in bytes."""
    @property
    def data_ptr(self) -> int:
        """The address of the first byte (for zero-copy checks)."""
    @property
    def closed(self) -> bool:
        """Whether the lease was closed."""
    def close(self) -> None:
        """Ends the lease's own pin (after a buffer export: when the object is freed)."""
    def bits(self) -> Lease:
        """A lease sharing this pin that exports unsigned integers of the dtype's width."""
    def mark_dirty(self) -> None:
        """Keeps writes made through this lease's views: the RAM copy they share becomes the
        tensor's only copy (spilled when evicted, never dropped). Nothing is copied; the
        lease and its views stay usable."""
    def __dlpack__(
        self,
        stream: Any = None,
        *,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...
    if sys.version_info >= (3, 12):
        # The buffer protocol's C slots; Python shows them as methods from 3.12 on.
        def __buffer__(self, flags: int, /) -> memoryview: ...
        def __release_buffer__(self, buffer: memoryview, /) -> None: ...

    def __len__(self) -> int: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> bool: ...

@final
class Prefetch:
    """A prefetch running in the background."""

    def wait(self) -> PrefetchOutcome:
        """Waits until it has finished, from any thread and as often as asked (each caller
        gets the same outcome, or the same error); returns what it restored."""
    def cancel(self) -> None:
        """Asks it to stop after the tensor it is restoring, also while another thread
        waits for it."""
    @property
    def done(self) -> bool:
        """Whether it has finished (:meth:`wait` would return at once)."""

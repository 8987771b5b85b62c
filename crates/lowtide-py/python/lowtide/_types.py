"""The types of sizes and of the dicts that the store's calls return, one docstring per key.

Real classes (``TypedDict``), importable as ``lowtide.StoreStats`` and so on for annotations;
the calls themselves return plain dicts. All sizes are in bytes.
"""

from __future__ import annotations

from typing import TypedDict

Size = int | str
"""A size: bytes as an int, or a string such as ``"8GiB"`` or ``"512MB"``."""


class FreeOutcome(TypedDict):
    """What ``Store.free_memory()`` and ``Store.relieve_reserve()`` freed."""

    freed_bytes: int
    """RAM bytes freed in total."""
    dropped_bytes: int
    """Of which clean copies dropped (nothing written; read again from the file if needed)."""
    spilled_bytes: int
    """Of which dirty copies written to the spill file first."""
    recipe_bytes: int
    """Of which dirty copies dropped because their bytes were already in the spill file or on
    a device, or a recipe recomputes them more cheaply than a spill."""
    spill_failures: int
    """Dirty copies that could not be spilled (disk full, ``spill_max``, I/O) and so stayed
    in RAM (a count)."""


class ReleaseOutcome(TypedDict):
    """What ``Store.release()`` and ``Model.release()`` dropped."""

    ram_bytes: int
    """Bytes of clean RAM copies freed."""
    mapped_bytes: int
    """Bytes of mapped pages of the file given back to the kernel."""
    kept: int
    """Tensors kept: pinned by a lease, array or tensor, or dirty (their only copy)."""


class PrefetchOutcome(TypedDict):
    """What ``Prefetch.wait()`` reports."""

    tensors: int
    """Tensors that now have a RAM copy thanks to the prefetch."""
    bytes: int
    """Their bytes."""
    skipped_bytes: int
    """Bytes left out for lack of room (the budget or the reserve; a prefetch never evicts)."""
    cancelled: bool
    """Whether ``cancel()`` stopped it before the end."""


class MemoryReading(TypedDict):
    """What ``Store.memory()`` reads: the figures the governor acts on."""

    available: int
    """The smaller of ``mem_available`` and the memory cgroup's headroom."""
    mem_available: int
    """``MemAvailable`` from ``/proc/meminfo``."""
    cgroup_limit: int | None
    """The process's memory cgroup limit; None without a limit."""
    cgroup_usage: int | None
    """Bytes the cgroup is charged now; None where no memory cgroup is readable."""


class StoreStats(TypedDict):
    """``Store.stats()``: the store's counters since it was created (the fields of the Rust
    ``StatsSnapshot``). Bytes unless said otherwise; ``*_bytes`` without "held now" are
    running totals."""

    bytes_read_source: int
    """Bytes read from model files: reads into RAM copies and ranges faulted in through the
    mapping."""
    bytes_read_cold: int
    """Of those, bytes read from the disk (they were not in the page cache): directly, leaving
    nothing cached, except ``bytes_read_cold_kept``."""
    bytes_read_cold_kept: int
    """Of ``bytes_read_cold``, bytes read through the page cache and left there, for streamed
    weights while memory is plentiful (``restores_cached``)."""
    restores_direct_first: int
    """Restores from a model file of tensors not streamed (their first, in a model that fits
    in the RAM budget), read directly (a count)."""
    restores_cached: int
    """Restores from a model file of streamed tensors (restored before, or in a model larger
    than the RAM budget) while available memory exceeded the reserve by twice the model's
    file bytes: read through the page cache and left there, so that the next restore reads
    nothing from the disk (a count)."""
    restores_direct_short: int
    """Restores from a model file of streamed tensors while memory was short of that: read
    directly, nothing left cached (a count)."""
    restores_queued: int
    """Of the restores from a model file, those read directly through one queue with the
    next tensors' reads in flight (:meth:`lowtide.Model.leases`, ``lowtide.torch``'s
    ``load``, prefetches; a count)."""
    bytes_read_cached: int
    """Of those, bytes copied into RAM copies from the page cache."""
    pool_bytes: int
    """Held now: buffers of evicted copies kept for the next restores (counted against the RAM
    budget; given back first when memory is needed)."""
    pool_reuses: int
    """Restores that reused a pooled buffer (a count)."""
    release_pending_bytes: int
    """Held now: copies dropped on purpose that are not yet given back to the system
    (``Store.wait_released()`` waits for them)."""
    bytes_written: int
    """Bytes written to disk by lowtide (spill writes)."""
    anon_bytes: int
    """Held now: the sum of the RAM copies."""
    anon_peak_bytes: int
    """The most RAM-copy bytes held at once."""
    ram_dropped_bytes: int
    """Bytes of clean RAM copies freed (nothing written)."""
    mapped_released_bytes: int
    """Bytes of mapped pages given back to the kernel (nothing written)."""
    evictions: int
    """Copies evicted to make room (a count; the sum of the ``evictions_*`` counts)."""
    acquires: int
    """Guards handed out: pins on a copy, one per lease among them (a count)."""
    bytes_spilled: int
    """Bytes written to the spill file (included in ``bytes_written``)."""
    bytes_restored_spill: int
    """Bytes read back from the spill file and verified."""
    checksum_failures: int
    """Spilled extents whose checksum did not match (a count)."""
    spill_failures: int
    """Spill writes that failed (disk full, ``spill_max``, I/O); their bytes stayed in RAM (a
    count)."""
    recomputes: int
    """Dirty tensors recomputed from their recipe (a count)."""
    evictions_budget: int
    """Evictions to stay within the RAM budget (a count)."""
    evictions_reserve: int
    """Evictions to keep available memory above the reserve (a count)."""
    evictions_pressure: int
    """Evictions after a memory pressure event (a count)."""
    evictions_request: int
    """Evictions asked for with ``free_memory()`` (a count)."""
    evict_seconds: float
    """Time spent evicting, spill writes included, in seconds."""
    bytes_uploaded: int
    """Bytes copied to devices."""
    bytes_downloaded: int
    """Bytes copied back from devices (into RAM or straight into the spill file)."""
    device_bytes: int
    """Held now: bytes of device copies."""
    unloaded_clean_bytes: int
    """Bytes of device copies freed without writing (their bytes exist elsewhere)."""
    device_unloads: int
    """Device copies unloaded (clean ones freed, dirty ones moved to RAM or the spill file; a
    count)."""


__all__ = [
    "FreeOutcome",
    "MemoryReading",
    "PrefetchOutcome",
    "ReleaseOutcome",
    "Size",
    "StoreStats",
]

"""lowtide: keeps model weights in the fastest memory that fits, under a RAM budget.

A :class:`Store` holds the tensors of ``.safetensors`` and ``.gguf`` model files. Clean
tensors (equal to their bytes in the file) are dropped when memory runs low and read again
from the file; dirty ones (replaced, derived) are spilled to disk. Views hand the store's own
RAM copy to NumPy and PyTorch without a copy, and pin it while any array or tensor made from
it lives::

    import lowtide

    with lowtide.Store(ram_budget="8GiB") as store:
        unet = store.open_model("unet.safetensors")    # validated and mapped; nothing read
        weight = unet.torch("conv_in.weight")          # read into a pinned RAM copy, no copy
        ...
        del weight                                     # unpinned: evictable again
        store.release(unet)                            # drops clean copies, writes nothing
        unet.close()                                   # closes its file (or `with ... as unet`)

Sizes are ints (bytes) or strings such as ``"8GiB"`` and ``"512MB"``. Every call that reads,
writes, waits or evicts releases the GIL.
"""

from lowtide._errors import (
    AllocFailed,
    BadShape,
    ByteLength,
    ConfigError,
    DeviceFull,
    DuplicateName,
    Forked,
    FromFile,
    HandleError,
    Lost,
    LowtideError,
    MalformedModel,
    NoCopy,
    NoSuchTensor,
    NotFromFile,
    NotInRam,
    OverBudget,
    Pinned,
    RecipeMismatch,
    RestoreError,
    SourceChanged,
    SourceError,
    SourceIoError,
    SpillFailed,
    SpillReadFailed,
    StoreClosed,
    StoreMemoryError,
    UnderReserve,
    UnknownHandle,
    UnsupportedDtype,
    UpdateError,
)
from lowtide._lowtide import Lease, Model, Prefetch, Store, TensorInfo, __version__, parse_size
from lowtide._types import (
    FreeOutcome,
    MemoryReading,
    PrefetchOutcome,
    ReleaseOutcome,
    Size,
    StoreStats,
)

__all__ = [
    "AllocFailed",
    "BadShape",
    "ByteLength",
    "ConfigError",
    "DeviceFull",
    "DuplicateName",
    "Forked",
    "FreeOutcome",
    "FromFile",
    "HandleError",
    "Lease",
    "Lost",
    "LowtideError",
    "MalformedModel",
    "MemoryReading",
    "Model",
    "NoCopy",
    "NoSuchTensor",
    "NotFromFile",
    "NotInRam",
    "OverBudget",
    "Pinned",
    "Prefetch",
    "PrefetchOutcome",
    "RecipeMismatch",
    "ReleaseOutcome",
    "RestoreError",
    "Size",
    "SourceChanged",
    "SourceError",
    "SourceIoError",
    "SpillFailed",
    "SpillReadFailed",
    "Store",
    "StoreClosed",
    "StoreMemoryError",
    "StoreStats",
    "TensorInfo",
    "UnderReserve",
    "UnknownHandle",
    "UnsupportedDtype",
    "UpdateError",
    "__version__",
    "parse_size",
]

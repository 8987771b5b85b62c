"""NumPy and PyTorch conversions used by the extension: dtype tables, views, bytes of arrays.

Views never copy: NumPy and PyTorch see the pinned RAM copy itself through DLPack. Dtypes
that a framework lacks (NumPy: BF16 and the float8 types) come as unsigned integers of the
same width; sub-byte types (F4, F6) as their packed bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lowtide._errors import UnsupportedDtype

# safetensors dtype -> torch dtype attribute name; missing attributes fall back to bits.
_TORCH = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "I64": "int64",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}

# Exported by DLPack as their bits (uint8); viewed as the float type afterwards.
_VIEWED_AS_BITS = {"F8_E4M3", "F8_E5M2", "F8_E8M0"}

# NumPy dtype -> safetensors dtype, for bytes handed in.
_FROM_NUMPY = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "float64": "F64",
    "complex64": "C64",
    "int64": "I64",
    "uint64": "U64",
}

_FROM_TORCH = {value: key for key, value in _TORCH.items()}


def to_numpy(lease: Any) -> np.ndarray:
    """A NumPy array over the lease's memory (no copy); BF16 and float8 as their bits."""
    if lease.dtype in ("BF16", *_VIEWED_AS_BITS):
        return np.from_dlpack(lease.bits())
    return np.from_dlpack(lease)


_from_capsule: Any = None


def to_torch(lease: Any, device: Any = None) -> Any:
    """A torch tensor over the lease's memory (no copy), or a copy of it on ``device``."""
    global _from_capsule
    if _from_capsule is None:
        import torch.utils.dlpack

        _from_capsule = torch.utils.dlpack.from_dlpack
    import torch

    # The capsule itself: `torch.from_dlpack(lease)` would first ask for the device and the
    # protocol version, which costs more than the rest of a view (docs/performance.md).
    tensor = _from_capsule(lease.__dlpack__())
    if lease.dtype in _VIEWED_AS_BITS:
        name = _TORCH[lease.dtype]
        if hasattr(torch, name):
            tensor = tensor.view(getattr(torch, name))
    if device is not None and torch.device(device) != tensor.device:
        tensor = tensor.to(device)
    return tensor


def _unsupported(dtype: object) -> UnsupportedDtype:
    return UnsupportedDtype(
        f"data of dtype {dtype} has no safetensors dtype; pass bytes or a memoryview to "
        "store raw bytes",
        False,
        {"dtype": str(dtype)},
    )


def as_bytes(data: Any) -> tuple[memoryview, str | None, tuple[int, ...] | None]:
    """The bytes of a torch tensor, a NumPy array or any buffer, as a flat memoryview (a copy
    only where the data is not contiguous host memory, or is big-endian: safetensors bytes are
    little-endian), with its dtype and shape if known. Raises ``UnsupportedDtype`` for an
    array or tensor whose dtype has no safetensors name (``complex128``, ``datetime64``)."""
    module = type(data).__module__
    if module.startswith("torch"):
        import torch

        tensor = data.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        dtype = _FROM_TORCH.get(str(tensor.dtype).removeprefix("torch."))
        if dtype is None:
            raise _unsupported(tensor.dtype)
        shape = tuple(tensor.shape)
        flat = tensor.reshape(-1).view(torch.uint8)
        return memoryview(flat.numpy()).cast("B"), dtype, shape  # type: ignore[arg-type]
    if isinstance(data, np.ndarray):
        dtype = _FROM_NUMPY.get(data.dtype.name)
        if dtype is None:
            raise _unsupported(data.dtype)
        # Byte-swapped where it is big-endian (`'>f4'`), as the reference writer does.
        array = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
        flat_array = array.reshape(-1).view(np.uint8)
        return memoryview(flat_array), dtype, tuple(array.shape)  # type: ignore[arg-type]
    view = memoryview(data)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B"), None, None

#!/usr/bin/env python3
"""Writes GGUF files with the reference implementation (the `gguf` package's GGUFWriter),
then reads them back with its GGUFReader, for lowtide's tests.

Usage: write_gguf_reference.py OUT_DIR

Writes into OUT_DIR (created if missing):

  types.gguf        one tensor of every tensor type the package knows (GGML_QUANT_SIZES),
                    plain numeric types from numpy arrays, the others as raw uint8 blocks
                    (raw_dtype=...); 1 to 4 dimensions; metadata of every value type
  aligned.gguf      general.alignment = 64, a few tensors, names that need escapes
  empty.gguf        metadata only, no tensors
  bytes/<file>/<n>.bin   the raw bytes of tensor n of each file
  manifest.json     what GGUFReader reads back (see below)

manifest.json:

  {
    "types": [{"name": "Q4_K", "id": 12, "block": 256, "bytes": 144}],
    "files": [{"file": REL, "alignment": N, "data_start": N, "version": N,
               "metadata": [{"key": K, "type": "UINT32", "element_type": T|null,
                             "len": N|null, "value": V}],
               "tensors": [{"name": S, "type": "Q4_K", "type_id": N, "dims": [..] (as stored,
                            innermost first), "shape": [..] (outermost first), "offset": N
                            (absolute), "bytes": N, "bin": REL}]}]
  }

Exit status: 0 on success, 3 when a required Python package is missing (the message on stderr
names it), anything else on any other failure.
"""

import json
import os
import sys

MISSING_PACKAGE = 3

try:
    import numpy as np
except ImportError:
    sys.stderr.write("missing Python package: numpy (pip install gguf numpy)\n")
    sys.exit(MISSING_PACKAGE)
try:
    import gguf
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
except ImportError:
    sys.stderr.write("missing Python package: gguf (pip install gguf numpy)\n")
    sys.exit(MISSING_PACKAGE)

SEED = 20250115

# Types numpy can hold: written from typed arrays, the writer infers the type.
NUMPY_TYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
}

# Shapes (numpy order, outermost first); the innermost dimension is a multiple of the block.
SHAPES = [lambda b: (2 * b,), lambda b: (3, b), lambda b: (2, 3, 2 * b), lambda b: (1, 2, 3, b)]


def write_file(path, tensors, metadata, alignment=None):
    writer = gguf.GGUFWriter(path, "lowtide-test")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value, vtype, sub in metadata:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, array, raw in tensors:
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def value_json(field):
    """The field's value as the reader decodes it (arrays as lists)."""
    value = field.contents()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value


def read_back(out_dir, rel):
    reader = gguf.GGUFReader(os.path.join(out_dir, rel))
    metadata = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the reader's own fields: version, tensor and key counts
        vtype = GGUFValueType(field.types[0])
        entry = {"key": key, "type": vtype.name, "element_type": None, "len": None}
        if vtype == GGUFValueType.ARRAY:
            entry["element_type"] = GGUFValueType(field.types[1]).name
            entry["len"] = len(field.data)
        entry["value"] = value_json(field)
        metadata.append(entry)
    bin_dir = os.path.join(out_dir, "bytes", rel)
    os.makedirs(bin_dir, exist_ok=True)
    tensors = []
    for n, t in enumerate(reader.tensors):
        data = np.ascontiguousarray(t.data).tobytes()
        assert len(data) == t.n_bytes, (t.name, len(data), t.n_bytes)
        bin_rel = os.path.join("bytes", rel, f"{n}.bin")
        with open(os.path.join(out_dir, bin_rel), "wb") as f:
            f.write(data)
        dims = [int(d) for d in t.shape]
        tensors.append(
            {
                "name": t.name,
                "type": GGMLQuantizationType(t.tensor_type).name,
                "type_id": int(t.tensor_type),
                "dims": dims,
                "shape": dims[::-1],
                "offset": int(t.data_offset),
                "bytes": int(t.n_bytes),
                "bin": bin_rel,
            }
        )
    version = int(reader.fields["GGUF.version"].parts[-1][0])
    return {
        "file": rel,
        "alignment": int(reader.alignment),
        "data_start": int(reader.data_offset),
        "version": version,
        "metadata": metadata,
        "tensors": tensors,
    }


def every_value_type():
    V = GGUFValueType
    return [
        ("test.u8", 200, V.UINT8, None),
        ("test.i8", -100, V.INT8, None),
        ("test.u16", 60000, V.UINT16, None),
        ("test.i16", -30000, V.INT16, None),
        ("test.u32", 4000000000, V.UINT32, None),
        ("test.i32", -2000000000, V.INT32, None),
        ("test.f32", 0.5, V.FLOAT32, None),
        ("test.bool", True, V.BOOL, None),
        ("test.string", "caf\u00e9 \u91cd\u307f", V.STRING, None),
        ("test.u64", 2**63 + 5, V.UINT64, None),
        ("test.i64", -(2**62), V.INT64, None),
        ("test.f64", 1.25, V.FLOAT64, None),
        ("test.array.i32", [1, -2, 3], V.ARRAY, V.INT32),
        ("test.array.u8", [1, 2, 255], V.ARRAY, V.UINT8),
        ("test.array.f32", [0.25, -1.5], V.ARRAY, V.FLOAT32),
        ("test.array.bool", [True, False, True], V.ARRAY, V.BOOL),
        ("test.array.string", ["a", "", "\u00e9t\u00e9"], V.ARRAY, V.STRING),
        ("test.array.u64", [0, 2**64 - 1], V.ARRAY, V.UINT64),
        ("test.array.f64", [1.0, 2.5], V.ARRAY, V.FLOAT64),
        ("test.array.long", [f"tok{i}" for i in range(1000)], V.ARRAY, V.STRING),
        ("general.name", "reference model", V.STRING, None),
    ]


def main():
    if len(sys.argv) != 2:
        sys.stderr.write(__doc__)
        return 2
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(SEED)

    types = []
    tensors = []
    for n, qtype in enumerate(sorted(GGML_QUANT_SIZES, key=int)):
        block, type_size = GGML_QUANT_SIZES[qtype]
        types.append({"name": qtype.name, "id": int(qtype), "block": block, "bytes": type_size})
        shape = SHAPES[n % len(SHAPES)](block)
        name = f"t.{qtype.name.lower()}"
        if qtype.name in NUMPY_TYPES:
            dtype = NUMPY_TYPES[qtype.name]
            if np.issubdtype(dtype, np.floating):
                array = rng.standard_normal(shape).astype(dtype)
            else:
                info = np.iinfo(dtype)
                array = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
            tensors.append((name, array, None))
        else:
            # Raw blocks: uint8, the innermost dimension in bytes.
            byte_shape = shape[:-1] + (shape[-1] // block * type_size,)
            array = rng.integers(0, 256, size=byte_shape, dtype=np.uint8)
            tensors.append((name, array, qtype))
    write_file(os.path.join(out_dir, "types.gguf"), tensors, every_value_type())

    aligned = [
        ("blk.0.attn_q.weight", rng.standard_normal((4, 8)).astype(np.float32), None),
        ("name with \"quotes\" and \u00e9", rng.standard_normal((3,)).astype(np.float16), None),
        ("ctrl\u001b[2J", rng.integers(0, 256, size=(2, 34), dtype=np.uint8), GGMLQuantizationType.Q8_0),
    ]
    meta = [("general.name", "aligned", GGUFValueType.STRING, None)]
    write_file(os.path.join(out_dir, "aligned.gguf"), aligned, meta, alignment=64)

    write_file(
        os.path.join(out_dir, "empty.gguf"),
        [],
        [("general.name", "empty", GGUFValueType.STRING, None)],
    )

    files = [read_back(out_dir, rel) for rel in ["types.gguf", "aligned.gguf", "empty.gguf"]]
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"types": types, "files": files}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

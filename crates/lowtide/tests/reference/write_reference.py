#!/usr/bin/env python3
"""Writes safetensors files with the reference implementation, for lowtide's tests.

Usage: write_reference.py OUT_DIR

Writes into OUT_DIR (which must exist or is created):

  dtypes.safetensors        many dtypes and realistic shapes, metadata {"format": "pt"}
  odd.safetensors           no metadata, odd sizes, names that need JSON escapes
  empty.safetensors         no tensors at all, metadata only
  sharded/model-0000{1,2}-of-00002.safetensors
  sharded/model.safetensors.index.json   (Hugging Face format)
  bytes/<file>/<name>.bin   the raw little-endian C-order bytes of every tensor
  manifest.json             what was written (see MANIFEST below)

manifest.json:

  {
    "files": [{"file": REL, "metadata": {...} | null, "data_start": N, "tensors": N}],
    "sharded": {"dir": REL, "index": REL, "total_size": N, "weight_map": {name: shard}},
    "tensors": [{"file": REL, "name": S, "dtype": "F16", "shape": [..], "bytes": N,
                 "data_offsets": [BEGIN, END], "sha256": HEX, "bin": REL}]
  }

"data_start" and "data_offsets" are read back from the header the reference wrote.

Exit status: 0 on success, 3 when a required Python package is missing (the message on stderr
names it), anything else on any other failure.
"""

import hashlib
import json
import os
import struct
import sys

MISSING_PACKAGE = 3

try:
    import numpy as np
except ImportError:
    sys.stderr.write("missing Python package: numpy (pip install safetensors numpy)\n")
    sys.exit(MISSING_PACKAGE)
try:
    from safetensors import safe_open
    from safetensors.numpy import save_file
except ImportError:
    sys.stderr.write("missing Python package: safetensors (pip install safetensors numpy)\n")
    sys.exit(MISSING_PACKAGE)

SEED = 20240607

# numpy dtype -> the name safetensors gives it. Explicit little-endian so that tobytes() is the
# on-disk layout on any host.
DTYPE_NAMES = {
    np.dtype("<f2"): "F16",
    np.dtype("<f4"): "F32",
    np.dtype("<f8"): "F64",
    np.dtype("<c8"): "C64",
    np.dtype("i1"): "I8",
    np.dtype("u1"): "U8",
    np.dtype("<i2"): "I16",
    np.dtype("<u2"): "U16",
    np.dtype("<i4"): "I32",
    np.dtype("<u4"): "U32",
    np.dtype("<i8"): "I64",
    np.dtype("<u8"): "U64",
    np.dtype("bool"): "BOOL",
}


def normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def ints(rng, shape, dtype):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def dtypes_file(rng):
    """Many dtypes, shapes as in real checkpoints (a UNet, a CLIP text encoder)."""
    f16_special = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 6.0e-8, -1.0], dtype="<f2"
    )
    f32_special = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, 1.0e-45, -1.0], dtype="<f4"
    )
    return {
        "conv_in.weight": normal(rng, (320, 4, 3, 3), "<f2"),
        "conv_in.bias": normal(rng, (320,), "<f2"),
        "time_embedding.linear_1.weight": normal(rng, (1280, 320), "<f4"),
        "time_embedding.linear_1.bias": normal(rng, (1280,), "<f4"),
        "text_model.embeddings.position_embedding.weight": normal(rng, (77, 64), "<f8"),
        "text_model.embeddings.position_ids": np.arange(77, dtype="<i8").reshape(1, 77),
        "text_model.attention_mask": ints(rng, (1, 77), "<i4"),
        "logit_scale": np.array(4.6052, dtype="<f4"),
        "step": np.array(1000, dtype="<i8"),
        "empty": np.zeros((0, 16), dtype="<f4"),
        "empty_mask": np.zeros((0,), dtype="bool"),
        "mask": rng.integers(0, 2, size=(77,)).astype("bool"),
        "quant.weight": ints(rng, (640, 33), "i1"),
        "quant.zero_point": ints(rng, (640,), "u1"),
        "audio.pcm": ints(rng, (2, 4001), "<i2"),
        "tokenizer.ids": ints(rng, (3, 5), "<u2"),
        "hash.seeds": ints(rng, (7,), "<u4"),
        "hash.keys": ints(rng, (5,), "<u8"),
        "fft.bins": (normal(rng, (17,), "<f4") + 1j * normal(rng, (17,), "<f4")).astype("<c8"),
        "special.f16": f16_special,
        "special.f32": f32_special,
    }


def odd_file(rng):
    """No metadata, sizes that leave tensors unaligned, names that need escaping in JSON."""
    return {
        "a": ints(rng, (1,), "u1"),
        "b": normal(rng, (3,), "<f2"),
        "c.weight": ints(rng, (5, 7, 3), "i1"),
        "d": normal(rng, (2,), "<f8"),
        "layer 1.bias": normal(rng, (3,), "<f4"),
        "ünïcödé.weight": normal(rng, (2, 2), "<f4"),
        'quote"and\\backslash': ints(rng, (9,), "<i2"),
        "x" * 200: ints(rng, (1, 1, 1, 1, 1), "<i4"),
    }


def shard_tensors(rng):
    """A small Llama-like decoder split over two shards."""
    vocab, hidden, mlp, layers = 1000, 64, 172, 4
    first, second = {}, {}
    first["model.embed_tokens.weight"] = normal(rng, (vocab, hidden), "<f2")
    for layer in range(layers):
        shard = first if layer < layers // 2 else second
        p = f"model.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shard[p + f"self_attn.{proj}.weight"] = normal(rng, (hidden, hidden), "<f2")
        shard[p + "mlp.gate_proj.weight"] = normal(rng, (mlp, hidden), "<f2")
        shard[p + "mlp.up_proj.weight"] = normal(rng, (mlp, hidden), "<f2")
        shard[p + "mlp.down_proj.weight"] = normal(rng, (hidden, mlp), "<f2")
        shard[p + "input_layernorm.weight"] = normal(rng, (hidden,), "<f4")
        shard[p + "post_attention_layernorm.weight"] = normal(rng, (hidden,), "<f4")
    second["model.norm.weight"] = normal(rng, (hidden,), "<f4")
    second["lm_head.weight"] = normal(rng, (vocab, hidden), "<f2")
    return first, second


def read_header(path):
    """The header as written: (data_start, {name: entry})."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
    return 8 + n, header


class Writer:
    def __init__(self, out):
        self.out = out
        self.files = []
        self.tensors = []

    def save(self, rel, tensors, metadata):
        path = os.path.join(self.out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for name, arr in tensors.items():
            assert arr.dtype in DTYPE_NAMES, (name, arr.dtype)
            assert arr.flags["C_CONTIGUOUS"], name
        save_file(tensors, path, metadata=metadata)

        data_start, header = read_header(path)
        assert header.get("__metadata__") == metadata, (rel, header.get("__metadata__"))
        # The reference's own reader must give back what was written.
        with safe_open(path, framework="np") as f:
            assert sorted(f.keys()) == sorted(tensors), rel
            for name, arr in tensors.items():
                got = f.get_tensor(name)
                assert got.shape == arr.shape and got.tobytes() == arr.tobytes(), (rel, name)

        self.files.append(
            {
                "file": rel,
                "metadata": metadata,
                "data_start": data_start,
                "tensors": len(tensors),
            }
        )
        for name, arr in tensors.items():
            raw = arr.tobytes(order="C")
            entry = header[name]
            assert entry["dtype"] == DTYPE_NAMES[arr.dtype], (rel, name, entry)
            assert entry["shape"] == list(arr.shape), (rel, name, entry)
            begin, end = entry["data_offsets"]
            assert end - begin == len(raw), (rel, name, entry)
            assert "/" not in name and name not in (".", ".."), name
            bin_rel = os.path.join("bytes", rel.replace("/", "__"), name + ".bin")
            bin_path = os.path.join(self.out, bin_rel)
            os.makedirs(os.path.dirname(bin_path), exist_ok=True)
            with open(bin_path, "wb") as f:
                f.write(raw)
            self.tensors.append(
                {
                    "file": rel,
                    "name": name,
                    "dtype": DTYPE_NAMES[arr.dtype],
                    "shape": list(arr.shape),
                    "bytes": len(raw),
                    "data_offsets": [begin, end],
                    "sha256": hashlib.sha256(raw).hexdigest(),
                    "bin": bin_rel,
                }
            )


def main(argv):
    if len(argv) != 2:
        sys.stderr.write(f"usage: {argv[0]} OUT_DIR\n")
        return 2
    out = argv[1]
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(SEED)
    writer = Writer(out)

    writer.save("dtypes.safetensors", dtypes_file(rng), {"format": "pt"})
    writer.save("odd.safetensors", odd_file(rng), None)
    writer.save("empty.safetensors", {}, {"format": "pt"})

    first, second = shard_tensors(rng)
    shards = {
        "model-00001-of-00002.safetensors": first,
        "model-00002-of-00002.safetensors": second,
    }
    weight_map = {}
    total_size = 0
    for shard, tensors in shards.items():
        writer.save(f"sharded/{shard}", tensors, {"format": "pt"})
        for name, arr in tensors.items():
            weight_map[name] = shard
            total_size += arr.nbytes
    index_rel = "sharded/model.safetensors.index.json"
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out, index_rel), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")

    manifest = {
        "files": writer.files,
        "sharded": {
            "dir": "sharded",
            "index": index_rel,
            "total_size": total_size,
            "weight_map": weight_map,
        },
        "tensors": writer.tensors,
    }
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

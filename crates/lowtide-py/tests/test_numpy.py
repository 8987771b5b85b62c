"""NumPy views, pins, errors and the store's calls (no torch needed)."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import lowtide
from lowtide.bench import make_cold


def pins(model: lowtide.Model, name: str) -> int:
    return model.info(name).pins


def test_sizes_parse():
    assert lowtide.parse_size("8GiB") == 8 << 30
    assert lowtide.parse_size(4096) == 4096
    with pytest.raises(ValueError):
        lowtide.parse_size("eight")
    with pytest.raises(lowtide.ConfigError):
        lowtide.Store(ram_budget=0)


def test_tensors_and_numpy_match_the_reference(store, model_file):
    model = store.open_model(model_file)
    infos = {t.name: t for t in model.tensors()}
    with safe_open(str(model_file), "np") as reference:
        assert sorted(infos) == sorted(reference.keys())
        for name in reference.keys():
            expected = reference.get_tensor(name)
            info = infos[name]
            assert info.shape == expected.shape
            assert info.nbytes == expected.nbytes
            assert info.tiers == [] and info.clean and info.pins == 0
            array = model.numpy(name)
            assert array.dtype == expected.dtype
            assert array.shape == expected.shape
            assert np.array_equal(array, expected)
    assert infos["a.f32"].dtype == "F32" and infos["e.bool"].dtype == "BOOL"


def test_numpy_view_is_zero_copy_and_pins_until_the_last_array_dies(store, model_file):
    model = store.open_model(model_file)
    lease = model.lease("a.f32")
    array = np.from_dlpack(lease)
    assert array.ctypes.data == lease.data_ptr
    assert array.flags.writeable
    again = model.numpy("a.f32")
    assert again.ctypes.data == lease.data_ptr  # the same RAM copy, not a second one
    assert pins(model, "a.f32") == 2  # one per lease: this one and numpy()'s
    del lease
    gc.collect()
    assert pins(model, "a.f32") == 2  # the arrays keep their leases' pins
    del array
    assert pins(model, "a.f32") == 1
    view = again[2:4]
    del again
    assert pins(model, "a.f32") == 1  # a slice keeps it too
    del view
    assert pins(model, "a.f32") == 0
    assert "ram" in model.info("a.f32").tiers


def test_lease_context_manager_and_buffer_protocol(store, model_file):
    model = store.open_model(model_file)
    with model.lease("d.u8") as lease:
        assert lease.nbytes == 100 and lease.dtype == "U8" and lease.shape == (100,)
        assert pins(model, "d.u8") == 1
        dlpack = np.from_dlpack(lease)
    assert lease.closed
    assert pins(model, "d.u8") == 1  # the array made inside the block
    del dlpack
    assert pins(model, "d.u8") == 0
    with pytest.raises(ValueError):
        np.from_dlpack(lease)

    lease = model.lease("d.u8")
    buffered = np.frombuffer(lease, dtype=np.uint8)  # keeps the lease object, not the buffer
    assert buffered.ctypes.data == lease.data_ptr
    lease.close()
    assert pins(model, "d.u8") == 1  # a buffer was exported: pinned while the object lives
    del lease
    assert pins(model, "d.u8") == 1
    del buffered
    gc.collect()
    assert pins(model, "d.u8") == 0


def test_bf16_and_float8_come_as_their_bits(store, tmp_path: Path):
    torch_bits = {
        "bf16": (np.arange(12, dtype=np.uint16).reshape(3, 4), "BF16"),
        "f8": (np.arange(10, dtype=np.uint8), "F8_E4M3"),
    }
    # Written by hand: NumPy's safetensors writer has no BF16 or float8.
    import json
    import struct

    header, data, offset = {}, b"", 0
    for name, (bits, dtype) in torch_bits.items():
        raw = bits.tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(bits.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        data += raw
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "bits.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    model = store.open_model(path)
    assert model.info("bf16").dtype == "BF16"
    for name, (bits, _) in torch_bits.items():
        array = model.numpy(name)
        assert array.dtype == bits.dtype
        assert np.array_equal(array, bits)


def test_replace_revert_derive_spill(store, model_file):
    model = store.open_model(model_file)
    original = model.numpy("a.f32").copy()
    gc.collect()
    model.replace("a.f32", original * 2)
    info = model.info("a.f32")
    assert not info.clean and info.tiers == ["ram"]
    assert np.array_equal(model.numpy("a.f32"), original * 2)
    gc.collect()
    assert model.spill("a.f32") == original.nbytes
    assert model.info("a.f32").tiers == ["spilled"]
    assert np.array_equal(model.numpy("a.f32"), original * 2)  # restored from the spill file
    gc.collect()
    assert model.revert("a.f32") > 0
    assert model.info("a.f32").clean
    assert np.array_equal(model.numpy("a.f32"), original)
    gc.collect()

    derived = store.derive(model, "a.half", original.astype(np.float16))
    assert derived.dtype == "F16" and derived.shape == (16, 32) and not derived.clean
    assert np.array_equal(model.numpy("a.half"), original.astype(np.float16))
    model.derive("raw", bytes(range(8)), dtype="U8", shape=[2, 4])
    assert model.numpy("raw").tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]

    with pytest.raises(lowtide.DuplicateName) as err:
        model.derive("raw", bytes(8), dtype="U8", shape=[8])
    assert err.value.name == "raw" and not err.value.retryable
    with pytest.raises(lowtide.ByteLength) as err:
        model.replace("d.u8", np.zeros(3, dtype=np.uint8))
    assert (err.value.expected, err.value.actual) == (100, 3)
    with pytest.raises(TypeError):
        model.replace("d.u8", np.zeros(25, dtype=np.float32))
    with pytest.raises(lowtide.NotFromFile):
        model.revert("raw")


def test_pinned_replace_and_mark_dirty(store, model_file):
    model = store.open_model(model_file)
    lease = model.lease("c.i64")
    array = np.from_dlpack(lease)
    array += 100  # a write through the view: the RAM copy only
    with pytest.raises(lowtide.Pinned) as err:
        model.replace("c.i64", np.zeros((2, 3, 4), dtype=np.int64))
    assert err.value.retryable and err.value.pins == 1
    lease.mark_dirty()  # kept, no copy: the array stays alive and shares the copy
    assert not lease.closed
    assert array.ctypes.data == np.from_dlpack(lease).ctypes.data
    del array
    lease.close()
    gc.collect()
    info = model.info("c.i64")
    assert not info.clean and info.pins == 0
    store.free_memory("1GiB")  # a dirty copy is spilled, never dropped
    expected = np.arange(24, dtype=np.int64).reshape(2, 3, 4) + 100
    assert np.array_equal(model.numpy("c.i64"), expected)


def test_writes_without_mark_dirty_are_lost_on_release(store, model_file):
    model = store.open_model(model_file)
    array = model.numpy("c.i64")
    array += 100  # a write through the view, not marked
    del array
    gc.collect()
    store.free_memory("1GiB")  # the copy is clean: dropped, nothing written
    assert np.array_equal(model.numpy("c.i64"), np.arange(24, dtype=np.int64).reshape(2, 3, 4))
    with pytest.raises(lowtide.NotInRam):
        gc.collect()
        store.free_memory("1GiB")
        model.mark_dirty("c.i64")


def test_errors_are_exceptions_with_fields(tmp_path: Path, model_file):
    with lowtide.Store(ram_budget=3000, spill_dir=tmp_path) as store:
        model = store.open_model(model_file)
        with pytest.raises(lowtide.NoSuchTensor) as err:
            model.lease("nope")
        assert isinstance(err.value, KeyError) and err.value.name == "nope"
        held = model.numpy("a.f32")  # 2 KiB of the 3000-byte budget, pinned
        with pytest.raises(lowtide.OverBudget) as err:
            model.derive("big", bytes(2048), dtype="U8", shape=[2048])
        del held
        assert isinstance(err.value, MemoryError) and isinstance(err.value, lowtide.LowtideError)
        assert err.value.retryable and err.value.budget == 3000
        assert err.value.requested > err.value.available
        assert "budget" in str(err.value)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with lowtide.Store(ram_budget="1MiB") as store:
        with pytest.raises(lowtide.MalformedModel) as err:
            store.open_model(bad)
        assert isinstance(err.value, ValueError) and err.value.path == str(bad)
        with pytest.raises(lowtide.SourceIoError):
            store.open_model(tmp_path / "missing.safetensors")


def test_truncated_file_under_a_view_is_an_error_not_a_crash(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    save_file({"w": np.ones((256, 256), dtype=np.float32)}, str(path))
    with lowtide.Store(ram_budget="16MiB", spill_dir=tmp_path) as store:
        model = store.open_model(path)
        array = model.numpy("w")
        os.truncate(path, 100)
        assert array.sum() == 256 * 256  # the RAM copy is the store's own memory
        del array
        store.release(model)
        with pytest.raises(lowtide.SourceChanged) as err:
            model.numpy("w")
        assert err.value.path == str(path) and not err.value.retryable


def test_store_calls(store, model_file):
    model = store.open_model(model_file)
    assert len(model) == 6 and "a.f32" in model and "zz" not in model
    assert model.names() == sorted(model.names())
    handle = store.prefetch(model)
    outcome = handle.wait()
    assert outcome["tensors"] == 6 and not outcome["cancelled"] and handle.done
    assert all("ram" in t.tiers for t in model.tensors())
    stats = store.stats()
    assert stats["anon_bytes"] > 0 and "bytes_read_source" in stats
    released = store.release(model)
    assert released["ram_bytes"] > 0
    store.wait_released()
    assert store.stats()["release_pending_bytes"] == 0
    freed = store.free_memory(0)
    assert freed["freed_bytes"] == 0
    store.close()
    assert store.closed
    with pytest.raises(ValueError):
        model.tensors()


def test_threads_load_view_and_release_under_a_tight_budget(tmp_path: Path):
    rng = np.random.default_rng(1)
    models = {}
    for m in ("one", "two"):
        tensors = {f"{m}.{i}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(8)}
        path = tmp_path / f"{m}.safetensors"
        save_file(tensors, str(path))
        models[m] = (path, tensors)
    # Room for 6 of the 16 tensors of 16 KiB each.
    with lowtide.Store(ram_budget=6 * 64 * 64 * 4, spill_dir=tmp_path) as store:
        opened = {m: store.open_model(path) for m, (path, _) in models.items()}
        errors: list[BaseException] = []
        checked = [0]
        lock = threading.Lock()

        def work(seed: int) -> None:
            local = np.random.default_rng(seed)
            try:
                for _ in range(150):
                    m = ("one", "two")[local.integers(2)]
                    name = f"{m}.{local.integers(8)}"
                    try:
                        array = opened[m].numpy(name)
                    except lowtide.OverBudget:
                        continue  # the other threads pin the room; retryable
                    assert np.array_equal(array, models[m][1][name])
                    del array
                    with lock:
                        checked[0] += 1
                    if local.integers(10) == 0:
                        store.release(opened[m])
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert checked[0] > 300
        assert store.stats()["anon_peak_bytes"] <= store.ram_budget
        for model in opened.values():
            assert all(t.pins == 0 for t in model.tensors())


def test_a_long_read_lets_other_threads_run(tmp_path: Path):
    """The GIL is released during a read: another Python thread runs while it goes on. With a
    1 ms switch interval, a call that held the GIL would let another thread run at most about
    1 ms after the call began and never after; here the other thread must run more than 10 ms
    into a read. (The window is most of the read, not a slice of it, so that a thread the OS
    keeps off both CPUs for a few ms does not make the test fail.)"""
    tensor = np.random.default_rng(2).integers(0, 255, size=96 << 20, dtype=np.uint8)
    path = tmp_path / "big.safetensors"
    save_file({"big": tensor}, str(path))
    inside = long = 0
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    try:
        with lowtide.Store(ram_budget="512MiB", spill_dir=tmp_path) as store:
            model = store.open_model(path)
            for _ in range(5):
                make_cold(path)
                ticks: list[float] = []
                stop = threading.Event()

                def count(ticks: list[float], stop: threading.Event) -> None:
                    while not stop.is_set():
                        ticks.append(time.perf_counter())

                ticker = threading.Thread(target=count, args=(ticks, stop))
                ticker.start()
                time.sleep(0.01)
                began = time.perf_counter()
                lease = model.lease("big")
                ended = time.perf_counter()
                stop.set()
                ticker.join()
                assert np.array_equal(np.from_dlpack(lease), tensor)
                lease.close()
                store.release(model)
                if ended - began > 0.03:
                    long += 1
                    inside += any(began + 0.01 < t < ended for t in ticks)
    finally:
        sys.setswitchinterval(interval)
    if long < 3:
        pytest.skip(f"only {long} of 5 cold reads took over 30 ms: too quick to tell")
    assert inside >= long - 1, f"another thread ran inside {inside} of {long} long reads"

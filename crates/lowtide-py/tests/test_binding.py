"""The binding's own contracts: waiting from threads, closing models, dtypes handed in, OS
errors, the typed dicts, the reserve's range and the closed store's error."""

from __future__ import annotations

import errno
import gc
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import torch_or_skip
from safetensors.numpy import save_file

import lowtide


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- Prefetch.wait from several threads ------------------------------------------------------


def test_prefetch_wait_from_every_thread_returns_the_real_outcome(tmp_path: Path):
    # Many small tensors: the prefetch takes a while (its cost is per tensor).
    count = 10_000
    path = tmp_path / "many.safetensors"
    save_file({f"t{i:05d}": np.full(256, i, dtype=np.float32) for i in range(count)}, str(path))
    with lowtide.Store(ram_budget="256MiB", spill_dir=tmp_path) as store:
        model = store.open_model(path)
        prefetch = model.prefetch()
        barrier = threading.Barrier(5)
        outcomes: list[dict[str, int | bool]] = []

        def wait() -> None:
            barrier.wait()
            outcomes.append(prefetch.wait())

        threads = [threading.Thread(target=wait) for _ in range(4)]
        for thread in threads:
            thread.start()
        barrier.wait()
        # `done` may only say True once the prefetch has finished: every tensor in RAM.
        while any(thread.is_alive() for thread in threads):
            if prefetch.done:
                assert all(info.in_ram for info in model.tensors())
                break
        for thread in threads:
            thread.join()
        assert prefetch.done
        expected = {"tensors": count, "bytes": count * 1024, "skipped_bytes": 0}
        assert len(outcomes) == 4
        for outcome in [*outcomes, prefetch.wait()]:
            assert {key: outcome[key] for key in expected} == expected
            assert outcome["cancelled"] is False


def test_a_prefetch_error_reaches_every_waiter(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    save_file({"w": np.ones((256, 256), dtype=np.float32)}, str(path))
    with lowtide.Store(ram_budget="16MiB", spill_dir=tmp_path) as store:
        model = store.open_model(path)
        os.truncate(path, 100)
        prefetch = model.prefetch()
        errors: list[BaseException] = []

        def wait() -> None:
            try:
                prefetch.wait()
            except lowtide.LowtideError as err:
                errors.append(err)

        threads = [threading.Thread(target=wait) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with pytest.raises(lowtide.SourceChanged):
            prefetch.wait()
        assert len(errors) == 3 and all(isinstance(e, lowtide.SourceChanged) for e in errors)
        assert prefetch.done


# --- Closing models --------------------------------------------------------------------------


def test_closing_models_closes_their_files(tmp_path: Path, model_file: Path):
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        # One round of each first: whatever the store opens once (the spill file) is open.
        store.open_model(model_file).close()
        before = open_fds()
        for _ in range(120):
            model = store.open_model(model_file)
            assert model.numpy("c.i64")[1, 2, 3] == 23
            model.close()
        for _ in range(120):
            with store.open_model(model_file) as model:
                model.numpy("d.u8")
            assert model.closed
        for _ in range(120):
            # The loop: open, release, drop the last reference.
            model = store.open_model(model_file)
            store.release(model)
            del model
        gc.collect()
        assert open_fds() <= before + 2


def test_a_closed_model_says_so_and_closing_twice_is_a_no_op(store, model_file: Path):
    model = store.open_model(model_file)
    model.close()
    model.close()
    assert model.closed and "closed" in repr(model)
    for call in (model.names, lambda: model.numpy("a.f32"), lambda: "a.f32" in model):
        with pytest.raises(lowtide.UnknownHandle) as err:
            call()
        assert err.value.path == str(model_file) and str(model_file) in str(err.value)
    # Its path is free to open again.
    again = store.open_model(model_file)
    assert len(again) == 6


def test_closing_a_pinned_model_raises_pinned_and_keeps_it(store, model_file: Path):
    model = store.open_model(model_file)
    array = model.numpy("a.f32")
    with pytest.raises(lowtide.Pinned) as err:
        model.close()
    assert str(model_file) in str(err.value) and err.value.name == "a.f32"
    assert not model.closed and model.info("a.f32").pins == 1
    assert array.sum() == pytest.approx(model.numpy("a.f32").sum())
    del array
    model.close()
    assert model.closed


def test_a_with_block_closes_the_model(store, model_file: Path):
    with store.open_model(model_file) as model:
        copy = model.numpy("a.f32").copy()
    assert model.closed and copy.shape == (16, 32)
    # A view still alive at the end of the block: Pinned, the model stays open.
    with pytest.raises(lowtide.Pinned), store.open_model(model_file) as model:
        view = model.numpy("a.f32")
    assert not model.closed
    del view
    # An exception leaving the block is not replaced by Pinned.
    with pytest.raises(RuntimeError), store.open_model(model_file) as other:
        view = other.numpy("a.f32")
        raise RuntimeError
    del view
    other.close()
    model.close()


def test_a_freed_model_with_pinned_tensors_stays_usable(store, model_file: Path):
    array = store.open_model(model_file).numpy("c.i64")  # the model object is freed at once
    gc.collect()
    assert array[1, 2, 3] == 23 and array.flags.writeable
    del array


def test_closing_the_store_first(tmp_path: Path, model_file: Path):
    store = lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path)
    model = store.open_model(model_file)
    store.close()
    assert model.closed
    model.close()  # a no-op: the store closed it
    with pytest.raises(lowtide.StoreClosed):
        model.names()


# --- Data handed in --------------------------------------------------------------------------


def test_big_endian_arrays_are_stored_as_their_values(store, model_file: Path):
    model = store.open_model(model_file)
    ramp = np.arange(16 * 32, dtype=">f4").reshape(16, 32)
    model.replace("a.f32", ramp)
    assert np.array_equal(model.numpy("a.f32"), ramp)
    info = model.derive("ramp.i64", np.arange(5, dtype=">i8"))
    assert info.dtype == "I64"
    assert model.numpy("ramp.i64").tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "data",
    [
        np.zeros(12, dtype=np.complex128),  # 192 bytes: the length of c.i64
        np.zeros(24, dtype="datetime64[ns]"),
        np.zeros(24, dtype=np.dtype([("x", "<i8")])),
    ],
    ids=["complex128", "datetime64", "structured"],
)
def test_dtypes_without_a_safetensors_name_are_refused(store, model_file: Path, data):
    model = store.open_model(model_file)
    assert data.nbytes == model.info("c.i64").nbytes
    with pytest.raises(lowtide.UnsupportedDtype) as err:
        model.replace("c.i64", data)
    assert isinstance(err.value, TypeError) and err.value.dtype == str(data.dtype)
    assert model.info("c.i64").clean  # unchanged
    with pytest.raises(lowtide.UnsupportedDtype):
        model.derive("new", data)
    assert "new" not in model
    # Raw bytes stay raw bytes.
    model.replace("c.i64", memoryview(data.view(np.uint8)))
    assert not model.info("c.i64").clean


def test_torch_dtypes_without_a_safetensors_name_are_refused(store, model_file: Path):
    torch = torch_or_skip()
    model = store.open_model(model_file)
    with pytest.raises(lowtide.UnsupportedDtype):
        model.replace("c.i64", torch.zeros(12, dtype=torch.complex128))
    assert model.info("c.i64").clean


# --- OS errors -------------------------------------------------------------------------------


def test_a_missing_file_is_a_file_not_found_error(store, tmp_path: Path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError) as caught:
        store.open_model(missing)
    err = caught.value
    assert isinstance(err, lowtide.SourceIoError) and isinstance(err, lowtide.LowtideError)
    assert err.errno == errno.ENOENT and err.strerror == os.strerror(errno.ENOENT)
    assert err.filename == str(missing) and err.path == str(missing) and err.op == "open"
    assert str(missing) in str(err) and "cannot open" in str(err)
    try:
        store.open_model(missing)
    except OSError as other:
        assert other.errno == errno.ENOENT
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, FileNotFoundError) and isinstance(again, lowtide.SourceIoError)
    assert again.errno == errno.ENOENT and again.filename == str(missing)
    assert str(again) == str(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_denied_file_is_a_permission_error(store, model_file: Path):
    model_file.chmod(0)
    with pytest.raises(PermissionError) as err:
        store.open_model(model_file)
    assert isinstance(err.value, lowtide.SourceIoError) and err.value.errno == errno.EACCES


# --- The dicts the store returns -------------------------------------------------------------


def test_returned_dicts_have_the_documented_keys(store, model_file: Path):
    model = store.open_model(model_file)
    documented = {
        "stats": (store.stats(), lowtide.StoreStats),
        "free_memory": (store.free_memory("1MiB"), lowtide.FreeOutcome),
        "relieve_reserve": (store.relieve_reserve(), lowtide.FreeOutcome),
        "release": (store.release(model), lowtide.ReleaseOutcome),
        "memory": (store.memory(), lowtide.MemoryReading),
        "prefetch": (model.prefetch().wait(), lowtide.PrefetchOutcome),
    }
    for call, (returned, typed) in documented.items():
        assert set(returned) == set(typed.__annotations__), call
    assert isinstance(store.stats()["evict_seconds"], float)


# --- The reserve's range ---------------------------------------------------------------------


@pytest.mark.parametrize("reserve", [2**64 - 1, 2**64 - 4096])
def test_a_reserve_near_two_to_the_64_refuses_every_copy(tmp_path, model_file, reserve):
    with lowtide.Store(
        ram_budget="64MiB", reserve_ram=reserve, spill_dir=tmp_path, pressure=False
    ) as store:
        assert store.reserve_ram == reserve
        model = store.open_model(model_file)
        with pytest.raises(lowtide.UnderReserve) as err:
            model.numpy("a.f32")
        assert err.value.reserve == reserve
        store.reserve_ram = 0
        model.numpy("a.f32")
        store.reserve_ram = reserve
        with pytest.raises(lowtide.UnderReserve):
            model.numpy("b.f16")


# --- A closed store --------------------------------------------------------------------------


def test_a_closed_store_raises_store_closed(tmp_path: Path, model_file: Path):
    store = lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path)
    model = store.open_model(model_file)
    store.close()
    store.close()
    for call in (store.stats, lambda: store.open_model(model_file), model.tensors):
        with pytest.raises(lowtide.StoreClosed) as err:
            call()
        # Callers that caught ValueError before still do.
        assert isinstance(err.value, ValueError) and isinstance(err.value, lowtide.LowtideError)
        assert str(err.value) == "the store is closed"

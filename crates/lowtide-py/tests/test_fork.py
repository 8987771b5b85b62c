"""A store opened before a fork: a child never changes what the parent reads, spills, frees or
waits for. Children made by ``os.fork``, by ``multiprocessing`` with the ``fork`` start method
and by a PyTorch ``DataLoader`` find the inherited store raising :class:`lowtide.Forked`, read
the model through a store of their own, and exit without hanging; meanwhile the parent's
threads read uncached tensors and spill patched ones, comparing every byte with the file."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import torch_or_skip
from safetensors.numpy import save_file

import lowtide
from lowtide.bench import make_cold

# How long a child may run before it counts as hung.
CHILD_TIMEOUT = 60.0


@pytest.fixture
def tensors() -> dict[str, np.ndarray]:
    """About 1 MiB each, of odd lengths (tensors start and end off block boundaries)."""
    rng = np.random.default_rng(11)
    return {
        f"blocks.{i}.w": rng.integers(0, 255, size=(1 << 20) + 4099 * i, dtype=np.uint8)
        for i in range(8)
    }


@pytest.fixture
def model_path(tmp_path: Path, tensors: dict[str, np.ndarray]) -> Path:
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    return path


def patched(data: np.ndarray, round_: int) -> np.ndarray:
    """A patched tensor's bytes: every bit flipped, then ``round_`` added."""
    return (~data + np.uint8(round_ % 256)).astype(np.uint8)


@contextlib.contextmanager
def parent_at_work(
    model: lowtide.Model, path: Path, tensors: dict[str, np.ndarray]
) -> Iterator[dict[str, int]]:
    """While the block runs, one thread reads the second half of the tensors with nothing
    cached (direct reads) and another patches, spills and reads back the first half (spill
    writes, hole punches and reads); both compare every byte. Yields the bytes compared so
    far; raises what either thread found when the block ends."""
    names = sorted(tensors)
    dirty, cold = names[: len(names) // 2], names[len(names) // 2 :]
    stop = threading.Event()
    errors: list[BaseException] = []
    checked = {"reads": 0, "spills": 0}

    def reads() -> None:
        while not stop.is_set():
            make_cold(path)
            for name in cold:
                array = model.numpy(name)
                assert np.array_equal(array, tensors[name]), f"{name}: a cold read differs"
                checked["reads"] += array.nbytes
                del array
            model.release()

    def spills() -> None:
        round_ = 0
        while not stop.is_set():
            round_ += 1
            for name in dirty:
                data = patched(tensors[name], round_)
                model.replace(name, data)
                model.spill(name)
                array = model.numpy(name)
                assert np.array_equal(array, data), f"{name}: the spill file gave other bytes"
                checked["spills"] += array.nbytes
                del array
                model.spill(name)

    def run(work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(work,)) for work in (reads, spills)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # at work before the first fork, with extents in the spill file
    try:
        yield checked
    finally:
        stop.set()
        for thread in threads:
            thread.join(CHILD_TIMEOUT)
        assert not any(t.is_alive() for t in threads), "the parent's threads hung"
    if errors:
        raise errors[0]
    assert checked["reads"] > 0
    assert checked["spills"] > 0
    for name in dirty:
        model.revert(name)


def check_refused(model: lowtide.Model, parent: int, names: list[str]) -> None:
    """In a forked child: every use of the inherited store raises `Forked`."""
    with pytest.raises(lowtide.Forked) as raised:
        model.numpy(names[-1])
    err = raised.value
    assert (err.owner_pid, err.pid) == (parent, os.getpid())
    assert str(err) == (
        f"this store was opened in process {parent}; a forked child (process {os.getpid()}) "
        "cannot use it: open a new Store in the child"
    )
    assert not err.retryable
    for use in (model.revert, model.spill, model.lease):
        with pytest.raises(lowtide.Forked):
            use(names[0])


def read_own(path: Path, spill_dir: Path, tensors: dict[str, np.ndarray]) -> None:
    """In a forked child: a store of its own reads every tensor from the file and spills."""
    with lowtide.Store(ram_budget="64MiB", spill_dir=spill_dir) as own:
        model = own.open_model(path)
        for _ in range(3):
            make_cold(path)
            for name, data in tensors.items():
                assert np.array_equal(model.numpy(name), data), f"{name}: the child's own read"
            model.release()
        name = sorted(tensors)[0]
        data = patched(tensors[name], 7)
        model.replace(name, data)
        model.spill(name)
        assert np.array_equal(model.numpy(name), data), "the child's own spill file"
        model.revert(name)


def fork(report: Path, body: Callable[[], None]) -> int:
    """Forks; the child runs `body` and exits: 0 when it returns, else 1 after writing what
    it raised to `report`."""
    with warnings.catch_warnings():
        # Python 3.12 warns when a process with threads forks: that is the case tested here.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        body()
        code = 0
    except BaseException as err:
        report.write_text(f"{type(err).__name__}: {err}")
    finally:
        os._exit(code)


def wait_ok(pid: int, report: Path) -> None:
    """Waits for a child to exit with 0; one still running after the timeout hung, and is
    killed."""
    deadline = time.monotonic() + CHILD_TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            said = report.read_text() if report.exists() else ""
            assert os.waitstatus_to_exitcode(status) == 0, f"child {pid}: {said}"
            return
        time.sleep(0.005)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail(f"child {pid} still ran after {CHILD_TIMEOUT} s: it hung (killed)")


def test_forked_children_never_change_what_the_parent_reads(
    tmp_path: Path, model_path: Path, tensors: dict[str, np.ndarray]
):
    names = sorted(tensors)
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    parent = os.getpid()
    store = lowtide.Store(ram_budget="128MiB", spill_dir=spill_dir)
    model = store.open_model(model_path)
    # A second store with a reserve (its monitor thread runs) and its releaser thread
    # started (a released copy of 1 MiB or more): a child frees it, and must not wait for
    # threads it does not have.
    reserved = lowtide.Store(ram_budget="64MiB", reserve_ram=1, spill_dir=spill_dir)
    reserved_model = reserved.open_model(model_path)
    for name in names:
        reserved_model.lease(name).close()
    reserved.release(reserved_model)
    with parent_at_work(model, model_path, tensors):
        for i in range(8):
            report = tmp_path / f"child-{i}.txt"

            def child() -> None:
                check_refused(model, parent, names)
                # Nothing of the parent's is released or waited for.
                store.close()
                assert store.closed
                reserved.close()
                read_own(model_path, spill_dir, tensors)

            wait_ok(fork(report, child), report)
    # The parent's stores still work, and close without waiting for a child's threads.
    reserved_model.close()
    reserved.close()
    for name, data in tensors.items():
        assert np.array_equal(model.numpy(name), data)
    store.close()


def _mp_child(
    model: lowtide.Model,
    store: lowtide.Store,
    parent: int,
    path: Path,
    spill_dir: Path,
    tensors: dict[str, np.ndarray],
    results: multiprocessing.Queue,
) -> None:
    """A `multiprocessing` child (fork start method: nothing here is pickled)."""
    try:
        check_refused(model, parent, sorted(tensors))
        store.close()
        read_own(path, spill_dir, tensors)
        results.put((os.getpid(), "ok"))
    except BaseException as err:
        results.put((os.getpid(), f"{type(err).__name__}: {err}"))


def test_multiprocessing_fork_children_use_stores_of_their_own(
    tmp_path: Path, model_path: Path, tensors: dict[str, np.ndarray]
):
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    with lowtide.Store(ram_budget="128MiB", spill_dir=spill_dir) as store:
        model = store.open_model(model_path)
        with parent_at_work(model, model_path, tensors):
            args = (model, store, os.getpid(), model_path, spill_dir, tensors, results)
            children = [ctx.Process(target=_mp_child, args=args) for _ in range(3)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                for child in children:
                    child.start()
            said = dict(results.get(timeout=CHILD_TIMEOUT) for _ in children)
            for child in children:
                child.join(CHILD_TIMEOUT)
                if child.is_alive():
                    child.kill()
                    pytest.fail(f"child {child.pid} hung")
                assert child.exitcode == 0
            assert said == {child.pid: "ok" for child in children}
        for name, data in tensors.items():
            assert np.array_equal(model.numpy(name), data)


def test_dataloader_workers_get_forked_and_read_with_stores_of_their_own(
    tmp_path: Path, model_path: Path, tensors: dict[str, np.ndarray]
):
    torch = torch_or_skip()
    names = sorted(tensors)
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    parent = os.getpid()

    class Tensors(torch.utils.data.Dataset):
        """Item i: tensor i's bytes, read by the worker's own store, and what the inherited
        store said (`owner_pid`, `pid` of its `Forked`)."""

        def __init__(self, model: lowtide.Model, catch: bool) -> None:
            self.inherited = model
            self.catch = catch
            self.own: tuple[int, lowtide.Store, lowtide.Model] | None = None

        def __len__(self) -> int:
            return 3 * len(names)

        def __getitem__(self, i: int):
            name = names[i % len(names)]
            if not self.catch:
                return torch.from_numpy(self.inherited.numpy(name).copy())
            try:
                self.inherited.numpy(name)
                said = (0, 0)
            except lowtide.Forked as err:
                said = (err.owner_pid, err.pid)
            if self.own is None or self.own[0] != os.getpid():
                own = lowtide.Store(ram_budget="64MiB", spill_dir=spill_dir)
                self.own = (os.getpid(), own, own.open_model(model_path))
            data = self.own[2].numpy(name).copy()
            return torch.from_numpy(data), torch.tensor([*said, os.getpid()])

    def loader(dataset: Tensors):
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=2, multiprocessing_context="fork"
        )

    with lowtide.Store(ram_budget="128MiB", spill_dir=spill_dir) as store:
        model = store.open_model(model_path)
        with parent_at_work(model, model_path, tensors), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            workers = set()
            for i, (data, said) in enumerate(loader(Tensors(model, catch=True))):
                name = names[i % len(names)]
                assert np.array_equal(data.numpy(), tensors[name]), name
                owner_pid, pid, worker = said.tolist()
                assert (owner_pid, pid) == (parent, worker)
                assert worker != parent
                workers.add(worker)
            assert len(workers) == 2
            # A dataset that uses the inherited store: the worker's error reaches the parent
            # as `Forked`.
            with pytest.raises(lowtide.Forked, match="a forked child"):
                for _ in loader(Tensors(model, catch=False)):
                    pass
        for name, data in tensors.items():
            assert np.array_equal(model.numpy(name), data)

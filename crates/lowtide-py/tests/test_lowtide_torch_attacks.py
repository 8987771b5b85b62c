"""``lowtide.torch`` attacked: concurrent forwards with a short switch interval, errors while
weights come in, a storm of real SIGINTs, LoRA and binding inputs that must be refused, and
file descriptors over many patch cycles. Skipped without torch (failing instead in CI)."""

from __future__ import annotations

import gc
import math
import os
import signal
import sys
import threading
import time

import pytest
from conftest import import_or_skip, torch_or_skip

import lowtide

torch = torch_or_skip()
from test_lowtide_torch import _input, _lora, _meta_net, saved_net  # noqa: E402

import lowtide.torch as lt  # noqa: E402


@pytest.fixture
def reference(tmp_path):
    return saved_net(tmp_path)


def _total(net) -> int:
    return sum(t.numel() * t.element_size() for t in net.state_dict().values())


def _inputs(count: int) -> list:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(2, 3, 6, 6, generator=gen) for _ in range(count)]


@pytest.fixture
def short_switches():
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def test_concurrent_forwards_compute_exactly(reference, tmp_path, short_switches):
    net, path = reference
    inputs = _inputs(4)
    with torch.no_grad():
        expected = [net(x) for x in inputs]
    total = _total(net)
    with lowtide.Store(ram_budget=total // 2, spill_dir=tmp_path) as store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        managed.load("cpu", budget=total // 8)  # most weights stream in and out
        wrong: list[str] = []
        errors: list[BaseException] = []

        def run(index: int) -> None:
            try:
                for round_ in range(15):
                    with torch.no_grad():
                        out = module(inputs[index])
                    if not torch.equal(out, expected[index]):
                        wrong.append(f"thread {index} round {round_}")
            except BaseException as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert not wrong, wrong
        assert managed.in_use == []
        assert managed.loaded_bytes <= total // 8  # streamed weights all let go


def test_an_error_while_weights_come_in_is_undone_once(reference, tmp_path):
    net, path = reference
    largest = max(t.numel() * t.element_size() for t in net.state_dict().values())
    with lowtide.Store(ram_budget=largest // 2, spill_dir=tmp_path) as store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        for _ in range(3):
            with torch.no_grad(), pytest.raises(lowtide.OverBudget):
                module(_input())  # the first block's feed-forward does not fit
            assert managed.in_use == []
            assert managed.loaded_bytes == 0
        gc.collect()
        assert all(t.pins == 0 for t in managed._models[0].tensors())
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(8))
        with torch.no_grad():  # a submodule that fits still runs, exactly
            assert torch.equal(module.blocks[0].to_q(x), net.blocks[0].to_q(x))


def test_a_sigint_storm_leaves_no_weight_pinned(reference, tmp_path):
    net, path = reference
    with torch.no_grad():
        expected = net(_input())
    total = _total(net)
    armed = False

    def interrupt(signum, frame):
        if armed:  # only inside the forward: the test's own lines run undisturbed
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    stop = threading.Event()

    def storm() -> None:
        while not stop.is_set():
            os.kill(os.getpid(), signal.SIGINT)  # a real signal to this process
            time.sleep(0.0005)

    try:
        with lowtide.Store(ram_budget=total // 2, spill_dir=tmp_path) as store:
            module = _meta_net()
            managed = lt.manage(module, store, path)
            resident = managed.load("cpu", budget=total // 8)
            interrupted = completed = 0
            sender = threading.Thread(target=storm)
            sender.start()
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline or interrupted < 20:
                try:
                    armed = True
                    with torch.no_grad():
                        module(_input())
                    armed = False
                    completed += 1
                except KeyboardInterrupt:
                    armed = False
                    interrupted += 1
            stop.set()
            sender.join()
            assert interrupted >= 20
            assert managed.in_use == []
            assert managed.loaded_bytes == resident  # every streamed weight let go
            with torch.no_grad():
                assert torch.equal(module(_input()), expected)
            managed.unload()
            gc.collect()
            assert [t.name for t in managed._models[0].tensors() if t.pins] == []
    finally:
        stop.set()
        signal.signal(signal.SIGINT, previous)


def test_calls_that_change_weights_are_refused_while_a_forward_runs(reference, tmp_path):
    _, path = reference
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        managed.load("cpu")
        seen: list[BaseException] = []

        def during(sub, args, out):
            for call in (managed.unpatch, managed.close, lambda: managed.load("meta")):
                try:
                    call()
                except lt.ForwardRunning as err:
                    seen.append(err)

        hook = module.blocks[1].register_forward_hook(during)
        with torch.no_grad():
            module(_input())
        hook.remove()
        assert len(seen) == 3 and all(err.retryable for err in seen)
        managed.unpatch()  # between forwards: fine
        managed.close()


def test_bad_lora_inputs_are_refused_before_anything_changes(reference, tmp_path):
    from safetensors.torch import save_file

    net, path = reference
    lora = _lora(net, rank=4, seed=5, naming="kohya")
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        managed.load("cpu")
        for strength in (math.nan, math.inf, -math.inf):
            with pytest.raises(lt.LoraError, match="strength"):
                managed.patch(lora, strength)
        rank0 = dict(lora)
        stem = "lora_unet_blocks_0_to_q"
        rank0[f"{stem}.lora_down.weight"] = torch.zeros(0, 64)
        rank0[f"{stem}.lora_up.weight"] = torch.zeros(64, 0)
        with pytest.raises(lt.LoraError, match="rank 0"):
            managed.patch(rank0)
        bad_alpha = dict(lora)
        bad_alpha[f"{stem}.alpha"] = torch.tensor(math.nan)
        file = tmp_path / "nan-alpha.safetensors"
        save_file(bad_alpha, str(file))
        with pytest.raises(lt.LoraError, match="alpha"):
            managed.patch(file)
        wrong = dict(lora)
        wrong[f"{stem}.lora_up.weight"] = torch.zeros(32, 4)
        with pytest.raises(lt.LoraError, match="does not fit"):
            managed.patch(wrong)
        with pytest.raises(lt.LoraError, match="rank 0"):
            lt.merge_lora(torch.zeros(4, 4), torch.zeros(0, 4), torch.zeros(4, 0), None, 1.0)
        assert all(t.clean for t in managed._models[0].tensors())  # nothing was patched
        state = module.state_dict()
        for name, tensor in net.state_dict().items():
            assert torch.equal(state[name], tensor), name


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_patch_cycles_and_model_churn_keep_file_descriptors_flat(reference, tmp_path):
    from safetensors.torch import save_file

    net, path = reference
    lora_path = tmp_path / "lora.safetensors"
    save_file(_lora(net, rank=2, seed=3, naming="kohya"), str(lora_path))
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        managed.load("cpu")
        managed.patch(lora_path)
        managed.unpatch()
        before = _open_fds()
        for _ in range(300):
            managed.patch(lora_path, 0.5)
            managed.unpatch()
        assert _open_fds() <= before + 2
        for _ in range(300):
            with pytest.raises(lt.BindError):
                lt.manage(_meta_net(), store, path, key_map=lambda n: "nothing." + n)
        assert _open_fds() <= before + 2  # a refused manage() closes what it opened


def test_load_refuses_a_budget_that_leaves_no_room_to_stream(reference, tmp_path):
    net, path = reference
    total = _total(net)
    with lowtide.Store(ram_budget=total // 2, spill_dir=tmp_path) as store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        with pytest.raises(lowtide.ConfigError, match="ram_budget"):
            managed.load("cpu", budget=total // 2)
        assert managed.loaded_bytes == 0
        loaded = managed.load("cpu")  # no budget: the most that leaves room to stream
        assert 0 < loaded < total // 2
        with torch.no_grad():
            assert torch.equal(module(_input()), net(_input()))
        assert managed.loaded_bytes == loaded  # the forward let nothing loaded go


def test_parameters_keep_the_requires_grad_the_module_gave_them(reference, tmp_path):
    net, path = reference
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        module = _meta_net()
        module.head.weight.requires_grad_(False)
        managed = lt.manage(module, store, path)
        managed.load("cpu")
        assert module.conv.weight.requires_grad and module.blocks[0].to_q.weight.requires_grad
        assert not module.head.weight.requires_grad
        # Torch may take another kernel for a weight that requires grad, even under no_grad:
        # the reference is the same module with the same flags.
        net.head.weight.requires_grad_(False)
        x = _input()
        with torch.no_grad():
            assert torch.equal(module(x), net(x))


def test_a_gguf_file_is_refused_by_name(tmp_path):
    gguf = import_or_skip("gguf", "scripts/test installs it")
    import numpy as np

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with torch.device("meta"):
        module = torch.nn.Linear(4, 4, bias=False)
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        with pytest.raises(lt.BindError, match="GGUF"):
            lt.manage(module, store, path)


def test_a_fork_while_another_thread_runs_a_forward_leaves_the_child_usable(reference, tmp_path):
    net, path = reference
    with torch.no_grad():
        expected = net(_input())
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        managed.load("cpu")  # every weight loaded: the child computes from inherited memory
        inside, release = threading.Event(), threading.Event()

        def hold(sub, args):
            with managed._lock:  # as a forward holds it while its weights come in
                inside.set()
                release.wait(30)

        hook = module.blocks[0].register_forward_pre_hook(hold)
        holder = threading.Thread(target=lambda: module(_input()))
        holder.start()
        assert inside.wait(30)  # the other thread is inside a managed forward, its lock held
        hook.remove()
        pid = os.fork()
        if pid == 0:  # the child: only this thread exists here
            code = 1
            try:
                torch.set_num_threads(1)  # OpenMP's pool does not survive fork (as in workers)
                with torch.no_grad():
                    code = 0 if torch.equal(module(_input()), expected) else 2
            finally:
                os._exit(code)
        release.set()
        holder.join()
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert done and os.waitstatus_to_exitcode(status) == 0, "the child hung or differed"
        with torch.no_grad():
            assert torch.equal(module(_input()), expected)

"""``lowtide.torch``: real ``nn.Module``s whose weights lowtide holds. Skipped without torch
(failing instead in CI)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from conftest import read_bytes, torch_or_skip, write_bytes

import lowtide
from lowtide.bench import make_cold

torch = torch_or_skip()
nn = torch.nn
import lowtide.torch as lt  # noqa: E402


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width, bias=False)
        self.to_v = nn.Linear(width, width, bias=False)
        self.proj = nn.Linear(width, width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.proj(attn @ v)
        return x + self.ff(x)


class Net(nn.Module):
    def __init__(self, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.register_buffer("scale", torch.tensor([0.5]))
        self.head = nn.Linear(width, 10)

    def forward(self, image):
        x = self.conv(image).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x * self.scale).mean(1)


def saved_net(tmp_path: Path) -> tuple[nn.Module, Path]:
    """A seeded ``Net`` and the safetensors file of its weights."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = Net().eval()
    path = tmp_path / "net.safetensors"
    save_file(net.state_dict(), str(path))
    return net, path


@pytest.fixture
def reference(tmp_path: Path):
    return saved_net(tmp_path)


def _meta_net() -> nn.Module:
    with lt.init_empty():
        return Net().eval()


def _input():
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_a_module_under_a_tight_budget_runs_identical_forwards(reference, tmp_path):
    net, path = reference
    expected = net(_input())
    total = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    with lowtide.Store(ram_budget=total // 3, spill_dir=tmp_path) as store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        assert managed.total_bytes == total
        assert all(p.device.type == "meta" for p in module.parameters())
        loaded = managed.load("cpu", budget=total // 4)
        assert 0 < loaded <= total // 4
        for _ in range(3):
            with torch.no_grad():
                assert torch.equal(module(_input()), expected)
        assert store.stats()["anon_peak_bytes"] <= store.ram_budget
        assert managed.loaded_bytes == loaded  # streamed weights left after their forward


def test_load_reads_a_cold_module_as_one_stream(reference, tmp_path):
    """``load()`` pins the planned weights in batches read with the next weights' reads in
    flight (``Model.leases``), and the module computes exactly what the ordinary one does."""
    net, path = reference
    expected = net(_input())
    make_cold(path)
    with lowtide.Store(ram_budget="256MiB", spill_dir=tmp_path) as store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        assert managed.load("cpu") == managed.total_bytes
        stats = store.stats()
        if stats["bytes_read_cold"] == 0:
            pytest.skip("the page cache kept the file after POSIX_FADV_DONTNEED")
        if stats["restores_queued"] == 0:
            pytest.skip("no io_uring or no O_DIRECT here: every weight was read alone")
        assert stats["restores_queued"] >= len(list(module.parameters())) - 2, stats
        with torch.no_grad():
            assert torch.equal(module(_input()), expected)


def test_a_forward_streams_a_submodules_weights_through_one_queue(reference, tmp_path):
    """With nothing loaded ahead, each submodule's forward brings its weight and bias in as
    one stream (here with ``keep_streamed_cached=False``: ``O_DIRECT`` every time), and the
    module computes exactly what the ordinary one does."""
    net, path = reference
    expected = net(_input())
    total = path.stat().st_size
    make_cold(path)
    store = lowtide.Store(ram_budget=total // 3, spill_dir=tmp_path, keep_streamed_cached=False)
    with store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        assert managed.load("cpu", budget=0) == 0
        before = store.stats()["restores_queued"]
        for _ in range(2):
            with torch.no_grad():
                assert torch.equal(module(_input()), expected)
        stats = store.stats()
        if stats["bytes_read_cold"] == 0:
            pytest.skip("the page cache kept the file after POSIX_FADV_DONTNEED")
        if stats["restores_queued"] == 0:
            pytest.skip("no io_uring or no O_DIRECT here: every weight was read alone")
        assert stats["restores_queued"] > before, stats
        assert stats["restores_cached"] == 0 and stats["bytes_read_cold_kept"] == 0, stats
        assert stats["anon_peak_bytes"] <= store.ram_budget


def test_streamed_weights_stay_in_the_page_cache_while_memory_is_free(reference, tmp_path):
    """A module larger than its budget streams weights in at every forward: with memory free
    they are read through the page cache once and copied from it afterwards, so the second
    forward reads nothing from the disk."""
    net, path = reference
    expected = net(_input())
    total = path.stat().st_size
    make_cold(path)
    with lowtide.Store(ram_budget=total // 3, spill_dir=tmp_path) as store:
        if store.memory()["available"] < 64 * total + (256 << 20):
            pytest.skip("too little memory available for the page cache to be kept")
        module = _meta_net()
        managed = lt.manage(module, store, path)
        managed.load("cpu", budget=total // 4)
        with torch.no_grad():
            assert torch.equal(module(_input()), expected)
        first = store.stats()
        if first["bytes_read_cold"] < total // 4:
            pytest.skip("the page cache kept the file after POSIX_FADV_DONTNEED")
        assert first["restores_cached"] > 0
        assert first["restores_direct_first"] == first["restores_direct_short"] == 0
        assert first["bytes_read_cold_kept"] == first["bytes_read_cold"]
        before = read_bytes()
        with torch.no_grad():
            assert torch.equal(module(_input()), expected)
        read = read_bytes() - before
        second = store.stats()
        assert second["restores_cached"] > first["restores_cached"]
        assert second["bytes_read_cold"] == first["bytes_read_cold"]  # all copied from the cache
        assert read < 64 * 1024, f"the second forward read {read} bytes from the disk"


def test_cpu_weights_are_lowtides_ram_copies_in_place(reference, tmp_path):
    _, path = reference
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        managed.load("cpu")
        model = managed._models[0]
        weight = module.blocks[0].to_q.weight
        with model.lease("blocks.0.to_q.weight") as lease:
            assert weight.data_ptr() == lease.data_ptr  # no second copy
        assert model.info("blocks.0.to_q.weight").pins >= 1
        del weight
        managed.unload()
        gc.collect()
        assert all(t.pins == 0 and not t.in_ram for t in model.tensors())


def test_unloading_unchanged_weights_writes_nothing(reference, tmp_path):
    net, path = reference
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        managed.load("cpu")
        with torch.no_grad():
            module(_input())
        before = write_bytes()
        freed = managed.unload()
        store.wait_released()
        assert freed == managed.total_bytes
        assert managed.loaded_bytes == 0
        assert store.stats()["bytes_written"] == 0
        assert write_bytes() - before == 0
        with torch.no_grad():  # usable again: the forward brings the weights back
            assert torch.equal(module(_input()), net(_input()))


def _lora(net: nn.Module, rank: int, seed: int, naming: str) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, sub in net.named_modules():
        if isinstance(sub, nn.Linear) and name.startswith("blocks."):
            down = torch.randn(rank, sub.in_features, generator=gen) * 0.1
            up = torch.randn(sub.out_features, rank, generator=gen) * 0.1
            if naming == "kohya":
                stem = "lora_unet_" + name.replace(".", "_")
                tensors[f"{stem}.lora_down.weight"] = down
                tensors[f"{stem}.lora_up.weight"] = up
                tensors[f"{stem}.alpha"] = torch.tensor(float(rank) / 2)
            else:
                tensors[f"unet.{name}.lora_A.weight"] = down
                tensors[f"unet.{name}.lora_B.weight"] = up
    return tensors


def _patched_reference(net: nn.Module, lora: dict, strength: float, naming: str) -> nn.Module:
    import copy

    patched = copy.deepcopy(net)
    for name, sub in patched.named_modules():
        if isinstance(sub, nn.Linear) and name.startswith("blocks."):
            if naming == "kohya":
                stem = "lora_unet_" + name.replace(".", "_")
                down, up = lora[f"{stem}.lora_down.weight"], lora[f"{stem}.lora_up.weight"]
                alpha = float(lora[f"{stem}.alpha"])
            else:
                down, up = lora[f"unet.{name}.lora_A.weight"], lora[f"unet.{name}.lora_B.weight"]
                alpha = None
            with torch.no_grad():
                sub.weight.copy_(lt.merge_lora(sub.weight, down, up, alpha, strength))
    return patched


@pytest.mark.parametrize("naming", ["kohya", "diffusers"])
def test_patch_and_unpatch_round_trip_to_the_files_bytes(reference, tmp_path, naming):
    from safetensors.torch import save_file

    net, path = reference
    lora = _lora(net, rank=4, seed=5, naming=naming)
    lora_path = tmp_path / f"lora-{naming}.safetensors"
    save_file(lora, str(lora_path))
    expected = _patched_reference(net, lora, 0.7, naming)(_input())
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        managed.load("cpu", budget=managed.total_bytes // 2)  # some patched weights unloaded
        report = managed.patch(lora_path, 0.7)
        assert len(report.patched) == 4 * 6 and not report.unmatched
        with torch.no_grad():
            assert torch.equal(module(_input()), expected)
        model = managed._models[0]
        assert not model.info("blocks.0.to_q.weight").clean
        assert managed.unpatch() == 24
        assert all(t.clean for t in model.tensors())
        managed.load("cpu")
        state = {k: v.clone() for k, v in module.state_dict().items()}
        for name, tensor in net.state_dict().items():
            assert torch.equal(state[name], tensor), name
        assert store.stats()["bytes_written"] == 0  # no backup, nothing spilled


def test_a_patched_weight_unloaded_under_the_reserve_is_spilled_and_comes_back(reference, tmp_path):
    from safetensors.torch import save_file

    net, path = reference
    lora = _lora(net, rank=4, seed=9, naming="kohya")
    save_file(lora, str(tmp_path / "lora.safetensors"))
    expected = _patched_reference(net, lora, 1.0, "kohya")(_input())
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        managed.load("cpu")
        managed.patch(tmp_path / "lora.safetensors")
        # Available memory is now always under the reserve: patched weights must go to disk.
        store.reserve_ram = store.memory()["available"] + (1 << 40)
        managed.unload()
        gc.collect()
        model = managed._models[0]
        spilled = [t for t in model.tensors() if not t.clean]
        assert spilled and all(t.tiers == ["spilled"] for t in spilled)
        assert store.stats()["bytes_written"] >= sum(t.nbytes for t in spilled)
        store.reserve_ram = 0
        with torch.no_grad():
            assert torch.equal(module(_input()), expected)  # read back, checksums verified


def test_bad_bindings_are_clear_errors(reference, tmp_path):
    _, path = reference
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        with torch.device("meta"):
            wider = Net(width=32)
        with pytest.raises(lt.BindError, match=r"conv\.weight"):
            lt.manage(wider, store, path)
        with pytest.raises(lt.BindError, match="not in the model files") as err:
            lt.manage(_meta_net(), store, path, key_map=lambda n: "model." + n)
        assert "name.removeprefix('model.')" in str(err.value)  # the way out, named
        with pytest.raises(lt.BindError, match="no weight of the module was bound"):
            lt.manage(_meta_net(), store, path, key_map=lambda n: None)
        with pytest.raises(lt.BindError, match="no weight of the module was bound"):
            lt.manage(_meta_net(), store, path, key_map=lambda n: "x." + n, strict=False)
        managed = lt.manage(_meta_net(), store, path, key_map=lambda n: n)
        with pytest.raises(lt.LoraError, match="no LoRA"):
            managed.patch({"nothing": torch.zeros(1)})


def test_patching_a_module_that_fills_the_budget_makes_room_for_the_lora(reference, tmp_path):
    from safetensors.torch import save_file

    net, path = reference
    lora = _lora(net, rank=4, seed=11, naming="kohya")
    save_file(lora, str(tmp_path / "lora.safetensors"))
    expected = _patched_reference(net, lora, 0.5, "kohya")(_input())
    total = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    with lowtide.Store(ram_budget=total, spill_dir=tmp_path) as store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        assert managed.load("cpu") == total  # every byte of the budget pinned by the module
        managed.patch(tmp_path / "lora.safetensors", 0.5)  # the LoRA's reads need room
        assert managed.loaded_bytes < total  # idle weights were let go for it
        with torch.no_grad():
            assert torch.equal(module(_input()), expected)


def test_a_forward_that_raises_leaves_no_weight_held(reference, tmp_path):
    _, path = reference
    with lowtide.Store(ram_budget="64MiB", spill_dir=tmp_path) as store:
        module = _meta_net()
        managed = lt.manage(module, store, path)
        with torch.no_grad(), pytest.raises(RuntimeError):
            module(torch.zeros(1, 5, 6, 6))  # 5 channels where the conv takes 3
        assert managed.in_use == []
        assert managed.loaded_bytes == 0  # the conv's streamed weight left after the error
        with torch.no_grad():
            module(_input())  # and the module still runs


class _CastLinear(nn.Linear):
    """Casts its weight to the input's dtype per forward, as ComfyUI's manual_cast ops do."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def test_a_weight_set_in_another_dtype_is_held_by_lowtide_and_discarded_by_unpatch(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    ordinary = _CastLinear(32, 16).half()
    path = tmp_path / "cast.safetensors"
    save_file(ordinary.state_dict(), str(path))
    x = torch.randn(4, 32)
    patched = ordinary.weight.float() * 1.5 + 0.25  # a float32 result, as ComfyUI keeps it
    with lowtide.Store(ram_budget="1MiB", spill_dir=tmp_path) as store:
        with lt.init_empty():
            module = _CastLinear(32, 16).half()
        managed = lt.manage(module, store, path)
        managed.load("cpu")
        with managed.hold("weight") as weight:
            assert weight.dtype == torch.float16 and torch.equal(weight, ordinary.weight)
        managed.set_weight("weight", patched)
        assert module.weight.dtype == torch.float32
        with torch.no_grad():
            expected = nn.functional.linear(x, patched, ordinary.bias.float())
            assert torch.equal(module(x), expected)
        model = managed._models[0]
        assert "weight#patched" in model.names()
        assert not model.info("weight#patched").clean
        managed.unload()  # the patched value stays lowtide's (RAM, or spilled): never dropped
        with torch.no_grad():
            assert torch.equal(module(x), expected)
        assert managed.unpatch() == 1
        assert "weight#patched" not in model.names()  # discarded: nothing left behind
        with torch.no_grad():
            assert torch.equal(module(x), ordinary(x))
        assert store.stats()["bytes_written"] == 0
        with pytest.raises(lt.BindError, match="shape"):
            managed.set_weight("weight", torch.zeros(3))


class _ReadsItsChild(nn.Module):
    """Reads its child's weight in its own forward, as ComfyUI's CLIP embeddings do."""

    def __init__(self) -> None:
        super().__init__()
        self.position = nn.Embedding(8, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(x + self.position.weight[: x.shape[0]])


def test_weights_read_outside_their_forward_are_kept_loaded(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(4)
    ordinary = _ReadsItsChild()
    path = tmp_path / "reads.safetensors"
    save_file(ordinary.state_dict(), str(path))
    x = torch.randn(5, 16)
    with lowtide.Store(ram_budget="1MiB", spill_dir=tmp_path) as store:
        with lt.init_empty():
            module = _ReadsItsChild()
        managed = lt.manage(module, store, path)
        managed.load("cpu", budget=0)
        with torch.no_grad(), pytest.raises(RuntimeError, match="meta"):
            module(x)  # nothing brought the position embedding in: loud, never garbage
        managed.keep_loaded(["position.weight"])
        assert managed.load("cpu", budget=0) == 8 * 16 * 4  # loaded first, whatever the budget
        with torch.no_grad():
            assert torch.equal(module(x), ordinary(x))
        assert managed.loaded_bytes == 8 * 16 * 4  # the streamed projection was let go
        managed.unload()
        assert managed.loaded_bytes == 0

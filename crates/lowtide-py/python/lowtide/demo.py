"""``python -m lowtide.demo``: a ComfyUI-shaped session of real PyTorch models under a memory
cap, three ways.

A text encoder, a UNet-like denoiser and a VAE-like decoder (about 3.2 GiB of BF16 weights at
the default scale, seeded safetensors files written once) and two LoRAs for the denoiser. Three
generations switch LoRAs (A, B, A); each runs every model forward on the CPU, as ComfyUI does
there: weights stored in BF16, cast to float32 layer by layer for the compute. Each strategy
runs in a child process under a real memory cgroup whose hard limit (the cap) is below the
models' total size:

- ``classic``: weights loaded into RAM and kept; unloading leaves them in host RAM; LoRA
  backups in RAM (ComfyUI's legacy path);
- ``mmap-offload``: the proposal "Unload to mmap when the CPU mem is low": while available RAM
  is under the reserve, unloading ``torch.save``s each weight to a temporary file and maps it
  back with ``torch.load(..., mmap=True)``; LoRA backups in RAM;
- ``lowtide``: :mod:`lowtide.torch`: unchanged weights dropped and read again from the model
  file, patched ones kept in RAM or spilled, ``unpatch`` without a backup.

The table shows status, wall time, bytes read and written (``/proc/<pid>/io``), the cgroup's
own peak (what the cap limits: ``memory.max_usage_in_bytes`` in v1, ``memory.peak`` in v2) and
its share of the cap, the process's peak RSS (which also counts mapped file pages, such as
torch's libraries, that were cached and charged elsewhere, so it can exceed the cap), and a
digest of the three images: every strategy that finishes gives the same bits (bits that depend
on the CPU's vector instructions: float32 kernels sum in another order with AVX2 than with
AVX-512). The children run with glibc's mmap threshold fixed (``CHILD_ENV``). Usage::

    python -m lowtide.demo [--scale 1.0] [--cap SIZE] [--json] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STRATEGIES = ("classic", "mmap-offload", "lowtide")

# The process itself (Python, torch, activations), outside any weight budget.
OVERHEAD = 640 << 20

# glibc's malloc serves a freed block's size from its heap from then on (its mmap threshold
# rises up to 32 MiB) and keeps freed heap memory: the float32 copy each layer makes of its
# weights for one forward would then stay in the process, about 1 GiB of it at the default
# scale, in every strategy. A fixed threshold gives large blocks back when they are freed.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}


def default_cap(weights: int) -> int:
    """Half the models' total (at least 1 GiB, the process's own share): the largest model
    does not fit beside the process, let alone all of them."""
    return max(weights // 2, 1 << 30)


# --- the session, run in a child ----------------------------------------------------------


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return {"read": int(fields["read_bytes"]), "write": int(fields["write_bytes"])}


def _available(cap: int) -> int:
    """Available memory as the proposal reads it, made container-aware: the smaller of
    MemAvailable and the cap minus this process's resident memory."""
    with open("/proc/meminfo") as f:
        meminfo = dict(line.split(":", 1) for line in f)
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return min(available, max(cap - rss, 0))


class Classic:
    """Weights loaded into RAM and kept; LoRA backups in RAM."""

    def __init__(self, paths: dict[str, Path], sizes: Any, cap: int, work: Path) -> None:
        self.paths, self.sizes, self.cap, self.work = paths, sizes, cap, work
        self.modules: dict[str, Any] = {}
        self.backups: dict[str, Any] = {}

    def load(self, kind: str) -> Any:
        from safetensors.torch import load_file

        from lowtide._demo_models import build

        if kind not in self.modules:
            module = build(kind, self.sizes).to_empty(device="cpu")
            module.load_state_dict(load_file(str(self.paths[kind])))
            module.requires_grad_(False)
            self.modules[kind] = module
        return self.modules[kind]

    def unload(self, kind: str) -> None:
        pass  # kept in host RAM

    def figures(self) -> dict[str, Any]:
        return {}

    def patch(self, kind: str, lora: Path, strength: float) -> None:
        from safetensors.torch import load_file

        pairs = _kohya_pairs(load_file(str(lora)))
        for name, sub in self.modules[kind].named_modules():
            pair = pairs.get(name.replace(".", "_"))
            if pair is None:
                continue
            self.backups.setdefault(f"{kind}:{name}", sub.weight.detach().clone())
            _merge_into(sub.weight, *pair, strength)

    def unpatch(self, kind: str) -> None:
        module = self.modules[kind]
        for key, backup in list(self.backups.items()):
            owner, name = key.split(":", 1)
            if owner == kind:
                module.get_submodule(name).weight.detach().copy_(backup)
                del self.backups[key]


class MmapOffload(Classic):
    """The proposal: while available RAM is under the reserve, unloading writes each weight
    to a temporary file with ``torch.save`` and maps it back with ``torch.load(mmap=True)``."""

    def __init__(self, paths: dict[str, Path], sizes: Any, cap: int, work: Path) -> None:
        super().__init__(paths, sizes, cap, work)
        from lowtide._demo_models import MODELS

        # Enough free RAM to load the next model: the largest one, plus a quarter.
        largest = max(paths[kind].stat().st_size for kind in MODELS)
        self.reserve = largest + largest // 4
        self.count = 0

    def unload(self, kind: str) -> None:
        import torch

        if _available(self.cap) >= self.reserve:
            return
        module = self.modules[kind]
        for sub in module.modules():
            for attr, tensor in list(sub._parameters.items()) + list(sub._buffers.items()):
                if tensor is None or tensor.device.type != "cpu":
                    continue
                self.count += 1
                path = self.work / f"offload-{self.count}.pt"
                torch.save(tensor.detach(), path)
                mapped = torch.load(path, mmap=True, weights_only=True)
                if attr in sub._parameters:
                    sub._parameters[attr] = torch.nn.Parameter(mapped, requires_grad=False)
                else:
                    sub._buffers[attr] = mapped
        gc.collect()

    def figures(self) -> dict[str, Any]:
        return {"offloaded_tensors": self.count}


class Lowtide:
    """``lowtide.torch``: models managed by one Store under a budget and a reserve."""

    def __init__(self, paths: dict[str, Path], sizes: Any, cap: int, work: Path) -> None:
        import lowtide

        self.paths, self.sizes = paths, sizes
        reserve = max(cap // 16, 64 << 20)
        budget = max(cap - OVERHEAD - reserve, 64 << 20)
        self.store = lowtide.Store(ram_budget=budget, reserve_ram=reserve, spill_dir=work)
        self.managed: dict[str, Any] = {}

    def load(self, kind: str) -> Any:
        import lowtide.torch as lt
        from lowtide._demo_models import build

        if kind not in self.managed:
            self.managed[kind] = lt.manage(build(kind, self.sizes), self.store, self.paths[kind])
        self.managed[kind].load("cpu")
        return self.managed[kind].module

    def unload(self, kind: str) -> None:
        # Unchanged copies stay in lowtide's RAM while the budget has room (a reload then
        # reads nothing) and are dropped, never written, when other models need it.
        self.managed[kind].unload(keep_cached=True)

    def patch(self, kind: str, lora: Path, strength: float) -> None:
        self.managed[kind].patch(lora, strength)

    def unpatch(self, kind: str) -> None:
        self.managed[kind].unpatch()

    def figures(self) -> dict[str, Any]:
        stats = self.store.stats()
        return {
            "store": {
                "bytes_read_source": stats["bytes_read_source"],
                "bytes_read_cold": stats["bytes_read_cold"],
                "bytes_written": stats["bytes_written"],
                "bytes_restored_spill": stats["bytes_restored_spill"],
            }
        }


def _kohya_pairs(state: dict[str, Any]) -> dict[str, tuple[Any, Any, float | None]]:
    pairs = {}
    for key in state:
        if key.endswith(".lora_down.weight"):
            stem = key.removesuffix(".lora_down.weight")
            alpha = state.get(f"{stem}.alpha")
            pairs[stem.removeprefix("lora_unet_")] = (
                state[key],
                state[f"{stem}.lora_up.weight"],
                None if alpha is None else float(alpha.float().item()),
            )
    return pairs


def _merge_into(weight: Any, down: Any, up: Any, alpha: float | None, strength: float) -> None:
    import lowtide.torch as lt

    weight.detach().copy_(lt.merge_lora(weight.detach(), down, up, alpha, strength))


def session(
    strategy: str, paths: dict[str, Path], scale: float, cap: int, work: Path
) -> tuple[str, dict[str, Any]]:
    """Three generations (LoRA A, B, A), every model forward; returns the images' digest and
    the strategy's own figures."""
    import torch

    from lowtide._demo_models import COMPUTE, Sizes

    sizes = Sizes.at(scale)
    kinds: dict[str, type[Classic] | type[Lowtide]] = {
        "classic": Classic,
        "mmap-offload": MmapOffload,
        "lowtide": Lowtide,
    }
    runner = kinds[strategy](paths, sizes, cap, work)
    digest = hashlib.sha256()
    loras = [paths["lora0"], paths["lora1"], paths["lora0"]]
    gen = torch.Generator().manual_seed(42)
    with torch.no_grad():
        patched = False
        for number, lora in enumerate(loras):
            tokens = torch.randint(0, sizes.vocab, (1, sizes.tokens), generator=gen)
            encoder = runner.load("text_encoder")
            context = encoder(tokens)
            del encoder
            runner.unload("text_encoder")

            if patched:
                runner.unpatch("denoiser")
            denoiser = runner.load("denoiser")
            runner.patch("denoiser", lora, 0.8)
            patched = True
            latent = torch.randn(1, 4, sizes.latent, sizes.latent, generator=gen).to(COMPUTE)
            for step in (0.9, 0.5):
                latent = latent - 0.2 * denoiser(latent, step, context)
            del denoiser
            runner.unload("denoiser")

            decoder = runner.load("decoder")
            image = decoder(latent)
            del decoder
            runner.unload("decoder")
            digest.update(image.float().numpy().tobytes())
            print(f"generation {number + 1}: done", file=sys.stderr, flush=True)
    return digest.hexdigest()[:16], runner.figures()


def child(args: argparse.Namespace) -> int:
    paths = {key: Path(value) for key, value in json.loads(args.paths).items()}
    work = Path(args.work)
    # Imported before the first reading, so that writing their bytecode caches is not
    # counted as the strategy's writes.
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import lowtide._demo_models
    import lowtide.torch  # noqa: F401

    before = _io()
    began = time.perf_counter()
    output, extra = session(args.child, paths, args.scale, args.cap_bytes, work)
    wall = time.perf_counter() - began
    after = _io()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "output_digest": output,
                "session_s": wall,
                "bytes_read": after["read"] - before["read"],
                "bytes_written": after["write"] - before["write"],
                "peak_rss_bytes": usage.ru_maxrss * 1024,
                **extra,
            }
        ),
        flush=True,
    )
    return 0


# --- cgroups ------------------------------------------------------------------------------


class Cgroup:
    """A memory cgroup with a hard limit, made under this process's own (v1 or v2); removed
    on close."""

    def __init__(self, name: str, cap: int) -> None:
        self.v2, own = _own_memory_cgroup()
        self.dir = own / f"lowtide-demo-{os.getpid()}-{name}"
        self.dir.mkdir()
        try:
            if self.v2:
                (self.dir / "memory.max").write_text(str(cap))
                swap = self.dir / "memory.swap.max"
                if swap.exists():
                    swap.write_text("0")
            else:
                (self.dir / "memory.limit_in_bytes").write_text(str(cap))
                memsw = self.dir / "memory.memsw.limit_in_bytes"
                if memsw.exists():
                    memsw.write_text(str(cap))
        except OSError:
            self.close()
            raise

    def procs(self) -> Path:
        return self.dir / "cgroup.procs"

    def oom_kills(self) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        with contextlib.suppress(OSError):
            for line in (self.dir / name).read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        return 0

    def peak(self) -> int | None:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        with contextlib.suppress(OSError, ValueError):
            return int((self.dir / name).read_text())
        return None

    def close(self) -> None:
        for _ in range(40):
            try:
                self.dir.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)


def _own_memory_cgroup() -> tuple[bool, Path]:
    """(is v2, the directory of this process's memory cgroup)."""
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory")
            return False, base / path.lstrip("/")
    for line in lines:
        if line.startswith("0::"):
            base = Path("/sys/fs/cgroup")
            if "memory" in (base / "cgroup.controllers").read_text().split():
                return True, base / line[3:].lstrip("/")
    raise OSError("no memory cgroup controller is mounted")


def cgroup_problem() -> str | None:
    """Why a capped cgroup cannot be made here, or None when it can."""
    try:
        probe = Cgroup("probe", 1 << 30)
    except OSError as error:
        return f"cannot make a memory cgroup: {error}"
    probe.close()
    return None


# --- the parent ---------------------------------------------------------------------------


def run_strategy(
    strategy: str, paths: dict[str, Path], scale: float, cap: int, work: Path, capped: bool
) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "lowtide.demo",
        "--child",
        strategy,
        "--scale",
        str(scale),
        "--cap-bytes",
        str(cap),
        "--paths",
        json.dumps({k: str(v) for k, v in paths.items()}),
        "--work",
        str(work),
    ]
    group = Cgroup(strategy, cap) if capped else None
    try:

        def enter() -> None:
            if group is not None:
                group.procs().write_text(str(os.getpid()))

        began = time.perf_counter()
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=enter,
            env={**CHILD_ENV, **os.environ},
        )
        out, err = proc.communicate()
        wall = time.perf_counter() - began
        oom = group.oom_kills() if group is not None else 0
        peak_cgroup = group.peak() if group is not None else None
    finally:
        if group is not None:
            group.close()
    run: dict[str, Any] = {"strategy": strategy, "wall_s": round(wall, 2)}
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode == 0 and lines:
        run.update(json.loads(lines[-1]))
        run["status"] = "ok"
    else:
        killed = proc.returncode == -signal.SIGKILL
        run["status"] = "oom-killed" if killed and (oom or group is not None) else "failed"
        run.update(
            {
                "bytes_read": None,
                "bytes_written": None,
                "peak_rss_bytes": None,
                "output_digest": None,
            }
        )
        if run["status"] == "failed":
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            run["error"] = " | ".join(line.encode("ascii", "replace").decode() for line in tail)
    run["cgroup_peak_bytes"] = peak_cgroup
    run["oom_kills"] = oom
    return run


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def print_table(report: dict[str, Any]) -> None:
    cap = report["cap_bytes"]
    capped = report["capped"]
    print(
        f"weights {_gib(report['weights_bytes'])}, cap {_gib(cap)}"
        + ("" if capped else f" (NOT enforced: {report['cgroup_problem']})")
    )
    header = (
        f"{'strategy':<14}{'status':<12}{'wall':>8}{'read':>12}{'written':>12}"
        f"{'cgroup peak (of cap)':>22}{'peak RSS':>11}  digest"
    )
    print(header)
    print("-" * len(header))
    for run in report["runs"]:
        peak = run["cgroup_peak_bytes"]
        share = "" if peak is None else f" ({peak / cap:.0%})"
        print(
            f"{run['strategy']:<14}{run['status']:<12}{run['wall_s']:>7.1f}s"
            f"{_gib(run['bytes_read']):>12}{_gib(run['bytes_written']):>12}"
            f"{_gib(peak) + share:>22}{_gib(run['peak_rss_bytes']):>11}"
            f"  {run['output_digest'] or '-'}"
        )
        if run.get("error"):
            print(f"    {run['error']}")
    if capped:
        print(
            "cgroup peak: the most memory the cgroup was charged (what the cap limits). Peak RSS "
            "also counts mapped file pages (torch's libraries, model files) that were already "
            "cached and charged elsewhere, so it can exceed the cap."
        )
    digests = {r["output_digest"] for r in report["runs"] if r["status"] == "ok"}
    if len(digests) > 1:
        print("OUTPUTS DIFFER between strategies")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lowtide.demo",
        description="A ComfyUI-shaped session of real PyTorch models under a memory cap: "
        "classic, mmap-offload and lowtide, each in a capped child process.",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="model size factor (default 1)")
    parser.add_argument(
        "--cap", help="memory cap (default: half the weights' size, at least 1 GiB)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "lowtide-demo",
        help="where the model files are written once and kept (default: TMPDIR/lowtide-demo)",
    )
    parser.add_argument(
        "--strategy", action="append", choices=STRATEGIES, help="run only these (repeatable)"
    )
    parser.add_argument("--child", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--cap-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    import lowtide
    from lowtide._demo_models import file_bytes, model_files

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        paths = model_files(args.dir, args.scale, log)
    except ValueError as error:
        parser.error(str(error))
    weights = file_bytes(paths)
    try:
        cap = lowtide.parse_size(args.cap) if args.cap else default_cap(weights)
    except ValueError as error:
        parser.error(str(error))
    problem = cgroup_problem()
    if problem is not None:
        log(f"running without a cap: {problem}")
    runs = []
    for strategy in args.strategy or STRATEGIES:
        log(f"{strategy}: running under a {cap / 2**30:.2f} GiB cap")
        with tempfile.TemporaryDirectory(prefix=f"{strategy}-", dir=args.dir) as work:
            runs.append(run_strategy(strategy, paths, args.scale, cap, Path(work), problem is None))
    report = {
        "cap_bytes": cap,
        "weights_bytes": weights,
        "scale": args.scale,
        "capped": problem is None,
        "cgroup_problem": problem,
        "runs": runs,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

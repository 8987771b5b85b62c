"""``python -m lowtide.comfyui.demo``: one real ComfyUI workflow under a memory cap, run by stock
ComfyUI and by ComfyUI with lowtide's loader.

An SD1.5-shaped checkpoint (``--size full``: the real SD1.5 layout, 2.13 GB of fp16; ``tiny``:
451 MB) and a LoRA for its UNet and text encoder are generated once, seeded, into a cache
directory. The workflow is :func:`lowtide.comfyui._workflows.text_to_image` with the LoRA
(64 x 64, 2 steps, a fixed seed). Each run is a fresh Python running this module in its child
mode, imported into a real ComfyUI (:mod:`lowtide.comfyui._headless`, on the CPU), in its own
memory cgroup:

- ``stock-uncapped``: stock ComfyUI (``CheckpointLoaderSimple``) in a cgroup without a limit,
  to read what it takes;
- ``stock``: the same under the cap;
- ``lowtide``: ``LowtideCheckpointLoader`` under the cap, its store's ``LOWTIDE_RAM_BUDGET``
  and ``LOWTIDE_RESERVE_RAM`` derived from the cap and the process's own size once ComfyUI
  and torch are imported (unless they are set in the environment).

The model files are dropped from the page cache before each run (``POSIX_FADV_DONTNEED``), so
every run reads them from the disk. The table shows status, wall time (the whole process, and
the workflow alone), the cgroup's peak (what the cap limits), bytes read and written, and the
digest of the PNG; then the verdicts against lowtide's targets. Usage::

    python -m lowtide.comfyui.demo [--size full|tiny] [--cap SIZE] [--strategy NAME]...
                                   [--json] [--cache-dir DIR] [--comfyui PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from lowtide.bench import make_cold

STRATEGIES = ("stock-uncapped", "stock", "lowtide")

DEFAULT_CAP = {"full": 4608 << 20, "tiny": 1280 << 20}
"""The cap for each size: one stock ComfyUI is OOM-killed under (measured: docs/comfyui.md,
"The demo")."""

LORA_STRENGTH = 1.0
IMAGE_SIZE, STEPS, SEED = 64, 2, 42

# Targets (a benchmark's, reported, never asserted).
CAP_SHARE_TARGET = 0.6
"""lowtide finishes under a cap of at most this share of stock's uncapped cgroup peak."""
WALL_RATIO_TARGET = 1.3
"""lowtide's workflow takes at most this many times stock's uncapped one."""

# What lowtide's settings leave to the process beside its weights, above its size once
# ComfyUI and torch are imported: activations, the float32 copy a layer casts its weights to,
# the LoRA file, patches being computed, the allocator's slack.
WORKING_MARGIN = 768 << 20


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowtide" / "comfyui"


# --- a run, in a child --------------------------------------------------------------------


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return {key: int(fields[key]) for key in ("read_bytes", "rchar", "write_bytes")}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def lowtide_settings(cap: int | None, process_rss: int) -> dict[str, int]:
    """``LOWTIDE_RESERVE_RAM`` and ``LOWTIDE_RAM_BUDGET`` for a process of ``process_rss``
    bytes under ``cap``: a reserve of a sixteenth of the cap (at least 256 MiB), and a budget
    of what the cap leaves beside the process, its working margin and the reserve (at least
    256 MiB). Without a cap: the store's own defaults (empty)."""
    if cap is None:
        return {}
    reserve = max(cap // 16, 256 << 20)
    budget = max(cap - process_rss - WORKING_MARGIN - reserve, 256 << 20)
    return {"ram_budget": budget, "reserve_ram": reserve}


def _custom_nodes(work: Path) -> Path:
    """A custom_nodes folder with lowtide's node package: the repository's ``custom_node/``
    linked where this module runs from a checkout, else the same one-line package written."""
    folder = work / "custom_nodes"
    folder.mkdir()
    package = Path(__file__).resolve().parents[3] / "custom_node"
    if (package / "__init__.py").is_file():
        (folder / "lowtide").symlink_to(package, target_is_directory=True)
    else:
        (folder / "lowtide").mkdir()
        (folder / "lowtide" / "__init__.py").write_text(
            "from lowtide.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS\n"
        )
    return folder


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One run: imports ComfyUI, runs the workflow, returns the figures."""
    import torch  # noqa: F401

    from lowtide.comfyui import _headless, _workflows

    work = Path(args.work)
    headless = _headless.prepare(work / "comfyui", args.comfyui)
    import folder_paths

    folder_paths.add_model_folder_path("checkpoints", str(Path(args.checkpoint).parent), True)
    folder_paths.add_model_folder_path("loras", str(Path(args.lora).parent), True)
    folder_paths.filename_list_cache.clear()
    loader = "CheckpointLoaderSimple"
    settings: dict[str, int] = {}
    if args.child == "lowtide":
        [node] = _headless.load_custom_nodes(_custom_nodes(headless.workdir))
        if not node.ok:
            raise RuntimeError(f"lowtide's custom nodes failed to load: {node.log}")
        loader = "LowtideCheckpointLoader"
    process_rss = _rss()
    if args.child == "lowtide":
        cap = args.cap_bytes or None
        for key, value in lowtide_settings(cap, process_rss).items():
            os.environ.setdefault(f"LOWTIDE_{key.upper()}", str(value))
        os.environ.setdefault("LOWTIDE_SPILL_DIR", str(work / "spill"))
        from lowtide.comfyui import nodes

        settings = {k: v for k, v in nodes.settings().items() if k != "spill_dir"}

    prompt = _workflows.text_to_image(
        Path(args.checkpoint).name,
        loader=loader,
        lora_name=Path(args.lora).name,
        lora_strength=LORA_STRENGTH,
        size=IMAGE_SIZE,
        steps=STEPS,
        seed=SEED,
    )
    before = _io()
    began = time.perf_counter()
    result = _headless.Runner().run(prompt)
    workflow_s = time.perf_counter() - began
    after = _io()
    [image] = result.images
    figures: dict[str, Any] = {
        "workflow_s": round(workflow_s, 2),
        "process_rss_bytes": process_rss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "read_bytes": after["read_bytes"] - before["read_bytes"],
        "rchar": after["rchar"] - before["rchar"],
        "write_bytes": after["write_bytes"] - before["write_bytes"],
        "image_sha256": hashlib.sha256(image.png).hexdigest(),
    }
    if args.child == "lowtide":
        from lowtide.comfyui import nodes

        stats = nodes.store().stats()
        figures["lowtide"] = {
            **settings,
            "bytes_read_source": stats["bytes_read_source"],
            "bytes_written": stats["bytes_written"],
            "bytes_spilled": stats["bytes_spilled"],
            "bytes_restored_spill": stats["bytes_restored_spill"],
            "anon_peak_bytes": stats["anon_peak_bytes"],
            "ram_dropped_bytes": stats["ram_dropped_bytes"],
            # What lowtide wrote that was not a patched weight's spill.
            "unchanged_written_bytes": stats["bytes_written"] - stats["bytes_spilled"],
        }
    return figures


def child_main(args: argparse.Namespace) -> int:
    """Writes the run's figures, or ``{"error": ...}``, to ``--result`` as JSON."""
    try:
        figures = child(args)
    except Exception as error:  # reported to the parent as the run's reason
        traceback.print_exc()
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        Path(args.result).write_text(json.dumps({"error": reason}))
        return 1
    Path(args.result).write_text(json.dumps(figures))
    return 0


# --- the parent ---------------------------------------------------------------------------


def run(
    strategy: str,
    files: dict[str, Path],
    cap: int,
    cgroups: bool,
    comfyui: Path,
    work: Path,
) -> dict[str, Any]:
    from lowtide.demo import Cgroup

    limit = None if strategy == "stock-uncapped" else cap
    command = [
        sys.executable,
        "-m",
        "lowtide.comfyui.demo",
        "--child",
        "lowtide" if strategy == "lowtide" else "stock",
        "--cap-bytes",
        str(limit if cgroups and limit is not None else 0),
        "--checkpoint",
        str(files["checkpoint"]),
        "--lora",
        str(files["lora"]),
        "--work",
        str(work),
        "--result",
        str(work / "result.json"),
        "--comfyui",
        str(comfyui),
    ]
    for path in files.values():
        make_cold(path)
    # A cgroup without a limit (the largest one) still counts the run's peak.
    group = Cgroup(strategy, limit if limit is not None else 1 << 62) if cgroups else None
    log_path = work / "child.log"
    try:

        def enter() -> None:
            if group is not None:
                group.procs().write_text(str(os.getpid()))

        began = time.perf_counter()
        with open(log_path, "wb") as log:
            proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=enter)
        wall = time.perf_counter() - began
        oom = group.oom_kills() if group is not None else 0
        peak = group.peak() if group is not None else None
    finally:
        if group is not None:
            group.close()
    out: dict[str, Any] = {
        "strategy": strategy,
        "cap_bytes": limit if cgroups else None,
        "status": "ok",
        "reason": None,
        "wall_s": round(wall, 2),
        "cgroup_peak_bytes": peak,
        "oom_kills": oom,
    }
    figures: dict[str, Any] = {}
    result = work / "result.json"
    if result.exists():
        figures = json.loads(result.read_text())
    if proc.returncode == 0 and "image_sha256" in figures:
        out.update(figures)
        return out
    if proc.returncode == -signal.SIGKILL and (oom or limit is not None):
        out["status"] = "oom-killed"
        out["reason"] = f"killed by the kernel's OOM killer ({oom} kill(s) in the cgroup)"
    else:
        out["status"] = "failed"
        reason = figures.get("error")
        if reason is None:
            lines = log_path.read_text(errors="replace").strip().splitlines()
            reason = f"exit {proc.returncode}: " + (lines[-1] if lines else "no output")
        out["reason"] = reason
    return out


def verdicts(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """lowtide's targets against the runs that were made (None where a run is missing)."""
    by = {r["strategy"]: r for r in runs}
    ran, capped = by.get("lowtide"), by.get("stock")
    # The runs that finished, or None.
    base = by.get("stock-uncapped")
    base = base if base is not None and base["status"] == "ok" else None
    ours = ran if ran is not None and ran["status"] == "ok" else None
    out: dict[str, Any] = {}

    share = None
    if base is not None and ran is not None and ran["cap_bytes"] and base["cgroup_peak_bytes"]:
        share = ran["cap_bytes"] / base["cgroup_peak_bytes"]
    same = None
    if base is not None and ours is not None:
        same = ours["image_sha256"] == base["image_sha256"]
    out["cap"] = {
        "target": f"lowtide finishes under a cap of at most {CAP_SHARE_TARGET:.0%} of stock's "
        "uncapped cgroup peak, with stock's image",
        "cap_share_of_stock_peak": None if share is None else round(share, 3),
        "lowtide_ok": None if ran is None else ours is not None,
        "same_image": same,
        "stock_under_cap": None if capped is None else capped["status"],
        "met": None if share is None else bool(share <= CAP_SHARE_TARGET and same),
    }

    store = None if ours is None else ours["lowtide"]
    out["writes"] = {
        "target": "lowtide writes 0 bytes for unchanged weights (bytes_written - bytes_spilled)",
        "bytes_written": None if store is None else store["bytes_written"],
        "bytes_spilled": None if store is None else store["bytes_spilled"],
        "met": None if store is None else store["unchanged_written_bytes"] == 0,
    }

    ratio = process_ratio = None
    if base is not None and ours is not None:
        ratio = round(ours["workflow_s"] / max(base["workflow_s"], 0.01), 2)
        process_ratio = round(ours["wall_s"] / max(base["wall_s"], 0.01), 2)
    out["wall"] = {
        "target": f"lowtide's workflow takes at most {WALL_RATIO_TARGET} x stock's uncapped",
        "ratio": ratio,
        "process_ratio": process_ratio,
        "met": None if ratio is None else ratio <= WALL_RATIO_TARGET,
    }
    return out


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    if n < 1 << 20:
        return f"{n / 1024:.0f} KiB"
    if n < 1 << 30:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**30:.2f} GiB"


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{report['size']} checkpoint ({_size(report['checkpoint_bytes'])}) + LoRA, "
        f"{IMAGE_SIZE}x{IMAGE_SIZE}, {STEPS} steps; "
        + (
            f"cap {_size(report['cap_bytes'])}"
            if report["capped"]
            else f"no cap, NOT enforced: {report['cgroup_problem']}"
        )
    )
    header = (
        f"{'strategy':<16}{'cap':>10}  {'status':<12}{'wall':>8}{'workflow':>10}"
        f"{'cgroup peak':>13}{'peak RSS':>11}{'read':>11}{'written':>11}  image"
    )
    print(header)
    print("-" * len(header))
    for r in report["runs"]:
        print(
            f"{r['strategy']:<16}{_size(r['cap_bytes']):>10}  {r['status']:<12}"
            f"{r['wall_s']:>7.1f}s{_seconds(r.get('workflow_s')):>10}"
            f"{_size(r['cgroup_peak_bytes']):>13}{_size(r.get('peak_rss_bytes')):>11}"
            f"{_size(r.get('read_bytes')):>11}{_size(r.get('write_bytes')):>11}"
            f"  {(r.get('image_sha256') or '-')[:16]}"
        )
        if r["reason"]:
            print(f"    {r['reason']}")
        store = r.get("lowtide")
        if store:
            print(
                f"    lowtide: budget {_size(store['ram_budget'])}, reserve "
                f"{_size(store['reserve_ram'])}; process {_size(r['process_rss_bytes'])} "
                f"before the workflow; read from the file {_size(store['bytes_read_source'])}, "
                f"written {_size(store['bytes_written'])} (spilled patched weights "
                f"{_size(store['bytes_spilled'])}, read back "
                f"{_size(store['bytes_restored_spill'])})"
            )
    print(
        "wall: the child process (imports included); workflow: ComfyUI's run alone. read/written: "
        "the child's read_bytes/write_bytes (/proc/self/io) over the workflow."
    )
    for name, verdict in report["verdicts"].items():
        met = {True: "MET", False: "NOT MET", None: "not measured"}[verdict["met"]]
        if name == "cap":
            detail = (
                f"cap = {verdict['cap_share_of_stock_peak']} of stock's peak, "
                f"same image: {verdict['same_image']}"
            )
        elif name == "writes":
            detail = (
                f"written {_size(verdict['bytes_written'])}, spilled "
                f"{_size(verdict['bytes_spilled'])}"
            )
        else:
            detail = f"ratio {verdict['ratio']} (whole process {verdict['process_ratio']})"
        print(f"{met:<13}{verdict['target']}: {detail}")


def _seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.1f}s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lowtide.comfyui.demo",
        description="One ComfyUI workflow (an SD1.5-sized checkpoint and a LoRA) run by stock "
        "ComfyUI and with lowtide's loader, each in a child process under a memory cgroup.",
    )
    parser.add_argument(
        "--size", choices=("tiny", "full"), default="full", help="checkpoint size (default full)"
    )
    parser.add_argument(
        "--cap", help="memory cap (default: 4.5 GiB at full size, 1.25 GiB at tiny)"
    )
    parser.add_argument(
        "--strategy", action="append", choices=STRATEGIES, help="run only these (repeatable)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        help="where the checkpoint and LoRA are written once (default: "
        "$XDG_CACHE_HOME/lowtide/comfyui or ~/.cache/lowtide/comfyui)",
    )
    parser.add_argument(
        "--comfyui", help="ComfyUI source tree (default: $LOWTIDE_COMFYUI, ../shared/comfyui)"
    )
    parser.add_argument("--child", choices=("stock", "lowtide"), help=argparse.SUPPRESS)
    parser.add_argument("--cap-bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--lora", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)

    import lowtide
    from lowtide.comfyui import _headless
    from lowtide.demo import cgroup_problem

    root = _headless.find_comfyui(args.comfyui)
    if root is None:
        where = args.comfyui or os.environ.get(_headless.ENV_VAR) or "../shared/comfyui"
        print(
            f"error: no ComfyUI source tree at {where} (pass --comfyui or set "
            f"${_headless.ENV_VAR} to a v0.3.64 checkout)",
            file=sys.stderr,
        )
        return 1
    try:
        cap = lowtide.parse_size(args.cap) if args.cap else DEFAULT_CAP[args.size]
    except ValueError as error:
        parser.error(str(error))

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    from lowtide.comfyui import _synthetic

    log(f"model files in {args.cache_dir} (generated once)")
    files = {
        "checkpoint": _synthetic.write_checkpoint(
            args.cache_dir / "checkpoints", args.size, seed=0, comfyui=root
        ),
        "lora": _synthetic.write_lora(
            args.cache_dir / "loras", args.size, text_encoder=True, comfyui=root
        ),
    }
    problem = cgroup_problem()
    if problem is not None:
        log(f"running without a cap: {problem}")
    runs = []
    for strategy in [s for s in STRATEGIES if s in (args.strategy or STRATEGIES)]:
        limit = "no limit" if strategy == "stock-uncapped" else f"a {_size(cap)} cap"
        log(f"{strategy}: running" + (f" under {limit}" if problem is None else " uncapped"))
        with tempfile.TemporaryDirectory(prefix=f"lowtide-comfyui-{strategy}-") as work:
            runs.append(run(strategy, files, cap, problem is None, root, Path(work)))
        log(f"{strategy}: {runs[-1]['status']} in {runs[-1]['wall_s']:.1f} s")
    report = {
        "size": args.size,
        "checkpoint": str(files["checkpoint"]),
        "checkpoint_bytes": files["checkpoint"].stat().st_size,
        "lora": str(files["lora"]),
        "workflow": {
            "size": IMAGE_SIZE,
            "steps": STEPS,
            "seed": SEED,
            "lora_strength": LORA_STRENGTH,
        },
        "cap_bytes": cap,
        "capped": problem is None,
        "cgroup_problem": problem,
        "runs": runs,
        "verdicts": verdicts(runs),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

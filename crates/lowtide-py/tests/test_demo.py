"""``python -m lowtide.demo`` at a tiny scale: the three strategies run in capped child
processes (a real memory cgroup where the machine allows) and agree on the output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import torch_or_skip

torch_or_skip()
from lowtide import demo  # noqa: E402


def _cgroup_or_skip() -> None:
    """Skips where no capped memory cgroup can be made (failing instead in CI, which runs as
    root with a memory controller)."""
    problem = demo.cgroup_problem()
    if problem is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI runs as root with a memory cgroup controller, but: {problem}")
        pytest.skip(problem)


def test_the_demo_runs_every_strategy_under_a_real_cap(tmp_path: Path):
    _cgroup_or_skip()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowtide.demo",
            "--scale",
            "0.01",
            "--cap",
            "2GiB",
            "--json",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["capped"] and report["cap_bytes"] == 2 << 30
    runs = {run["strategy"]: run for run in report["runs"]}
    assert list(runs) == ["classic", "mmap-offload", "lowtide"]
    for run in runs.values():
        assert run["status"] == "ok", run
        assert run["cgroup_peak_bytes"] and run["cgroup_peak_bytes"] <= 2 << 30
        assert run["peak_rss_bytes"] > 0 and run["wall_s"] > 0
        assert run["bytes_read"] is not None and run["bytes_written"] is not None
    assert len({run["output_digest"] for run in runs.values()}) == 1
    # Nothing was under pressure: lowtide wrote nothing (unchanged weights are never written;
    # the process as a whole may write a few pages of its own, such as a temporary file of
    # the interpreter's).
    assert runs["lowtide"]["store"]["bytes_written"] == 0
    assert runs["lowtide"]["bytes_written"] < 64 << 10


def test_an_oom_kill_is_reported_not_raised(tmp_path: Path):
    _cgroup_or_skip()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowtide.demo",
            "--scale",
            "0.01",
            "--cap",
            "48MiB",
            "--json",
            "--dir",
            str(tmp_path),
            "--strategy",
            "classic",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    (run,) = json.loads(out.stdout)["runs"]
    assert run["status"] == "oom-killed" and run["oom_kills"] >= 1
    assert run["output_digest"] is None


def test_the_models_store_bf16_and_compute_in_float32_as_comfyui_does_on_a_cpu():
    import torch

    from lowtide import _demo_models as models

    sizes = models.Sizes.at(0.001)
    gen = torch.Generator().manual_seed(0)
    built = {}
    for kind in models.MODELS:
        module = models.build(kind, sizes, "cpu")
        for name, param in module.named_parameters():
            param.data.copy_(models._init(name, tuple(param.shape), gen))
        built[kind] = module
    tokens = torch.randint(0, sizes.vocab, (1, sizes.tokens), generator=gen)
    latent = torch.randn(1, 4, sizes.latent, sizes.latent, generator=gen)
    with torch.no_grad():
        context = built["text_encoder"](tokens)
        image = built["decoder"](latent - built["denoiser"](latent, 0.5, context))
        # The reference: the same weights converted to float32 once, for good (in place).
        ref = {kind: module.float() for kind, module in built.items()}
        ref_context = ref["text_encoder"](tokens)
        ref_image = ref["decoder"](latent - ref["denoiser"](latent, 0.5, ref_context))
    assert context.dtype == image.dtype == torch.float32
    assert torch.equal(context, ref_context) and torch.equal(image, ref_image)
    # Built anew, the weights are BF16 (as in the files) and the layers cast them per call.
    fresh = models.build("denoiser", sizes, "cpu")
    assert {p.dtype for p in fresh.parameters()} == {torch.bfloat16}
    assert any(isinstance(m, models.Linear) for m in fresh.modules())


def test_the_table_leads_with_the_cgroup_peak(capsys: pytest.CaptureFixture[str]):
    run = {
        "strategy": "lowtide",
        "status": "ok",
        "wall_s": 1.0,
        "bytes_read": 1 << 30,
        "bytes_written": 0,
        "peak_rss_bytes": 3 << 29,  # over the cap: mapped file pages count in RSS
        "cgroup_peak_bytes": 1 << 29,
        "output_digest": "0123456789abcdef",
    }
    report = {
        "cap_bytes": 1 << 30,
        "weights_bytes": 2 << 30,
        "capped": True,
        "cgroup_problem": None,
        "runs": [run],
    }
    demo.print_table(report)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("strategy"))
    assert header.index("cgroup peak (of cap)") < header.index("peak RSS")
    row = next(line for line in out.splitlines() if line.startswith("lowtide"))
    assert "0.50 GiB (50%)" in row and "1.50 GiB" in row and "150%" not in row

"""The Python bench runs end to end at a tiny size (its figures are not checked: a bench
measures, tests do not time)."""

import json
from pathlib import Path

from conftest import torch_or_skip

from lowtide import bench


def test_bench_runs_and_reports_every_loader(tmp_path: Path, capsys):
    torch_or_skip()
    assert bench.main([str(tmp_path), "--size", "40MiB", "--repeats", "1", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    names = [entry["loader"] for entry in figures["loaders"]]
    assert names == [
        "lowtide",
        "safetensors load_file",
        "safe_open get_tensor",
        "mmap + frombuffer + clone",
    ]
    for entry in figures["loaders"]:
        assert entry["cold_gbps"] > 0 and entry["warm_gbps"] > 0
    assert figures["raw_read"]["gbps"] > 0
    assert {t["figure"] for t in figures["targets"]} >= {
        "lowtide cold load / raw O_DIRECT read",
        "lowtide warm load / memcpy",
    }
    assert figures["view_us"]["torch_us"] > 0


def test_bench_file_is_a_valid_model(tmp_path: Path):
    from safetensors import safe_open

    path = tmp_path / "m.safetensors"
    bench.write_model(path, 30 << 20)
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
        assert names and all(f.get_tensor(n).dtype.is_floating_point for n in names)

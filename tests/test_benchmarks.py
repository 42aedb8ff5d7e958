"""Smoke test of benchmarks/: every script runs at a tiny size and writes JSON with its keys.

No timing is asserted (the numbers of a tiny model on a shared machine mean nothing); the
scripts run concurrently to keep the test short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


def _start(script: str, out: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, str(BENCH / script), "--tiny", "--json", str(out), *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _finish(proc: subprocess.Popen, out: Path) -> dict:
    log = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, log[-3000:]
    return json.loads(out.read_text())


def test_benchmark_scripts_write_json(tmp_path):
    outs = {name: tmp_path / f"{name}.json" for name in ("forward", "train", "scaling", "projection", "parts")}
    procs = {
        "forward": _start("bench_forward.py", outs["forward"], "--rounds", "1", "--batch-sizes", "2"),
        "train": _start("bench_train.py", outs["train"], "--rounds", "1", "--examples", "2",
                        "--variants", "batched_ours", "loop_original_eager"),
        "scaling": _start("bench_scaling.py", outs["scaling"], "--rounds", "1", "--lengths", "64",
                          "--phrases", "--variants", "c_original_eager"),
        "projection": _start("projection.py", outs["projection"]),
        "parts": _start("bench_parts.py", outs["parts"], "--reps", "1"),
    }
    results = {name: _finish(proc, outs[name]) for name, proc in procs.items()}

    forward = results["forward"]
    for key in ("time_ratio_b_a", "mem_ratio_b_a", "mem_ratio_c_b", "environment", "model", "by_batch"):
        assert key in forward, key
    assert isinstance(forward["time_ratio_b_a"], float) and forward["time_ratio_b_a"] > 0
    assert isinstance(forward["mem_ratio_c_b"], float)
    entry = forward["by_batch"]["2"]["results"]
    for variant in ("a_bare_sdpa", "b_ours_capture", "c_original_eager"):
        assert entry[variant]["status"] == "ok", entry[variant]
        for key in ("time_s", "peak_rss_mb", "activation_mb"):
            assert entry[variant][key]["median"] > 0, (variant, key)

    train = results["train"]
    assert train["results"]["batched_ours"]["examples_per_s"]["median"] > 0
    assert train["speedup_batched_vs_original"] > 0

    scaling = results["scaling"]
    assert scaling["by_length"]["64"]["results"]["c_original_eager"]["status"] == "ok"
    assert "mem_ratio_c_b" in scaling["by_length"]["64"]

    parts = results["parts"]
    assert set(parts["parts"]) == {"head", "attention"}
    assert all(r > 0 for r in parts["cpu_time_ratios"].values())

    projection = results["projection"]
    assert all(c["eager_matches"] and c["captured_matches"] for c in projection["checks"]), projection["checks"]
    assert projection["projection_7b"][0]["ratio_full_over_captured"] > 1

"""Smoke test of benchmarks/: every script runs at a tiny size and writes JSON with its keys.

No timing is asserted (the numbers of a tiny model on a shared machine mean nothing); the
scripts run concurrently to keep the test short. The suite's own test runs `suite.py --size tiny`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_quantized  # noqa: E402
import common  # noqa: E402


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
        # forked children skip their imports (10-20 s each on a busy machine); scaling keeps fresh interpreters
        "forward": _start("bench_forward.py", outs["forward"], "--rounds", "1", "--batch-sizes", "2", "--fork",
                          "--threads", "1"),
        "train": _start("bench_train.py", outs["train"], "--rounds", "1", "--examples", "2", "--fork", "--threads", "1",
                        "--variants", "batched_ours", "loop_original_eager"),
        "scaling": _start("bench_scaling.py", outs["scaling"], "--rounds", "1", "--lengths", "64", "--threads", "1",
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
        assert entry[variant]["memory"] == "rss"
        for key in ("time_s", "peak_mb", "activation_mb"):
            assert entry[variant][key]["median"] > 0, (variant, key)

    train = results["train"]
    assert train["results"]["batched_ours"]["examples_per_s"]["median"] > 0
    assert train["speedup_batched_vs_original"] > 0

    scaling = results["scaling"]
    assert scaling["by_length"]["64"]["results"]["c_original_eager"]["status"] == "ok"
    assert "mem_ratio_c_b" in scaling["by_length"]["64"]

    parts = results["parts"]
    assert set(parts["parts"]) == {"head", "attention"}
    assert parts["timed_by"] == "cpu_s" and parts["device"] == "cpu"
    assert all(r > 0 for r in parts["time_ratios"].values())

    projection = results["projection"]
    assert all(c["eager_matches"] and c["captured_matches"] for c in projection["checks"]), projection["checks"]
    assert projection["projection_7b"][0]["ratio_full_over_captured"] > 1


def test_suite_tiny_cpu_writes_the_headline_ratios(tmp_path):
    """`suite.py --device cpu --size tiny` runs the forward, training and quantized benchmarks (forked children)
    and writes one JSON whose headline values are positive finite ratios; report.py tables it."""
    out = tmp_path / "suite.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(BENCH / "suite.py"), "--device", "cpu", "--size", "tiny", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    data = json.loads(out.read_text())
    for key in ("time_ratio_b_a", "mem_ratio_b_a", "mem_ratio_c_b", "train_speedup_batched_vs_original",
                "quantized_weight_mem_ratio"):
        value = data[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert data["missing"] == []
    assert data["quantized_method"] == "torchao-int8" and data["quantized_measured_by"] == "tensor_storage_bytes"
    # int8 weights are smaller than float32 ones even when the (unquantized) embeddings dominate the tiny model
    assert data["quantized_weight_mb"] < data["unquantized_weight_mb"]
    assert data["quantized"]["result"]["quantized_linear_layers"] > 0
    assert data["forward"]["by_batch"]["2"]["results"]["c_original_eager"]["status"] == "ok"
    assert set(data["train"]["results"]) == {"batched_ours", "loop_original_eager"}
    assert data["goals"]["time_ratio_b_a"]["applies"] is False  # the goals are the 7b size's on CUDA
    assert set(data["elapsed_s"]) == {"forward", "train", "quantized", "total"}

    report = subprocess.run([sys.executable, str(BENCH / "report.py"), "--suite", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "| forward time, ours / bare (b/a, wall clock, batch 2) |" in report.stdout
    assert f"{data['train_speedup_batched_vs_original']:.2f}" in report.stdout


def test_7b_size_has_llava_1_5_7b_shapes():
    """The `7b` size builds LLaVA-1.5-7B's 7.06B parameters in bf16 (on the meta device here: no memory used)."""
    spec = common.model_spec("7b", "cuda")
    assert spec.dtype == "bfloat16" and spec.image_tokens == 576
    lmm = common.build_lmm(spec, device="meta")
    assert sum(p.numel() for p in lmm.parameters()) == 7_063_427_072
    assert next(lmm.parameters()).dtype == torch.bfloat16
    text, vision = lmm.config.text_config, lmm.config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.intermediate_size,
            text.vocab_size) == (32, 4096, 32, 11008, 32064)
    assert (vision.num_hidden_layers, vision.hidden_size, vision.image_size, vision.patch_size) == (24, 1024, 336, 14)


def test_bad_device_size_and_method_fail_with_the_fix():
    with pytest.raises(ValueError, match="needs a GPU.*--device cuda"):
        common.model_spec("7b", "cpu")
    with pytest.raises(ValueError, match="use 'cpu', 'cuda' or 'cuda:N'"):
        common.check_device("gpu")
    with pytest.raises(ValueError, match="bnb-4bit needs --device cuda.*torchao-int8"):
        bench_quantized.resolve_method("bnb-4bit", "cpu")
    assert bench_quantized.resolve_method("auto", "cpu") == "torchao-int8"
    assert common.model_spec("default", "cpu").dtype == "float32"
    assert common.model_spec("default", "cuda").dtype == "bfloat16"


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="this torch has CUDA")
def test_cuda_on_a_cpu_only_torch_is_refused_before_measuring():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(BENCH / "suite.py"), "--device", "cuda", "--size", "7b"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "built without CUDA" in proc.stderr, proc.stderr[-2000:]


def _writes_payload(payload: dict, out_path: str) -> None:
    common.write_child(out_path, {"echo": payload["value"]})


def _fails(payload: dict, out_path: str) -> None:
    raise ValueError(f"bad payload {payload['value']}")


def test_forked_child_results_and_errors():
    """A forked measurement returns what its child wrote, or its error with the message and traceback."""
    ok = common.run_forked(_writes_payload, {"value": 7}, mem_cap_gb=8)
    assert ok["status"] == "ok" and ok["echo"] == 7 and ok["watchdog_max_rss_mb"] >= 0
    failed = common.run_forked(_fails, {"value": 3}, mem_cap_gb=8)
    assert failed["status"] == "error" and failed["error"] == "ValueError: bad payload 3"
    assert "Traceback" in failed["log"]

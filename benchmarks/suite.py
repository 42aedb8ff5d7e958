"""The benchmark suite in one command: forward cost, training throughput and quantized weight memory at one
model size, on the CPU or a GPU, written to one JSON file.

    python benchmarks/suite.py --device cuda --size 7b --json benchmarks/results/suite_7b_cuda.json  # one GPU
    python benchmarks/suite.py --device cpu --size tiny --json OUT.json    # smoke test (the test suite runs it)
    python benchmarks/report.py --suite OUT.json                           # the Markdown table

It runs three benchmarks in turn, each measurement in its own child process (forked from this one, which skips
the children's imports; `--no-fork` starts fresh interpreters instead; see common.py):
  bench_forward.py    (a) the bare LMM, (b) ours, (c) the original's eager forward, at the plan's batch sizes
                      -> time_ratio_b_a (wall clock), mem_ratio_b_a, mem_ratio_c_b (activation memory), at the
                         largest batch
  bench_train.py      one AdamW step over the same examples: our batched step versus the original's per-example
                      loop -> train_speedup_batched_vs_original (examples per second, wall clock)
  bench_quantized.py  the LMM's weights quantized by transformers (bitsandbytes 4-bit on CUDA, torchao int8
                      weight-only on the CPU) -> quantized_weight_mem_ratio, quantized_method
The sizes are those of common.SIZES (`7b`: LLaVA-1.5-7B's shapes, random bf16 weights built on the GPU, never
downloaded; GPU only). The goals of issue #16, checked at 7b on CUDA: time_ratio_b_a <= 1.05 and
train_speedup_batched_vs_original >= 3; the whole 7b run is meant to take under 8 minutes on one GPU (`elapsed_s`).

Exit status 1 when a headline value could not be measured; the JSON is written anyway, with every failed
measurement's status and log inside.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_forward  # noqa: E402
import bench_quantized  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402

HEADLINE = ("time_ratio_b_a", "mem_ratio_b_a", "mem_ratio_c_b", "train_speedup_batched_vs_original",
            "quantized_weight_mem_ratio")
GOALS = {"time_ratio_b_a": ("<=", 1.05), "train_speedup_batched_vs_original": (">=", 3.0)}
GOAL_SETTING = "the 7b size on CUDA"


@dataclass(frozen=True)
class Plan:
    """How much of each benchmark the suite runs at one size (rounds = fresh processes per configuration,
    reps = timed steps per process after the memory step)."""

    batch_sizes: tuple[int, ...] = (1, 8)
    rounds: int = 2
    reps: int = 1
    train_examples: int = 8
    train_rounds: int = 2
    train_reps: int = 1
    train_variants: tuple[str, ...] = tuple(bench_train.VARIANTS)
    threads: int | None = None  # torch threads per child; None: torch's default


PLANS = {
    # the smoke test: one process per configuration, two examples, no `loop_ours` (it only separates effects), one
    # thread (a tiny model's steps are too short to share; two threads on a busy machine spin 10x the CPU time)
    "tiny": Plan(batch_sizes=(2,), rounds=1, reps=1, train_examples=2, train_rounds=1, train_reps=1,
                 train_variants=("batched_ours", "loop_original_eager"), threads=1),
    "default": Plan(),
    "large": Plan(),
    # 12 forward and 6 training processes of a few seconds each on a GPU, plus the 14 GB save and 4-bit load
    "7b": Plan(rounds=2, reps=5, train_rounds=2, train_reps=3),
}


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def goals(out: dict) -> dict:
    applies = common.is_cuda(out["device"]) and out["size"] == "7b"
    result = {}
    for key, (op, bound) in GOALS.items():
        value = out.get(key)
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        result[key] = dict(goal=f"{op} {bound}", value=value, met=met, applies=applies, setting=GOAL_SETTING)
    return result


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """The three benchmarks at `args.size` on `args.device`; returns the suite's result (also written to --json)."""
    plan = PLANS[args.size]
    if args.rounds:
        plan = replace(plan, rounds=args.rounds, train_rounds=args.rounds)
    if args.reps:
        plan = replace(plan, reps=args.reps, train_reps=args.reps)
    if args.threads:
        plan = replace(plan, threads=args.threads)
    shared = ["--device", args.device, "--size", args.size, "--dtype", args.dtype]
    if args.fork:
        shared.append("--fork")
    if args.mem_cap_gb:
        shared += ["--mem-cap-gb", str(args.mem_cap_gb)]
    if plan.threads:
        shared += ["--threads", str(plan.threads)]
    elapsed, started = {}, time.perf_counter()

    def timed(name: str, fn, sub_argv: list[str]) -> dict:
        print(f"[suite] {name}: {' '.join(sub_argv)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = fn(sub_argv)
        elapsed[name] = time.perf_counter() - t0
        result.pop("environment", None)  # the suite records it once
        return result

    forward = timed("forward", bench_forward.main, [
        *shared, "--batch-sizes", *map(str, plan.batch_sizes), "--rounds", str(plan.rounds), "--reps", str(plan.reps)])
    train = timed("train", bench_train.main, [
        *shared, "--examples", str(plan.train_examples), "--rounds", str(plan.train_rounds),
        "--reps", str(plan.train_reps), "--variants", *plan.train_variants])
    quant_argv = [*shared, "--quant-method", args.quant_method] + (["--tmp-dir", args.tmp_dir] if args.tmp_dir else [])
    quantized = timed("quantized", bench_quantized.main, quant_argv)
    elapsed["total"] = time.perf_counter() - started

    model = common.model_spec(args.size, args.device, args.dtype)
    out = dict(
        benchmark="suite", command=common.command("suite.py", argv), environment=common.environment(args.device),
        device=args.device, size=args.size, model=asdict(model), plan=asdict(plan), fork=args.fork,
        time_ratio_b_a=forward["time_ratio_b_a"], mem_ratio_b_a=forward["mem_ratio_b_a"],
        mem_ratio_c_b=forward["mem_ratio_c_b"], forward_headline_batch=forward["headline_batch"],
        cpu_ratio_b_a=forward["cpu_ratio_b_a"], time_ratio_c_b=forward["time_ratio_c_b"],
        train_speedup_batched_vs_original=train["speedup_batched_vs_original"],
        train_speedup_batched_vs_loop_ours=train["speedup_batched_vs_loop_ours"],
        train_mem_ratio_original_vs_batched=train["mem_ratio_original_vs_batched"],
        quantized_weight_mem_ratio=quantized["quantized_weight_mem_ratio"], quantized_method=quantized["method"],
        quantized_measured_by=quantized["measured_by"], quantized_reference_dtype=quantized["reference_dtype"],
        quantized_weight_mb=quantized["quantized_weight_mb"], unquantized_weight_mb=quantized["unquantized_weight_mb"],
        elapsed_s=elapsed, forward=forward, train=train, quantized=quantized,
    )
    out["goals"] = goals(out)
    out["missing"] = [key for key in HEADLINE if not positive_finite(out[key])]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the suite's results here")
    common.add_device_arg(parser)
    parser.add_argument("--size", choices=list(common.SIZES), default="tiny",
                        help="tiny (default; smoke test), default / large (CPU), 7b (LLaVA-1.5-7B's shapes, GPU only)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="the LMM's dtype; auto: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--quant-method", default="auto", help="auto (bnb-4bit on CUDA, torchao-int8 on the CPU), "
                                                                "bnb-4bit or torchao-int8")
    parser.add_argument("--tmp-dir", default=None, help="where bench_quantized saves the unquantized weights "
                                                         "(14 GB at 7b; default: the system's temporary folder)")
    parser.add_argument("--rounds", type=int, default=None, help="override the size's plan: processes per configuration")
    parser.add_argument("--reps", type=int, default=None, help="override the size's plan: timed steps per process")
    parser.add_argument("--mem-cap-gb", type=float, default=None, help="host RSS cap per child (see common.py)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child (default: torch's)")
    parser.add_argument("--no-fork", dest="fork", action="store_false",
                        help="start every child as a fresh interpreter instead of forking it from this process")
    args = parser.parse_args(argv)
    try:  # everything that can be wrong with the command fails here, not minutes into the run
        common.check_device(args.device)
        common.model_spec(args.size, args.device, args.dtype)
        args.quant_method = bench_quantized.resolve_method(args.quant_method, args.device)
    except ValueError as error:
        parser.error(str(error))

    out = run(args, argv)
    common.write_results(args.json, out)
    summary = ", ".join(f"{key} {out[key]}" for key in HEADLINE)
    print(f"[suite] {args.size} on {args.device} in {out['elapsed_s']['total']:.0f} s: {summary}", file=sys.stderr)
    if out["missing"]:
        print(f"[suite] not measured: {', '.join(out['missing'])} (the statuses and logs of the failed runs are in "
              f"{args.json or 'the results'})", file=sys.stderr)
        sys.exit(1)
    return out


if __name__ == "__main__":
    main()

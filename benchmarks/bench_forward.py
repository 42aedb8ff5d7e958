"""Benchmark 1: cost of the grounding forward over the bare LMM, versus the original's approach.

For a random LLaVA-1.5-shaped model (576 image tokens) and batch sizes 1 and 8, measures time
and peak memory of
  (a) the bare LMM forward with SDPA (`lmm(input_ids, attention_mask, pixel_values, use_cache=False)`),
  (b) our grounding forward (`FLMMForGrounding(**inputs)` without refiner: SDPA + exact capture of
      the phrase rows + U-Net head), and
  (c) the original's approach (eager attention, `output_attentions=True`, `output_hidden_states=True`,
      slicing the full maps afterwards, head per example),
each configuration in fresh child processes (see common.py), interleaved over rounds, on the CPU
or a CUDA device (`--device cuda`: synchronised timing, torch.cuda.max_memory_allocated, bf16).

    python benchmarks/bench_forward.py --json OUT.json            # default size, < 5 min here
    python benchmarks/bench_forward.py --tiny --rounds 1 --json OUT.json   # smoke test size
    python benchmarks/bench_forward.py --device cuda --size 7b --json OUT.json   # LLaVA-1.5-7B's shapes

The JSON holds per configuration the medians/min/max and, per batch size and overall (the
largest batch), `time_ratio_b_a`, `mem_ratio_b_a`, `mem_ratio_c_b` (memory = activation memory:
the peak minus the memory before the step, RSS on the CPU, allocated memory on CUDA) plus the
same ratios on the total peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import InputSpec, ModelSpec  # noqa: E402


def child_main(payload: dict, out_path: str) -> None:
    import torch

    spec = ModelSpec(**payload["model"])
    inp = InputSpec(**payload["inputs"])
    implementation, fn = common.VARIANTS[payload["variant"]]
    device = payload.get("device", "cpu")
    torch.set_num_threads(payload.get("threads") or torch.get_num_threads())
    device_name = common.use_device(device)
    model = common.build_model(spec, device=device)
    common.set_text_attention(model, implementation)
    inputs = common.to_device(common.build_inputs(spec, inp), device)

    def step():
        with torch.no_grad():
            return fn(model, inputs)

    result = common.measure_in_child(step, payload["reps"], device)
    if payload["variant"] == "b_ours_capture":
        # decomposition of (b): the LMM forward with capture (phrase_attention) and the head's U-Net + crop alone
        import time

        with torch.no_grad():
            common.synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            maps = model.phrase_attention(**inputs)
            common.synchronize(device)
            result["info_capture_forward_s"] = time.perf_counter() - t0
            result["info_capture_forward_cpu_s"] = time.process_time() - c0
            t0, c0 = time.perf_counter(), time.process_time()
            model.head.coarse_logits(maps, inputs["canvas_sizes"], inputs["content_boxes"])
            common.synchronize(device)
            result["info_head_s"] = time.perf_counter() - t0
            result["info_head_cpu_s"] = time.process_time() - c0
        result["info_captured_maps_bytes"] = sum(m.numel() * m.element_size() for m in maps)
    result["info_seq_len"] = int(inputs["input_ids"].shape[1])
    result["info_query_rows"] = int((inputs["phrase_ids"] >= 0).sum())
    result["info_threads"] = torch.get_num_threads()
    result["info_device"] = device_name
    common.write_child(out_path, result)


def run_variants(model: ModelSpec, inp: InputSpec, variants: list[str], rounds: int, reps: int,
                 mem_cap_gb: float, threads: int | None = None, label: str = "", device: str = "cpu",
                 fork: bool = False) -> dict:
    """Interleaved rounds of fresh children, one per variant; returns aggregated results per variant."""
    script = str(Path(__file__).resolve())

    def run_one(variant: str, r: int) -> dict:
        # the cap guards host RSS; on CUDA the maps live on the device, where running out is reported as out_of_memory
        if variant == "c_original_eager" and not common.is_cuda(device):
            est = estimate_eager_maps_gb(model, inp)
            if est > mem_cap_gb:
                return dict(status="skipped_estimate", estimated_eager_maps_gb=est, cap_gb=mem_cap_gb)
        payload = dict(model=asdict(model), inputs=asdict(inp), variant=variant, reps=reps, threads=threads,
                       device=device)
        return common.run_measurement(script, child_main, payload, mem_cap_gb, fork)

    print(f"[{label}] batch={inp.batch} text={inp.text_tokens} phrases={inp.phrases}", file=sys.stderr, flush=True)
    runs = common.interleaved(variants, rounds, run_one)
    return {v: common.aggregate(rs) | {"runs": rs} for v, rs in runs.items()}


def estimate_eager_maps_gb(model: ModelSpec, inp: InputSpec) -> float:
    """Bytes of the full attention maps eager + output_attentions keeps (all layers at once)."""
    length = 1 + common.PREFIX_TOKENS + model.image_tokens + max(inp.text_tokens)
    itemsize = 2 if model.dtype in ("bfloat16", "float16") else 4
    return model.layers * inp.batch * model.heads * length**2 * itemsize / 2**30


def ratios(res: dict) -> dict:
    a, b, c = res.get("a_bare_sdpa", {}), res.get("b_ours_capture", {}), res.get("c_original_eager", {})
    return dict(
        time_ratio_b_a=common.ratio(b, a, "time_s"),
        cpu_ratio_b_a=common.ratio(b, a, "cpu_s"),
        cpu_ratio_c_b=common.ratio(c, b, "cpu_s"),
        mem_ratio_b_a=common.ratio(b, a, "activation_mb"),
        mem_ratio_c_b=common.ratio(c, b, "activation_mb"),
        time_ratio_c_b=common.ratio(c, b, "time_s"),
        total_mem_ratio_b_a=common.ratio(b, a, "peak_mb"),
        total_mem_ratio_c_b=common.ratio(c, b, "peak_mb"),
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the results here")
    common.add_model_args(parser)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--text-tokens", type=int, nargs="+", default=[50, 120, 200, 80, 160, 60, 180, 100],
                        help="text tokens after the image, per example (cycled over the batch)")
    parser.add_argument("--phrases", type=int, default=3)
    parser.add_argument("--phrase-len", type=int, default=3)
    common.add_run_args(parser, common.VARIANTS, rounds=3)
    args = parser.parse_args(argv)
    if args.child:
        common.child_entry(child_main, json.loads(args.child), args.child_out)
        return {}

    model = common.check_args(parser, args)
    overrides = {k: getattr(args, k) for k in ("layers", "hidden", "heads", "intermediate") if getattr(args, k)}
    if "heads" in overrides:
        overrides["kv_heads"] = overrides["heads"]
    model = ModelSpec(**(asdict(model) | overrides))
    text_tokens = [min(t, 40) for t in args.text_tokens] if args.size == "tiny" else args.text_tokens

    out = dict(benchmark="forward", command=common.command("bench_forward.py", argv),
               environment=common.environment(args.device), device=args.device, model=asdict(model),
               rounds=args.rounds, reps=args.reps, threads=args.threads, by_batch={})
    for batch in args.batch_sizes:
        inp = InputSpec(batch=batch, text_tokens=text_tokens, phrases=args.phrases, phrase_len=args.phrase_len)
        res = run_variants(model, inp, args.variants, args.rounds, args.reps, args.mem_cap_gb, threads=args.threads,
                           label=f"B={batch}", device=args.device, fork=args.fork)
        out["by_batch"][str(batch)] = dict(inputs=asdict(inp), results=res, **ratios(res))
    # headline ratios: the largest batch
    headline = out["by_batch"][str(max(args.batch_sizes))]
    for key in ("time_ratio_b_a", "cpu_ratio_b_a", "cpu_ratio_c_b", "mem_ratio_b_a", "mem_ratio_c_b", "time_ratio_c_b", "total_mem_ratio_b_a",
                "total_mem_ratio_c_b"):
        out[key] = headline[key]
    out["headline_batch"] = max(args.batch_sizes)
    for batch, entry in out["by_batch"].items():
        meds = {v: (r.get("time_s", {}).get("median"), r.get("activation_mb", {}).get("median"),
                    r.get("peak_mb", {}).get("median")) for v, r in entry["results"].items()}
        print(f"B={batch}: " + "  ".join(f"{v}: t={m[0]} act={m[1]} peak={m[2]}" for v, m in meds.items()),
              file=sys.stderr)
        print(f"B={batch}: b/a time {entry['time_ratio_b_a']}, b/a cpu {entry['cpu_ratio_b_a']}, "
              f"c/b cpu {entry['cpu_ratio_c_b']}, b/a mem {entry['mem_ratio_b_a']}, "
              f"c/b mem {entry['mem_ratio_c_b']}, c/b time {entry['time_ratio_c_b']}", file=sys.stderr)
    common.write_results(args.json, out)
    return out


if __name__ == "__main__":
    main()

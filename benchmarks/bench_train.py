"""Benchmark 2: training throughput, our batched step versus the original's per-example loop.

One training step over the same 8 examples (text lengths 50-200 after 576 image tokens, 3
phrases each, random ground-truth masks), with AdamW over the trained parameters:
  batched_ours        FLMMForGrounding(**batch of 8, masks=...) -> loss.backward() -> step
                      (one padded LMM forward with SDPA + capture; all 24 phrases through the
                      U-Net together)
  loop_original_eager the original's compute_loss: for each example, a batch-1 eager LMM forward
                      with output_attentions/output_hidden_states, slicing, merge, head, losses
                      weighted by phrase count; one backward, one step
  loop_ours           the same loop but each example through our model (SDPA + capture),
                      which separates the effect of batching from that of eager attention
No SAM refiner (its image encoder is frozen and per-example in both; not what is compared).
Each configuration runs in fresh child processes (see common.py), rounds interleaved; the
first step of each process gives the peak memory, the next `--reps` steps the time (on CUDA, after
one warm-up step; see common.py).

    python benchmarks/bench_train.py --json OUT.json
    python benchmarks/bench_train.py --device cuda --size 7b --json OUT.json
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

VARIANTS = ["batched_ours", "loop_original_eager", "loop_ours"]


def make_step(variant: str, model, inputs: dict, optimizer):
    import torch

    from flmm_hf.losses import mask_losses
    from flmm_hf.mask_head import crop_to_content

    batch = inputs["input_ids"].shape[0]
    examples = [common.example(inputs, b) for b in range(batch)]
    total_phrases = sum(m.shape[0] for m in inputs["masks"])

    def batched():
        optimizer.zero_grad(set_to_none=True)
        out = model(**inputs)
        out.loss.backward()
        optimizer.step()
        return float(out.loss.detach())

    def loop_ours():
        optimizer.zero_grad(set_to_none=True)
        loss = 0
        for ex in examples:
            out = model(**ex)
            loss = loss + out.loss * ex["masks"][0].shape[0]
        loss = loss / total_phrases
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def loop_original():
        optimizer.zero_grad(set_to_none=True)
        loss = 0
        head = model.head.mask_head
        head_dtype = next(head.parameters()).dtype
        for ex in examples:
            with torch.no_grad():
                outputs = model.lmm(**common.lmm_inputs(ex), output_attentions=True, output_hidden_states=True,
                                    use_cache=False)
            maps = common.original_maps(model, outputs, ex, 0)
            del outputs
            padded = head(maps.to(head_dtype))
            logits = crop_to_content(padded, ex["canvas_sizes"][0].tolist(), ex["content_boxes"][0].tolist())
            parts = mask_losses([logits], ex["masks"])
            loss = loss + (parts["loss_bce"] + parts["loss_dice"]) * ex["masks"][0].shape[0]
        loss = loss / total_phrases
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return {"batched_ours": batched, "loop_ours": loop_ours, "loop_original_eager": loop_original}[variant]


def child_main(payload: dict, out_path: str) -> None:
    import torch

    spec = ModelSpec(**payload["model"])
    inp = InputSpec(**payload["inputs"])
    variant = payload["variant"]
    device = payload.get("device", "cpu")
    if payload.get("threads"):
        torch.set_num_threads(payload["threads"])
    device_name = common.use_device(device)
    model = common.build_model(spec, device=device)
    model.train()
    common.set_text_attention(model, "eager" if variant == "loop_original_eager" else "flmm_sdpa")
    if variant == "loop_original_eager":
        model.head.mask_head.channels_last_training = False  # the original's mmseg U-Net trains in NCHW
    inputs = common.to_device(common.build_inputs(spec, inp), device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    step = make_step(variant, model, inputs, optimizer)
    result = common.measure_in_child(step, payload["reps"], device)
    result["info_examples"] = inp.batch
    result["info_threads"] = torch.get_num_threads()
    result["info_trained_params"] = sum(p.numel() for p in params)
    result["info_device"] = device_name
    common.write_child(out_path, result)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    common.add_model_args(parser)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--text-tokens", type=int, nargs="+", default=[50, 120, 200, 80, 160, 60, 180, 100])
    parser.add_argument("--phrases", type=int, default=3)
    common.add_run_args(parser, VARIANTS, rounds=3)
    args = parser.parse_args(argv)
    if args.child:
        common.child_entry(child_main, json.loads(args.child), args.child_out)
        return {}

    model = common.check_args(parser, args)
    text_tokens = [min(t, 40) for t in args.text_tokens] if args.size == "tiny" else args.text_tokens
    inp = InputSpec(batch=args.examples, text_tokens=text_tokens, phrases=args.phrases, with_masks=True)
    script = str(Path(__file__).resolve())

    def run_one(variant: str, r: int) -> dict:
        payload = dict(model=asdict(model), inputs=asdict(inp), variant=variant, reps=args.reps, threads=args.threads,
                       device=args.device)
        return common.run_measurement(script, child_main, payload, args.mem_cap_gb, args.fork)

    runs = common.interleaved(args.variants, args.rounds, run_one)
    results = {}
    for variant, rs in runs.items():
        agg = common.aggregate(rs)
        if agg.get("status") == "ok":
            times = [t for r in rs if r.get("status") == "ok" for t in (r["times_s"] or [r["first_s"]])]
            agg["examples_per_s"] = common.summarize([args.examples / t for t in times])
            cpu = [t for r in rs if r.get("status") == "ok" for t in (r["cpu_times_s"] or [r["first_cpu_s"]])]
            agg["examples_per_cpu_s"] = common.summarize([args.examples / t for t in cpu])
        results[variant] = agg | {"runs": rs}

    def eps(v, key="examples_per_s"):
        try:
            return results[v][key]["median"]
        except KeyError:
            return None

    out = dict(
        benchmark="train", command=common.command("bench_train.py", argv),
        environment=common.environment(args.device), device=args.device, model=asdict(model), inputs=asdict(inp), rounds=args.rounds,
        reps=args.reps, threads=args.threads, results=results,
        speedup_batched_vs_original=(eps("batched_ours") / eps("loop_original_eager"))
        if eps("batched_ours") and eps("loop_original_eager") else None,
        speedup_batched_vs_loop_ours=(eps("batched_ours") / eps("loop_ours"))
        if eps("batched_ours") and eps("loop_ours") else None,
        cpu_speedup_batched_vs_original=(eps("batched_ours", "examples_per_cpu_s")
                                         / eps("loop_original_eager", "examples_per_cpu_s"))
        if eps("batched_ours", "examples_per_cpu_s") and eps("loop_original_eager", "examples_per_cpu_s") else None,
        cpu_speedup_batched_vs_loop_ours=(eps("batched_ours", "examples_per_cpu_s")
                                          / eps("loop_ours", "examples_per_cpu_s"))
        if eps("batched_ours", "examples_per_cpu_s") and eps("loop_ours", "examples_per_cpu_s") else None,
        mem_ratio_original_vs_batched=common.ratio(results.get("loop_original_eager", {}),
                                                   results.get("batched_ours", {}), "activation_mb"),
    )
    print({k: v for k, v in out.items() if k.startswith(("speedup", "cpu_speedup", "mem_"))}, file=sys.stderr)
    for v in results:
        print(v, eps(v), results[v].get("activation_mb", {}).get("median"), file=sys.stderr)
    common.write_results(args.json, out)
    return out


if __name__ == "__main__":
    main()

"""Benchmark of the two CPU-specific choices inside the training step, each against its alternative, side by side.

  head      the U-Net head, forward + backward over 24 phrase maps (8 examples x 3 phrases, 64 channels,
            24 x 24 grid), in NCHW (as the original's mmseg U-Net, and ours at inference) versus channels-last
            (ours while training on CPU)
  attention one layer's attention over a left-padded batch of 8 (heads 8, head dim 64, lengths 631-781 as in
            bench_train.py): SDPA with the padded causal mask (transformers' "sdpa") versus each sequence's
            real tokens on their own with `is_causal=True` (our "flmm_sdpa" on CPU)

Both alternatives of a part run in the same process, alternating, after one warm-up call each; reported are the
median and spread of the per-call CPU time (`time.process_time`) and wall time, and the ratio of the medians: of
the CPU time on the CPU, of the wall time on CUDA (`--device cuda`, measured between `torch.cuda.synchronize()`
calls; both choices are the CPU's, this shows what they would do on a GPU).

    python benchmarks/bench_parts.py --json OUT.json
    python benchmarks/bench_parts.py --device cuda --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from flmm_hf.attention_capture import causal_padding_spans  # noqa: E402
from flmm_hf.mask_head import UNetMaskHead  # noqa: E402

TEXT_TOKENS = [50, 120, 200, 80, 160, 60, 180, 100]
PREFIX = 581  # [BOS] + 4 prompt tokens + 576 image tokens


def head_calls(phrases: int, channels: int, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    head = UNetMaskHead(channels).train().to(device)
    maps = torch.rand(phrases, channels, 24, 24, device=device)

    def run(channels_last: bool):
        def call():
            head.channels_last_training = channels_last
            head.zero_grad(set_to_none=True)
            head(maps).sum().backward()

        return call

    return {"nchw": run(False), "channels_last": run(True)}


def attention_calls(heads: int, head_dim: int, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    lengths = [PREFIX + t for t in TEXT_TOKENS]
    batch, length = len(lengths), max(lengths)
    query, key, value = (torch.randn(batch, heads, length, head_dim, device=device) for _ in range(3))
    real = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for b, n in enumerate(lengths):
        real[b, length - n :] = True  # left padding
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask = (causal[None] & real[:, None, :])[:, None]  # what transformers' sdpa_mask builds

    def masked():
        F.scaled_dot_product_attention(query, key, value, attn_mask=mask)

    def per_sequence():
        spans = causal_padding_spans(mask, length, length)  # the check is part of the cost
        for b, (start, end) in enumerate(spans):
            F.scaled_dot_product_attention(
                query[b : b + 1, :, start:end], key[b : b + 1, :, start:end], value[b : b + 1, :, start:end],
                is_causal=True,
            )

    return {"padded_mask": masked, "per_sequence": per_sequence}


def measure(calls: dict, reps: int, device: str = "cpu") -> dict:
    for call in calls.values():
        call()  # warm-up
    cpu = {name: [] for name in calls}
    wall = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            common.synchronize(device)
            c0, w0 = time.process_time(), time.perf_counter()
            call()
            common.synchronize(device)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {name: {"cpu_s": common.summarize(cpu[name]), "wall_s": common.summarize(wall[name])} for name in calls}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="small sizes, for the smoke test")
    common.add_device_arg(parser)
    args = parser.parse_args(argv)
    common.check_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = common.use_device(args.device)  # this script measures in its own process

    phrases, channels, heads = (3, 8, 2) if args.tiny else (24, 64, 8)
    parts = {"head": measure(head_calls(phrases, channels, args.device), args.reps, args.device),
             "attention": measure(attention_calls(heads, 64, args.device), args.reps, args.device)}
    timed_by = "wall_s" if common.is_cuda(args.device) else "cpu_s"  # a GPU's work is not CPU time
    ratios = {
        "head_nchw_over_channels_last": parts["head"]["nchw"][timed_by]["median"]
        / parts["head"]["channels_last"][timed_by]["median"],
        "attention_padded_over_per_sequence": parts["attention"]["padded_mask"][timed_by]["median"]
        / parts["attention"]["per_sequence"][timed_by]["median"],
    }
    out = dict(benchmark="parts", command=common.command("bench_parts.py", argv),
               environment=common.environment(args.device), device=args.device, device_name=device_name,
               reps=args.reps, threads=torch.get_num_threads(),
               sizes=dict(phrases=phrases, channels=channels, heads=heads, text_tokens=TEXT_TOKENS),
               parts=parts, time_ratios=ratios, timed_by=timed_by)
    print(json.dumps(ratios), file=sys.stderr)
    common.write_results(args.json, out)
    return out


if __name__ == "__main__":
    main()

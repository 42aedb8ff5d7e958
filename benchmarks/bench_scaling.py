"""Benchmark 3: how the grounding forward's cost grows with sequence length and phrase count.

Batch 1, the default model of bench_forward.py, variants (a) bare SDPA, (b) ours, (c) original
eager, each in fresh child processes (see common.py).
  --lengths: total tokens (image + text). Image tokens are 576 (llava-1.5) when the length allows
             it (>= 1024), else a smaller square grid (256 -> 11x11 = 121, 512 -> 16x16 = 256);
             the rest is text, 3 phrases of 3 tokens at the end.
  --phrases: number of phrases (3 tokens each) at 576 image tokens + 200 text tokens.
Eager runs whose full attention maps alone would exceed `--mem-cap-gb` are not started
(`skipped_estimate`); a run whose RSS passes the cap is killed (`exceeded_cap`).

    python benchmarks/bench_scaling.py --json OUT.json
    python benchmarks/bench_scaling.py --device cuda --size 7b --json OUT.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_forward import ratios, run_variants  # noqa: E402
from common import InputSpec, ModelSpec  # noqa: E402


def grid_for_length(length: int) -> int:
    if length >= 1024:
        return 24
    return {256: 11, 512: 16}.get(length, max(4, int((length / 2) ** 0.5)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    common.add_model_args(parser)
    parser.add_argument("--lengths", type=int, nargs="*", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--phrases", type=int, nargs="*", default=[1, 4, 16, 48])
    common.add_run_args(parser, common.VARIANTS, rounds=2)
    args = parser.parse_args(argv)

    base = common.check_args(parser, args)
    tiny = args.size == "tiny"
    out = dict(benchmark="scaling", command=common.command("bench_scaling.py", argv),
               environment=common.environment(args.device), device=args.device, model=asdict(base), rounds=args.rounds, reps=args.reps,
               mem_cap_gb=args.mem_cap_gb, threads=args.threads, by_length={}, by_phrases={})
    for length in args.lengths:
        grid = grid_for_length(length) if not tiny else 4
        model = ModelSpec(**(asdict(base) | dict(image_size=grid * base.patch,
                                                 max_positions=max(base.max_positions, length + 8))))
        text = length - 1 - common.PREFIX_TOKENS - model.image_tokens
        inp = InputSpec(batch=1, text_tokens=[text], phrases=3, phrase_len=3)
        res = run_variants(model, inp, args.variants, args.rounds, args.reps, args.mem_cap_gb, threads=args.threads,
                          label=f"L={length}", device=args.device, fork=args.fork)
        out["by_length"][str(length)] = dict(image_tokens=model.image_tokens, text_tokens=text, results=res,
                                             **ratios(res))
    for k in args.phrases:
        text = 40 if tiny else 200
        inp = InputSpec(batch=1, text_tokens=[text], phrases=k, phrase_len=3 if not tiny else 1)
        variants = [v for v in args.variants if v != "a_bare_sdpa"] if k != args.phrases[0] else args.variants
        res = run_variants(base, inp, variants, args.rounds, args.reps, args.mem_cap_gb, threads=args.threads,
                          label=f"K={k}", device=args.device, fork=args.fork)
        out["by_phrases"][str(k)] = dict(results=res, **ratios(res))
    common.write_results(args.json, out)
    for key in ("by_length", "by_phrases"):
        for point, entry in out[key].items():
            line = "  ".join(
                f"{v}: t={r.get('time_s', {}).get('median')} act={r.get('activation_mb', {}).get('median')}"
                if r.get("status") == "ok" else f"{v}: {r.get('status')}" for v, r in entry["results"].items())
            print(f"{key} {point}: {line}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()

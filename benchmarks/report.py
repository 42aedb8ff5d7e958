"""Markdown tables from the JSON files the benchmarks write (used to fill BENCHMARKS.md).

    python benchmarks/report.py --forward F.json --train T.json --scaling S.json --projection P.json
    python benchmarks/report.py --suite SUITE.json          # the one-command suite (benchmarks/suite.py)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAMES = {"a_bare_sdpa": "(a) bare LMM, SDPA", "b_ours_capture": "(b) ours: SDPA + capture + head",
         "c_original_eager": "(c) original: eager + output_attentions"}


def spread(stat: dict | None, fmt: str = "{:.2f}") -> str:
    if not stat or stat.get("median") is None:
        return "-"
    return f"{fmt.format(stat['median'])} [{fmt.format(stat['min'])}-{fmt.format(stat['max'])}] (n={stat['n']})"


def fnum(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def peak(r: dict) -> dict | None:
    """The total peak memory of a result (`peak_mb`; `peak_rss_mb` in files written before the CUDA support)."""
    return r.get("peak_mb", r.get("peak_rss_mb"))


def memory_name(data: dict) -> str:
    return "CUDA max allocated" if str(data.get("device", "cpu")).startswith("cuda") else "peak RSS"


def forward_tables(data: dict) -> str:
    lines = []
    for batch, entry in data["by_batch"].items():
        lines.append(f"\nBatch {batch} (padded length {next(iter(entry['results'].values())).get('info_seq_len')}):\n")
        lines.append(f"| variant | CPU s, median [min-max] | wall s | activation MB | {memory_name(data)} MB |")
        lines.append("|---|---|---|---|---|")
        for v, r in entry["results"].items():
            if r.get("status") != "ok":
                lines.append(f"| {NAMES.get(v, v)} | {r.get('status')} | | |")
                continue
            lines.append(f"| {NAMES.get(v, v)} | {spread(r.get('cpu_s'))} | {spread(r['time_s'])} | "
                         f"{spread(r['activation_mb'], '{:.0f}')} | "
                         f"{spread(peak(r), '{:.0f}')} |")
        b = entry["results"].get("b_ours_capture", {})
        if "info_head_s" in b:
            lines.append(f"\n(b) split, CPU s, median over processes: LMM forward with capture "
                         f"{b.get('info_capture_forward_cpu_s', float('nan')):.3f} s, U-Net head "
                         f"{b.get('info_head_cpu_s', float('nan')):.3f} s; "
                         f"captured maps {b['info_captured_maps_bytes'] / 2**20:.2f} MB.")
        lines.append(f"\nRatios (medians): b/a CPU time **{fnum(entry.get('cpu_ratio_b_a'))}**, c/b CPU time "
                     f"{fnum(entry.get('cpu_ratio_c_b'))}, b/a wall {fnum(entry['time_ratio_b_a'])}, b/a activation memory "
                     f"**{fnum(entry['mem_ratio_b_a'])}**, c/b activation memory **{fnum(entry['mem_ratio_c_b'])}**, "
                     f"c/b wall {fnum(entry['time_ratio_c_b'])}; on the total peak ({memory_name(data)}): b/a "
                     f"{fnum(entry['total_mem_ratio_b_a'], '{:.3f}')}, c/b {fnum(entry['total_mem_ratio_c_b'], '{:.3f}')}.")
    return "\n".join(lines)


def train_table(data: dict) -> str:
    lines = ["| variant | examples per CPU s, median [min-max] | step CPU s | examples/s wall | activation MB | "
             f"{memory_name(data)} MB |",
             "|---|---|---|---|---|---|"]
    for v, r in data["results"].items():
        if r.get("status") != "ok":
            lines.append(f"| {v} | {r.get('status')} | | | |")
            continue
        lines.append(f"| {v} | {spread(r.get('examples_per_cpu_s'), '{:.3f}')} | {spread(r.get('cpu_s'))} | "
                     f"{spread(r['examples_per_s'], '{:.3f}')} | "
                     f"{spread(r['activation_mb'], '{:.0f}')} | {spread(peak(r), '{:.0f}')} |")
    lines.append(f"\nSpeed-up (CPU time) batched / original loop: **{fnum(data.get('cpu_speedup_batched_vs_original'))}x**, "
                 f"batched / our own loop: {fnum(data.get('cpu_speedup_batched_vs_loop_ours'))}x; wall clock: "
                 f"{fnum(data['speedup_batched_vs_original'])}x and "
                 f"{fnum(data['speedup_batched_vs_loop_ours'])}x; activation memory "
                 f"original / batched: {fnum(data['mem_ratio_original_vs_batched'])}.")
    return "\n".join(lines)


def scaling_tables(data: dict) -> str:
    def cell(r, key, fmt):
        if r is None:
            return "-"
        if r.get("status") != "ok":
            extra = r.get("runs", [{}])[0]
            detail = (f" (maps alone ~{extra['estimated_eager_maps_gb']:.1f} GB)" if "estimated_eager_maps_gb" in extra
                      else f" (RSS > {extra.get('cap_gb')} GB)" if r.get("status") == "exceeded_cap" else "")
            return r.get("status") + detail
        return fmt.format(r[key]["median"])

    lines = ["| tokens (image+text) | a time s | b time s | c time s | a act. MB | b act. MB | c act. MB | c/b mem |",
             "|---|---|---|---|---|---|---|---|"]
    for length, e in data["by_length"].items():
        res = e["results"]
        a, b, c = (res.get(k) for k in ("a_bare_sdpa", "b_ours_capture", "c_original_eager"))
        lines.append(f"| {length} ({e['image_tokens']}+{e['text_tokens'] + 5}) | {cell(a, 'time_s', '{:.2f}')} | "
                     f"{cell(b, 'time_s', '{:.2f}')} | {cell(c, 'time_s', '{:.2f}')} | {cell(a, 'activation_mb', '{:.0f}')} | "
                     f"{cell(b, 'activation_mb', '{:.0f}')} | {cell(c, 'activation_mb', '{:.0f}')} | "
                     f"{fnum(e.get('mem_ratio_c_b'))} |")
    lines += ["", "| phrases (3 tokens each) | b time s | c time s | b act. MB | c act. MB | b head s |",
              "|---|---|---|---|---|---|"]
    for k, e in data["by_phrases"].items():
        res = e["results"]
        b, c = res.get("b_ours_capture"), res.get("c_original_eager")
        head = fnum(b.get("info_head_s")) if b and b.get("status") == "ok" else "-"
        lines.append(f"| {k} | {cell(b, 'time_s', '{:.2f}')} | {cell(c, 'time_s', '{:.2f}')} | "
                     f"{cell(b, 'activation_mb', '{:.0f}')} | {cell(c, 'activation_mb', '{:.0f}')} | {head} |")
    return "\n".join(lines)


def projection_tables(data: dict) -> str:
    lines = ["| model | batch | tokens | eager maps: measured = formula (MB) | captured: measured = formula (MB) | ratio |",
             "|---|---|---|---|---|---|"]
    for c in data["checks"]:
        m = c["model"]
        lines.append(f"| {m['layers']}L x {m['heads']}H | {c['batch']} | {c['tokens']} | "
                     f"{c['eager_maps_bytes'] / 2**20:.2f} = {c['eager_formula_bytes'] / 2**20:.2f} "
                     f"({'exact' if c['eager_matches'] else 'MISMATCH'}) | {c['captured_bytes'] / 2**20:.3f} = "
                     f"{c['captured_formula_bytes'] / 2**20:.3f} ({'exact' if c['captured_matches'] else 'MISMATCH'}) | "
                     f"{c['ratio_full_over_captured']:.1f} |")
    lines += ["", "| tokens | phrase rows | original full maps (bf16) GB | ours captured (fp32) MB | ratio |"
              " original transient fp32 softmax / layer GB | ours transient scores / layer MB |",
              "|---|---|---|---|---|---|---|"]
    for r in data["projection_7b"]:
        lines.append(f"| {r['tokens']} | {r['query_rows']} | {r['original_full_maps_gb']:.2f} | {r['ours_captured_mb']:.1f} | "
                     f"{r['ratio_full_over_captured']:.0f} | {r['original_transient_fp32_softmax_per_layer_gb']:.3f} | "
                     f"{r['ours_transient_scores_per_layer_mb']:.2f} |")
    if data.get("forward_check"):
        lines += ["", "| batch | tokens | measured c-a activation MB | formula full maps MB | measured b-a MB |"
                  " formula hidden states MB | formula captured MB |", "|---|---|---|---|---|---|---|"]
        for r in data["forward_check"]:
            lines.append(f"| {r['batch']} | {r['tokens']} | {r['measured_c_minus_a_mb']:.0f} | {r['formula_full_maps_mb']:.0f} | "
                         f"{r['measured_b_minus_a_mb']:.0f} | {r['formula_hidden_states_mb']:.0f} | "
                         f"{r['formula_captured_mb']:.1f} |")
    return "\n".join(lines)


def suite_table(data: dict) -> str:
    """The headline values of a `benchmarks/suite.py` run, each with its issue #16 goal where it has one."""
    model, env = data["model"], data.get("environment", {})
    gpus = ", ".join(g.get("name", "?") for g in env.get("gpus") or []) or env.get("cpu", "?")
    goals = data.get("goals", {})

    def goal(key: str) -> str:
        g = goals.get(key)
        if not g:
            return "-"
        met = "-" if g["met"] is None else ("yes" if g["met"] else "**no**")
        return f"{g['goal']} ({'met: ' + met if g['applies'] else 'applies to ' + g['setting']})"

    batch = data.get("forward_headline_batch")
    rows = [
        (f"forward time, ours / bare (b/a, wall clock, batch {batch})", fnum(data["time_ratio_b_a"]), goal("time_ratio_b_a")),
        (f"forward activation memory, ours / bare (b/a, batch {batch})", fnum(data["mem_ratio_b_a"]), "-"),
        (f"forward activation memory, original eager / ours (c/b, batch {batch})", fnum(data["mem_ratio_c_b"]), "-"),
        (f"training examples/s, batched / original loop ({data['plan']['train_examples']} examples)",
         fnum(data["train_speedup_batched_vs_original"]), goal("train_speedup_batched_vs_original")),
        (f"weight memory, {data['quantized_method']} / {data['quantized_reference_dtype']} "
         f"({fnum(data['quantized_weight_mb'], '{:.0f}')} / {fnum(data['unquantized_weight_mb'], '{:.0f}')} MB, "
         f"{data['quantized_measured_by']})", fnum(data["quantized_weight_mem_ratio"], "{:.3f}"), "-"),
    ]
    elapsed = data.get("elapsed_s", {})
    lines = [f"Size `{data['size']}` ({model['layers']} layers, hidden {model['hidden']}, {model['heads']} heads, "
             f"{model['dtype']}) on `{data['device']}` ({gpus}); {fnum(elapsed.get('total'), '{:.0f}')} s in all "
             f"(forward {fnum(elapsed.get('forward'), '{:.0f}')} s, training {fnum(elapsed.get('train'), '{:.0f}')} s, "
             f"quantized {fnum(elapsed.get('quantized'), '{:.0f}')} s).", "",
             "| measure | value | goal |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {g} |" for name, value, g in rows]
    if data.get("missing"):
        lines.append(f"\nNot measured: {', '.join(data['missing'])} (see the statuses in the JSON).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("forward", "train", "scaling", "projection", "suite"):
        parser.add_argument(f"--{name}", default=None)
    args = parser.parse_args()
    for name, fn in (("forward", forward_tables), ("train", train_table), ("scaling", scaling_tables),
                     ("projection", projection_tables), ("suite", suite_table)):
        path = getattr(args, name)
        if path and Path(path).exists():
            data = json.loads(Path(path).read_text())
            env = data.get("environment", {})
            print(f"\n## {name}\n\n`{data.get('command')}` ({env.get('date')}, load {env.get('load_avg_at_start')})\n")
            print(fn(data))


if __name__ == "__main__":
    main()

"""Benchmark 4: memory of the attention F-LMM needs, projected to a 7B backbone, from formulas
checked against measured tensors and measured peak memory.

Per example, with L tokens (image + text), n_img image tokens, n_q phrase-token rows, K phrases:
  original (eager, output_attentions=True): all layers' full maps stay alive until the forward
      returns:                        layers * heads * L * L * itemsize(model dtype)
      plus, transiently in each layer, the fp32 softmax of the scores: heads * L * L * 4
  ours (SDPA + capture): only the selected rows and image columns, in float32:
                                      layers * heads * n_q * n_img * 4
      plus, transiently in each layer, the fp32 scores of the selected rows: heads * n_q * L * 4
  both: the merged per-phrase maps the head gets: K * layers * heads * n_img * 4

    python benchmarks/projection.py --json OUT.json [--forward-json FORWARD.json] [--device cuda]

The check builds small random LLaVA models in this process and compares the formulas with the
bytes of the tensors eager attention returns and the capture keeps (they must be equal). With
`--forward-json` (the output of bench_forward.py) it also compares the measured extra peak memory
of (c) over (a) with the formula for the full maps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import InputSpec, ModelSpec  # noqa: E402

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def full_maps_bytes(layers, heads, length, itemsize) -> int:
    return layers * heads * length * length * itemsize


def captured_bytes(layers, heads, n_query, n_image) -> int:
    return layers * heads * n_query * n_image * 4


def merged_bytes(phrases, layers, heads, n_image) -> int:
    return phrases * layers * heads * n_image * 4


def project_7b(lengths, query_rows, phrases=3) -> list[dict]:
    """LLaVA-1.5-7B: 32 layers x 32 heads, bf16 weights and eager maps, 576 image tokens."""
    rows = []
    for length in lengths:
        for n_q in query_rows:
            full = full_maps_bytes(32, 32, length, 2)
            cap = captured_bytes(32, 32, n_q, 576)
            rows.append(dict(
                tokens=length, query_rows=n_q, original_full_maps_gb=full / 2**30,
                original_transient_fp32_softmax_per_layer_gb=32 * length * length * 4 / 2**30,
                ours_captured_mb=cap / 2**20, ours_transient_scores_per_layer_mb=32 * n_q * length * 4 / 2**20,
                merged_maps_mb=merged_bytes(phrases, 32, 32, 576) / 2**20, ratio_full_over_captured=full / cap,
            ))
    return rows


def check_small(specs: list[tuple[ModelSpec, InputSpec]], device: str = "cpu") -> list[dict]:
    """Measured bytes of eager's returned maps and of the capture versus the formulas."""
    import torch

    from flmm_hf.attention_capture import AttentionCapture

    checks = []
    for spec, inp in specs:
        model = common.build_model(spec, device=device)
        inputs = common.to_device(common.build_inputs(spec, inp), device)
        lmm_in = common.lmm_inputs(inputs)
        length = inputs["input_ids"].shape[1]
        image_mask = inputs["input_ids"] == model.image_token_id
        with torch.no_grad():
            common.set_text_attention(model, "eager")
            eager = model.lmm(**lmm_in, output_attentions=True, use_cache=False)
            eager_bytes = sum(a.numel() * a.element_size() for a in eager.attentions)
            del eager
            common.set_text_attention(model, "flmm_sdpa")
            with AttentionCapture(model.lmm, None, inputs["phrase_ids"] >= 0, image_mask) as capture:
                model.lmm(**lmm_in, use_cache=False)
            cap_bytes = sum(a.numel() * a.element_size() for a in capture.attentions)
        n_q = int((inputs["phrase_ids"] >= 0).sum())
        n_img = int(image_mask.sum())
        full_formula = inp.batch * full_maps_bytes(spec.layers, spec.heads, length, ITEMSIZE[spec.dtype])
        cap_formula = sum(  # per example: its phrase rows x its image columns
            captured_bytes(spec.layers, spec.heads, int(q.sum()), int(i.sum()))
            for q, i in zip(inputs["phrase_ids"] >= 0, image_mask))
        checks.append(dict(
            model=dict(layers=spec.layers, heads=spec.heads, hidden=spec.hidden), batch=inp.batch, tokens=length,
            query_rows=n_q, image_tokens=n_img, eager_maps_bytes=eager_bytes, eager_formula_bytes=full_formula,
            captured_bytes=cap_bytes, captured_formula_bytes=cap_formula,
            eager_matches=eager_bytes == full_formula, captured_matches=cap_bytes == cap_formula,
            ratio_full_over_captured=eager_bytes / cap_bytes,
        ))
        print(checks[-1], file=sys.stderr)
    return checks


def check_forward_json(path: str) -> list[dict]:
    """Measured (c) - (a) activation memory versus the full maps kept by eager attention."""
    data = json.loads(Path(path).read_text())
    spec = data["model"]
    rows = []
    for batch, entry in data["by_batch"].items():
        res = entry["results"]
        a, b, c = res.get("a_bare_sdpa", {}), res.get("b_ours_capture", {}), res.get("c_original_eager", {})
        if not all(x.get("status") == "ok" for x in (a, b, c)):
            continue
        length = a["info_seq_len"]
        maps = int(batch) * full_maps_bytes(spec["layers"], spec["heads"], length, ITEMSIZE[spec["dtype"]])
        hidden = (spec["layers"] + 1) * int(batch) * length * spec["hidden"] * ITEMSIZE[spec["dtype"]]
        rows.append(dict(
            batch=int(batch), tokens=length,
            measured_c_minus_a_mb=c["activation_mb"]["median"] - a["activation_mb"]["median"],
            measured_b_minus_a_mb=b["activation_mb"]["median"] - a["activation_mb"]["median"],
            formula_full_maps_mb=maps / 2**20,
            formula_hidden_states_mb=hidden / 2**20,
            # every example has the same number of phrase rows in bench_forward
            formula_captured_mb=captured_bytes(spec["layers"], spec["heads"], b["info_query_rows"],
                                              (spec["image_size"] // spec["patch"]) ** 2) / 2**20,
        ))
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--tiny", action="store_true", help="check on the tiny model only")
    parser.add_argument("--forward-json", default=None)
    common.add_device_arg(parser)
    args = parser.parse_args(argv)
    common.check_args(parser, args)
    common.use_device(args.device)

    if args.tiny:
        specs = [(common.TINY, InputSpec(batch=2, text_tokens=[20, 30]))]
    else:
        small = ModelSpec(layers=2, hidden=128, heads=4, kv_heads=4, intermediate=256, mask_head_channels=8)
        gqa = ModelSpec(layers=3, hidden=128, heads=8, kv_heads=2, intermediate=256, mask_head_channels=8)
        specs = [(small, InputSpec(batch=1, text_tokens=[120])),
                 (small, InputSpec(batch=2, text_tokens=[50, 200], phrases=5)),
                 (gqa, InputSpec(batch=1, text_tokens=[100]))]
    out = dict(benchmark="projection", command=common.command("projection.py", argv),
               environment=common.environment(args.device), device=args.device, checks=check_small(specs, args.device),
               projection_7b=project_7b([700, 1024, 2048, 4096], [9, 30, 150]))
    if args.forward_json:
        out["forward_check"] = check_forward_json(args.forward_json)
    common.write_results(args.json, out)
    for row in out["projection_7b"]:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, file=sys.stderr)
    for row in out.get("forward_check", []):
        print(row, file=sys.stderr)
    return out


if __name__ == "__main__":
    main()

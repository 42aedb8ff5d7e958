"""What quantizing the frozen LMM saves and changes: weight memory and mask agreement, torchao int8 vs unquantized.

The random LLaVA-1.5-shaped model of the other benchmarks (8 layers, hidden 512, 8 heads, MLP 1408, llava-1.5's
32064-token vocabulary, 576 image tokens) is saved to a temporary folder and loaded three ways with
`FLMMForGrounding.from_lmm(folder, ...)`: float32, bfloat16, and torchao weight-only int8 (`Int8WeightOnlyConfig`,
the CPU-runnable quantization; it quantizes every `nn.Linear` of the LMM, not the embeddings), the rest in float32,
and for the memory also int8 with the rest in bfloat16. The F-LMM head is the same (seeded) in every model and has
no SAM refiner.

Weight memory: `flmm_hf.quantization.weight_memory_bytes` of the LMM, and of its decoder layers alone (where a 7B
model's weights are: the embeddings of this small model are a large share of it, of a 7B model about 4 %).
Mask agreement (float32 LMM vs int8 LMM, the same inputs: a left-padded batch of 4, 3 phrases each): the phrase
maps the head receives (max |difference| and the maps' max), the coarse mask logits, and the masks (logits > 0):
pixel agreement and mean IoU over the 12 phrases.

    python benchmarks/bench_quantized_grounding.py --json benchmarks/results/quantized_grounding.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from flmm_hf import FLMMForGrounding  # noqa: E402
from flmm_hf.quantization import weight_memory_bytes  # noqa: E402

SPEC = common.ModelSpec(layers=8, hidden=512, heads=8, kv_heads=8, intermediate=1408)
INPUTS = common.InputSpec(batch=4, text_tokens=[50, 120, 200, 80], phrases=3, phrase_len=3)


def load(folder: str, **kwargs) -> FLMMForGrounding:
    torch.manual_seed(0)  # the same head in every model
    return FLMMForGrounding.from_lmm(folder, use_sam=False, mask_head_channels=SPEC.mask_head_channels, **kwargs).eval()


def memory(model: FLMMForGrounding) -> dict[str, float]:
    return {
        "lmm_mb": weight_memory_bytes(model.lmm) / 2**20,
        "decoder_layers_mb": weight_memory_bytes(model.lmm.model.language_model.layers) / 2**20,
    }


def timed_forward(model: FLMMForGrounding, inputs: dict) -> tuple[object, list[torch.Tensor], float]:
    with torch.no_grad():
        model(**inputs)  # warm-up
        start = time.perf_counter()
        output = model(**inputs)
        seconds = time.perf_counter() - start
        maps = model.phrase_attention(**inputs)
    return output, maps, seconds


def main() -> None:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import LlavaForConditionalGeneration, TorchAoConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlavaForConditionalGeneration(common.llava_config(SPEC)).save_pretrained(folder)
        plain = load(folder, dtype=torch.float32)
        bf16 = load(folder, dtype=torch.bfloat16)
        mem = {"float32": memory(plain), "bfloat16": memory(bf16)}
        int8 = load(folder, dtype=torch.float32, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
        mem["int8"] = memory(int8)
        del bf16
        # int8 Linear layers, the rest (embeddings, norms, vision tower's convolution) in bfloat16 as the paper runs
        int8_bf16 = load(folder, dtype=torch.bfloat16, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
        mem["int8_rest_bfloat16"] = memory(int8_bf16)
        del int8_bf16
        inputs = common.build_inputs(SPEC, INPUTS)
        ref_out, ref_maps, ref_s = timed_forward(plain, inputs)
        q_out, q_maps, q_s = timed_forward(int8, inputs)
    map_diff = max((a - b).abs().max().item() for a, b in zip(q_maps, ref_maps))
    map_max = max(a.abs().max().item() for a in ref_maps)
    logit_diff = max((a - b).abs().max().item() for a, b in zip(q_out.coarse_logits, ref_out.coarse_logits))
    logit_max = max(a.abs().max().item() for a in ref_out.coarse_logits)
    agree, ious = [], []
    for a, b in zip(q_out.coarse_logits, ref_out.coarse_logits):
        for qa, rb in zip(a > 0, b > 0):
            agree.append((qa == rb).float().mean().item())
            union = (qa | rb).sum().item()
            ious.append((qa & rb).sum().item() / union if union else 1.0)
    results = {
        "model": common.asdict(SPEC),
        "inputs": common.asdict(INPUTS),
        "weight_memory": mem,
        "ratio_int8_vs_float32": {k: mem["int8"][k] / mem["float32"][k] for k in mem["int8"]},
        "ratio_int8_rest_bfloat16_vs_bfloat16": {
            k: mem["int8_rest_bfloat16"][k] / mem["bfloat16"][k] for k in mem["int8"]
        },
        "phrase_maps_max_abs_diff": map_diff,
        "phrase_maps_max": map_max,
        "coarse_logits_max_abs_diff": logit_diff,
        "coarse_logits_max": logit_max,
        "mask_pixel_agreement_mean": sum(agree) / len(agree),
        "mask_pixel_agreement_min": min(agree),
        "mask_iou_mean": sum(ious) / len(ious),
        "mask_iou_min": min(ious),
        "forward_seconds": {"float32": ref_s, "int8": q_s},
        "environment": common.environment(),
    }
    print(json.dumps({k: v for k, v in results.items() if k not in ("model", "inputs", "environment")}, indent=2))
    if args.json:
        common.write_results(args.json, results)


if __name__ == "__main__":
    main()

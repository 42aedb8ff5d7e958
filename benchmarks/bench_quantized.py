"""Benchmark 5: weight memory of the frozen LMM quantized with transformers' own API, versus unquantized.

A random LLaVA of `--size` (built on the device in its dtype, bf16 on CUDA; never downloaded) is
saved to a temporary folder and loaded back with
`LlavaForConditionalGeneration.from_pretrained(folder, quantization_config=...)`:
  bnb-4bit      `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=<dtype>)` (bitsandbytes, CUDA)
  torchao-int8  `TorchAoConfig(Int8WeightOnlyConfig())` (torchao, CPU or CUDA)
  auto          bnb-4bit on CUDA, torchao-int8 on the CPU (the default)
Weight memory is measured twice: the bytes of all parameters and buffers, counted through tensor
subclasses (torchao's quantized weights are int8 data plus scales), and on CUDA also
`torch.cuda.memory_allocated()` with each model alone on the device, which counts everything the
weights hold there (bitsandbytes' block scales too) and gives the ratio on CUDA. Both models run in
one child process (see common.py), the unquantized one deleted before the quantized one is loaded.
The 7b size writes its 14 GB of bf16 weights to the temporary folder (`--tmp-dir`).

    python benchmarks/bench_quantized.py --json OUT.json                           # torchao int8, CPU
    python benchmarks/bench_quantized.py --device cuda --size 7b --json OUT.json   # bitsandbytes 4-bit

The JSON holds `quantized_weight_mem_ratio` (quantized / unquantized weight memory; bytes counted by
`flmm_hf.quantization.weight_memory_bytes`), `method`,
`measured_by`, both sizes in MB, and which linear layers transformers left unquantized.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import ModelSpec  # noqa: E402

METHODS = {"bnb-4bit": "bitsandbytes", "torchao-int8": "torchao"}


def resolve_method(method: str, device: str) -> str:
    """`--quant-method` with `auto` resolved; a ValueError with the fix when it cannot run here."""
    if method == "auto":
        method = "bnb-4bit" if common.is_cuda(device) else "torchao-int8"
    if method not in METHODS:
        raise ValueError(f"--quant-method {method!r}: choose auto, {', '.join(METHODS)}")
    if method == "bnb-4bit" and not common.is_cuda(device):
        raise ValueError("--quant-method bnb-4bit needs --device cuda (bitsandbytes' 4-bit kernels); on the CPU use "
                         "--quant-method torchao-int8")
    if importlib.util.find_spec(METHODS[method]) is None:
        alternative = " or --quant-method torchao-int8" if method == "bnb-4bit" else ""
        raise ValueError(f"--quant-method {method} needs the {METHODS[method]} package: pip install "
                         f"{METHODS[method]}{alternative}")
    return method


def quantization_config(method: str, dtype: str):
    """transformers' quantization config of `method`; 4-bit layers compute in `dtype`."""
    import torch

    if method == "bnb-4bit":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=getattr(torch, dtype))
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def linear_layers(model) -> dict:
    """How many `nn.Linear` layers hold a quantized weight (a tensor subclass), and the names of those that do not."""
    import torch

    plain = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and type(m.weight) in (torch.Tensor, torch.nn.Parameter)]
    total = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    return dict(linear_layers=total, quantized_linear_layers=total - len(plain), unquantized_linear_layers=plain[:20],
                unquantized_linear_layers_count=len(plain))


def child_main(payload: dict, out_path: str) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration
    from flmm_hf.quantization import weight_memory_bytes
    from transformers.utils import logging

    logging.disable_progress_bar()
    spec, device, method = ModelSpec(**payload["model"]), payload["device"], payload["method"]
    if payload.get("threads"):
        torch.set_num_threads(payload["threads"])
    device_name = common.use_device(device)
    cuda = common.is_cuda(device)

    def allocated() -> int | None:
        common.synchronize(device)
        return torch.cuda.memory_allocated(device) if cuda else None

    config = quantization_config(method, spec.dtype)
    start = allocated()
    lmm = common.build_lmm(spec, device=device)
    unquantized = dict(storage_bytes=weight_memory_bytes(lmm), cuda_allocated_bytes=allocated() - start if cuda else None)
    with tempfile.TemporaryDirectory(prefix="flmm-bench-", dir=payload.get("tmp_dir")) as folder:
        t0 = time.perf_counter()
        lmm.save_pretrained(folder, max_shard_size="2GB")  # shards bound the host memory of the copy
        save_s = time.perf_counter() - t0
        del lmm
        common.release_memory()
        if cuda:
            torch.cuda.empty_cache()
        start = allocated()
        t0 = time.perf_counter()
        quantized = LlavaForConditionalGeneration.from_pretrained(
            folder, quantization_config=config, dtype=getattr(torch, spec.dtype), device_map=device)
        load_s = time.perf_counter() - t0
        quantized_bytes = dict(storage_bytes=weight_memory_bytes(quantized), cuda_allocated_bytes=allocated() - start if cuda else None)
    common.write_child(out_path, dict(
        unquantized=unquantized, quantized=quantized_bytes, save_s=save_s, load_quantized_s=load_s,
        info_device=device_name, **linear_layers(quantized),
    ))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    common.add_model_args(parser)
    common.add_child_args(parser)
    parser.add_argument("--quant-method", default="auto", help="auto (default), bnb-4bit or torchao-int8")
    parser.add_argument("--tmp-dir", default=None, help="where the unquantized weights are saved (default: the system's)")
    args = parser.parse_args(argv)
    if args.child:
        common.child_entry(child_main, json.loads(args.child), args.child_out)
        return {}

    model = common.check_args(parser, args)
    try:
        method = resolve_method(args.quant_method, args.device)
    except ValueError as error:
        parser.error(str(error))
    payload = dict(model=asdict(model), device=args.device, method=method, threads=args.threads, tmp_dir=args.tmp_dir)
    res = common.run_measurement(str(Path(__file__).resolve()), child_main, payload, args.mem_cap_gb, args.fork)
    print(f"  quantized ({method}): {common.short(res) if res.get('status') != 'ok' else 'ok'}", file=sys.stderr)
    measured_by = "cuda_memory_allocated" if common.is_cuda(args.device) else "tensor_storage_bytes"
    key = "cuda_allocated_bytes" if common.is_cuda(args.device) else "storage_bytes"
    ok = res.get("status") == "ok"
    before, after = (res["unquantized"][key], res["quantized"][key]) if ok else (None, None)
    out = dict(
        benchmark="quantized", command=common.command("bench_quantized.py", argv),
        environment=common.environment(args.device), device=args.device, model=asdict(model), method=method,
        reference_dtype=model.dtype, measured_by=measured_by, result=res,
        unquantized_weight_mb=before / 2**20 if ok else None, quantized_weight_mb=after / 2**20 if ok else None,
        quantized_weight_mem_ratio=after / before if ok and before else None,
    )
    print(f"quantized ({method}) / {model.dtype} weight memory: {out['quantized_weight_mem_ratio']}", file=sys.stderr)
    common.write_results(args.json, out)
    return out


if __name__ == "__main__":
    main()

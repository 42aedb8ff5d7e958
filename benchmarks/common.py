"""Shared pieces of the benchmarks: a random LLaVA-1.5-shaped model, hand-built inputs, the
three forward variants, peak-memory measurement and a parent that runs every measurement in a
fresh child process, on the CPU or a CUDA device (`--device`).

Memory on the CPU. Every configuration runs in its own child process. The child builds the model and the
inputs, releases what it can (`gc`, `malloc_trim`), records its resident set size (RSS) as the
baseline, resets the kernel's RSS high-water mark (`/proc/self/clear_refs`, value 5) and runs the
measured step ONCE; `VmHWM` after the step is its peak. Reported are the peak RSS ("total") and
the peak minus the baseline ("activation": what the step itself added on top of weights and
inputs). Where the kernel does not allow the reset, the child's `ru_maxrss` is used instead and
the result says so (`hwm_reset: false`).

Memory on CUDA (`--device cuda`). The child builds the model directly on the device (bf16 by
default, `--dtype`), runs one warm-up step (CUDA's lazy initialisation, cuBLAS workspaces and, when
training, the optimizer's state), synchronises, records `torch.cuda.memory_allocated()` as the
baseline, resets the peak (`torch.cuda.reset_peak_memory_stats`) and runs the measured step once:
`torch.cuda.max_memory_allocated()` after it is the peak ("total"), peak minus baseline the
"activation". Every result names its measure (`memory`: `rss`, `ru_maxrss` or `cuda_max_allocated`).

Time. After the memory step the same child runs the step `--reps` more times, timed with
`time.perf_counter` (on CUDA between `torch.cuda.synchronize()` calls, so the time is the device's,
not the kernel launches'). The parent runs `--rounds` rounds; in each round every configuration gets a
fresh child and the order of the configurations rotates, so slow phases of the (shared) machine
hit all configurations alike. Reported: median, min, max over all timed runs, and the median of
the per-round memory values with their min and max.

Children. By default a child is a fresh interpreter (`python script --child ...`). With `--fork`
it is forked from the parent instead, which skips the child's imports (about 10 s each on a busy
2-core machine; the suite uses it): the child is still its own process with its own memory
counters, and the parent never runs a torch operation or touches CUDA before forking.

Safety. A child whose RSS passes `--mem-cap-gb` (default 8 on the CPU, 64 with CUDA, where the
host only holds what is loaded) is killed by the parent's watchdog and reported as `exceeded_cap`;
on the CPU, eager runs whose attention maps alone would pass the cap are not started at all
(`skipped_estimate`); a CUDA out-of-memory error is reported as `out_of_memory`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Children may be forked from the benchmarks' parents, which must not initialise CUDA: with this, a
# `torch.cuda.is_available()` anywhere in the parent (some imports call it) asks NVML instead of the CUDA runtime.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
# What every child imports; a forked child inherits them from the parent instead of importing them again.
CHILD_MODULES = ("transformers.models.llava.modeling_llava", "flmm_hf.modeling_flmm", "flmm_hf.losses",
                 "flmm_hf.mask_head")


# ----------------------------------------------------------------------------------------------
# model and inputs
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """A random LLaVA-1.5-shaped model (Llama decoder, CLIP tower, 2-layer MLP projector)."""

    layers: int = 8
    hidden: int = 1024
    heads: int = 16
    kv_heads: int = 16
    intermediate: int = 2816
    vocab: int = 32064  # llava-1.5's
    image_size: int = 336  # 336 / 14 = 24 -> 576 image tokens, as llava-1.5
    patch: int = 14
    vision_hidden: int = 256
    vision_layers: int = 3  # vision_feature_layer=-2 uses the first two
    vision_heads: int = 4
    max_positions: int = 4608
    mask_head_channels: int = 64
    dtype: str = "float32"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def image_tokens(self) -> int:
        return self.grid**2


TINY = ModelSpec(
    layers=2, hidden=64, heads=4, kv_heads=4, intermediate=128, vocab=512, image_size=56, patch=14,
    vision_hidden=32, vision_layers=2, vision_heads=2, max_positions=512, mask_head_channels=8,
)

# The default size: what finishes bench_forward.py in < 5 minutes on 2 shared CPU cores (see BENCHMARKS.md).
DEFAULT = ModelSpec(layers=8, hidden=512, heads=8, kv_heads=8, intermediate=1408)
# A larger LLaVA-shaped size for BENCHMARKS.md runs (`--size large`): ~4x the compute.
LARGE = ModelSpec(layers=8, hidden=1024, heads=16, kv_heads=16, intermediate=2816)
# LLaVA-1.5-7B's shapes: Llama-2-7B (32 layers, hidden 4096, 32 heads, MLP 11008, 4096 positions), the
# CLIP ViT-L/14-336 tower (24 layers, hidden 1024, 16 heads, MLP 4096), 576 image tokens; random, bf16 on a GPU.
LLAVA_7B = ModelSpec(
    layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32064, image_size=336, patch=14,
    vision_hidden=1024, vision_layers=24, vision_heads=16, max_positions=4096, mask_head_channels=64,
    dtype="bfloat16",
)
SIZES = {"tiny": TINY, "default": DEFAULT, "large": LARGE, "7b": LLAVA_7B}
GPU_ONLY_SIZES = {"7b": "about 14 GB of bf16 weights (28 GB in float32) and minutes per forward"}

IMAGE_TOKEN_ID = 32000  # llava-1.5's <image>
PAD_ID = 32001
BOS_ID = 1
PREFIX_TOKENS = 4  # "USER: " before the image, as in llava-1.5's template


def llava_config(spec: ModelSpec):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = max(spec.vocab, PAD_ID + 1)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
            num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
            image_size=spec.image_size, patch_size=spec.patch, projection_dim=spec.vision_hidden,
        ),
        text_config=LlamaConfig(
            hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=vocab,
            max_position_embeddings=spec.max_positions, pad_token_id=PAD_ID,
        ),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=spec.image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_ID,
    )


def build_lmm(spec: ModelSpec, seed: int = 0, device: str = "cpu"):
    """A random `LlavaForConditionalGeneration` of `spec`'s shapes, built directly on `device` in `spec.dtype`
    (a 7B model never exists in float32 or on the host)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        lmm = LlavaForConditionalGeneration._from_config(llava_config(spec), dtype=getattr(torch, spec.dtype))
    return lmm.eval()


def build_model(spec: ModelSpec, seed: int = 0, device: str = "cpu"):
    """FLMMForGrounding around a random LLaVA (no SAM refiner) on `device`; the head is float32, as trained."""
    from flmm_hf.modeling_flmm import FLMMForGrounding

    lmm = build_lmm(spec, seed, device)
    return FLMMForGrounding.from_lmm(lmm, use_sam=False, mask_head_channels=spec.mask_head_channels)


@dataclass
class InputSpec:
    batch: int = 1
    text_tokens: list[int] = field(default_factory=lambda: [120])  # per example (cycled), after the image
    phrases: int = 3
    phrase_len: int = 3
    padding_side: str = "left"
    with_masks: bool = False
    seed: int = 0


def build_inputs(spec: ModelSpec, inp: InputSpec) -> dict:
    """A padded batch as FLMMProcessor gives it: [BOS][prefix][image tokens][text ... answer with phrases]."""
    import torch

    g = torch.Generator().manual_seed(inp.seed)
    vocab_text = min(spec.vocab, IMAGE_TOKEN_ID) - 10
    seqs, phrase_rows = [], []
    for b in range(inp.batch):
        n_text = inp.text_tokens[b % len(inp.text_tokens)]
        need = inp.phrases * (inp.phrase_len + 1)
        if n_text < need:
            raise ValueError(f"{n_text} text tokens cannot hold {inp.phrases} phrases of {inp.phrase_len} tokens")
        text = torch.randint(10, vocab_text, (PREFIX_TOKENS + n_text,), generator=g)
        ids = torch.cat([
            torch.tensor([BOS_ID]), text[:PREFIX_TOKENS], torch.full((spec.image_tokens,), IMAGE_TOKEN_ID),
            text[PREFIX_TOKENS:],
        ])
        pid = torch.full_like(ids, -1)
        # phrases in the answer, i.e. the last `need` text tokens: k-th phrase then one separator token
        start = len(ids) - need
        for k in range(inp.phrases):
            s = start + k * (inp.phrase_len + 1)
            pid[s : s + inp.phrase_len] = k
        seqs.append(ids)
        phrase_rows.append(pid)
    length = max(len(s) for s in seqs)
    input_ids = torch.full((inp.batch, length), PAD_ID)
    attention_mask = torch.zeros((inp.batch, length), dtype=torch.long)
    phrase_ids = torch.full((inp.batch, length), -1)
    for b, (ids, pid) in enumerate(zip(seqs, phrase_rows)):
        n = len(ids)
        sl = slice(length - n, length) if inp.padding_side == "left" else slice(0, n)
        input_ids[b, sl] = ids
        attention_mask[b, sl] = 1
        phrase_ids[b, sl] = pid
    side = spec.image_size
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        phrase_ids=phrase_ids,
        pixel_values=torch.randn(inp.batch, 3, side, side, generator=g),
        original_sizes=torch.tensor([[side, side]] * inp.batch),
        canvas_sizes=torch.tensor([[side, side]] * inp.batch),
        content_boxes=torch.tensor([[0, 0, side, side]] * inp.batch),
    )
    if inp.with_masks:
        inputs["masks"] = [torch.rand(inp.phrases, side, side, generator=g) > 0.5 for _ in range(inp.batch)]
    return inputs


def to_device(inputs: dict, device: str) -> dict:
    """`inputs` with every tensor (and every tensor in a list, the masks) moved to `device`."""
    import torch

    def move(value):
        if torch.is_tensor(value):
            return value.to(device)
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return {key: move(value) for key, value in inputs.items()}


def example(inputs: dict, b: int) -> dict:
    """Example b of a padded batch, with its padding removed (what a batch-1 loop feeds)."""
    keep = inputs["attention_mask"][b].bool()
    out = {}
    for key, value in inputs.items():
        if key == "masks":
            out[key] = [value[b]]
        elif key in ("input_ids", "attention_mask", "phrase_ids"):
            out[key] = value[b : b + 1, keep]
        else:
            out[key] = value[b : b + 1]
    return out


# ----------------------------------------------------------------------------------------------
# the three forward variants
# ----------------------------------------------------------------------------------------------
def set_text_attention(model, implementation: str) -> None:
    """Run the LMM's language model with `implementation` ("sdpa", "eager" or "flmm_sdpa")."""
    from flmm_hf.attention_capture import disable_capture, enable_capture

    if implementation == "flmm_sdpa":
        enable_capture(model.lmm)
    else:
        disable_capture(model.lmm, implementation)


def lmm_inputs(inputs: dict) -> dict:
    return {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def forward_bare(model, inputs: dict):
    """(a) the bare LMM forward with SDPA, as a user scores a sequence (no KV cache)."""
    return model.lmm(**lmm_inputs(inputs), use_cache=False)


def forward_ours(model, inputs: dict):
    """(b) F-LMM grounding forward: SDPA + exact capture of the phrase rows, U-Net head (no refiner)."""
    return model(**inputs)


def original_maps(model, lmm_outputs, inputs: dict, b: int):
    """The original's slicing: full eager maps of example b -> image columns -> per-phrase merge
    -> [K, layers*heads, h, w] (layer-major, like the original's torch.cat over layers)."""
    import torch

    input_ids, phrase_ids = inputs["input_ids"][b], inputs["phrase_ids"][b]
    image_cols = (input_ids == model.image_token_id).nonzero().squeeze(1)
    side = int(round(len(image_cols) ** 0.5))
    attentions = [a[b][..., image_cols] for a in lmm_outputs.attentions]  # layers x [heads, L, n_img]
    attentions = [a.view(*a.shape[:-1], side, side) for a in attentions]
    per_phrase = []
    for k in range(int(phrase_ids.max()) + 1):
        matched = phrase_ids == k
        per_phrase.append(torch.cat([a[:, matched].mean(1) for a in attentions]))
    return torch.stack(per_phrase)


def forward_original(model, inputs: dict):
    """(c) the original F-LMM approach on the same batch: eager attention with
    `output_attentions=True` and `output_hidden_states=True` (as frozen_llava.py asks), all
    layers' full [heads, L, L] maps materialised, sliced and merged afterwards, head per example."""
    from flmm_hf.mask_head import crop_to_content

    import torch

    with torch.no_grad():
        outputs = model.lmm(**lmm_inputs(inputs), output_attentions=True, output_hidden_states=True, use_cache=False)
    logits = []
    head = model.head.mask_head
    head_dtype = next(head.parameters()).dtype
    for b in range(inputs["input_ids"].shape[0]):
        maps = original_maps(model, outputs, inputs, b)
        padded = head(maps.to(head_dtype))
        logits.append(crop_to_content(padded, inputs["canvas_sizes"][b].tolist(), inputs["content_boxes"][b].tolist()))
    del outputs
    return logits


VARIANTS = {
    "a_bare_sdpa": ("sdpa", forward_bare),
    "b_ours_capture": ("flmm_sdpa", forward_ours),
    "c_original_eager": ("eager", forward_original),
}


# ----------------------------------------------------------------------------------------------
# memory helpers (run inside the child)
# ----------------------------------------------------------------------------------------------
def _status_kb(field_name: str, pid: str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb(hwm_reset: bool) -> float:
    hwm = _status_kb("VmHWM") if hwm_reset else None
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return hwm / 1024


def rss_mb() -> float:
    value = _status_kb("VmRSS")
    return (value or 0) / 1024


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def synchronize(device: str) -> None:
    """Wait until `device` has run everything queued (CUDA runs kernels asynchronously); nothing on the CPU."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def use_device(device: str) -> str:
    """In a child: make `device` the current one and return its name; a clear error when CUDA was asked for
    and none is visible."""
    import torch

    if not is_cuda(device):
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: torch.cuda.is_available() is False (no GPU visible, or its driver "
                           "does not load); run on a machine with a GPU or use --device cpu")
    try:
        if ":" in device:
            torch.cuda.set_device(device)
        return torch.cuda.get_device_name(device)
    except RuntimeError as error:
        raise RuntimeError(f"--device {device}: CUDA did not initialise in this measurement process ({error}); "
                           "if it was forked (--fork, the suite's default), run again without --fork (suite: "
                           "--no-fork)") from error


def measure_in_child(step, reps: int, device: str = "cpu") -> dict:
    """Peak memory of one `step`, then `reps` timed steps (the measures are in the module docstring)."""
    cuda = is_cuda(device)
    if cuda:
        import torch

        warm_up = step()  # lazy CUDA initialisation, cuBLAS workspaces, the optimizer's state
        synchronize(device)
        del warm_up
        release_memory()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        hwm_reset, memory = True, "cuda_max_allocated"
    else:
        release_memory()
        baseline = rss_mb()
        hwm_reset = reset_peak()
        memory = "rss" if hwm_reset else "ru_maxrss"
    t0, c0 = time.perf_counter(), time.process_time()
    result = step()
    synchronize(device)
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_rss_mb(hwm_reset)
    del result
    times, cpu_times = [], []
    for _ in range(reps):
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        result = step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        del result
    return dict(
        baseline_mb=baseline, peak_mb=peak, activation_mb=peak - baseline, memory=memory,
        first_s=first, times_s=times, first_cpu_s=first_cpu, cpu_times_s=cpu_times, hwm_reset=hwm_reset,
    )


def child_entry(child_main, payload: dict, out_path: str) -> None:
    """Run a benchmark's `child_main(payload, out_path)`. A CUDA out-of-memory error becomes the result
    `status: out_of_memory`; any other error is written as `status: error` with its traceback, then re-raised."""
    try:
        child_main(payload, out_path)
    except Exception as error:
        import torch

        oom = isinstance(error, torch.cuda.OutOfMemoryError)
        write_child(out_path, dict(status="out_of_memory" if oom else "error", error=f"{type(error).__name__}: {error}",
                                   log=traceback.format_exc()[-3000:]))
        if not oom:
            raise


# ----------------------------------------------------------------------------------------------
# the parent: fresh child per (configuration, round), rotated order, watchdog
# ----------------------------------------------------------------------------------------------
def _temp_json() -> str:
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    return path


def _watch(pid: int, poll, kill, mem_cap_gb: float, timeout_s: float) -> tuple[int | None, str | None, int]:
    """Poll a child until it ends; kill it past the RSS cap or the timeout.
    Returns (exit code, "exceeded_cap" / "timeout" / None, the largest RSS seen in kB)."""
    cap_kb = mem_cap_gb * 1024 * 1024
    max_seen, start = 0, time.time()
    while (code := poll()) is None:
        rss = _status_kb("VmRSS", str(pid)) or 0
        max_seen = max(max_seen, rss)
        if rss > cap_kb or time.time() - start > timeout_s:
            kill()
            return None, "exceeded_cap" if rss > cap_kb else "timeout", max_seen
        time.sleep(0.02)
    return code, None, max_seen


def _child_result(out_path: str, code: int | None, stopped: str | None, max_seen_kb: int, mem_cap_gb: float,
                  log: str) -> dict:
    try:
        if stopped:
            return dict(status=stopped, watchdog_max_rss_mb=max_seen_kb / 1024, cap_gb=mem_cap_gb)
        try:
            result = json.loads(Path(out_path).read_text())
        except (OSError, ValueError):
            result = None
        if result is None or (code != 0 and "status" not in result):
            return dict(status="error", returncode=code, log=log[-3000:])
        result.setdefault("status", "ok")
        result["watchdog_max_rss_mb"] = max_seen_kb / 1024
        return result
    finally:
        os.unlink(out_path)


def run_child(argv: list[str], mem_cap_gb: float, timeout_s: float = 1800) -> dict:
    """Run `python argv...` in a fresh interpreter and return the JSON the child writes; kill it past the memory cap."""
    out_path = _temp_json()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(REPO))
    # the child's output goes to a file: a pipe nobody reads while it runs could fill and block the child
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen([sys.executable, *argv, "--child-out", out_path], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        code, stopped, max_seen = _watch(proc.pid, proc.poll, lambda: (proc.kill(), proc.wait()), mem_cap_gb, timeout_s)
        log.seek(0)
        return _child_result(out_path, code, stopped, max_seen, mem_cap_gb, log.read())


def run_forked(child_main, payload: dict, mem_cap_gb: float, timeout_s: float = 1800) -> dict:
    """Run `child_main(payload, out_path)` in a child forked from this process (its imports are inherited, so it
    starts at once) and return the JSON it writes; kill it past the memory cap. This process must not have run a
    torch operation or touched CUDA (both are unsafe to inherit); the benchmarks' parents only plan and collect."""
    for name in CHILD_MODULES:
        importlib.import_module(name)
    out_path = _temp_json()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into the parent's code, skip its atexit handlers
        code = 0
        try:
            child_entry(child_main, payload, out_path)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def poll():
        done, status = os.waitpid(pid, os.WNOHANG)
        return None if done == 0 else os.waitstatus_to_exitcode(status)

    def kill():
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    code, stopped, max_seen = _watch(pid, poll, kill, mem_cap_gb, timeout_s)
    return _child_result(out_path, code, stopped, max_seen, mem_cap_gb, "(forked child: its output is above)")


def run_measurement(script: str, child_main, payload: dict, mem_cap_gb: float, fork: bool = False) -> dict:
    """One measurement in its own process: forked from this one (`fork`) or `python script --child payload`."""
    if fork:
        return run_forked(child_main, payload, mem_cap_gb)
    return run_child([script, "--child", json.dumps(payload)], mem_cap_gb)


def summarize(values: list[float]) -> dict:
    if not values:
        return dict(median=None, min=None, max=None, n=0)
    return dict(median=statistics.median(values), min=min(values), max=max(values), n=len(values))


def interleaved(configs: list[str], rounds: int, run_one) -> dict[str, list[dict]]:
    """Round r runs every config once, starting at config r mod n (rotation)."""
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for config in order:
            res = run_one(config, r)
            res["round"] = r
            results[config].append(res)
            print(f"  round {r} {config}: {short(res)}", file=sys.stderr, flush=True)
    return results


def short(res: dict) -> str:
    if res.get("status") != "ok":
        return res.get("status", "?") + " " + str({k: v for k, v in res.items() if k != "log"})[:200] + (
            ("\n" + res["log"][-1500:]) if "log" in res else "")
    times = res.get("times_s") or [res.get("first_s")]
    cpu = res.get("cpu_times_s") or [res.get("first_cpu_s")]
    return (f"time {statistics.median(times):.3f}s cpu {statistics.median(cpu):.3f}s (first {res['first_s']:.3f}s)  peak {res['peak_mb']:.0f} MB  "
            f"activation {res['activation_mb']:.0f} MB")


def aggregate(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return dict(status=runs[0].get("status") if runs else "not_run", runs=runs)
    times = [t for r in ok for t in (r["times_s"] or [r["first_s"]])]
    cpu = [t for r in ok for t in (r.get("cpu_times_s") or [r.get("first_cpu_s")]) if t is not None]
    out = dict(
        status="ok",
        time_s=summarize(times),
        cpu_s=summarize(cpu),
        peak_mb=summarize([r["peak_mb"] for r in ok]),
        activation_mb=summarize([r["activation_mb"] for r in ok]),
        baseline_mb=summarize([r["baseline_mb"] for r in ok]),
        memory=ok[0]["memory"],
        hwm_reset=all(r["hwm_reset"] for r in ok),
        failed_rounds=len(runs) - len(ok),
    )
    for key in [k for k in ok[0] if k.startswith("info_")]:
        values = [r[key] for r in ok if key in r]
        numeric = all(isinstance(v, (int, float)) for v in values)
        out[key] = statistics.median(values) if numeric else values[0]
    return out


def ratio(x: dict, y: dict, key: str) -> float | None:
    try:
        return x[key]["median"] / y[key]["median"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def gpu_info() -> list[dict] | None:
    """The GPUs `nvidia-smi` lists (name, memory, driver), asked without initialising CUDA in this process."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [dict(zip(("name", "memory_total", "driver"), (v.strip() for v in line.split(","))))
            for line in out.splitlines() if line.strip()]


def environment(device: str = "cpu") -> dict:
    """Versions, machine and load, recorded in every result file; the GPUs too when `device` is CUDA."""
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = None
    return dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), python=platform.python_version(), torch=torch.__version__,
        transformers=transformers.__version__, platform=platform.platform(), cpu=cpu, cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), mem_total_gb=mem_gb, load_avg_at_start=os.getloadavg(),
        device=device, torch_cuda=torch.version.cuda, gpus=gpu_info() if is_cuda(device) else None,
    )


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """`--device` (every benchmark script has it); check it with `check_args`."""
    parser.add_argument("--device", default="cpu",
                        help="'cpu' (default) or 'cuda' / 'cuda:N' (synchronised timing, torch.cuda.max_memory_allocated, "
                             "bf16 weights by default)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """`--size`, `--tiny` and `--dtype` of the benchmarks that build a random LLaVA; resolve them with `check_args`."""
    parser.add_argument("--size", choices=list(SIZES), default="default",
                        help="model shapes: tiny (smoke tests), default / large (CPU), 7b (LLaVA-1.5-7B's, GPU only)")
    parser.add_argument("--tiny", action="store_true", help="the same as --size tiny")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="the LMM's dtype; auto: bfloat16 on CUDA, float32 on the CPU")


def add_child_args(parser: argparse.ArgumentParser) -> None:
    """The flags of every benchmark that measures in child processes: device, memory cap, threads, children."""
    add_device_arg(parser)
    parser.add_argument("--mem-cap-gb", type=float, default=None,
                        help="kill a child whose RSS passes this (default 8 on the CPU, 64 with --device cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child (default: torch's)")
    parser.add_argument("--fork", action="store_true",
                        help="fork each child from this process instead of starting a fresh interpreter (skips its imports)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)


def add_run_args(parser: argparse.ArgumentParser, variants: list[str], rounds: int = 3) -> None:
    """`add_child_args` plus repetitions and variants: the flags of the benchmarks that compare variants."""
    add_child_args(parser)
    parser.add_argument("--rounds", type=int, default=rounds, help="fresh processes per configuration")
    parser.add_argument("--reps", type=int, default=1, help="timed steps per process after the memory step")
    parser.add_argument("--variants", nargs="+", default=list(variants))


def check_device(device: str) -> str:
    """`device` if it names the CPU or a CUDA device this torch was built for; checked without initialising CUDA
    (children may be forked from this process)."""
    import re

    import torch

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"--device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")
    if is_cuda(device) and not torch.backends.cuda.is_built():
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) is built without CUDA; install a CUDA "
                         "build of torch, or use --device cpu")
    return device


def model_spec(size: str, device: str, dtype: str = "auto") -> ModelSpec:
    """The `ModelSpec` of `--size` in `--dtype` (auto: bfloat16 on CUDA, the size's own dtype on the CPU)."""
    if size not in SIZES:
        raise ValueError(f"--size {size!r}: choose one of {', '.join(SIZES)}")
    if size in GPU_ONLY_SIZES and not is_cuda(device):
        raise ValueError(f"--size {size} needs a GPU ({GPU_ONLY_SIZES[size]}): run it with --device cuda, or pick "
                         "--size tiny / default / large on the CPU")
    spec = SIZES[size]
    if dtype == "auto":
        dtype = "bfloat16" if is_cuda(device) else spec.dtype
    return replace(spec, dtype=dtype)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ModelSpec | None:
    """Check `--device`, fill in the default `--mem-cap-gb` and return the `ModelSpec` of `--size` / `--tiny` /
    `--dtype` (None when the parser has no model flags); a bad combination ends in `parser.error` with the fix."""
    try:
        check_device(args.device)
        if getattr(args, "mem_cap_gb", 0) is None:
            args.mem_cap_gb = 64.0 if is_cuda(args.device) else 8.0
        if not hasattr(args, "size"):
            return None
        if args.tiny:
            args.size = "tiny"
        return model_spec(args.size, args.device, args.dtype)
    except ValueError as error:
        parser.error(str(error))


def command(script: str, argv: list[str] | None) -> str:
    """The command line that ran `benchmarks/<script>` with `argv` (the process's own arguments when None)."""
    return " ".join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def write_results(path: str | None, out: dict) -> None:
    """Write a benchmark's results as indented JSON to `path` (its folder created); nothing when `path` is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=1))


def write_child(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f)


def spec_to_json(spec) -> str:
    return json.dumps(asdict(spec))

"""Shared pieces of the benchmarks: a random LLaVA-1.5-shaped model, hand-built inputs, the
three forward variants, peak-memory measurement and a parent that runs every measurement in a
fresh child process.

Memory. Every configuration runs in its own child process. The child builds the model and the
inputs, releases what it can (`gc`, `malloc_trim`), records its resident set size (RSS) as the
baseline, resets the kernel's RSS high-water mark (`/proc/self/clear_refs`, value 5) and runs the
measured step ONCE; `VmHWM` after the step is its peak. Reported are the peak RSS ("total") and
the peak minus the baseline ("activation": what the step itself added on top of weights and
inputs). Where the kernel does not allow the reset, the child's `ru_maxrss` is used instead and
the result says so (`hwm_reset: false`).

Time. After the memory step the same child runs the step `--reps` more times, timed with
`time.perf_counter`. The parent runs `--rounds` rounds; in each round every configuration gets a
fresh child and the order of the configurations rotates, so slow phases of the (shared) machine
hit all configurations alike. Reported: median, min, max over all timed runs, and the median of
the per-round memory values with their min and max.

Safety. A child whose RSS passes `--mem-cap-gb` (default 8) is killed by the parent's watchdog
and reported as `exceeded_cap`; eager runs whose attention maps alone would pass the cap are not
started at all (`skipped_estimate`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


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


def build_model(spec: ModelSpec, seed: int = 0):
    """FLMMForGrounding around a random LLaVA (no SAM refiner)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from flmm_hf.modeling_flmm import FLMMForGrounding

    torch.manual_seed(seed)
    lmm = LlavaForConditionalGeneration(llava_config(spec)).eval()
    model = FLMMForGrounding.from_lmm(lmm, use_sam=False, mask_head_channels=spec.mask_head_channels)
    dtype = getattr(torch, spec.dtype)
    if dtype != torch.float32:
        model.lmm.to(dtype)
    return model


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


def measure_in_child(setup, step, reps: int) -> dict:
    """Baseline RSS -> reset the high-water mark -> one step (peak memory) -> `reps` timed steps."""
    release_memory()
    baseline = rss_mb()
    hwm_reset = reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    result = step()
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = peak_rss_mb(hwm_reset)
    del result
    times, cpu_times = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        result = step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        del result
    return dict(
        baseline_rss_mb=baseline, peak_rss_mb=peak, activation_mb=peak - baseline,
        first_s=first, times_s=times, first_cpu_s=first_cpu, cpu_times_s=cpu_times, hwm_reset=hwm_reset,
    )


# ----------------------------------------------------------------------------------------------
# the parent: fresh child per (configuration, round), rotated order, watchdog
# ----------------------------------------------------------------------------------------------
def run_child(argv: list[str], mem_cap_gb: float, timeout_s: float = 1800) -> dict:
    """Run `python argv...` and return the JSON the child writes; kill it past the memory cap."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out_path = tmp.name
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, *argv, "--child-out", out_path], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cap_kb = mem_cap_gb * 1024 * 1024
    max_seen, exceeded, start = 0, False, time.time()
    while proc.poll() is None:
        rss = _status_kb("VmRSS", str(proc.pid)) or 0
        max_seen = max(max_seen, rss)
        if rss > cap_kb:
            proc.kill()
            exceeded = True
            break
        if time.time() - start > timeout_s:
            proc.kill()
            break
        time.sleep(0.02)
    output = proc.communicate()[0]
    try:
        if exceeded:
            return dict(status="exceeded_cap", watchdog_max_rss_mb=max_seen / 1024, cap_gb=mem_cap_gb)
        if proc.returncode != 0:
            return dict(status="error", returncode=proc.returncode, log=output[-3000:])
        with open(out_path) as f:
            result = json.load(f)
        result["status"] = "ok"
        result["watchdog_max_rss_mb"] = max_seen / 1024
        return result
    finally:
        os.unlink(out_path)


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
    return (f"time {statistics.median(times):.3f}s cpu {statistics.median(cpu):.3f}s (first {res['first_s']:.3f}s)  peak {res['peak_rss_mb']:.0f} MB  "
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
        peak_rss_mb=summarize([r["peak_rss_mb"] for r in ok]),
        activation_mb=summarize([r["activation_mb"] for r in ok]),
        baseline_rss_mb=summarize([r["baseline_rss_mb"] for r in ok]),
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


def environment() -> dict:
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
    )


def add_run_args(parser: argparse.ArgumentParser, variants: list[str], rounds: int = 3) -> None:
    """The flags every benchmark shares: repetitions, variants, the memory cap, threads, child plumbing."""
    parser.add_argument("--rounds", type=int, default=rounds, help="fresh processes per configuration")
    parser.add_argument("--reps", type=int, default=1, help="timed steps per process after the memory step")
    parser.add_argument("--variants", nargs="+", default=list(variants))
    parser.add_argument("--mem-cap-gb", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child (default: torch's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)


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

"""Exact attention probabilities from an SDPA language model, without eager attention (or, to reproduce the original
F-LMM, with eager attention's numerics in the LMM's dtype).

F-LMM reads, for every layer and head, the attention probabilities from some query tokens (the answer or the
phrase tokens) to the image tokens. transformers runs SDPA by default and SDPA never materialises those
probabilities, while eager attention with `output_attentions=True` materialises all of them (every query, every key,
every layer) and is slower. This module registers an attention function named `"flmm_sdpa"`:

- it returns the output of transformers' own `sdpa_attention_forward`, so the model's outputs are bit-identical to
  `attn_implementation="sdpa"`; the one exception is a padded batch on CPU (see `causal_padding_spans`), where each
  sequence's real tokens go through SDPA on their own with `is_causal=True`, which skips the padding and the masked
  upper triangle (about 30% less attention time, BENCHMARKS.md section 2b); real positions then equal sdpa's to
  float rounding and padding positions are zero;
- only on the attention modules where an [`AttentionCapture`] is active, it also computes the attention
  probabilities of the selected query rows over ALL keys and keeps the selected key columns, with one of two
  numerics (`ATTENTION_NUMERICS`, the capture's `numerics`):

  * `"float32"` (default): `softmax(Q K^T * scaling + mask)` with Q and K cast to float32 and everything in float32,
    for the selected rows only: the exact probabilities of the model's Q and K, whatever the LMM's dtype. The model
    itself runs SDPA.
  * `"eager"`: the original F-LMM's numerics. While such a capture is active, every attention layer of that language
    model computes its attention as eager attention does, in the dtype of Q (bf16 for a bf16 LMM): scores
    `(Q K^T) * scaling` in that dtype, the mask applied, softmax in float32, the probabilities cast back to that
    dtype, the output `probabilities @ V` in that dtype. The captured maps are those probabilities (in that dtype),
    and the hidden states of later layers are eager's too. `eager_attention` says what the original ran.

Typical use:

```python
>>> enable_capture(lmm)  # the language model now runs "flmm_sdpa" (the vision tower is untouched)
>>> with torch.no_grad(), AttentionCapture(lmm, layers=None, query_mask=answer_mask, key_mask=image_mask) as capture:
...     outputs = lmm(**inputs)
>>> capture.attentions[0].shape  # [layers, heads, n_query_0, n_key_0]
```

With `generation=True`, every forward pass after the first (the decoding steps of `generate`) appends the rows of all
its new tokens, so that after `generate` one has the rows of the generated tokens that were fed to the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar, Token

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask


ATTN_IMPLEMENTATION = "flmm_sdpa"
# The captures active in the current context (thread or asyncio task). Capture state never lives on the shared
# attention modules: one model may run captured forwards in several threads at once, and a plain forward in
# another thread sees no capture at all.
_ACTIVE_CAPTURES: ContextVar[tuple["AttentionCapture", ...]] = ContextVar("flmm_active_captures", default=())

#: The numerics a capture can compute its probabilities with (see the module docstring and `selected_attention_probs`).
ATTENTION_NUMERICS = ("float32", "eager")


def flmm_sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """
    SDPA attention (transformers' `sdpa_attention_forward`, unchanged) that also hands the attention probabilities of
    the selected rows to every [`AttentionCapture`] active in the calling thread that captures `module`.

    While an `AttentionCapture(numerics="eager")` on this module's language model is active in the calling thread,
    the module computes [`eager_attention`] instead of SDPA (the original F-LMM's numerics, for all its layers, so that
    later layers see eager's hidden states), and the captures take their rows from those probabilities.

    Args:
        module: the attention module calling us (carries `num_key_value_groups`, `is_causal`, `layer_idx`).
        query: `[batch, heads, query, head_dim]`, RoPE applied.
        key: `[batch, kv_heads, key, head_dim]`, RoPE applied, cache included.
        value: `[batch, kv_heads, key, head_dim]`.
        attention_mask: `None`, a boolean mask (True = attend) or an additive float mask,
            `[batch, 1 or heads, query, key]`.
    """
    active = _ACTIVE_CAPTURES.get()
    eager_probs = None
    if any(capture.numerics == "eager" and capture.runs_on(module) for capture in active):
        attn_output, eager_probs = eager_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    else:
        attn_output = _sdpa_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    for capture in active:
        if capture.captures(module):
            if kwargs.get("position_bias") is not None:
                raise NotImplementedError("AttentionCapture does not support attention with a `position_bias`.")
            capture._record(module, query, key, attention_mask, scaling=scaling, is_causal=is_causal, probs=eager_probs)
    return attn_output, None


def _sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
    **kwargs,
) -> torch.Tensor:
    """transformers' `sdpa_attention_forward`, or on CPU for a padded causal batch `_unpadded_causal_sdpa`."""
    spans = None
    # `position_bias` and `softcap` change the scores, which the shortcut does not apply (sdpa reads no other kwarg);
    # the mask must have one row per sequence (not broadcast); the check is data-dependent, so not under compile.
    plain_scores = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    per_sequence_mask = attention_mask is not None and attention_mask.shape[0] == query.shape[0]
    if query.device.type == "cpu" and dropout == 0.0 and plain_scores and per_sequence_mask:
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            spans = causal_padding_spans(attention_mask, query.shape[2], key.shape[2])
    if spans is not None:
        return _unpadded_causal_sdpa(module, query, key, value, spans, scaling)
    attn_output, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )
    return attn_output


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Eager attention in the dtype of `query`, as the original F-LMM ran it: returns the attention output
    `[batch, query, heads, head_dim]` (what an attention function returns) and the probabilities
    `[batch, heads, query, key]` in `query`'s dtype.

    Steps (the same tensor operations as transformers 5's Llama/Mistral `eager_attention_forward`): key and value
    heads repeated for GQA; scores `torch.matmul(query, key^T) * scaling` in `query`'s dtype; masked keys set to
    `torch.finfo(dtype).min` (boolean mask), an additive float mask added, or with a `None` mask the causal mask of
    SDPA's `is_causal` (query i sees keys 0..i: the mask `sdpa_mask` leaves out is causal); softmax over the keys in
    float32, cast back to `query`'s dtype; dropout as eager applies it (`module.training`); output
    `probabilities @ value` in that dtype.

    What the original ran: F-LMM loaded the LMM with `torch_dtype=torch.bfloat16` under transformers 4.39 and
    called it with `output_attentions=True`. There `LlamaSdpaAttention` (the default) falls back to
    `LlamaAttention.forward` when attentions are requested, and that forward (`MistralAttention`'s likewise)
    computes in the weights' dtype `torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(head_dim)`,
    adds the causal mask `attention_mask[:, :, :, :kv_len]` (additive, built in that dtype with
    `torch.finfo(dtype).min` at masked keys), takes `softmax(..., dim=-1, dtype=torch.float32)` and casts it with
    `.to(query_states.dtype)`; those bf16 probabilities are both what multiplies V and what `output_attentions`
    returned. F-LMM sliced them to the image columns, merged the rows of each phrase (mean or max) still in bf16 and
    cast the merged maps to float32 for the mask head. The differences here change no bit: `* scaling`
    (`head_dim ** -0.5`) instead of `/ sqrt(head_dim)` gives the same bf16 scores for head_dim 64 and 128 (every
    paper backbone has 128; tests/test_attention_capture.py checks every bf16 significand), and a boolean mask filled
    with the dtype's minimum gives the same probabilities as the additive one (allowed scores get +0, masked ones
    an exponential of exactly 0).

    Raises:
        NotImplementedError: for score modifiers eager attention of Llama/Mistral does not have (`softcap`,
            `position_bias`, attention sinks `s_aux`).
    """
    for name in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"eager numerics support plain (Llama/Mistral-style) attention, not `{name}`; use numerics='float32'."
            )
    groups = getattr(module, "num_key_value_groups", 1)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    probs = selected_attention_probs(
        query, key, attention_mask, None, scaling=scaling, is_causal=is_causal, num_key_value_groups=groups,
        numerics="eager",
    )  # [batch, heads, query, key], query's dtype
    weights = nn.functional.dropout(probs, p=dropout, training=module.training)
    attn_output = torch.matmul(weights, repeat_kv(value, groups))  # [batch, heads, query, head_dim]
    return attn_output.transpose(1, 2).contiguous(), probs


def causal_padding_spans(
    attention_mask: torch.Tensor | None, q_length: int, kv_length: int
) -> list[tuple[int, int]] | None:
    """
    The run `[start, end)` of real tokens of every sequence when `attention_mask` is plain causal attention over one
    contiguous run per sequence (left or right padding, no cache); `None` for anything else (no mask, a float mask,
    sliding windows, bidirectional blocks, a cache), which then goes through SDPA with the mask as given.

    The real tokens are the keys the last row attends to (never a fully masked row). Padding rows get a zero output
    instead of sdpa's: no real query attends to them, so no real position changes.
    """
    if (
        attention_mask is None
        or attention_mask.dtype != torch.bool
        or attention_mask.dim() != 4
        or attention_mask.shape[1] != 1
        or q_length != kv_length
        or tuple(attention_mask.shape[-2:]) != (q_length, kv_length)
    ):
        return None
    mask = attention_mask[:, 0]  # [batch, query, key]
    # The last row is never fully masked: a real last token sees its whole run, a padding one (right padding)
    # sees the real tokens before it.
    real = mask[:, -1]  # [batch, key]
    counts = real.sum(dim=1)
    starts = real.to(torch.int8).argmax(dim=1)
    positions = torch.arange(kv_length, device=mask.device)
    run = (positions[None, :] >= starts[:, None]) & (positions[None, :] < (starts + counts)[:, None])
    if not torch.equal(real, run):
        return None
    causal = positions[:, None] >= positions[None, :]  # [query, key]
    expected = causal[None] & run[:, None, :]  # [batch, query, key]
    # Real rows must be exactly causal over the run; padding rows may be anything sdpa_mask makes of them: the
    # same pattern (right padding), fully masked, or fully unmasked (its fix for old torch versions).
    rows_ok = (mask == expected).all(dim=-1) | (~run & (~mask.any(dim=-1) | mask.all(dim=-1)))
    if not bool(rows_ok.all()):
        return None
    return [(int(start), int(start + count)) for start, count in zip(starts, counts)]


def _unpadded_causal_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spans: list[tuple[int, int]],
    scaling: float | None,
) -> torch.Tensor:
    """SDPA with `is_causal=True` over each sequence's real tokens; `[batch, query, heads, head_dim]`, 0 at padding."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    batch, heads, length, _ = query.shape
    output = query.new_zeros(batch, length, heads, value.shape[-1])
    for b, (start, end) in enumerate(spans):
        if end > start:
            rows = torch.nn.functional.scaled_dot_product_attention(
                query[b : b + 1, :, start:end],
                key[b : b + 1, :, start:end],
                value[b : b + 1, :, start:end],
                is_causal=True,
                scale=scaling,
            )  # [1, heads, n, head_dim]
            output[b, start:end] = rows[0].transpose(0, 1)
    return output


AttentionInterface.register(ATTN_IMPLEMENTATION, flmm_sdpa_attention_forward)
# Without a registered mask function, `create_causal_mask` would find no mask for "flmm_sdpa" and drop the padding.
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def selected_attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    query_index: torch.LongTensor | None,
    scaling: float | None = None,
    is_causal: bool = True,
    num_key_value_groups: int = 1,
    numerics: str = "float32",
) -> torch.Tensor:
    """
    Attention probabilities of some query rows over all keys, as eager attention computes them.

    Args:
        query: `[batch, heads, query, head_dim]`.
        key: `[batch, kv_heads, key, head_dim]`.
        attention_mask: `None`, boolean (True = attend) or additive float, broadcastable to
            `[batch, heads, query, key]`.
            `None` follows `sdpa_attention_forward`: causal with sdpa's upper-left alignment when `is_causal` and more
            than one query, no masking otherwise.
        query_index: `[batch, n]` rows of `query` to compute; `None` for all rows (the tensors are then used as
            given, with no gather: the very operations of eager attention).
        scaling: the softmax scale; `head_dim ** -0.5` when `None` (sdpa's default).
        is_causal: whether a `None` mask means causal attention.
        num_key_value_groups: query heads per key head (GQA).
        numerics: `"float32"`: query and key cast to float32, scores, mask and softmax in float32 (the exact
            probabilities of the given query and key). `"eager"`: as eager attention in `query`'s dtype (bf16 for a
            bf16 LMM): scores `matmul(query, key^T) * scaling` in that dtype, the mask applied (masked keys at the
            dtype's minimum, or the float mask added with torch's type promotion, as eager adds it), softmax in
            float32, the probabilities cast back to `query`'s dtype (see [`eager_attention`]).

    Returns:
        `[batch, heads, n, key]` (n = all query rows when `query_index` is None): float32 with `"float32"`,
        `query`'s dtype with `"eager"`.
    """
    if numerics not in ATTENTION_NUMERICS:
        raise ValueError(f"numerics must be one of {ATTENTION_NUMERICS}, got {numerics!r}")
    batch, heads, q_length, head_dim = query.shape
    kv_length = key.shape[2]
    scaling = head_dim**-0.5 if scaling is None else scaling
    # float32: everything in float32; eager: the scores stay in the input dtype, as eager's matmul leaves them.
    compute = (lambda t: t.float()) if numerics == "float32" else (lambda t: t)

    if query_index is None:
        rows = torch.arange(q_length, device=query.device)[None, None, :, None]  # [1, 1, query, 1]
    else:
        rows = query_index[:, None, :, None]  # [batch, 1, n, 1]
        query = query.gather(2, rows.expand(-1, heads, -1, head_dim))  # [batch, heads, n, head_dim]
    key = repeat_kv(key, num_key_value_groups)  # [batch, heads, key, head_dim]
    scores = torch.matmul(compute(query), compute(key).transpose(2, 3)) * scaling  # [batch, heads, n, key]

    min_value = torch.finfo(scores.dtype).min
    if attention_mask is None:
        if is_causal and q_length > 1:
            # Same as sdpa's `is_causal=True`: query i sees keys 0..i (upper-left alignment).
            key_positions = torch.arange(kv_length, device=scores.device)
            allowed = key_positions[None, None, None, :] <= rows  # [batch or 1, 1, n, key]
            scores = scores.masked_fill(~allowed, min_value)
    else:
        mask = attention_mask[..., :kv_length]
        if query_index is not None:
            mask = mask.expand(batch, -1, q_length, kv_length)  # [batch, 1 or heads, query, key]
            mask = mask.gather(2, rows.expand(-1, mask.shape[1], -1, kv_length))  # [batch, 1 or heads, n, key]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, min_value)
        else:
            scores = scores + compute(mask)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return probs if numerics == "float32" else probs.to(query.dtype)


def _language_model(lmm: PreTrainedModel) -> PreTrainedModel:
    """The (outermost) sub-model of `lmm` that runs on the text config: the language model of a VLM."""
    text_config = lmm.config.get_text_config()
    for module in lmm.modules():
        if isinstance(module, PreTrainedModel) and module.config is text_config:
            return module
    raise ValueError(f"Could not find the language model of {type(lmm).__name__} (no sub-model uses its text config).")


def language_attention_modules(lmm: PreTrainedModel) -> list[nn.Module]:
    """
    The self-attention modules of the decoder layers of `lmm`'s language model, in layer order.

    They are found generically: modules under the language model whose class name contains "Attention" and that
    carry an integer `layer_idx` (exactly one per layer).
    """
    language_model = _language_model(lmm)
    by_layer: dict[int, nn.Module] = {}
    for name, module in language_model.named_modules():
        layer_idx = getattr(module, "layer_idx", None)
        if isinstance(layer_idx, int) and "Attention" in type(module).__name__:
            if layer_idx in by_layer:
                raise ValueError(f"Two attention modules claim layer {layer_idx} in {type(lmm).__name__} ({name}).")
            by_layer[layer_idx] = module
    if not by_layer:
        raise ValueError(f"No attention module with a `layer_idx` in the language model of {type(lmm).__name__}.")
    if sorted(by_layer) != list(range(len(by_layer))):
        raise ValueError(f"Attention layer indices of {type(lmm).__name__} are not 0..n-1: {sorted(by_layer)}.")
    return [by_layer[i] for i in range(len(by_layer))]


def enable_capture(lmm: PreTrainedModel) -> PreTrainedModel:
    """
    Switch the language model of `lmm` to the `"flmm_sdpa"` attention (the vision tower keeps its own). Outputs are
    unchanged (SDPA); [`AttentionCapture`] can then be used on `lmm`. Returns `lmm`.
    """
    _language_model(lmm).set_attn_implementation(ATTN_IMPLEMENTATION)
    return lmm


def disable_capture(lmm: PreTrainedModel, attn_implementation: str = "sdpa") -> PreTrainedModel:
    """Switch the language model of `lmm` back to `attn_implementation` (default `"sdpa"`). Returns `lmm`."""
    _language_model(lmm).set_attn_implementation(attn_implementation)
    return lmm


def has_offloaded_weights(model: nn.Module) -> bool:
    """Whether accelerate offloads some of `model`'s weights (hooks that load them before and drop them after a forward)."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and any(getattr(h, "offload", False) for h in getattr(hook, "hooks", [hook])):
            return True
    return False


def _padded_positions(mask: torch.BoolTensor) -> tuple[torch.LongTensor, torch.LongTensor]:
    """`[batch, length]` boolean mask -> positions `[batch, max_count]` (padded with 0) and counts `[batch]`."""
    counts = mask.sum(dim=1)
    max_count = int(counts.max()) if mask.shape[0] > 0 else 0
    # A stable sort puts the selected positions first, in increasing order.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :max_count]
    valid = torch.arange(max_count, device=mask.device)[None, :] < counts[:, None]
    return order.masked_fill(~valid, 0), counts


class _CaptureComplete(Exception):
    """Raised inside the model by an `AttentionCapture(stop_after_last_layer=True)` and swallowed by its `__exit__`."""

    def __init__(self, capture: AttentionCapture):
        super().__init__("attention capture complete")
        self.capture = capture


class AttentionCapture:
    """
    Context manager capturing exact attention probabilities from some query rows to some key columns.

    Inside the `with` block, every forward pass of `lmm` (which must have gone through [`enable_capture`]) that runs
    in the same thread records, for each selected layer, the softmax over all keys of the selected query rows,
    restricted to the selected key columns, with the chosen `numerics`. With `"float32"` nothing is changed in the
    model's outputs; with `"eager"` the language model runs eager attention in its own dtype for the duration of the
    block (see the module docstring). The capture is a per-call object held in a context variable, not on the model:
    several threads may capture on one model at once, each receiving its own rows and numerics, and forwards in
    threads without an active capture are untouched.

    Args:
        lmm: the vision-language (or language) model, after `enable_capture(lmm)`.
        layers: indices of the decoder layers to capture (negative indices count from the end); `None` for all.
        query_mask: `BoolTensor [batch, length]`, True at the query rows to keep, over the tokens of the (first)
            forward pass. In `generation` mode it may be `None` (no prompt rows).
        key_mask: `BoolTensor [batch, length]`, True at the key columns to keep (e.g. the image tokens), as positions
            in the key sequence (the prompt, for generation).
        generation: if True, the first forward pass is the prompt (rows chosen by `query_mask`) and every following
            forward pass (a decoding step of `generate` with a KV cache) appends the rows of ALL its tokens. Note that
            `generate(max_new_tokens=n)` feeds only the first n - 1 generated tokens back to the model, so n - 1 rows
            are appended; run a forward over the full sequence to get the last one. With `False`, a second forward
            pass inside the block is an error.
        stop_after_last_layer: if True, the forward pass ends as soon as the deepest selected layer has been
            recorded: the rest of the model (later layers, the MLP of that layer, the output head) is skipped, the
            `with` block ends there and the model returns nothing. For callers that only need the attention.
            Ignored when accelerate offloads weights of `lmm` (its hooks must run to put the weights back).
        numerics: `"float32"` (default): the float32 softmax of the float32 scores of the model's query and key, for
            the selected rows, while the model runs SDPA unchanged. `"eager"`: the original F-LMM's numerics: while
            the block is active every attention layer of `lmm`'s language model runs [`eager_attention`] in the
            LMM's dtype (scores in that dtype, softmax in float32, probabilities rounded to that dtype, output from
            the rounded probabilities), and the captured maps are those probabilities, in the LMM's dtype; outputs
            and hidden states are eager attention's, not SDPA's. It computes every row of every layer (eager's
            memory per layer, not kept across layers) and supports plain (Llama/Mistral-style) attention only.

    After the forward pass:
        - `capture.attentions`: list over examples of `Tensor [n_layers, heads, n_query_b, n_key_b]` (float32, or the
          LMM's dtype with `numerics="eager"`);
        - `capture.maps(layer)`: list over examples of `Tensor [heads, n_query_b, n_key_b]` for one layer;
        - `capture.query_counts` / `capture.key_counts` (`LongTensor [batch]`): rows and columns per example.
        Rows and columns are in increasing sequence order (generated rows after the prompt rows).

    Supports padding on either side, GQA (key heads are repeated), `None` masks (causal as in SDPA), sliding windows
    and non-causal prefixes (the mask transformers gives is used as is), and DynamicCache generation (including
    sliding-window layers that keep only the last keys; key columns that fell out of the window get probability 0,
    as they are masked). A StaticCache with sliding-window (rolling) layers is not supported.
    """

    def __init__(
        self,
        lmm: PreTrainedModel,
        layers: Sequence[int] | None = None,
        query_mask: torch.BoolTensor | None = None,
        key_mask: torch.BoolTensor | None = None,
        generation: bool = False,
        stop_after_last_layer: bool = False,
        numerics: str = "float32",
    ):
        if numerics not in ATTENTION_NUMERICS:
            raise ValueError(
                f"numerics must be one of {ATTENTION_NUMERICS}, got {numerics!r} ('float32': exact float32 "
                "probabilities under SDPA; 'eager': the original F-LMM's eager attention in the LMM's dtype)."
            )
        if generation and stop_after_last_layer:
            raise ValueError("`stop_after_last_layer` ends the first forward pass; it cannot be used with `generation`.")
        modules = language_attention_modules(lmm)
        not_enabled = [
            m.layer_idx for m in modules if getattr(m.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION
        ]
        if not_enabled:
            raise ValueError(
                f"The language model of {type(lmm).__name__} does not run '{ATTN_IMPLEMENTATION}' attention (layers "
                f"{not_enabled}); call `enable_capture(lmm)` first."
            )

        num_layers = len(modules)
        if layers is None:
            layers = list(range(num_layers))
        layers = [int(layer) for layer in layers]
        for layer in layers:
            if not -num_layers <= layer < num_layers:
                raise IndexError(f"Layer index {layer} out of range: the language model has {num_layers} layers.")
        layers = [layer % num_layers for layer in layers]
        if len(set(layers)) != len(layers):
            raise ValueError(f"Duplicate layer indices in {layers}.")

        self._check_mask("key_mask", key_mask)
        if query_mask is None:
            if not generation:
                raise ValueError("`query_mask` is required (it may be None only with `generation=True`).")
        else:
            self._check_mask("query_mask", query_mask)
            if query_mask.shape != key_mask.shape:
                raise ValueError(
                    f"`query_mask` {tuple(query_mask.shape)} and `key_mask` {tuple(key_mask.shape)} must have the "
                    "same shape [batch, length]."
                )

        self.layers: list[int] = layers
        self.numerics = numerics
        self.generation = generation
        self.stop_after_last_layer = stop_after_last_layer and not has_offloaded_weights(lmm)
        self.batch_size = key_mask.shape[0]
        self.query_length = None if query_mask is None else query_mask.shape[1]
        self._modules = [modules[layer] for layer in layers]
        self._module_ids = {id(module) for module in self._modules}
        # Every attention layer of the language model: with eager numerics they all run eager attention.
        self._language_module_ids = {id(module) for module in modules}
        self._token: Token | None = None

        if query_mask is None:
            query_mask = key_mask.new_zeros(self.batch_size, 0)
        self._query_positions, self._prompt_query_counts = _padded_positions(query_mask)
        self._key_positions, self.key_counts = _padded_positions(key_mask)
        key_slots = torch.arange(self._key_positions.shape[1], device=key_mask.device)
        self._key_valid = key_slots[None, :] < self.key_counts[:, None]  # [batch, max_key]

        # Per captured layer: list of chunks [batch, heads, rows, max_key] (first chunk: the prompt rows, padded),
        # and the number of tokens seen so far (to locate the key columns in a sliding-window cache).
        self._chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        self._seen: dict[int, int] = {layer: 0 for layer in layers}

    @staticmethod
    def _check_mask(name: str, mask: torch.Tensor | None) -> None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"`{name}` must be a BoolTensor [batch, length], got {type(mask).__name__}.")
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(
                f"`{name}` must be a BoolTensor [batch, length], got {mask.dtype} of shape {tuple(mask.shape)}."
            )

    def captures(self, module: nn.Module) -> bool:
        """Whether `module` is one of the attention modules this capture records."""
        return id(module) in self._module_ids

    def runs_on(self, module: nn.Module) -> bool:
        """Whether `module` is an attention module of the language model this capture was built for (any layer)."""
        return id(module) in self._language_module_ids

    def __enter__(self) -> AttentionCapture:
        if self._token is not None:
            raise RuntimeError("This AttentionCapture is already active; create one capture per forward pass.")
        active = _ACTIVE_CAPTURES.get()
        for other in active:
            shared = [m.layer_idx for m in self._modules if other.captures(m)]
            if shared:
                raise RuntimeError(f"Layers {shared} are already captured by another active AttentionCapture.")
        for layer in self.layers:
            self._chunks[layer] = []
            self._seen[layer] = 0
        self._token = _ACTIVE_CAPTURES.set(active + (self,))
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        _ACTIVE_CAPTURES.reset(self._token)
        self._token = None
        # swallow our own early stop (`stop_after_last_layer`), nothing else
        return isinstance(exc, _CaptureComplete) and exc.capture is self

    def _record(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        is_causal: bool | None,
        probs: torch.Tensor | None = None,
    ) -> None:
        """Called by `flmm_sdpa_attention_forward` on a captured module: store the selected probabilities.

        `probs`: eager attention's probabilities `[batch, heads, query, key]` of this call, which a capture with
        `numerics="eager"` takes its rows from (they are the ones that multiplied V)."""
        layer = module.layer_idx
        batch, heads, q_length, _ = query.shape
        kv_length = key.shape[2]
        if batch != self.batch_size:
            raise ValueError(f"The forward batch has {batch} sequences but the capture masks have {self.batch_size}.")
        chunks = self._chunks[layer]
        if not chunks:
            if self.query_length is not None and q_length != self.query_length:
                raise ValueError(
                    f"The forward pass has {q_length} query tokens but `query_mask` has length {self.query_length}."
                )
            query_index = self._query_positions.to(query.device)
        elif self.generation:
            query_index = torch.arange(q_length, device=query.device).expand(batch, -1)
        else:
            raise RuntimeError(
                f"Layer {layer} ran twice inside one AttentionCapture; use `generation=True` to append decoding steps."
            )

        # Key j of this call is token (total - kv_length + j): a sliding-window cache returns only its last keys
        # (offset > 0); a static cache returns empty slots after the seen tokens (offset 0).
        total = self._seen[layer] + q_length
        key_offset = max(total - kv_length, 0)
        columns = self._key_positions.to(key.device) - key_offset  # [batch, max_key]
        valid = self._key_valid.to(key.device) & (columns >= 0) & (columns < kv_length)

        n = query_index.shape[1]
        if n == 0:
            dtype = torch.float32 if self.numerics == "float32" else query.dtype
            kept = query.new_zeros(batch, heads, 0, columns.shape[1], dtype=dtype)
        else:
            if self.numerics == "eager":
                if probs is None:
                    raise RuntimeError("an eager-numerics capture was recorded without eager attention's probabilities")
                probs = probs.gather(2, query_index[:, None, :, None].expand(-1, heads, -1, kv_length))
            else:
                is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
                probs = selected_attention_probs(
                    query,
                    key,
                    attention_mask,
                    query_index,
                    scaling=scaling,
                    is_causal=is_causal,
                    num_key_value_groups=getattr(module, "num_key_value_groups", 1),
                )  # [batch, heads, n, key]
            gather_index = columns.clamp(0, kv_length - 1)[:, None, None, :].expand(-1, heads, n, -1)
            kept = probs.gather(3, gather_index)  # [batch, heads, n, max_key]
            kept = kept.masked_fill(~valid[:, None, None, :], 0.0)
        chunks.append(kept)
        self._seen[layer] = total
        if self.stop_after_last_layer and layer == max(self.layers):
            raise _CaptureComplete(self)

    # ----------------------------------------------------------------------------------------------------------------
    # Results

    def _check_ran(self) -> None:
        missing = [layer for layer in self.layers if not self._chunks[layer]]
        if missing:
            raise RuntimeError(f"No forward pass went through layers {missing} inside this AttentionCapture.")

    @property
    def query_counts(self) -> torch.LongTensor:
        """`LongTensor [batch]`: number of captured query rows per example."""
        self._check_ran()
        generated = sum(chunk.shape[2] for chunk in self._chunks[self.layers[0]][1:])
        return self._prompt_query_counts + generated

    def maps(self, layer: int) -> list[torch.Tensor]:
        """One captured decoder `layer`: list over examples of `Tensor [heads, n_query_b, n_key_b]` (dtype: see
        `numerics`)."""
        if layer not in self._chunks:
            raise KeyError(f"Layer {layer} was not captured (captured layers: {self.layers}).")
        self._check_ran()
        prompt, *generated = self._chunks[layer]
        maps = []
        for b in range(self.batch_size):
            rows = [prompt[b, :, : self._prompt_query_counts[b]]] + [chunk[b] for chunk in generated]
            maps.append(torch.cat(rows, dim=1)[..., : self.key_counts[b]])
        return maps

    @property
    def attentions(self) -> list[torch.Tensor]:
        """List over examples of `Tensor [n_layers, heads, n_query_b, n_key_b]` (layers as in `self.layers`; dtype: see
        `numerics`)."""
        per_layer = [self.maps(layer) for layer in self.layers]
        return [torch.stack([maps[b] for maps in per_layer]) for b in range(self.batch_size)]

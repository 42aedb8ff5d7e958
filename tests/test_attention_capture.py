"""Tests of `flmm_hf.attention_capture`: exact attention probabilities under SDPA.

Every captured map is compared with eager attention (`output_attentions=True`) of the same weights, or with the
transformers-4.39.1 reference the original F-LMM code ran on.
"""
import copy
import json
import math
import threading

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from flmm_hf.attention_capture import (
    ATTN_IMPLEMENTATION,
    AttentionCapture,
    causal_padding_spans,
    disable_capture,
    eager_attention,
    enable_capture,
    language_attention_modules,
    selected_attention_probs,
)

from tiny_models import FAMILIES, answer_mask, build_tiny, image_token_mask


TOL = 1e-5
IMAGE_ID = 99
N_IMAGE = 16  # 56 px / patch 14 = 4 x 4 image tokens


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    """A tiny random LLaVA: CLIP (2 layers) + Llama (4 layers, 4 query heads, 2 key/value heads: GQA)."""
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=56, patch_size=14, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_ID)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def llava_batch(padding: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two examples `[bos][prefix][16 image tokens][text]` of lengths 30 and 25 (or both 30 with `padding="none"`)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [30, 30] if padding == "none" else [30, 25]
    length = max(lengths)
    input_ids = torch.zeros(2, length, dtype=torch.long)
    attention_mask = torch.zeros(2, length, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids = torch.randint(3, IMAGE_ID, (n,), generator=generator)
        ids[0] = 1
        ids[3 + b : 3 + b + N_IMAGE] = IMAGE_ID
        span = slice(length - n, length) if padding == "left" else slice(0, n)
        input_ids[b, span] = ids
        attention_mask[b, span] = 1
    pixel_values = torch.randn(2, 3, 56, 56, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def last_tokens(attention_mask: torch.Tensor, n: int) -> torch.BoolTensor:
    """BoolTensor [B, L]: the last `n` real tokens of each row."""
    mask = attention_mask.bool()
    return mask & (mask.flip(-1).long().cumsum(-1).flip(-1) <= n)


def eager_rows(
    attentions: tuple[torch.Tensor, ...], layers: list[int], query_mask: torch.Tensor, key_mask: torch.Tensor
) -> list[torch.Tensor]:
    """Per example, the eager probabilities [layers, heads, n_query_b, n_key_b] at the selected rows/columns."""
    return [
        torch.stack([attentions[layer][b][:, query_mask[b]][:, :, key_mask[b]] for layer in layers])
        for b in range(query_mask.shape[0])
    ]


def max_abs_diff(captured: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    assert [c.shape for c in captured] == [e.shape for e in expected]
    return max((c - e).abs().max().item() for c, e in zip(captured, expected))


def eager_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights with eager attention everywhere."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


# ---------------------------------------------------------------------------------------------------------------------
# 1. capture == eager on LLaVA (GQA), with left / right / no padding and a subset of layers


@pytest.mark.parametrize("padding", ["left", "right", "none"])
def test_capture_matches_eager_llava(padding, tmp_path):
    model = tiny_llava()
    model.save_pretrained(tmp_path)
    eager = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    enable_capture(model)
    assert model.config.text_config._attn_implementation == ATTN_IMPLEMENTATION
    assert model.config.vision_config._attn_implementation == "sdpa"  # the vision tower is untouched

    inputs = llava_batch(padding)
    # query rows: the last 6 tokens plus the first 3 image tokens; key columns: the image tokens
    key_mask = inputs["input_ids"] == IMAGE_ID
    query_mask = last_tokens(inputs["attention_mask"], 6) | (key_mask & (key_mask.long().cumsum(-1) <= 3))
    layers = [3, 0, 2]
    with torch.no_grad(), AttentionCapture(model, layers, query_mask, key_mask) as capture:
        model(**inputs)
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True).attentions
    expected = eager_rows(reference, layers, query_mask, key_mask)

    assert capture.attentions[0].shape == (3, 4, 9, N_IMAGE)
    assert max_abs_diff(capture.attentions, expected) <= TOL
    # the comparison can fail: another layer's rows are far off
    assert max_abs_diff(capture.attentions, eager_rows(reference, [0, 2, 3], query_mask, key_mask)) > 1e-3

    # the per-layer view agrees with `attentions`
    for b in range(2):
        torch.testing.assert_close(capture.maps(0)[b], capture.attentions[b][1], rtol=0, atol=0)
        torch.testing.assert_close(capture.maps(0)[b], expected[b][1], rtol=0, atol=TOL)
    assert capture.query_counts.tolist() == [9, 9] and capture.key_counts.tolist() == [N_IMAGE, N_IMAGE]


def test_capture_matches_eager_of_the_same_torchao_quantized_llava(tmp_path):
    """With torchao int8 weight-only Linear layers (tensor subclasses in place of the q/k/v weights), the capture
    still equals the eager attention of the SAME quantized model; both differ from the unquantized model's maps."""
    pytest.importorskip("torchao", reason="torchao is not installed (pip install 'flmm-hf[quant]')")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    tiny_llava().save_pretrained(tmp_path)
    quantization = TorchAoConfig(Int8WeightOnlyConfig())
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, quantization_config=quantization).eval()
    eager = LlavaForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=quantization, attn_implementation="eager"
    ).eval()
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    weight = model.model.language_model.layers[0].self_attn.k_proj.weight
    assert type(weight).__module__.startswith("torchao")  # the projections really are quantized
    enable_capture(model)
    inputs = llava_batch("left")
    key_mask = inputs["input_ids"] == IMAGE_ID
    query_mask = last_tokens(inputs["attention_mask"], 6)
    layers = [0, 1, 2, 3]
    with torch.no_grad(), AttentionCapture(model, layers, query_mask, key_mask) as capture:
        model(**inputs)
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True).attentions
        unquantized = plain(**inputs, output_attentions=True).attentions
    assert max_abs_diff(capture.attentions, eager_rows(reference, layers, query_mask, key_mask)) <= TOL
    # int8 weights move the maps a little: the comparison above is with the quantized model, not the original
    assert 1e-6 < max_abs_diff(capture.attentions, eager_rows(unquantized, layers, query_mask, key_mask)) < 1e-2


def test_capture_examples_with_different_counts():
    """Examples select different numbers of rows and columns (batched gather with padding)."""
    model = enable_capture(tiny_llava())
    eager = eager_copy(model)
    inputs = llava_batch("right")
    query_mask = last_tokens(inputs["attention_mask"], 4)
    query_mask[1] = last_tokens(inputs["attention_mask"], 2)[1]
    key_mask = inputs["input_ids"] == IMAGE_ID
    key_mask[1, :10] = False  # example 1 keeps only part of its image
    key_mask[0, 0] = True  # and example 0 a text column (the <bos>) too
    with torch.no_grad(), AttentionCapture(model, None, query_mask, key_mask) as capture:
        model(**inputs)
        reference = eager(**inputs, output_attentions=True).attentions
    assert [a.shape for a in capture.attentions] == [(4, 4, 4, N_IMAGE + 1), (4, 4, 2, int(key_mask[1].sum()))]
    assert max_abs_diff(capture.attentions, eager_rows(reference, [0, 1, 2, 3], query_mask, key_mask)) <= TOL
    assert capture.query_counts.tolist() == [4, 2] and capture.key_counts.tolist() == [N_IMAGE + 1, key_mask[1].sum()]


def test_stop_after_last_layer():
    """The early stop keeps the same maps, skips everything after the deepest selected layer's attention, and lets
    any other exception through."""
    model = enable_capture(tiny_llava())
    inputs = llava_batch("left")
    key_mask = inputs["input_ids"] == IMAGE_ID
    query_mask = last_tokens(inputs["attention_mask"], 5)
    layers = [2, 0]
    with torch.no_grad(), AttentionCapture(model, layers, query_mask, key_mask) as full:
        model(**inputs)

    ran = []
    decoder_layers = model.model.language_model.layers
    hooks = [decoder_layers[i].mlp.register_forward_hook(lambda *_, i=i: ran.append(i)) for i in range(4)]
    try:
        outputs = None
        with torch.no_grad(), AttentionCapture(model, layers, query_mask, key_mask, stop_after_last_layer=True) as early:
            outputs = model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert outputs is None  # the forward pass ended inside the model
    assert ran == [0, 1]  # layer 2's MLP and layer 3 never ran
    for a, b in zip(early.attentions, full.attentions):
        assert torch.equal(a, b)
    assert not any(hasattr(m, "_flmm_attention_capture") for m in language_attention_modules(model))

    with pytest.raises(ValueError, match="generation"):
        AttentionCapture(model, layers, None, key_mask, generation=True, stop_after_last_layer=True)
    with pytest.raises(ZeroDivisionError):  # only its own stop is swallowed
        with AttentionCapture(model, layers, query_mask, key_mask, stop_after_last_layer=True):
            1 / 0


# ---------------------------------------------------------------------------------------------------------------------
# 2. the transformers-4.39.1 reference (the version the original F-LMM ran on)


def test_capture_matches_transformers_439_reference(fixtures_dir):
    folder = fixtures_dir / "reference" / "attention_llava_t439"
    info = json.loads((folder / "reference.json").read_text())
    reference = load_file(folder / "reference.safetensors")
    # The 4.39 key layout (`language_model.model.*`, ...) is mapped by from_pretrained itself.
    model, loading = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    enable_capture(model.eval())

    input_ids = torch.tensor([info["input_ids_expanded"]])
    key_mask = input_ids == info["image_token_id"]
    assert key_mask[0, slice(*info["image_token_span"])].all() and int(key_mask.sum()) == 576
    query_mask = torch.zeros_like(key_mask)
    query_mask[0, slice(*info["answer_token_span"])] = True

    with torch.no_grad(), AttentionCapture(model, None, query_mask, key_mask) as capture:
        outputs = model(input_ids=input_ids, pixel_values=reference["pixel_values"], output_hidden_states=True)
    attentions = capture.attentions[0]  # [layers, heads, answer tokens, image tokens]
    assert attentions.shape == reference["attentions"].shape == (4, 4, 24, 576)
    assert (attentions - reference["attentions"]).abs().max() <= TOL
    hidden_states = torch.stack([h[0, query_mask[0]] for h in outputs.hidden_states])
    assert hidden_states.shape == reference["hidden_states"].shape
    assert (hidden_states - reference["hidden_states"]).abs().max() <= TOL


# ---------------------------------------------------------------------------------------------------------------------
# 3. generation with a KV cache


def extend_inputs(inputs: dict[str, torch.Tensor], sequences: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs of one forward over prompt + generated tokens (per-token inputs extended like `generate` does)."""
    n_new = sequences.shape[1] - inputs["input_ids"].shape[1]
    full = dict(inputs, input_ids=sequences)
    for name in ("attention_mask", "token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids"):
        if name in inputs:
            fill = 1 if name == "attention_mask" else 0
            full[name] = torch.cat([inputs[name], inputs[name].new_full((inputs[name].shape[0], n_new), fill)], 1)
    return full


def check_generation(model, inputs, key_mask, layers, prompt_rows: int, max_new_tokens: int = 5) -> float:
    """Capture during greedy `generate`; compare with eager attention of one forward over the whole sequence."""
    eager = eager_copy(model)
    enable_capture(model)
    prompt_length = inputs["input_ids"].shape[1]
    query_mask = last_tokens(inputs["attention_mask"], prompt_rows) if prompt_rows else None
    with torch.no_grad(), AttentionCapture(model, layers, query_mask, key_mask, generation=True) as capture:
        sequences = model.generate(
            **inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False
        )
    assert sequences.shape[1] == prompt_length + max_new_tokens

    full = extend_inputs(inputs, sequences)
    with torch.no_grad():
        reference = eager(**full, output_attentions=True).attentions
    # rows: the prompt rows, then the generated tokens that were fed back (all but the last one)
    rows = torch.zeros_like(sequences, dtype=torch.bool)
    if prompt_rows:
        rows[:, :prompt_length] = query_mask
    rows[:, prompt_length : prompt_length + max_new_tokens - 1] = True
    columns = torch.zeros_like(rows)
    columns[:, :prompt_length] = key_mask
    expected = eager_rows(reference, layers, rows, columns)
    assert capture.query_counts.tolist() == [prompt_rows + max_new_tokens - 1] * 2
    assert all(a.shape[2] == prompt_rows + max_new_tokens - 1 for a in capture.attentions)
    return max_abs_diff(capture.attentions, expected)


@pytest.mark.parametrize("padding", ["left", "none"])
@pytest.mark.parametrize("prompt_rows", [0, 2])
def test_capture_during_generation_llava(padding, prompt_rows):
    model = tiny_llava()
    inputs = llava_batch(padding)
    assert check_generation(model, inputs, inputs["input_ids"] == IMAGE_ID, [0, 3], prompt_rows) <= TOL


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "qwen3_vl", "glm4v", "ernie4_5_vl_moe"])
def test_capture_during_generation_families(family):
    """mrope positions and cached rope deltas (Qwen2-VL, Qwen3-VL with deepstack, GLM-4.1V, ERNIE-4.5-VL);
    sliding-window cache layers and a bidirectional image block (Gemma3)."""
    model, inputs = build_tiny(family, padding_side="left")
    # key columns: every prompt token, so that Gemma3's sliding window (16) cuts through them
    key_mask = inputs["attention_mask"].bool()
    assert check_generation(model, inputs, key_mask, [0, 1], prompt_rows=1) <= TOL


# ---------------------------------------------------------------------------------------------------------------------
# 4. SDPA outputs are unchanged


def test_outputs_unchanged_by_capture():
    """Capturing only observes: "flmm_sdpa" with and without an active capture give identical outputs."""
    model = enable_capture(tiny_llava())
    inputs = llava_batch("left")
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True)
        key_mask = inputs["input_ids"] == IMAGE_ID
        with AttentionCapture(model, None, inputs["attention_mask"].bool(), key_mask):
            captured = model(**inputs, output_hidden_states=True)
    assert torch.equal(plain.logits, captured.logits)
    for a, b in zip(plain.hidden_states, captured.hidden_states):
        assert torch.equal(a, b)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_outputs_equal_sdpa(padding):
    """"flmm_sdpa" vs transformers' "sdpa": bit-identical without padding; with padding (CPU runs each sequence's real
    tokens on their own) equal at every real position to 1e-5, and finite (zero attention output) at the padding."""
    model = tiny_llava()
    inputs = llava_batch(padding)
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True)
        enable_capture(model)
        ours = model(**inputs, output_hidden_states=True)
    real = inputs["attention_mask"].bool()
    if padding == "none":
        assert torch.equal(plain.logits, ours.logits)
    else:
        assert not torch.equal(plain.logits, ours.logits)  # the shortcut did run
    assert (plain.logits[real] - ours.logits[real]).abs().max() <= TOL
    for a, b in zip(plain.hidden_states, ours.hidden_states):
        assert (a[real] - b[real]).abs().max() <= TOL
        assert torch.isfinite(b).all()


def test_causal_padding_spans():
    """The shortcut is taken only for plain causal attention over one contiguous run of real tokens per sequence."""
    length = 6
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    left = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    right = left.flip(-1)
    for real, spans in [(left, [(0, 6), (2, 6)]), (right, [(0, 6), (0, 4)])]:
        mask = (causal[None] & real[:, None, :])[:, None]  # [2, 1, L, L] as transformers' sdpa_mask builds it
        assert causal_padding_spans(mask, length, length) == spans
        assert causal_padding_spans(mask, length - 1, length) is None  # a cache: queries != keys
        assert causal_padding_spans(mask.float(), length, length) is None
    mask = (causal[None] & left[:, None, :])[:, None]
    unmasked = mask.clone()
    unmasked[1, 0, :2] = True  # sdpa_mask's fix for old torch: fully masked padding rows attend everywhere
    assert causal_padding_spans(unmasked, length, length) == [(0, 6), (2, 6)]
    odd = mask.clone()
    odd[1, 0, 0, 0] = True  # a padding row with some other pattern: not what transformers builds
    assert causal_padding_spans(odd, length, length) is None
    window = mask & ~torch.ones(length, length, dtype=torch.bool).tril(-3)  # sliding window of 3
    assert causal_padding_spans(window, length, length) is None
    block = mask.clone()
    block[:, 0, 2:4, 2:4] = True  # a bidirectional image block (Gemma3, PaliGemma's prefix)
    assert causal_padding_spans(block, length, length) is None
    holes = (causal[None] & torch.tensor([[1, 1, 0, 1, 1, 1]] * 2, dtype=torch.bool)[:, None, :])[:, None]
    assert causal_padding_spans(holes, length, length) is None  # not one contiguous run
    assert causal_padding_spans(None, length, length) is None


def test_broadcast_mask_goes_through_sdpa():
    """A mask shared by the batch (batch dim 1) is not per-sequence padding: sdpa's own path, bit for bit."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from flmm_hf.attention_capture import flmm_sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    query, key, value = (torch.randn(2, 2, 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    real = torch.tensor([False, False, True, True, True, True])
    mask = (torch.ones(6, 6, dtype=torch.bool).tril() & real)[None, None]  # left padding, one mask for both
    ours, _ = flmm_sdpa_attention_forward(module, query, key, value, mask)
    reference, _ = sdpa_attention_forward(module, query, key, value, mask)
    assert torch.equal(ours, reference)


# ---------------------------------------------------------------------------------------------------------------------
# 5. other families: capture == eager


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_capture_matches_eager_families(family, padding_side):
    model, inputs = build_tiny(family, padding_side=padding_side)
    eager = eager_copy(model)
    enable_capture(model)
    key_mask = image_token_mask(inputs)
    # answer rows, and the image rows too (bidirectional inside the image for Gemma3 / PaliGemma)
    query_mask = answer_mask(inputs) | key_mask
    layers = list(range(len(language_attention_modules(model))))
    with torch.no_grad(), AttentionCapture(model, layers, query_mask, key_mask) as capture:
        model(**inputs)
        reference = eager(**inputs, output_attentions=True).attentions
    assert inputs["input_ids"].shape[0] >= 2
    assert max_abs_diff(capture.attentions, eager_rows(reference, layers, query_mask, key_mask)) <= TOL


# ---------------------------------------------------------------------------------------------------------------------
# 6. eager numerics: the original's bf16 maps (eager attention in bf16, softmax in float32, probabilities in bf16)


def bf16_llava_and_batch(padding: str) -> tuple[LlavaForConditionalGeneration, LlavaForConditionalGeneration, dict]:
    """The tiny LLaVA in bf16 with capture enabled, the same weights with transformers' eager attention in the
    language model only (the vision tower keeps SDPA in both, so that both see the same image features), a batch."""
    model = tiny_llava().to(torch.bfloat16)
    eager = disable_capture(copy.deepcopy(model), "eager")
    assert eager.config.text_config._attn_implementation == "eager"
    assert eager.config.vision_config._attn_implementation == "sdpa"
    inputs = llava_batch(padding)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    return enable_capture(model), eager, inputs


@pytest.mark.parametrize("padding", ["left", "right", "none"])
def test_eager_numerics_equal_transformers_eager_in_bf16(padding):
    """`numerics="eager"` gives exactly what transformers' eager attention returns with `output_attentions=True` in
    bf16 (it softmaxes in float32 and casts to the query dtype), and the model's outputs are eager's too; the float32
    numerics differ from those bf16 maps by bf16 rounding (and, past layer 0, by SDPA's hidden states)."""
    model, eager, inputs = bf16_llava_and_batch(padding)
    key_mask = inputs["input_ids"] == IMAGE_ID
    query_mask = last_tokens(inputs["attention_mask"], 6) | (key_mask & (key_mask.long().cumsum(-1) <= 3))
    layers = [3, 0, 2]
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        with AttentionCapture(model, layers, query_mask, key_mask, numerics="eager") as eager_capture:
            ours = model(**inputs, output_hidden_states=True)
        with AttentionCapture(model, layers, query_mask, key_mask) as float_capture:
            model(**inputs)
        reference = eager(**inputs, output_attentions=True, output_hidden_states=True)
    assert reference.attentions[0].dtype == torch.bfloat16
    expected = eager_rows(reference.attentions, layers, query_mask, key_mask)

    assert all(a.dtype == torch.bfloat16 for a in eager_capture.attentions)
    assert all(torch.equal(a, e) for a, e in zip(eager_capture.attentions, expected))  # bit for bit
    assert torch.equal(ours.logits[real], reference.logits[real])  # later layers saw eager's hidden states
    for a, b in zip(ours.hidden_states, reference.hidden_states):
        assert torch.equal(a[real], b[real])

    # float32 numerics (the default): float32 maps, off the bf16 ones by bf16 rounding: measured 4.9e-4 to 9.8e-4
    # per layer on this model, whose maps reach 0.26 (one bf16 step at 0.25 is 2^-10 = 9.8e-4)
    assert all(a.dtype == torch.float32 for a in float_capture.attentions)
    difference = max((a - e.float()).abs().max().item() for a, e in zip(float_capture.attentions, expected))
    assert 1e-4 < difference < 5e-3
    # in layer 0 (same input, no SDPA drift before it) the bf16 maps are the float32 ones computed from bf16 scores
    layer0 = [a[1] for a in float_capture.attentions], [a[1].float() for a in eager_capture.attentions]
    assert max((f - e).abs().max().item() for f, e in zip(*layer0)) > 1e-5

    # after the block, the model runs SDPA again (its outputs differ from eager's in bf16)
    with torch.no_grad():
        after = model(**inputs)
    assert not torch.equal(after.logits[real], reference.logits[real])


@pytest.mark.parametrize("prompt_rows", [0, 2])
def test_eager_numerics_during_generation(prompt_rows):
    """With a KV cache, each decoding step's rows equal transformers' eager `generate(output_attentions=True)`."""
    model, eager, inputs = bf16_llava_and_batch("left")
    key_mask = inputs["input_ids"] == IMAGE_ID
    layers = [0, 3]
    query_mask = last_tokens(inputs["attention_mask"], prompt_rows) if prompt_rows else None
    steps = 4
    with torch.no_grad():
        with AttentionCapture(model, layers, query_mask, key_mask, generation=True, numerics="eager") as capture:
            sequences = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        reference = eager.generate(
            **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            output_attentions=True, return_dict_in_generate=True,
        )
    assert torch.equal(sequences, reference.sequences)
    # reference.attentions[s][layer]: step 0 is the prompt [B, H, L, L], step s > 0 the token fed back [B, H, 1, L + s]
    prompt_length = inputs["input_ids"].shape[1]
    for b in range(2):
        for i, layer in enumerate(layers):
            rows = [reference.attentions[0][layer][b][:, query_mask[b]]] if prompt_rows else []
            rows += [reference.attentions[s][layer][b] for s in range(1, steps)]
            expected = torch.cat([r[..., :prompt_length] for r in rows], dim=1)[..., key_mask[b]]
            assert torch.equal(capture.attentions[b][i], expected)


def test_eager_numerics_are_per_call():
    """An eager capture makes only its own thread's forwards eager: a plain forward in another thread meanwhile
    runs SDPA, and a capture of one model does not switch another model."""
    model, eager, inputs = bf16_llava_and_batch("none")
    other = enable_capture(copy.deepcopy(model))
    key_mask = inputs["input_ids"] == IMAGE_ID
    query_mask = last_tokens(inputs["attention_mask"], 2)
    with torch.no_grad():
        sdpa_logits = model(**inputs).logits
        eager_logits = eager(**inputs).logits
    assert not torch.equal(sdpa_logits, eager_logits)
    seen = {}

    def plain_forward():
        with torch.no_grad():
            seen["thread"] = model(**inputs).logits

    with torch.no_grad(), AttentionCapture(model, [1], query_mask, key_mask, numerics="eager"):
        thread = threading.Thread(target=plain_forward)
        thread.start()
        thread.join()
        seen["other model"] = other(**inputs).logits
        seen["captured"] = model(**inputs).logits
    assert torch.equal(seen["thread"], sdpa_logits)
    assert torch.equal(seen["other model"], sdpa_logits)
    assert torch.equal(seen["captured"], eager_logits)


def test_eager_scaling_equals_the_439_division():
    """transformers 4.39 divided the bf16 scores by sqrt(head_dim), transformers 5 (and `eager_attention`) multiply
    by head_dim ** -0.5: for head_dim 64 and 128 the bf16 results are equal for every bf16 value. A bf16 product or
    quotient by a constant depends only on the 8-bit significand (the exponent shifts out), so these 2 x 256 values
    are all cases."""
    significands = torch.arange(256, dtype=torch.int32)
    # sign, exponent of 1.0 (127), 7 stored mantissa bits: every significand in [1, 2), both signs
    bits = torch.cat([(127 << 7) | significands[:128], (1 << 15) | (127 << 7) | significands[:128]])
    values = torch.cat([bits.to(torch.int16).view(torch.bfloat16) * scale for scale in (1.0, 2.0**-20, 2.0**20)])
    assert values.unique().numel() == 3 * 256
    for head_dim in (64, 128):
        assert torch.equal(values / math.sqrt(head_dim), values * head_dim**-0.5)


def test_eager_attention_and_numerics_errors():
    """`eager_attention` equals `selected_attention_probs(numerics="eager")` over all rows, a subset of rows gives the
    same values; score modifiers that eager Llama attention lacks and unknown numerics are refused."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 6, 16, generator=generator).to(torch.bfloat16)
    key = torch.randn(1, 2, 6, 16, generator=generator).to(torch.bfloat16)
    value = torch.randn(1, 2, 6, 16, generator=generator).to(torch.bfloat16)
    module = torch.nn.Module().eval()
    module.num_key_value_groups = 2
    output, probs = eager_attention(module, query, key, value, None, scaling=0.25)
    assert output.shape == (1, 6, 4, 16) and output.dtype == probs.dtype == torch.bfloat16
    assert torch.equal(probs.triu(1), torch.zeros_like(probs))  # a None mask is causal, as under sdpa
    rows = torch.tensor([[5, 2]])
    subset = selected_attention_probs(query, key, None, rows, scaling=0.25, num_key_value_groups=2, numerics="eager")
    # equal here; a matmul over fewer rows may sum in another order on other CPUs: one bf16 step (2^-8) at most
    assert subset.dtype == torch.bfloat16 and (subset.float() - probs[:, :, [5, 2]].float()).abs().max() <= 2**-8
    as_float = selected_attention_probs(query, key, None, rows, scaling=0.25, num_key_value_groups=2)
    assert as_float.dtype == torch.float32 and (as_float - subset.float()).abs().max() > 0

    with pytest.raises(NotImplementedError, match="softcap"):
        eager_attention(module, query, key, value, None, scaling=0.25, softcap=30.0)
    with pytest.raises(ValueError, match="numerics must be one of"):
        selected_attention_probs(query, key, None, rows, numerics="bf16")
    model = enable_capture(tiny_llava())
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="numerics must be one of .*'bfloat16'"):
        AttentionCapture(model, None, mask, mask, numerics="bfloat16")


# ---------------------------------------------------------------------------------------------------------------------
# API: modules, errors, clean-up


def test_selected_attention_probs_mask_kinds():
    """Boolean, additive float (per head) and None masks give eager's softmax; GQA repeats the key heads."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 5, 8, generator=generator)
    key = torch.randn(2, 2, 7, 8, generator=generator)  # 2 key heads for 4 query heads
    rows = torch.tensor([[0, 4], [3, 1]])
    scores = query @ key.repeat_interleave(2, dim=1).transpose(2, 3) * 0.3  # [batch, heads, query, key]
    allowed = torch.rand(2, 4, 5, 7, generator=generator) > 0.4
    allowed[..., 0] = True
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    expected = (scores + additive).softmax(-1)
    picked = torch.stack([expected[b][:, rows[b]] for b in range(2)])
    for mask in (allowed, additive):
        probs = selected_attention_probs(query, key, mask, rows, scaling=0.3, num_key_value_groups=2)
        assert (probs - picked).abs().max() <= 1e-6
    # None: sdpa's causal (upper-left: query i sees keys 0..i), or everything when not causal
    causal = torch.ones(5, 7, dtype=torch.bool).tril()
    expected = scores.masked_fill(~causal, torch.finfo(torch.float32).min).softmax(-1)
    probs = selected_attention_probs(query, key, None, rows, scaling=0.3, num_key_value_groups=2)
    assert (probs - torch.stack([expected[b][:, rows[b]] for b in range(2)])).abs().max() <= 1e-6
    probs = selected_attention_probs(query, key, None, rows, scaling=0.3, is_causal=False, num_key_value_groups=2)
    assert (probs - torch.stack([scores.softmax(-1)[b][:, rows[b]] for b in range(2)])).abs().max() <= 1e-6


def test_enable_and_disable_capture():
    model = tiny_llava()
    assert enable_capture(model) is model
    assert all(m.config._attn_implementation == ATTN_IMPLEMENTATION for m in language_attention_modules(model))
    disable_capture(model)
    assert model.config.text_config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="enable_capture"):
        AttentionCapture(model, None, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool))


def test_language_attention_modules_in_layer_order():
    model = tiny_llava()
    modules = language_attention_modules(model)
    assert [m.layer_idx for m in modules] == [0, 1, 2, 3]
    assert all(m is layer.self_attn for m, layer in zip(modules, model.model.language_model.layers))


def test_errors():
    model = tiny_llava()
    inputs = llava_batch("right")
    key_mask = inputs["input_ids"] == IMAGE_ID
    query_mask = last_tokens(inputs["attention_mask"], 2)
    with pytest.raises(ValueError, match="enable_capture"):
        AttentionCapture(model, None, query_mask, key_mask)
    enable_capture(model)
    with pytest.raises(IndexError, match="out of range"):
        AttentionCapture(model, [4], query_mask, key_mask)
    with pytest.raises(ValueError, match="Duplicate"):
        AttentionCapture(model, [1, -3], query_mask, key_mask)
    with pytest.raises(ValueError, match="same shape"):
        AttentionCapture(model, None, query_mask[:, 1:], key_mask)
    with pytest.raises(ValueError, match="BoolTensor"):
        AttentionCapture(model, None, query_mask.long(), key_mask)
    with pytest.raises(ValueError, match="BoolTensor"):
        AttentionCapture(model, None, query_mask[0], key_mask[0])
    with pytest.raises(ValueError, match="query_mask"):
        AttentionCapture(model, None, None, key_mask)

    with torch.no_grad():
        capture = AttentionCapture(model, [1], query_mask, key_mask)
        with pytest.raises(RuntimeError, match="No forward pass"):
            capture.attentions
        with capture:
            with pytest.raises(RuntimeError, match="already captured"):
                AttentionCapture(model, [1], query_mask, key_mask).__enter__()
            with pytest.raises(ValueError, match="batch"):
                model(**{k: v[:1] for k, v in inputs.items()})
        with AttentionCapture(model, [1], query_mask, key_mask) as capture:
            model(**inputs)
            with pytest.raises(RuntimeError, match="ran twice"):
                model(**inputs)
        with pytest.raises(KeyError, match="not captured"):
            capture.maps(0)
        short = {k: v[:, :-1] if k != "pixel_values" else v for k, v in inputs.items()}
        with pytest.raises(ValueError, match="query tokens"), AttentionCapture(model, [1], query_mask, key_mask):
            model(**short)

        with pytest.raises(RuntimeError, match="already active"), capture, capture:
            pass

    # no capture state lives on the modules, and none is left active: a capture of every layer enters and records
    assert not any(name.startswith("_flmm") for m in language_attention_modules(model) for name in vars(m))
    with torch.no_grad(), AttentionCapture(model, None, query_mask, key_mask) as capture:
        model(**inputs)
    assert len(capture.attentions) == 2

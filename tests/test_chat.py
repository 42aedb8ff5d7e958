"""Grounded conversation and reasoning segmentation on a tiny random LLaVA (real llava-1.5 processor files).

A random LMM answers gibberish, so no test reads meaning into the text: phrases are taken from what the
model actually generated (greedy decoding is deterministic), and the checks are about exactness
(captured attention == a single forward pass, chat's masks == the forward path's masks on the same
tokens), shapes, spans and geometry.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from flmm_hf import FLMMForGrounding, FLMMProcessor
from flmm_hf import grounded_chat
from flmm_hf.attention_capture import AttentionCapture
from flmm_hf.grounded_chat import (
    PhraseNotFoundError,
    generate_with_attention,
    ground_generated,
    parse_listed_objects,
    token_char_spans,
)
from flmm_hf.visual_cot import reasoning_segmentation
from tiny_models import llava_flmm_processor, tiny_flmm

QUESTION = "What is in the image?"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def processor(fixtures_dir) -> FLMMProcessor:
    return llava_flmm_processor(fixtures_dir)


@pytest.fixture(scope="module")
def model(fixtures_dir) -> FLMMForGrounding:
    return tiny_flmm(fixtures_dir)


@pytest.fixture(scope="module")
def image(fixtures_dir) -> Image.Image:
    return Image.open(fixtures_dir / "coco" / "images" / "000000039769.png").convert("RGB")  # 640x480


@pytest.fixture(scope="module")
def generated(model, processor, image):
    return generate_with_attention(model, image, QUESTION, processor, return_sam_inputs=True, max_new_tokens=NEW_TOKENS)


def _visible_tokens(answer) -> list[tuple[int, int]]:
    """Spans of generated tokens whose text has a letter or digit (usable as explicit phrases)."""
    spans = []
    for s, e in answer.token_spans:
        piece = answer.text[s:e].strip()
        if any(c.isalnum() for c in piece):
            spans.append((s + answer.text[s:e].index(piece), s + answer.text[s:e].index(piece) + len(piece)))
    return spans


def _single_forward(model, answer):
    """Attention rows and hidden states of the generated tokens from ONE forward over prompt + generated text."""
    inputs = answer.inputs
    prompt_ids = inputs["input_ids"]
    full_ids = torch.cat([prompt_ids, answer.token_ids[None]], dim=1)
    query = torch.zeros_like(full_ids, dtype=torch.bool)
    query[:, prompt_ids.shape[1] :] = True
    key = full_ids == model.image_token_id
    with torch.no_grad(), AttentionCapture(model.lmm, model.config.selected_layers, query, key) as capture:
        out = model.lmm(
            input_ids=full_ids, attention_mask=torch.ones_like(full_ids), pixel_values=inputs["pixel_values"],
            output_hidden_states=True, use_cache=False,
        )
    num_layers = model.config.num_text_layers
    hidden = torch.stack([h[0, prompt_ids.shape[1] :] for h in out.hidden_states[-num_layers:]])
    return capture.attentions[0], hidden, full_ids


# ---- acceptance 1: capture during generate (KV cache) == single forward ----------------------
def test_generation_capture_equals_single_forward(model, generated):
    answer = generated
    assert answer.token_ids.shape == (NEW_TOKENS,)
    # Every generated token has its row, the last one included (generate feeds only n - 1 tokens back).
    layers, heads = len(model.config.selected_layers), model.lmm.config.text_config.num_attention_heads
    assert answer.attentions.shape == (layers, heads, NEW_TOKENS, 576)
    rows, hidden, _ = _single_forward(model, answer)
    assert rows.shape == answer.attentions.shape
    assert (answer.attentions - rows).abs().max() <= 1e-5
    assert (answer.hidden_states - hidden.float()).abs().max() <= 1e-5
    # Not vacuous: the rows are real probabilities that differ from token to token.
    assert answer.attentions.sum(-1).min() > 0
    assert (answer.attentions[:, :, 0] - answer.attentions[:, :, -1]).abs().max() > 1e-4


def test_capture_when_generation_stops_early(model, processor, image, generated):
    # Make the third generated token an end-of-sequence token: generation stops on a visible token
    # that no decoding step fed back; its row must still be exact.
    stop = int(generated.token_ids[2])
    answer = generate_with_attention(model, image, QUESTION, processor, max_new_tokens=NEW_TOKENS, eos_token_id=stop)
    assert answer.token_ids.tolist() == generated.token_ids[:3].tolist()
    rows, hidden, _ = _single_forward(model, answer)
    assert answer.attentions.shape[2] == 3
    assert (answer.attentions - rows).abs().max() <= 1e-5
    assert (answer.hidden_states - hidden.float()).abs().max() <= 1e-5


# ---- acceptance 2: chat returns text, exact spans, one mask per phrase ------------------------
def test_chat_explicit_phrases(model, processor, image, generated):
    visible = _visible_tokens(generated)
    assert len(visible) >= 2, f"the tiny model's answer has too few visible tokens: {generated.text!r}"
    phrases = [generated.text[s:e] for s, e in (visible[0], visible[-1])]
    result = model.chat(image, QUESTION, phrases=phrases, processor=processor, max_new_tokens=NEW_TOKENS, use_refiner=False)
    assert result.text == generated.text
    assert result.phrases == phrases
    assert len(result.spans) == 2
    for (start, end), phrase in zip(result.spans, phrases):
        assert result.text[start:end] == phrase
    assert result.masks.dtype == torch.bool
    assert result.masks.shape == (2, image.height, image.width)
    assert result.selector == "explicit" and result.missing == []


def test_chat_masks_equal_the_forward_path(model, processor, image, generated):
    # The same token sequence through FLMMForGrounding.forward (phrase tokens marked) gives the same logits:
    # chat reuses the head, the text projection and the refiner exactly.
    visible = _visible_tokens(generated)
    spans = [visible[0], visible[-1]]
    refined = ground_generated(model, generated, spans, image, use_refiner=True)
    coarse = ground_generated(model, generated, spans, image, use_refiner=False)
    _, _, full_ids = _single_forward(model, generated)
    token_masks = grounded_chat.phrase_token_masks(generated, spans)
    phrase_ids = torch.full_like(full_ids, -1)
    prompt_length = generated.inputs["input_ids"].shape[1]
    for k in range(len(spans)):
        phrase_ids[0, prompt_length + token_masks[k].nonzero().flatten()] = k
    inputs = {k: v for k, v in generated.inputs.items() if k not in ("input_ids", "attention_mask", "phrase_ids")}
    with torch.no_grad():
        out = model(input_ids=full_ids, attention_mask=torch.ones_like(full_ids), phrase_ids=phrase_ids, **inputs)
    assert coarse.shape == out.coarse_logits[0].shape
    assert torch.allclose(coarse, out.coarse_logits[0], atol=1e-4)
    assert refined.shape == (2, image.height, image.width)
    assert torch.allclose(refined, out.refined_logits[0], atol=1e-4)


def test_chat_absent_phrase_is_reported(model, processor, image, generated):
    absent = "a purple elephant"
    assert absent not in generated.text.lower()
    with pytest.raises(PhraseNotFoundError, match="purple elephant") as error:
        model.chat(image, QUESTION, phrases=[absent], processor=processor, max_new_tokens=NEW_TOKENS, use_refiner=False)
    assert error.value.missing == [absent] and error.value.text == generated.text
    present = generated.text[slice(*_visible_tokens(generated)[0])]
    result = model.chat(
        image, QUESTION, phrases=[present, absent], processor=processor, max_new_tokens=NEW_TOKENS,
        on_missing="skip", use_refiner=False,
    )
    assert result.phrases == [present] and result.missing == [absent]
    assert result.masks.shape == (1, image.height, image.width)


@pytest.fixture(scope="module")
def captioner():
    """The offline demo's tiny LLaVA, pre-trained for 150 steps (about 10 s) on captions of 64 shapes scenes, such as
    "green triangle middle center ; yellow circle top left .": an LMM whose answers name what it sees."""
    import numpy as np

    from flmm_hf.demo_backbone import DemoBackboneArguments, PretrainArguments, build_demo_backbone, pretrain_demo_backbone
    from flmm_hf.shapes import generate_scene

    rng = np.random.default_rng(0)
    scenes = []
    for _ in range(64):
        image, objects = generate_scene(rng, image_size=96)
        scenes.append((image, [f"the {o['colour']} {o['shape']}" for o in objects], [o["mask"] for o in objects]))
    sizes = DemoBackboneArguments(
        image_size=96, vision_hidden_size=64, vision_layers=1, text_hidden_size=64, text_layers=2, text_heads=2
    )
    lmm, lmm_processor = build_demo_backbone(sizes, words=[" ".join(expressions) for _, expressions, _ in scenes])
    stats = pretrain_demo_backbone(lmm, lmm_processor, scenes, PretrainArguments(steps=150, batch_size=16, learning_rate=1e-3))
    assert stats["pretrain_final_loss"] < 0.5 * stats["pretrain_first_loss"]  # it learned to caption
    torch.manual_seed(0)
    model = FLMMForGrounding.from_lmm(lmm, use_sam=False, mask_head_channels=8)
    return model, FLMMProcessor(lmm_processor), scenes


def test_chat_lmm_selector_grounds_the_objects_a_captioner_names(captioner):
    """The keyword selector: the LMM lists the objects of its own answer; each listed object found in the answer
    is grounded (a caption-trained LMM answers, and lists, "<colour> <shape> <position>" items)."""
    model, processor, scenes = captioner
    grounded = 0
    for image, _, _ in scenes[:3]:
        result = model.chat(image, "Please give me a description of the image.", processor=processor, selector="lmm",
                            max_new_tokens=16)
        assert result.selector == "lmm" and result.selector_reply
        assert len(result.phrases) == len(result.spans) == result.masks.shape[0]
        assert result.masks.shape[1:] == (image.height, image.width)
        for (start, end), phrase in zip(result.spans, result.phrases):
            assert result.text[start:end] == phrase and phrase.split()[0] in ("red", "green", "blue", "yellow")
        grounded += len(result.phrases)
    assert grounded >= 3  # at least one object per scene on average


def test_auto_selector_uses_noun_chunks_when_spacy_is_there(model, processor, image, generated, monkeypatch):
    # A stand-in for spaCy's pipeline: one noun chunk over the first visible token, and a pronoun (dropped).
    first = _visible_tokens(generated)[0]

    class FakeNLP:
        def __call__(self, text):
            chunk = lambda s, e, pos: SimpleNamespace(start_char=s, end_char=e, text=text[s:e], root=SimpleNamespace(pos_=pos))
            return SimpleNamespace(noun_chunks=[chunk(*first, "NOUN"), chunk(0, 1, "PRON")])

    monkeypatch.setattr(grounded_chat, "load_spacy", lambda *a, **k: FakeNLP())
    result = model.chat(image, QUESTION, processor=processor, max_new_tokens=NEW_TOKENS, use_refiner=False)
    assert result.selector == "noun_chunks" and result.spans == [first]
    monkeypatch.setattr(grounded_chat, "load_spacy", lambda *a, **k: None)
    with pytest.raises(ImportError, match="spacy"):
        model.chat(image, QUESTION, processor=processor, selector="noun_chunks", max_new_tokens=2)


# ---- phrase helpers ----------------------------------------------------------------------------
def test_token_char_spans_cover_the_text(processor):
    tokenizer = processor.tokenizer
    text = "Two cats lie on a pink blanket, café ☕ nearby."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    decoded, spans = token_char_spans(tokenizer, ids)
    assert decoded == text
    assert spans[0][0] == 0 and spans[-1] == (len(text), len(text))  # EOS adds no text
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, in order
    assert "".join(decoded[s:e] for s, e in spans) == text


def test_parse_listed_objects():
    answer = "Two cats lie on a pink blanket next to a remote control."
    reply = "1. two cats\n2. a pink blanket, the remote control and a dog; blanket"
    spans = parse_listed_objects(reply, answer)
    assert [answer[s:e] for s, e in spans] == ["Two cats", "a pink blanket", "remote control"]
    assert parse_listed_objects("", answer) == []
    assert parse_listed_objects("cat", "concatenate") == []  # whole words only


# ---- reasoning segmentation (visual chain-of-thought: tests/test_visual_cot.py) ----------------------
def test_reasoning_segmentation(model, processor, image):
    result = reasoning_segmentation(model, image, "What keeps the cats warm?", processor, selector="none", use_refiner=False, max_new_tokens=4)
    assert len(result.phrases) <= 1 and result.masks.shape == (len(result.phrases), image.height, image.width)
    if result.phrases:
        start, end = result.spans[0]
        assert result.text[start:end] == result.phrases[0]

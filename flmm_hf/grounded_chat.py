"""Grounded conversation: the frozen LMM answers, and the phrases of its answer are grounded.

`FLMMForGrounding.chat` delegates here. The pipeline:

1. The backbone answers with its own chat template (`FLMMProcessor` with `texts=None` gives the
   prompt-only inputs), greedy by default, while an `AttentionCapture(generation=True)` records,
   for every generated token, its attention probabilities to the image tokens (the KV cache is
   used as usual; the capture reads the new token's query row at each decoding step). The hidden
   states of every decoder layer come from `generate(output_hidden_states=True)`.
2. Phrases of the answer are chosen: given by the caller, noun chunks (spaCy, optional extra
   `nlp`), or listed by the LMM itself when asked which objects it mentioned (keyword selector).
3. Each phrase's token rows go through the same path as `FLMMForGrounding.forward`: the rows are
   merged and laid on the image grid (`FLMMForGrounding.phrase_maps`), the head gives coarse logits
   (`FLMMHead.coarse_logits`) and refines them with SAM prompted by the phrase's text embedding
   (`FLMMHead.refined_logits`). Masks come out at the original image size.

This file is shipped with the model as Hub custom code: it imports only torch, numpy, PIL,
transformers and its flat siblings; spaCy is imported lazily, only when noun chunks are asked for.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .attention_capture import AttentionCapture
from .processing_flmm import (
    FLMMProcessor,
    backbone_image_inputs,
    backbone_inputs,
    check_threshold,
    match_phrases,
    sam_preprocess,
    to_rgb,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128
"""New tokens of an answer when the caller gives neither `max_new_tokens` nor `max_length`."""

SELECTOR_QUESTION = (
    'Here is a description of this image: "{answer}"\n'
    "List the objects that the description mentions, using its own words, separated by commas."
)
"""The question of the keyword selector: the LMM lists the objects it mentioned."""

SELECTORS = ("auto", "noun_chunks", "lmm", "none")


class PhraseNotFoundError(ValueError):
    """An explicit phrase given to `chat` does not occur in the LMM's answer."""

    def __init__(self, missing: Sequence[str], text: str):
        self.missing = list(missing)
        self.text = text
        names = ", ".join(repr(p) for p in self.missing)
        super().__init__(
            f"phrase(s) {names} not found in the LMM's answer {text!r}. A frozen LMM answers in its own words: "
            "ground phrases that occur in the answer, pass on_missing='skip' to ground only the ones found "
            "(the others are listed in GroundedAnswer.missing), or use model.ground(image, text, phrases) "
            "to ground phrases of a text of your own."
        )


@dataclass
class GroundedAnswer:
    """
    The LMM's answer and the masks of its phrases.

    Args:
        text (`str`): the answer, decoded without special tokens and stripped.
        phrases (`list[str]`): the grounded phrases, `text[start:end]` for each span.
        spans (`list[tuple[int, int]]`): character offsets `(start, end)` of each phrase in `text`.
        masks (`torch.BoolTensor` of shape `[len(phrases), H, W]`): one mask per phrase at the original image size.
        missing (`list[str]`): explicit phrases that were not found in the answer (with `on_missing="skip"`).
        selector (`str`): how the phrases were chosen: `"explicit"`, `"noun_chunks"`, `"lmm"` or `"none"`.
        selector_reply (`str`, *optional*): the LMM's own list of objects when `selector="lmm"` was used.
        probabilities (`torch.FloatTensor` of shape `[len(phrases), H, W]`, *optional*): the foreground
            probabilities the masks were thresholded from, with `chat(..., return_probabilities=True)`.
    """

    text: str
    phrases: list[str]
    spans: list[tuple[int, int]]
    masks: torch.BoolTensor
    missing: list[str] = field(default_factory=list)
    selector: str = "explicit"
    selector_reply: str | None = None
    probabilities: torch.FloatTensor | None = None


@dataclass
class GeneratedAnswer:
    """
    One generated answer with what grounding needs (the output of [`generate_with_attention`]).

    Args:
        text (`str`): the answer, decoded without special tokens and stripped.
        token_ids (`torch.LongTensor` of shape `[n]`): the generated tokens that were kept (special ones included).
        token_spans (`list[tuple[int, int]]`): character span of each generated token in `text`
            (empty `(i, i)` for tokens that add no visible text, e.g. EOS).
        attentions (`torch.Tensor` of shape `[layers, heads, n, n_image]`): attention of every generated
            token to the image tokens, for the model's selected layers (with `config.attention_numerics`: float32
            exact softmax, or eager attention's probabilities in the LMM's dtype).
        hidden_states (`torch.FloatTensor` of shape `[num_layers, n, hidden]`): the decoder layers' outputs at
            the generated tokens (the embedding output excluded, as `FLMMForGrounding.forward` uses them).
        inputs (`dict`): the prompt-only processor outputs (batch of one) the answer was generated from.
    """

    text: str
    token_ids: torch.LongTensor
    token_spans: list[tuple[int, int]]
    attentions: torch.Tensor
    hidden_states: torch.FloatTensor
    inputs: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# 1. generation with attention capture
# ---------------------------------------------------------------------------------------------
def token_char_spans(tokenizer: Any, token_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """
    Decode `token_ids` and give each token its character span in the decoded text.

    The text is `decode(ids, skip_special_tokens=True).strip()`. Token j ends where the decoding of
    the first j + 1 tokens ends; decoding whole prefixes (not single tokens) keeps sentencepiece's
    leading-space rule and multi-byte characters right: a prefix that ends inside a character
    decodes to a replacement char, is not a prefix of the text, and its token then adds nothing
    (the next token completes the character).

    Returns:
        `(text, spans)` with one `(start, end)` per token, `start <= end`, non-decreasing.
    """
    ids = [int(i) for i in token_ids]

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    full = decode(ids)
    ends, end = [], 0
    for j in range(len(ids)):
        prefix = decode(ids[: j + 1])
        if len(prefix) >= end and full.startswith(prefix):
            end = len(prefix)
        ends.append(end)
    # Strip the text; shift and clamp the spans accordingly.
    lead = len(full) - len(full.lstrip())
    text = full.strip()
    spans, start = [], 0
    for end in ends:
        s, e = min(max(start - lead, 0), len(text)), min(max(end - lead, 0), len(text))
        spans.append((s, e))
        start = end
    return text, spans


@torch.no_grad()
def generate_with_attention(
    model: Any,
    image: Any,
    question: str,
    processor: Any | None = None,
    return_sam_inputs: bool = False,
    *,
    answer_prefix: str | None = None,
    stop_words: Sequence[str] = (),
    drop_last_token: bool = False,
    ground_image: int | None = None,
    **generate_kwargs: Any,
) -> GeneratedAnswer:
    """
    Let the frozen LMM answer `question` about `image` while its attention to the image is captured.

    Greedy decoding unless `generate_kwargs` say otherwise (`do_sample`, `num_beams`, ... are passed
    to `generate`). `generate(max_new_tokens=n)` feeds only the first n - 1 generated tokens back to
    the model, so the last one would have no attention row; we therefore ask for one token more and
    drop it: its decoding step is the forward pass that reads the last kept token (same cost as an
    extra forward, and generic: `generate` itself handles cache, positions and rope of every backbone).

    Args:
        model: an `FLMMForGrounding`.
        image: a PIL image or uint8 numpy array, or a list of them (several images in the prompt, e.g.
            `[reference, target]`; the answer is grounded in image `ground_image`).
        question: the user turn (after the image, in the backbone's chat template).
        processor: the `FLMMProcessor` (default: `model.processor`).
        return_sam_inputs: also prepare SAM's input (`inputs["sam_pixel_values"]`), for the refiner.
        answer_prefix: text the assistant's turn starts with; generation continues it. It is part of the
            prompt (`GeneratedAnswer.inputs`), not of the answer, and tokenised with the prompt as one
            string. Reproduction mode appends it verbatim, as the original appended its VisCoT prefix to its
            prompt string (`prompt += ' The object ...'`); native mode replaces its leading whitespace by the
            processor's separator (one space after a template that ends in a non-space such as
            `ASSISTANT:`, none after a newline).
        stop_words: stop once the decoded generated text (special tokens kept, carriage returns and new lines
            removed) ends with one of these strings, as xtuner's `StopWordStoppingCriteria` that the original
            F-LMM uses.
        drop_last_token: keep only the tokens that generation fed back to the model, i.e. drop the last
            generated one, whatever it is (the stop word, EOS, or the `max_new_tokens`-th token), as the
            original's visual chain-of-thought does (`sequences[0, :-1]`). At most `max_new_tokens - 1`
            tokens are then kept.
        ground_image: with a list of images, the index of the image the answer is grounded in (negative from the
            end; default: the last). The processor's `ground_image`.
        generate_kwargs: passed to `generate` (`max_new_tokens` defaults to 128).

    Returns:
        A [`GeneratedAnswer`].
    """
    processor = model.resolve_processor(processor)
    _check_capture_kwargs(generate_kwargs)
    texts = None
    if answer_prefix:
        texts = [answer_prefix if processor.mode == "reproduction" else answer_prefix.lstrip()]
    inputs = processor(
        images=[image], texts=texts, question=question, return_sam_inputs=return_sam_inputs,
        encoding="joint", ground_image=ground_image,
    )
    device = model.device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    lmm_inputs = backbone_inputs(inputs)
    prompt_ids = inputs["input_ids"]
    prompt_length = prompt_ids.shape[1]

    kwargs = _decoding_kwargs(model, processor.tokenizer, generate_kwargs)
    if "max_new_tokens" in kwargs:
        max_new = int(kwargs.pop("max_new_tokens"))
    elif "max_length" in kwargs:
        max_new = int(kwargs.pop("max_length")) - prompt_length
    else:
        max_new = DEFAULT_MAX_NEW_TOKENS
    if max_new < 1:
        raise ValueError(f"the answer may have {max_new} new tokens; ask for at least one")
    tokenizer = processor.tokenizer

    if stop_words:
        criterion = StopWordsCriteria(tokenizer, stop_words, prompt_length)
        kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), criterion])

    image_mask = prompt_ids == model.image_token_id
    with AttentionCapture(
        model.lmm, layers=model.captured_layers, query_mask=None, key_mask=image_mask, generation=True,
        numerics=model.config.attention_numerics,
    ) as capture:
        out = model.lmm.generate(
            **lmm_inputs,
            # Dropping the last token: generate exactly max_new (all kept tokens were fed back).
            max_new_tokens=max_new if drop_last_token else max_new + 1,
            use_cache=True,
            return_dict_in_generate=True,
            output_hidden_states=True,
            **kwargs,
        )
    new_tokens = out.sequences.shape[1] - prompt_length
    kept = new_tokens - 1 if drop_last_token else min(new_tokens, max_new)
    generated = out.sequences[0, prompt_length : prompt_length + kept]
    captured = capture.attentions[0]  # [layers, heads, n, n_image]: built once from the per-layer chunks
    fed = min(captured.shape[2], kept)  # generated tokens that a decoding step fed back
    rows = captured[:, :, :fed]  # [layers, heads, fed, n_image]
    hidden_states = _hidden_from_generate(model, out, fed)  # [num_layers, fed, hidden]
    if fed < kept:
        # Generation stopped early (EOS or a stopping criterion): the last token was never fed back.
        if int(generated[-1]) in set(tokenizer.all_special_ids):
            rows, hidden_states = _pad_last(rows, hidden_states)  # EOS & co. decode to nothing: ground nothing
        else:
            rows, hidden_states = _rows_by_forward(model, inputs, generated, lmm_inputs)
    text, spans = token_char_spans(tokenizer, generated.tolist())
    return GeneratedAnswer(
        text=text, token_ids=generated, token_spans=spans, attentions=rows, hidden_states=hidden_states, inputs=inputs
    )


def _check_capture_kwargs(generate_kwargs: dict[str, Any]) -> None:
    """Refuse `generate` arguments under which the captured rows would be wrong or missing."""
    if generate_kwargs.get("use_cache") is False:
        raise ValueError("chat() reads the attention of each new token from the KV-cache decoding steps: use_cache must stay True")
    for key in ("return_dict_in_generate", "output_hidden_states", "output_attentions", "num_return_sequences"):
        if key in generate_kwargs:
            raise ValueError(f"chat() sets {key!r} itself; do not pass it")
    if generate_kwargs.get("num_beams", 1) != 1:
        # Beam search reorders the cache between steps: the captured rows would mix beams.
        raise ValueError("chat() supports greedy decoding and sampling, not beam search (num_beams must be 1)")


class StopWordsCriteria(StoppingCriteria):
    """
    Stop when the generated text ends with one of `stop_words` (the original F-LMM's stop rule).

    Like xtuner's `StopWordStoppingCriteria`: the generated tokens (those after `prompt_length`) are decoded with
    their special tokens, carriage returns and new lines are removed, and the text is compared at its end. Only the
    generated part is read (the original generated from embeddings, so its `input_ids` held the new tokens only).
    """

    def __init__(self, tokenizer: Any, stop_words: Sequence[str], prompt_length: int):
        if isinstance(stop_words, str) or not stop_words or not all(isinstance(w, str) and w for w in stop_words):
            raise ValueError(f"stop_words must be a list of non-empty strings, got {stop_words!r}")
        self.tokenizer = tokenizer
        self.stop_words = tuple(stop_words)
        self.prompt_length = int(prompt_length)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None, **kwargs: Any) -> torch.BoolTensor:
        done = []
        for row in input_ids:
            text = self.tokenizer.decode(row[self.prompt_length :], skip_special_tokens=False)
            text = text.replace("\r", "").replace("\n", "")
            done.append(any(text.endswith(word) for word in self.stop_words))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _decoding_kwargs(model: Any, tokenizer: Any, generate_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`generate_kwargs` with F-LMM's defaults: greedy, the image placeholder never generated, a pad token."""
    kwargs = dict(generate_kwargs)
    kwargs.setdefault("do_sample", False)
    # The image placeholder must never be generated: the layout reads image tokens off input_ids.
    kwargs["suppress_tokens"] = sorted(set(kwargs.get("suppress_tokens") or []) | {model.image_token_id})
    if kwargs.get("pad_token_id") is None and getattr(model.lmm.generation_config, "pad_token_id", None) is None:
        # Silences generate's "Setting pad_token_id to eos_token_id" warning (batch of one: no padding).
        kwargs["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return kwargs


def _pad_last(rows: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero row and zero hidden state for a final special token that was never fed back (it grounds nothing)."""
    rows = torch.cat([rows, rows.new_zeros(*rows.shape[:2], 1, rows.shape[3])], dim=2)
    hidden = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2])], dim=1)
    return rows, hidden


def _hidden_from_generate(model: Any, out: Any, count: int) -> torch.Tensor:
    """`[num_layers, count, hidden]` decoder outputs of the first `count` generated tokens.

    `out.hidden_states[s]` is the forward of decoding step s: step 0 is the prompt, step j + 1 feeds
    generated token j (one query position with a KV cache).
    """
    num_layers = model.num_text_layers
    per_token = []
    for step in out.hidden_states[1 : count + 1]:
        per_token.append(torch.stack([h[0, -1] for h in step[-num_layers:]]))  # [num_layers, hidden]
    if not per_token:
        hidden = out.hidden_states[0][-1]
        return hidden.new_zeros(num_layers, 0, hidden.shape[-1]).float()
    return torch.stack(per_token, dim=1).float()


@torch.no_grad()
def _rows_by_forward(
    model: Any, inputs: dict, generated: torch.Tensor, lmm_inputs: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention rows and hidden states of `generated` from one forward over prompt + generated tokens.

    Used only when generation stopped on a visible token (a custom stopping criterion), which the
    decoding steps never fed back.
    """
    prompt_ids = inputs["input_ids"]
    full_ids = torch.cat([prompt_ids, generated[None].to(prompt_ids)], dim=1)
    query = torch.zeros_like(full_ids, dtype=torch.bool)
    query[:, prompt_ids.shape[1] :] = True
    key = full_ids == model.image_token_id
    key[:, prompt_ids.shape[1] :] = False
    forward_inputs = dict(lmm_inputs, input_ids=full_ids, attention_mask=torch.ones_like(full_ids))
    with AttentionCapture(
        model.lmm, layers=model.captured_layers, query_mask=query, key_mask=key,
        numerics=model.config.attention_numerics,
    ) as capture:
        outputs = model.lmm(**forward_inputs, output_hidden_states=True, use_cache=False, return_dict=True)
    num_layers = model.num_text_layers
    hidden = torch.stack([h[0, prompt_ids.shape[1] :] for h in outputs.hidden_states[-num_layers:]]).float()
    return capture.attentions[0], hidden


# ---------------------------------------------------------------------------------------------
# 2. phrase choice
# ---------------------------------------------------------------------------------------------
def find_phrases(
    text: str, phrases: Sequence[str | tuple[int, int]]
) -> tuple[list[tuple[int, int]], list[str]]:
    """
    Character spans of explicit `phrases` in the LMM's answer `text`, and the phrases that are not there.

    The phrases are placed by `match_phrases(text, phrases, lenient=True)` (see its rules: a string is
    stripped and searched after the previous phrase, then anywhere, then case-insensitively; spans are
    trimmed of whitespace). A phrase that is not there is reported, not raised: a string as given, a span
    as its text and offsets.
    """
    spans: list[tuple[int, int]] = []
    missing: list[str] = []
    matches = match_phrases(text, phrases, lenient=True)  # a str for `phrases` is refused here
    for phrase, match in zip(phrases, matches):
        if match.span is not None:
            spans.append(match.span)
        elif isinstance(phrase, str):
            missing.append(phrase)
        else:
            start, end = (int(v) for v in phrase)
            missing.append(f"{text[max(start, 0):max(end, 0)]!r} at span ({start}, {end})")
    return spans, missing


_SPACY_MODELS: dict[str, Any] = {}


def load_spacy(model_name: str = "en_core_web_sm") -> Any | None:
    """spaCy's English pipeline, or None when spaCy or the model is not installed (cached)."""
    if model_name not in _SPACY_MODELS:
        try:
            import spacy  # optional extra `nlp`: imported only when noun chunks are asked for

            _SPACY_MODELS[model_name] = spacy.load(model_name)
        except (ImportError, OSError) as error:
            logger.info("spaCy noun chunks unavailable (%s)", error)
            _SPACY_MODELS[model_name] = None
    return _SPACY_MODELS[model_name]


def _require_spacy() -> Any:
    nlp = load_spacy()
    if nlp is None:
        raise ImportError(
            "selector='noun_chunks' needs spaCy and its English model: pip install 'flmm-hf[nlp]' && "
            "python -m spacy download en_core_web_sm (or use selector='lmm')"
        )
    return nlp


def noun_chunk_spans(text: str, nlp: Any) -> list[tuple[int, int]]:
    """Spans of the noun chunks of `text` (pronouns such as "it" or "they" dropped: nothing to ground)."""
    return [
        (chunk.start_char, chunk.end_char)
        for chunk in nlp(text).noun_chunks
        if chunk.root.pos_ != "PRON" and chunk.text.strip()
    ]


_ARTICLES = re.compile(r"^(?:a|an|the|some|two|three|several)\s+", re.IGNORECASE)
_LIST_MARK = re.compile(r"^\s*(?:[-*\u2022]+|\d+[.)])\s*")


def parse_listed_objects(reply: str, text: str) -> list[tuple[int, int]]:
    """
    Turn the LMM's list of objects (`reply`) into spans of `text`.

    The reply is split at commas, semicolons, new lines and " and "; list marks, quotes and
    trailing punctuation are removed. An item is kept only if it occurs in `text` (case-insensitive;
    tried again without a leading article), so every span is a substring of the answer; items are
    located in reading order and overlapping ones are dropped.
    """
    lower = text.lower()
    candidates: list[tuple[int, int]] = []
    for item in re.split(r"[,;\n]|\band\b", reply):
        item = _LIST_MARK.sub("", item).strip().strip("\"'`.:!?()[]").strip()
        if len(item) < 2 or not any(c.isalnum() for c in item):
            continue
        for needle in (item, _ARTICLES.sub("", item)):
            needle = needle.lower().strip()
            if len(needle) < 2:
                continue
            start = _find_word(lower, needle)
            if start >= 0:
                candidates.append((start, start + len(needle)))
                break
    spans: list[tuple[int, int]] = []
    for start, end in sorted(set(candidates)):
        if spans and start < spans[-1][1]:
            continue  # overlaps the previous phrase: keep the first, each token grounds one phrase
        spans.append((start, end))
    return spans


def _find_word(haystack: str, needle: str) -> int:
    """First occurrence of `needle` in `haystack` that starts and ends on word boundaries (-1: none)."""
    match = re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", haystack)
    return match.start() if match else -1


@torch.no_grad()
def select_with_lmm(
    model: Any, image: Any, answer: str, processor: Any | None = None, max_new_tokens: int = 48
) -> tuple[list[tuple[int, int]], str]:
    """The keyword selector: ask the LMM which objects its `answer` mentions; spans of `answer` + the raw reply."""
    reply = generate_text(model, _images(image), SELECTOR_QUESTION.format(answer=answer), processor,
                          max_new_tokens=max_new_tokens)
    return parse_listed_objects(reply, answer), reply


@torch.no_grad()
def generate_text(
    model: Any, images: Sequence[Any], question: str, processor: Any | None = None, **generate_kwargs: Any
) -> str:
    """
    Plain generation with the backbone's chat template: `images` (one or more) then `question`.

    Images are prepared as the grounding path sees them (letterboxed for fixed-size backbones), so the
    LMM reads the same pixels it grounds on. Raises whatever the backbone raises if it cannot take that
    many images (the visual chain-of-thought falls back to a single image then).
    """
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    return generate_with_content(model, images, content, processor, **generate_kwargs)


@torch.no_grad()
def generate_with_content(
    model: Any, images: Sequence[Any], content: Sequence[dict[str, Any]], processor: Any | None = None,
    **generate_kwargs: Any,
) -> str:
    """
    Plain generation from one user turn whose `content` interleaves images and text, in the backbone's chat template.

    Args:
        model: an `FLMMForGrounding`.
        images: the images of the turn, in the order of its image items.
        content: chat-template items in order: `{"type": "image"}` (one per image) and `{"type": "text", "text": ...}`.
            How they are laid out is the backbone template's business (LLaVA-1.5's puts every image first).
        processor: the `FLMMProcessor` (default: `model.processor`).
        generate_kwargs: passed to `generate` (greedy unless `do_sample=True`; `max_new_tokens` defaults to 128).

    Returns:
        The reply, decoded without special tokens and stripped.
    """
    processor = model.resolve_processor(processor)
    slots = sum(1 for item in content if item.get("type") == "image")
    if slots != len(images):
        raise ValueError(f"content has {slots} image item(s) but {len(images)} image(s) were given; give one image per item")
    lmm_images = [lmm_view(processor, image) for image in images]
    messages = [{"role": "user", "content": list(content)}]
    prompt = processor.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = processor.processor(
        images=[lmm_images], text=[prompt], return_tensors="pt", **processor.image_processor_kwargs()
    )
    encoded.update(processor.reproduction_image_inputs(lmm_images))  # the pixels the grounding path feeds
    device = model.device
    encoded = {k: v.to(device) if torch.is_tensor(v) else v for k, v in encoded.items()}
    tokenizer = processor.tokenizer
    kwargs = _decoding_kwargs(model, tokenizer, generate_kwargs)
    kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    sequences = model.lmm.generate(**encoded, **kwargs)
    new_tokens = sequences[0, encoded["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


def lmm_view(processor: FLMMProcessor, image: Any):
    """The image as `processor` shows it to the LMM: RGB, letterboxed to a square when the processor letterboxes."""
    return processor.lmm_image(image)[0]


# ---------------------------------------------------------------------------------------------
# 3. grounding from the captured attention
# ---------------------------------------------------------------------------------------------
def phrase_token_masks(answer: GeneratedAnswer, spans: Sequence[tuple[int, int]]) -> torch.BoolTensor:
    """`[K, n]`: which generated tokens overlap each phrase span (a token's leading space never decides)."""
    masks = torch.zeros(len(spans), len(answer.token_spans), dtype=torch.bool)
    for k, (ps, pe) in enumerate(spans):
        for j, (s, e) in enumerate(answer.token_spans):
            if s < e and s < pe and e > ps:
                masks[k, j] = True
        if not masks[k].any():
            raise ValueError(f"phrase {answer.text[ps:pe]!r} at {(ps, pe)} covers no generated token")
    return masks


@torch.no_grad()
def ground_generated(
    model: Any,
    answer: GeneratedAnswer,
    spans: Sequence[tuple[int, int]],
    image: Any,
    use_refiner: bool = True,
) -> torch.FloatTensor:
    """
    Mask logits of the phrases `spans` of a generated answer, from the attention captured while it was generated.

    A phrase's tokens are the generated tokens whose text overlaps its character span (`phrase_token_masks`);
    see [`ground_generated_tokens`] for the path they take.

    Returns:
        `[K, h, w]` coarse logits (cropped to the content) or `[K, H, W]` refined logits at the original size.
    """
    if not spans:
        height, width = (int(v) for v in answer.inputs["original_sizes"][0])
        return torch.zeros(0, height, width, device=model.device)
    return ground_generated_tokens(model, answer, phrase_token_masks(answer, spans), image, use_refiner=use_refiner)


@torch.no_grad()
def ground_generated_tokens(
    model: Any,
    answer: GeneratedAnswer,
    token_masks: torch.BoolTensor,
    image: Any,
    use_refiner: bool = True,
) -> torch.FloatTensor:
    """
    Mask logits of phrases given as sets of generated tokens (`token_masks[k, j]`: token j belongs to phrase k).

    Same path as `FLMMForGrounding.forward`: per phrase, its token rows are merged and laid on the image grid
    (`FLMMForGrounding.phrase_maps`), the head predicts on the canvas and crops to the image content
    (`FLMMHead.coarse_logits`), and the SAM refiner (when present and `use_refiner`) refines with the phrase's
    text embedding (`FLMMHead.refined_logits`). Phrases are laid out one by one, so that overlapping phrases
    ("the cat", "cat") may share tokens. Tokens are taken as given, whether their text is visible or not (the
    original's visual chain-of-thought grounds every token of its thought).

    Args:
        token_masks: `[K, n]` booleans over `answer.token_ids`; every phrase needs at least one token.

    Returns:
        `[K, h, w]` coarse logits (cropped to the content) or `[K, H, W]` refined logits at the original size.
    """
    inputs = answer.inputs
    height, width = (int(v) for v in inputs["original_sizes"][0])
    device = model.device
    token_masks = torch.as_tensor(token_masks, dtype=torch.bool).cpu()
    if token_masks.dim() != 2 or token_masks.shape[1] != len(answer.token_ids):
        raise ValueError(
            f"token_masks must be [K, {len(answer.token_ids)}] (one column per generated token), got {tuple(token_masks.shape)}"
        )
    if token_masks.shape[0] == 0:
        return torch.zeros(0, height, width, device=device)
    empty = [k for k in range(token_masks.shape[0]) if not token_masks[k].any()]
    if empty:
        raise ValueError(f"phrase(s) {empty} select no generated token; every phrase needs at least one token")
    prompt_ids = inputs["input_ids"][0]
    full_ids = torch.cat([prompt_ids, answer.token_ids.to(prompt_ids)])[None]  # the sequence the LMM saw, [1, L]
    layout_inputs = dict(backbone_image_inputs(inputs), original_sizes=inputs["original_sizes"])
    for key in ("num_images", "image_index"):  # several images: which block of image tokens the answer is laid on
        if inputs.get(key) is not None:
            layout_inputs[key] = inputs[key]
    maps = []
    for k in range(token_masks.shape[0]):
        selected = token_masks[k].to(answer.attentions.device)
        phrase_ids = torch.full_like(full_ids, -1)
        phrase_ids[0, len(prompt_ids) + selected.nonzero().flatten().to(full_ids.device)] = 0
        rows = answer.attentions[:, :, selected]  # [layers, heads, n_k, n_image]
        maps.append(model.phrase_maps([rows], full_ids, phrase_ids, layout_inputs)[0])  # [1, C, h, w]
    coarse = model.head.coarse_logits([torch.cat(maps).to(device)], inputs["canvas_sizes"], inputs["content_boxes"])
    if not (use_refiner and model.head.has_refiner):
        return coarse[0]
    hidden = answer.hidden_states.to(device)  # [num_layers, n, hidden]
    phrase_hidden = [[hidden[:, token_masks[k].to(device)] for k in range(token_masks.shape[0])]]
    sam_pixel_values = inputs.get("sam_pixel_values")
    if sam_pixel_values is None:
        sam_pixel_values = sam_preprocess(to_rgb(_grounded_image(image, inputs)))[None]
    return model.head.refined_logits(coarse, phrase_hidden, sam_pixel_values.to(device), inputs["original_sizes"])[0]


def _images(image: Any) -> list[Any]:
    """The images of one prompt: `image` itself when it is a list of images, else `[image]`."""
    return list(image) if isinstance(image, (list, tuple)) else [image]


def _grounded_image(image: Any, inputs: Mapping[str, Any]) -> Any:
    """The image of a prompt the answer is grounded in (`inputs["image_index"]` of a list of images)."""
    images = _images(image)
    index = inputs.get("image_index")
    return images[int(index[0]) if index is not None else len(images) - 1]


# ---------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------
def select_phrases(
    model: Any,
    image: Any,
    text: str,
    phrases: Sequence[str | tuple[int, int]] | None,
    selector: str = "auto",
    processor: Any | None = None,
    on_missing: str = "raise",
) -> tuple[list[tuple[int, int]], list[str], str, str | None]:
    """
    Choose the phrases of an answer `text` to ground (see [`chat`] for `selector` and `on_missing`).

    Returns:
        `(spans, missing, selector_used, selector_reply)`.
    """
    if phrases is not None:
        spans, missing = find_phrases(text, phrases)
        if missing and on_missing == "raise":
            raise PhraseNotFoundError(missing, text)
        return spans, missing, "explicit", None
    if selector == "none" or not text:
        return [], [], "none", None
    nlp = _require_spacy() if selector == "noun_chunks" else load_spacy() if selector == "auto" else None
    if nlp is not None:
        return noun_chunk_spans(text, nlp), [], "noun_chunks", None
    spans, reply = select_with_lmm(model, image, text, processor)  # a list of images: the LMM sees them all
    return spans, [], "lmm", reply


@torch.no_grad()
def chat(
    model: Any,
    image: Any,
    question: str,
    phrases: Sequence[str | tuple[int, int]] | None = None,
    processor: Any | None = None,
    *,
    selector: str = "auto",
    threshold: float = 0.5,
    use_refiner: bool = True,
    on_missing: str = "raise",
    return_probabilities: bool = False,
    ground_image: int | None = None,
    **generate_kwargs: Any,
) -> GroundedAnswer:
    """
    The frozen LMM answers `question` about `image`; the phrases of its answer are grounded.

    Args:
        model: an `FLMMForGrounding`.
        image: a PIL image or a uint8 numpy array, or a list of them (several images in the prompt, one after the
            other; the answer's phrases are grounded in image `ground_image`, the others are context).
        question: the user's question (put in the backbone's chat template after the image).
        phrases: phrases to ground, substrings of the answer (or `(start, end)` spans of it). `None`: chosen
            by `selector`.
        processor: the `FLMMProcessor` (default: `model.processor`).
        selector: when `phrases` is None: `"noun_chunks"` (spaCy + `en_core_web_sm`, the `nlp` extra),
            `"lmm"` (the LMM lists the objects it mentioned), `"auto"` (noun chunks when spaCy is installed,
            else `"lmm"`), or `"none"` (no grounding).
        threshold: probability threshold of the masks.
        use_refiner: refine with SAM when the model has the refiner.
        on_missing: explicit phrases not in the answer: `"raise"` a [`PhraseNotFoundError`] (default) or
            `"skip"` them (listed in `GroundedAnswer.missing`).
        return_probabilities: also return the masks' foreground probabilities (`GroundedAnswer.probabilities`).
        ground_image: with a list of images, the index of the image the masks are in (negative from the end;
            default: the last image, the target after its references).
        generate_kwargs: passed to `generate` (`max_new_tokens` defaults to 128; greedy unless `do_sample=True`).

    Returns:
        [`GroundedAnswer`] with `masks` of shape `[len(phrases), H, W]` at the original size of the grounded image.
    """
    if selector not in SELECTORS:
        raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")
    if on_missing not in ("raise", "skip"):
        raise ValueError(f"on_missing must be 'raise' or 'skip', got {on_missing!r}")
    check_threshold(threshold)  # before generating, not after
    processor = model.resolve_processor(processor)
    if phrases is None and selector == "noun_chunks":
        _require_spacy()  # fail before generating, not after
    refine = use_refiner and model.head.has_refiner
    answer = generate_with_attention(model, image, question, processor, return_sam_inputs=refine,
                                     ground_image=ground_image, **generate_kwargs)

    spans, missing, used, reply = select_phrases(model, image, answer.text, phrases, selector, processor, on_missing)
    logits = ground_generated(model, answer, spans, image, use_refiner=refine)
    size = answer.inputs["original_sizes"]
    probabilities = FLMMProcessor.post_process_masks([logits], size, return_probabilities=True)[0].cpu()
    masks = probabilities > threshold  # post_process_masks' rule, from the same probabilities
    return GroundedAnswer(
        text=answer.text,
        phrases=[answer.text[s:e] for s, e in spans],
        spans=[(int(s), int(e)) for s, e in spans],
        masks=masks,
        missing=missing,
        selector=used,
        selector_reply=reply,
        probabilities=probabilities if return_probabilities else None,
    )


__all__ = [
    "GroundedAnswer",
    "GeneratedAnswer",
    "PhraseNotFoundError",
    "StopWordsCriteria",
    "chat",
    "find_phrases",
    "generate_text",
    "generate_with_attention",
    "generate_with_content",
    "ground_generated",
    "ground_generated_tokens",
    "lmm_view",
    "noun_chunk_spans",
    "parse_listed_objects",
    "select_phrases",
    "select_with_lmm",
    "token_char_spans",
]

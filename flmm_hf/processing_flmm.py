"""Processor of F-LMM: prompt + answer text, phrase token ids, LMM image inputs, SAM inputs, masks.

`FLMMProcessor` wraps the frozen LMM's own processor (e.g. `LlavaProcessor`, `Idefics3Processor`)
and turns (image, answer text, grounded phrases[, masks]) into the model's forward inputs:

- the prompt is the backbone's chat template around the question (default: the original F-LMM
  question `Please give me a description of the image.`) with the generation prompt, and the
  answer is appended as if the assistant had said it;
- the answer's tokens: in reproduction mode the original F-LMM's piece-wise encoding (each piece
  of the answer encoded alone, see `answer_tokens`), in native mode the prompt + answer string
  tokenised as one, as the LMM would have generated it;
- `phrase_ids` marks, per token of the *final* sequence (image placeholders expanded), which
  phrase the token grounds (-1: none); phrases are placed in the answer by `match_phrases`, the
  one phrase resolver of F-LMM (the processor, grounded chat and the data transform share it);
- fixed-size backbones see a letterboxed image (longer side resized to the input size, then
  padded to a square with the mean colour, no centre crop), as the original F-LMM; the geometry
  (`canvas_sizes`, `content_boxes`) is in the LMM's input pixels; dynamic-resolution backbones
  see the original image (canvas = the image, in original pixels). Which backbone is which is
  the `dynamic_resolution` trait of its family in `image_layout.FAMILIES` (keyed by the
  backbone config's `model_type`);
- DeepSeek-VL in reproduction mode gets the original's own image inputs (`FLMMProcessor` says
  how): the 1.3B model a 384 letterbox, the 7B model a 1024 letterbox for its high-resolution
  (SAM) branch and a 384 resize of that letterbox for its low-resolution (SigLIP) branch.
This file is also shipped as Hub custom code: it imports only torch, numpy, PIL, transformers and
its siblings `image_layout.py` and `answer_tokens.py` (copied beside it by `FLMMProcessor.save_pretrained`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, BatchFeature
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

from .answer_tokens import Piece, PieceSpec, as_pieces, encode_joint, encode_pieces, pack_rows, token_aligned_keys
from .image_layout import FAMILIES, Family, get_family

logger = logging.getLogger(__name__)

DEFAULT_QUESTION = "Please give me a description of the image."
"""The user question of the original F-LMM prompt (`<image>\\n` + this, in the chat template)."""

CONFIG_NAME = "flmm_processor_config.json"
# The settings `flmm_processor_config.json` stores (and `from_pretrained` accepts as overrides).
SETTINGS = ("mode", "question", "letterbox", "model_type", "prompt_template")

# Backbones whose original F-LMM preprocessing is DeepSeek-VL's VLMImageProcessor letterbox.
DEEPSEEK_VL_MODEL_TYPES = ("deepseek_vl", "deepseek_vl_hybrid")

SAM_IMAGE_SIZE = 1024
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# Keys of the processor's output that only F-LMM reads (the frozen LMM's forward never receives them).
FLMM_KEYS = ("phrase_ids", "original_sizes", "canvas_sizes", "content_boxes", "sam_pixel_values", "masks",
             "num_images", "image_index", "video_frame")
# Keys of the processor's output that describe the batch rather than the backbone's image inputs.
NON_IMAGE_KEYS = ("input_ids", "attention_mask") + FLMM_KEYS


def backbone_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a processor batch that the frozen LMM's forward takes.

    Everything but F-LMM's own keys (`phrase_ids`, the geometry, `sam_pixel_values`, `masks`) and `None`
    values: `input_ids`, `attention_mask`, `pixel_values` and the backbone's other image inputs
    (`image_sizes`, `image_grid_thw`, ...).
    """
    return {key: value for key, value in inputs.items() if key not in FLMM_KEYS and value is not None}


def backbone_image_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """`backbone_inputs` without `input_ids` and `attention_mask`: the backbone's image inputs alone."""
    return {key: value for key, value in backbone_inputs(inputs).items() if key not in NON_IMAGE_KEYS}


def letterbox_geometry(height: int, width: int, side: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Canvas size and content box of the letterbox, in the LMM's input pixels (as the original F-LMM).

    The image is resized so its longer side is `side` (the shorter one truncated to an int), then
    padded to a `side` x `side` square, the padding split evenly with the odd pixel after
    (bottom/right); the shorter side is at least 1 pixel. Returns `((side, side), (top, left, bottom, right))`.
    """
    # The shorter side keeps at least one pixel (an image thinner than `side`:1 would otherwise vanish).
    if height > width:
        resized = (side, max(1, int(width * side / height)))
    else:
        resized = (max(1, int(height * side / width)), side)
    top, left = (side - resized[0]) // 2, (side - resized[1]) // 2
    return (side, side), (top, left, top + resized[0], left + resized[1])


def deepseek_letterbox_geometry(
    height: int, width: int, side: int, min_size: int = 14
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Canvas size and content box of DeepSeek-VL's letterbox (its `VLMImageProcessor`, which the original F-LMM uses).

    Each side becomes `max(int(length / longer_side * side), min_size)` (divided first, then
    multiplied, truncated; the `min_size` floor keeps very thin images at least `min_size` pixels
    thick), then the image is pasted into a square of its new longer side, centred with the odd
    pixel after (bottom/right). Returns `((canvas, canvas), (top, left, bottom, right))`, in the
    letterbox's pixels. For `side` 384 and 1024 the sizes equal `letterbox_geometry`'s for every
    image up to 6000 px except where the floor applies (an aspect ratio beyond side / min_size).
    """
    longer = max(height, width)
    new_h = max(int(height / longer * side), min_size)
    new_w = max(int(width / longer * side), min_size)
    canvas = max(new_h, new_w)
    top, left = (canvas - new_h) // 2, (canvas - new_w) // 2
    return (canvas, canvas), (top, left, top + new_h, left + new_w)


def to_rgb(image: Any, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Return `image` as an RGB `PIL.Image`.

    Accepts PIL images of any mode and uint8 numpy arrays (HxW or HxWx3/4). Images with an alpha
    channel (RGBA, LA, P with transparency) are composited onto `background`: the processor passes
    the image processor's mean colour, so transparent areas look like the letterbox padding, which
    the LMM reads as "nothing". Other modes (L, P, CMYK, I;16, ...) use PIL's own RGB conversion.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(
                f"numpy images must be uint8 HxW or HxWxC arrays, got dtype {image.dtype} and shape {image.shape}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"images must be PIL images or uint8 numpy arrays, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's "I" -> "RGB" clips instead of scaling; bring 16-bit data to 8 bits first.
        array = np.asarray(image, dtype=np.float64)
        array = 255.0 * array / max(array.max(), 1.0)
        image = Image.fromarray(array.round().astype(np.uint8), mode="L")
    return image.convert("RGB")


def sam_preprocess(image: Image.Image, image_size: int = SAM_IMAGE_SIZE) -> torch.Tensor:
    """SAM's image preprocessing without torchvision: [3, image_size, image_size] float32.

    Same as `segment_anything`'s `ResizeLongestSide` + `Sam.preprocess`: the longest side is
    resized to `image_size` (new side = int(side * scale + 0.5), PIL bilinear), pixels are
    normalised with SAM's mean/std (0-255 scale), then zero-padded at the bottom/right.
    """
    width, height = image.size
    scale = image_size / max(height, width)
    # At least one pixel per side, as `sam_refiner.sam_input_size` (very thin images).
    new_h, new_w = max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
    resized = np.asarray(image.resize((new_w, new_h), resample=Image.BILINEAR), dtype=np.float32)
    resized = (resized - np.array(SAM_PIXEL_MEAN, dtype=np.float32)) / np.array(SAM_PIXEL_STD, dtype=np.float32)
    out = torch.zeros(3, image_size, image_size, dtype=torch.float32)
    out[:, :new_h, :new_w] = torch.from_numpy(resized).permute(2, 0, 1)
    return out


PhraseSpec = Union[str, tuple[int, int], Sequence[int]]
"""A phrase: a substring of the text, or an explicit `(start, end)` character span of it."""


class PhraseMatch(NamedTuple):
    """Where one phrase is in a text: `span` = (start, end), or None and `problem` says why not."""

    span: tuple[int, int] | None
    problem: str | None = None


def match_phrases(text: str, phrases: Sequence[PhraseSpec], lenient: bool = False) -> list[PhraseMatch]:
    """Place `phrases` in `text`: one `PhraseMatch` per phrase, in the order given.

    The rules (the one phrase resolver of F-LMM: the processor, grounded chat and the data
    transform all use it):

    1. A phrase is a `str` or a `(start, end)` pair of ints (tuple or list). Anything else, an
       empty or whitespace-only string, or `phrases` given as one `str`, is a caller's error:
       `ValueError` (`TypeError` for the `str`), raised before any search.
    2. A string is looked for exactly as given (case and any surrounding spaces included),
       from the end of the previous placed phrase, so repeated words resolve in reading order.
    3. `lenient=True`, for phrases picked for a text the caller did not write (the LMM's answer):
       the string is stripped of surrounding whitespace and, if it is not found after the
       previous phrase, looked for anywhere, then case-insensitively (after the previous phrase,
       then anywhere).
    4. A span must satisfy `0 <= start < end <= len(text)` and cover a non-whitespace character.
    5. Every placed span is shrunk to exclude leading/trailing whitespace (token overlap is then
       decided on visible characters only); the next search starts at its end.
    6. A phrase that cannot be placed (a string not found, a span outside the text or covering
       only whitespace) gets `span=None` and a `problem` such as `"'kid' not found after the
       previous phrase: '...'"`; it does not move the search start. Callers decide: raise
       (`resolve_phrase_spans`) or report it (grounded chat).
    """
    if isinstance(phrases, str):
        raise TypeError(f"phrases must be a list of phrases, got the str {phrases!r}: pass [{phrases!r}]")
    phrases = list(phrases)
    for k, phrase in enumerate(phrases):
        if isinstance(phrase, str):
            if not phrase.strip():
                raise ValueError(f"phrase {k} is empty")
        elif not _is_span(phrase):
            raise ValueError(f"phrase {k} must be a string or an (start, end) pair, got {phrase!r}")
    matches: list[PhraseMatch] = []
    cursor = 0
    for phrase in phrases:
        if isinstance(phrase, str):
            match = _find_string(text, phrase, cursor, lenient)
        else:
            match = _check_span(text, int(phrase[0]), int(phrase[1]))
        if match.span is not None:
            start, end = match.span
            while text[start].isspace():
                start += 1
            while text[end - 1].isspace():
                end -= 1
            match = PhraseMatch((start, end))
            cursor = end
        matches.append(match)
    return matches


def _find_string(text: str, phrase: str, cursor: int, lenient: bool) -> PhraseMatch:
    """Rules 2 and 3 of `match_phrases` for one string phrase."""
    if not lenient:
        start = text.find(phrase, cursor)
        if start >= 0:
            return PhraseMatch((start, start + len(phrase)))
        where = "in the text" if text.find(phrase) < 0 else "after the previous phrase"
        return PhraseMatch(None, f"{phrase!r} not found {where}: {text!r}")
    needle = phrase.strip()
    for haystack, target in ((text, needle), (text.lower(), needle.lower())):
        for offset in (cursor, 0):
            start = haystack.find(target, offset)
            if start >= 0:
                return PhraseMatch((start, start + len(needle)))
    return PhraseMatch(None, f"{phrase!r} not found in the text: {text!r}")


def _check_span(text: str, start: int, end: int) -> PhraseMatch:
    """Rule 4 of `match_phrases` for one explicit span."""
    if not 0 <= start < end <= len(text):
        return PhraseMatch(None, f"span {(start, end)} is empty or outside the text (length {len(text)})")
    if not text[start:end].strip():
        return PhraseMatch(None, f"span {(start, end)} covers only whitespace")
    return PhraseMatch((start, end))


def resolve_phrase_spans(text: str, phrases: Sequence[PhraseSpec], example: int = 0) -> list[tuple[int, int]]:
    """Character spans `(start, end)` of `phrases` in `text`, by the rules of `match_phrases` (strict).

    Raises `ValueError`, naming `example` and the phrase, for the first phrase that cannot be placed.
    """
    try:
        matches = match_phrases(text, phrases)
    except ValueError as error:
        raise ValueError(f"example {example}: {error}") from None
    for k, match in enumerate(matches):
        if match.span is None:
            raise ValueError(f"example {example}: phrase {k} {match.problem}")
    return [match.span for match in matches]


# ---------------------------------------------------------------------- families
def processor_model_types(processor_class: str) -> list[str]:
    """The registered `model_type`s whose transformers processor class is named `processor_class`.

    Read from transformers' `PROCESSOR_MAPPING_NAMES` (`model_type -> processor class name`).
    """
    return [mt for mt, name in PROCESSOR_MAPPING_NAMES.items() if name == processor_class and mt in FAMILIES]


def _processor_home_model_type(processor_cls: type, candidates: list[str]) -> str | None:
    """The model type a processor class stands for among the registered `candidates` that use it.

    The only candidate; else the one whose transformers package defines the class (LlavaProcessor,
    shared by llava and vipllava, lives in `transformers.models.llava`); else None.
    """
    if len(candidates) == 1:
        return candidates[0]
    parts = processor_cls.__module__.split(".")
    home = parts[parts.index("models") + 1] if "models" in parts[:-1] else None
    return home if home in candidates else None


def backbone_family(model_type: str | None, processor_class: str) -> Family | None:
    """The `Family` whose processor traits apply to a backbone, or None when unknown.

    The family registered for `model_type`; else, if every registered family that uses the
    processor class `processor_class` has the same `dynamic_resolution`, a family with that trait.
    """
    family = get_family(model_type)
    if family is not None:
        return family
    traits = {FAMILIES[mt].dynamic_resolution for mt in processor_model_types(processor_class)}
    return Family(dynamic_resolution=traits.pop()) if len(traits) == 1 else None


@dataclass
class _Text:
    """One example's text: its prompt, the answer, the answer's phrase spans and pieces."""

    prompt: str
    answer: str
    spans: list[tuple[int, int]]  # phrase spans in the answer
    pieces: list[Piece]  # the answer's separately encoded pieces (reproduction mode)


class FLMMProcessor:
    r"""
    Processor of [`FLMMForGrounding`]: wraps the frozen LMM's processor.

    It is a plain class, not a `ProcessorMixin`. A `ProcessorMixin` is a fixed set of
    sub-processors (`image_processor`, `tokenizer`, ...) whose classes the processor class
    declares, and its `save_pretrained` writes `processor_config.json` with its own
    `processor_class`. This one wraps a *whole* backbone processor of any family (LLaVA,
    Idefics3, Qwen2-VL, ...), whose own settings (image token, patch size, image_seq_len,
    chat template, ...) live on that processor and must round-trip untouched: as a
    `ProcessorMixin`, the backbone processor would have to be re-declared per family, and the
    saved folder would stop loading as the backbone's processor. So `save_pretrained` writes
    the backbone processor as is (the folder stays loadable as that backbone's processor) plus
    `flmm_processor_config.json` with our settings, a copy of this file and its siblings
    (`image_layout.py`, `answer_tokens.py`), and an `auto_map` entry so that
    `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` returns an `FLMMProcessor`.

    What reproduction mode feeds each of the paper's backbones (the original F-LMM's inputs). The
    text is the same recipe for all: the prompt `prompt_template.format(image=<image token>,
    question=question)` (the paper configs give the original's template; without one, the chat
    template) encoded by the backbone processor, which adds the tokenizer's special tokens (BOS)
    as the original's `encode(prompt, add_special_tokens=True)` did and expands the one image token
    to the model's image tokens; then the answer's pieces, each `encode(piece,
    add_special_tokens=False)`, concatenated with nothing added between them (`answer_tokens`;
    RefCOCO: each expression, then `encode('.')[-1]`; PNG: each utterance as stored).

    - LLaVA-1.5-7B (`llava`): template `"USER: {image}\n{question} ASSISTANT:"` (xtuner's vicuna
      instruction; the checkpoint's chat template gives the same string); image letterboxed at
      336 (longer side resized with PIL bicubic, centred on a square of the CLIP mean colour
      (122, 116, 104)), then the CLIP processor's normalisation, no centre crop; 576 image tokens.
    - LLaVA-NeXT-Vicuna-7B / -Mistral-7B (`llava_next`): templates `"USER: {image}\n{question}
      ASSISTANT:"` / `"[INST] {image}\n{question} [/INST]"` (xtuner's vicuna / mistral
      instructions, no system text); the original image through the backbone's own any-res
      processing (the base view resized to 336 x 336, the best-fit grid resized and padded with
      the odd pixel after, as the original's fixed `_pad_for_patching`); the PNG training set is
      prompted with `What is shown in this image?` (`train_questions` in the configs).
    - DeepSeek-VL-1.3B / 7B: below.

    Reproduction mode on DeepSeek-VL repeats the original F-LMM's inputs, which come from
    DeepSeek-VL's own `VLMImageProcessor` and vision tower. Template
    `"User: {image}{question}\n\nAssistant:"` (no system text; the question right after the
    576 image tokens); its byte-level tokenizer adds no prefix space, so the pieces join with
    none. transformers' DeepSeek-VL processors letterbox too, but round the resized size instead
    of truncating it, and the 7B one resizes its low-resolution input in 8 bits; so the letterbox
    is made here and the backbone processor only normalises it (its resize and padding leave a
    square of its size unchanged):

    - DeepSeek-VL-1.3B (`deepseek_vl`): the image is letterboxed at the image processor's size
      (384) by `deepseek_letterbox_geometry` (each side `max(int(length / longer * 384), 14)`),
      resized with PIL's bicubic filter and pasted centred (odd pixel bottom/right) on a square of
      the mean colour `int(255 * image_mean)` (SigLIP's 0.5 -> 127), then normalised by the
      backbone processor with `image_mean`/`image_std`.
    - DeepSeek-VL-7B (`deepseek_vl_hybrid`): the same letterbox at the high-resolution size
      (1024) on `int(255 * high_res_image_mean)` (CLIP's mean -> (122, 116, 104));
      `high_res_pixel_values` (the SAM branch) is the backbone processor's normalisation of it
      with `high_res_image_mean`/`high_res_image_std`; `pixel_values` (the SigLIP branch) is that
      1024 letterbox scaled to [0, 1] and resized to 384 by bilinear interpolation with
      antialiasing on the float tensor (what the original vision tower's
      `torchvision.transforms.Resize(384, antialias=True)` does to its input), then normalised
      with `image_mean`/`image_std` (0.5/0.5): `reproduction_image_inputs` computes it, because
      the processor's own resize, of the 8-bit image, gives other numbers. The canvas is the 1024
      square and the content box is in its pixels: the geometry the original crops the mask
      logits with.

    Args:
        processor (`ProcessorMixin`):
            The backbone's processor (`AutoProcessor.from_pretrained(lmm_name_or_path)`).
        mode (`str`, *optional*, defaults to `"reproduction"`):
            `"reproduction"`: fixed-size backbones are letterboxed (as in the original F-LMM);
            `"native"`: the backbone's own image processing, except that a centre crop is
            replaced by the letterbox so that no pixel is lost. Dynamic-resolution/tiled
            backbones always keep their own resizing (canvas = the original image).
            The answer's tokens: reproduction mode encodes its pieces one by one, as the original
            (see `answer_tokens`; a whole answer is one piece unless the caller gives `pieces`),
            native mode tokenises prompt + answer as one string. Both modes put the backbone's
            chat template around `question`, unless `prompt_template` is given.
        question (`str`, *optional*, defaults to `DEFAULT_QUESTION`):
            The user turn after the image (the original F-LMM prompt's question).
        prompt_template (`str`, *optional*):
            The prompt as a format string with `{image}` (replaced by the backbone's image token,
            which its processor expands) and `{question}`, used instead of the chat template, e.g.
            the original F-LMM's `"USER: {image}\n{question} ASSISTANT:"` (xtuner's vicuna
            instruction around `<image>\n` + question) or DeepSeek-VL's `"User: {image}{question}\n\nAssistant:"`
            (no system text, the question right after the image tokens). The backbone's tokenizer adds
            its special tokens (BOS) as for any text, as the original's `encode(..., add_special_tokens=True)`.
        letterbox (`bool`, *optional*):
            Force the letterbox on or off; `None` decides from `mode` and the backbone.
        model_type (`str`, *optional*):
            The backbone config's `model_type` (e.g. `"llava"`, `"idefics3"`): its family in
            `image_layout.FAMILIES` says whether the processor resizes/tiles images itself.
            `None`: the one registered family whose transformers processor class is this
            processor's (`from_pretrained` reads it from the folder's `config.json` first).
            A backbone of no registered family is treated as fixed-size (letterboxed), with a warning.
    """

    max_image_pixels: int | None = 40_000_000
    """Largest image accepted (width x height; `None`: no limit). Masks are returned at the original size, so a
    64-megapixel image costs several GB per phrase set; larger images are refused, not silently downscaled."""

    def __init__(
        self,
        processor: Any,
        mode: str = "reproduction",
        question: str = DEFAULT_QUESTION,
        letterbox: bool | None = None,
        model_type: str | None = None,
        prompt_template: str | None = None,
    ):
        if mode not in ("reproduction", "native"):
            raise ValueError(f"mode must be 'reproduction' or 'native', got {mode!r}")
        if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
            raise ValueError(
                f"processor must be a multimodal processor with a tokenizer and an image processor, got {type(processor).__name__}"
            )
        if letterbox is not None and not isinstance(letterbox, bool):
            raise TypeError(f"letterbox must be True, False or None (decide from mode), got {letterbox!r}")
        self.processor = processor
        self.mode = mode
        self.question = question
        self._letterbox = letterbox
        if prompt_template is not None:
            try:
                prompt_template.format(image="", question="")
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(
                    f"prompt_template may only name {{image}} and {{question}} (write literal braces as {{{{ }}}}), "
                    f"got {prompt_template!r}: {error!r}"
                ) from None
            if "{image}" not in prompt_template:
                raise ValueError(
                    f"prompt_template must contain '{{image}}' (where the image tokens go), got {prompt_template!r}"
                )
        self.prompt_template = prompt_template
        processor_class = type(processor).__name__
        if model_type is None:
            model_type = _processor_home_model_type(type(processor), processor_model_types(processor_class))
        self.model_type = model_type
        family = backbone_family(model_type, processor_class)
        if family is None:
            logger.warning(
                "FLMMProcessor: no registered family for model_type %r (processor %s); treating it as a fixed-size "
                "processor whose images are letterboxed. Pass model_type= of a registered family, or register one "
                "with image_layout.register_family(model_type, layout, dynamic_resolution=...).",
                model_type, processor_class,
            )
        self.family = family or Family()

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def is_dynamic_resolution(self) -> bool:
        """Whether the backbone resizes/tiles images itself (then no letterbox, canvas = image)."""
        return self.family.dynamic_resolution

    @property
    def letterbox(self) -> bool:
        """Whether images are padded to a square with the mean colour before the backbone sees them."""
        if self._letterbox is not None:
            return self._letterbox
        if self.is_dynamic_resolution:
            return False
        if self.mode == "reproduction":
            return True
        # Native mode: keep the backbone's resizing unless it would centre-crop (and lose pixels
        # that can then never be segmented); LLaVA-1.5 itself was trained on such a letterbox.
        return bool(getattr(self.image_processor, "do_center_crop", False))

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """The letterbox's pad colour: the image processor's mean colour as 0-255 ints (truncated, as the original).

        DeepSeek-VL-7B in reproduction mode is letterboxed for its high-resolution branch, so its
        colour is the mean of that branch (`high_res_image_mean`, CLIP's).
        """
        name = "high_res_image_mean" if self._hybrid_reproduction else "image_mean"
        mean = getattr(self.image_processor, name, None) or (0.5, 0.5, 0.5)
        if isinstance(mean, (int, float)):
            mean = (mean,) * 3
        return tuple(int(m * 255) for m in mean)

    @property
    def _deepseek_reproduction(self) -> bool:
        """Reproduction mode on DeepSeek-VL (1.3B or 7B): the original's `VLMImageProcessor` letterbox."""
        return self.mode == "reproduction" and self.model_type in DEEPSEEK_VL_MODEL_TYPES

    @property
    def _hybrid_reproduction(self) -> bool:
        """Reproduction mode on DeepSeek-VL-7B: letterbox at the high-resolution size, own low-resolution input."""
        return self.mode == "reproduction" and self.model_type == "deepseek_vl_hybrid"

    def _fixed_size(self) -> tuple[int, int] | None:
        """(height, width) the fixed-size backbone feeds its vision tower, or None if unknown."""
        ip = self.image_processor
        if getattr(ip, "do_center_crop", False) and getattr(ip, "crop_size", None) is not None:
            return _height_width(ip.crop_size)
        return _height_width(getattr(ip, "size", None))

    def lmm_image(self, image: Any) -> tuple[Image.Image, tuple[int, int], tuple[int, int, int, int]]:
        """The image as the LMM sees it, with its geometry.

        Returns `(image, canvas_size, content_box)`: the RGB image, letterboxed when this
        processor letterboxes (longer side resized first, then padded: the original's order and
        pixel units; `letterbox_geometry`, or `deepseek_letterbox_geometry` for DeepSeek-VL in
        reproduction mode, at 1024 for the 7B model); the canvas (H, W) and the
        (top, left, bottom, right) of the content in it.
        """
        image = to_rgb(image, background=self.pad_color)
        if not self.letterbox:
            return image, (image.height, image.width), (0, 0, image.height, image.width)
        side = self._letterbox_side()
        if self._deepseek_reproduction:
            min_size = getattr(self.image_processor, "min_size", None)
            min_size = 14 if min_size is None else min_size
            canvas, box = deepseek_letterbox_geometry(image.height, image.width, side, min_size)
        else:
            canvas, box = letterbox_geometry(image.height, image.width, side)
        # PIL's bicubic filter: LLaVA's and DeepSeek-VL's original processors both resize with it
        # (DeepSeek-VL through torchvision's resize of a PIL image, which calls PIL).
        resized = image.resize((box[3] - box[1], box[2] - box[0]), Image.BICUBIC)
        square = Image.new("RGB", (canvas[1], canvas[0]), self.pad_color)
        square.paste(resized, (box[1], box[0]))
        return square, canvas, box

    def _letterbox_side(self) -> int:
        if self._hybrid_reproduction:
            # The original letterboxes at the SAM branch's size; the SigLIP input is derived from that.
            size = _height_width(getattr(self.image_processor, "high_res_size", None))
        else:
            size = self._fixed_size()
        if size is None or size[0] != size[1]:
            raise ValueError(
                f"cannot letterbox for {type(self.image_processor).__name__}: its input size {size} is not a "
                "known square; pass letterbox=False"
            )
        return size[0]

    def image_processor_kwargs(self) -> dict[str, Any]:
        """Overrides for the backbone image processor: never centre-crop, resize the square to the full size."""
        kwargs: dict[str, Any] = {}
        if self.is_dynamic_resolution:
            return kwargs
        size = self._fixed_size()
        if getattr(self.image_processor, "do_center_crop", None) is not None:
            kwargs["do_center_crop"] = False
            if size is not None:
                # Without the crop, a shortest_edge resize would give a non-square image.
                kwargs["size"] = {"height": size[0], "width": size[1]}
        return kwargs

    def reproduction_image_inputs(self, lmm_images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Backbone image inputs that reproduction mode computes itself, replacing the backbone processor's.

        DeepSeek-VL-7B in reproduction mode: `pixel_values` `[N, 3, 384, 384]` float32, the SigLIP
        branch's input as the original makes it: each 1024 letterbox (from `lmm_image`) scaled to
        [0, 1], resized to the image processor's `size` by bilinear interpolation with
        antialiasing (`align_corners=False`) on the float tensor, then normalised with
        `image_mean`/`image_std`. Empty for every other backbone, for native mode and without the
        letterbox: there the backbone processor's inputs are used as they are.

        Args:
            lmm_images: the images as the LMM sees them (`lmm_image(image)[0]`), one per image input.
        """
        if not (self._hybrid_reproduction and self.letterbox) or not lmm_images:
            return {}
        ip = self.image_processor
        size = self._fixed_size()
        if size is None:
            raise ValueError(f"cannot resize for {type(ip).__name__}: it names no input size")
        # Rescaled in float64 and stored as float32, as the original's VLMImageProcessor does.
        scale = getattr(ip, "rescale_factor", None) or 1 / 255
        pixels = torch.from_numpy(
            np.stack([np.asarray(image, dtype=np.float64).transpose(2, 0, 1) * scale for image in lmm_images])
        ).float()
        # torchvision's Resize of a float tensor is exactly this interpolate call.
        low = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(_three(ip.image_mean), dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(_three(ip.image_std), dtype=torch.float32).view(1, 3, 1, 1)
        return {"pixel_values": (low - mean) / std}

    # ------------------------------------------------------------------ prompt
    @property
    def image_token(self) -> str:
        """The backbone processor's image placeholder (one per image; the processor expands it)."""
        token = getattr(self.processor, "image_token", None) or getattr(self.tokenizer, "image_token", None)
        if not token:
            raise ValueError(
                f"{type(self.processor).__name__} names no image_token; a prompt_template cannot place the image"
            )
        return token

    def build_prompt(self, question: str | None = None, num_images: int = 1) -> str:
        """The prompt up to and including the assistant's generation prompt (`prompt_template` or the chat template).

        With `num_images` > 1 the images come one after the other where the one image would be: the chat template
        gets that many image entries; in a `prompt_template`, `{image}` becomes that many image tokens, and when
        `{image}` is wrapped (a `<...>` tag directly on both sides, as Qwen-VL's
        `<|vision_start|>{image}<|vision_end|>`) the wrapper is repeated around each image, as the backbones' chat
        templates do, so that each image gets its own vision block.
        """
        question = self.question if question is None else question
        if self.prompt_template is not None:
            opening, closing = _image_wrapper(self.prompt_template)
            image = (closing + opening).join([self.image_token] * num_images)  # the template's own wrapper closes
            return self.prompt_template.format(image=image, question=question)
        images = [{"type": "image"} for _ in range(num_images)]
        messages = [{"role": "user", "content": images + [{"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @staticmethod
    def _separator(prompt: str, answer: str) -> str:
        # Native mode appends the answer the way the LMM would generate it: after "ASSISTANT:" a
        # token with a leading space (" the" -> "▁the"). Templates ending in whitespace need none.
        if not answer or not prompt or prompt[-1].isspace() or answer[0].isspace():
            return ""
        return " "

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        images: Any,
        texts: str | Sequence[str] | None = None,
        phrases: Sequence[PhraseSpec] | Sequence[Sequence[PhraseSpec]] | None = None,
        masks: Any = None,
        question: str | Sequence[str | None] | None = None,
        return_sam_inputs: bool = True,
        max_length: int | None = None,
        return_tensors: str = "pt",
        pieces: Sequence[PieceSpec] | Sequence[Sequence[PieceSpec] | None] | None = None,
        encoding: str | None = None,
        ground_image: int | Sequence[int] | None = None,
    ) -> BatchFeature:
        """Build a padded batch of model inputs.

        The shapes of `texts`, `phrases`, `masks` and `pieces` follow `images` and are never guessed:
        `images` one image -> `texts` one `str` (or None), `phrases` one flat list of phrases for
        it, `masks` one `[K, H, W]` array/tensor or a list of K HxW masks, `pieces` one list of
        pieces; `images` a list -> `texts`, `phrases`, `masks`, `pieces` lists with one such entry
        per image. Anything else (a `str` for `phrases`, a nested phrase list for one image, a flat
        one for a list of images, mismatched lengths) raises a `TypeError`/`ValueError` that names
        the argument.

        Args:
            images: one image or a list (PIL, or uint8 numpy arrays); non-RGB modes are converted
                (alpha composited on the mean colour, see `to_rgb`). An entry of the list may itself be a
                list of images: several images of one prompt (e.g. `[[reference, target]]`), placed one after
                the other in the prompt; the phrases are grounded in one of them (`ground_image`) and the
                others are context.
            texts: the answer text(s), appended after the assistant prompt. `None`: prompt only
                (for generation); then `phrases`, `masks` and `pieces` must be `None` too.
            phrases: the grounded phrases of each answer: substrings of it or `(start, end)`
                character spans (placed by `match_phrases`; a substring is searched from the end
                of the previous phrase).
            masks: optional boolean masks at the original image size, one per phrase.
            question: the user question, replacing `self.question` for this call: one `str` for
                every example, or one per image (`None` entries take `self.question`).
            return_sam_inputs: also return `sam_pixel_values` [B, 3, 1024, 1024].
            max_length: cut each sequence to at most this many tokens; a `ValueError` is raised if
                that would cut the prompt/image tokens or any phrase token.
            return_tensors: only `"pt"` is supported.
            pieces: reproduction mode: how each answer is cut into separately encoded pieces,
                `(start, end)` or `(start, end, last_token_only)` character spans in order (see
                `answer_tokens`; `FLMMTransform` gives the original's RefCOCO and PNG pieces);
                `None` (or a `None` entry): the whole answer is one piece. Native mode tokenises
                the answer with its prompt as one string and ignores them.
            encoding: `"pieces"` (reproduction mode's) or `"joint"` (native mode's: prompt, separator
                and answer tokenised as one string); `None`: the mode's. `"joint"` serves a text that
                the original appended to its prompt string, such as VisCoT's forced answer start.
            ground_image: with several images per prompt, the index of the image the phrases are grounded in
                (negative counts from the end): one int for every example or one per example; `None`: the last
                image (the target after its references). The masks, `original_sizes`, the geometry and the SAM
                inputs are that image's.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `phrase_ids` [B, L] (-1 or phrase
            index), the backbone's image inputs (`pixel_values`, ...), `original_sizes` [B, 2]
            (H, W), `canvas_sizes` [B, 2], `content_boxes` [B, 4] (top, left, bottom, right) in
            the canvas's pixel units, optionally `sam_pixel_values`, and `masks` (list of
            BoolTensor [K_b, H_b, W_b]) when masks are given. With several images in some prompt also
            `num_images` [B] (images per example) and `image_index` [B] (the grounded image, in `[0, num_images)`);
            the backbone's per-image inputs (`image_grid_thw`, `image_sizes`, ...) then hold one row per image.
        """
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        if pieces is not None and not isinstance(images, (list, tuple)):
            pieces = [pieces]  # one image: one list of pieces
        images, texts, phrases, masks = _batch_arguments(images, texts, phrases, masks)
        questions = _per_example_questions(question, len(images))
        pieces = _per_example_pieces(pieces, texts, len(images))
        images = [list(example) if isinstance(example, (list, tuple)) else [example] for example in images]
        empty = [b for b, example in enumerate(images) if not example]
        if empty:
            raise ValueError(f"example {empty[0]}: an empty list of images; give each example at least one image")
        chosen = _ground_image_indices(ground_image, [len(example) for example in images])
        rgb_images, lmm_images, geometry = self._prepare_images(images, chosen)
        examples = [
            _Text(self.build_prompt(q, len(images[b])), answer, resolve_phrase_spans(answer, example_phrases, example=b),
                  as_pieces(answer, example_pieces, example=b))
            for b, (q, answer, example_phrases, example_pieces) in enumerate(zip(questions, texts, phrases, pieces))
        ]
        if encoding not in (None, "pieces", "joint"):
            raise ValueError(f"encoding must be 'pieces', 'joint' or None, got {encoding!r}")
        if (encoding or ("pieces" if self.mode == "reproduction" else "joint")) == "pieces":
            data = self._encode_piecewise(lmm_images, examples, max_length)
        else:
            data = self._encode_joint(lmm_images, examples, max_length)
        data.update(geometry)
        if any(len(example) > 1 for example in images):
            data["num_images"] = torch.tensor([len(example) for example in images], dtype=torch.long)
            data["image_index"] = torch.tensor(chosen, dtype=torch.long)
        if return_sam_inputs:
            data["sam_pixel_values"] = torch.stack([sam_preprocess(image) for image in rgb_images])
        if masks is not None:
            sizes = geometry["original_sizes"].tolist()
            data["masks"] = [_to_mask_tensor(m, sizes[b], len(examples[b].spans), b) for b, m in enumerate(masks)]
        return BatchFeature(data=data)

    def _prepare_images(
        self, images: list[list[Any]], chosen: list[int]
    ) -> tuple[list[Image.Image], list[list[Image.Image]], dict[str, torch.Tensor]]:
        """Per example: the grounded image in RGB, the images the LMM sees (letterboxed or not), and the grounded
        image's geometry tensors."""
        rgb_images, lmm_images = [], []
        geometry: dict[str, list] = {"original_sizes": [], "canvas_sizes": [], "content_boxes": []}
        for b, example in enumerate(images):
            seen = []
            for i, image in enumerate(example):
                self._check_image_size(image, b if len(example) == 1 else f"{b}.{i}")
                image = to_rgb(image, background=self.pad_color)
                lmm_image, canvas, box = self.lmm_image(image)
                seen.append(lmm_image)
                if i == chosen[b]:
                    rgb_images.append(image)
                    geometry["original_sizes"].append((image.height, image.width))
                    geometry["canvas_sizes"].append(canvas)
                    geometry["content_boxes"].append(box)
            lmm_images.append(seen)
        return rgb_images, lmm_images, {key: torch.tensor(value, dtype=torch.long) for key, value in geometry.items()}

    def _check_image_size(self, image: Any, index: int | str) -> None:
        """Refuse images above `max_image_pixels` before any copy is made (masks come back at this size)."""
        size = image.size if isinstance(image, Image.Image) else getattr(image, "shape", (0, 0))[:2][::-1]
        width, height = (int(v) for v in size)
        if self.max_image_pixels is not None and width * height > self.max_image_pixels:
            raise ValueError(
                f"image {index} is {width}x{height} ({width * height / 1e6:.1f} megapixels), above the limit of "
                f"{self.max_image_pixels / 1e6:.0f} megapixels (FLMMProcessor.max_image_pixels): its masks and SAM "
                "inputs would take gigabytes. Fix: downscale it first (e.g. image.thumbnail((4096, 4096))), or raise "
                "processor.max_image_pixels (None: no limit)."
            )

    def _backbone_encode(self, lmm_images: list[list[Image.Image]], texts: list[str]) -> dict[str, Any]:
        """The backbone processor on (images, text) pairs: image-token expansion, image tensors, padding."""
        encoded = self.processor(
            images=[list(example) for example in lmm_images],
            text=texts,
            padding=True,
            return_tensors="pt",
            **self.image_processor_kwargs(),
        )
        data = dict(encoded)
        data.update(self.reproduction_image_inputs([image for example in lmm_images for image in example]))
        return data

    def _encode_piecewise(self, lmm_images: list[list[Image.Image]], examples: list[_Text], max_length: int | None) -> dict[str, Any]:
        """Reproduction mode: the backbone encodes each prompt (with its image); the answer's pieces are appended."""
        data = self._backbone_encode(lmm_images, [example.prompt for example in examples])
        keys = token_aligned_keys(data)
        rows = []
        for b, example in enumerate(examples):
            positions = data["attention_mask"][b].nonzero().flatten()
            ids, phrase_of_token = encode_pieces(self.tokenizer, example.answer, example.spans, example.pieces, b)
            n = len(ids)
            # An answer token takes the prompt's last value of every other token-aligned key (the
            # text-token value: 0 in token_type_ids / mm_token_type_ids), and attention 1.
            row = {key: data[key][b, positions] for key in keys}
            row = {key: torch.cat([value, value[-1:].expand(n, *value.shape[1:])]) for key, value in row.items()}
            row["input_ids"][len(positions):] = torch.tensor(ids, dtype=row["input_ids"].dtype)
            row["attention_mask"][len(positions):] = 1
            row["phrase_ids"] = torch.tensor([-1] * len(positions) + phrase_of_token, dtype=torch.long)
            keep = self._check_truncation(max_length, len(positions) + n, n, phrase_of_token, example, b)
            rows.append({key: value[:keep] for key, value in row.items()})
        data.update(pack_rows(rows, self._pad_values(), left=self.tokenizer.padding_side == "left"))
        return data

    def _encode_joint(self, lmm_images: list[list[Image.Image]], examples: list[_Text], max_length: int | None) -> dict[str, Any]:
        """Native mode: prompt + answer tokenised as one string by the backbone; phrase ids placed on its tail."""
        full_texts, answer_starts = [], []
        for example in examples:
            head = example.prompt + self._separator(example.prompt, example.answer)
            full_texts.append(head + example.answer)
            answer_starts.append(len(head))
        data = self._backbone_encode(lmm_images, full_texts)
        input_ids, attention_mask = data["input_ids"], data["attention_mask"]
        data["phrase_ids"] = torch.full_like(input_ids, -1)
        keeps: list[int | None] = []
        for b, example in enumerate(examples):
            positions = attention_mask[b].nonzero().flatten()
            start = answer_starts[b]
            spans = [(start + s, start + e) for s, e in example.spans]
            tail_ids, tail_phrase = encode_joint(self.tokenizer, full_texts[b], start, spans, b)
            real_ids = input_ids[b, positions].tolist()
            if len(tail_ids) > len(real_ids) or real_ids[len(real_ids) - len(tail_ids):] != tail_ids:
                raise RuntimeError(
                    f"example {b}: the backbone processor tokenised the answer differently from its tokenizer; "
                    "cannot place the phrase tokens"
                )
            tail_positions = positions[len(real_ids) - len(tail_ids):]
            data["phrase_ids"][b, tail_positions] = torch.tensor(tail_phrase, dtype=torch.long)
            keeps.append(self._check_truncation(max_length, len(real_ids), len(tail_ids), tail_phrase, example, b))
        if any(keep is not None for keep in keeps):
            keys = token_aligned_keys(data)
            rows = []
            for b in range(len(examples)):
                positions = attention_mask[b].nonzero().flatten()[: keeps[b]]
                rows.append({key: data[key][b, positions] for key in keys})
            data.update(pack_rows(rows, self._pad_values(), left=self.tokenizer.padding_side == "left"))
        return data

    def _pad_values(self) -> dict[str, int]:
        return {"input_ids": self.tokenizer.pad_token_id or 0, "phrase_ids": -1}

    @staticmethod
    def _check_truncation(
        max_length: int | None, length: int, tail_length: int, tail_phrase: list[int], example: _Text, index: int
    ) -> int | None:
        """Length to keep for one example (None: no cut); ValueError if the cut is not allowed."""
        if max_length is None or length <= max_length:
            return None
        cut = length - max_length  # tokens removed from the end
        if cut > tail_length:
            raise ValueError(
                f"example {index}: max_length={max_length} would cut the prompt/image tokens "
                f"(the prompt alone has {length - tail_length} tokens)"
            )
        cut_phrases = sorted({p for p in tail_phrase[tail_length - cut:] if p >= 0})
        if cut_phrases:
            names = ", ".join(f"{k} {example.answer[slice(*example.spans[k])]!r}" for k in cut_phrases)
            raise ValueError(
                f"example {index}: max_length={max_length} (sequence has {length} tokens) cuts phrase(s) {names}"
            )
        return max_length

    # ------------------------------------------------------------------ outputs
    @staticmethod
    def post_process_masks(
        logits: Sequence[torch.Tensor] | torch.Tensor,
        original_sizes: torch.Tensor | Sequence[Sequence[int]],
        threshold: float = 0.5,
        return_probabilities: bool = False,
    ) -> list[torch.Tensor]:
        """Masks at the original image size from mask logits.

        Args:
            logits: per example `[K, h, w]` logits (a list, or a `[B, K, h, w]` tensor). They must
                already cover the image content only: the letterbox padding is removed by the
                model (`crop_to_content`), not here.
            original_sizes: `[B, 2]` (H, W) per example (the processor's `original_sizes`).
            threshold: probability threshold for the boolean masks.
            return_probabilities: return the float sigmoid probabilities instead of booleans.

        Returns:
            list of `[K, H, W]` BoolTensors (or float probabilities): bilinear resize of the
            logits (align_corners=False), sigmoid, `> threshold`.
        """
        check_threshold(threshold)
        if torch.is_tensor(logits) and logits.dim() == 3:
            logits = [logits]
        if len(logits) != len(original_sizes):
            raise ValueError(f"got {len(logits)} logit sets and {len(original_sizes)} original sizes")
        results = []
        for example_logits, size in zip(logits, original_sizes):
            height, width = (int(s) for s in size)
            if example_logits.dim() != 3:
                raise ValueError(f"logits must be [K, h, w] per example, got shape {tuple(example_logits.shape)}")
            if example_logits.shape[0] == 0:
                probs = example_logits.new_zeros((0, height, width), dtype=torch.float32)
            else:
                resized = F.interpolate(
                    example_logits[:, None].float(), size=(height, width), mode="bilinear", align_corners=False
                )[:, 0]
                probs = resized.sigmoid()
            results.append(probs if return_probabilities else probs > threshold)
        return results

    def batch_decode(self, *args, **kwargs):
        """Forwarded to the tokenizer."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        """Forwarded to the tokenizer."""
        return self.tokenizer.decode(*args, **kwargs)

    # ------------------------------------------------------------------ save / load
    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """Called by `AutoProcessor` on remote-code classes; `save_pretrained` always writes the auto_map."""
        if auto_class != "AutoProcessor":
            raise ValueError(f"FLMMProcessor can only be registered for AutoProcessor, got {auto_class!r}")
        cls._auto_class = auto_class

    def to_dict(self) -> dict[str, Any]:
        """The settings stored in `flmm_processor_config.json`."""
        return {
            "processor_class": type(self).__name__,
            "backbone_processor_class": type(self.processor).__name__,
            "mode": self.mode,
            "question": self.question,
            "letterbox": self._letterbox,
            "model_type": self.model_type,
            "prompt_template": self.prompt_template,
        }

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Save the backbone processor, our settings, and this file + its siblings as custom code (for AutoProcessor)."""
        os.makedirs(save_directory, exist_ok=True)
        files = list(self.processor.save_pretrained(save_directory, **kwargs) or [])
        config_file = os.path.join(save_directory, CONFIG_NAME)
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
        files.append(config_file)
        # AutoProcessor reads "auto_map" from processor_config.json; "processor_class" stays the
        # backbone's, so without trust_remote_code the folder still loads as the backbone processor.
        processor_config = os.path.join(save_directory, "processor_config.json")
        if os.path.isfile(processor_config):
            with open(processor_config, encoding="utf-8") as f:
                config = json.load(f)
            if "auto_map" not in config:
                config["auto_map"] = {"AutoProcessor": f"processing_flmm.{type(self).__name__}"}
                with open(processor_config, "w", encoding="utf-8") as f:
                    json.dump(config, f, indent=2, sort_keys=True)
                files += _copy_custom_code(save_directory)
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> FLMMProcessor:
        """Load a saved `FLMMProcessor`, or wrap a plain backbone processor (Hub id or folder).

        `mode`, `question`, `letterbox`, `model_type` and `prompt_template` given here override the saved settings;
        the other kwargs go to the backbone processor's `from_pretrained`. Without a saved or
        given `model_type`, the folder's `config.json` names it (`model_type`, or
        `lmm_config.model_type` in an F-LMM folder).
        """
        overrides = {key: kwargs.pop(key) for key in SETTINGS if key in kwargs}
        kwargs.pop("_from_auto", None)
        check_folder_or_hub_id(str(pretrained_model_name_or_path))
        settings: dict[str, Any] = {}
        config_file = _cached_file(pretrained_model_name_or_path, CONFIG_NAME, kwargs)
        backbone_class = None
        if config_file is not None:
            with open(config_file, encoding="utf-8") as f:
                settings = json.load(f)
            backbone_class = _library_processor_class(settings.get("backbone_processor_class"), config_file)
        if backbone_class is not None:
            # A library class needs no remote code. Unset, our own auto_map in the folder would make
            # transformers ask interactively whether to run custom code; a user who already allowed it
            # (AutoProcessor(..., trust_remote_code=True)) keeps it, so that the tokenizer loader reads
            # the folder's config.json with our remote FLMMConfig instead of falling back to a bare
            # PreTrainedConfig ("You are using a model of type `flmm` to instantiate a model of type ``").
            kwargs["trust_remote_code"] = bool(kwargs.get("trust_remote_code"))
            processor = backbone_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
        else:
            # Our auto_map in processor_config.json would send AutoProcessor back here with remote code on.
            kwargs.pop("trust_remote_code", None)
            processor = AutoProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        init = {key: settings[key] for key in SETTINGS if settings.get(key) is not None}
        init.update(overrides)
        if init.get("model_type") is None:
            init["model_type"] = _config_model_type(pretrained_model_name_or_path, kwargs)
        return cls(processor, **init)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_type={self.model_type!r}, mode={self.mode!r}, letterbox={self.letterbox}, "
            f"processor={type(self.processor).__name__})"
        )


# ---------------------------------------------------------------------- helpers
def check_threshold(threshold: Any) -> None:
    """ValueError unless `threshold` is a probability in [0, 1] (NaN, 2.0 or a string would give empty masks)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a probability between 0 and 1 (default 0.5), got {threshold!r}")


def _height_width(size: Any) -> tuple[int, int] | None:
    """(height, width) of an image processor's size (dict or SizeDict: height/width or shortest_edge), or None."""
    if size is None:
        return None
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    if get("shortest_edge"):
        return int(get("shortest_edge")), int(get("shortest_edge"))
    return None


def _three(value: float | Sequence[float]) -> tuple[float, float, float]:
    """A per-channel mean/std as three floats (a single float applies to every channel)."""
    return (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)


def _is_span(value: Any) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(i, (int, np.integer)) for i in value)
    )


def _batch_arguments(
    images: Any, texts: Any, phrases: Any, masks: Any
) -> tuple[list[Any], list[str], list[Sequence[PhraseSpec]], list[Any] | None]:
    """`FLMMProcessor.__call__`'s arguments as per-image lists; errors for any other shape."""
    if isinstance(images, (list, tuple)):
        images = list(images)
        if not images:
            raise ValueError("images is empty: pass one image or a non-empty list of images")
        texts = _per_image("texts", texts, len(images))
        phrases = _per_image("phrases", phrases, len(images))
        masks = _per_image("masks", masks, len(images))
        for b, example_phrases in enumerate(phrases or []):
            _check_phrase_list(example_phrases, f"phrases[{b}]", f"phrases[{b}] is the flat phrase list of image {b}")
    else:
        if texts is not None and not isinstance(texts, str):
            raise TypeError(
                f"images is one image, so texts must be one str (or None), got {type(texts).__name__}; "
                "for a batch, pass images as a list with one text per image"
            )
        if phrases is not None:
            _check_phrase_list(phrases, "phrases", "for a batch, pass images=[image, ...] and phrases=[[...], ...]")
        if masks is not None:
            _check_one_mask_stack(masks)
        images = [images]
        texts = None if texts is None else [texts]
        phrases = None if phrases is None else [phrases]
        masks = None if masks is None else [masks]
    if texts is None:
        if phrases is not None or masks is not None:
            raise ValueError("phrases/masks need the answer texts: pass texts too")
        texts = [""] * len(images)
    for b, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{b}] must be a str, got {type(text).__name__}")
    if phrases is None:
        phrases = [[] for _ in images]
    return images, texts, phrases, masks


_TAG_BEFORE = re.compile(r"<[^<>\s{}]+>$")
_TAG_AFTER = re.compile(r"^<[^<>\s{}]+>")


def _image_wrapper(template: str) -> tuple[str, str]:
    """The `<...>` tags directly around `{image}` in a prompt template (both or neither; `("", "")`: unwrapped)."""
    before, _, after = template.partition("{image}")
    opening, closing = _TAG_BEFORE.search(before), _TAG_AFTER.search(after)
    if opening is None or closing is None:
        return "", ""
    return opening.group(0), closing.group(0)


def _ground_image_indices(ground_image: Any, counts: list[int]) -> list[int]:
    """`ground_image` as one index in `[0, n_b)` per example (`None`: each example's last image)."""
    if ground_image is None:
        return [n - 1 for n in counts]
    given = [ground_image] * len(counts) if isinstance(ground_image, (int, np.integer)) else list(ground_image)
    if len(given) != len(counts) or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in given):
        raise ValueError(f"ground_image must be an int or one int per example ({len(counts)}), got {ground_image!r}")
    for b, (k, n) in enumerate(zip(given, counts)):
        if not -n <= k < n:
            raise ValueError(f"example {b}: ground_image {k} is out of range for its {n} image(s)")
    return [int(k) % n for k, n in zip(given, counts)]


def _per_example_questions(question: Any, batch: int) -> list[str | None]:
    """`question` (None, one str, or one str/None per image) as one entry per example."""
    if question is None or isinstance(question, str):
        return [question] * batch
    if not isinstance(question, (list, tuple)):
        raise TypeError(
            f"question must be a str, None (the processor's question) or one str/None per image, "
            f"got {type(question).__name__}"
        )
    questions = _per_image("question", question, batch)
    for b, q in enumerate(questions):
        if q is not None and not isinstance(q, str):
            raise TypeError(f"question[{b}] must be a str or None, got {type(q).__name__}")
    return questions


def _per_example_pieces(pieces: Any, texts: list[str], batch: int) -> list[Any]:
    """`pieces` (one list of pieces, or None, per image) checked against the answers."""
    if pieces is None:
        return [None] * batch
    pieces = _per_image("pieces", pieces, batch)
    for b, (text, example_pieces) in enumerate(zip(texts, pieces)):
        if example_pieces is not None and not text:
            raise ValueError(f"pieces[{b}] given for an empty answer: pass texts too")
    return pieces


def _per_image(name: str, value: Any, batch: int) -> list[Any] | None:
    """`value` as a list of one entry per image (None stays None); errors name `name` and the fix."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"images is a list, so {name} must be a list with one entry per image, got {type(value).__name__}: "
            f"pass {name}=[...] with {batch} entries, or pass a single image"
        )
    if len(value) != batch:
        raise ValueError(f"got {batch} images, {len(value)} {name}: {name} needs one entry per image")
    return list(value)


def _check_phrase_list(value: Any, name: str, hint: str) -> None:
    """TypeError unless `value` is one flat list of phrases (strings or (start, end) spans)."""
    if isinstance(value, str):
        raise TypeError(
            f"{name} must be a list of phrases, got the str {value!r} (it would be read one character per phrase): "
            f"pass [{value!r}]"
        )
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of phrases (strings or (start, end) spans), got {type(value).__name__}")
    if _is_span(value):
        raise TypeError(f"{name} must be a list of phrases, got the single span {tuple(value)}: pass [{tuple(value)}]")
    for phrase in value:
        if isinstance(phrase, (list, tuple)) and not _is_span(phrase) and (
            not phrase or not all(isinstance(i, (int, np.integer)) for i in phrase)
        ):
            raise TypeError(f"{name} must be a flat list of phrases, got the nested list {phrase!r} in it; {hint}")


def _check_one_mask_stack(masks: Any) -> None:
    """TypeError unless `masks` is one image's masks: a [K, H, W] array/tensor or a list of HxW masks."""
    if torch.is_tensor(masks) or isinstance(masks, np.ndarray):
        if masks.ndim == 3:
            return
    elif isinstance(masks, (list, tuple)) and all(getattr(m, "ndim", None) == 2 for m in masks):
        return
    shape = tuple(masks.shape) if hasattr(masks, "shape") else type(masks).__name__
    raise TypeError(
        f"images is one image, so masks must be one [K, H, W] array/tensor or a list of K HxW masks, got {shape}; "
        "for a batch, pass images=[image, ...] and masks=[masks_0, ...]"
    )


def _to_mask_tensor(masks: Any, size: tuple[int, int], num_phrases: int, example: int) -> torch.Tensor:
    """[K, H, W] BoolTensor from an array/tensor or a list of HxW masks, checked against the image."""
    if isinstance(masks, (list, tuple)):
        masks = (
            torch.stack([torch.as_tensor(np.asarray(m)) for m in masks])
            if len(masks)
            else torch.zeros((0,) + tuple(size), dtype=torch.bool)
        )
    masks = torch.as_tensor(masks)
    if masks.dim() != 3 or tuple(masks.shape[1:]) != tuple(size) or masks.shape[0] != num_phrases:
        raise ValueError(
            f"example {example}: masks must be [K={num_phrases}, H={size[0]}, W={size[1]}] "
            f"(one per phrase, at the original image size), got {tuple(masks.shape)}"
        )
    if masks.dtype != torch.bool:
        # Binarising with `> 0` would turn soft masks (0.3 everywhere) into all-True ground truth; the metrics
        # refuse such masks too. Only 0/1 values are read as masks.
        if not ((masks == 0) | (masks == 1)).all():  # NaN fails both comparisons
            values = masks.flatten().unique()[:5].tolist()
            raise ValueError(
                f"example {example}: masks must be boolean or hold only 0 and 1, got dtype {masks.dtype} with values "
                f"such as {values}. Fix: threshold them yourself (e.g. masks > 0.5) before passing them."
            )
        masks = masks != 0
    return masks


def check_folder_or_hub_id(source: str, saved_by: str = "FLMMProcessor.save_pretrained") -> None:
    """Refuse, naming the path and the fix, a `source` that is a file or neither a folder nor a possible Hub id.

    (transformers answers a missing folder with "Repo id must be in the form ...".) `saved_by` names
    what writes the folder that was expected, for the message.
    """
    if os.path.isdir(source):
        return
    if os.path.exists(source):
        raise OSError(f"{source!r} is a file; pass the folder that {saved_by} wrote")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise OSError(
            f"no folder {source!r} (looked for {os.path.abspath(source)!r}), and it cannot be a Hub id. Fix: check "
            "the path (relative paths are read from the working directory), or pass a Hub id 'org/name'."
        ) from None


def _cached_file(path: str | os.PathLike, filename: str, kwargs: dict[str, Any]) -> str | None:
    """Local path of `filename` in a folder or Hub repo, None if it does not exist."""
    if os.path.isdir(path):
        candidate = os.path.join(path, kwargs.get("subfolder", "") or "", filename)
        return candidate if os.path.isfile(candidate) else None
    from transformers.utils import cached_file

    hub_keys = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
    return cached_file(
        path,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **{key: kwargs[key] for key in hub_keys if key in kwargs},
    )


def _library_processor_class(name: str | None, config_file: str | None = None):
    """The transformers processor class called `name`, or None (remote-code or unknown processor, or AutoProcessor).

    Only `ProcessorMixin` subclasses: the name comes from a (possibly downloaded) file, and any other transformers
    class (`AutoModel`, a model class) would have its `from_pretrained` run on the folder.
    """
    if not name or name == "AutoProcessor":
        return None
    import transformers
    from transformers import ProcessorMixin

    found = getattr(transformers, name, None)
    if found is None:
        return None
    if not (isinstance(found, type) and issubclass(found, ProcessorMixin)):
        raise ValueError(
            f"{config_file or CONFIG_NAME} names backbone_processor_class {name!r}, which is not a transformers "
            "processor class (a ProcessorMixin subclass such as 'LlavaProcessor'). Fix: set it to the backbone's "
            "processor class, or remove the field to let AutoProcessor choose."
        )
    return found


def _config_model_type(path: str | os.PathLike, kwargs: dict[str, Any]) -> str | None:
    """The backbone's `model_type` from `config.json` in a folder or Hub repo (an F-LMM config's `lmm_config`)."""
    config_file = _cached_file(path, "config.json", kwargs)
    if config_file is None:
        return None
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_type") == "flmm":
        config = config.get("lmm_config") or {}
    return config.get("model_type")


def _copy_custom_code(save_directory: str | os.PathLike) -> list[str]:
    """Copy this file and its relative-import siblings (recursively) into `save_directory`."""
    from transformers.dynamic_module_utils import get_relative_import_files

    files = []
    for source in [__file__, *get_relative_import_files(__file__)]:
        target = os.path.join(save_directory, os.path.basename(source))
        if os.path.abspath(source) != os.path.abspath(target):
            shutil.copyfile(source, target)
        files.append(target)
    return files


__all__ = [
    "FLMMProcessor",
    "PhraseMatch",
    "Piece",
    "backbone_family",
    "backbone_image_inputs",
    "backbone_inputs",
    "check_folder_or_hub_id",
    "deepseek_letterbox_geometry",
    "letterbox_geometry",
    "match_phrases",
    "processor_model_types",
    "resolve_phrase_spans",
    "sam_preprocess",
    "to_rgb",
]

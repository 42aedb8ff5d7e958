"""Applications of a grounded frozen LMM: visual chain-of-thought and reasoning segmentation.

Library-only module (not part of the Hub custom code); it builds on `grounded_chat`.

- Visual chain-of-thought (VisCoT):
  * ``"v1"``: ask the LMM which object matters most for the question, ground the object it names
    (from the attention captured while it named it), crop the object's box (at least `min_crop`
    pixels a side, inside the image) and answer the question from the whole image plus the crop;
    backbones that cannot take two images answer from the crop alone.
  * ``"v2"``: ground the question itself (as a phrase, with `FLMMForGrounding.ground`), then crop
    and answer as in v1.
  * ``"baseline"``: the plain answer from the whole image.
- Reasoning segmentation, the F-LMM way: the LMM answers first, then the key phrase of its answer
  is grounded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .grounded_chat import (
    GroundedAnswer,
    FLMMProcessor,
    generate_text,
    generate_with_attention,
    ground_generated,
    select_phrases,
    to_rgb,
)

logger = logging.getLogger(__name__)

VERSIONS = ("v1", "v2", "baseline")

RELEVANT_OBJECT_QUESTION = (
    "To answer the question '{question}', which object in the image is the most relevant? "
    "Answer with the name of the object only."
)
"""VisCoT v1, step 1: the LMM names the object to look at."""

TWO_IMAGE_QUESTION = "The second image is a close-up of a region of the first image. {question}"
"""VisCoT, final step with two images (the whole image, then the crop)."""

MIN_CROP = 16
"""Smallest side of a VisCoT crop, in pixels of the original image."""


@dataclass
class VisualCoTResult:
    """
    The outcome of [`visual_cot`].

    Args:
        answer (`str`): the final answer.
        version (`str`): `"v1"`, `"v2"` or `"baseline"`.
        grounded_text (`str`, *optional*): what was grounded: the object the LMM named (v1) or the question (v2).
        box (`tuple[int, int, int, int]`, *optional*): the crop `(x0, y0, x1, y1)` in original pixels, end exclusive.
        mask (`torch.BoolTensor` of shape `[H, W]`, *optional*): the grounded mask the box was taken from.
        crop (`PIL.Image.Image`, *optional*): the cropped region.
        used_two_images (`bool`): whether the final answer saw image + crop (False: crop alone, or baseline).
    """

    answer: str
    version: str
    grounded_text: str | None = None
    box: tuple[int, int, int, int] | None = None
    mask: torch.BoolTensor | None = None
    crop: Image.Image | None = None
    used_two_images: bool = False


def mask_to_box(mask: torch.Tensor, min_size: int = MIN_CROP) -> tuple[int, int, int, int]:
    """
    The box `(x0, y0, x1, y1)` (end exclusive) of a `[H, W]` mask, grown to at least `min_size` a side.

    A side shorter than `min_size` is grown around its centre and shifted back inside the image; an
    empty mask gives the whole image. An image side shorter than `min_size` gives that whole side.
    """
    height, width = mask.shape[-2:]
    if not mask.any():
        return 0, 0, int(width), int(height)
    rows = mask.any(dim=1).nonzero().flatten()
    cols = mask.any(dim=0).nonzero().flatten()
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    x0, x1 = _grow(x0, x1, min_size, int(width))
    y0, y1 = _grow(y0, y1, min_size, int(height))
    return x0, y0, x1, y1


def _grow(start: int, end: int, min_size: int, limit: int) -> tuple[int, int]:
    """Grow [start, end) to `min(min_size, limit)` around its centre, then shift it inside [0, limit)."""
    size = min(min_size, limit)
    if end - start >= size:
        return start, end
    centre2 = start + end  # twice the centre, to stay in integers
    start = (centre2 - size) // 2
    start = min(max(start, 0), limit - size)
    return start, start + size


def _ground_named_object(
    model: Any, image: Any, question: str, processor: FLMMProcessor, use_refiner: bool, threshold: float, max_new_tokens: int
) -> tuple[str, torch.Tensor]:
    """VisCoT v1, steps 1-2: the LMM names the most relevant object; that name is grounded from its own attention."""
    refine = use_refiner and model.head.has_refiner
    answer = generate_with_attention(
        model, image, RELEVANT_OBJECT_QUESTION.format(question=question), processor,
        return_sam_inputs=refine, max_new_tokens=max_new_tokens,
    )
    height, width = (int(v) for v in answer.inputs["original_sizes"][0])
    # The whole (first line of the) reply is the object's name; punctuation around it grounds nothing.
    text = answer.text.split("\n")[0]
    start = len(text) - len(text.lstrip(" \"'"))
    end = len(text.rstrip(" .!\"'"))
    if end <= start:
        logger.warning("VisCoT: the LMM named no object; the crop is the whole image")
        return answer.text, torch.zeros(height, width, dtype=torch.bool)
    logits = ground_generated(model, answer, [(start, end)], image, use_refiner=refine)
    mask = FLMMProcessor.post_process_masks([logits], [(height, width)], threshold=threshold)[0][0].cpu()
    return text[start:end], mask


def visual_cot(
    model: Any,
    image: Any,
    question: str,
    version: str = "v1",
    processor: Any | None = None,
    *,
    min_crop: int = MIN_CROP,
    two_images: bool | None = None,
    use_refiner: bool = True,
    threshold: float = 0.5,
    object_max_new_tokens: int = 16,
    **generate_kwargs: Any,
) -> VisualCoTResult:
    """
    Visual chain-of-thought with a grounded frozen LMM.

    Args:
        model: an `FLMMForGrounding`.
        image: a PIL image or uint8 numpy array.
        question: the question to answer.
        version: `"v1"` (ground the object the LMM names), `"v2"` (ground the question) or `"baseline"`.
        processor: the `FLMMProcessor` (default: `model.processor`).
        min_crop: smallest crop side in original pixels.
        two_images: answer from image + crop (`True`), from the crop alone (`False`), or try two images and
            fall back to the crop alone when the backbone refuses them (`None`).
        use_refiner, threshold: as in `chat`.
        object_max_new_tokens: new tokens for naming the object (v1).
        generate_kwargs: passed to `generate` for the final answer.
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    processor = model.resolve_processor(processor)
    rgb = to_rgb(image)
    if version == "baseline":
        return VisualCoTResult(answer=generate_text(model, [rgb], question, processor, **generate_kwargs), version=version)

    if version == "v1":
        grounded, mask = _ground_named_object(
            model, rgb, question, processor, use_refiner, threshold, object_max_new_tokens
        )
    else:
        grounded = question.strip().rstrip("?").strip() or question
        mask = model.ground(rgb, question, [grounded], processor=processor, threshold=threshold, use_refiner=use_refiner)[0].cpu()
    box = mask_to_box(mask, min_crop)
    crop = rgb.crop(box)

    answer, used_two = None, False
    if two_images is not False:
        try:
            answer = generate_text(model, [rgb, crop], TWO_IMAGE_QUESTION.format(question=question), processor, **generate_kwargs)
            used_two = True
        except Exception as error:  # the backbone's processor/model refuses two images: its own error types vary
            if two_images:
                raise
            logger.info("VisCoT: the backbone did not take two images (%s); answering from the crop alone", error)
    if answer is None:
        answer = generate_text(model, [crop], question, processor, **generate_kwargs)
    return VisualCoTResult(
        answer=answer, version=version, grounded_text=grounded, box=box, mask=mask, crop=crop, used_two_images=used_two
    )


def reasoning_segmentation(
    model: Any,
    image: Any,
    instruction: str,
    processor: Any | None = None,
    *,
    selector: str = "auto",
    threshold: float = 0.5,
    use_refiner: bool = True,
    **generate_kwargs: Any,
) -> GroundedAnswer:
    """
    Reasoning segmentation the F-LMM way: the frozen LMM answers `instruction` first (e.g. "what in this
    picture keeps food cold?"), then the key phrase of its answer is grounded.

    The key phrase is the first phrase `selector` finds in the answer (see `chat`); when it finds none,
    the whole answer (without trailing punctuation) is grounded.

    Returns:
        A `GroundedAnswer` with at most one phrase and its mask.
    """
    processor = model.resolve_processor(processor)
    refine = use_refiner and model.head.has_refiner
    answer = generate_with_attention(model, image, instruction, processor, return_sam_inputs=refine, **generate_kwargs)
    spans, _, used, reply = select_phrases(model, image, answer.text, None, selector, processor)
    if spans:
        spans = spans[:1]
    else:
        end = len(answer.text.rstrip(" .!?\"'"))
        spans = [(0, end)] if end > 0 else []
        used = "whole_answer" if spans else "none"
    logits = ground_generated(model, answer, spans, image, use_refiner=refine)
    masks = FLMMProcessor.post_process_masks([logits], answer.inputs["original_sizes"], threshold=threshold)[0].cpu()
    return GroundedAnswer(
        text=answer.text,
        phrases=[answer.text[s:e] for s, e in spans],
        spans=spans,
        masks=masks,
        selector=used,
        selector_reply=reply,
    )


__all__ = ["VisualCoTResult", "mask_to_box", "reasoning_segmentation", "visual_cot"]

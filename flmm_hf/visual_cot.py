"""Applications of a grounded frozen LMM: visual chain-of-thought and reasoning segmentation.

Library-only module (not part of the Hub custom code); it builds on `grounded_chat`.

Visual chain-of-thought (VisCoT), [`visual_cot`]:

- versions:
  * ``"v1"``: the LMM first thinks which object matters most for the question; that thought is grounded
    from the attention captured while the LMM generated it; the mask's box is cropped, and the question
    is answered from the whole image plus the crop (backbones that cannot take two images answer from the
    crop alone);
  * ``"v2"``: the question itself is grounded, then crop and answer as in v1;
  * ``"baseline"``: the plain answer from the whole image (the original's "v3").
- recipes ([`VisualCoTRecipe`], every prompt, token limit and box setting in one place):
  * ``"original"`` (the default, [`ORIGINAL_RECIPE`]): the original F-LMM (its DeepSeek-VL VisCoT, run as its
    README does): the prompts, token limits, greedy decoding, coarse mask and box rule of the original;
  * ``"object_name"`` ([`OBJECT_NAME_RECIPE`]): this package's earlier variant: the LMM is asked for the
    object's name only, just the name is grounded, the box comes from the SAM-refined mask and is grown to at
    least 16 px a side inside the image, and the question is asked as is.

Reasoning segmentation, the F-LMM way: the LMM answers first, then the key phrase of its answer is grounded.
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
    generate_with_attention,
    generate_with_content,
    ground_generated,
    ground_generated_tokens,
    select_phrases,
    to_rgb,
)

logger = logging.getLogger(__name__)

VERSIONS = ("v1", "v2", "baseline")

IMAGE_SLOT = "{image}"
"""Where an image goes in a recipe's answer prompt."""

# ---- the original F-LMM (flmm/models/frozen_deepseek_vl.py, scripts/visual_cot/visual_cot_inference.py) -------
THOUGHT_INSTRUCTION = "First think which object in this image is most relevant to the question."
"""v1, thought step: appended to the question with no separator (the original concatenates them)."""

THOUGHT_PREFIX = " The object most relevant to the question is"
"""v1, thought step: the start of the assistant's turn; the LMM's thought continues it."""

ANSWER_INSTRUCTION = "\nAnswer the question using a single word or phrase."
"""Final step: appended to the answer prompt (the inference script's `additional_prompt`)."""

TWO_IMAGE_PROMPT = "{image}the whole image, {image}the image region that might help you answer the question: {question}"
"""Final step with the whole image and the crop (the original's `with_memory` conversation)."""

ONE_IMAGE_PROMPT = "{image}{question}"
"""Final step with one image: the baseline (the original's `visual_cot_v3`) and the crop-alone fallback."""

# ---- this package's earlier variant --------------------------------------------------------------------------
RELEVANT_OBJECT_QUESTION = (
    "To answer the question '{question}', which object in the image is the most relevant? "
    "Answer with the name of the object only."
)
"""`object_name` recipe, thought step: the LMM names the object to look at."""

CLOSE_UP_PROMPT = "{image}{image}The second image is a close-up of a region of the first image. {question}"
"""`object_name` recipe, final step with two images (the whole image, then the crop)."""


@dataclass(frozen=True)
class VisualCoTRecipe:
    """
    Every setting of the visual chain-of-thought. The defaults are the original F-LMM's (see [`ORIGINAL_RECIPE`]);
    change some with `dataclasses.replace(ORIGINAL_RECIPE, ...)`.

    Args:
        name (`str`, defaults to `"original"`): a label, written to benchmark outputs.
        thought_question (`str`): v1, the user turn of the thought step, after the image; `{question}` is replaced by
            the question. Default: `"{question}" + THOUGHT_INSTRUCTION` (no separator, as the original).
        thought_prefix (`str`, *optional*): v1, the text the assistant's turn starts with; the thought continues
            it (it is part of the prompt). Default `THOUGHT_PREFIX`. Its leading space is the separator the
            processor puts after the template's assistant prompt (`ASSISTANT:` / `Assistant:`), as the original.
        thought_max_new_tokens (`int`, defaults to 16): v1, new tokens the thought step may generate.
        thought_stop_words (`tuple[str, ...]`, defaults to `(".",)`): v1, stop when the thought ends with one of
            these (the original adds "." to its template's stop words: "only need the first sentence"); EOS
            always stops.
        thought_drop_last_token (`bool`, defaults to `True`): v1, drop the last generated token (the stop word, EOS,
            or the 16th token), as the original's `sequences[0, :-1]`.
        thought_grounding (`str`, defaults to `"all_tokens"`): v1, what is grounded: `"all_tokens"` (every kept
            thought token, one phrase, rows merged as the model's `merge`) or `"object_name"` (the first line of
            the reply without quotes and trailing punctuation).
        question_grounding (`str`, defaults to `"prompt"`): v2, `"prompt"` (the question's tokens in the user turn,
            after the image, as the original) or `"answer"` (the question without "?" as an answer text after the
            processor's default question, through `FLMMForGrounding.ground`).
        use_refiner (`bool`, defaults to `False`): take the box from the SAM-refined mask (`True`) or the coarse
            U-Net mask (`False`: the original README runs its VisCoT with `--discard_sam`).
        box_rule (`str`, defaults to `"centre"`): `"centre"` ([`original_mask_to_box`]: centre +- max(half extent,
            `min_half_size`) * `box_scale`, clipped to the image, truncated to integers) or `"grow"`
            ([`mask_to_box`]: the tight box grown to at least `2 * min_half_size` a side, shifted inside the image).
        min_half_size (`float`, defaults to 8): the smallest half side of the box, in original pixels.
        box_scale (`float`, defaults to 1.0): scales the half sides (`"centre"` rule only; the original's `--box_scale`).
        two_image_prompt (`str`): the final step's user turn with the whole image and the crop: two `{image}` slots
            and `{question}`. Default `TWO_IMAGE_PROMPT`.
        one_image_prompt (`str`): the user turn with one image (baseline, crop alone): one `{image}` slot and
            `{question}`. Default `ONE_IMAGE_PROMPT`.
        answer_instruction (`str`): appended to both answer prompts. Default `ANSWER_INSTRUCTION`.
        answer_max_new_tokens (`int`, defaults to 32): new tokens of the final answer (a `max_new_tokens` given to
            `visual_cot` wins).
    """

    name: str = "original"
    thought_question: str = "{question}" + THOUGHT_INSTRUCTION
    thought_prefix: str | None = THOUGHT_PREFIX
    thought_max_new_tokens: int = 16
    thought_stop_words: tuple[str, ...] = (".",)
    thought_drop_last_token: bool = True
    thought_grounding: str = "all_tokens"
    question_grounding: str = "prompt"
    use_refiner: bool = False
    box_rule: str = "centre"
    min_half_size: float = 8
    box_scale: float = 1.0
    two_image_prompt: str = TWO_IMAGE_PROMPT
    one_image_prompt: str = ONE_IMAGE_PROMPT
    answer_instruction: str = ANSWER_INSTRUCTION
    answer_max_new_tokens: int = 32

    def __post_init__(self) -> None:
        choices = {
            "thought_grounding": ("all_tokens", "object_name"),
            "question_grounding": ("prompt", "answer"),
            "box_rule": ("centre", "grow"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"VisualCoTRecipe.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if "{question}" not in self.thought_question:
            raise ValueError(f"VisualCoTRecipe.thought_question needs a {{question}} slot, got {self.thought_question!r}")
        for name, slots in (("two_image_prompt", 2), ("one_image_prompt", 1)):
            value = getattr(self, name)
            if value.count(IMAGE_SLOT) != slots or "{question}" not in value:
                raise ValueError(
                    f"VisualCoTRecipe.{name} needs exactly {slots} {IMAGE_SLOT} slot(s) and a {{question}} slot, got {value!r}"
                )
        if IMAGE_SLOT in self.answer_instruction:
            raise ValueError(f"VisualCoTRecipe.answer_instruction cannot hold an image slot, got {self.answer_instruction!r}")
        for name in ("thought_max_new_tokens", "answer_max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"VisualCoTRecipe.{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.thought_stop_words, str):
            raise ValueError(f"VisualCoTRecipe.thought_stop_words must be a tuple of strings, got the str {self.thought_stop_words!r}")
        if self.min_half_size < 0 or self.box_scale <= 0:
            raise ValueError(
                f"VisualCoTRecipe needs min_half_size >= 0 and box_scale > 0, got {self.min_half_size} and {self.box_scale}"
            )
        if self.box_rule == "grow" and self.box_scale != 1.0:
            raise ValueError(f"box_scale applies to box_rule='centre' only; got box_scale={self.box_scale} with 'grow'")


ORIGINAL_RECIPE = VisualCoTRecipe()
"""The original F-LMM's VisCoT: `FrozenDeepseekVLSAM.visual_cot_v1/v2/v3` as `visual_cot_inference.py` runs them
(`max_thought_tokens=16`, `max_new_tokens=32`, `additional_prompt=ANSWER_INSTRUCTION`, `box_scale=1.0`) with the
README's `--discard_sam` (coarse masks). Greedy decoding throughout (`do_sample=False`)."""

OBJECT_NAME_RECIPE = VisualCoTRecipe(
    name="object_name",
    thought_question=RELEVANT_OBJECT_QUESTION,
    thought_prefix=None,
    thought_max_new_tokens=16,
    thought_stop_words=(),
    thought_drop_last_token=False,
    thought_grounding="object_name",
    question_grounding="answer",
    use_refiner=True,
    box_rule="grow",
    min_half_size=8,
    box_scale=1.0,
    two_image_prompt=CLOSE_UP_PROMPT,
    one_image_prompt=ONE_IMAGE_PROMPT,
    answer_instruction="",
    answer_max_new_tokens=128,
)
"""This package's earlier VisCoT: the object's name is asked for and grounded, SAM-refined box of >= 16 px a side."""

RECIPES = {recipe.name: recipe for recipe in (ORIGINAL_RECIPE, OBJECT_NAME_RECIPE)}


def resolve_recipe(recipe: str | VisualCoTRecipe) -> VisualCoTRecipe:
    """A recipe by name (`"original"`, `"object_name"`) or as given."""
    if isinstance(recipe, VisualCoTRecipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown VisCoT recipe {recipe!r}: choose one of {sorted(RECIPES)} or pass a VisualCoTRecipe")
    return RECIPES[recipe]


@dataclass
class VisualCoTResult:
    """
    The outcome of [`visual_cot`].

    Args:
        answer (`str`): the final answer.
        version (`str`): `"v1"`, `"v2"` or `"baseline"`.
        recipe (`str`): the name of the recipe used.
        thought (`str`): v1, the LMM's thought (what it generated after the thought prefix); `""` otherwise.
        grounded_text (`str`, *optional*): what was grounded: the thought or the object's name (v1), the question (v2).
        box (`tuple[int, int, int, int]`, *optional*): the crop `(x0, y0, x1, y1)` in original pixels, end exclusive.
        mask (`torch.BoolTensor` of shape `[H, W]`, *optional*): the grounded mask the box was taken from.
        crop (`PIL.Image.Image`, *optional*): the cropped region.
        used_two_images (`bool`): whether the final answer saw image + crop (False: crop alone, or baseline).
    """

    answer: str
    version: str
    recipe: str = ORIGINAL_RECIPE.name
    thought: str = ""
    grounded_text: str | None = None
    box: tuple[int, int, int, int] | None = None
    mask: torch.BoolTensor | None = None
    crop: Image.Image | None = None
    used_two_images: bool = False


# ---------------------------------------------------------------------------------------------
# boxes
# ---------------------------------------------------------------------------------------------
def _check_mask(mask: torch.Tensor) -> None:
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a [H, W] bool tensor, got {tuple(mask.shape)} {mask.dtype}")


def original_mask_to_box(
    mask: torch.Tensor, min_half_size: float = 8, scale: float = 1.0
) -> tuple[int, int, int, int]:
    """
    The original F-LMM's crop box `(x0, y0, x1, y1)` of a `[H, W]` bool mask (its `mask2box`).

    With `y0, y1` (and `x0, x1`) the first and last mask rows (columns), both inclusive: centre
    `c = (first + last) / 2`, half side `d = max((last - first) / 2, min_half_size)`; the box is
    `[max(0, c - d * scale), min(size, c + d * scale)]` on each axis, each end truncated to an integer. The box
    is therefore not shifted back inside the image at a border (a box there is smaller than `2 * min_half_size`),
    and its end is the mask's last row/column itself (PIL's crop excludes it). An empty mask gives the whole image.
    """
    _check_mask(mask)
    height, width = (int(v) for v in mask.shape)
    ys, xs = torch.where(mask)
    if len(ys) == 0:
        return 0, 0, width, height
    y0, y1 = int(ys.min()), int(ys.max())
    x0, x1 = int(xs.min()), int(xs.max())
    half_y, half_x = max((y1 - y0) / 2, min_half_size), max((x1 - x0) / 2, min_half_size)
    centre_y, centre_x = (y1 + y0) / 2, (x1 + x0) / 2
    left, right = max(0, centre_x - half_x * scale), min(width, centre_x + half_x * scale)
    top, bottom = max(0, centre_y - half_y * scale), min(height, centre_y + half_y * scale)
    return int(left), int(top), int(right), int(bottom)


def mask_to_box(mask: torch.Tensor, min_size: int = 16) -> tuple[int, int, int, int]:
    """
    The tight box `(x0, y0, x1, y1)` (end exclusive) of a `[H, W]` bool mask, grown to at least `min_size` a side.

    A side shorter than `min_size` is grown around its centre and shifted back inside the image; an
    empty mask gives the whole image. An image side shorter than `min_size` gives that whole side.
    """
    _check_mask(mask)
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


def crop_box(mask: torch.Tensor, recipe: VisualCoTRecipe = ORIGINAL_RECIPE) -> tuple[int, int, int, int]:
    """The crop box of `mask` under the recipe's `box_rule`, `min_half_size` and `box_scale`."""
    if recipe.box_rule == "centre":
        return original_mask_to_box(mask, recipe.min_half_size, recipe.box_scale)
    return mask_to_box(mask, int(round(2 * recipe.min_half_size)))


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
def prompt_content(template: str, question: str, instruction: str = "") -> list[dict[str, Any]]:
    """
    A recipe's answer prompt as chat-template content items: `{image}` slots become `{"type": "image"}` items in
    order, the text between them `{"type": "text"}` items (empty ones dropped), `{question}` is replaced by the
    question (after the split, so a question that contains `{image}` stays text) and `instruction` is appended.
    """
    content: list[dict[str, Any]] = []
    for i, part in enumerate((template + instruction).split(IMAGE_SLOT)):
        if i:
            content.append({"type": "image"})
        text = part.replace("{question}", question)
        if text:
            content.append({"type": "text", "text": text})
    return content


def question_phrase_ids(processor: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, question: str) -> torch.Tensor:
    """
    `[1, L]` phrase ids marking the tokens of `question` in the user turn of a prompt-only input (0; -1 elsewhere).

    `input_ids` must be `processor(images=[image], texts=None, question=question)["input_ids"]`. The templated
    prompt (`processor.build_prompt(question)`) is tokenised once with offsets (the image placeholder is one special
    token there, so the text after it tokenises as in the expanded sequence); the tokens whose text overlaps the
    question's last occurrence are marked, matched to the tail of `input_ids`.
    """
    if not question.strip():
        raise ValueError("the question is empty: there is nothing to ground")
    prompt = processor.build_prompt(question)
    start = prompt.rfind(question)
    if start < 0:
        raise ValueError(
            f"the question {question!r} does not occur verbatim in the templated prompt {prompt!r}; "
            "use a recipe with question_grounding='answer'"
        )
    end = start + len(question)
    encoded = processor.tokenizer(prompt, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    first = next(i for i, (_, e) in enumerate(offsets) if e > start)
    tail = list(ids[first:])
    positions = attention_mask[0].nonzero().flatten()
    real = input_ids[0, positions].tolist()
    if len(tail) > len(real) or real[len(real) - len(tail) :] != tail:
        raise RuntimeError(
            "the backbone processor tokenised the prompt differently from its tokenizer; cannot place the question's tokens"
        )
    phrase = [0 if s < end and e > start and s < e else -1 for s, e in offsets[first:]]
    phrase_ids = torch.full_like(input_ids, -1)
    phrase_ids[0, positions[len(real) - len(tail) :]] = torch.tensor(phrase, dtype=phrase_ids.dtype)
    return phrase_ids


@torch.no_grad()
def ground_question_in_prompt(
    model: Any, image: Any, question: str, processor: Any | None = None, *, use_refiner: bool = False,
    threshold: float = 0.5,
) -> torch.BoolTensor:
    """
    The mask of `question` grounded where the user asked it: its tokens in the user turn, after the image.

    The original's VisCoT v2: one forward pass over the prompt; the rows of the question's tokens are merged into
    one phrase (the tokens after the question, such as the assistant prompt, cannot change them: attention is causal).

    Returns:
        `[H, W]` bool mask at the original image size.
    """
    processor = model.resolve_processor(processor)
    refine = use_refiner and model.head.has_refiner
    inputs = dict(processor(images=[image], texts=None, question=question, return_sam_inputs=refine))
    inputs["phrase_ids"] = question_phrase_ids(processor, inputs["input_ids"], inputs["attention_mask"], question)
    inputs = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    output = model(**inputs, refine=refine)
    logits = output.refined_logits if refine else output.coarse_logits
    return processor.post_process_masks(logits, inputs["original_sizes"], threshold=threshold)[0][0].cpu()


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------
def _ground_thought(
    model: Any, image: Image.Image, question: str, processor: FLMMProcessor, recipe: VisualCoTRecipe, refine: bool,
    threshold: float,
) -> tuple[str, str, torch.Tensor]:
    """VisCoT v1, steps 1-2: the LMM thinks which object matters; the thought is grounded from its own attention.

    Returns `(thought, grounded_text, mask)`.
    """
    answer = generate_with_attention(
        model, image, recipe.thought_question.replace("{question}", question), processor,
        return_sam_inputs=refine, answer_prefix=recipe.thought_prefix, stop_words=recipe.thought_stop_words,
        drop_last_token=recipe.thought_drop_last_token, max_new_tokens=recipe.thought_max_new_tokens,
    )
    height, width = (int(v) for v in answer.inputs["original_sizes"][0])
    empty = torch.zeros(height, width, dtype=torch.bool)
    if recipe.thought_grounding == "all_tokens":
        if len(answer.token_ids) == 0:
            # The original fails here (no rows to concatenate); an empty mask makes its box rule crop the whole image.
            logger.warning("VisCoT: the thought is empty; the crop is the whole image")
            return answer.text, answer.text, empty
        token_masks = torch.ones(1, len(answer.token_ids), dtype=torch.bool)
        logits = ground_generated_tokens(model, answer, token_masks, image, use_refiner=refine)
        grounded = answer.text
    else:
        # The whole (first line of the) reply is the object's name; punctuation around it grounds nothing.
        text = answer.text.split("\n")[0]
        start = len(text) - len(text.lstrip(" \"'"))
        end = len(text.rstrip(" .!\"'"))
        if end <= start:
            logger.warning("VisCoT: the LMM named no object; the crop is the whole image")
            return answer.text, answer.text, empty
        logits = ground_generated(model, answer, [(start, end)], image, use_refiner=refine)
        grounded = text[start:end]
    mask = FLMMProcessor.post_process_masks([logits], [(height, width)], threshold=threshold)[0][0].cpu()
    return answer.text, grounded, mask


def _final_answer(
    model: Any, image: Image.Image, crop: Image.Image, question: str, processor: FLMMProcessor,
    recipe: VisualCoTRecipe, two_images: bool | None, generate_kwargs: dict[str, Any],
) -> tuple[str, bool]:
    """The answer from image + crop (or the crop alone); returns `(answer, used_two_images)`."""
    kwargs = dict(generate_kwargs)
    kwargs.setdefault("max_new_tokens", recipe.answer_max_new_tokens)
    if two_images is not False:
        content = prompt_content(recipe.two_image_prompt, question, recipe.answer_instruction)
        try:
            return generate_with_content(model, [image, crop], content, processor, **kwargs), True
        except Exception as error:  # the backbone's processor/model refuses two images: its own error types vary
            if two_images:
                raise
            logger.info("VisCoT: the backbone did not take two images (%s); answering from the crop alone", error)
    content = prompt_content(recipe.one_image_prompt, question, recipe.answer_instruction)
    return generate_with_content(model, [crop], content, processor, **kwargs), False


def visual_cot(
    model: Any,
    image: Any,
    question: str,
    version: str = "v1",
    processor: Any | None = None,
    *,
    recipe: str | VisualCoTRecipe = "original",
    two_images: bool | None = None,
    use_refiner: bool | None = None,
    threshold: float = 0.5,
    **generate_kwargs: Any,
) -> VisualCoTResult:
    """
    Visual chain-of-thought with a grounded frozen LMM.

    With the default `recipe="original"` (see [`VisualCoTRecipe`] for every setting):

    - v1, thought: user turn `question + "First think which object in this image is most relevant to the
      question."` after the image; the assistant's turn starts `" The object most relevant to the question is"`
      and the LMM continues it greedily, at most 16 new tokens, stopping at "."; the last generated token is
      dropped; all the kept tokens are grounded as one phrase from the attention captured while generating them.
      An empty thought grounds nothing: the box is the whole image (the original fails on it).
    - v2: the question's tokens in the user turn are grounded (one forward pass over the prompt).
    - box: from the coarse mask (probability > `threshold`) at the original size, centre +- max(half extent, 8)
      px, clipped; the crop is that box of the original image.
    - answer: user turn `"<image>the whole image, <image>the image region that might help you answer the question:
      {question}\\nAnswer the question using a single word or phrase."` (image slots as content items of the
      backbone's chat template), greedy, 32 new tokens; the baseline asks `"<image>{question}\\nAnswer the
      question using a single word or phrase."` of the whole image.

    The chat framing (roles, system prompt) is the backbone's own template; the original's DeepSeek-VL run had no
    system prompt in the thought step and DeepSeek's default system prompt in the answer step.

    Args:
        model: an `FLMMForGrounding`.
        image: a PIL image or uint8 numpy array.
        question: the question to answer.
        version: `"v1"` (ground the thought), `"v2"` (ground the question) or `"baseline"`.
        processor: the `FLMMProcessor` (default: `model.processor`).
        recipe: `"original"` (default), `"object_name"` (this package's earlier variant) or a `VisualCoTRecipe`.
        two_images: answer from image + crop (`True`), from the crop alone (`False`), or try two images and
            fall back to the crop alone when the backbone refuses them (`None`).
        use_refiner: take the box from the SAM-refined mask; `None`: the recipe's `use_refiner`.
        threshold: probability threshold of the grounded mask.
        generate_kwargs: passed to `generate` for the final answer (`max_new_tokens` overrides the recipe's).

    Returns:
        A [`VisualCoTResult`].
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    recipe = resolve_recipe(recipe)
    processor = model.resolve_processor(processor)
    rgb = to_rgb(image)
    if version == "baseline":
        kwargs = dict(generate_kwargs)
        kwargs.setdefault("max_new_tokens", recipe.answer_max_new_tokens)
        content = prompt_content(recipe.one_image_prompt, question, recipe.answer_instruction)
        answer = generate_with_content(model, [rgb], content, processor, **kwargs)
        return VisualCoTResult(answer=answer, version=version, recipe=recipe.name)

    refine = (recipe.use_refiner if use_refiner is None else use_refiner) and model.head.has_refiner
    thought = ""
    if version == "v1":
        thought, grounded, mask = _ground_thought(model, rgb, question, processor, recipe, refine, threshold)
    elif recipe.question_grounding == "prompt":
        grounded = question
        mask = ground_question_in_prompt(model, rgb, question, processor, use_refiner=refine, threshold=threshold)
    else:
        grounded = question.strip().rstrip("?").strip() or question
        mask = model.ground(rgb, question, [grounded], processor=processor, threshold=threshold, use_refiner=refine)[0].cpu()
    box = crop_box(mask, recipe)
    crop = rgb.crop(box)
    answer, used_two = _final_answer(model, rgb, crop, question, processor, recipe, two_images, generate_kwargs)
    return VisualCoTResult(
        answer=answer, version=version, recipe=recipe.name, thought=thought, grounded_text=grounded, box=box,
        mask=mask, crop=crop, used_two_images=used_two,
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


__all__ = [
    "ANSWER_INSTRUCTION",
    "OBJECT_NAME_RECIPE",
    "ONE_IMAGE_PROMPT",
    "ORIGINAL_RECIPE",
    "RECIPES",
    "THOUGHT_INSTRUCTION",
    "THOUGHT_PREFIX",
    "TWO_IMAGE_PROMPT",
    "VisualCoTRecipe",
    "VisualCoTResult",
    "crop_box",
    "ground_question_in_prompt",
    "mask_to_box",
    "original_mask_to_box",
    "prompt_content",
    "question_phrase_ids",
    "reasoning_segmentation",
    "resolve_recipe",
    "visual_cot",
]

"""The offline demo's small frozen vision-language model.

No real LMM can be downloaded on an offline machine, so the demo builds a tiny LLaVA from configs
(CLIP vision tower + Llama text model, a word-level tokenizer) and pre-trains it briefly on
synthetic captions of shapes scenes, e.g. ``"red circle top left ; blue square bottom right"``.
Predicting the position words right after a colour and shape teaches the attention of the colour
and shape tokens to look at that object, which is the signal F-LMM's head reads. The model is then
frozen and saved with ``save_pretrained`` (model + ``LlavaProcessor``), so it loads offline with
``AutoModelForImageTextToText`` / ``AutoProcessor`` like any Hub backbone.

Library-only module (not part of the Hub custom code).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

try:  # transformers >= 5 without torchvision: the PIL backend, saved under the usual type name
    from transformers import CLIPImageProcessorPil as _CLIPImageProcessor
except ImportError:  # pragma: no cover
    from transformers import CLIPImageProcessor as _CLIPImageProcessor

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]

# Vicuna-style template of LLaVA-1.5, which the reproduction-mode prompt follows.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
PROMPT = "USER: <image>\nPlease give me a description of the image. ASSISTANT:"

ROW_WORDS = ("top", "middle", "bottom")
COLUMN_WORDS = ("left", "center", "right")
# Words every demo vocabulary holds: the prompt, the caption grammar and common scene words.
BASE_WORDS = (
    "user assistant : please give me a description of the image . , ; the an and at in on of to with "
    "is it this that there are object objects shape shapes thing one which left right top bottom middle "
    "center centre upper lower big small large tiny red green blue yellow orange purple pink white black "
    "gray grey brown cyan magenta circle square triangle rectangle star ellipse diamond disk box"
).split()


@dataclass
class DemoBackboneArguments:
    """Sizes of the demo's tiny LLaVA (defaults: 224 px, patch 16 -> a 14 x 14 grid, 4 x 4 attention maps)."""

    image_size: int = 224
    patch_size: int = 16
    vision_hidden_size: int = 128
    vision_layers: int = 2
    text_hidden_size: int = 128
    text_layers: int = 4
    text_heads: int = 4


def build_demo_tokenizer(words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over `BASE_WORDS` + `words` (punctuation split off)."""
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    extra = []
    for sentence in words:
        extra.extend(pre_tokenizers.Whitespace().pre_tokenize_str(sentence.lower()))
    for word in list(BASE_WORDS) + [w for w, _ in extra]:
        if word not in vocab:
            vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
    return tokenizer


def build_demo_processor(args: DemoBackboneArguments, words: Iterable[str] = ()) -> LlavaProcessor:
    """Tokenizer + CLIP image processor (plain resize, no centre crop) wrapped in a `LlavaProcessor`."""
    tokenizer = build_demo_tokenizer(words)
    size = {"height": args.image_size, "width": args.image_size}
    image_processor = _CLIPImageProcessor(size=size, crop_size=size, do_center_crop=False)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=args.patch_size,
        # The model drops CLIP's CLS token ("default"): patches only, (image_size // patch_size) ** 2.
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def build_demo_lmm_config(args: DemoBackboneArguments, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """LLaVA config: CLIP vision tower (no CLS token kept) + Llama text model sized by `args`."""
    vision = CLIPVisionConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.vision_hidden_size,
        intermediate_size=2 * args.vision_hidden_size,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=4,
        projection_dim=args.vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.text_hidden_size,
        intermediate_size=2 * args.text_hidden_size,
        num_hidden_layers=args.text_layers,
        num_attention_heads=args.text_heads,
        num_key_value_heads=args.text_heads,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # "default" drops CLIP's CLS token: the image tokens are exactly the patch grid.
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(args.image_size // args.patch_size) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )


def build_demo_backbone(
    args: DemoBackboneArguments | None = None, words: Iterable[str] = (), seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised tiny LLaVA and its processor."""
    args = args or DemoBackboneArguments()
    processor = build_demo_processor(args, words)
    config = build_demo_lmm_config(args, processor.tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _init_2d_position_embeddings(model, args)
    model.eval()
    return model, processor


@torch.no_grad()
def _init_2d_position_embeddings(model: LlavaForConditionalGeneration, args: DemoBackboneArguments) -> None:
    """2-D sine-cosine position embeddings for the vision tower (as MAE/ViT variants use), so that
    "where" is linearly readable from the first step; they stay trainable during pre-training."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    embedding = tower.embeddings.position_embedding.weight  # [1 + g*g, d]: CLS, then the patch grid
    grid, dim = args.image_size // args.patch_size, embedding.shape[1]
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    out_y, out_x = ys.flatten()[:, None] * omega, xs.flatten()[:, None] * omega
    table = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)  # [g*g, 4*quarter]
    embedding.zero_()
    embedding[1:, : table.shape[1]] = table


# ---- synthetic captions -----------------------------------------------------------------------
def position_words(mask: np.ndarray) -> str:
    """'top left' ... 'bottom right': the 3 x 3 cell of the mask's centroid."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return "middle center"
    h, w = mask.shape
    row = min(int(3 * ys.mean() / h), 2)
    col = min(int(3 * xs.mean() / w), 2)
    return f"{ROW_WORDS[row]} {COLUMN_WORDS[col]}"


def scene_caption(expressions: Sequence[str], masks: Sequence[np.ndarray], rng: random.Random) -> str:
    """
    One caption for a scene: each object's expression (leading article dropped) followed at once by
    its position, objects in random order: ``"red circle top left ; blue square middle right"``.
    The token after the object words must predict where the object is, so its attention has to
    find it in the image.
    """
    parts = []
    for text, mask in zip(expressions, masks):
        words = text.lower().strip(" .").split()
        if words and words[0] in ("the", "a", "an"):
            words = words[1:]
        parts.append(f"{' '.join(words)} {position_words(np.asarray(mask, dtype=bool))}")
    rng.shuffle(parts)
    return " ; ".join(parts) + " ."


# ---- pre-training -------------------------------------------------------------------------------
@dataclass
class PretrainArguments:
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    seed: int = 0
    max_seconds: float | None = None  # stop early when this wall-clock budget is spent


def pretrain_demo_backbone(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    scenes: Sequence[tuple[object, Sequence[str], Sequence[np.ndarray]]],
    args: PretrainArguments | None = None,
    progress: bool = True,
) -> dict:
    """
    Next-token prediction of scene captions after the reproduction prompt (all weights trained),
    then freeze. `scenes` holds (PIL image, expressions, masks). Returns timing and loss stats.

    `progress`: a tqdm progress bar of the steps (with the caption loss), shown only on a terminal, as
    transformers' own bars (pass False on processes other than the main one, or with `disable_tqdm`).
    """
    args = args or PretrainArguments()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    tokenizer = processor.tokenizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)

    def lr_factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # Images are preprocessed once; captions are redrawn (random object order) each time.
    pixel_values = processor.image_processor([s[0] for s in scenes], return_tensors="pt")["pixel_values"]
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    model.train()
    start = time.perf_counter()
    losses = []
    step = 0
    # disable=None: tqdm hides the bar when stderr is not a terminal (logs, CI)
    bar = tqdm(total=args.steps, desc="demo backbone pre-training", unit="step", disable=None if progress else True)
    try:
        for step in range(args.steps):
            index = [rng.randrange(len(scenes)) for _ in range(args.batch_size)]
            texts = [f"{PROMPT} {scene_caption(scenes[i][1], scenes[i][2], rng)}</s>" for i in index]
            # No images given to the processor here: expand <image> by hand (pixels are cached).
            batch = _tokenize_with_images(processor, texts)
            labels = batch["input_ids"].clone()
            answer_start = _answer_start(batch["input_ids"], tokenizer)
            positions = torch.arange(labels.shape[1])[None]
            labels[positions < answer_start[:, None]] = -100
            labels[batch["attention_mask"] == 0] = -100
            out = model(**batch, pixel_values=pixel_values[index], labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(out.loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            if step % 50 == 0 or step == args.steps - 1:
                logger.info("backbone pre-training step %d/%d: caption loss %.3f", step + 1, args.steps, losses[-1])
            if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
                logger.info("backbone pre-training stopped at step %d: time budget spent", step + 1)
                break
    finally:
        bar.close()
        tokenizer.padding_side = padding_side
    model.eval()
    model.requires_grad_(False)
    tail = losses[-20:]
    return {
        "pretrain_steps": step + 1,
        "pretrain_seconds": round(time.perf_counter() - start, 1),
        "pretrain_first_loss": round(losses[0], 4),
        "pretrain_final_loss": round(sum(tail) / len(tail), 4),
    }


def _tokenize_with_images(processor: LlavaProcessor, texts: list[str]) -> dict:
    grid = processor.image_processor.size["height"] // processor.patch_size
    n = grid * grid
    expanded = [t.replace(IMAGE_TOKEN, IMAGE_TOKEN * n) for t in texts]
    return dict(processor.tokenizer(expanded, padding=True, return_tensors="pt"))


def _answer_start(input_ids: torch.Tensor, tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """Index of the first token after 'ASSISTANT :' in each row."""
    assistant = tokenizer.convert_tokens_to_ids("assistant")
    is_assistant = (input_ids == assistant).int()
    last = input_ids.shape[1] - 1 - is_assistant.flip(1).argmax(1)
    return last + 2  # skip 'assistant' and ':'


# ---- caching ------------------------------------------------------------------------------------
def _cache_matches(folder: Path, args: DemoBackboneArguments) -> bool:
    """Whether the saved backbone has the sizes `args` asks for."""
    config = json.loads((folder / "config.json").read_text())
    vision, text = config.get("vision_config", {}), config.get("text_config", {})
    return (
        vision.get("image_size"), vision.get("patch_size"), vision.get("hidden_size"), vision.get("num_hidden_layers"),
        text.get("hidden_size"), text.get("num_hidden_layers"), text.get("num_attention_heads"),
    ) == (
        args.image_size, args.patch_size, args.vision_hidden_size, args.vision_layers,
        args.text_hidden_size, args.text_layers, args.text_heads,
    )


#: Written last into a demo backbone cache: without it the folder is an interrupted build and is rebuilt.
CACHE_MARKER = "flmm_demo_backbone.json"
# What `save_pretrained` of the demo model and processor writes: a folder holding anything else (and no
# marker) is not a demo cache, and is never written over.
_CACHE_FILES = {
    "config.json", "generation_config.json", "model.safetensors", "processor_config.json", "preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
}


def load_cached_demo_backbone(
    folder: str | Path, backbone_args: DemoBackboneArguments | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor] | None:
    """The demo backbone cached in `folder`, or None when it must be (re)built: no cache, an incomplete one
    (no `CACHE_MARKER`: a build cut short), other sizes than `backbone_args`, or files that fail to load.
    Each reason but the first is logged.

    Raises:
        ValueError: `folder` holds files that a demo backbone does not (it is not a demo cache).
    """
    folder = Path(folder)
    backbone_args = backbone_args or DemoBackboneArguments()
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    if not (folder / CACHE_MARKER).is_file():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in _CACHE_FILES)
        if foreign:
            raise ValueError(
                f"{folder} is not a demo backbone cache (it holds {foreign[:5]}) and is not written over. "
                "Fix: set --demo_backbone_dir to a new or empty folder."
            )
        logger.warning("the demo backbone cache in %s is incomplete (no %s: its build was interrupted): rebuilding it",
                       folder, CACHE_MARKER)
        return None
    if not (folder / "config.json").is_file() or not _cache_matches(folder, backbone_args):
        logger.warning("the cached demo backbone in %s has other sizes than asked for: building a new one", folder)
        return None
    try:
        model = AutoModelForImageTextToText.from_pretrained(folder)
        processor = AutoProcessor.from_pretrained(folder)
    except Exception as error:  # a truncated or damaged file: any loading error means "rebuild"
        logger.warning("the cached demo backbone in %s does not load (%s: %s): rebuilding it",
                       folder, type(error).__name__, error)
        return None
    model.eval().requires_grad_(False)
    logger.info("loaded the pre-trained demo backbone from %s", folder)
    return model, processor


def load_or_pretrain_demo_backbone(
    folder: str | Path,
    scenes: Sequence[tuple[object, Sequence[str], Sequence[np.ndarray]]],
    backbone_args: DemoBackboneArguments | None = None,
    pretrain_args: PretrainArguments | None = None,
    words: Iterable[str] = (),
    progress: bool = True,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, dict]:
    """
    Load the pre-trained demo backbone from `folder` when a complete cache is there
    (:func:`load_cached_demo_backbone`), else build it, pre-train it on `scenes` (pass
    `pretrain_args.steps=0` for a random frozen backbone) and save it there, `CACHE_MARKER` last.
    `progress`: show the pre-training's progress bar (see :func:`pretrain_demo_backbone`).
    """
    # Absolute: the F-LMM config records where its frozen backbone lives (lmm_name_or_path).
    folder = Path(folder).resolve()
    backbone_args = backbone_args or DemoBackboneArguments()
    cached = load_cached_demo_backbone(folder, backbone_args)
    if cached is not None:
        return (*cached, {"pretrain_cached": 1})
    pretrain_args = pretrain_args or PretrainArguments()
    model, processor = build_demo_backbone(backbone_args, words, seed=pretrain_args.seed)
    stats = {"pretrain_steps": 0}
    if pretrain_args.steps > 0:
        stats = pretrain_demo_backbone(model, processor, scenes, pretrain_args, progress=progress)
    model.requires_grad_(False)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CACHE_MARKER).unlink(missing_ok=True)  # a rebuild cut short must not look complete
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    # Load back the saved folder so the demo runs on exactly what a user would load.
    model = AutoModelForImageTextToText.from_pretrained(folder)
    model.eval().requires_grad_(False)
    processor = AutoProcessor.from_pretrained(folder)
    marker = {"backbone": dataclasses.asdict(backbone_args), "pretrain": dataclasses.asdict(pretrain_args), **stats}
    (folder / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return model, processor, stats

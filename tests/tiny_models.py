"""Tiny random vision-language models and padded batches, one per supported backbone family.

Every test that needs an LMM builds it here from a config (nothing is downloaded): a few
layers, hidden size 32, grouped-query attention where the family supports it, small images.
The batch is what the family's processor would give for two examples of different lengths
with one image each:

* ``pixel_values`` and the extra image inputs (``image_sizes``, ``image_grid_thw``,
  ``pixel_attention_mask``, ...) come from the family's REAL image processor (the PIL
  backend, which needs no download), configured for the tiny image size;
* ``input_ids`` are built by hand, because tokenizers cannot be downloaded: text tokens are
  random ids that are not special, and the image block repeats the processor's placeholder
  layout (image tokens plus the family's wrapper/break tokens), with counts computed from
  the config and the image inputs exactly as the processor computes them.

Each example reads ``[prefix text][image block][2 text tokens][answer: N_ANSWER tokens]``
(PaliGemma puts the image first, as its processor does). The prefixes differ in length, so
the batch needs padding; ``answer_mask(inputs)`` marks the answer tokens, which later tests
use as query rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

import transformers
from transformers import AutoModelForImageTextToText

FAMILIES: list[str] = [
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "paligemma",
    "gemma3",
    "deepseek_vl",
    "idefics3",
    "smolvlm",
    "internvl",
    "mistral3",
    "vipllava",
    "video_llava",
    "llava_next_video",
    "llava_onevision",
    "aya_vision",
    "shieldgemma2",
    "qwen3_vl",
    "qwen3_vl_moe",
    "glm4v",
    "glm4v_moe",
    "glm46v",
    "video_llama_3",
    "paddleocr_vl",
    "ernie4_5_vl_moe",
    "qwen2_5_omni_thinker",
    "qwen3_omni_moe_thinker",
    "ovis2",
    "glm_ocr",
    "janus",
    # issue #15: Qwen-VL-style merged grids
    "exaone4_5",
    "hyperclovax_vision_v2",
    "cosmos3_omni",
    "glmga",
    "cohere_compass",
    "cosmos3_edge",
    "hunyuan_vl",
    # issue #15, Pixtral grids and tiles: a LLaVA config with a Pixtral tower (spec name, not a model type), ...
    "llava_pixtral",
    "lighton_ocr",
    "qianfan_ocr",
    "granite_docling",
]

N_ANSWER = 3  # answer tokens at the end of every example (the query rows of later tests)

# Token ids. The vocabulary is tiny; ids >= SPECIAL_START are reserved for special tokens so
# that random text never collides with them.
VOCAB = 256
PAD_ID = 0
BOS_ID = 1
SPECIAL_START = 240
IMAGE_ID = 250  # the image placeholder in every family
WRAP_OPEN_ID = 245  # <vision_start>, <img>, <start_of_image>, <fake_token_around_image>
WRAP_CLOSE_ID = 246  # <vision_end>, </img>, <end_of_image>, <global-img>
BREAK_ID = 248  # mistral3 [IMG_BREAK], aya_vision TILE_GLOBAL
END_ID = 249  # mistral3 [IMG_END]
NEWLINE_ID = 13  # an ordinary text token standing for "\n"
ROW_COL_START = 200  # idefics3 <row_i_col_j>, aya_vision TILE_i (plain added tokens, not image tokens)

# Original image sizes (H, W) of the two examples. Fixed-size families get squares because in
# F-LMM's reproduction mode their images are letterboxed to a square before the processor.
SQUARE_SIZES = [(40, 40), (56, 56)]
FREE_SIZES = [(40, 60), (60, 30)]

_SMALL_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=512,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=2,
)
_SMALL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


@dataclass
class FamilySpec:
    """How to build one family: its config, its image processor and its placeholder layout."""

    config: transformers.PretrainedConfig
    image_processor: object
    image_sizes: list[tuple[int, int]]
    # (image processor output, example index) -> token ids of that example's image block
    image_block: Callable[[dict, int], list[int]]
    image_first: bool = False  # PaliGemma: image tokens, then <bos>, then text
    # image-processor output keys the model does not take (kept out of the inputs)
    drop_keys: tuple[str, ...] = ()
    # extra per-token inputs, built from the finished token ids: name -> ids -> values
    token_inputs: dict[str, Callable[[list[int], int], list[int]]] = field(default_factory=dict)
    # extra keyword arguments of the image processor call
    processor_kwargs: dict = field(default_factory=dict)


def _llama(**overrides) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**{**_SMALL_TEXT, **overrides})


def _spec_llava() -> FamilySpec:
    vision = transformers.CLIPVisionConfig(**_SMALL_VISION, image_size=28, patch_size=4, projection_dim=32)
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=_llama(),
        image_token_id=IMAGE_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drop CLS: P*P tokens
    )
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    n = (28 // 4) ** 2
    return FamilySpec(config, proc, SQUARE_SIZES, lambda inp, b: [IMAGE_ID] * n)


def _llava_next_unpadded(config, orig_hw: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of LLaVA-NeXT's un-padded high-res grid, as LlavaNextProcessor._get_unpadded_features."""
    from transformers.image_processing_utils import select_best_resolution

    size = config.vision_config.image_size
    p = size // config.vision_config.patch_size
    best_h, best_w = select_best_resolution(list(orig_hw), config.image_grid_pinpoints)
    cur_h, cur_w = p * (best_h // size), p * (best_w // size)
    h, w = orig_hw
    if w / h > cur_w / cur_h:
        new_h = int(round(h * (cur_w / w), 7))
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(w * (cur_h / h), 7))
        cur_w -= ((cur_w - new_w) // 2) * 2
    return cur_h, cur_w


def _llava_next_count(config, orig_hw: tuple[int, int]) -> int:
    """Image tokens of one LLaVA-NeXT image, as LlavaNextProcessor._get_number_of_features counts them."""
    p = config.vision_config.image_size // config.vision_config.patch_size
    h, w = _llava_next_unpadded(config, orig_hw)
    # base grid + un-padded high-res grid + one newline per high-res row (all image tokens)
    return p * p + h * w + h


def _spec_llava_next() -> FamilySpec:
    vision = transformers.CLIPVisionConfig(**_SMALL_VISION, image_size=28, patch_size=4, projection_dim=32)
    pinpoints = [[28, 56], [56, 28], [56, 56]]
    config = transformers.LlavaNextConfig(
        vision_config=vision,
        text_config=_llama(),
        image_token_id=IMAGE_ID,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    proc = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints
    )

    def block(inp: dict, b: int) -> list[int]:
        hw = tuple(int(v) for v in inp["image_sizes"][b])
        return [IMAGE_ID] * _llava_next_count(config, hw)

    return FamilySpec(config, proc, FREE_SIZES, block)


def _mm_token_type_ids(ids: list[int], image_id: int) -> list[int]:
    return [1 if t == image_id else 0 for t in ids]


def _spec_qwen(version: str) -> FamilySpec:
    text = dict(_SMALL_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4})
    if version == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2)
        config_cls = transformers.Qwen2VLConfig
    else:
        # window_size 16 px = 2x2 merged tokens: the vision tower reorders tokens by window,
        # which the geometry test must see undone.
        vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4,
                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                      fullatt_block_indexes=[1])
        config_cls = transformers.Qwen2_5_VLConfig
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_ID,
        video_token_id=IMAGE_ID - 1,
        vision_start_token_id=WRAP_OPEN_ID,
        vision_end_token_id=WRAP_CLOSE_ID,
    )
    proc = transformers.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
    )

    def block(inp: dict, b: int) -> list[int]:
        n = int(inp["image_grid_thw"][b].prod()) // 4  # merge_size ** 2 patches per token
        return [WRAP_OPEN_ID] + [IMAGE_ID] * n + [WRAP_CLOSE_ID]

    return FamilySpec(config, proc, FREE_SIZES, block,
                      token_inputs={"mm_token_type_ids": lambda ids, _: _mm_token_type_ids(ids, IMAGE_ID)})


def _qwen_image_processor(patch_size: int = 4, merge_size: int = 2, cls=None):
    """Qwen2-VL's PIL image processor (also Qwen3-VL's and the Omni thinkers'), tiny: patches of 4 px."""
    cls = cls or transformers.Qwen2VLImageProcessorPil
    return cls(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
               size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})


def _qwen_block(merge_size: int = 2, open_id: int = WRAP_OPEN_ID, close_id: int = WRAP_CLOSE_ID):
    """``<|vision_start|>`` + ``t*h*w / merge**2`` image tokens + ``<|vision_end|>`` (Qwen-VL processors)."""

    def block(inp: dict, b: int) -> list[int]:
        n = int(inp["image_grid_thw"][b].prod()) // merge_size**2
        return [open_id] + [IMAGE_ID] * n + [close_id]

    return block


def _spec_qwen3_vl(moe: bool) -> FamilySpec:
    # deepstack: the features of vision layer 0 are also added to the hidden states of text layer 0
    vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    text = dict(_SMALL_TEXT, head_dim=8,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4})
    if moe:
        text.update(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    config_cls = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
    config = config_cls(text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=IMAGE_ID - 1,
                        vision_start_token_id=WRAP_OPEN_ID, vision_end_token_id=WRAP_CLOSE_ID)
    return FamilySpec(config, _qwen_image_processor(), FREE_SIZES, _qwen_block(),
                      token_inputs={"mm_token_type_ids": lambda ids, _: _mm_token_type_ids(ids, IMAGE_ID)})


def _spec_glm4v(family: str) -> FamilySpec:
    """GLM-4.1V / GLM-4.5V (MoE) / GLM-4.6V: Qwen-VL geometry, ``<|begin_of_image|>`` + tokens + ``<|end_of_image|>``."""
    # image_size 32 / patch 4: the learned 8x8 position table is interpolated to each image's grid
    vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, image_size=32,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    text = dict(_SMALL_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4})
    if family == "glm4v_moe":
        text.update(moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                    first_k_dense_replace=1, head_dim=16)  # partial_rotary_factor 0.5: 8 rotary dims
    config_cls = {"glm4v": transformers.Glm4vConfig, "glm4v_moe": transformers.Glm4vMoeConfig,
                  "glm46v": transformers.Glm46VConfig}[family]
    if family == "glm46v":  # its sub-configs are GLM-4.1V's, named by model_type
        text, vision = dict(text, model_type="glm4v_text"), dict(vision, model_type="glm4v_vision")
    config = config_cls(text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=IMAGE_ID - 1,
                        image_start_token_id=WRAP_OPEN_ID, image_end_token_id=WRAP_CLOSE_ID,
                        video_start_token_id=WRAP_OPEN_ID - 2, video_end_token_id=WRAP_CLOSE_ID - 2)
    proc_cls = transformers.Glm46VImageProcessorPil if family == "glm46v" else transformers.Glm4vImageProcessorPil
    return FamilySpec(config, _qwen_image_processor(cls=proc_cls), FREE_SIZES, _qwen_block(),
                      token_inputs={"mm_token_type_ids": lambda ids, _: _mm_token_type_ids(ids, IMAGE_ID)})


def _spec_glm_ocr() -> FamilySpec:
    """GLM-OCR: GLM-4.1V's geometry (2x2 patch merge, 3-D positions) without a learned position table."""
    vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    text = dict(_SMALL_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4})
    config = transformers.GlmOcrConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_ID,
                                       video_token_id=IMAGE_ID - 1, image_start_token_id=WRAP_OPEN_ID,
                                       image_end_token_id=WRAP_CLOSE_ID, video_start_token_id=WRAP_OPEN_ID - 2,
                                       video_end_token_id=WRAP_CLOSE_ID - 2)
    return FamilySpec(config, _qwen_image_processor(cls=transformers.Glm4vImageProcessorPil), FREE_SIZES,
                      _qwen_block(), token_inputs={"mm_token_type_ids": lambda ids, _: _mm_token_type_ids(ids, IMAGE_ID)})


def _spec_video_llama_3() -> FamilySpec:
    # SigLIP-style tower with 2-D rope; a Qwen2 text model (1-D positions)
    vision = dict(**_SMALL_VISION, patch_size=4)
    config = transformers.VideoLlama3Config(text_config=dict(_SMALL_TEXT, model_type="qwen2"), vision_config=vision,
                                            image_token_id=IMAGE_ID, video_token_id=IMAGE_ID - 1)
    # merge_size 2 (images default to 1): the layout must read the per-image image_merge_sizes
    proc = transformers.VideoLlama3ImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=1,
                                                     size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})

    def block(inp: dict, b: int) -> list[int]:
        m = int(inp["image_merge_sizes"][b])
        return [IMAGE_ID] * (int(inp["image_grid_thw"][b].prod()) // m**2)

    return FamilySpec(config, proc, FREE_SIZES, block)


def _spec_paddleocr_vl() -> FamilySpec:
    # SigLIP-style tower (learned 8x8 position table, interpolated) + 2x2 merge; Ernie-4.5 text, 3-D positions
    vision = dict(**_SMALL_VISION, image_size=32, patch_size=4, spatial_merge_size=2)
    text = dict(_SMALL_TEXT, head_dim=8,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4})
    config = transformers.PaddleOCRVLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_ID,
                                            video_token_id=IMAGE_ID - 1, vision_start_token_id=WRAP_OPEN_ID,
                                            vision_end_token_id=WRAP_CLOSE_ID)
    proc = transformers.PaddleOCRVLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=1,
                                                     size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    return FamilySpec(config, proc, FREE_SIZES, _qwen_block(),
                      token_inputs={"mm_token_type_ids": lambda ids, _: _mm_token_type_ids(ids, IMAGE_ID)})


def _spec_ernie4_5_vl_moe() -> FamilySpec:
    # Qwen-VL-style tower, 2x2 merge in the resampler; MoE text with separate vision experts, 3-D positions
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                  temporal_merge_size=2)
    text = dict(_SMALL_TEXT, moe_intermediate_size=[16, 16], moe_k=2, moe_num_experts=4, moe_num_shared_experts=1,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4})
    config = transformers.Ernie4_5_VLMoeConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=IMAGE_ID - 1,
        image_start_token_id=WRAP_OPEN_ID, image_end_token_id=WRAP_CLOSE_ID,
        video_start_token_id=WRAP_OPEN_ID - 2, video_end_token_id=WRAP_CLOSE_ID - 2,
    )
    proc = transformers.Ernie4_5_VLMoeImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=1,
                                                        size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})

    def moe_types(ids: list[int], _: int) -> list[int]:
        # the processor's moe_mm_token_type_ids: image tokens AND their start/end tokens go to the vision experts
        return [1 if t in (IMAGE_ID, WRAP_OPEN_ID, WRAP_CLOSE_ID) else 0 for t in ids]

    return FamilySpec(config, proc, FREE_SIZES, _qwen_block(),
                      token_inputs={"mm_token_type_ids": lambda ids, _: _mm_token_type_ids(ids, IMAGE_ID),
                                    "moe_mm_token_type_ids": moe_types})


def _spec_qwen2_5_omni_thinker() -> FamilySpec:
    """Qwen2.5-Omni's thinker (the text-generating part): a Qwen2.5-VL tower + an audio encoder (unused here)."""
    vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    audio = dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
                 output_dim=32, n_window=4, max_source_positions=32)
    text = dict(_SMALL_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4})
    config = transformers.Qwen2_5OmniThinkerConfig(
        text_config=text, vision_config=vision, audio_config=audio, image_token_index=IMAGE_ID,
        video_token_index=IMAGE_ID - 1, audio_token_index=IMAGE_ID - 2, audio_start_token_id=WRAP_OPEN_ID - 2,
        audio_end_token_id=WRAP_CLOSE_ID - 2,
    )
    # its 3-D positions find images by the token after <|vision_start|>, an id the thinker config does not declare
    config.vision_start_token_id = WRAP_OPEN_ID
    return FamilySpec(config, _qwen_image_processor(), FREE_SIZES, _qwen_block())


def _spec_qwen3_omni_moe_thinker() -> FamilySpec:
    """Qwen3-Omni-MoE's thinker: a Qwen3-VL tower (deepstack), MoE text, an audio encoder (unused here)."""
    vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    audio = dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
                 output_dim=32, n_window=4, max_source_positions=32, downsample_hidden_size=8)
    text = dict(_SMALL_TEXT, head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4})
    config = transformers.Qwen3OmniMoeThinkerConfig(
        text_config=text, vision_config=vision, audio_config=audio, image_token_id=IMAGE_ID,
        video_token_id=IMAGE_ID - 1, audio_token_id=IMAGE_ID - 2, audio_start_token_id=WRAP_OPEN_ID - 2,
    )
    config.vision_start_token_id = WRAP_OPEN_ID  # read by its 3-D positions, not declared by the config
    return FamilySpec(config, _qwen_image_processor(), FREE_SIZES, _qwen_block())


# Ovis2's visual indicators <IMG_START>, <IMG_GRID>, <IMG_COL>, <IMG_ROW>, <IMG_END>
OVIS2_INDICATORS = (WRAP_OPEN_ID, 241, 242, 243, WRAP_CLOSE_ID)


def _spec_ovis2() -> FamilySpec:
    # 32 px views, patch 4 -> 8x8 patches, hidden_stride 2 -> 4x4 = 16 tokens per view; Qwen2 text
    vision = dict(**_SMALL_VISION, image_size=32, patch_size=4, hidden_stride=2, vocab_size=64)
    config = transformers.Ovis2Config(vision_config=vision, text_config=dict(_SMALL_TEXT, model_type="qwen2"),
                                      image_token_id=IMAGE_ID, visual_indicator_token_ids=list(OVIS2_INDICATORS),
                                      vocab_size=VOCAB, hidden_size=32)
    proc = transformers.Ovis2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True,
                                               min_patches=1, max_patches=6)
    start, grid, col, row, end = OVIS2_INDICATORS
    seq_len = 16

    def block(inp: dict, b: int) -> list[int]:
        # Ovis2Processor.replace_image_token: global view, then tiles separated by <IMG_COL> / <IMG_ROW>
        rows, cols = (int(v) for v in inp["grids"][b])
        ids = [start] + [IMAGE_ID] * seq_len + [grid]
        if rows * cols > 1:
            for r in range(rows):
                for c in range(cols):
                    ids += [IMAGE_ID] * seq_len + ([col] if c < cols - 1 else [])
                ids += [row] if r < rows - 1 else []
        return ids + [end]

    return FamilySpec(config, proc, FREE_SIZES, block, drop_keys=("grids",))


def _spec_paligemma() -> FamilySpec:
    vision = transformers.SiglipVisionConfig(**_SMALL_VISION, image_size=28, patch_size=4)
    text = transformers.GemmaConfig(**_SMALL_TEXT, head_dim=8)
    config = transformers.PaliGemmaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_ID, projection_dim=32, hidden_size=32
    )
    proc = transformers.SiglipImageProcessorPil(size={"height": 28, "width": 28})
    n = (28 // 4) ** 2

    def token_type_ids(ids: list[int], n_real: int) -> list[int]:
        # PaliGemmaProcessor: 0 for the prefix (image + prompt, attended bidirectionally),
        # 1 for the suffix; here the answer is the suffix.
        return [0] * (n_real - N_ANSWER) + [1] * N_ANSWER

    return FamilySpec(config, proc, SQUARE_SIZES, lambda inp, b: [IMAGE_ID] * n, image_first=True,
                      token_inputs={"token_type_ids": token_type_ids})


def _spec_gemma3() -> FamilySpec:
    vision = transformers.SiglipVisionConfig(**_SMALL_VISION, image_size=32, patch_size=4)
    text = transformers.Gemma3TextConfig(**_SMALL_TEXT, head_dim=8, sliding_window=16)
    # 8x8 patches average-pooled to 4x4 = 16 tokens per image
    config = transformers.Gemma3Config(
        vision_config=vision, text_config=text, mm_tokens_per_image=16,
        boi_token_index=WRAP_OPEN_ID, eoi_token_index=WRAP_CLOSE_ID, image_token_index=IMAGE_ID,
    )
    proc = transformers.Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return FamilySpec(
        config, proc, SQUARE_SIZES,
        lambda inp, b: [NEWLINE_ID, WRAP_OPEN_ID] + [IMAGE_ID] * 16 + [WRAP_CLOSE_ID, NEWLINE_ID],
        drop_keys=("num_crops",),
        # Gemma3Processor: token_type_ids = 1 on image tokens (bidirectional image block)
        token_inputs={"token_type_ids": lambda ids, _: _mm_token_type_ids(ids, IMAGE_ID)},
    )


def _spec_deepseek_vl() -> FamilySpec:
    vision = dict(model_type="siglip_vision_model", **_SMALL_VISION, image_size=28, patch_size=4)
    config = transformers.DeepseekVLConfig(text_config=_llama().to_dict(), vision_config=vision,
                                           image_token_id=IMAGE_ID)
    proc = transformers.DeepseekVLImageProcessorPil(size={"height": 28, "width": 28})
    n = (28 // 4) ** 2
    return FamilySpec(config, proc, SQUARE_SIZES, lambda inp, b: [IMAGE_ID] * n)


def _spec_janus() -> FamilySpec:
    """Janus(-Pro) understanding path: one SigLIP-style 7x7 grid (no CLS) letterboxed like DeepSeek-VL."""
    vision = dict(**_SMALL_VISION, image_size=28, patch_size=4, projection_dim=32, num_image_tokens=49)
    # the VQ tower only generates images; it is built but never run. base_channels 32: it has GroupNorm(32)
    vq = dict(embed_dim=8, num_embeddings=16, latent_channels=8, base_channels=32, channel_multiplier=[1, 1],
              projection_dim=16, image_token_embed_dim=32)
    config = transformers.JanusConfig(text_config=_llama().to_dict(), vision_config=vision, vq_config=vq,
                                      image_token_id=IMAGE_ID)
    proc = transformers.JanusImageProcessorPil(size={"height": 28, "width": 28})
    # JanusProcessor: <begin_of_image> + num_image_tokens x <image_placeholder> + <end_of_image>
    return FamilySpec(config, proc, SQUARE_SIZES, lambda inp, b: [WRAP_OPEN_ID] + [IMAGE_ID] * 49 + [WRAP_CLOSE_ID])


def _spec_idefics3(family: str) -> FamilySpec:
    vision = dict(**_SMALL_VISION, image_size=32, patch_size=4)
    if family == "idefics3":
        config_cls, proc_cls = transformers.Idefics3Config, transformers.Idefics3ImageProcessorPil
    else:
        config_cls, proc_cls = transformers.SmolVLMConfig, transformers.SmolVLMImageProcessorPil
    config = config_cls(vision_config=vision, text_config=_llama().to_dict(), image_token_id=IMAGE_ID,
                        scale_factor=2)
    # longest side resized to 64 then split into 32x32 tiles (+ the global 32x32 view)
    proc = proc_cls(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True,
                    return_row_col_info=True)
    seq_len = (32 // 4) ** 2 // 4  # image_seq_len = (P*P) / scale_factor**2

    def block(inp: dict, b: int) -> list[int]:
        rows, cols = int(inp["rows"][b][0]), int(inp["cols"][b][0])
        ids: list[int] = []
        if rows == 0 and cols == 0:
            return [WRAP_OPEN_ID, WRAP_CLOSE_ID] + [IMAGE_ID] * seq_len + [WRAP_OPEN_ID]
        for r in range(rows):
            for c in range(cols):
                # <fake_token_around_image><row_r_col_c> + image tokens
                ids += [WRAP_OPEN_ID, ROW_COL_START + r * 6 + c] + [IMAGE_ID] * seq_len
            ids.append(NEWLINE_ID)
        # "\n<fake_token_around_image><global-img>" + image tokens + "<fake_token_around_image>"
        ids += [NEWLINE_ID, WRAP_OPEN_ID, WRAP_CLOSE_ID] + [IMAGE_ID] * seq_len + [WRAP_OPEN_ID]
        return ids

    return FamilySpec(config, proc, FREE_SIZES, block, drop_keys=("rows", "cols"))


def _spec_internvl() -> FamilySpec:
    vision = transformers.InternVLVisionConfig(**_SMALL_VISION, image_size=[32, 32], patch_size=[4, 4])
    text = transformers.Qwen2Config(**_SMALL_TEXT)
    config = transformers.InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                                         image_seq_length=16, downsample_ratio=0.5)
    proc = transformers.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True,
                                                  min_patches=1, max_patches=6)

    def block(inp: dict, b: int) -> list[int]:
        # InternVLProcessor: <img> + <IMG_CONTEXT> * image_seq_length * num_patches + </img>
        return [WRAP_OPEN_ID] + [IMAGE_ID] * (16 * int(inp["num_patches"][b])) + [WRAP_CLOSE_ID]

    return FamilySpec(config, proc, FREE_SIZES, block, drop_keys=("num_patches",))


def _pixtral_rows(h: int, w: int) -> list[int]:
    """PixtralProcessor's image block: ``([IMG] * w + [IMG_BREAK])`` per row, the last break -> ``[IMG_END]``."""
    ids: list[int] = []
    for _ in range(h):
        ids += [IMAGE_ID] * w + [BREAK_ID]
    ids[-1] = END_ID
    return ids


def _pixtral_grid_spec(config, longest_edge: int, stride: int, row_breaks: bool = True) -> FamilySpec:
    """A Pixtral-tower family: the processor resizes to multiples of ``stride`` (patch size x merge), one token per
    ``stride`` px cell, rows ended by [IMG_BREAK] / [IMG_END] or (``row_breaks=False``) one run of image tokens."""
    proc = transformers.PixtralImageProcessorPil(size={"longest_edge": longest_edge},
                                                 patch_size={"height": stride, "width": stride})

    def block(inp: dict, b: int) -> list[int]:
        h, w = (int(v) // stride for v in inp["image_sizes"][b])
        return _pixtral_rows(h, w) if row_breaks else [IMAGE_ID] * (h * w)

    return FamilySpec(config, proc, FREE_SIZES, block)


def _spec_mistral3() -> FamilySpec:
    vision = transformers.PixtralVisionConfig(**_SMALL_VISION, image_size=64, patch_size=4, head_dim=8)
    text = transformers.MistralConfig(**_SMALL_TEXT, head_dim=8)
    config = transformers.Mistral3Config(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                                         spatial_merge_size=2, vision_feature_layer=-1)
    # Mistral3's processor resizes to multiples of patch_size * spatial_merge_size
    return _pixtral_grid_spec(config, longest_edge=64, stride=8)


def _spec_llava_pixtral() -> FamilySpec:
    """Pixtral-12B's layout: a LLaVA config (model_type "llava") with a Pixtral tower, one token per 4 px patch."""
    vision = transformers.PixtralVisionConfig(**_SMALL_VISION, image_size=64, patch_size=4, head_dim=8)
    # a Pixtral tower has no CLS: "full" keeps every patch (the checkpoints' setting)
    config = transformers.LlavaConfig(vision_config=vision, text_config=_llama(), image_token_id=IMAGE_ID,
                                      vision_feature_layer=-1, vision_feature_select_strategy="full")
    return _pixtral_grid_spec(config, longest_edge=32, stride=4)


def _spec_lighton_ocr() -> FamilySpec:
    """LightOnOCR: Mistral3's Pixtral tower + 2x2 patch merger, a Qwen3 text model, no break tokens."""
    vision = dict(model_type="pixtral", **_SMALL_VISION, image_size=64, patch_size=4, head_dim=8)
    text = dict(_SMALL_TEXT, model_type="qwen3", head_dim=8)
    config = transformers.LightOnOcrConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                                           spatial_merge_size=2)
    # resized to multiples of patch_size * spatial_merge_size, as for Mistral3; LightOnOcrProcessor's
    # replace_image_token writes (H // 8) * (W // 8) image tokens as one run
    return _pixtral_grid_spec(config, longest_edge=64, stride=8, row_breaks=False)


def _spec_qianfan_ocr() -> FamilySpec:
    """Qianfan-OCR: InternVL's tiles + thumbnail (GotOcr2 tiling, 2x2 pixel shuffle) with a Qwen3 text model."""
    vision = transformers.QianfanOCRVisionConfig(**_SMALL_VISION, image_size=[32, 32], patch_size=[4, 4],
                                                 drop_path_rate=0.0)
    text = dict(_SMALL_TEXT, model_type="qwen3", head_dim=8)
    config = transformers.QianfanOCRConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                                           image_seq_length=16, downsample_ratio=0.5)
    proc = transformers.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True,
                                                  min_patches=1, max_patches=6)

    def block(inp: dict, b: int) -> list[int]:
        # QianfanOCRProcessor (InternVL's): <img> + <IMG_CONTEXT> * image_seq_length * num_patches + </img>
        return [WRAP_OPEN_ID] + [IMAGE_ID] * (16 * int(inp["num_patches"][b])) + [WRAP_CLOSE_ID]

    return FamilySpec(config, proc, FREE_SIZES, block, drop_keys=("num_patches",))


def _spec_granite_docling(fine: bool = False) -> FamilySpec:
    """Granite-Docling: 32 px tiles (8x8 patches) pixel-shuffled by 2 to 4x4 tokens, Idefics3's prompt layout.

    ``fine``: the processor's ``fine_route=True`` (``tile_fine_mask``): shuffled by 1, 8x8 tokens per tile.
    """
    vision = dict(**_SMALL_VISION, image_size=32, patch_size=4, out_hidden_size=32, scale_factor=2,
                  deepstack_visual_indexes=[0], use_fine_route=fine)
    config = transformers.GraniteDoclingConfig(vision_config=vision, text_config=dict(_SMALL_TEXT),
                                               image_token_id=IMAGE_ID, pad_token_id=PAD_ID)
    proc = transformers.GraniteDoclingImageProcessorPil(size={"height": 32, "width": 32}, max_patches=6)
    seq_len = 64 if fine else 16

    def block(inp: dict, b: int) -> list[int]:
        # GraniteDoclingProcessor.replace_image_token: <fake><row_i_col_j> + tokens per tile, "\n" per row, then
        # "\n<fake><global-img>" + tokens + <fake> when the page has more than one tile
        rows, cols = int(inp["rows"][b][0]), int(inp["cols"][b][0])
        ids: list[int] = []
        for r in range(rows):
            for c in range(cols):
                ids += [WRAP_OPEN_ID, ROW_COL_START + r * 6 + c] + [IMAGE_ID] * seq_len
            ids.append(NEWLINE_ID)
        if rows * cols > 1:
            ids += [NEWLINE_ID, WRAP_OPEN_ID, WRAP_CLOSE_ID] + [IMAGE_ID] * seq_len + [WRAP_OPEN_ID]
        return ids

    return FamilySpec(config, proc, FREE_SIZES, block, drop_keys=("rows", "cols"),
                      processor_kwargs={"fine_route": True} if fine else {})


def _spec_vipllava() -> FamilySpec:
    vision = transformers.CLIPVisionConfig(**_SMALL_VISION, image_size=28, patch_size=4, projection_dim=32)
    # features of several vision layers (hidden_states 0..2 of the 2-layer tower), CLS always dropped
    config = transformers.VipLlavaConfig(vision_config=vision, text_config=_llama(), image_token_index=IMAGE_ID,
                                         vision_feature_layer=[-1, -2, 0])
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    n = (28 // 4) ** 2
    return FamilySpec(config, proc, SQUARE_SIZES, lambda inp, b: [IMAGE_ID] * n)


def _spec_video_llava() -> FamilySpec:
    vision = transformers.CLIPVisionConfig(**_SMALL_VISION, image_size=28, patch_size=4, projection_dim=32)
    config = transformers.VideoLlavaConfig(
        vision_config=vision, text_config=_llama(), image_token_index=IMAGE_ID, video_token_index=IMAGE_ID - 1,
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=49,
    )
    proc = transformers.VideoLlavaImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    n = (28 // 4) ** 2
    return FamilySpec(config, proc, SQUARE_SIZES, lambda inp, b: [IMAGE_ID] * n,
                      processor_kwargs={"return_legacy_image_output": False})  # pixel_values, not _images


def _spec_llava_next_video() -> FamilySpec:
    vision = transformers.CLIPVisionConfig(**_SMALL_VISION, image_size=28, patch_size=4, projection_dim=32)
    pinpoints = [[28, 56], [56, 28], [56, 56]]
    config = transformers.LlavaNextVideoConfig(
        vision_config=vision, text_config=_llama(), image_token_index=IMAGE_ID, video_token_index=IMAGE_ID - 1,
        image_grid_pinpoints=pinpoints, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    # LlavaNextVideoProcessor uses LLaVA-NeXT's image processor for images
    proc = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints
    )

    def block(inp: dict, b: int) -> list[int]:
        hw = tuple(int(v) for v in inp["image_sizes"][b])
        return [IMAGE_ID] * _llava_next_count(config, hw)

    return FamilySpec(config, proc, FREE_SIZES, block)


def _spec_llava_onevision() -> FamilySpec:
    vision = transformers.SiglipVisionConfig(**_SMALL_VISION, image_size=28, patch_size=4)
    pinpoints = [[28, 56], [56, 28], [56, 56]]
    # anyres_max_1: the un-padded high-res grid (> 1.1**2 crops' worth of features) is resized down,
    # so the test sees LLaVA-OneVision's cap, not just LLaVA-NeXT's un-padding
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=transformers.Qwen2Config(**_SMALL_TEXT), image_token_index=IMAGE_ID,
        video_token_index=IMAGE_ID - 1, image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1",
    )
    proc = transformers.LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28},
                                                         image_grid_pinpoints=pinpoints)
    p = 28 // 4

    def block(inp: dict, b: int) -> list[int]:
        # LlavaOnevisionProcessor._get_number_of_features: base + un-padded grid capped at
        # anyres_max_N crops (both sides divided by ratio when ratio > 1.1) + one newline per row
        hw = tuple(int(v) for v in inp["image_sizes"][b])
        h, w = _llava_next_unpadded(config, hw)
        ratio = math.sqrt(h * w / (1 * p * p))
        if ratio > 1.1:
            h, w = int(h // ratio), int(w // ratio)
        return [IMAGE_ID] * (p * p + h * w + h)

    return FamilySpec(config, proc, FREE_SIZES, block, drop_keys=("batch_num_images",))


def _spec_aya_vision() -> FamilySpec:
    vision = transformers.SiglipVisionConfig(**_SMALL_VISION, image_size=32, patch_size=4)
    text = transformers.Cohere2Config(**_SMALL_TEXT, sliding_window=16)
    config = transformers.AyaVisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                                          downsample_factor=2, vision_feature_layer=-1,
                                          vision_feature_select_strategy="full")
    proc = transformers.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True,
                                                  min_patches=1, max_patches=6)
    per_tile = (32 // 4 // 2) ** 2

    def block(inp: dict, b: int) -> list[int]:
        # AyaVisionProcessor: <start_of_img> (TILE_i + patches) per tile, TILE_GLOBAL + patches, <end_of_img>
        n = int(inp["num_patches"][b])
        ids = [WRAP_OPEN_ID]
        for i in range(1, n):  # one view only (n == 1): no tiles
            ids += [ROW_COL_START + i] + [IMAGE_ID] * per_tile
        ids += [BREAK_ID] + [IMAGE_ID] * per_tile + [WRAP_CLOSE_ID]
        return ids

    return FamilySpec(config, proc, FREE_SIZES, block, drop_keys=("num_patches",))


def _spec_shieldgemma2() -> FamilySpec:
    spec = _spec_gemma3()
    gemma = spec.config
    spec.config = transformers.ShieldGemma2Config(
        vision_config=gemma.vision_config, text_config=gemma.text_config, mm_tokens_per_image=16,
        boi_token_index=WRAP_OPEN_ID, eoi_token_index=WRAP_CLOSE_ID, image_token_index=IMAGE_ID,
    )
    return spec


# ---- Qwen-VL-style merged grids of issue #15 (image_grid_thw + spatial merge) --------------------------------------
def _qwen2_5_vision(**overrides) -> dict:
    """A tiny Qwen2.5-VL vision tower: 4 px patches, 2x2 merge, 16 px windows (the reordering the layout must see undone)."""
    return dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1], **overrides)


def _spec_exaone4_5() -> FamilySpec:
    """EXAONE-4.5: a Qwen2.5-VL tower (GQA in its attention) and an EXAONE-4 LM with 1-D positions."""
    # sliding_window_pattern 2: layer 0 sliding-window, layer 1 global attention
    text = dict(_SMALL_TEXT, model_type="exaone4", sliding_window=16, sliding_window_pattern=2)
    config = transformers.Exaone4_5_Config(text_config=text, vision_config=_qwen2_5_vision(num_key_value_heads=2),
                                           image_token_id=IMAGE_ID, video_token_id=IMAGE_ID - 1)
    return FamilySpec(config, _qwen_image_processor(), FREE_SIZES, _qwen_block())


def _spec_hyperclovax_vision_v2() -> FamilySpec:
    """HyperCLOVAX-SEED-Think: a Qwen2.5-VL tower, a linear projector and a Granite-style LM with 1-D positions."""
    config = transformers.HyperCLOVAXVisionV2Config(
        text_config=dict(_SMALL_TEXT, model_type="hyperclovax"),
        vision_config=_qwen2_5_vision(model_type="qwen2_5_vl_vision"),
        image_token_id=IMAGE_ID, video_token_id=IMAGE_ID - 1,
    )
    return FamilySpec(config, _qwen_image_processor(), FREE_SIZES, _qwen_block())


def _spec_cosmos3_omni() -> FamilySpec:
    """Cosmos3 (reasoner): Qwen3-VL's architecture under its own model type."""
    spec = _spec_qwen3_vl(moe=False)
    qwen = spec.config
    spec.config = transformers.Cosmos3OmniConfig(
        text_config=qwen.text_config.to_dict(), vision_config=qwen.vision_config.to_dict(), image_token_id=IMAGE_ID,
        video_token_id=IMAGE_ID - 1, vision_start_token_id=WRAP_OPEN_ID, vision_end_token_id=WRAP_CLOSE_ID,
    )
    return spec


def _spec_glmga() -> FamilySpec:
    """GLM-GA: GLM-4.6V's model (Glm46VForConditionalGeneration) with its own config and image processor."""
    spec = _spec_glm4v("glm46v")
    glm = spec.config
    spec.config = transformers.GlmgaConfig(
        text_config=glm.text_config.to_dict(), vision_config=glm.vision_config.to_dict(), image_token_id=IMAGE_ID,
        video_token_id=IMAGE_ID - 1, image_start_token_id=WRAP_OPEN_ID, image_end_token_id=WRAP_CLOSE_ID,
        video_start_token_id=WRAP_OPEN_ID - 2, video_end_token_id=WRAP_CLOSE_ID - 2,
    )
    spec.image_processor = _qwen_image_processor(cls=transformers.GlmgaImageProcessorPil)
    return spec


def _spec_cohere_compass() -> FamilySpec:
    """Cohere Compass: a Qwen3-VL tower (deepstack) and a Cohere2 LM with 3-D positions."""
    vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    # per-layer-type rope: m-rope on the sliding-window layer, none (NoPE) on the global one, as Cohere2 does
    mrope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4}
    text = dict(_SMALL_TEXT, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                rope_parameters={"sliding_attention": mrope, "full_attention": None})
    config = transformers.CohereCompassConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_ID,
                                              video_token_id=IMAGE_ID - 1, vision_start_token_id=WRAP_OPEN_ID,
                                              vision_end_token_id=WRAP_CLOSE_ID)
    return FamilySpec(config, _qwen_image_processor(cls=transformers.CohereCompassImageProcessorPil), FREE_SIZES,
                      _qwen_block(),
                      token_inputs={"mm_token_type_ids": lambda ids, _: _mm_token_type_ids(ids, IMAGE_ID)})


def _spec_cosmos3_edge() -> FamilySpec:
    """Cosmos3-Edge: a SigLIP2 tower over Qwen-ordered (block-major) patches, a 2x2 merging projector, a Llama LM
    with 3-D positions."""
    # num_patches 64: the learned 8x8 position table is interpolated to each image's patch grid
    vision = dict(**_SMALL_VISION, patch_size=4, num_patches=64, spatial_merge_size=2)
    text = dict(_SMALL_TEXT, head_dim=8,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4})
    config = transformers.Cosmos3EdgeConfig(text_config=text, vision_config=vision, projector_hidden_size=64,
                                            image_token_id=IMAGE_ID, video_token_id=IMAGE_ID - 1,
                                            vision_start_token_id=WRAP_OPEN_ID, vision_end_token_id=WRAP_CLOSE_ID)
    proc = transformers.Cosmos3EdgeImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=1,
                                                     size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    return FamilySpec(config, proc, FREE_SIZES, _qwen_block(),
                      token_inputs={"mm_token_type_ids": lambda ids, _: _mm_token_type_ids(ids, IMAGE_ID)})


def _spec_hunyuan_vl() -> FamilySpec:
    """HunYuan-VL: row-major patches merged by a stride-2 convolution; each merged row ends with a newline feature and
    the image is wrapped in begin / end features, all image tokens; 4-axis m-rope (text, width, height, image)."""
    # max_image_size 32 / patch 4: the learned 8x8 position table is interpolated to each image's patch grid
    vision = dict(**_SMALL_VISION, patch_size=4, spatial_merge_size=2, max_image_size=32, text_hidden_size=32,
                  out_hidden_size=32)
    text = dict(_SMALL_TEXT, head_dim=8,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 1, 1], "rope_theta": 1e4})
    config = transformers.HunYuanVLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_ID,
                                          im_start_id=WRAP_OPEN_ID, im_end_id=WRAP_CLOSE_ID, im_newline_id=BREAK_ID)
    proc = transformers.HunYuanVLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=1,
                                                   size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})

    def block(inp: dict, b: int) -> list[int]:
        # HunYuanVLProcessor (cat_extra_token=True): rows x (cols + newline) + begin + end, inside <img> ... </img>
        _, h, w = (int(v) for v in inp["image_grid_thw"][b])
        return [WRAP_OPEN_ID] + [IMAGE_ID] * ((h // 2) * (w // 2 + 1) + 2) + [WRAP_CLOSE_ID]

    return FamilySpec(config, proc, FREE_SIZES, block,
                      token_inputs={"mm_token_type_ids": lambda ids, _: _mm_token_type_ids(ids, IMAGE_ID)})


_SPECS: dict[str, Callable[[], FamilySpec]] = {
    "llava": _spec_llava,
    "llava_next": _spec_llava_next,
    "qwen2_vl": lambda: _spec_qwen("qwen2_vl"),
    "qwen2_5_vl": lambda: _spec_qwen("qwen2_5_vl"),
    "paligemma": _spec_paligemma,
    "gemma3": _spec_gemma3,
    "deepseek_vl": _spec_deepseek_vl,
    "idefics3": lambda: _spec_idefics3("idefics3"),
    "smolvlm": lambda: _spec_idefics3("smolvlm"),
    "internvl": _spec_internvl,
    "mistral3": _spec_mistral3,
    "vipllava": _spec_vipllava,
    "video_llava": _spec_video_llava,
    "llava_next_video": _spec_llava_next_video,
    "llava_onevision": _spec_llava_onevision,
    "aya_vision": _spec_aya_vision,
    "shieldgemma2": _spec_shieldgemma2,
    "qwen3_vl": lambda: _spec_qwen3_vl(moe=False),
    "qwen3_vl_moe": lambda: _spec_qwen3_vl(moe=True),
    "glm4v": lambda: _spec_glm4v("glm4v"),
    "glm4v_moe": lambda: _spec_glm4v("glm4v_moe"),
    "glm46v": lambda: _spec_glm4v("glm46v"),
    "video_llama_3": _spec_video_llama_3,
    "paddleocr_vl": _spec_paddleocr_vl,
    "ernie4_5_vl_moe": _spec_ernie4_5_vl_moe,
    "qwen2_5_omni_thinker": _spec_qwen2_5_omni_thinker,
    "qwen3_omni_moe_thinker": _spec_qwen3_omni_moe_thinker,
    "ovis2": _spec_ovis2,
    "glm_ocr": _spec_glm_ocr,
    "janus": _spec_janus,
    # issue #15: Qwen-VL-style merged grids
    "exaone4_5": _spec_exaone4_5,
    "hyperclovax_vision_v2": _spec_hyperclovax_vision_v2,
    "cosmos3_omni": _spec_cosmos3_omni,
    "glmga": _spec_glmga,
    "cohere_compass": _spec_cohere_compass,
    "cosmos3_edge": _spec_cosmos3_edge,
    "hunyuan_vl": _spec_hunyuan_vl,
    "llava_pixtral": _spec_llava_pixtral,
    "lighton_ocr": _spec_lighton_ocr,
    "qianfan_ocr": _spec_qianfan_ocr,
    "granite_docling": _spec_granite_docling,
    # not in FAMILIES (one geometry test in test_image_layout.py): the fine connector path
    "granite_docling_fine": lambda: _spec_granite_docling(fine=True),
}


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """The tiny config of ``family`` (no model built)."""
    return _SPECS[family]().config


def image_sizes(family: str) -> list[tuple[int, int]]:
    """Original (H, W) of the two default images of ``family`` (the canvas in these tests)."""
    return list(_SPECS[family]().image_sizes)


def image_processor(family: str):
    """The family's tiny PIL image processor (the one ``build_inputs`` uses)."""
    return _SPECS[family]().image_processor


def make_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """Random RGB images of the given (H, W) sizes."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def build_inputs(
    family: str,
    images: list[Image.Image] | None = None,
    seed: int = 0,
    padding_side: str = "left",
) -> dict[str, torch.Tensor]:
    """The padded processor-like batch of ``family`` for ``images`` (default: two random images).

    ``images`` may hold one list of images per example (several images per prompt): their blocks follow one
    another, one text token apart, the per-image inputs hold one row per image, and ``num_images`` is added.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    spec = _SPECS[family]()
    if images is None:
        images = make_images(spec.image_sizes, seed)
    several = isinstance(images[0], (list, tuple))
    per_example = [list(ims) for ims in images] if several else [[im] for im in images]
    image_inputs = image_inputs_of(family, [im for ims in per_example for im in ims], keep_all=True)
    rng = np.random.default_rng(seed + 1)

    def text(n: int) -> list[int]:
        return rng.integers(3, ROW_COL_START, n).tolist()  # never a special id

    rows = []
    for b in range(len(images)):
        first = sum(len(ims) for ims in per_example[:b])  # flat index of the example's first image
        block = []
        for i in range(len(per_example[b])):
            block += (text(1) if i else []) + spec.image_block(image_inputs, first + i)
        prefix = text(2 + 3 * b)  # different lengths -> padding
        tail = text(2) + text(N_ANSWER)
        if spec.image_first:
            rows.append(block + [BOS_ID] + prefix + tail)
        else:
            rows.append([BOS_ID] + prefix + block + tail)

    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    extra = {name: torch.zeros((len(rows), length), dtype=torch.long) for name in spec.token_inputs}
    for b, ids in enumerate(rows):
        sl = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        input_ids[b, sl] = torch.tensor(ids)
        attention_mask[b, sl] = 1
        for name, fn in spec.token_inputs.items():
            extra[name][b, sl] = torch.tensor(fn(ids, len(ids)))

    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
    for key, value in image_inputs.items():
        if key not in spec.drop_keys:
            inputs[key] = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if several:
        inputs["num_images"] = torch.tensor([len(ims) for ims in per_example])
    return inputs


def image_inputs_of(family: str, images: list[Image.Image], keep_all: bool = False) -> dict:
    """The family's image-processor output for a flat list of images (the keys the model does not take dropped,
    unless ``keep_all``)."""
    spec = _SPECS[family]()
    # Idefics3/SmolVLM processors take one list of images per example
    nested = family in ("idefics3", "smolvlm", "granite_docling", "granite_docling_fine")
    out = dict(spec.image_processor(images=[[im] for im in images] if nested else images, return_tensors="pt",
                                    **spec.processor_kwargs))
    return out if keep_all else {k: torch.as_tensor(v) for k, v in out.items() if k not in spec.drop_keys}


def build_tiny(
    family: str,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    padding_side: str = "left",
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny random fp32 eval-mode model of ``family`` and a padded batch of two examples.

    ``model(**inputs)`` runs. ``answer_mask(inputs)`` gives the answer (query) tokens.
    """
    spec = _SPECS[family]()
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(
        spec.config, attn_implementation=attn_implementation, dtype=torch.float32
    )
    if family in ("gemma3", "shieldgemma2"):
        # Gemma3 initialises its image projection to zeros: every image token would get the
        # same (zero) embedding and no test could tell image positions apart.
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    model.eval()
    return model, build_inputs(family, seed=seed, padding_side=padding_side)


def answer_mask(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """BoolTensor [B, L]: the last ``N_ANSWER`` real (non-padding) tokens of each example."""
    mask = inputs["attention_mask"].bool()
    # rank of each real token counted from the end of its row
    from_end = mask.flip(-1).long().cumsum(-1).flip(-1)
    return mask & (from_end <= N_ANSWER)


def image_token_mask(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """BoolTensor [B, L]: the image placeholder tokens (the same id in every tiny family)."""
    return inputs["input_ids"] == IMAGE_ID


# ---- LLaVA-1.5 geometry with the real llava-1.5-7b-hf processor files, and a tiny SAM ----------------------
def tiny_sam_config() -> transformers.SamConfig:
    # SAM's geometry is fixed (1024 px input, 64x64 embeddings, 256-wide prompts); only the ViT is shrunk.
    return transformers.SamConfig(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64,
            global_attn_indexes=[0], window_size=4, output_channels=256,
        ),
        mask_decoder_config=dict(num_hidden_layers=1, mlp_dim=64),
    )


def tiny_llava(fixtures_dir) -> torch.nn.Module:
    """A random model with llava-1.5-7b-hf's geometry (336 px, patch 14, 576 image tokens, vocab 32064)."""
    from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    real = AutoConfig.from_pretrained(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=336, patch_size=14, projection_dim=32,
        ),
        text_config=LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=real.text_config.vocab_size, max_position_embeddings=1024,
        ),
        image_token_index=real.image_token_index,
        image_seq_length=576,
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def llava_flmm_processor(fixtures_dir):
    """An `FLMMProcessor` around the real llava-1.5-7b-hf processor files (fixtures)."""
    from transformers import AutoProcessor

    from flmm_hf import FLMMProcessor

    return FLMMProcessor(AutoProcessor.from_pretrained(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf"))


def tiny_flmm(fixtures_dir):
    """F-LMM around `tiny_llava` with a small SAM refiner and an 8-channel head (seeded)."""
    from flmm_hf import FLMMForGrounding

    torch.manual_seed(0)
    return FLMMForGrounding.from_lmm(tiny_llava(fixtures_dir), sam=tiny_sam_config(), mask_head_channels=8)

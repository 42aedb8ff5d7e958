"""Convert checkpoints of the original F-LMM code (wusize/F-LMM) to flmm-hf module names.

The original checkpoint (`torch.save({'state_dict': ...})`) holds the trained parts under:

- `mask_head.*`: mmsegmentation `UNet` + `conv_seg`
  (`encoder.{i}.{j}.convs.{c}.{conv,gn}`, where j = 1 after the max-pool of stages i > 0;
  `decoder.{i}.upsample.interp_upsample.1.{conv,gn}` and `decoder.{i}.conv_block.convs.{c}.{conv,gn}`);
- `text_layer_weights`, `text_proj.*`;
- `sam.model.prompt_encoder.*`, `sam.model.mask_decoder.*` with `segment_anything` names;
- frozen keys (`llava.*` / other LMM wrappers, `sam.model.image_encoder.*`) that are ignored here:
  frozen weights come from the base checkpoints, not from the adapter.

Our names: `mask_head.*` (`flmm_hf.mask_head.UNetMaskHead`), `text_projection.layer_weights` and
`text_projection.proj.*` (`flmm_hf.sam_refiner.TextProjection`), `sam_refiner.prompt_encoder.*` and
`sam_refiner.mask_decoder.*` (transformers' SAM names).
"""

from __future__ import annotations

import re

import torch

# Prefixes of frozen parts in original checkpoints: the LMM wrapper (`llava` in the LLaVA / LLaVA-NeXT
# models, `deepseek_vl` in the DeepSeek-VL ones) and SAM's image encoder. Checkpoints of other original
# backbones with another attribute name fail loudly (unknown keys) rather than load silently.
_FROZEN_PREFIXES = (
    "llava.",
    "deepseek_vl.",
    "sam.model.image_encoder.",
    "sam.model.pixel_mean",
    "sam.model.pixel_std",
)

# segment_anything -> transformers SAM, for the prompt encoder (facts from transformers' convert_sam_to_hf.py).
_PROMPT_ENCODER_RULES = [
    (r"^pe_layer\.positional_encoding_gaussian_matrix$", "shared_embedding.positional_embedding"),
    (r"^point_embeddings\.(\d+)\.weight$", r"point_embed.\1.weight"),
    (r"^not_a_point_embed\.weight$", "not_a_point_embed.weight"),
    (r"^no_mask_embed\.weight$", "no_mask_embed.weight"),
    (r"^mask_downscaling\.0\.(weight|bias)$", r"mask_embed.conv1.\1"),
    (r"^mask_downscaling\.1\.(weight|bias)$", r"mask_embed.layer_norm1.\1"),
    (r"^mask_downscaling\.3\.(weight|bias)$", r"mask_embed.conv2.\1"),
    (r"^mask_downscaling\.4\.(weight|bias)$", r"mask_embed.layer_norm2.\1"),
    (r"^mask_downscaling\.6\.(weight|bias)$", r"mask_embed.conv3.\1"),
]

_ATTENTION = r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)\.(q_proj|k_proj|v_proj|out_proj)"
_MASK_DECODER_RULES = [
    (rf"^transformer\.layers\.(\d+)\.{_ATTENTION}\.(weight|bias)$", r"transformer.layers.\1.\2.\3.\4"),
    (r"^transformer\.layers\.(\d+)\.norm(\d)\.(weight|bias)$", r"transformer.layers.\1.layer_norm\2.\3"),
    (r"^transformer\.layers\.(\d+)\.mlp\.(lin1|lin2)\.(weight|bias)$", r"transformer.layers.\1.mlp.\2.\3"),
    (
        r"^transformer\.final_attn_token_to_image\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)$",
        r"transformer.final_attn_token_to_image.\1.\2",
    ),
    (r"^transformer\.norm_final_attn\.(weight|bias)$", r"transformer.layer_norm_final_attn.\1"),
    (r"^iou_token\.weight$", "iou_token.weight"),
    (r"^mask_tokens\.weight$", "mask_tokens.weight"),
    (r"^output_upscaling\.0\.(weight|bias)$", r"upscale_conv1.\1"),
    (r"^output_upscaling\.1\.(weight|bias)$", r"upscale_layer_norm.\1"),
    (r"^output_upscaling\.3\.(weight|bias)$", r"upscale_conv2.\1"),
    # SAM's 3-layer MLPs: layers.0 -> proj_in, layers.1 -> layers.0, layers.2 -> proj_out.
    (r"^(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.0\.(weight|bias)$", r"\1.proj_in.\2"),
    (r"^(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.1\.(weight|bias)$", r"\1.layers.0.\2"),
    (r"^(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.2\.(weight|bias)$", r"\1.proj_out.\2"),
]

# mmseg UNet names; encoder stage i holds its conv block at index 0 (i == 0) or 1 (after the max-pool).
_UNET_ENCODER = re.compile(r"^encoder\.(\d+)\.(\d+)\.convs\.(\d+)\.(conv|gn)\.(weight|bias)$")
_UNET_DECODER_CONVS = re.compile(r"^decoder\.(\d+)\.conv_block\.convs\.(\d+)\.(conv|gn)\.(weight|bias)$")
_UNET_DECODER_UPSAMPLE = re.compile(r"^decoder\.(\d+)\.upsample\.interp_upsample\.1\.(conv|gn)\.(weight|bias)$")
_CONV_SEG = re.compile(r"^conv_seg\.(weight|bias)$")
_NORM_NAMES = {"conv": "conv", "gn": "norm"}


def _apply_rules(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def _convert_mask_head_key(key: str) -> str | None:
    if match := _UNET_ENCODER.match(key):
        stage, index, conv, layer, param = match.groups()
        if int(index) != (0 if int(stage) == 0 else 1):
            return None
        return f"encoder.{stage}.convs.{conv}.{_NORM_NAMES[layer]}.{param}"
    if match := _UNET_DECODER_CONVS.match(key):
        stage, conv, layer, param = match.groups()
        return f"decoder.{stage}.conv_block.convs.{conv}.{_NORM_NAMES[layer]}.{param}"
    if match := _UNET_DECODER_UPSAMPLE.match(key):
        stage, layer, param = match.groups()
        return f"decoder.{stage}.upsample.conv.{_NORM_NAMES[layer]}.{param}"
    if _CONV_SEG.match(key):
        return key
    return None


def convert_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an original F-LMM state dict to flmm-hf names (trained parts only).

    Args:
        state_dict: the original checkpoint's `state_dict` (a dict `{'state_dict': ...}` is unwrapped).

    Returns:
        A new dict with keys `mask_head.*`, `text_projection.layer_weights`, `text_projection.proj.*`,
        `sam_refiner.prompt_encoder.*`, `sam_refiner.mask_decoder.*`. Frozen keys are dropped.

    Raises:
        ValueError: listing every key that is neither known nor frozen.
    """
    if set(state_dict) == {"state_dict"} and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]

    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key.startswith(_FROZEN_PREFIXES):
            continue
        new_key = None
        if key.startswith("mask_head."):
            new_key = _convert_mask_head_key(key[len("mask_head.") :])
            new_key = new_key and f"mask_head.{new_key}"
        elif key == "text_layer_weights":
            new_key = "text_projection.layer_weights"
        elif match := re.match(r"^text_proj\.(weight|bias)$", key):
            new_key = f"text_projection.proj.{match.group(1)}"
        elif key.startswith("sam.model.prompt_encoder."):
            new_key = _apply_rules(key[len("sam.model.prompt_encoder.") :], _PROMPT_ENCODER_RULES)
            new_key = new_key and f"sam_refiner.prompt_encoder.{new_key}"
        elif key.startswith("sam.model.mask_decoder."):
            new_key = _apply_rules(key[len("sam.model.mask_decoder.") :], _MASK_DECODER_RULES)
            new_key = new_key and f"sam_refiner.mask_decoder.{new_key}"
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = value
    if unknown:
        listed = "\n  ".join(unknown)
        raise ValueError(f"{len(unknown)} key(s) of the original checkpoint are not understood:\n  {listed}")
    return converted

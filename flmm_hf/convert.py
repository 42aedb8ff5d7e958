"""Convert checkpoints of the original F-LMM code (wusize/F-LMM) to flmm-hf module names.

The original checkpoint (`torch.save({'state_dict': ...})`) holds the trained parts under:

- `mask_head.*`: mmsegmentation `UNet` + `conv_seg`
  (`encoder.{i}.{j}.convs.{c}.{conv,gn}`, where j = 1 after the max-pool of stages i > 0;
  `decoder.{i}.upsample.interp_upsample.1.{conv,gn}` and `decoder.{i}.conv_block.convs.{c}.{conv,gn}`);
- `text_layer_weights`, `text_proj.*`;
- `sam.model.prompt_encoder.*`, `sam.model.mask_decoder.*` with `segment_anything` names;
- frozen keys (`llava.*` / other LMM wrappers, `sam.model.image_encoder.*`) that are ignored here:
  frozen weights come from the base checkpoints, not from the adapter.

Our names are those of `flmm_hf.flmm_head.FLMMHead`'s state dict: `mask_head.*` (`UNetMaskHead`),
`text_projection.layer_weights` and `text_projection.proj.*` (`TextProjection`),
`sam_refiner.sam.prompt_encoder.*` and `sam_refiner.sam.mask_decoder.*` (transformers' `SamModel` names).

`convert_original_checkpoint` (also the `flmm-convert` command and `python -m flmm_hf.convert`)
turns a released checkpoint into a `save_pretrained` folder in reproduction mode, ready for
`push_to_hub`. It reads only the backbones' configs (and processor), never their weights, so
converting a 7B release needs no more memory than the head.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

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
    """Map an original F-LMM state dict to the names of `FLMMHead`'s state dict (trained parts only).

    Args:
        state_dict: the original checkpoint's `state_dict` (a dict `{'state_dict': ...}` is unwrapped).

    Returns:
        A new dict with keys `mask_head.*`, `text_projection.layer_weights`, `text_projection.proj.*`,
        `sam_refiner.sam.prompt_encoder.*`, `sam_refiner.sam.mask_decoder.*`. Frozen keys are dropped.

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
            new_key = new_key and f"sam_refiner.sam.prompt_encoder.{new_key}"
        elif key.startswith("sam.model.mask_decoder."):
            new_key = _apply_rules(key[len("sam.model.mask_decoder.") :], _MASK_DECODER_RULES)
            new_key = new_key and f"sam_refiner.sam.mask_decoder.{new_key}"
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = value
    if unknown:
        listed = "\n  ".join(unknown)
        raise ValueError(f"{len(unknown)} key(s) of the original checkpoint are not understood:\n  {listed}")
    return converted


# ---- whole checkpoints -> save_pretrained folders -------------------------------------------------
logger = logging.getLogger(__name__)

# The LMMs of the ten F-LMM releases, by the names the release and the original configs use
# (lower-case), mapped to their transformers checkpoints.
_LLAVA_15 = "llava-hf/llava-1.5-7b-hf"
_LLAVA_NEXT_VICUNA = "llava-hf/llava-v1.6-vicuna-7b-hf"
_LLAVA_NEXT_MISTRAL = "llava-hf/llava-v1.6-mistral-7b-hf"
_DEEPSEEK_VL_1B = "deepseek-community/deepseek-vl-1.3b-chat"
_DEEPSEEK_VL_7B = "deepseek-community/deepseek-vl-7b-chat"
RELEASED_BACKBONES = {
    "llava-1.5-7b": _LLAVA_15,
    "llava-v1.5-7b": _LLAVA_15,
    "liuhaotian/llava-v1.5-7b": _LLAVA_15,
    "llava-next-vicuna-7b": _LLAVA_NEXT_VICUNA,
    "llava-v1.6-vicuna-7b": _LLAVA_NEXT_VICUNA,
    "liuhaotian/llava-v1.6-vicuna-7b": _LLAVA_NEXT_VICUNA,
    "llava-next-mistral-7b": _LLAVA_NEXT_MISTRAL,
    "llava-v1.6-mistral-7b": _LLAVA_NEXT_MISTRAL,
    "liuhaotian/llava-v1.6-mistral-7b": _LLAVA_NEXT_MISTRAL,
    "deepseek-vl-1.3b": _DEEPSEEK_VL_1B,
    "deepseek-vl-1.3b-chat": _DEEPSEEK_VL_1B,
    "deepseek-ai/deepseek-vl-1.3b-chat": _DEEPSEEK_VL_1B,
    "deepseek-vl-7b": _DEEPSEEK_VL_7B,
    "deepseek-vl-7b-chat": _DEEPSEEK_VL_7B,
    "deepseek-ai/deepseek-vl-7b-chat": _DEEPSEEK_VL_7B,
}
# The original's prompt of each released backbone (its configs' xtuner INSTRUCTION around
# "<image>\n" + question; DeepSeek-VL: no system text, the question right after the image tokens),
# as `FLMMProcessor(prompt_template=...)`. The paper YAMLs in configs/ give the same strings.
_VICUNA = "USER: {image}\n{question} ASSISTANT:"
ORIGINAL_PROMPT_TEMPLATES = {
    _LLAVA_15: _VICUNA,
    _LLAVA_NEXT_VICUNA: _VICUNA,
    _LLAVA_NEXT_MISTRAL: "[INST] {image}\n{question} [/INST]",
    _DEEPSEEK_VL_1B: "User: {image}{question}\n\nAssistant:",
    _DEEPSEEK_VL_7B: "User: {image}{question}\n\nAssistant:",
}
# Released backbones without a transformers implementation: (pattern of their names, what they are).
_UNSUPPORTED_BACKBONES = (
    (re.compile(r"mini-?gemini|(^|/)mgm-"), "MiniGemini (MGM)"),
    (re.compile(r"(^|[/-])hpt|hypergai"), "HPT (HyperGAI)"),
)


def resolve_backbone(name: str) -> str:
    """The transformers checkpoint of an F-LMM backbone name; other names and local folders pass through.

    Raises:
        NotImplementedError: for MiniGemini and HPT, which have no transformers implementation.
    """
    if os.path.isdir(name):
        return name
    key = name.strip().lower().replace("_", "-")
    for pattern, family in _UNSUPPORTED_BACKBONES:
        if pattern.search(key):
            raise NotImplementedError(
                f"{name!r} is an F-LMM {family} release, which cannot be converted: {family} has no implementation "
                "in transformers (no model_type for AutoModelForImageTextToText, no processor), and flmm-hf attaches "
                "the frozen LMM through transformers. Missing: a transformers port of the LMM (modeling and "
                "processor classes) and an image-token layout for it in flmm_hf/image_layout.py. Supported: "
                "LLaVA-1.5-7B, LLaVA-NeXT-Vicuna-7B, LLaVA-NeXT-Mistral-7B, DeepSeek-VL-1.3B and DeepSeek-VL-7B."
            )
    return RELEASED_BACKBONES.get(key, name)


def _head_shape(state_dict: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(in_channels, base_channels, num_stages) of the U-Net in converted weights."""
    first = state_dict.get("mask_head.encoder.0.convs.0.conv.weight")
    if first is None:
        raise ValueError("the checkpoint has no mask head (mask_head.encoder.0.*): is it an F-LMM checkpoint?")
    stages = {int(k.split(".")[2]) for k in state_dict if k.startswith("mask_head.encoder.")}
    return int(first.shape[1]), int(first.shape[0]), max(stages) + 1


def config_for_checkpoint(
    state_dict: dict[str, torch.Tensor],
    lmm_name: str,
    sam: str | None,
    lmm_revision: str | None = None,
    sam_revision: str | None = None,
):
    """The reproduction-mode `FLMMConfig` of a converted state dict (`convert_original_state_dict`): the head's
    shape read from its weights, checked against the backbone's config (only the configs are read)."""
    from transformers import AutoConfig

    from .configuration_flmm import DEFAULT_SAM, FLMMConfig
    from .image_layout import get_image_layout

    lmm_config = AutoConfig.from_pretrained(lmm_name, revision=lmm_revision)
    text_config = lmm_config.get_text_config(decoder=True)
    in_channels, base_channels, num_stages = _head_shape(state_dict)
    num_grids = get_image_layout(lmm_config).num_grids
    expected = num_grids * text_config.num_hidden_layers * text_config.num_attention_heads
    if in_channels != expected:
        raise ValueError(
            f"the checkpoint's mask head takes {in_channels} attention channels, but {lmm_name!r} gives {expected} "
            f"({num_grids} grid(s) x {text_config.num_hidden_layers} layers x {text_config.num_attention_heads} heads): "
            "the checkpoint was trained on another backbone"
        )
    use_sam = any(k.startswith("sam_refiner.") for k in state_dict)
    sam_name = (sam or DEFAULT_SAM) if use_sam else None
    config = FLMMConfig(
        lmm_name_or_path=lmm_name,
        lmm_revision=lmm_revision,
        lmm_config=lmm_config,
        use_sam=use_sam,
        sam_name_or_path=sam_name,
        sam_revision=sam_revision if use_sam else None,
        sam_config=AutoConfig.from_pretrained(sam_name, revision=sam_revision) if use_sam else None,
        num_grids=num_grids,
        mask_head_channels=base_channels,
        mask_head_stages=num_stages,
        mode="reproduction",
        # the maps the released heads were trained on: eager attention in bf16
        attention_numerics="eager",
        save_mode="adapter",
    )
    return config


def convert_original_checkpoint(
    checkpoint: str | os.PathLike | dict,
    lmm: str,
    output_dir: str | os.PathLike,
    *,
    sam: str | None = None,
    lmm_revision: str | None = None,
    sam_revision: str | None = None,
    source_name: str | None = None,
):
    """
    Convert an original F-LMM checkpoint into a `save_pretrained` folder (reproduction mode).

    Args:
        checkpoint: the original `.pth` file (`{'state_dict': ...}` with the original key layout,
            frozen `llava.*` keys allowed), or its loaded dict.
        lmm: the backbone: a release name (`LLaVA-1.5-7B`, `LLaVA-NeXT-Mistral-7B`, `DeepSeek-VL-1.3B`,
            ..., see `RELEASED_BACKBONES`), a transformers Hub id, or a local folder. Only its config
            and processor are read.
        output_dir: the folder to write (weights, config, custom code, processor, model card).
        sam: the SAM checkpoint whose image encoder the refiner uses (default `facebook/sam-vit-large`,
            as the paper). Only its config is read.
        lmm_revision, sam_revision: revisions to pin in the config.
        source_name: how the model card names the original checkpoint (default: the file name).

    Returns:
        `Path` of `output_dir`; load it with `AutoModel.from_pretrained(output_dir, trust_remote_code=True)`.

    Raises:
        NotImplementedError: MiniGemini / HPT backbones.
        ValueError: unknown keys in the checkpoint, or a head that does not fit the backbone's shape.
    """
    from transformers import AutoProcessor

    from .model_card import write_model_card
    from .modeling_flmm import FLMMForGrounding
    from .processing_flmm import FLMMProcessor

    lmm_name = resolve_backbone(lmm)
    if isinstance(checkpoint, dict):
        original, source_name = checkpoint, source_name or "an original F-LMM checkpoint"
    else:
        original = torch.load(checkpoint, map_location="cpu", weights_only=True)  # never unpickle code
        source_name = source_name or f"the original F-LMM checkpoint `{Path(checkpoint).name}`"
    state_dict = convert_original_state_dict(original)
    config = config_for_checkpoint(state_dict, lmm_name, sam, lmm_revision=lmm_revision, sam_revision=sam_revision)
    sam_name = config.sam_name_or_path
    # The frozen parts stay placeholders (nothing of the LMM or SAM is loaded); the meta device makes
    # building the trained parts free, and `assign=True` puts the converted tensors in their place.
    with torch.device("meta"):
        model = FLMMForGrounding(config, _defer_frozen=True)
    result = model.head.load_state_dict(state_dict, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"converted weights do not fit the model: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )

    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, model_card=False)
    write_model_card(output_dir, model.config, source=source_name, keep_results=False)
    processor = AutoProcessor.from_pretrained(lmm_name, revision=lmm_revision)
    template = ORIGINAL_PROMPT_TEMPLATES.get(lmm_name)  # a local or other backbone keeps its chat template
    FLMMProcessor(processor, mode="reproduction", prompt_template=template).save_pretrained(output_dir)
    logger.info("wrote %s (base LMM %s, SAM %s)", output_dir, lmm_name, sam_name)
    return output_dir


def main(argv: Sequence[str] | None = None) -> None:
    """`flmm-convert --checkpoint FILE --lmm NAME_OR_PATH [--sam NAME_OR_PATH] --output-dir DIR`."""
    parser = argparse.ArgumentParser(
        prog="flmm-convert",
        description="Convert an original F-LMM checkpoint (.pth) into a Hugging Face folder (reproduction mode).",
    )
    parser.add_argument("--checkpoint", required=True, help="the original F-LMM .pth file")
    parser.add_argument(
        "--lmm", required=True,
        help="backbone: release name (LLaVA-1.5-7B, LLaVA-NeXT-Vicuna-7B, LLaVA-NeXT-Mistral-7B, DeepSeek-VL-1.3B, "
        "DeepSeek-VL-7B), transformers Hub id or local folder",
    )
    parser.add_argument("--sam", default=None, help="SAM checkpoint (default: facebook/sam-vit-large)")
    parser.add_argument("--output-dir", required=True, help="folder to write")
    parser.add_argument("--lmm-revision", default=None, help="revision of the LMM to pin")
    parser.add_argument("--sam-revision", default=None, help="revision of SAM to pin")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        output = convert_original_checkpoint(
            args.checkpoint, args.lmm, args.output_dir, sam=args.sam,
            lmm_revision=args.lmm_revision, sam_revision=args.sam_revision,
        )
    except (NotImplementedError, ValueError, OSError) as error:
        parser.exit(2, f"flmm-convert: error: {error}\n")
    print(f"Converted model written to {output}")


if __name__ == "__main__":
    main()

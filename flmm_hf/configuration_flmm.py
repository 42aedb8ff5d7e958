"""Configuration of F-LMM: which frozen LMM and SAM to attach, and the shapes of the trained head."""

from __future__ import annotations

import difflib
import inspect
import logging
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.utils.quantization_config import QuantizationConfigMixin

from .attention_capture import ATTENTION_NUMERICS
from .quantization import quantization_dict

logger = logging.getLogger(__name__)

DEFAULT_SAM = "facebook/sam-vit-large"
# Keys every transformers config may carry (written by `save_pretrained` or read by `PreTrainedConfig`).
_GENERIC_KEYS = {
    "auto_map", "model_type", "transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path",
    "name_or_path", "_commit_hash", "attn_implementation", "_attn_implementation", "output_attentions",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "num_labels", "tie_word_embeddings", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
    "custom_pipelines",  # read by `transformers.pipeline` (save_pretrained records the referring-segmentation one)
}


def _check_unknown_fields(config_class: type, kwargs: dict[str, Any]) -> None:
    """A misspelt field (e.g. `mask_head_channel`) would be kept as a stray attribute while the real one silently
    takes its default; name it with the closest valid field instead. Unknown fields no valid name is close to
    are kept (transformers' rule) with a warning."""
    fields = [name for name in inspect.signature(config_class.__init__).parameters if name not in ("self", "kwargs")]
    for key in kwargs:
        if key in _GENERIC_KEYS:
            continue
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.75)
        if close:
            raise ValueError(
                f"unknown {config_class.__name__} field {key!r}: did you mean {close[0]!r}? Fix the name in config.json "
                f"(or the keyword argument); the valid fields are {', '.join(fields)}."
            )
        logger.warning("%s: unknown field %r is kept but not read by F-LMM", config_class.__name__, key)


def _as_dict(config: PreTrainedConfig | dict | None) -> dict | None:
    if config is None or isinstance(config, dict):
        return config
    return config.to_dict()


class FLMMConfig(PreTrainedConfig):
    r"""
    Configuration of [`FLMMForGrounding`]. The frozen parts (the LMM and SAM) are *referenced*
    by name and revision, like a PEFT adapter references its base model; their configs are kept
    too so that the head's shapes are known without loading them.

    Args:
        lmm_name_or_path (`str`, *optional*):
            Hub id or local folder of the frozen image-text-to-text model. `None` when the LMM was
            built from `lmm_config` only (tests, the offline demo).
        lmm_revision (`str`, *optional*):
            Revision (branch, tag or commit) of `lmm_name_or_path`.
        lmm_config (`dict` or `PreTrainedConfig`, *optional*):
            The LMM's own config. Required: every shape of the head derives from it. It describes the
            architecture only: how the LMM was quantized is `lmm_quantization_config`.
        lmm_quantization_config (`dict` or `QuantizationConfigMixin`, *optional*):
            How the frozen LMM is quantized (bitsandbytes 4-bit / 8-bit, torchao, ...), as
            `QuantizationConfigMixin.to_dict()` writes it; `None` for an unquantized LMM. Recorded by
            `from_lmm(..., quantization_config=...)`; `from_pretrained` quantizes the LMM the same way unless
            it is given another `quantization_config` (or `quantization_config=None`: unquantized).
        use_sam (`bool`, *optional*, defaults to `True`):
            Whether to refine the coarse masks with the SAM refiner.
        sam_name_or_path (`str`, *optional*, defaults to `"facebook/sam-vit-large"`):
            Hub id or local folder of the SAM checkpoint (the paper uses SAM ViT-L).
        sam_revision (`str`, *optional*):
            Revision of `sam_name_or_path`.
        sam_config (`dict` or `SamConfig`, *optional*):
            SAM's config; required when `use_sam=True`.
        attention_layers (`list[int]`, *optional*):
            Decoder layers whose attention feeds the head. `None` = all layers (the paper).
        merge (`str`, *optional*, defaults to `"mean"`):
            How the attention rows of a phrase's tokens are merged: `"mean"` (the paper) or `"max"`.
        attention_numerics (`str`, *optional*, defaults to `"float32"`):
            How the attention maps are computed. `"float32"`: the LMM runs SDPA and the captured probabilities are
            the float32 softmax of float32 scores (exact, whatever the LMM's dtype). `"eager"`: the original
            F-LMM's numerics: while the maps are captured the language model runs eager attention in its own
            dtype (with a bf16 LMM: scores in bf16, softmax in float32, probabilities rounded to bf16, as
            transformers 4.39 did), the maps are those probabilities and phrase rows are merged in that dtype.
            The paper configs use `"eager"` with a bf16 LMM.
        num_grids (`int`, *optional*, defaults to 1):
            Image-token grids per image whose maps are stacked as channels (2 for LLaVA-NeXT and
            tiled backbones; set from the backbone's layout by `FLMMForGrounding.from_lmm`).
        mask_head_channels (`int`, *optional*, defaults to 64):
            Width of the first U-Net stage; later stages double it.
        mask_head_stages (`int`, *optional*, defaults to 4):
            Number of U-Net encoder stages.
        mode (`str`, *optional*, defaults to `"reproduction"`):
            `"reproduction"`: the original prompt and letterbox preprocessing (converted F-LMM
            checkpoints); `"native"`: the backbone's own processor and chat template.
        save_mode (`str`, *optional*, defaults to `"adapter"`):
            `"adapter"` saves only trained weights and re-attaches the frozen parts by name on
            load; `"full"` bundles every weight for offline use.
    """

    model_type = "flmm"

    def __init__(
        self,
        lmm_name_or_path: str | None = None,
        lmm_revision: str | None = None,
        lmm_config: PreTrainedConfig | dict | None = None,
        lmm_quantization_config: QuantizationConfigMixin | dict | None = None,
        use_sam: bool = True,
        sam_name_or_path: str | None = DEFAULT_SAM,
        sam_revision: str | None = None,
        sam_config: PreTrainedConfig | dict | None = None,
        attention_layers: list[int] | None = None,
        merge: str = "mean",
        attention_numerics: str = "float32",
        num_grids: int = 1,
        mask_head_channels: int = 64,
        mask_head_stages: int = 4,
        mode: str = "reproduction",
        save_mode: str = "adapter",
        **kwargs: Any,
    ):
        if merge not in ("mean", "max"):
            raise ValueError(f"merge must be 'mean' or 'max', got {merge!r}")
        if attention_numerics not in ATTENTION_NUMERICS:
            raise ValueError(
                f"attention_numerics must be one of {ATTENTION_NUMERICS}, got {attention_numerics!r} ('eager' "
                "reproduces the original F-LMM's bf16 eager attention maps)"
            )
        if mode not in ("reproduction", "native"):
            raise ValueError(f"mode must be 'reproduction' or 'native', got {mode!r}")
        if save_mode not in ("adapter", "full"):
            raise ValueError(f"save_mode must be 'adapter' or 'full', got {save_mode!r}")
        _check_unknown_fields(type(self), kwargs)
        self.lmm_name_or_path = lmm_name_or_path
        self.lmm_revision = lmm_revision
        self.lmm_config = _as_dict(lmm_config)
        self.lmm_quantization_config = quantization_dict(lmm_quantization_config)
        self.use_sam = use_sam
        self.sam_name_or_path = sam_name_or_path
        self.sam_revision = sam_revision
        self.sam_config = _as_dict(sam_config)
        self.attention_layers = list(attention_layers) if attention_layers is not None else None
        self.merge = merge
        self.attention_numerics = attention_numerics
        self.num_grids = num_grids
        self.mask_head_channels = mask_head_channels
        self.mask_head_stages = mask_head_stages
        self.mode = mode
        self.save_mode = save_mode
        super().__init__(**kwargs)

    # ---- derived shapes -------------------------------------------------------------------
    def get_lmm_config(self) -> PreTrainedConfig:
        """The frozen LMM's config as a `PreTrainedConfig` instance."""
        if self.lmm_config is None:
            raise ValueError("FLMMConfig.lmm_config is not set: build the model with FLMMForGrounding.from_lmm(...)")
        config = dict(self.lmm_config)
        return AutoConfig.for_model(config.pop("model_type"), **config)

    def get_sam_config(self) -> PreTrainedConfig:
        """SAM's config as a `SamConfig`."""
        if self.sam_config is None:
            raise ValueError("FLMMConfig.sam_config is not set although use_sam=True")
        config = dict(self.sam_config)
        return AutoConfig.for_model(config.pop("model_type", "sam"), **config)

    @property
    def num_text_layers(self) -> int:
        return self.get_lmm_config().get_text_config(decoder=True).num_hidden_layers

    @property
    def selected_layers(self) -> list[int]:
        """Indices of the decoder layers whose attention is captured."""
        n = self.num_text_layers
        layers = list(range(n)) if self.attention_layers is None else list(self.attention_layers)
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise ValueError(f"attention_layers {bad} out of range for an LMM with {n} decoder layers")
        return [i % n for i in layers]

    @property
    def mask_head_in_channels(self) -> int:
        """Channels the U-Net receives: grids x captured layers x attention heads (layer-major)."""
        heads = self.get_lmm_config().get_text_config(decoder=True).num_attention_heads
        return self.num_grids * len(self.selected_layers) * heads


# `save_pretrained` writes `auto_map` and copies this file (AutoConfig with trust_remote_code=True).
FLMMConfig.register_for_auto_class()

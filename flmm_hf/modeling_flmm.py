"""F-LMM: grounding a frozen large multimodal model (Wu et al., CVPR 2025).

Reads top to bottom as the method does: the frozen LMM runs once while its word-to-image
attention is captured -> the attention rows of each phrase are merged into maps laid out on
the image grid -> a U-Net turns the maps into coarse mask logits -> a SAM refiner, prompted by
the coarse mask, its box and the phrase's text embedding, refines them -> BCE + Dice losses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedConfig, PreTrainedModel, SamModel
from transformers.utils import ModelOutput

from .attention_capture import AttentionCapture, enable_capture
from .configuration_flmm import DEFAULT_SAM, FLMMConfig
from .image_layout import example_image_inputs, get_image_layout
from .losses import mask_losses
from .mask_head import UNetMaskHead, crop_to_content
from .processing_flmm import NON_IMAGE_KEYS
from .sam_refiner import SamRefiner, TextProjection


@dataclass
class FLMMOutput(ModelOutput):
    """
    Output of [`FLMMForGrounding.forward`]. Per-example tensors are lists because examples have
    different numbers of phrases and image sizes.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Coarse BCE + Dice plus refined BCE + Dice (method.md 3.7), when `masks` are given.
        coarse_logits (`list[torch.FloatTensor]`):
            One `[K_b, h_b, w_b]` tensor per example: U-Net logits cropped to the image content.
        refined_logits (`list[torch.FloatTensor]`, *optional*):
            One `[K_b, H_b, W_b]` tensor per example at the original image size (SAM refiner).
        loss_mask, loss_dice, sam_loss_mask, sam_loss_dice (`torch.FloatTensor`, *optional*):
            The loss parts of the coarse (`loss_*`) and refined (`sam_loss_*`) masks.
        accuracy, aiou, sam_accuracy, sam_aiou (`torch.FloatTensor`, *optional*):
            Pixel accuracy and mean IoU at threshold 0.5, for logging.
    """

    loss: torch.FloatTensor | None = None
    coarse_logits: list[torch.FloatTensor] | None = None
    refined_logits: list[torch.FloatTensor] | None = None
    loss_mask: torch.FloatTensor | None = None
    loss_dice: torch.FloatTensor | None = None
    sam_loss_mask: torch.FloatTensor | None = None
    sam_loss_dice: torch.FloatTensor | None = None
    accuracy: torch.FloatTensor | None = None
    aiou: torch.FloatTensor | None = None
    sam_accuracy: torch.FloatTensor | None = None
    sam_aiou: torch.FloatTensor | None = None


def _mark_initialized(module: nn.Module) -> None:
    # `post_init` would otherwise re-run the backbone's `_init_weights` over pretrained weights.
    for m in module.modules():
        m._is_hf_initialized = True


# SAM parameters that F-LMM's prompts never reach (no point prompts, a mask prompt is always
# given, the IoU prediction is not trained). Freezing them changes nothing (AdamW skips
# parameters without gradients) and lets DDP run without `find_unused_parameters`.
UNUSED_SAM_PARAMETERS = (
    "prompt_encoder.no_mask_embed.",
    "prompt_encoder.point_embed.0.",
    "prompt_encoder.point_embed.1.",
    "prompt_encoder.not_a_point_embed.",
    "mask_decoder.iou_prediction_head.",
)


def _freeze_unused_sam_parameters(refiner: SamRefiner) -> None:
    for name, param in refiner.named_parameters():
        if name.startswith(UNUSED_SAM_PARAMETERS):
            param.requires_grad_(False)


# ---- frozen parts: referenced, attached on load (design.md decision 1) ----------------------------
# State-dict prefixes of the frozen parts, which an adapter-sized save leaves out.
FROZEN_PREFIXES = ("lmm.", "sam_refiner.vision_encoder.")
# Subfolders of a `full` save holding the frozen LMM and SAM as their own `save_pretrained` folders.
LMM_SUBFOLDER = "lmm"
SAM_SUBFOLDER = "sam"
# `from_pretrained` arguments that locate the F-LMM folder itself (and a full save's subfolders).
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies", "subfolder")


class _FrozenPlaceholder(nn.Module):
    """Holds the slot of a frozen part while `from_pretrained` loads the trained weights."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{self.what} is not attached: load the model with FLMMForGrounding.from_pretrained")


def _bundled(source: str, subfolder: str, hub_kwargs: dict) -> tuple[str, dict]:
    """Where a full save's frozen part lives: (name or folder, from_pretrained kwargs)."""
    parent = hub_kwargs.get("subfolder") or ""
    kwargs = dict(hub_kwargs, subfolder=f"{parent}/{subfolder}" if parent else subfolder)
    if os.path.isdir(source):  # local folder: point at the subfolder itself (no Hub lookup)
        kwargs.pop("subfolder")
        return os.path.join(source, parent, subfolder), kwargs
    return source, kwargs


def _describe(config: dict, keys: tuple[str, ...]) -> str:
    return ", ".join(f"{key}={config.get(key)}" for key in keys)


def _check_backbone(what: str, recorded: dict, found: Any, where: str, fix: str) -> None:
    """Compare the recorded config of a frozen part with the one found; raise with a fix if they differ."""
    recorded_type, found_type = recorded.get("model_type"), getattr(found, "model_type", None)
    problems = []
    if recorded_type != found_type:
        problems.append(f"model_type {recorded_type!r} was recorded but {where} is {found_type!r}")
    else:
        recorded_arch, found_arch = recorded.get("architectures"), getattr(found, "architectures", None)
        if recorded_arch and found_arch and set(recorded_arch) != set(found_arch):
            problems.append(f"architecture {recorded_arch} was recorded but {where} is {found_arch}")
        # Shapes the trained head depends on (channels of the U-Net, width of the text projection).
        if what == "LMM":
            rec = AutoConfig.for_model(**recorded).get_text_config(decoder=True).to_dict()
            got = found.get_text_config(decoder=True).to_dict()
            keys = ("num_hidden_layers", "num_attention_heads", "hidden_size")
        else:
            rec, got = recorded.get("vision_config", {}), found.vision_config.to_dict()
            keys = ("hidden_size", "num_hidden_layers", "output_channels")
        if any(rec.get(key) != got.get(key) for key in keys):
            problems.append(f"recorded {_describe(rec, keys)} but {where} has {_describe(got, keys)}")
    if problems:
        raise ValueError(f"The base {what} does not match this F-LMM model: {'; '.join(problems)}. {fix}")


def _frozen_source(
    what: str, given: str | None, recorded: str | None, revision: str | None, config: FLMMConfig,
    source: str, subfolder: str, hub_kwargs: dict, fix: str,
) -> tuple[str, dict, PreTrainedConfig]:
    """Where a frozen part loads from (given, bundled in a full save, or recorded) and its config, checked."""
    if given is not None:
        name, kwargs = str(given), {}
    elif config.save_mode == "full":
        name, kwargs = _bundled(source, subfolder, hub_kwargs)
    elif recorded:
        # A relative path is resolved against the model folder first (the demo keeps its backbone beside the head).
        local = os.path.join(source, recorded)
        name = local if not os.path.isabs(recorded) and os.path.isdir(local) else recorded
        kwargs = {"revision": revision}
    else:
        raise ValueError(
            f"{source} is an adapter-sized F-LMM save whose config records no base {what} (it was built from a "
            f"config). Fix: pass {what.lower()}=<Hub id or folder> to from_pretrained, or save with save_mode='full'."
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    where = f"{name!r}" + (f" (revision {kwargs['revision']!r})" if kwargs.get("revision") else "")
    try:
        found = AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        raise OSError(
            f"The base {what} of this F-LMM model could not be loaded from {where}: {error}\n"
            "Make it reachable (offline mode needs it in the local cache). " + fix
        ) from error
    recorded_config = config.lmm_config if what == "LMM" else config.sam_config
    _check_backbone(what, recorded_config, found, where, fix)
    return name, kwargs, found


def _load_frozen_lmm(
    config: FLMMConfig,
    source: str,
    lmm: str | PreTrainedModel | None,
    hub_kwargs: dict,
    dtype: Any,
    device_map: Any,
    attn_implementation: str | None,
) -> PreTrainedModel:
    """The frozen LMM: given, bundled (full save) or by recorded name and revision; checked against the config."""
    fix = (
        "Fix: pass lmm=<Hub id, local folder or loaded model> of the recorded architecture to from_pretrained, "
        "or set lmm_name_or_path / lmm_revision in config.json."
    )
    if isinstance(lmm, PreTrainedModel):
        _check_backbone("LMM", config.lmm_config, lmm.config, f"the given {type(lmm).__name__}", fix)
        return lmm
    name, kwargs, found = _frozen_source(
        "LMM", lmm, config.lmm_name_or_path, config.lmm_revision, config, source, LMM_SUBFOLDER, hub_kwargs, fix
    )
    load_kwargs = {"dtype": dtype, "device_map": device_map, "attn_implementation": attn_implementation}
    load_kwargs = {k: v for k, v in load_kwargs.items() if v is not None}
    return AutoModelForImageTextToText.from_pretrained(name, config=found, **kwargs, **load_kwargs)


def _load_frozen_sam(
    config: FLMMConfig, source: str, sam: str | SamModel | None, hub_kwargs: dict, dtype: Any
) -> SamModel:
    """SAM (only its image encoder is used): given, bundled (full save) or by recorded name and revision."""
    fix = "Fix: pass sam=<Hub id, local folder or SamModel> to from_pretrained, or set sam_name_or_path in config.json."
    if isinstance(sam, SamModel):
        _check_backbone("SAM", config.sam_config, sam.config, "the given SamModel", fix)
        return sam
    name, kwargs, found = _frozen_source(
        "SAM", sam, config.sam_name_or_path, config.sam_revision, config, source, SAM_SUBFOLDER, hub_kwargs, fix
    )
    return SamModel.from_pretrained(name, config=found, dtype=dtype, **kwargs)


class FLMMPreTrainedModel(PreTrainedModel):
    config_class = FLMMConfig
    base_model_prefix = "flmm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The head modules initialise themselves as the original does (mmcv's Kaiming convs);
        # only the per-layer text weights need their value restated (equal, as in the paper).
        if isinstance(module, TextProjection):
            module.layer_weights.fill_(1.0)


def _has_offloaded_weights(model: nn.Module) -> bool:
    """Whether accelerate offloads some of `model`'s weights (hooks that load them before and drop them after a forward)."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and any(getattr(h, "offload", False) for h in getattr(hook, "hooks", [hook])):
            return True
    return False


class FLMMForGrounding(FLMMPreTrainedModel):
    """
    A frozen image-text-to-text model plus the F-LMM head: U-Net mask head over word-to-image
    attention, per-layer weights and text projection, and an optional SAM refiner.

    The LMM never receives gradients and stays in eval mode even when the model is in train
    mode. Build a new, untrained model with [`FLMMForGrounding.from_lmm`].
    """

    # Frozen parts are referenced by name in the config, not saved (design.md decision 1).
    # `save_pretrained` drops them itself: transformers matches `_keys_to_ignore_on_save` exactly,
    # not as patterns. On load they are attached after the trained weights (see `from_pretrained`).
    _keys_to_ignore_on_load_missing = [r"^lmm\.", r"^sam_refiner\.vision_encoder\."]

    def __init__(
        self,
        config: FLMMConfig,
        lmm: PreTrainedModel | None = None,
        sam: nn.Module | None = None,
        *,
        _defer_frozen: bool = False,
    ):
        super().__init__(config)
        lmm_config = config.get_lmm_config()
        if _defer_frozen:
            # Set by `from_pretrained` only: this runs on the meta device, where a nested
            # `from_pretrained` fails and a model built here would lose its non-persistent buffers
            # (RoPE inv_freq) to the loader. Placeholders hold the slots until `_attach_frozen`.
            lmm = _FrozenPlaceholder("the frozen LMM")
        elif lmm is None:
            lmm = AutoModelForImageTextToText.from_config(lmm_config)
        self.lmm = lmm
        self.lmm.requires_grad_(False)
        self.lmm.eval()
        if not _defer_frozen:
            enable_capture(self.lmm)
        self.layout = get_image_layout(lmm_config if _defer_frozen else self.lmm.config)

        text_config = lmm_config.get_text_config(decoder=True)
        self.mask_head = UNetMaskHead(
            in_channels=config.mask_head_in_channels,
            base_channels=config.mask_head_channels,
            num_stages=config.mask_head_stages,
        )
        # The phrase text embeddings only prompt SAM: no refiner, no projection (and no unused parameters for DDP).
        self.text_projection = (
            TextProjection(num_layers=text_config.num_hidden_layers, hidden_size=text_config.hidden_size, out_size=256)
            if config.use_sam
            else None
        )
        self.sam_refiner = SamRefiner(sam if sam is not None else config.get_sam_config()) if config.use_sam else None
        if self.sam_refiner is not None:
            _freeze_unused_sam_parameters(self.sam_refiner)
        if _defer_frozen and self.sam_refiner is not None:
            self.sam_refiner.vision_encoder = _FrozenPlaceholder("SAM's image encoder")
        _mark_initialized(self.lmm)
        if self.sam_refiner is not None:
            _mark_initialized(self.sam_refiner.vision_encoder)
        self.post_init()

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_lmm(
        cls,
        lmm: str | PreTrainedModel,
        sam: str | nn.Module | Any | None = None,
        *,
        lmm_revision: str | None = None,
        sam_revision: str | None = None,
        **config_overrides: Any,
    ) -> "FLMMForGrounding":
        """
        A new, untrained F-LMM around a frozen backbone.

        Args:
            lmm: Hub id / local folder of an image-text-to-text model, or a loaded model.
            sam: Hub id / folder of a SAM checkpoint, a loaded `SamModel`, or a `SamConfig`
                (random SAM, for tests). `None` means `facebook/sam-vit-large`; pass
                `use_sam=False` to build without the refiner.
            config_overrides: any [`FLMMConfig`] field (`attention_layers`, `merge`, `mode`, ...).
        """
        from transformers import SamConfig, SamModel

        lmm_name = None
        if isinstance(lmm, str):
            lmm_name = lmm
            lmm = AutoModelForImageTextToText.from_pretrained(lmm, revision=lmm_revision)
        elif not isinstance(lmm, PreTrainedModel):
            raise TypeError(f"lmm must be a model name/path or a PreTrainedModel, got {type(lmm).__name__}")
        else:
            lmm_name = getattr(lmm, "name_or_path", None) or None

        use_sam = config_overrides.get("use_sam", True)
        sam_name: str | None = None
        sam_model = None
        if use_sam:
            if sam is None:
                sam = DEFAULT_SAM
            if isinstance(sam, str):
                sam_name = sam
                sam_model = SamModel.from_pretrained(sam, revision=sam_revision)
            elif isinstance(sam, SamConfig):
                sam_model = SamModel(sam)
            elif isinstance(sam, SamModel):
                sam_model = sam
                sam_name = getattr(sam, "name_or_path", None) or None
            else:
                raise TypeError(f"sam must be a name/path, SamModel or SamConfig, got {type(sam).__name__}")

        layout = get_image_layout(lmm.config)
        config_overrides.setdefault("num_grids", layout.num_grids)
        config = FLMMConfig(
            lmm_name_or_path=lmm_name,
            lmm_revision=lmm_revision,
            lmm_config=lmm.config,
            sam_name_or_path=sam_name,
            sam_revision=sam_revision,
            sam_config=sam_model.config if sam_model is not None else None,
            **config_overrides,
        )
        return cls(config, lmm=lmm, sam=sam_model)

    # ---- saving and loading (design.md decision 1) --------------------------------------------
    def trained_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The weights an adapter-sized save holds: all but the frozen LMM and SAM image encoder."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        return {k: v for k, v in state_dict.items() if not k.startswith(FROZEN_PREFIXES)}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        save_mode: str | None = None,
        model_card: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Save the trained F-LMM weights, the config (which pins the frozen LMM and SAM by name and
        revision), the custom code (for `trust_remote_code=True`) and a model card (`README.md`).

        Args:
            save_directory: the folder to write.
            save_mode (`str`, *optional*): `"adapter"` (only trained weights; the frozen parts are
                attached by name on load) or `"full"` (also the frozen LMM in `lmm/` and SAM in
                `sam/`, each a `save_pretrained` folder, for offline use). Defaults to
                `config.save_mode`.
            model_card (`bool`, *optional*, defaults to `True`): write `README.md` (evaluation
                results of an existing card are kept).
            kwargs: passed to `PreTrainedModel.save_pretrained` (`is_main_process`, `state_dict`,
                `max_shard_size`, `push_to_hub`, `repo_id`, `token`, ...).
        """
        save_mode = save_mode or self.config.save_mode
        if save_mode not in ("adapter", "full"):
            raise ValueError(f"save_mode must be 'adapter' or 'full', got {save_mode!r}")
        if save_mode == "full" and isinstance(self.lmm, _FrozenPlaceholder):
            raise ValueError("save_mode='full' needs the frozen LMM attached; load the model with from_pretrained first")
        # Pushing happens after every file is written (transformers' own push would run before lmm/, sam/, README).
        push_to_hub = kwargs.pop("push_to_hub", False)
        hub_keys = ("repo_id", "commit_message", "create_pr", "private", "token")
        hub_kwargs = {key: kwargs.pop(key) for key in hub_keys if key in kwargs}
        if "token" in hub_kwargs:
            kwargs["token"] = hub_kwargs["token"]
        is_main_process = kwargs.get("is_main_process", True)

        self._record_frozen_parts()
        state_dict = self.trained_state_dict(kwargs.pop("state_dict", None))
        saved_mode, self.config.save_mode = self.config.save_mode, save_mode
        try:
            super().save_pretrained(save_directory, state_dict=state_dict, **kwargs)
        finally:
            self.config.save_mode = saved_mode
        if not is_main_process:
            return
        if save_mode == "full":
            self.lmm.save_pretrained(os.path.join(save_directory, LMM_SUBFOLDER))
            if self.sam_refiner is not None:
                self._sam_model_for_saving().save_pretrained(os.path.join(save_directory, SAM_SUBFOLDER))
        if model_card:
            from .model_card import write_model_card

            write_model_card(save_directory, self.config, save_mode=save_mode)
        if push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=hub_kwargs.get("token"))
            repo_id = hub_kwargs.get("repo_id") or os.path.basename(os.path.normpath(save_directory))
            repo_id = api.create_repo(repo_id, private=hub_kwargs.get("private"), exist_ok=True).repo_id
            api.upload_folder(
                repo_id=repo_id,
                folder_path=save_directory,
                commit_message=hub_kwargs.get("commit_message") or "Upload F-LMM model",
                create_pr=hub_kwargs.get("create_pr", False),
            )

    def _record_frozen_parts(self) -> None:
        """Store the attached backbones' configs and classes, so that loading can check them."""
        if not isinstance(self.lmm, _FrozenPlaceholder):
            lmm_config = self.lmm.config.to_dict()
            lmm_config["architectures"] = [type(self.lmm).__name__]
            self.config.lmm_config = lmm_config

    def _sam_model_for_saving(self) -> SamModel:
        """A `SamModel` sharing the refiner's parts, so that `sam/` loads with `SamModel.from_pretrained`."""
        refiner = self.sam_refiner
        with torch.device("meta"):  # every part is replaced below: nothing to allocate
            sam = SamModel(refiner.config)
        sam.vision_encoder = refiner.vision_encoder
        sam.prompt_encoder = refiner.prompt_encoder
        sam.mask_decoder = refiner.mask_decoder
        sam.shared_image_embedding = refiner.prompt_encoder.shared_embedding  # tied in SamModel
        return sam

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: FLMMConfig | None = None,
        lmm: str | PreTrainedModel | None = None,
        sam: str | SamModel | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        attn_implementation: str | None = None,
        sam_dtype: torch.dtype | str = torch.float32,
        **kwargs: Any,
    ) -> "FLMMForGrounding":
        """
        Load a saved F-LMM: the trained weights from `pretrained_model_name_or_path`, the frozen LMM
        and SAM with their own `from_pretrained` (from `lmm/` and `sam/` in a `full` save, else by
        the name and revision recorded in the config).

        Args:
            pretrained_model_name_or_path: Hub id or folder written by `save_pretrained`.
            lmm: override the recorded LMM (a name/folder, or a loaded model); its architecture is checked.
            sam: override the recorded SAM (a name/folder, or a loaded `SamModel`).
            dtype, device_map, attn_implementation: passed to the LMM's `from_pretrained` (the
                language model then switches to the capturing SDPA attention). The trained head
                stays float32, as trained, and sits on the LMM's first device.
            sam_dtype: SAM's dtype (default float32: the refiner runs SAM in one dtype, and its
                trained prompt encoder and mask decoder are float32).
            kwargs: Hub arguments (`revision`, `cache_dir`, `token`, `local_files_only`, `subfolder`, ...)
                for this folder, and `output_loading_info`.

        Raises:
            OSError: the recorded base LMM or SAM cannot be found (the message says how to fix it).
            ValueError: the base found is of another architecture or shape than the recorded one.
        """
        if model_args:
            raise TypeError("FLMMForGrounding.from_pretrained takes no positional model arguments")
        torch_dtype = kwargs.pop("torch_dtype", None)
        dtype = dtype if dtype is not None else torch_dtype
        output_loading_info = kwargs.pop("output_loading_info", False)
        for key in ("trust_remote_code", "_from_auto", "_from_pipeline", "code_revision", "adapter_kwargs"):
            kwargs.pop(key, None)
        hub_kwargs = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
        # Not `cls.config_class`: with remote code, AutoConfig's class comes from another dynamic module.
        if not isinstance(config, PreTrainedConfig):
            config, kwargs = cls.config_class.from_pretrained(
                config or pretrained_model_name_or_path, return_unused_kwargs=True, **hub_kwargs, **kwargs
            )
        if kwargs:
            raise TypeError(f"unexpected arguments to FLMMForGrounding.from_pretrained: {sorted(kwargs)}")

        source = str(pretrained_model_name_or_path)
        lmm_model = _load_frozen_lmm(config, source, lmm, hub_kwargs, dtype, device_map, attn_implementation)
        sam_model = _load_frozen_sam(config, source, sam, hub_kwargs, sam_dtype) if config.use_sam else None

        # The trained parts load as usual, around placeholders; the frozen parts are attached after.
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path,
            config=config,
            _defer_frozen=True,
            dtype=torch.float32,
            output_loading_info=True,
            **hub_kwargs,
        )
        if loading_info["missing_keys"]:
            missing = ", ".join(sorted(loading_info["missing_keys"]))
            raise ValueError(f"{source} lacks trained F-LMM weights ({missing}): it is not a complete F-LMM checkpoint")
        model._attach_frozen(lmm_model, sam_model)
        model.eval()
        return (model, loading_info) if output_loading_info else model

    def _attach_frozen(self, lmm: PreTrainedModel, sam: SamModel | None) -> None:
        """Put the loaded frozen parts into the placeholders' slots (see `from_pretrained`)."""
        lmm.requires_grad_(False)
        self.lmm = enable_capture(lmm.eval())
        _mark_initialized(self.lmm)
        self.layout = get_image_layout(self.lmm.config)
        device = self.lmm.device
        self.mask_head.to(device)
        if self.sam_refiner is not None:
            self.text_projection.to(device)
            # The trained weights go into the loaded SAM's own prompt encoder and mask decoder, and the
            # refiner is rebuilt around that SAM, exactly as `from_lmm` builds it: one dtype and one
            # attention implementation for all of SAM (a decoder built from the config would use eager
            # attention where the loaded one uses SDPA, which moves the refined logits by ~1e-8).
            loaded = self.sam_refiner
            sam.prompt_encoder.load_state_dict(loaded.prompt_encoder.state_dict())
            sam.mask_decoder.load_state_dict(loaded.mask_decoder.state_dict())
            self.sam_refiner = SamRefiner(sam.to(device))
            _freeze_unused_sam_parameters(self.sam_refiner)
            _mark_initialized(self.sam_refiner.vision_encoder)


    def train(self, mode: bool = True) -> "FLMMForGrounding":
        super().train(mode)
        self.lmm.eval()  # frozen: dropout and friends stay off
        if self.sam_refiner is not None:
            self.sam_refiner.vision_encoder.eval()
        return self

    @property
    def image_token_id(self) -> int:
        config = self.lmm.config
        for name in ("image_token_id", "image_token_index"):
            value = getattr(config, name, None)
            if value is not None:
                return int(value)
        raise ValueError(f"{type(config).__name__} has no image_token_id: cannot locate image tokens")

    # ---- 1-3: attention -> per-phrase maps ---------------------------------------------------
    def _run_lmm(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        phrase_ids: torch.Tensor,
        image_inputs: dict,
        with_hidden_states: bool = True,
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...] | None]:
        """One frozen forward; returns per-example attention [layers, heads, n_query, n_image] and hidden states."""
        if phrase_ids.shape != input_ids.shape:
            raise ValueError(f"phrase_ids {tuple(phrase_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
        image_mask = input_ids == self.image_token_id
        if not image_mask.any(dim=1).all():
            raise ValueError("every example needs image tokens in input_ids; found an example without any")
        with torch.no_grad():
            with AttentionCapture(
                self.lmm,
                layers=self.config.selected_layers,
                query_mask=phrase_ids >= 0,
                key_mask=image_mask,
                # without hidden states nothing after the deepest selected layer's attention is needed; offloaded
                # weights must not stop early (accelerate's hooks put a layer's weights back after its forward)
                stop_after_last_layer=not with_hidden_states and not _has_offloaded_weights(self.lmm),
            ) as capture:
                outputs = self.lmm(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    # only the SAM refiner's text embeddings read them (all layers x all tokens: large)
                    output_hidden_states=with_hidden_states,
                    use_cache=False,
                    logits_to_keep=1,  # only hidden states and attention are used; skip the vocabulary projection
                    return_dict=True,
                    **image_inputs,
                )
        if not with_hidden_states:
            return capture.attentions, None
        num_layers = self.config.num_text_layers
        hidden_states = outputs.hidden_states[-num_layers:]  # decoder layer outputs, embeddings excluded
        return capture.attentions, hidden_states

    def _phrase_maps(
        self, attentions: torch.Tensor, input_ids: torch.Tensor, phrase_ids: torch.Tensor, image_inputs: dict
    ) -> torch.Tensor:
        """Merge one example's attention rows per phrase and lay them on the image grid(s) -> [K, C, h, w]."""
        query_phrase = phrase_ids[phrase_ids >= 0]  # phrase id of each captured query row
        num_phrases = int(query_phrase.max()) + 1
        layers, heads = attentions.shape[:2]
        merged = []
        for k in range(num_phrases):
            rows = attentions[:, :, query_phrase == k]  # [layers, heads, n_k, n_image]
            if rows.shape[2] == 0:
                raise ValueError(f"phrase {k} has no tokens; phrase ids must be 0..K-1 without gaps")
            merged.append(rows.mean(2) if self.config.merge == "mean" else rows.amax(2))
        merged = torch.stack(merged).flatten(1, 2)  # [K, layers*heads, n_image], layer-major as the original

        # Column j of the captured maps is the j-th image token; grids give sequence positions.
        image_positions = (input_ids == self.image_token_id).nonzero().squeeze(1)
        column_of_position = torch.full_like(input_ids, -1)
        column_of_position[image_positions] = torch.arange(len(image_positions), device=input_ids.device)
        grids = self.layout.grids(input_ids, image_inputs)
        per_grid = [merged[:, :, column_of_position[grid]] for grid in grids]  # [K, C, h_g, w_g] each
        return self.layout.merge(per_grid)

    def _all_phrase_maps(
        self,
        attentions: list[torch.Tensor],
        input_ids: torch.Tensor,
        phrase_ids: torch.Tensor,
        image_inputs: dict,
        original_sizes: torch.Tensor | None,
    ) -> list[torch.Tensor]:
        # Tiled layouts may need the original size to know the tile arrangement.
        layout_inputs = dict(image_inputs, original_sizes=original_sizes) if original_sizes is not None else image_inputs
        return [
            self._phrase_maps(attentions[b], input_ids[b], phrase_ids[b], example_image_inputs(layout_inputs, b))
            for b in range(input_ids.shape[0])
        ]

    def phrase_attention(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        phrase_ids: torch.Tensor,
        **image_inputs: Any,
    ) -> list[torch.Tensor]:
        """
        The merged word-to-image attention maps that the mask head receives.

        Takes the processor's output (keys the LMM does not take, such as `masks` or
        `sam_pixel_values`, are ignored).

        Returns:
            One float32 tensor per example of shape `[K, C, h, w]` (K phrases, C =
            `config.mask_head_in_channels`, (h, w) the image-token grid).
        """
        original_sizes = image_inputs.get("original_sizes")
        image_inputs = {k: v for k, v in image_inputs.items() if k not in NON_IMAGE_KEYS and v is not None}
        attentions, _ = self._run_lmm(input_ids, attention_mask, phrase_ids, image_inputs, with_hidden_states=False)
        return self._all_phrase_maps(attentions, input_ids, phrase_ids, image_inputs, original_sizes)

    # ---- 4: U-Net over all phrases of the batch --------------------------------------------
    def _coarse_logits(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run the head on all phrases at once when the grids agree (the usual case), else per example."""
        head_dtype = next(self.mask_head.parameters()).dtype
        if len({m.shape[1:] for m in maps}) == 1:
            logits = self.mask_head(torch.cat(maps).to(head_dtype))
            return list(logits.split([m.shape[0] for m in maps]))
        return [self.mask_head(m.to(head_dtype)) for m in maps]

    # ---- 4-6: U-Net, crop, SAM refiner ------------------------------------------------------
    def _masks_from_maps(
        self,
        maps: list[torch.Tensor],
        phrase_hidden: list[list[torch.Tensor]] | None,
        canvas_sizes: torch.Tensor,
        content_boxes: torch.Tensor,
        original_sizes: torch.Tensor,
        sam_pixel_values: torch.Tensor | None,
        refine: bool = True,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """
        Coarse logits cropped to the image content, and SAM-refined logits at the original size.

        Args:
            maps: per example, the phrase maps `[K_b, C, h, w]`.
            phrase_hidden: per example, per phrase, the LMM's layer outputs at its tokens `[layers, n_k, D]`.
        """
        padded = self._coarse_logits(maps)
        coarse = [
            crop_to_content(padded[b], canvas_sizes[b].tolist(), content_boxes[b].tolist()) for b in range(len(maps))
        ]
        if not refine or self.sam_refiner is None:
            return coarse, None
        if sam_pixel_values is None:
            raise ValueError("this model refines with SAM: pass sam_pixel_values (FLMMProcessor makes them)")
        with torch.no_grad():
            image_embeddings = self.sam_refiner.image_embeddings(sam_pixel_values)
        refined = []
        for b in range(len(maps)):
            text_embeds = [self.text_projection(hidden) for hidden in phrase_hidden[b]]  # [n_k, 256] each
            original_size = tuple(original_sizes[b].tolist())
            refined.append(self.sam_refiner(image_embeddings[b : b + 1], coarse[b], text_embeds, original_size))
        return coarse, refined

    # ---- full forward ------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        phrase_ids: torch.Tensor,
        original_sizes: torch.Tensor,
        canvas_sizes: torch.Tensor,
        content_boxes: torch.Tensor,
        sam_pixel_values: torch.Tensor | None = None,
        masks: list[torch.Tensor] | None = None,
        refine: bool = True,
        **image_inputs: Any,
    ) -> FLMMOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `[B, L]`): prompt + answer, padded.
            attention_mask (`torch.LongTensor` of shape `[B, L]`).
            phrase_ids (`torch.LongTensor` of shape `[B, L]`): -1, or k for the tokens of phrase k.
            original_sizes (`torch.LongTensor` of shape `[B, 2]`): (H, W) of each original image.
            canvas_sizes (`torch.LongTensor` of shape `[B, 2]`): the canvas the LMM saw, in original pixels.
            content_boxes (`torch.LongTensor` of shape `[B, 4]`): (top, left, bottom, right) of the image in the canvas.
            sam_pixel_values (`torch.FloatTensor` of shape `[B, 3, 1024, 1024]`, *optional*): SAM's input; required with SAM.
            masks (`list[torch.BoolTensor]`, *optional*): `[K_b, H_b, W_b]` ground truth at the original size.
            refine (`bool`, *optional*, defaults to `True`): run the SAM refiner (when the model has one).
            image_inputs: `pixel_values` and whatever else the backbone takes (`image_sizes`, `image_grid_thw`, ...).
        """
        image_inputs = {k: v for k, v in image_inputs.items() if v is not None}
        refine = refine and self.sam_refiner is not None
        attentions, hidden_states = self._run_lmm(
            input_ids, attention_mask, phrase_ids, image_inputs, with_hidden_states=refine
        )
        maps = self._all_phrase_maps(attentions, input_ids, phrase_ids, image_inputs, original_sizes)
        phrase_hidden = None
        if refine:
            stacked = torch.stack(hidden_states)  # [layers, B, L, D]
            phrase_hidden = [
                [stacked[:, b, phrase_ids[b] == k] for k in range(maps[b].shape[0])] for b in range(len(maps))
            ]
        coarse, refined = self._masks_from_maps(
            maps, phrase_hidden, canvas_sizes, content_boxes, original_sizes, sam_pixel_values, refine=refine
        )
        output = FLMMOutput(coarse_logits=coarse, refined_logits=refined)
        if masks is not None:
            self._add_losses(output, masks)
        return output

    def _add_losses(self, output: FLMMOutput, masks: list[torch.Tensor]) -> None:
        """Coarse and refined BCE + Dice: means over all phrases of the batch, which equal the
        original's per-example losses weighted by phrase count."""
        if len(masks) != len(output.coarse_logits):
            raise ValueError(f"got {len(masks)} mask tensors for {len(output.coarse_logits)} examples")
        groups = {"": output.coarse_logits}
        if output.refined_logits is not None:
            groups["sam_"] = output.refined_logits
        loss = 0
        for prefix, predictions in groups.items():
            parts = mask_losses(predictions, masks)
            for name, value in parts.items():
                setattr(output, prefix + name, value)
            loss = loss + parts["loss_mask"] + parts["loss_dice"]
        output.loss = loss

    # ---- convenience -------------------------------------------------------------------------
    @torch.no_grad()
    def ground(
        self,
        image: Any,
        text: str,
        phrases: list[str] | list[tuple[int, int]],
        processor: Any | None = None,
        threshold: float = 0.5,
        use_refiner: bool = True,
    ) -> torch.BoolTensor:
        """
        Ground `phrases` (substrings of `text`, or character spans) in `image`.

        Returns:
            `torch.BoolTensor` of shape `[len(phrases), H, W]` at the original image size.
        """
        processor = processor if processor is not None else getattr(self, "processor", None)
        if processor is None:
            raise ValueError(
                "ground() needs an FLMMProcessor: pass processor=FLMMProcessor.from_pretrained(...) "
                "or set model.processor"
            )
        inputs = processor(
            images=[image], texts=[text], phrases=[list(phrases)], return_tensors="pt",
            return_sam_inputs=use_refiner and self.sam_refiner is not None,
        )
        device = next(self.mask_head.parameters()).device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        output = self(**inputs, refine=use_refiner)
        logits = output.refined_logits if output.refined_logits is not None else output.coarse_logits
        return processor.post_process_masks(logits, inputs["original_sizes"], threshold=threshold)[0]

    # ---- grounded conversation (flmm_hf/grounded_chat.py) -------------------------------------
    def chat(self, image: Any, question: str, phrases: list[str] | None = None, processor: Any | None = None, **generate_kwargs: Any):
        """The frozen LMM answers `question` about `image`, and the phrases of its answer are grounded.

        See `grounded_chat.chat` for the arguments; returns a `GroundedAnswer`.
        """
        from .grounded_chat import chat

        return chat(self, image, question, phrases=phrases, processor=processor, **generate_kwargs)


# `save_pretrained` / `push_to_hub` then write `auto_map` and copy this file and its relative-import
# siblings, so that `AutoModel.from_pretrained(..., trust_remote_code=True)` works without flmm_hf.
FLMMForGrounding.register_for_auto_class("AutoModel")

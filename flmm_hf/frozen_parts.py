"""The frozen parts of an F-LMM model: building around them, where they load from, checks, saving without them.

An F-LMM folder references its frozen LMM and SAM as a PEFT adapter references its base model: the config
records their names, revisions and configs, and `model.safetensors` holds only the trained head
(`FLMMHead.trained_modules()`, one source of truth for what is saved). Loading attaches the frozen parts with
their own `from_pretrained` after checking that they have the recorded architecture and shapes.
`save_mode="full"` also bundles them, as their own `save_pretrained` folders `lmm/` and `sam/`, for offline use.
A quantized LMM is recorded by its quantization config (`FLMMConfig.lmm_quantization_config`), never by its
quantized weights in an adapter save; loading quantizes it again (see `quantization`).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedConfig, PreTrainedModel, SamConfig, SamModel
from transformers.utils.quantization_config import QuantizationConfigMixin

from .attention_capture import enable_capture
from .configuration_flmm import DEFAULT_SAM, FLMMConfig
from .image_layout import get_image_layout
from .processing_flmm import check_folder_or_hub_id
from .quantization import (
    RECORDED,
    check_quantization_backend,
    is_recorded,
    checkpoint_quantization,
    model_quantization,
    quantization_config_from,
)

# Subfolders of a `full` save holding the frozen LMM and SAM.
LMM_SUBFOLDER = "lmm"
SAM_SUBFOLDER = "sam"
# `from_pretrained` arguments that locate the F-LMM folder itself (and a full save's subfolders).
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies", "subfolder")
# The prefix of the head's keys in the model's state dict.
HEAD_PREFIX = "head."
# Folders saved before the head became its own module (2026-12-01) keep its parts at the top level and SAM's
# trained parts without `sam.`: loading renames them (the weights are the same).
EARLIER_KEY_LAYOUT = {
    r"^mask_head\.": "head.mask_head.",
    r"^text_projection\.": "head.text_projection.",
    r"^sam_refiner\.(prompt_encoder|mask_decoder)\.": r"head.sam_refiner.sam.\1.",
}

LMM_FIX = (
    "Fix: pass lmm=<Hub id, local folder or loaded model> of the recorded architecture to from_pretrained, "
    "or set lmm_name_or_path / lmm_revision in config.json."
)
# A Hub repo id (`org/name`); any other relative name recorded in a config is a folder relative to the model folder.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SAM_FIX = "Fix: pass sam=<Hub id, local folder or SamModel> to from_pretrained, or set sam_name_or_path in config.json."


class FrozenPlaceholder(nn.Module):
    """Holds the slot of a frozen part while `from_pretrained` loads the trained weights."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{self.what} is not attached: load the model with FLMMForGrounding.from_pretrained")


def recorded_lmm_config(lmm: PreTrainedModel) -> dict[str, Any]:
    """The LMM's config as the F-LMM config records it: its dict plus the model class (checked on load), without
    its quantization (recorded apart, in `lmm_quantization_config`: `lmm_config` describes the architecture)."""
    config = lmm.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(lmm).__name__]
    return config


# ---- checks --------------------------------------------------------------------------------------
def _describe(config: dict, keys: tuple[str, ...]) -> str:
    return ", ".join(f"{key}={config.get(key)}" for key in keys)


def check_backbone(what: str, recorded: dict, found: PreTrainedConfig, where: str, fix: str) -> None:
    """Compare the recorded config of a frozen part ("LMM" or "SAM") with the one found; raise with `fix` if they differ."""
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
            # vocab_size and the KV heads too: a backbone of equal widths but another tokenizer or attention
            # layout loads without error and grounds silently wrong.
            keys = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                    "intermediate_size", "vocab_size")
            rec_vision, got_vision = _vision_config(recorded), _vision_config(found.to_dict())
            vision_keys = tuple(k for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers")
                                if k in rec_vision and k in got_vision)
            if any(rec_vision[key] != got_vision[key] for key in vision_keys):
                problems.append(f"recorded vision {_describe(rec_vision, vision_keys)} but {where} has "
                                f"{_describe(got_vision, vision_keys)}")
        else:
            rec, got = recorded.get("vision_config", {}), found.vision_config.to_dict()
            keys = ("hidden_size", "num_hidden_layers", "output_channels")
        if any(rec.get(key) != got.get(key) for key in keys):
            problems.append(f"recorded {_describe(rec, keys)} but {where} has {_describe(got, keys)}")
    if problems:
        raise ValueError(f"The base {what} does not match this F-LMM model: {'; '.join(problems)}. {fix}")


def _vision_config(config: dict) -> dict:
    """The vision tower's config of an LMM config dict (empty when it has none as a dict)."""
    vision = config.get("vision_config")
    return vision if isinstance(vision, dict) else {}


# ---- where the frozen parts load from ------------------------------------------------------------
def is_relative_folder(name: str) -> bool:
    """Whether a recorded frozen-part name is a folder relative to the model folder (not absolute, not a Hub id)."""
    return not os.path.isabs(name) and not _HUB_ID.match(name)


def _recorded(what: str, recorded: str, revision: str | None, source: str, hub_kwargs: dict) -> tuple[str, dict]:
    """Where a recorded frozen part loads from: a relative folder against the model folder (a local folder, or
    the model's Hub repo with `subfolder=`), never against the working directory; else the absolute folder or
    Hub id with the recorded revision."""
    if os.path.isabs(recorded):
        return recorded, {"revision": revision}
    if is_relative_folder(recorded):
        if os.path.isdir(source):
            local = os.path.join(source, hub_kwargs.get("subfolder") or "", recorded)
            if os.path.isdir(local):
                return local, {}
            raise OSError(
                f"This F-LMM model records its base {what} as the folder {recorded!r} relative to the model folder, "
                f"but {local!r} does not exist (a folder of that name in the working directory is never used). "
                f"Fix: copy the {recorded!r} folder into {source!r}, or pass {what.lower()}=<folder or Hub id>."
            )
        parent = hub_kwargs.get("subfolder") or ""
        return source, dict(hub_kwargs, subfolder=f"{parent}/{recorded}" if parent else recorded)
    if os.path.isdir(recorded):  # transformers would take a local folder of the Hub id's name first
        raise OSError(
            f"This F-LMM model records its base {what} as the Hub id {recorded!r}, and the working directory holds a "
            f"folder of that name, which would be loaded instead. Fix: pass {what.lower()}={recorded!r} with the "
            "folder you mean (an absolute path), or run from another directory."
        )
    return recorded, {"revision": revision}


def _bundled(source: str, subfolder: str, hub_kwargs: dict) -> tuple[str, dict]:
    """Where a full save's frozen part lives: (name or folder, from_pretrained kwargs)."""
    parent = hub_kwargs.get("subfolder") or ""
    kwargs = dict(hub_kwargs, subfolder=f"{parent}/{subfolder}" if parent else subfolder)
    if os.path.isdir(source):  # local folder: point at the subfolder itself (no Hub lookup)
        kwargs.pop("subfolder")
        return os.path.join(source, parent, subfolder), kwargs
    return source, kwargs


def frozen_source(
    what: str, given: str | None, config: Any, source: str, hub_kwargs: dict, fix: str
) -> tuple[str, dict, PreTrainedConfig]:
    """Where a frozen part ("LMM" or "SAM") loads from: `given`, bundled in a full save, or recorded in `config`.

    Returns `(name or folder, from_pretrained kwargs, its config)`, the config checked against the recorded one.
    """
    prefix, subfolder = ("lmm", LMM_SUBFOLDER) if what == "LMM" else ("sam", SAM_SUBFOLDER)
    recorded, revision = getattr(config, f"{prefix}_name_or_path"), getattr(config, f"{prefix}_revision")
    if given is not None:
        name, kwargs = str(given), {}
    elif config.save_mode == "full":
        name, kwargs = _bundled(source, subfolder, hub_kwargs)
    elif recorded:
        # A relative folder is resolved against the model folder only (the demo keeps its backbone inside it).
        name, kwargs = _recorded(what, recorded, revision, source, hub_kwargs)
    else:
        raise ValueError(
            f"{source} is an adapter-sized F-LMM save whose config records no base {what} (it was built from a "
            f"config). Fix: pass {prefix}=<Hub id or folder> to from_pretrained, or save with save_mode='full'."
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
    check_backbone(what, getattr(config, f"{prefix}_config"), found, where, fix)
    return name, kwargs, found


def load_frozen_lmm(
    config: Any,
    source: str,
    lmm: str | PreTrainedModel | None,
    hub_kwargs: dict,
    quantization_config: Any = RECORDED,
    **load_kwargs: Any,
) -> PreTrainedModel:
    """The frozen LMM: given, bundled (full save) or by recorded name and revision; checked against `config`.

    `quantization_config`: `RECORDED` (quantize as `config.lmm_quantization_config` records), `None` (unquantized)
    or a quantization config / its dict; see `lmm_quantization`. `load_kwargs` (`dtype`, `device_map`,
    `attn_implementation`; `None` values dropped) go to its `from_pretrained`.
    """
    if isinstance(lmm, PreTrainedModel):
        if not is_recorded(quantization_config):
            raise ValueError(
                "quantization_config applies to an LMM that from_pretrained loads, but a loaded model was given as "
                "lmm= (it is used as it is). Fix: load that model with from_pretrained(..., quantization_config=...) "
                "yourself, or pass lmm=<its name or folder> together with quantization_config."
            )
        check_backbone("LMM", config.lmm_config, lmm.config, f"the given {type(lmm).__name__}", LMM_FIX)
        return lmm
    name, kwargs, found = frozen_source("LMM", lmm, config, source, hub_kwargs, LMM_FIX)
    load_kwargs = {k: v for k, v in load_kwargs.items() if v is not None}
    quantization = lmm_quantization(config.lmm_quantization_config, quantization_config, found, repr(name))
    if quantization is not None:
        load_kwargs["quantization_config"] = quantization
    return load_weights_naming_files(
        AutoModelForImageTextToText.from_pretrained, "the frozen LMM", name, kwargs.get("subfolder"),
        name, config=found, **kwargs, **load_kwargs,
    )


def lmm_quantization(recorded: dict | None, given: Any, found: PreTrainedConfig, where: str) -> Any:
    """The `quantization_config` to load the frozen LMM with (None: pass none), checked against this machine.

    `given` is `RECORDED` (use `recorded`), None (unquantized) or a quantization config / its dict. A checkpoint that
    is itself quantized (`found` carries a `quantization_config`: a full save of a quantized F-LMM, or a quantized
    Hub checkpoint) loads as it is stored: with `RECORDED` nothing is passed, and None is refused (its weights are
    stored quantized).
    """
    stored = checkpoint_quantization(found)
    if stored is not None:
        if given is None:
            raise ValueError(
                f"the LMM checkpoint {where} is itself quantized (its config.json has a {stored.get('quant_method')} "
                "quantization_config), so quantization_config=None cannot load it unquantized. Fix: pass "
                "lmm=<the unquantized base model> with quantization_config=None."
            )
        if is_recorded(given):
            check_quantization_backend(stored)
            return None
    if is_recorded(given):
        given = recorded
    quantization = quantization_config_from(given)
    if quantization is not None:
        check_quantization_backend(quantization)
    return quantization


def load_frozen_sam(config: Any, source: str, sam: str | SamModel | None, hub_kwargs: dict, dtype: Any) -> SamModel:
    """SAM: given, bundled (full save) or by recorded name and revision; checked against `config`."""
    if isinstance(sam, SamModel):
        check_backbone("SAM", config.sam_config, sam.config, "the given SamModel", SAM_FIX)
        return sam
    name, kwargs, found = frozen_source("SAM", sam, config, source, hub_kwargs, SAM_FIX)
    return load_weights_naming_files(
        SamModel.from_pretrained, "SAM", name, kwargs.get("subfolder"), name, config=found, dtype=dtype, **kwargs
    )


# ---- the folder itself and its weight files -------------------------------------------------------
def check_source(source: str, hub_kwargs: dict) -> None:
    """Refuse, naming the path and the fix, a source that is neither an F-LMM folder nor a possible Hub id.

    transformers would answer a missing folder with "Repo id must be in the form ..." and an empty one with
    a default config (so that the first error would be about the base LMM).
    """
    if os.path.isdir(source):
        folder = os.path.join(source, hub_kwargs["subfolder"]) if hub_kwargs.get("subfolder") else source
        if not os.path.isfile(os.path.join(folder, "config.json")):
            found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            what = f"holds only {', '.join(found[:8])}" + (", ..." if len(found) > 8 else "") if found else "is empty"
            raise OSError(
                f"{folder!r} has no config.json (it {what}), so it is not a saved F-LMM model. Fix: pass the folder "
                "that FLMMForGrounding.save_pretrained (or train.py's output_dir) wrote, or a Hub id 'org/name'."
            )
        return
    check_folder_or_hub_id(source, saved_by="FLMMForGrounding.save_pretrained")


def _weight_files(source: str, subfolder: str | None) -> str:
    """The weight files a load reads, for messages: local paths, or the file names in a Hub repo."""
    folder = os.path.join(source, subfolder) if subfolder else source
    if os.path.isdir(folder):
        files = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin")))
        return ", ".join(repr(os.path.join(folder, f)) for f in files) or f"the weights in {folder!r}"
    return f"the weight files of the Hub repo {source!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")


def _is_unreadable_weights(error: BaseException) -> bool:
    # safetensors raises its own SafetensorError (named, not imported: the Hub code imports torch/transformers only);
    # a damaged torch .bin surfaces as an unpickling or zip-reader error. Missing files and network errors are not
    # matched: transformers' own messages name those.
    if type(error).__name__ in ("SafetensorError", "UnpicklingError") or isinstance(error, EOFError):
        return True
    message = str(error).lower()
    return any(word in message for word in ("deserializ", "pytorchstreamreader", "invalid load key", "incomplete metadata"))


def load_weights_naming_files(load: Callable[..., Any], what: str, source: str, subfolder: str | None,
                              *args: Any, **kwargs: Any) -> Any:
    """`load(*args, **kwargs)`; a damaged or incomplete weight file becomes an OSError that names the file."""
    try:
        return load(*args, **kwargs)
    except Exception as error:
        if not _is_unreadable_weights(error):
            raise
        raise OSError(
            f"could not read {what} from {_weight_files(source, subfolder)}: {type(error).__name__}: {error}. The file "
            "is damaged or incomplete (an interrupted copy or download?). Fix: save or copy it again; for a Hub repo, "
            "from_pretrained(..., force_download=True)."
        ) from error


# ---- saving --------------------------------------------------------------------------------------
def fsdp_wrapped_class(cls: type) -> type | None:
    """The model class that FSDP2's `fully_shard` wrapped, when `cls` is the class it made at run time
    (`FSDPFLMMForGrounding`, defined in torch, with bases `(FSDPModule, FLMMForGrounding)`); else None."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.fsdp import FSDPModule as fsdp_module
    except ImportError:  # a torch without FSDP2
        return None
    if not issubclass(cls, fsdp_module):
        return None
    return next(c for c in cls.__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, fsdp_module))


class _InstanceOf:
    """Stands for an instance of `cls` in transformers' `custom_object_save`, which reads only the object's class,
    module and auto class."""

    def __init__(self, cls: type):
        self._cls = cls
        self.__module__ = cls.__module__
        self._auto_class = cls._auto_class

    @property
    def __class__(self) -> type:  # noqa: D401 - what custom_object_save reads as the object's class
        return self._cls


def save_custom_code(model: Any, config: PreTrainedConfig, save_directory: str | os.PathLike) -> None:
    """Copy the model's Hub code (its module file and relative-import siblings) to `save_directory` and record
    it in `config.auto_map` (the config about to be saved), for a model that FSDP2 wrapped: transformers' own copy would take FSDP2's
    wrapper class, i.e. torch's `_fsdp_*.py` files and an `auto_map` naming `_fsdp_init.FSDPFLMMForGrounding`
    (it is skipped for such models: `FrozenPartsMixin.is_remote_code`)."""
    from transformers.dynamic_module_utils import custom_object_save

    cls = fsdp_wrapped_class(type(model))
    if cls is not None and cls._auto_class is not None:
        custom_object_save(_InstanceOf(cls), save_directory, config=config)


def trained_state_dict(model: Any, state_dict: dict | None = None) -> dict:
    """The weights an adapter-sized save holds: the state of the head's trained modules, under `head.`.

    `state_dict`, when given (a gathered state dict from accelerate / the Trainer), is the source of the values.
    """
    keys = [HEAD_PREFIX + key for key in model.head.trained_state_dict()]
    if state_dict is None:
        return {HEAD_PREFIX + key: value for key, value in model.head.trained_state_dict().items()}
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise KeyError(f"the given state_dict lacks trained F-LMM weights: {missing[:5]}")
    return {key: state_dict[key] for key in keys}


def save_flmm(
    model: Any,
    save_weights: Callable[..., Any],
    save_directory: str | os.PathLike,
    save_mode: str,
    model_card: bool,
    **kwargs: Any,
) -> None:
    """`FLMMForGrounding.save_pretrained`: `save_weights` is `PreTrainedModel.save_pretrained` bound to `model`."""
    if save_mode not in ("adapter", "full"):
        raise ValueError(f"save_mode must be 'adapter' or 'full', got {save_mode!r}")
    if save_mode == "full" and isinstance(model.lmm, FrozenPlaceholder):
        raise ValueError("save_mode='full' needs the frozen LMM attached; load the model with from_pretrained first")
    # Pushing happens after every file is written (transformers' own push would run before lmm/, sam/, README).
    push_to_hub = kwargs.pop("push_to_hub", False)
    hub_kwargs = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "create_pr", "private") if key in kwargs}
    hub_kwargs["token"] = kwargs.get("token")
    state_dict = trained_state_dict(model, kwargs.pop("state_dict", None))
    save_weights(save_directory, state_dict=state_dict, **kwargs)
    if not kwargs.get("is_main_process", True):
        return
    # The saved config says how this folder was saved; the model's own config is left as it is.
    config = copy.deepcopy(model.config)
    config.save_mode = save_mode
    save_custom_code(model, config, save_directory)  # an FSDP2-wrapped model's code and auto_map
    save_pipeline_code(config, save_directory)
    config.save_pretrained(save_directory)
    if save_mode == "adapter" and config.lmm_name_or_path and is_relative_folder(config.lmm_name_or_path):
        carry_relative_lmm(model, config.lmm_name_or_path, save_directory)
    if save_mode == "full":
        model.lmm.save_pretrained(os.path.join(save_directory, LMM_SUBFOLDER))
        if model.head.has_refiner:
            model.head.sam_refiner.sam.save_pretrained(os.path.join(save_directory, SAM_SUBFOLDER))
    if model_card:
        from .model_card import write_model_card  # imported here: only saving needs it

        write_model_card(save_directory, config, save_mode=save_mode)
    if push_to_hub:
        _upload(save_directory, **hub_kwargs)


def save_pipeline_code(config: Any, save_directory: str | os.PathLike) -> None:
    """Copy the `referring-segmentation` pipeline's code into the folder and record it in `config.custom_pipelines`,
    so that `pipeline("referring-segmentation", model=folder, trust_remote_code=True)` finds it (transformers
    loads the class named there from the folder, with its relative-import siblings, as it does the model code)."""
    from transformers.dynamic_module_utils import custom_object_save

    # Imported here, relatively: with remote code this is the dynamic module's copy, whose file is the one to copy.
    from .pipeline_flmm import CUSTOM_PIPELINE_ENTRY, TASK, ReferringSegmentationPipeline

    custom_object_save(ReferringSegmentationPipeline, save_directory)
    config.custom_pipelines = {**(getattr(config, "custom_pipelines", None) or {}), TASK: copy.deepcopy(CUSTOM_PIPELINE_ENTRY)}


def carry_relative_lmm(model: Any, relative: str, save_directory: str | os.PathLike) -> None:
    """Copy the frozen LMM's folder to `save_directory/relative`, so that an adapter save whose config records its
    LMM as a folder relative to itself (the demo's `backbone`) loads wherever it is copied. Nothing is overwritten:
    a different folder already there is an error."""
    source = getattr(model.lmm, "name_or_path", None) or ""
    target = os.path.join(save_directory, relative)
    if not os.path.isdir(source):
        raise ValueError(
            f"config.lmm_name_or_path is the relative folder {relative!r}, but the attached LMM was not loaded from a "
            "folder that could be copied there. Fix: save with save_mode='full', or set lmm_name_or_path to a Hub id "
            "or an absolute folder."
        )
    if os.path.exists(target):
        if os.path.realpath(target) == os.path.realpath(source) or _same_folder(source, target):
            return
        raise ValueError(
            f"{target} exists and is not this model's frozen LMM ({source}); it is not overwritten. "
            "Fix: save to another folder, or remove that folder yourself."
        )
    shutil.copytree(source, target)


def _same_folder(a: str, b: str) -> bool:
    """Same file names and sizes, and the same config.json: the same saved model."""
    def listing(folder: str) -> dict[str, int]:
        return {name: os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
                if os.path.isfile(os.path.join(folder, name))}

    def config_text(folder: str) -> bytes | None:
        path = os.path.join(folder, "config.json")
        return open(path, "rb").read() if os.path.isfile(path) else None

    return listing(a) == listing(b) and config_text(a) == config_text(b)


def _upload(folder: str | os.PathLike, token: str | None = None, repo_id: str | None = None, **options: Any) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = repo_id or os.path.basename(os.path.normpath(folder))
    repo_id = api.create_repo(repo_id, private=options.get("private"), exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=options.get("commit_message") or "Upload F-LMM model",
        create_pr=options.get("create_pr", False),
    )


# ---- a new model's config -------------------------------------------------------------------------
def new_config(
    lmm: str | PreTrainedModel,
    sam: str | SamModel | SamConfig | None,
    lmm_revision: str | None = None,
    sam_revision: str | None = None,
    quantization_config: Any = None,
    lmm_load_kwargs: dict | None = None,
    **config_overrides: Any,
) -> tuple[FLMMConfig, PreTrainedModel, SamModel | None]:
    """`FLMMForGrounding.from_lmm`: the frozen parts (loaded by name when given as names, the LMM with
    `quantization_config` and `lmm_load_kwargs`) and the config that records them, the LMM's quantization included.
    Returns `(config, lmm, sam)`; `sam` is None with `use_sam=False`."""
    lmm_name = lmm if isinstance(lmm, str) else None
    if isinstance(lmm, str):
        load_kwargs = {k: v for k, v in (lmm_load_kwargs or {}).items() if v is not None}
        quantization = quantization_config_from(quantization_config)
        if quantization is not None:
            check_quantization_backend(quantization)
            load_kwargs["quantization_config"] = quantization
        lmm = AutoModelForImageTextToText.from_pretrained(lmm, revision=lmm_revision, **load_kwargs)
    elif not isinstance(lmm, PreTrainedModel):
        raise TypeError(f"lmm must be a model name/path or a PreTrainedModel, got {type(lmm).__name__}")
    elif quantization_config is not None or any(v is not None for v in (lmm_load_kwargs or {}).values()):
        given = ["quantization_config"] if quantization_config is not None else []
        given += [k for k, v in (lmm_load_kwargs or {}).items() if v is not None]
        raise ValueError(
            f"{', '.join(given)} apply to an LMM that from_lmm loads by name, but a loaded model was given (it is used "
            "as it is, and its own quantization is recorded). Fix: pass lmm=<its Hub id or folder>, or load it "
            "yourself with from_pretrained(..., quantization_config=...)."
        )
    sam_name, sam_model = None, None
    if config_overrides.get("use_sam", True):
        sam = DEFAULT_SAM if sam is None else sam
        if isinstance(sam, str):
            try:
                sam_model = SamModel.from_pretrained(sam, revision=sam_revision)
            except OSError as error:
                default = " (the default SAM)" if sam == DEFAULT_SAM else ""
                raise OSError(
                    f"SAM {sam!r}{default} could not be loaded: {error}\nFix: pass sam=<local SAM folder or SamModel>, "
                    "use_sam=False to build without the SAM refiner, or make it reachable (offline mode needs it in "
                    "the local cache)."
                ) from error
            sam_name = sam
        elif isinstance(sam, (SamConfig, SamModel)):
            sam_model = SamModel(sam) if isinstance(sam, SamConfig) else sam
        else:
            raise TypeError(f"sam must be a name/path, SamModel or SamConfig, got {type(sam).__name__}")
        sam_name = sam_name or getattr(sam_model, "name_or_path", None) or None
    config_overrides.setdefault("num_grids", get_image_layout(lmm.config).num_grids)
    config = FLMMConfig(
        lmm_name_or_path=_absolute_if_folder(lmm_name or getattr(lmm, "name_or_path", None) or None),
        lmm_revision=lmm_revision,
        lmm_config=recorded_lmm_config(lmm),
        lmm_quantization_config=model_quantization(lmm),
        sam_name_or_path=_absolute_if_folder(sam_name),
        sam_revision=sam_revision,
        sam_config=sam_model.config if sam_model is not None else None,
        **config_overrides,
    )
    return config, lmm, sam_model


def _absolute_if_folder(name: str | None) -> str | None:
    """A local folder as its absolute path (a saved model is loaded from anywhere and relative names are read
    against the model folder, see `frozen_source`); a Hub id or None as is."""
    return os.path.abspath(name) if name and os.path.isdir(name) else name


# ---- loading -------------------------------------------------------------------------------------
def load_flmm(
    load_weights: Callable[..., Any],
    config_class: type,
    source: str,
    config: Any,
    lmm: str | PreTrainedModel | None,
    sam: str | SamModel | None,
    sam_dtype: Any,
    dtype: Any = None,
    device_map: Any = None,
    attn_implementation: str | None = None,
    quantization_config: Any = RECORDED,
    **kwargs: Any,
) -> tuple[Any, dict]:
    """`FLMMForGrounding.from_pretrained`: `load_weights` is `PreTrainedModel.from_pretrained` bound to the class,
    `config_class` the model's (with remote code, AutoConfig's class comes from another dynamic module).

    The frozen parts are loaded (and checked) first, so that a missing base fails before anything else; the
    trained head then loads as usual around placeholders, and the frozen parts take the placeholders' slots.
    """
    dtype = dtype if dtype is not None else kwargs.pop("torch_dtype", None)
    for key in ("trust_remote_code", "_from_auto", "_from_pipeline", "code_revision", "adapter_kwargs"):
        kwargs.pop(key, None)
    hub_kwargs = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
    check_source(source, hub_kwargs)
    if not isinstance(config, PreTrainedConfig):
        try:
            config, kwargs = config_class.from_pretrained(
                config or source, return_unused_kwargs=True, **hub_kwargs, **kwargs
            )
        except OSError as error:
            if os.path.isdir(source):
                raise
            raise OSError(
                f"{source!r} is no local folder (looked for {os.path.abspath(source)!r}) and could not be loaded as a "
                f"Hub repo: {error}\nFix: check the path (relative paths are read from the working directory), or the "
                "Hub id and your connection (offline mode needs the repo in the local cache)."
            ) from error
    if kwargs:
        raise TypeError(f"unexpected arguments to FLMMForGrounding.from_pretrained: {sorted(kwargs)}")
    lmm_load_kwargs = {"dtype": dtype, "device_map": device_map, "attn_implementation": attn_implementation}
    lmm_model = load_frozen_lmm(config, source, lmm, hub_kwargs, quantization_config, **lmm_load_kwargs)
    sam_model = load_frozen_sam(config, source, sam, hub_kwargs, sam_dtype) if config.use_sam else None
    model, loading_info = load_weights_naming_files(
        load_weights, "the trained F-LMM head", source, hub_kwargs.get("subfolder"),
        source, config=config, _defer_frozen=True, dtype=torch.float32, output_loading_info=True,
        key_mapping=EARLIER_KEY_LAYOUT, **hub_kwargs,
    )
    trained = {HEAD_PREFIX + key for key in model.head.trained_state_dict()}
    missing = sorted(set(loading_info["missing_keys"]) & trained)
    if missing:
        raise ValueError(f"{source} lacks trained F-LMM weights ({', '.join(missing)}): it is not a complete F-LMM checkpoint")
    model.attach_frozen_parts(lmm_model, sam_model)
    model.eval()
    return model, loading_info


def mark_initialized(module: nn.Module) -> None:
    """Mark every sub-module initialised: `post_init` would otherwise re-run a pretrained part's own
    `_init_weights` over its weights."""
    for m in module.modules():
        m._is_hf_initialized = True


def present_no_split_modules(model: nn.Module) -> list[str]:
    """The `_no_split_modules` of `model` and of every `PreTrainedModel` inside it, keeping only the classes that are
    present in `model`.

    These names are what accelerate's FSDP `TRANSFORMER_BASED_WRAP` shards as units and what `device_map` keeps on
    one device. transformers collects them from each sub-model's class, so a LLaVA whose vision tower is
    `CLIPVisionModel` lists `CLIPTextEmbeddings` (from `CLIPModel`), which accelerate refuses ("Could not find the
    transformer layer class CLIPTextEmbeddings in the model").
    """
    present = {type(module).__name__ for module in model.modules()}
    listed: set[str] = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            listed.update(module._no_split_modules or ())
    return sorted(listed & present)  # a list, as transformers declares it, in a fixed order


def freeze_lmm(lmm: PreTrainedModel) -> PreTrainedModel:
    """Make `lmm` F-LMM's frozen part, in place: its language model runs the capturing `"flmm_sdpa"` attention,
    every parameter gets `requires_grad=False`, and it is put in eval mode. Returns `lmm`."""
    enable_capture(lmm)
    lmm.requires_grad_(False)
    lmm.eval()
    mark_initialized(lmm)
    return lmm


class FrozenPartsMixin:
    """`from_lmm`, `save_pretrained`, `from_pretrained` and `attach_frozen_parts` of `FLMMForGrounding`: a new
    model around given backbones, adapter-sized or full saves, and loading that attaches the frozen parts."""

    @classmethod
    def from_lmm(
        cls,
        lmm: str | PreTrainedModel,
        sam: str | SamModel | SamConfig | None = None,
        *,
        lmm_revision: str | None = None,
        sam_revision: str | None = None,
        quantization_config: QuantizationConfigMixin | dict | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        **config_overrides: Any,
    ):
        """
        A new, untrained F-LMM around a frozen backbone.

        A loaded `lmm` (and `SamModel`) is used as is, not copied, and becomes the frozen part: its language
        model's attention implementation is set to `"flmm_sdpa"` (SDPA with capture; outputs as `"sdpa"`, see
        `attention_capture`), all its parameters get `requires_grad=False` and it is put in eval mode. SAM's
        image encoder is frozen likewise (see `SamRefiner`).

        Args:
            lmm: Hub id / local folder of an image-text-to-text model, or a loaded model.
            sam: Hub id / folder of a SAM checkpoint, a loaded `SamModel`, or a `SamConfig` (random SAM, for
                tests). `None` means `facebook/sam-vit-large`; pass `use_sam=False` to build without the refiner.
            quantization_config (*optional*): quantize the LMM while it loads by name, as QLoRA's base: a
                `BitsAndBytesConfig` (4-bit / 8-bit, CUDA GPU), a `TorchAoConfig` (e.g. `Int8WeightOnlyConfig()`,
                which runs on CPU) or such a config's dict. It is recorded in `config.lmm_quantization_config`
                (so is the quantization of a loaded `lmm` that is already quantized), and `from_pretrained`
                quantizes the LMM the same way. Saves stay adapter-sized: the quantized weights are never written
                (but by `save_mode="full"`).
            dtype, device_map: passed to the LMM's `from_pretrained` when it is loaded by name.
            config_overrides: any `FLMMConfig` field (`attention_layers`, `merge`, `mode`, ...).

        Raises:
            RuntimeError / ImportError: the quantization cannot run here (bitsandbytes without a CUDA GPU, or its
                package missing); the message names the fix.
            ValueError: `quantization_config`, `dtype` or `device_map` given with an already loaded `lmm`.
        """
        config, lmm, sam = new_config(
            lmm, sam, lmm_revision=lmm_revision, sam_revision=sam_revision, quantization_config=quantization_config,
            lmm_load_kwargs={"dtype": dtype, "device_map": device_map}, **config_overrides,
        )
        return cls(config, lmm=lmm, sam=sam)

    @classmethod
    def is_remote_code(cls) -> bool:
        """transformers' test for copying the Hub code on save; False for FSDP2's run-time wrapper class, whose
        module is torch's (`save_flmm` copies the wrapped class's code instead, see `save_custom_code`)."""
        return super().is_remote_code() and fsdp_wrapped_class(cls) is None

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, save_mode: str | None = None, model_card: bool = True, **kwargs: Any
    ) -> None:
        """
        Save the trained head's weights, the config (which pins the frozen LMM and SAM by name and revision),
        the custom code (for `trust_remote_code=True`) and a model card (`README.md`).

        Args:
            save_directory: the folder to write.
            save_mode (`str`, *optional*): `"adapter"` (only the head; the frozen parts are attached by name on
                load) or `"full"` (also the frozen LMM in `lmm/` and SAM in `sam/`, each a `save_pretrained`
                folder, for offline use). Defaults to `config.save_mode`. The model's config is not changed
                beyond what transformers' own `save_pretrained` records (`architectures`, `dtype`, `auto_map`).
            model_card (`bool`, *optional*, defaults to `True`): write `README.md` (evaluation results of an
                existing card are kept).
            kwargs: passed to `PreTrainedModel.save_pretrained` (`is_main_process`, `state_dict`,
                `max_shard_size`, `push_to_hub`, `repo_id`, `token`, ...).
        """
        save_flmm(self, super().save_pretrained, save_directory, save_mode or self.config.save_mode, model_card, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: PreTrainedConfig | None = None,
        lmm: str | PreTrainedModel | None = None,
        sam: str | SamModel | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        attn_implementation: str | None = None,
        sam_dtype: torch.dtype | str = torch.float32,
        quantization_config: QuantizationConfigMixin | dict | str | None = RECORDED,
        **kwargs: Any,
    ):
        """
        Load a saved F-LMM: the trained head from `pretrained_model_name_or_path`, the frozen LMM and SAM with
        their own `from_pretrained` (from `lmm/` and `sam/` in a `full` save, else by the recorded name and
        revision), checked against the recorded architecture and shapes.

        Args:
            pretrained_model_name_or_path: Hub id or folder written by `save_pretrained`.
            lmm: override the recorded LMM (a name/folder, or a loaded model); its architecture is checked.
            sam: override the recorded SAM (a name/folder, or a loaded `SamModel`, which is used, not copied:
                it receives this model's trained prompt encoder and mask decoder).
            dtype, device_map, attn_implementation: passed to the LMM's `from_pretrained` (the language model
                then switches to the capturing SDPA attention). The head stays float32, as trained, and sits on
                the LMM's first device.
            sam_dtype: SAM's dtype (default float32: the refiner runs SAM in one dtype, and its trained prompt
                encoder and mask decoder are float32).
            quantization_config: how to quantize the LMM as it loads. `"recorded"` (the default): as the saved
                config's `lmm_quantization_config` records (unquantized when it records none); `None`: unquantized,
                whatever was recorded; or a `BitsAndBytesConfig` / `TorchAoConfig` / such a dict. A `full` save of
                a quantized model stores the LMM quantized and loads as stored. Not allowed with a loaded `lmm=`.
            kwargs: Hub arguments (`revision`, `cache_dir`, `token`, `local_files_only`, `subfolder`, ...) for
                this folder, and `output_loading_info`.

        Raises:
            OSError: the recorded base LMM or SAM cannot be found (the message says how to fix it).
            ValueError: the base found is of another architecture or shape than the recorded one.
            RuntimeError / ImportError: the recorded or given quantization cannot run on this machine
                (bitsandbytes without a CUDA GPU, or its package missing); the message names the fix.
        """
        if model_args:
            raise TypeError("FLMMForGrounding.from_pretrained takes no positional model arguments")
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = load_flmm(
            super().from_pretrained, cls.config_class, str(pretrained_model_name_or_path), config, lmm, sam, sam_dtype,
            dtype=dtype, device_map=device_map, attn_implementation=attn_implementation,
            quantization_config=quantization_config, **kwargs,
        )
        return (model, loading_info) if output_loading_info else model

    def attach_frozen_parts(self, lmm: PreTrainedModel, sam: SamModel | None) -> None:
        """Use `lmm` (and `sam`) as the frozen parts: after `from_pretrained` loaded the head around placeholders,
        or to swap in a backbone of the recorded architecture and shapes (checked; a ValueError says what
        differs). The head moves to the LMM's first device; `sam` receives the trained prompt encoder and mask
        decoder (it is used, not copied)."""
        check_backbone("LMM", self.config.lmm_config, lmm.config, f"the given {type(lmm).__name__}", LMM_FIX)
        if sam is not None:
            check_backbone("SAM", self.config.sam_config, sam.config, "the given SamModel", SAM_FIX)
        self.lmm = freeze_lmm(lmm)
        self._no_split_modules = present_no_split_modules(self)  # the attached LMM's layers (FSDP units)
        self.layout = get_image_layout(lmm.config)
        self.config.lmm_config = recorded_lmm_config(lmm)
        self.config.lmm_quantization_config = model_quantization(lmm)  # what is attached, quantized or not
        self.head.to(lmm.device)
        if sam is not None:
            # One dtype and one attention implementation for all of SAM: the loaded SAM receives the trained parts.
            self.head.attach_sam(sam.to(lmm.device))
            mark_initialized(self.head.sam_refiner.sam)

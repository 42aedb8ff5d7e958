"""A quantized frozen LMM: the quantization config an F-LMM records, restores and checks before loading.

The LMM is frozen, so it can be quantized as QLoRA's base is: with bitsandbytes 4-bit / 8-bit (CUDA GPUs) or with
torchao (weight-only int8 also runs on CPU). transformers quantizes while loading (`from_pretrained(...,
quantization_config=...)`); F-LMM records that config in `FLMMConfig.lmm_quantization_config` (a plain dict, as
`QuantizationConfigMixin.to_dict()` writes it) so that loading the adapter-sized save quantizes the backbone the
same way. The capture is unaffected: it reads the query and key states the attention function receives, never the
projection weights (see `attention_capture`).

Only torch and transformers are imported (this file is part of the Hub custom code); whether bitsandbytes or
torchao is installed is asked with `importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils.quantization_config import QuantizationConfigMixin

#: `FLMMForGrounding.from_pretrained(quantization_config=RECORDED)` (the default): quantize the LMM as the saved
#: config records (`lmm_quantization_config`); `None` loads it unquantized.
RECORDED = "recorded"

CPU_QUANTIZATION = "TorchAoConfig(Int8WeightOnlyConfig()) (torchao weight-only int8, which runs on CPU)"
_INSTALL = {"bitsandbytes": "pip install 'flmm-hf[bnb]' (bitsandbytes)", "torchao": "pip install 'flmm-hf[quant]' (torchao)"}


def is_recorded(value: Any) -> bool:
    """Whether a `quantization_config` argument is `RECORDED` (any other string is refused with a ValueError)."""
    if isinstance(value, str):
        if value != RECORDED:
            raise ValueError(
                f"quantization_config={value!r} is not understood: pass {RECORDED!r} (the default: as the saved config "
                "records), None (unquantized) or a quantization config such as BitsAndBytesConfig / TorchAoConfig."
            )
        return True
    return False


def quantization_dict(config: QuantizationConfigMixin | dict | None) -> dict | None:
    """A quantization config as the plain JSON dict F-LMM records (`quant_method` a string); None stays None."""
    if config is None:
        return None
    if isinstance(config, QuantizationConfigMixin):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(
            f"quantization_config must be a transformers quantization config (BitsAndBytesConfig, TorchAoConfig, ...) "
            f"or its dict, got {type(config).__name__}"
        )
    try:
        return json.loads(json.dumps(config))  # enums -> their string values; anything else must already be JSON
    except TypeError as error:
        raise TypeError(f"the quantization config {config!r} cannot be recorded as JSON: {error}") from error


def quantization_config_from(value: QuantizationConfigMixin | dict | None) -> QuantizationConfigMixin | None:
    """The transformers quantization config of `value` (a config object, as is, or a recorded dict); None stays None.

    Raises:
        ValueError: a dict without a known `quant_method` (the message lists what it has).
        TypeError: anything else.
    """
    if value is None or isinstance(value, QuantizationConfigMixin):
        return value
    if not isinstance(value, dict):
        raise TypeError(
            "quantization_config must be a transformers quantization config (BitsAndBytesConfig, TorchAoConfig, ...), "
            f"its dict, or None, got {type(value).__name__}"
        )
    from transformers.quantizers import AutoQuantizationConfig

    try:
        return AutoQuantizationConfig.from_dict(dict(value))
    except (ValueError, KeyError, AssertionError) as error:
        raise ValueError(
            f"the quantization config {value!r} could not be read: {error}. Fix: give a dict as "
            "`BitsAndBytesConfig(...).to_dict()` or `TorchAoConfig(...).to_dict()` writes it, with its `quant_method` "
            "('bitsandbytes', 'torchao', ...)."
        ) from error


def quant_method(config: QuantizationConfigMixin | dict) -> str:
    """The quantization method's name (`"bitsandbytes"`, `"torchao"`, ...)."""
    method = config.get("quant_method") if isinstance(config, dict) else config.quant_method
    return str(getattr(method, "value", method))


def model_quantization(model: PreTrainedModel) -> dict | None:
    """The quantization of a loaded model (the config its weights were quantized with), as a plain dict, or None."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = quantizer.quantization_config if quantizer is not None else getattr(model.config, "quantization_config", None)
    return quantization_dict(config)


def checkpoint_quantization(config: PreTrainedConfig) -> dict | None:
    """The quantization a checkpoint's own config carries (a pre-quantized checkpoint: its weights are stored
    quantized, as a `full` save of a quantized F-LMM writes them), or None."""
    return quantization_dict(getattr(config, "quantization_config", None))


def check_quantization_backend(config: QuantizationConfigMixin | dict) -> None:
    """Refuse, before any weight is read, a quantization this machine cannot run, naming the fix.

    bitsandbytes 4-bit / 8-bit needs a CUDA GPU (checked first: installing bitsandbytes would not help on a machine
    without one) and the bitsandbytes package; torchao needs the torchao package.

    Raises:
        RuntimeError: bitsandbytes without a CUDA GPU.
        ImportError: the quantization's package is not installed.
    """
    method = quant_method(config)
    if method == "bitsandbytes" and not torch.cuda.is_available():
        raise RuntimeError(
            "bitsandbytes 4-bit / 8-bit quantization of the frozen LMM needs a CUDA GPU, and this machine has none "
            f"(torch.cuda.is_available() is False). Fix: run on a CUDA GPU, quantize with {CPU_QUANTIZATION}, or pass "
            "quantization_config=None to load the LMM unquantized."
        )
    package = {"bitsandbytes": "bitsandbytes", "torchao": "torchao"}.get(method)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ImportError(
            f"{method} quantization of the frozen LMM needs the {package} package, which is not installed. Fix: "
            f"{_INSTALL[package]}, or pass quantization_config=None to load the LMM unquantized."
        )


def weight_memory_bytes(model: nn.Module) -> int:
    """Bytes held by `model`'s parameters and buffers, counting what quantized tensors store.

    A torchao quantized weight is a tensor subclass whose `numel() * element_size()` is that of the dense weight; its
    stored parts (`__tensor_flatten__`: int8 data, scales, ...) are counted instead. A bitsandbytes weight is a plain
    packed uint8 / int8 tensor, counted as stored (its small quantization state is not a tensor of the module).
    """
    seen: set[int] = set()
    total = 0

    def stored(tensor: torch.Tensor) -> int:
        if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, nn.Parameter):
            names, _ = tensor.__tensor_flatten__()
            return sum(stored(getattr(tensor, name)) for name in names)
        return tensor.numel() * tensor.element_size()

    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:  # tied weights once
            seen.add(id(tensor))
            total += stored(tensor)
    return total


def parse_quantization_config(value: str | dict | None) -> dict | None:
    """A `quantization_config` given as text (train.py's YAML mapping arrives as a JSON string, evaluate.py's
    `--quantization_config` is one) as a dict, or None."""
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"quantization_config {value!r} is not a JSON object ({error}). Fix: give a YAML mapping in the config "
            "file, or on the command line a JSON object such as "
            '\'{"quant_method": "bitsandbytes", "load_in_4bit": true}\'.'
        ) from error
    if not isinstance(parsed, dict):
        raise ValueError(f"quantization_config must be a mapping (a transformers quantization config), got {parsed!r}")
    return parsed


QUANTIZATION_FLAG_HELP = (
    "How the frozen LMM is quantized: 'recorded' (default: as the saved model records it), 'none' (unquantized), or "
    "a transformers quantization config as a JSON object, e.g. '{\"quant_method\": \"bitsandbytes\", "
    "\"load_in_4bit\": true}'. Ignored for a model passed in memory."
)


def parse_quantization_flag(value: str) -> str | dict | None:
    """A ``--quantization_config`` flag as ``FLMMForGrounding.from_pretrained`` takes it: ``"recorded"``, None
    (the flag ``none``) or the JSON object as a dict (anything else is refused with a ValueError)."""
    word = value.strip().lower()
    if word == RECORDED:
        return RECORDED
    if word == "none":
        return None
    return parse_quantization_config(value)

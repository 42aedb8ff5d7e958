"""A quantized frozen LMM: recorded in the config, reproduced on load, adapter-sized saves, clear errors.

torchao's weight-only int8 runs on CPU, so the whole path is tested with it on a tiny LLaVA-1.5-shaped model (the
capture's exactness on the quantized model is in test_attention_capture.py). bitsandbytes needs a CUDA GPU: its
config's recording and restoring, and the error on a machine without a GPU, are tested without one.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, BitsAndBytesConfig, TorchAoConfig

from flmm_hf import FLMMConfig, FLMMForGrounding, FLMMProcessor
from flmm_hf.model_card import build_model_card
from flmm_hf import quantization
from flmm_hf.quantization import (
    check_quantization_backend,
    quantization_config_from,
    quantization_dict,
    weight_memory_bytes,
)
from tiny_models import tiny_config, tiny_llava

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None,
    reason="torchao is not installed (pip install 'flmm-hf[quant]'): the CPU quantization tests need it",
)
TEXT = "two cats lying on a pink blanket."
PHRASES = ["two cats", "a pink blanket"]
# Measured on this tiny model (random weights and head): see test_loading_quantizes_as_recorded_...
COARSE_TOLERANCE = 1e-3  # max |quantized - unquantized| of the coarse mask logits
MIN_MASK_IOU = 0.98  # IoU of the quantized model's refined masks with the unquantized model's


def int8_config() -> TorchAoConfig:
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def bnb_config() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def q_proj_weight(model: FLMMForGrounding) -> torch.Tensor:
    return model.lmm.model.language_model.layers[0].self_attn.q_proj.weight


def is_torchao_quantized(weight: torch.Tensor) -> bool:
    return type(weight).__module__.startswith("torchao")


@pytest.fixture(scope="module")
def bases(tmp_path_factory, fixtures_dir):
    root = tmp_path_factory.mktemp("bases")
    tiny_llava(fixtures_dir).save_pretrained(root / "lmm")
    AutoProcessor.from_pretrained(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf").save_pretrained(root / "lmm")
    return root


def build(bases: Path, **kwargs) -> FLMMForGrounding:
    """F-LMM over the saved tiny LLaVA; coarse masks only (SAM's refiner never sees the LMM's weights, and
    it would triple the time of every forward)."""
    torch.manual_seed(0)  # the same head whether quantized or not
    return FLMMForGrounding.from_lmm(str(bases / "lmm"), use_sam=False, mask_head_channels=8, **kwargs).eval()


@pytest.fixture(scope="module")
def quantized(bases):
    return build(bases, quantization_config=int8_config())


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flmm") / "quantized"
    quantized.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inputs(bases, fixtures_dir):
    processor = FLMMProcessor(AutoProcessor.from_pretrained(bases / "lmm"))
    image = Image.open(fixtures_dir / "coco" / "images" / "000000039769.png")
    return processor(images=[image], texts=[TEXT], phrases=[PHRASES], return_sam_inputs=False)


@needs_torchao
def test_save_records_the_quantization_and_stays_adapter_sized(quantized, saved, bases, tmp_path):
    assert is_torchao_quantized(q_proj_weight(quantized))
    config = json.loads((saved / "config.json").read_text())
    assert config["lmm_quantization_config"] == json.loads(json.dumps(int8_config().to_dict()))
    assert "quantization_config" not in config["lmm_config"]  # lmm_config describes the architecture only
    # Exactly the head's trained weights, as many bytes as the unquantized model's save: no quantized LMM weight.
    stored = load_file(saved / "model.safetensors")
    assert set(stored) == {"head." + key for key in quantized.head.trained_state_dict()}
    build(bases).save_pretrained(tmp_path / "plain")
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    assert set(plain) == set(stored)
    assert sum(v.numel() * v.element_size() for v in stored.values()) == sum(
        v.numel() * v.element_size() for v in plain.values()
    )
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["lmm_quantization_config"] is None
    assert "torchao Int8WeightOnlyConfig" in (saved / "README.md").read_text()


@needs_torchao
def test_loading_quantizes_as_recorded_and_none_loads_unquantized(quantized, saved, inputs):
    loaded = FLMMForGrounding.from_pretrained(saved)
    assert is_torchao_quantized(q_proj_weight(loaded))
    assert loaded.config.lmm_quantization_config == quantized.config.lmm_quantization_config
    plain = FLMMForGrounding.from_pretrained(saved, quantization_config=None)
    assert type(q_proj_weight(plain)) is torch.nn.Parameter
    assert plain.config.lmm_quantization_config is None  # the config says what is attached
    with torch.no_grad():
        expected, ours, reference = quantized(**inputs), loaded(**inputs), plain(**inputs)
    # The same quantization of the same weights: the reloaded model is the one that was saved.
    for a, b in zip(ours.coarse_logits, expected.coarse_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # Against the unquantized LMM: close, not equal.
    coarse_diff = max((a - b).abs().max().item() for a, b in zip(ours.coarse_logits, reference.coarse_logits))
    assert 0 < coarse_diff <= COARSE_TOLERANCE
    for a, b in zip(ours.coarse_logits, reference.coarse_logits):
        ours_mask, reference_mask = a > 0, b > 0
        assert reference_mask.any() and (~reference_mask).any()  # a mask, neither empty nor full
        iou = (ours_mask & reference_mask).sum() / (ours_mask | reference_mask).sum()
        assert iou >= MIN_MASK_IOU, iou
    # Weight memory of the decoder layers (where int8 applies; the tiny model's 32k vocabulary is not quantized).
    layers = lambda model: model.lmm.model.language_model.layers  # noqa: E731
    ratio = weight_memory_bytes(layers(loaded)) / weight_memory_bytes(layers(plain))
    assert 0.25 <= ratio < 0.3, ratio  # int8 for float32, plus a float32 scale per output row


@needs_torchao
def test_a_given_quantization_config_overrides_the_recorded_one(quantized, saved, tmp_path):
    plain_folder = tmp_path / "plain"
    FLMMForGrounding.from_pretrained(saved, quantization_config=None).save_pretrained(plain_folder)
    assert json.loads((plain_folder / "config.json").read_text())["lmm_quantization_config"] is None
    assert type(q_proj_weight(FLMMForGrounding.from_pretrained(plain_folder))) is torch.nn.Parameter
    requantized = FLMMForGrounding.from_pretrained(plain_folder, quantization_config=int8_config().to_dict())
    assert is_torchao_quantized(q_proj_weight(requantized))
    assert requantized.config.lmm_quantization_config == quantized.config.lmm_quantization_config


@needs_torchao
def test_full_save_stores_the_lmm_quantized_and_loads_it_so(quantized, inputs, tmp_path):
    folder = tmp_path / "full"
    quantized.save_pretrained(folder, save_mode="full")
    assert json.loads((folder / "lmm" / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao"
    loaded = FLMMForGrounding.from_pretrained(folder)
    assert is_torchao_quantized(q_proj_weight(loaded))
    with torch.no_grad():
        for a, b in zip(loaded(**inputs).coarse_logits, quantized(**inputs).coarse_logits):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="itself quantized.*unquantized base model"):
        FLMMForGrounding.from_pretrained(folder, quantization_config=None)


def test_bitsandbytes_config_is_recorded_and_restored(tmp_path):
    bnb = bnb_config()
    config = FLMMConfig(lmm_config=tiny_config("llava"), lmm_quantization_config=bnb, use_sam=False)
    config.save_pretrained(tmp_path)
    recorded = FLMMConfig.from_pretrained(tmp_path).lmm_quantization_config
    assert recorded == quantization_dict(bnb) and recorded["quant_method"] == "bitsandbytes"
    restored = quantization_config_from(recorded)
    assert isinstance(restored, BitsAndBytesConfig)
    assert restored.load_in_4bit and restored.bnb_4bit_quant_type == "nf4" and restored.bnb_4bit_use_double_quant
    assert restored.bnb_4bit_compute_dtype == torch.bfloat16
    assert restored.to_dict() == bnb.to_dict()
    card = str(build_model_card(config))
    assert "bitsandbytes 4-bit nf4" in card and "quantization_config=None" in card


@pytest.mark.parametrize("entry", ["from_lmm", "from_pretrained"])
def test_bitsandbytes_without_a_gpu_names_the_fix(entry, bases, saved, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = r"needs a CUDA GPU.*TorchAoConfig\(Int8WeightOnlyConfig\(\)\).*quantization_config=None"
    if entry == "from_lmm":
        with pytest.raises(RuntimeError, match=expected):
            FLMMForGrounding.from_lmm(str(bases / "lmm"), use_sam=False, quantization_config=bnb_config())
        return
    folder = tmp_path / "bnb"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "config.json").read_text())
    config["lmm_quantization_config"] = quantization_dict(bnb_config())
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match=expected):
        FLMMForGrounding.from_pretrained(folder)
    unquantized = FLMMForGrounding.from_pretrained(folder, quantization_config=None)  # the fix the message names
    assert type(q_proj_weight(unquantized)) is torch.nn.Parameter


def test_missing_quantization_package_names_the_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(quantization.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("bitsandbytes", "torchao") else real(name, *a))
    with pytest.raises(ImportError, match=r"bitsandbytes package.*pip install 'flmm-hf\[bnb\]'"):
        check_quantization_backend(bnb_config())
    with pytest.raises(ImportError, match=r"torchao package.*pip install 'flmm-hf\[quant\]'"):
        check_quantization_backend({"quant_method": "torchao", "quant_type": {}})


def test_bad_quantization_arguments_are_refused(bases, saved, fixtures_dir):
    with pytest.raises(ValueError, match="quant_method"):
        quantization_config_from({"bits": 4})
    with pytest.raises(TypeError, match="quantization config"):
        quantization_config_from("nf4")
    with pytest.raises(ValueError, match="'recorded' \\(the default"):
        FLMMForGrounding.from_pretrained(saved, quantization_config="int8")
    loaded = tiny_llava(fixtures_dir)
    with pytest.raises(ValueError, match="a loaded model was given"):
        FLMMForGrounding.from_lmm(loaded, use_sam=False, quantization_config=bnb_config())
    with pytest.raises(ValueError, match="a loaded model was given as lmm="):
        FLMMForGrounding.from_pretrained(saved, lmm=loaded, quantization_config=None)


@needs_torchao
def test_train_yaml_field_quantizes_the_frozen_lmm(bases, tmp_path, monkeypatch):
    from flmm_hf.training import build_model, parse_arguments

    config_file = tmp_path / "quantized.yaml"
    config_file.write_text(
        f"lmm_name_or_path: {bases / 'lmm'}\nlmm_dtype: float32\nuse_sam: false\nmask_head_channels: 8\n"
        "quantization_config:\n  quant_method: torchao\n"
        "  quant_type: {default: {_type: Int8WeightOnlyConfig, _version: 2, _data: {}}}\n"
    )
    argv = ["--config", str(config_file), "--output_dir", str(tmp_path / "out")]
    model_args, _, _ = parse_arguments(argv)
    model = build_model(model_args)
    assert is_torchao_quantized(q_proj_weight(model))
    assert model.config.lmm_quantization_config["quant_type"]["default"]["_type"] == "Int8WeightOnlyConfig"
    # The command line overrides the file; bitsandbytes on a machine without a GPU fails before loading, naming the fix.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model_args, _, _ = parse_arguments(argv + ["--quantization_config", '{"quant_method": "bitsandbytes", "load_in_4bit": true}'])
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        build_model(model_args)
    model_args, _, _ = parse_arguments(argv + ["--quantization_config", "nf4"])
    with pytest.raises(ValueError, match="not a JSON object"):
        build_model(model_args)


@needs_torchao
def test_demo_trains_on_a_quantized_backbone_and_its_save_loads_quantized(tmp_path):
    """train.py end to end with the field on the command line: the Trainer trains the head over the int8 LMM, the
    save holds only the head and records the quantization, and the saved folder loads quantized."""
    from train import main

    from test_train import TINY_DEMO

    out = tmp_path / "demo"
    quantization = json.dumps(quantization_dict(int8_config()))
    metrics = main(["--output_dir", str(out)] + TINY_DEMO + ["--max_steps", "2", "--quantization_config", quantization])
    assert metrics["train_loss"] > 0 and "eval_miou" in metrics
    assert not any(key.startswith("lmm.") for key in load_file(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["lmm_quantization_config"] == json.loads(quantization)
    assert is_torchao_quantized(q_proj_weight(FLMMForGrounding.from_pretrained(out)))


@needs_torchao
def test_evaluate_loads_as_recorded_or_as_its_quantization_flag_says(saved, bases, tmp_path):
    from flmm_hf.evaluation import EvaluationArguments, load_model_and_processor

    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    FLMMProcessor(AutoProcessor.from_pretrained(bases / "lmm")).save_pretrained(folder)

    def load(flag: str | None) -> FLMMForGrounding:
        extra = {} if flag is None else {"quantization_config": flag}
        model, _ = load_model_and_processor(EvaluationArguments(model_name_or_path=str(folder), lmm_dtype="float32", **extra))
        return model

    assert is_torchao_quantized(q_proj_weight(load(None)))  # default: as recorded
    assert type(q_proj_weight(load("none"))) is torch.nn.Parameter
    requantized = load(json.dumps(int8_config().to_dict()))
    assert is_torchao_quantized(q_proj_weight(requantized))
    with pytest.raises(ValueError, match="is not a JSON object"):
        EvaluationArguments(model_name_or_path=str(folder), quantization_config="int8")

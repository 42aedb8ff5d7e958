"""`flmm-convert`: an original F-LMM checkpoint -> a save_pretrained folder that reproduces the original.

The fixture checkpoint (`reference/official_head`) is for 4 layers x 4 heads, LMM width 64, a 24x24
grid and SAM's standard (vit_b) mask decoder; a tiny LLaVA-1.5-shaped LMM and a tiny SAM of those
shapes are saved to folders and passed as `--lmm` / `--sam`.
"""

from __future__ import annotations

import configparser
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SamConfig,
    SamModel,
    SamVisionConfig,
)

from flmm_hf import FLMMForGrounding, FLMMProcessor, convert_original_checkpoint
from flmm_hf.convert import RELEASED_BACKBONES, convert_original_state_dict, main, resolve_backbone
from flmm_hf.mask_head import crop_to_content

ATOL = 1e-5  # as tests/test_head_refiner.py: head 0 (3.4e-6 on other CPUs), text 0, refined logits 2.4e-7
REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def save_tiny_llava(folder, fixtures_dir, layers: int = 4) -> None:
    """A random LLaVA-1.5-shaped model: `layers` x 4 heads, width 64, 336 px / patch 14, with llava-1.5's processor."""
    real = AutoConfig.from_pretrained(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=336, patch_size=14, projection_dim=32,
        ),
        text_config=LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=real.text_config.vocab_size, max_position_embeddings=1024,
        ),
        image_token_index=real.image_token_index,
        image_seq_length=576,
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    AutoProcessor.from_pretrained(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf").save_pretrained(folder)


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    folder = fixtures_dir / "reference" / "official_head"
    return folder, json.loads((folder / "reference.json").read_text()), load_file(folder / "reference_outputs.safetensors")


@pytest.fixture(scope="module")
def bases(tmp_path_factory, fixtures_dir):
    root = tmp_path_factory.mktemp("bases")
    save_tiny_llava(root / "lmm", fixtures_dir)
    vision = SamVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, mlp_dim=64, global_attn_indexes=[])
    SamModel(SamConfig(vision_config=vision)).save_pretrained(root / "sam")  # standard prompt encoder / mask decoder
    return root


@pytest.fixture(scope="module")
def converted(bases, reference, tmp_path_factory):
    """The command line, run as `python -m flmm_hf.convert` (what the `flmm-convert` script calls)."""
    folder = tmp_path_factory.mktemp("converted") / "flmm"
    command = [
        sys.executable, "-m", "flmm_hf.convert", "--checkpoint", str(reference[0] / "official_checkpoint.pth"),
        "--lmm", str(bases / "lmm"), "--sam", str(bases / "sam"), "--output-dir", str(folder),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def model(converted):
    return FLMMForGrounding.from_pretrained(converted)


def assert_close(actual, expected, atol=ATOL):
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def test_converted_model_reproduces_the_reference(model, reference):
    _, meta, outputs = reference
    with torch.no_grad():
        head = model.head
        padded = head.mask_head(outputs["attention_maps"])
        side = meta["letterbox"]["padded_side"]
        top, left = meta["letterbox"]["before_height"], meta["letterbox"]["before_width"]
        height, width = meta["image_size_hw"]
        coarse = crop_to_content(padded, (side, side), (top, left, top + height, left + width))
        texts = [head.text_projection(outputs[f"phrase{k}_hidden_states"]) for k in range(2)]
        refined = head.sam_refiner(outputs["image_embedding"], coarse, texts, meta["image_size_hw"])
    assert_close(padded, outputs["coarse_logits_padded"])
    assert_close(coarse, outputs["coarse_logits"])
    for k in range(2):
        assert_close(texts[k], outputs[f"phrase{k}_text_embeds"])
    assert_close(model.head.sam_refiner.mask_prompts(coarse, meta["sam_input_size_hw"]), outputs["prompt_masks_256"])
    assert_close(refined, outputs["refined_logits"])


def test_converted_folder_is_an_adapter_in_reproduction_mode(converted, model, reference, bases):
    config = json.loads((converted / "config.json").read_text())
    assert config["mode"] == "reproduction" and config["save_mode"] == "adapter"
    assert config["attention_numerics"] == "eager"  # the maps the released heads were trained on
    assert config["lmm_name_or_path"] == str(bases / "lmm") and config["sam_name_or_path"] == str(bases / "sam")
    assert (config["num_grids"], config["mask_head_channels"], config["mask_head_stages"]) == (1, 64, 4)
    assert model.config.mask_head_in_channels == reference[1]["in_channels"]
    checkpoint = torch.load(reference[0] / "official_checkpoint.pth", map_location="cpu", weights_only=True)
    with safe_open(converted / "model.safetensors", "pt") as f:
        assert set(f.keys()) == {f"head.{k}" for k in convert_original_state_dict(checkpoint)}  # trained parts only
    processor = FLMMProcessor.from_pretrained(converted)
    assert processor.mode == "reproduction" and processor.letterbox
    assert "official_checkpoint.pth" in (converted / "README.md").read_text()


def test_released_backbone_names_map_to_transformers_checkpoints():
    assert resolve_backbone("LLaVA-1.5-7B") == "llava-hf/llava-1.5-7b-hf"
    assert resolve_backbone("LLaVA-NeXT-Vicuna-7B") == "llava-hf/llava-v1.6-vicuna-7b-hf"
    assert resolve_backbone("LLaVA-NeXT-Mistral-7B") == "llava-hf/llava-v1.6-mistral-7b-hf"
    assert resolve_backbone("deepseek-ai/deepseek-vl-1.3b-chat") == "deepseek-community/deepseek-vl-1.3b-chat"
    assert resolve_backbone("DeepSeek-VL-7B") == "deepseek-community/deepseek-vl-7b-chat"
    assert resolve_backbone("org/some-other-model") == "org/some-other-model"
    assert set(RELEASED_BACKBONES.values()) == {
        "llava-hf/llava-1.5-7b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llava-v1.6-mistral-7b-hf",
        "deepseek-community/deepseek-vl-1.3b-chat", "deepseek-community/deepseek-vl-7b-chat",
    }


@pytest.mark.parametrize(
    "name, family", [("MiniGemini-7B-HD", "MiniGemini"), ("YanweiLi/MGM-7B", "MiniGemini"),
                     ("HyperGAI/HPT1_5-Air-Llama-3-8B-Instruct-multimodal", "HPT"), ("hpt-air", "HPT")],
)
def test_backbones_without_transformers_implementation_are_refused(name, family, reference, tmp_path, capsys):
    with pytest.raises(NotImplementedError, match=f"{family}.*no implementation in transformers"):
        convert_original_checkpoint(reference[0] / "official_checkpoint.pth", name, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "x.pth", "--lmm", name, "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "transformers port" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_backbone_shape_is_refused(reference, bases, fixtures_dir, tmp_path):
    save_tiny_llava(tmp_path / "lmm3", fixtures_dir, layers=3)
    with pytest.raises(ValueError, match="16 attention channels.*gives 12"):
        convert_original_checkpoint(
            reference[0] / "official_checkpoint.pth", str(tmp_path / "lmm3"), tmp_path / "out", sam=str(bases / "sam")
        )


def test_console_script_is_declared():
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    scripts = parser["options.entry_points"]["console_scripts"]
    assert "flmm-convert = flmm_hf.convert:main" in [line.strip() for line in scripts.splitlines()]


def test_original_prompt_templates_equal_the_paper_configs():
    """The converter's prompt per released backbone is the one its paper YAML trains with."""
    import yaml

    from flmm_hf.convert import ORIGINAL_PROMPT_TEMPLATES

    configs = Path(__file__).resolve().parents[1] / "configs"
    seen = set()
    for path in configs.glob("*.yaml"):
        settings = yaml.safe_load(path.read_text())
        if settings.get("lmm_name_or_path") in ORIGINAL_PROMPT_TEMPLATES:
            assert settings["prompt_template"] == ORIGINAL_PROMPT_TEMPLATES[settings["lmm_name_or_path"]], path.name
            seen.add(settings["lmm_name_or_path"])
    assert seen == set(ORIGINAL_PROMPT_TEMPLATES)

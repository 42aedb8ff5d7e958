"""backbone_support(): every image-text-to-text model type of the installed transformers is answered.

A transformers release that adds a family makes test_every_model_type_of_the_mapping_is_classified
and test_committed_table_is_current fail, naming the new model types and how to regenerate the table.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PretrainedConfig
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

import flmm_hf
from flmm_hf import image_layout
from flmm_hf.image_layout import (
    FAMILIES,
    REFUSED,
    BackboneSupport,
    SquareLayout,
    backbone_support,
    backbone_table,
    get_image_layout,
    image_text_to_text_model_types,
    register_family,
)

TABLE = Path(__file__).resolve().parents[1] / "docs" / "backbones.md"


def _config(model_type: str, **kwargs) -> PretrainedConfig:
    config = PretrainedConfig(image_token_id=9, **kwargs)
    config.model_type = model_type
    return config


def test_every_model_type_of_the_mapping_is_classified():
    support = backbone_support()
    assert list(support) == image_text_to_text_model_types() and len(support) > 0
    unclassified = sorted(mt for mt, s in support.items() if s.status == "unclassified")
    assert not unclassified, (
        f"transformers has image-text-to-text model types flmm_hf has not classified: {unclassified}. "
        "Register a layout (register_family in flmm_hf/image_layout.py) or add a one-line reason to REFUSED, then "
        "regenerate docs/backbones.md with `python -m flmm_hf.backbones --write docs/backbones.md`."
    )
    for model_type, s in support.items():
        assert isinstance(s, BackboneSupport) and s.model_type == model_type
        if s.status == "supported":
            assert FAMILIES[model_type].layout is not None and s.layout and s.reason is None, model_type
        else:
            assert s.status == "refused" and s.layout is None, model_type
            assert s.reason and s.reason.strip() and "\n" not in s.reason, model_type
        assert s.dynamic_resolution == (model_type in FAMILIES and FAMILIES[model_type].dynamic_resolution)
    assert flmm_hf.backbone_support is backbone_support


def test_a_model_type_is_either_supported_or_refused():
    with_layout = {mt for mt, family in FAMILIES.items() if family.layout is not None}
    assert not with_layout & set(REFUSED), "a model type has both a layout and a refusal; drop its REFUSED entry"
    support = backbone_support()
    assert support["llava"] == BackboneSupport("llava", "supported", layout="LlavaLayout | PixtralGridLayout (_llava)")
    assert support["gemma3"].layout == "SquareLayout (_gemma3)"
    assert support["qwen2_vl"].dynamic_resolution
    assert "Q-Former" in support["blip-2"].reason and "encoder-decoder" in support["florence2"].reason
    assert "cross-attention" in support["mllama"].reason and "discrete" in support["chameleon"].reason


def test_committed_table_is_current():
    assert TABLE.read_text(encoding="utf-8") == backbone_table(), (
        "docs/backbones.md differs from backbone_support() of the installed transformers (a family added or "
        "removed, or a layout / reason changed). Regenerate it: python -m flmm_hf.backbones --write docs/backbones.md"
    )


def test_cli_writes_the_table(tmp_path, capsys):
    from flmm_hf.backbones import main

    main(["--write", str(tmp_path / "docs" / "backbones.md")])
    assert (tmp_path / "docs" / "backbones.md").read_text(encoding="utf-8") == backbone_table()
    main([])
    assert capsys.readouterr().out == backbone_table()


@pytest.mark.parametrize("model_type", ["blip-2", "mllama", "florence2", "chameleon"])
def test_a_refused_model_type_of_the_mapping_raises_with_its_reason(model_type: str):
    # a perfect-square count would have taken the fallback before: refused now
    with pytest.raises(ValueError) as error:
        get_image_layout(_config(model_type, image_seq_length=16))
    message = str(error.value)
    assert model_type in message and REFUSED[model_type] in message
    assert "register_family" in message and "ImageLayout" in message


def test_an_unclassified_model_type_of_the_mapping_raises(monkeypatch):
    # what a transformers release with a new family looks like
    monkeypatch.setattr(image_layout, "image_text_to_text_model_types", lambda: ["llava", "brand_new_vlm"])
    assert backbone_support()["brand_new_vlm"].status == "unclassified"
    with pytest.raises(ValueError, match=r"'brand_new_vlm'.*not classified.*register_family"):
        get_image_layout(_config("brand_new_vlm", image_seq_length=16))


def test_out_of_mapping_model_types_fall_back_to_a_square_with_a_warning():
    assert "my_new_vlm" not in image_text_to_text_model_types()
    logger = hf_logging.get_logger(image_layout.__name__)
    with CaptureLogger(logger) as captured:
        layout = get_image_layout(_config("my_new_vlm", image_seq_length=16))
    assert "my_new_vlm" in captured.out and "square" in captured.out and isinstance(layout, SquareLayout)
    assert torch.equal(layout.grids(torch.tensor([1] + [9] * 16))[0], torch.arange(1, 17).view(4, 4))
    # answered, but not as supported: the fallback is a guess
    assert backbone_support(["my_new_vlm"])["my_new_vlm"].status == "refused"


def test_registering_a_layout_lifts_a_refusal():
    try:
        register_family("blip-2", lambda config: SquareLayout(config, 4))
        assert backbone_support(["blip-2"])["blip-2"].status == "supported"
        assert isinstance(get_image_layout(_config("blip-2")), SquareLayout)
    finally:
        FAMILIES.pop("blip-2")
    assert backbone_support(["blip-2"])["blip-2"].status == "refused"


def test_mllama_refusal_states_its_attention_shapes():
    """The facts mllama's refusal rests on (docs/cross-attention.md), on a tiny random Llama 3.2 Vision: the
    self-attention layers see only the text (the image is one <|image|> token), and only the cross-attention
    layers reach the image, with keys = max_images * max_num_tiles * (P*P + 1) vision states, not sequence
    positions. F-LMM refuses it rather than reading those keys at token positions."""
    from transformers import AttentionInterface, MllamaConfig, MllamaForConditionalGeneration
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from flmm_hf.attention_capture import language_attention_modules

    calls = []

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        mask_shape = None if attention_mask is None else tuple(attention_mask.shape)
        calls.append((type(module).__name__, module.layer_idx, key.shape[2], mask_shape))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("flmm_test_recording_sdpa", recording_sdpa)
    image_id, patch, side, tiles = 299, 7, 28, 4
    config = MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=4, image_size=side, patch_size=patch, max_num_tiles=tiles,
                           intermediate_layers_indices=[0], vision_output_dim=64),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, cross_attention_layers=[1, 3], vocab_size=300, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2),
        image_token_index=image_id,
    )
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config).eval()
    model.model.language_model.set_attn_implementation("flmm_test_recording_sdpa")
    input_ids = torch.tensor([[1, image_id, 5, 6, 7, 8]])
    # one image on a 1 x 2 canvas (aspect ratio id 2 of the default supported ratios), padded to 4 tiles;
    # the text after <|image|> sees its two real tiles
    cross_attention_mask = torch.zeros(1, 6, 1, tiles, dtype=torch.long)
    cross_attention_mask[0, 1:, 0, :2] = 1
    with torch.no_grad():
        model(input_ids=input_ids, pixel_values=torch.randn(1, 1, tiles, 3, side, side),
              aspect_ratio_ids=torch.tensor([[2]]), aspect_ratio_mask=torch.tensor([[[1, 1, 0, 0]]]),
              cross_attention_mask=cross_attention_mask)
    keys_per_tile = (side // patch) ** 2 + 1  # a CLS, then the P x P patches
    assert calls == [
        ("MllamaTextSelfAttention", 0, 6, None),
        ("MllamaTextCrossAttention", 1, tiles * keys_per_tile, (1, 1, 6, tiles * keys_per_tile)),
        ("MllamaTextSelfAttention", 2, 6, None),
        ("MllamaTextCrossAttention", 3, tiles * keys_per_tile, (1, 1, 6, tiles * keys_per_tile)),
    ]
    # the capture's generic module search does not fit either: mllama's decoder-layer classes
    # (Mllama{Self,Cross}AttentionDecoderLayer) also carry "Attention" and a layer_idx
    with pytest.raises(ValueError, match="Two attention modules claim layer 0"):
        language_attention_modules(model)
    support = backbone_support(["mllama"])["mllama"]
    assert support.status == "refused" and "max_num_tiles * (P*P + 1)" in support.reason
    with pytest.raises(ValueError, match="cross-attention"):
        get_image_layout(config)

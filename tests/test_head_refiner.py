"""The U-Net head, the text projection and the SAM refiner against the original F-LMM outputs.

`shared/fixtures/reference/official_head` holds a checkpoint in the original code's key layout
(16 input channels, 4 LMM layers of width 64, segment_anything prompt encoder + mask decoder) and
the outputs of every stage computed with mmsegmentation / segment_anything. Converted into our
modules, every stage must reproduce them.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import SamConfig, SamVisionConfig

from flmm_hf.convert import convert_original_state_dict
from flmm_hf.flmm_head import FLMMHead
from flmm_hf.losses import mask_losses
from flmm_hf.mask_head import UNetMaskHead, crop_to_content
from flmm_hf.sam_refiner import SamRefiner, TextProjection, sam_input_size

ATOL = 1e-5  # measured: 0 for the head on the CPU that made the fixture and 3.4e-6 on an AMD EPYC (oneDNN picks
# other convolution kernels per CPU), 3.2e-6 in its channels-last training layout; 0 for crop, text and mask
# prompts; 2.4e-7 for the refined logits


def tiny_sam_config() -> SamConfig:
    """SAM with the standard prompt encoder / mask decoder and a one-layer, 32-wide vision encoder."""
    vision = SamVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=1, mlp_dim=64, global_attn_indexes=[]
    )
    return SamConfig(vision_config=vision)


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    folder = fixtures_dir / "reference" / "official_head"
    meta = json.loads((folder / "reference.json").read_text())
    outputs = load_file(folder / "reference_outputs.safetensors")
    checkpoint = torch.load(folder / "official_checkpoint.pth", map_location="cpu", weights_only=True)
    return meta, outputs, checkpoint


@pytest.fixture(scope="module")
def modules(reference):
    """Our head with the converted official weights: every trained key loaded, only SAM's frozen parts left out."""
    meta, _, checkpoint = reference
    state_dict = convert_original_state_dict(checkpoint)
    head = FLMMHead(meta["in_channels"], meta["layers"], meta["lmm_hidden_size"], sam=tiny_sam_config()).eval()
    assert set(state_dict) == set(head.trained_state_dict())
    result = head.load_state_dict(state_dict, strict=False)
    assert not result.unexpected_keys
    frozen = ("sam_refiner.sam.vision_encoder.", "sam_refiner.sam.shared_image_embedding.")
    assert result.missing_keys and all(k.startswith(frozen) for k in result.missing_keys)
    return head.mask_head, head.text_projection, head.sam_refiner


def assert_close(actual, expected, atol=ATOL):
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def test_convert_covers_all_trained_keys(reference):
    _, _, checkpoint = reference
    original = checkpoint["state_dict"]
    converted = convert_original_state_dict(original)
    # Everything but the frozen LMM key is kept; the wrapper {'state_dict': ...} is accepted too.
    assert len(converted) == len([k for k in original if not k.startswith("llava.")])
    assert not any(k.startswith("llava.") for k in converted)
    assert converted.keys() == convert_original_state_dict(checkpoint).keys()
    prefixes = ("mask_head.", "text_projection.layer_weights", "text_projection.proj.")
    prefixes += ("sam_refiner.sam.prompt_encoder.", "sam_refiner.sam.mask_decoder.")
    assert all(k.startswith(prefixes) for k in converted)
    # The LayerNorm of SAM's mask downscaling keeps its weights (segment_anything index 1 -> layer_norm1).
    torch.testing.assert_close(
        converted["sam_refiner.sam.prompt_encoder.mask_embed.layer_norm1.weight"],
        original["sam.model.prompt_encoder.mask_downscaling.1.weight"],
    )


def test_convert_rejects_unknown_keys(reference):
    _, _, checkpoint = reference
    state_dict = dict(checkpoint["state_dict"])
    state_dict["mask_head.mystery.weight"] = torch.zeros(1)
    state_dict["sam.model.mask_decoder.extra_token.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="mask_head.mystery.weight") as error:
        convert_original_state_dict(state_dict)
    assert "sam.model.mask_decoder.extra_token.weight" in str(error.value)


def test_head_stages(reference, modules):
    meta, outputs, _ = reference
    head = modules[0]
    with torch.no_grad():
        padded = head(outputs["attention_maps"])  # inference: NCHW as mmseg ran it
        head.train()  # training on CPU runs channels-last: equal to float rounding
        try:
            trained_layout = head(outputs["attention_maps"])
        finally:
            head.eval()
    assert_close(padded, outputs["coarse_logits_padded"])  # 0 where the fixture was made, 3.4e-6 elsewhere
    assert_close(trained_layout, outputs["coarse_logits_padded"])  # 3.2e-6
    assert not torch.equal(trained_layout, padded)  # the layout switch did change the computation

    side = meta["letterbox"]["padded_side"]
    top, left = meta["letterbox"]["before_height"], meta["letterbox"]["before_width"]
    height, width = meta["image_size_hw"]
    cropped = crop_to_content(padded, (side, side), (top, left, top + height, left + width))
    assert_close(cropped, outputs["coarse_logits"])
    assert cropped.shape[-2:] == (48, 64)  # 64 x 64 canvas logits, rows 8..56 hold the 480 x 640 image


def test_crop_to_content_rounding():
    logits = torch.arange(64 * 64, dtype=torch.float32).view(1, 64, 64)
    torch.testing.assert_close(crop_to_content(logits, (640, 640), (80, 0, 560, 640)), logits[:, 8:56])
    # A 427 x 640 image letterboxed to 640: offset truncated (10.6 -> 10), extent rounded (42.7 -> 43).
    torch.testing.assert_close(crop_to_content(logits, (640, 640), (106, 0, 533, 640)), logits[:, 10:53])


def test_head_shapes_and_parameter_count():
    head = UNetMaskHead(1024)  # LLaVA-1.5-7B: 32 layers x 32 heads
    assert sum(p.numel() for p in head.parameters()) == 7_772_609
    small = UNetMaskHead(4, base_channels=8)
    assert small(torch.rand(3, 4, 24, 24)).shape == (3, 64, 64)
    assert small(torch.rand(2, 4, 20, 30)).shape == (2, 42, 64)  # 30 -> 64 wide, 20 * 64/30 -> 42 tall
    assert small(torch.rand(1, 4, 70, 70)).shape == (1, 70, 70)  # no upsampling; padded to 72 and cropped


def test_text_embeds(reference, modules):
    _, outputs, _ = reference
    text_projection = modules[1]
    for k in range(2):
        with torch.no_grad():
            embeds = text_projection(outputs[f"phrase{k}_hidden_states"])
        assert_close(embeds, outputs[f"phrase{k}_text_embeds"])


def test_refiner_prompts(reference, modules):
    meta, outputs, _ = reference
    refiner = modules[2]
    original_size = meta["image_size_hw"]
    assert list(sam_input_size(original_size)) == meta["sam_input_size_hw"]
    coarse = outputs["coarse_logits"]
    assert_close(refiner.mask_prompts(coarse, meta["sam_input_size_hw"]), outputs["prompt_masks_256"])
    boxes = refiner.box_prompts(coarse, original_size)
    assert boxes.tolist() == [[float(v) for v in box] for box in meta["boxes_xyxy"]]


def test_box_prompts_of_drawn_masks(modules):
    refiner = modules[2]
    logits = torch.full((3, 12, 16), -5.0)
    logits[0, 3:6, 4:10] = 5.0  # rows 3..5, cols 4..9
    logits[2, 11, 15] = 5.0  # a single pixel in the corner
    boxes = refiner.box_prompts(logits, (12, 16))  # same size: no resampling
    assert boxes.tolist() == [[4, 3, 10, 6], [0, 0, 16, 12], [15, 11, 16, 12]]  # mask 1 is empty: whole image
    # SAM coordinates of a 480 x 640 image (input 768 x 1024): x * 1.6, y * 1.6.
    scaled = refiner.scale_boxes(torch.tensor([[4.0, 3.0, 10.0, 6.0]]), (480, 640))
    torch.testing.assert_close(scaled, torch.tensor([[6.4, 4.8, 16.0, 9.6]]))


def test_refined_logits(reference, modules):
    meta, outputs, _ = reference
    refiner = modules[2]
    texts = [outputs["phrase0_text_embeds"], outputs["phrase1_text_embeds"]]  # 3 and 5 tokens
    with torch.no_grad():
        refined = refiner(outputs["image_embedding"], outputs["coarse_logits"], texts, meta["image_size_hw"])
    assert_close(refined, outputs["refined_logits"])

    # Phrases with equal token counts run as one batch: phrase 0 twice (a group of 2) + phrase 1.
    coarse = outputs["coarse_logits"]
    with torch.no_grad():
        grouped = refiner(
            outputs["image_embedding"], coarse[[0, 1, 0]], [texts[0], texts[1], texts[0]], meta["image_size_hw"]
        )
    assert_close(grouped, outputs["refined_logits"][[0, 1, 0]])


def test_refiner_matches_segment_anything_layer_norm(reference, modules):
    """With transformers' LayerNorm eps (1e-6) the refined logits drift; the default restores them."""
    meta, outputs, _ = reference
    refiner = modules[2]
    assert all(layer.layer_norm1.eps == 1e-5 for layer in refiner.sam.mask_decoder.transformer.layers)
    hf_eps = SamRefiner(tiny_sam_config(), match_segment_anything=False).eval()
    hf_eps.load_state_dict(refiner.state_dict())
    texts = [outputs["phrase0_text_embeds"], outputs["phrase1_text_embeds"]]
    with torch.no_grad():
        refined = hf_eps(outputs["image_embedding"], outputs["coarse_logits"], texts, meta["image_size_hw"])
    assert (refined - outputs["refined_logits"]).abs().max() > ATOL / 10


def test_gradients_reach_trained_parts_only():
    torch.manual_seed(0)
    layers, heads, hidden = 2, 2, 16
    head = UNetMaskHead(layers * heads, base_channels=8)
    text_projection = TextProjection(layers, hidden)
    refiner = SamRefiner(tiny_sam_config()).train()
    assert not refiner.sam.vision_encoder.training
    assert not any(p.requires_grad for p in refiner.sam.vision_encoder.parameters())

    maps = torch.rand(2, layers * heads, 24, 24)
    coarse = crop_to_content(head(maps), (640, 640), (80, 0, 560, 640))
    hidden_states = [torch.randn(layers, 3, hidden), torch.randn(layers, 1, hidden)]
    texts = [text_projection(h) for h in hidden_states]
    image_embeddings = refiner.image_embeddings(torch.randn(1, 3, 1024, 1024))
    assert image_embeddings.shape == (1, 256, 64, 64) and not image_embeddings.requires_grad
    refined = refiner(image_embeddings, coarse, texts, (480, 640))
    assert refined.shape == (2, 480, 640)

    gt = torch.zeros(2, 480, 640, dtype=torch.bool)
    gt[0, 100:300, 200:400] = True
    coarse_losses, refined_losses = mask_losses(coarse, gt), mask_losses(refined, gt)
    total = sum(losses["loss_bce"] + losses["loss_dice"] for losses in (coarse_losses, refined_losses))
    total.backward()

    def has_grad(param):
        return param.grad is not None and param.grad.abs().sum() > 0

    assert all(has_grad(p) for p in head.parameters())
    assert all(has_grad(p) for p in text_projection.parameters())
    prompt = refiner.sam.prompt_encoder
    for param in (prompt.mask_embed.conv1.weight, prompt.point_embed[2].weight, prompt.point_embed[3].weight):
        assert has_grad(param)
    decoder = refiner.sam.mask_decoder
    first_attention = decoder.transformer.layers[0].self_attn
    for param in (decoder.mask_tokens.weight, decoder.upscale_conv1.weight, first_attention.q_proj.weight):
        assert has_grad(param)
    assert all(p.grad is None for p in refiner.sam.vision_encoder.parameters())
    assert prompt.shared_embedding.positional_embedding.grad is None  # a buffer in segment_anything


def test_refiner_from_loaded_sam_model_shares_parts():
    from transformers import SamModel

    sam = SamModel(tiny_sam_config()).eval()
    refiner = SamRefiner(sam)
    assert refiner.sam is sam  # used as is: its own methods give the image embeddings and positional encoding
    assert not any(p.requires_grad for p in sam.vision_encoder.parameters())
    assert set(refiner.trained_modules()) == {"sam.prompt_encoder", "sam.mask_decoder"}
    assert sam.mask_decoder.transformer.layers[0].layer_norm1.eps == 1e-5

"""Every supported backbone family runs through FLMMForGrounding: capture -> layout -> head -> loss."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, answer_mask, build_tiny, image_sizes

from flmm_hf import FLMMForGrounding
from flmm_hf.image_layout import get_image_layout


@pytest.mark.parametrize("family", FAMILIES)
def test_family_forward_and_loss(family):
    lmm, inputs = build_tiny(family)
    # the 3 answer tokens of each example: the first two are phrase 0, the last phrase 1
    answer = answer_mask(inputs)
    phrase_ids = torch.full_like(inputs["input_ids"], -1)
    for b in range(answer.shape[0]):
        positions = answer[b].nonzero().flatten()
        phrase_ids[b, positions[:2]] = 0
        phrase_ids[b, positions[2:]] = 1
    sizes = image_sizes(family)  # original (H, W) of each example's image
    original = torch.tensor(sizes)
    boxes = torch.tensor([[0, 0, h, w] for h, w in sizes])
    generator = torch.Generator().manual_seed(0)
    masks = [torch.rand(2, h, w, generator=generator) > 0.5 for h, w in sizes]

    torch.manual_seed(0)
    model = FLMMForGrounding.from_lmm(lmm, use_sam=False, mask_head_channels=8)
    layout = get_image_layout(lmm.config)
    text_config = lmm.config.get_text_config(decoder=True)
    assert model.config.num_grids == layout.num_grids
    assert model.config.mask_head_in_channels == (
        layout.num_grids * text_config.num_hidden_layers * text_config.num_attention_heads
    )
    output = model(
        **inputs, phrase_ids=phrase_ids, original_sizes=original, canvas_sizes=original, content_boxes=boxes,
        masks=masks,
    )
    assert torch.isfinite(output.loss)
    for logits in output.coarse_logits:
        assert logits.shape[0] == 2 and logits.dim() == 3
    maps = model.phrase_attention(**inputs, phrase_ids=phrase_ids, original_sizes=original)
    assert all(m.shape[:2] == (2, model.config.mask_head_in_channels) for m in maps)

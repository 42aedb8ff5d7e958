"""Image-token layouts: every family's grids put each image token where the image has it.

The geometry test runs the family's real image processor and a tiny model whose vision
encoder layers are made identity (attention and MLP outputs zeroed by hooks, so the residual
stream carries each patch on its own; patch embedding, pooling, pixel shuffle, merging and
projection stay, and they are local). Painting a small square into the ORIGINAL image then
changes only the language-model input embeddings of the image tokens that see that square;
in every grid, the most-changed token must be the cell that covers the square on the canvas.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import PretrainedConfig
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

import tiny_models as tm
from flmm_hf import image_layout
from flmm_hf.image_layout import (
    FAMILIES,
    Family,
    HunYuanVLLayout,
    LlavaNextLayout,
    SquareLayout,
    example_image_inputs,
    get_family,
    get_image_layout,
    register_family,
    register_image_layout,
    stack_grids,
)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _batch_grids(layout, inputs: dict) -> list[list[torch.Tensor]]:
    """``layout.grids`` of every example of a padded processor batch."""
    return [
        layout.grids(inputs["input_ids"][b], example_image_inputs(inputs, b)) for b in range(inputs["input_ids"].shape[0])
    ]


def _cell_at(y: float, x: float, grid_size, canvas_size) -> tuple[int, int]:
    """The (row, col) of the grid cell that covers canvas pixel (y, x): every grid spans the whole canvas."""
    gh, gw = grid_size
    ch, cw = (float(v) for v in canvas_size)
    return min(int(y * gh / ch), gh - 1), min(int(x * gw / cw), gw - 1)


def _identity_vision_encoder(model: torch.nn.Module) -> list:
    """Zero the attention and MLP outputs of every vision-encoder layer (hooks; returns handles)."""

    def zero(module, args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]),) + output[1:]
        return torch.zeros_like(output)

    handles = []
    for name, module in model.named_modules():
        in_vision = any(part in name for part in ("vision_tower", "vision_model", "vision_encoder", "visual", "image_tower"))
        in_layer = any(part in name for part in (".layers.", ".layer.", ".blocks."))
        leaf_name = name.rsplit(".", 1)[-1]
        if in_vision and in_layer and leaf_name in ("self_attn", "attention", "attn", "mlp", "feed_forward"):
            handles.append(module.register_forward_hook(zero))
    assert handles, "no vision encoder layer found to neutralise"
    return handles


def _lm_input_embeds(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The inputs_embeds [B, L, D] the language model receives (image features scattered in)."""
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.get_decoder().register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return captured["embeds"]


def _deep_point(grid_shapes: list[tuple[int, int]], corner: int) -> tuple[float, float, float]:
    """A canvas point (fractions y, x) far from every cell boundary of every grid, and that margin.

    Margin = the smallest distance to a boundary, in cells, over the grids and both axes.
    The point is searched in the bottom-left (corner 0) or top-right (corner 1) part of the
    canvas: off the diagonal and off the first row, so that a transposed grid, or rows shifted
    by a stray column (e.g. LLaVA-NeXT's newlines), put it in a different cell.
    """
    low, high = np.linspace(0.05, 0.4, 60), np.linspace(0.6, 0.95, 60)
    ys, xs = (high, low) if corner == 0 else (low, high)
    best = (-1.0, 0.5, 0.5)
    for fy in ys:
        for fx in xs:
            margin = min(
                min(abs(f * n - round(f * n)) for f, n in ((fy, gh), (fx, gw))) for gh, gw in grid_shapes
            )
            if margin > best[0]:
                best = (margin, fy, fx)
    return best[1], best[2], best[0]


def _paint(image: Image.Image, fy: float, fx: float, half: float) -> Image.Image:
    """Copy of ``image`` with a saturated square of half-size ``half`` px centred at (fy*H, fx*W)."""
    arr = np.array(image).copy()
    h, w = arr.shape[:2]
    cy, cx = fy * h, fx * w
    y0, y1 = int(np.floor(cy - half)), int(np.ceil(cy + half))
    x0, x1 = int(np.floor(cx - half)), int(np.ceil(cx + half))
    arr[max(y0, 0) : y1, max(x0, 0) : x1] = (255, 0, 255)
    return Image.fromarray(arr)


# --------------------------------------------------------------------------------------------
# per-family geometry
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", tm.FAMILIES)
def test_grid_positions_follow_image_geometry(family: str, padding_side: str = "left"):
    model, _ = tm.build_tiny(family)
    layout = get_image_layout(model.config)
    sizes = tm.image_sizes(family)
    images = tm.make_images(sizes, seed=3)
    inputs = tm.build_inputs(family, images=images, padding_side=padding_side)
    # original (H, W) per example: what the processor reports and tiled layouts may need
    inputs["original_sizes"] = torch.tensor(sizes)
    grids = _batch_grids(layout, inputs)

    assert len(grids) == 2
    image_positions = inputs["input_ids"] == tm.IMAGE_ID
    for b, example_grids in enumerate(grids):
        assert len(example_grids) == layout.num_grids
        for grid in example_grids:
            assert grid.dtype == torch.long and grid.dim() == 2
            assert image_positions[b, grid.flatten()].all(), "a grid position is not an image token"
            assert grid.flatten().unique().numel() == grid.numel(), "a position appears twice in a grid"

    # paint one square per example, deep inside one cell of each of its grids
    points, painted = [], []
    for b, image in enumerate(images):
        fy, fx, margin = _deep_point([tuple(g.shape) for g in grids[b]], corner=b)
        assert margin > 0.2, f"no point well inside the cells of {[tuple(g.shape) for g in grids[b]]}"
        finest = max(max(g.shape[0] / sizes[b][0], g.shape[1] / sizes[b][1]) for g in grids[b])
        points.append((fy, fx))
        painted.append(_paint(image, fy, fx, half=0.5 * margin / finest))
    painted_inputs = tm.build_inputs(family, images=painted, padding_side=padding_side)
    assert torch.equal(painted_inputs["input_ids"], inputs["input_ids"])

    handles = _identity_vision_encoder(model)
    try:
        clean = _lm_input_embeds(model, {k: v for k, v in inputs.items() if k != "original_sizes"})
        dirty = _lm_input_embeds(model, painted_inputs)
    finally:
        for h in handles:
            h.remove()
    change = (dirty - clean).norm(dim=-1)  # [B, L]
    assert change[~image_positions].abs().max() == 0, "text embeddings must not change"

    for b, (fy, fx) in enumerate(points):
        H, W = sizes[b]
        for g, grid in enumerate(grids[b]):
            row, col = _cell_at(fy * H, fx * W, tuple(grid.shape), (H, W))
            grid_change = change[b, grid]  # [h, w]
            assert grid_change.max() > 0, f"{family}: painting changed nothing in grid {g}"
            got = divmod(int(grid_change.argmax()), grid.shape[1])
            assert got == (row, col), (
                f"{family} example {b} grid {layout.grid_names[g]} {tuple(grid.shape)}: the painted square "
                f"at canvas ({fy * H:.1f}, {fx * W:.1f}) should be cell {(row, col)}, most change at {got}"
            )


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_grids_cover_all_patch_tokens(family: str):
    """Every image token is in some grid except the newline column of LLaVA-NeXT-like layouts (and HunYuan-VL's
    newline column and begin / end tokens)."""
    layout = get_image_layout(tm.tiny_config(family))
    inputs = tm.build_inputs(family)
    inputs["original_sizes"] = torch.tensor(tm.image_sizes(family))
    for b, example_grids in enumerate(_batch_grids(layout, inputs)):
        covered = torch.cat([g.flatten() for g in example_grids]).unique()
        image_pos = torch.nonzero(inputs["input_ids"][b] == tm.IMAGE_ID).flatten()
        # LLaVA-NeXT-like layouts: one newline token per high-res row
        n_newlines = example_grids[1].shape[0] if isinstance(layout, LlavaNextLayout) else 0
        if isinstance(layout, HunYuanVLLayout):
            n_newlines = example_grids[0].shape[0] + 2
        assert covered.numel() == image_pos.numel() - n_newlines


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_grids_move_with_padding(family: str):
    """Right padding gives the left-padding grids shifted by each example's padding length."""
    layout = get_image_layout(tm.tiny_config(family))
    sizes = torch.tensor(tm.image_sizes(family))
    left = tm.build_inputs(family, padding_side="left")
    right = tm.build_inputs(family, padding_side="right")
    left["original_sizes"] = right["original_sizes"] = sizes
    assert (left["attention_mask"] == 0).any(), "the batch should need padding"
    for b, (gl, gr) in enumerate(zip(_batch_grids(layout, left), _batch_grids(layout, right))):
        pad = int((left["attention_mask"][b] == 0).sum())
        for a, c in zip(gl, gr):
            assert torch.equal(a - pad, c)


def test_llava_next_grids_are_base_then_unpadded_high_res():
    config = tm.tiny_config("llava_next")
    layout = get_image_layout(config)
    assert (layout.num_grids, layout.main_grid) == (2, 1)
    inputs = tm.build_inputs("llava_next")
    base, high = layout.grids(inputs["input_ids"][0], example_image_inputs(inputs, 0))
    # 40x60 image -> 56x56 pinpoint (2x2 crops of 7x7) -> 14x14, rows cut to 10 by un-padding
    assert tuple(base.shape) == (7, 7) and tuple(high.shape) == (10, 14)
    # the base grid comes first; each high-res row is followed by one (dropped) newline token
    assert int(base.max()) < int(high.min())
    assert torch.equal(high[1, 0] - high[0, -1], torch.tensor(2))


def test_llava_onevision_caps_the_high_res_grid():
    config = tm.tiny_config("llava_onevision")
    layout = get_image_layout(config)
    # 40x60 -> LLaVA-NeXT's 10x14 un-padded grid; anyres_max_1 allows 1 crop of 7x7: ratio 1.69 -> 5x8
    assert layout.high_res_shape((40, 60)) == (5, 8)
    base, high = layout.grids(tm.build_inputs("llava_onevision")["input_ids"][0], {"image_sizes": torch.tensor([40, 60])})
    assert tuple(base.shape) == (7, 7) and tuple(high.shape) == (5, 8)
    # within the cap (ratio <= 1.1) the grid is LLaVA-NeXT's
    config.vision_aspect_ratio = "anyres_max_9"
    assert get_image_layout(config).high_res_shape((40, 60)) == (10, 14)


def test_tiled_layouts_read_row_col_info_or_infer_it():
    sizes = tm.image_sizes("idefics3")
    images = tm.make_images(sizes)
    processed = tm.image_processor("idefics3")(images=[[im] for im in images], return_tensors="pt")
    inputs = tm.build_inputs("idefics3", images=images)
    layout = get_image_layout(tm.tiny_config("idefics3"))
    for b in range(2):
        ids = inputs["input_ids"][b]
        explicit = layout.grids(ids, {"rows": torch.tensor(processed["rows"][b]), "cols": torch.tensor(processed["cols"][b])})
        inferred = layout.grids(ids, {"original_sizes": torch.tensor(sizes[b])})
        assert all(torch.equal(e, i) for e, i in zip(explicit, inferred))
    with pytest.raises(ValueError, match="original_sizes"):
        layout.grids(inputs["input_ids"][0], {})


def test_video_llama_3_reads_the_merge_size_of_each_image():
    layout = get_image_layout(tm.tiny_config("video_llama_3"))
    ids = torch.tensor([5] + [tm.IMAGE_ID] * 24 + [6])
    # a 4x6-patch image: 24 tokens unmerged (the processor's default for images), 6 with merge 2
    (grid,) = layout.grids(ids, {"image_grid_thw": torch.tensor([1, 4, 6]), "image_merge_sizes": torch.tensor(1)})
    assert torch.equal(grid, torch.arange(1, 25).view(4, 6))
    (grid,) = layout.grids(ids[:7], {"image_grid_thw": torch.tensor([1, 4, 6]), "image_merge_sizes": torch.tensor(2)})
    assert tuple(grid.shape) == (2, 3)
    with pytest.raises(ValueError, match="image_merge_sizes"):
        layout.grids(ids, {"image_grid_thw": torch.tensor([1, 4, 6])})


def test_ovis2_reads_the_tile_grid_from_its_indicator_tokens():
    layout = get_image_layout(tm.tiny_config("ovis2"))
    start, grid_id, col, row, end = tm.OVIS2_INDICATORS
    view = [tm.IMAGE_ID] * 16
    # a 2x3 crop: global view, then tiles row-major with <IMG_COL> inside rows and <IMG_ROW> between them
    tiles = [(view + [col]) * 2 + view + [row], (view + [col]) * 2 + view]
    ids = torch.tensor([5, start] + view + [grid_id] + tiles[0] + tiles[1] + [end])
    stitched, global_view = layout.grids(ids)
    assert tuple(stitched.shape) == (8, 12) and tuple(global_view.shape) == (4, 4)
    assert torch.equal(global_view, torch.arange(2, 18).view(4, 4))  # the global view comes first
    first_tile_of_row_1 = 2 + 16 + 1 + 3 * 16 + 3  # after the global view, <IMG_GRID>, a row of 3 tiles and 3 separators
    assert int(stitched[4, 0]) == first_tile_of_row_1
    # not cropped: one view, returned as both grids
    single = layout.grids(torch.tensor([start] + view + [grid_id, end]))
    assert torch.equal(single[0], single[1])
    with pytest.raises(ValueError, match="ovis2.*mismatch"):
        layout.grids(torch.tensor([start] + view + [grid_id] + view + [row] + [end]))  # 2 rows claimed, 1 tile


def test_granite_docling_fine_route_has_four_times_the_tokens_per_tile():
    """tile_fine_mask (the processor's fine_route=True): 8x8 tokens per tile instead of 4x4, still in place."""
    inputs = tm.build_inputs("granite_docling_fine")
    inputs["original_sizes"] = torch.tensor(tm.image_sizes("granite_docling_fine"))
    assert bool(inputs["tile_fine_mask"].all())
    layout = get_image_layout(tm.tiny_config("granite_docling_fine"))
    tiles, global_view = layout.grids(inputs["input_ids"][0], example_image_inputs(inputs, 0))
    assert tuple(global_view.shape) == (8, 8) and tuple(tiles.shape) == (16, 24)  # 40x60 page: 2x3 tiles
    test_grid_positions_follow_image_geometry("granite_docling_fine")
    # the coarse layout of a config without the fine path refuses fine inputs
    with pytest.raises(ValueError, match="use_fine_route"):
        get_image_layout(tm.tiny_config("granite_docling")).grids(inputs["input_ids"][0], example_image_inputs(inputs, 0))


def test_llava_full_strategy_drops_the_cls_token():
    config = tm.tiny_config("llava")
    config.vision_feature_select_strategy = "full"
    ids = torch.tensor([5] + [tm.IMAGE_ID] * 50 + [6])
    (grid,) = get_image_layout(config).grids(ids)
    assert torch.equal(grid, torch.arange(2, 51).view(7, 7))


# --------------------------------------------------------------------------------------------
# errors and fallback
# --------------------------------------------------------------------------------------------
def test_more_than_one_image_per_example_is_rejected():
    layout = get_image_layout(tm.tiny_config("llava"))
    one = [5] + [tm.IMAGE_ID] * 49 + [6]
    two = torch.tensor(one + one)
    with pytest.raises(ValueError, match="one image per example"):
        layout.grids(two)
    qwen = get_image_layout(tm.tiny_config("qwen2_vl"))
    inputs = tm.build_inputs("qwen2_vl")
    with pytest.raises(ValueError, match="one image per example"):
        qwen.grids(inputs["input_ids"][0], {"image_grid_thw": inputs["image_grid_thw"]})


@pytest.mark.parametrize(
    "family",
    ["llava", "llava_next", "qwen2_vl", "mistral3", "idefics3", "internvl", "vipllava", "llava_onevision", "aya_vision",
     "shieldgemma2", "qwen3_vl", "video_llama_3", "ovis2", "llava_pixtral", "lighton_ocr", "qianfan_ocr",
     "granite_docling"],
)
def test_token_count_mismatch_is_rejected(family: str):
    layout = get_image_layout(tm.tiny_config(family))
    inputs = tm.build_inputs(family)
    inputs["original_sizes"] = torch.tensor(tm.image_sizes(family))
    ids = inputs["input_ids"][0].clone()
    ids[torch.nonzero(ids == tm.IMAGE_ID)[-1]] = 7  # one image token fewer
    with pytest.raises(ValueError, match=f"{layout.model_type}.*(mismatch|multiple)"):
        layout.grids(ids, example_image_inputs(inputs, 0))


def _unknown_config(**kwargs) -> PretrainedConfig:
    config = PretrainedConfig(image_token_id=9, **kwargs)
    config.model_type = "my_new_vlm"
    return config


def test_unknown_square_family_falls_back_with_warning():
    logger = hf_logging.get_logger(image_layout.__name__)
    with CaptureLogger(logger) as captured:
        layout = get_image_layout(_unknown_config(image_seq_length=16))
    assert "my_new_vlm" in captured.out and "square" in captured.out
    ids = torch.tensor([1, 2] + [9] * 16 + [3])
    (grid,) = layout.grids(ids)
    assert torch.equal(grid, torch.arange(2, 18).view(4, 4))


def test_unknown_non_square_family_is_a_clear_error():
    with pytest.raises(ValueError, match=r"my_new_vlm.*register_image_layout"):
        get_image_layout(_unknown_config(image_seq_length=15))
    # no count in the config: decided from the tokens
    layout = get_image_layout(_unknown_config())
    assert tuple(layout.grids(torch.tensor([9] * 9))[0].shape) == (3, 3)
    with pytest.raises(ValueError, match=r"my_new_vlm.*ImageLayout"):
        layout.grids(torch.tensor([9] * 10))


# --------------------------------------------------------------------------------------------
# stacking grids and the canvas mapping
# --------------------------------------------------------------------------------------------
def test_stack_grids_resizes_to_main_grid_and_concatenates():
    K, C = 3, 5
    base, high = torch.rand(K, C, 7, 7), torch.rand(K, C, 10, 14)
    stacked = stack_grids([base, high], main_grid=1)
    assert stacked.shape == (K, 2 * C, 10, 14)
    assert torch.equal(stacked[:, C:], high)  # main grid untouched
    expected = torch.nn.functional.interpolate(base, size=(10, 14), mode="bilinear", align_corners=False)
    assert torch.allclose(stacked[:, :C], expected)
    # a constant map stays constant through the resize
    assert torch.allclose(stack_grids([torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 8, 8)], 1)[:, 0], torch.ones(1, 8, 8))

    layout = get_image_layout(tm.tiny_config("idefics3"))
    out = layout.stack([torch.rand(K, C, 8, 12), torch.rand(K, C, 4, 4)])
    assert out.shape == (K, 2 * C, 8, 12)
    with pytest.raises(ValueError, match="expected 2 grids"):
        layout.stack([torch.rand(K, C, 8, 12)])


# --------------------------------------------------------------------------------------------
# the family registry
# --------------------------------------------------------------------------------------------
SUPPORTED = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "paligemma", "gemma3", "deepseek_vl", "idefics3",
             "smolvlm", "internvl", "mistral3", "vipllava", "video_llava", "llava_next_video", "llava_onevision",
             "aya_vision", "shieldgemma2", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe", "glm46v",
             "video_llama_3", "paddleocr_vl", "ernie4_5_vl_moe", "qwen2_5_omni_thinker", "qwen3_omni_moe_thinker",
             "ovis2", "glm_ocr", "janus", "lighton_ocr", "qianfan_ocr", "granite_docling",
             # issue #15
             "exaone4_5", "hyperclovax_vision_v2", "cosmos3_omni", "glmga", "cohere_compass", "cosmos3_edge", "hunyuan_vl")
DYNAMIC = {"llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "internvl", "mistral3",
           "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe", "glm46v", "video_llama_3", "paddleocr_vl",
           "ernie4_5_vl_moe", "qwen2_5_omni_thinker", "qwen3_omni_moe_thinker", "ovis2", "glm_ocr",
           "llava_onevision", "llava_next_video", "idefics2", "pixtral", "aya_vision", "lighton_ocr", "qianfan_ocr",
           "granite_docling",
           # issue #15
           "exaone4_5", "hyperclovax_vision_v2", "cosmos3_omni", "glmga", "cohere_compass", "cosmos3_edge", "hunyuan_vl"}


@pytest.fixture
def traits_only():
    """A model type registered for its processor traits alone (no layout), removed afterwards."""
    register_family("my_traits_only_vlm", dynamic_resolution=True)
    yield "my_traits_only_vlm"
    FAMILIES.pop("my_traits_only_vlm", None)


def test_registry_holds_layout_and_processor_traits_per_model_type():
    # the spec names of tm.FAMILIES are model types, but for model-type variants (llava_pixtral is a llava config)
    assert {tm.tiny_config(family).model_type for family in tm.FAMILIES} <= set(SUPPORTED)
    for model_type in SUPPORTED:
        assert FAMILIES[model_type].layout is not None, model_type
    assert {mt for mt, family in FAMILIES.items() if family.dynamic_resolution} == DYNAMIC
    # families without a layout yet are registered only for their dynamic-resolution processors
    assert all(family.dynamic_resolution for family in FAMILIES.values() if family.layout is None)
    assert get_family("my_new_vlm") is None and get_family(None) is None


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_get_image_layout_uses_the_registered_factory(family: str):
    config = tm.tiny_config(family)
    layout = get_image_layout(config)
    assert layout.model_type == config.model_type
    assert type(layout) is type(FAMILIES[config.model_type].layout(config))


def test_register_family_and_register_image_layout(traits_only):
    class SquareFromCount(SquareLayout):
        def __init__(self, config):
            super().__init__(config, side=None)

    assert get_family(traits_only) == Family(layout=None, dynamic_resolution=True)
    try:
        register_family("my_new_vlm", SquareFromCount, dynamic_resolution=True)
        assert type(get_image_layout(_unknown_config(image_seq_length=15))) is SquareFromCount  # no fallback, no error
        # a layout registered alone keeps the family's processor traits
        register_image_layout("my_new_vlm", SquareLayout)
        assert get_family("my_new_vlm") == Family(SquareLayout, dynamic_resolution=True)
        register_image_layout(traits_only, SquareFromCount)
        assert get_family(traits_only) == Family(SquareFromCount, dynamic_resolution=True)
    finally:
        FAMILIES.pop("my_new_vlm", None)


def test_registered_family_without_layout_takes_the_square_fallback(traits_only):
    # a model type registered for its processor trait only, outside transformers' mapping (in-mapping ones without a
    # layout are refused, see test_backbone_support.py)
    config = _unknown_config(image_seq_length=16)
    config.model_type = traits_only
    logger = hf_logging.get_logger(image_layout.__name__)
    with CaptureLogger(logger) as captured:
        layout = get_image_layout(config)
    assert traits_only in captured.out and isinstance(layout, SquareLayout) and layout.side == 4

"""Several images per prompt: the phrases are grounded in one chosen image; the others are context.

The geometry test paints a square into the CHOSEN image only (vision encoder made identity, as in
``test_image_layout``): the most-changed token of every grid ``example_grids`` returns must be the cell that
covers the square, and the other images' tokens must not change (so the grid is the chosen image's block).
"""
from __future__ import annotations

import pytest
import torch
from test_image_layout import _cell_at, _deep_point, _identity_vision_encoder, _lm_input_embeds, _paint

import tiny_models as tm
from flmm_hf import FLMMForGrounding, FLMMProcessor
from flmm_hf.grounded_chat import generate_with_attention, ground_generated_tokens
from flmm_hf.image_layout import (
    FAMILIES,
    PER_IMAGE_KEYS,
    example_image_inputs,
    get_image_layout,
    images_per_example,
    several_image_layouts,
)

# a fixed grid, a dynamic grid with several image_grid_thw rows, a tiled family, and two more
SEVERAL = ["llava", "qwen2_vl", "internvl", "llava_next", "mistral3", "hunyuan_vl", "llava_pixtral", "lighton_ocr", "exaone4_5"]
GROUNDED = [0, 1]  # example 0 is grounded in its first image, example 1 in its second (the default: last)


def _two_image_examples(family: str, seed: int = 3):
    """Two examples of two images each ((s0, s1) and (s1, s0) of the family's sizes) and their grounded sizes."""
    s0, s1 = tm.image_sizes(family)
    a, b, c, d = tm.make_images([s0, s1, s1, s0], seed=seed)
    per_example = [[a, b], [c, d]]
    sizes = [[s0, s1], [s1, s0]]
    grounded_sizes = [sizes[e][k] for e, k in enumerate(GROUNDED)]
    return per_example, sizes, grounded_sizes


def _with_choice(inputs: dict, grounded_sizes) -> dict:
    return dict(inputs, image_index=torch.tensor(GROUNDED), original_sizes=torch.tensor(grounded_sizes))


def _layout_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values")}


@pytest.mark.parametrize("family", SEVERAL)
def test_painted_square_in_the_chosen_image_lands_in_its_cell(family: str):
    model, _ = tm.build_tiny(family)
    layout = get_image_layout(model.config)
    per_example, _, grounded_sizes = _two_image_examples(family)
    inputs = _with_choice(tm.build_inputs(family, images=per_example), grounded_sizes)
    counts = images_per_example(inputs, 2)
    assert counts == [2, 2]
    grids = [layout.example_grids(inputs["input_ids"][b], example_image_inputs(inputs, b, counts)) for b in range(2)]

    points, painted = [], [list(ims) for ims in per_example]
    for b, k in enumerate(GROUNDED):
        fy, fx, margin = _deep_point([tuple(g.shape) for g in grids[b]], corner=b)
        assert margin > 0.2
        H, W = grounded_sizes[b]
        finest = max(max(g.shape[0] / H, g.shape[1] / W) for g in grids[b])
        points.append((fy, fx))
        painted[b][k] = _paint(per_example[b][k], fy, fx, half=0.5 * margin / finest)
    painted_inputs = tm.build_inputs(family, images=painted)
    assert torch.equal(painted_inputs["input_ids"], inputs["input_ids"])

    model_keys = [k for k in painted_inputs if k != "num_images"]
    handles = _identity_vision_encoder(model)
    try:
        clean = _lm_input_embeds(model, {k: inputs[k] for k in model_keys})
        dirty = _lm_input_embeds(model, {k: painted_inputs[k] for k in model_keys})
    finally:
        for h in handles:
            h.remove()
    change = (dirty - clean).norm(dim=-1)  # [B, L]
    for b, (fy, fx) in enumerate(points):
        H, W = grounded_sizes[b]
        in_grids = torch.zeros_like(change[b], dtype=torch.bool)
        for g, grid in enumerate(grids[b]):
            in_grids[grid.flatten()] = True
            row, col = _cell_at(fy * H, fx * W, tuple(grid.shape), (H, W))
            got = divmod(int(change[b, grid].argmax()), grid.shape[1])
            assert change[b, grid].max() > 0, f"{family} example {b}: grid {g} is not the painted image's block"
            assert got == (row, col), f"{family} example {b} grid {g}: expected cell {(row, col)}, got {got}"
        # only the chosen image was painted: no image token outside its grids changes (LLaVA-NeXT's newlines too)
        other_images = (inputs["input_ids"][b] == tm.IMAGE_ID) & ~in_grids
        assert change[b, other_images].max() == 0


def _example_alone(family: str, inputs: dict, per_example, b: int) -> dict:
    """Example ``b`` of a batch as a batch of its own: its real tokens, and its images through the processor."""
    keep = inputs["attention_mask"][b].bool()
    alone = {k: inputs[k][b : b + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    alone.update(tm.image_inputs_of(family, per_example[b]))
    alone.update(num_images=inputs["num_images"][b : b + 1], image_index=inputs["image_index"][b : b + 1],
                 original_sizes=inputs["original_sizes"][b : b + 1])
    return alone


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
def test_batch_of_several_images_equals_per_example(family: str):
    lmm, _ = tm.build_tiny(family)
    torch.manual_seed(0)
    model = FLMMForGrounding.from_lmm(lmm, use_sam=False, mask_head_channels=8)
    per_example, _, grounded_sizes = _two_image_examples(family)
    # the second example has one image only: num_images differ within the batch
    per_example[1] = per_example[1][1:]
    inputs = _with_choice(tm.build_inputs(family, images=per_example), grounded_sizes)
    inputs["image_index"] = torch.tensor([0, 0])
    phrase_ids = torch.where(tm.answer_mask(inputs), 0, -1)
    batch_maps = model.phrase_attention(**inputs, phrase_ids=phrase_ids)
    for b in range(2):
        alone = _example_alone(family, inputs, per_example, b)
        keep = inputs["attention_mask"][b].bool()
        (maps,) = model.phrase_attention(**alone, phrase_ids=phrase_ids[b : b + 1, keep])
        torch.testing.assert_close(batch_maps[b], maps, rtol=1e-4, atol=1e-6)
    # example 0's maps lie on its FIRST image's grid (for qwen2_vl the second image's grid has another shape)
    layout = get_image_layout(lmm.config)
    first = tm.build_inputs(family, images=per_example[0][:1])
    grids = layout.grids(first["input_ids"][0], dict(example_image_inputs(first, 0),
                                                        original_sizes=torch.tensor(grounded_sizes[0])))
    assert batch_maps[0].shape[-2:] == grids[layout.main_grid].shape


def test_several_images_without_num_images_are_refused():
    inputs = tm.build_inputs("qwen2_vl", images=[tm.make_images([(40, 60), (60, 30)]), tm.make_images([(40, 60)])])
    inputs.pop("num_images")
    with pytest.raises(ValueError, match="3 rows of image_grid_thw for 2 images.*need num_images"):
        images_per_example(inputs, 2)
    # LLaVA has no per-image rows: its layout sees twice the tokens of one image
    llava = tm.build_inputs("llava", images=[tm.make_images([(40, 40), (40, 40)]), tm.make_images([(40, 40)])])
    layout = get_image_layout(tm.tiny_config("llava"))
    with pytest.raises(ValueError, match="2 times the 49 of one image.*num_images"):
        layout.example_grids(llava["input_ids"][0], example_image_inputs(llava, 0))


def test_family_without_image_blocks_refuses_several_images_and_bad_index():
    inputs = tm.build_inputs("idefics3", images=[tm.make_images([(40, 60), (60, 30)])])
    layout = get_image_layout(tm.tiny_config("idefics3"))
    with pytest.raises(ValueError, match="idefics3: an example with 2 images.*one image per example"):
        layout.example_grids(inputs["input_ids"][0], example_image_inputs(inputs, 0, [2]))
    assert "idefics3" not in several_image_layouts() and "qwen2_vl" in several_image_layouts()
    onevision = tm.build_inputs("llava_onevision", images=[tm.make_images([(40, 60), (60, 30)])])
    with pytest.raises(ValueError, match="llava_onevision: an example with 2 images"):
        get_image_layout(tm.tiny_config("llava_onevision")).example_grids(
            onevision["input_ids"][0], example_image_inputs(onevision, 0, [2]))
    assert "llava_onevision" not in several_image_layouts()
    qwen = tm.build_inputs("qwen2_vl", images=[tm.make_images([(40, 60), (60, 30)])])
    with pytest.raises(ValueError, match="image_index 2 is out of range for its 2 image"):
        example_image_inputs(dict(qwen, image_index=torch.tensor([2])), 0, [2])
    assert set(PER_IMAGE_KEYS) >= {"image_grid_thw", "image_sizes"}


def test_processor_and_ground_with_a_reference_and_a_target(fixtures_dir):
    processor = tm.llava_flmm_processor(fixtures_dir)
    reference, target = tm.make_images([(30, 50), (60, 40)], seed=1)
    text = "the red square."
    inputs = processor(images=[[reference, target], target], texts=[text, text], phrases=[["the red square"]] * 2,
                       ground_image=0, return_sam_inputs=False)
    assert inputs["num_images"].tolist() == [2, 1] and inputs["image_index"].tolist() == [0, 0]
    assert inputs["original_sizes"].tolist() == [[30, 50], [60, 40]]  # the grounded images' sizes
    assert inputs["pixel_values"].shape[0] == 3
    n_image = (inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum(1)
    assert n_image.tolist() == [2 * 576, 576]
    one = processor(images=[reference, target], texts=[text, text], phrases=[["the red square"]] * 2,
                    return_sam_inputs=False)
    assert "num_images" not in one and "image_index" not in one  # one image per example: the batch is unchanged
    with pytest.raises(ValueError, match="example 1: ground_image 1 is out of range for its 1 image"):
        processor(images=[[reference, target], target], texts=[text, text], phrases=[["the red square"]] * 2,
                  ground_image=1)

    model = tm.tiny_flmm(fixtures_dir)
    default = model.ground([reference, target], text, ["the red square"], processor=processor, use_refiner=False)
    assert default.shape == (1, 60, 40)  # the last image
    masks = model.ground([reference, target], text, ["the red square"], processor=processor, ground_image=0)
    assert masks.shape == (1, 30, 50) and masks.dtype == torch.bool


# --------------------------------------------------------------------------------------------
# video as time x grid (Qwen2-VL / Qwen2.5-VL)
# --------------------------------------------------------------------------------------------
VIDEO_ID = tm.IMAGE_ID - 1  # the tiny Qwen configs' video_token_id


def _video_inputs(family: str, frames) -> dict:
    """One example holding one video of ``len(frames)`` temporal slices (each slice: one frame, shown twice)."""
    per_frame = [tm.image_inputs_of(family, [frame]) for frame in frames]
    t_h_w = per_frame[0]["image_grid_thw"][0].tolist()
    grid_thw = torch.tensor([[len(frames), t_h_w[1], t_h_w[2]]])
    n = len(frames) * t_h_w[1] * t_h_w[2] // 4  # merge 2 x 2
    ids = [tm.BOS_ID, 17, 18, tm.WRAP_OPEN_ID] + [VIDEO_ID] * n + [tm.WRAP_CLOSE_ID, 19, 20, 21, 22, 23]
    input_ids = torch.tensor([ids])
    return {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == VIDEO_ID).long() * 2,  # 2: video
        # a video's patches are its slices' patches, slice after slice (the image processor doubles a frame in time)
        "pixel_values_videos": torch.cat([p["pixel_values"] for p in per_frame]), "video_grid_thw": grid_thw,
    }


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_square_painted_in_frame_t_is_found_in_slice_t(family: str):
    model, _ = tm.build_tiny(family)
    layout = get_image_layout(model.config)
    H, W = tm.image_sizes(family)[0]
    frames = tm.make_images([(H, W)] * 3, seed=5)
    inputs = _video_inputs(family, frames)
    slices = [layout.frame_grids(inputs["input_ids"][0], {"video_grid_thw": inputs["video_grid_thw"][0]}, t)
              for t in range(3)]
    (grid0,), (grid1,), (grid2,) = slices
    assert grid0.shape == grid1.shape and grid0.max() < grid1.min() and grid1.max() < grid2.min()  # time-major
    points = {}
    painted = list(frames)
    for t, corner in ((0, 0), (2, 1)):  # frames 0 and 2 painted at different places, frame 1 untouched
        fy, fx, margin = _deep_point([tuple(grid0.shape)], corner=corner)
        points[t] = (fy, fx)
        painted[t] = _paint(frames[t], fy, fx, half=0.5 * margin * H / grid0.shape[0])
    handles = _identity_vision_encoder(model)
    try:
        clean = _lm_input_embeds(model, inputs)
        dirty = _lm_input_embeds(model, _video_inputs(family, painted))
    finally:
        for h in handles:
            h.remove()
    change = (dirty - clean).norm(dim=-1)[0]
    assert change[slices[1][0]].max() == 0, "an unpainted frame changed"
    for t, (fy, fx) in points.items():
        (grid,) = slices[t]
        row, col = _cell_at(fy * H, fx * W, tuple(grid.shape), (H, W))
        assert divmod(int(change[grid].argmax()), grid.shape[1]) == (row, col), f"{family} slice {t}"
        other = slices[2 - t][0]
        assert change[other].argmax() != change[grid].argmax() or change[other].max() == 0

    # the model grounds phrases in slice t: maps on one slice's grid, equal to the captured columns of that slice
    torch.manual_seed(0)
    flmm = FLMMForGrounding.from_lmm(model, use_sam=False, mask_head_channels=8)
    phrase_ids = torch.full_like(inputs["input_ids"], -1)
    phrase_ids[0, -3:] = 0
    size = torch.tensor([[H, W]])
    maps = {t: flmm.phrase_attention(**inputs, phrase_ids=phrase_ids, original_sizes=size,
                                     video_frame=torch.tensor([t]))[0] for t in range(3)}
    assert maps[1].shape == (1, flmm.config.mask_head_in_channels, *grid1.shape)
    attentions, _ = flmm.capture_attention(inputs["input_ids"], inputs["attention_mask"], phrase_ids, False,
                                           video_frame=torch.tensor([1]), pixel_values_videos=inputs["pixel_values_videos"],
                                           video_grid_thw=inputs["video_grid_thw"],
                                           mm_token_type_ids=inputs["mm_token_type_ids"])
    columns = grid1 - int(grid0.min())  # the video tokens are the only captured columns here
    expected = attentions[0].mean(2).flatten(0, 1)[:, columns]  # [C, h, w]
    torch.testing.assert_close(maps[1][0], expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(maps[0], maps[1])
    output = flmm(**inputs, phrase_ids=phrase_ids, original_sizes=size, canvas_sizes=size,
                  content_boxes=torch.tensor([[0, 0, H, W]]), video_frame=torch.tensor([2]),
                  masks=[torch.zeros(1, H, W, dtype=torch.bool)])
    assert torch.isfinite(output.loss) and output.coarse_logits[0].shape[0] == 1


def test_video_frames_are_refused_where_no_time_x_grid_is_written():
    for family in ("llava_next_video", "video_llava", "llava_onevision", "qwen3_vl"):
        layout = get_image_layout(tm.tiny_config(family))
        with pytest.raises(ValueError, match=f"{family}: grounding in a video frame .*not supported.*qwen2_vl"):
            layout.frame_grids(torch.tensor([VIDEO_ID] * 8), {}, 0)
    layout = get_image_layout(tm.tiny_config("qwen2_vl"))
    with pytest.raises(ValueError, match="video_frame 3 is out of range for a video of 3 temporal slices"):
        layout.frame_grids(torch.tensor([VIDEO_ID] * 12), {"video_grid_thw": torch.tensor([3, 4, 4])}, 3)
    with pytest.raises(ValueError, match="one video per example"):
        layout.frame_grids(torch.tensor([VIDEO_ID] * 24), {"video_grid_thw": torch.tensor([3, 4, 4])}, 0)


# --------------------------------------------------------------------------------------------
# review fixes: chat over several images, per-video rows, wrapped templates, messages, empty lists
# --------------------------------------------------------------------------------------------
def test_chat_grounds_in_the_chosen_image_of_several(fixtures_dir):
    processor = tm.llava_flmm_processor(fixtures_dir)
    model = tm.tiny_flmm(fixtures_dir)
    reference, target = tm.make_images([(30, 50), (60, 40)], seed=1)
    answer = generate_with_attention(model, [reference, target], "What is it?", processor, max_new_tokens=3,
                                     ground_image=0)
    assert answer.inputs["num_images"].tolist() == [2] and answer.inputs["image_index"].tolist() == [0]
    assert answer.attentions.shape[-1] == 2 * 576  # both images' tokens are captured; image 0's are laid out
    every_token = torch.ones(1, len(answer.token_ids), dtype=torch.bool)
    coarse = ground_generated_tokens(model, answer, every_token, [reference, target], use_refiner=False)
    assert coarse.shape[0] == 1 and coarse.shape[-2:] != (0, 0)
    # without the processor's SAM inputs the refiner prepares the GROUNDED image (the reference), not the last
    with_sam = generate_with_attention(model, [reference, target], "What is it?", processor, max_new_tokens=3,
                                       ground_image=0, return_sam_inputs=True)
    assert torch.equal(with_sam.token_ids, answer.token_ids)
    fallback = ground_generated_tokens(model, answer, every_token, [reference, target], use_refiner=True)
    given = ground_generated_tokens(model, with_sam, every_token, [reference, target], use_refiner=True)
    assert fallback.shape == (1, 30, 50)
    torch.testing.assert_close(fallback, given, rtol=1e-4, atol=1e-4)
    start, end = next(span for span in answer.token_spans if span[1] > span[0])
    result = model.chat([reference, target], "What is it?", phrases=[(start, end)], processor=processor,
                        max_new_tokens=3, use_refiner=False, ground_image=0)
    assert result.masks.shape == (1, 30, 50)  # the reference's size
    assert model.chat([reference, target], "What is it?", phrases=[(start, end)], processor=processor,
                      max_new_tokens=3, use_refiner=False).masks.shape == (1, 60, 40)  # default: the last image


def test_video_grid_rows_are_per_video_not_per_example():
    grid = torch.tensor([[3, 4, 4]])  # one video in a batch of two examples
    with pytest.raises(ValueError, match="video_frame needs one video per example: video_grid_thw has 1 rows for 2"):
        example_image_inputs({"video_grid_thw": grid, "video_frame": torch.tensor([0, -1])}, 1)
    # no example grounded in a frame: the rows are never read, so an example without a video takes none
    for frames in (None, torch.tensor([-1, -1])):
        inputs = {"video_grid_thw": grid, "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 6]])}
        if frames is not None:
            inputs["video_frame"] = frames
        assert "video_grid_thw" not in example_image_inputs(inputs, 1)
    both = {"video_grid_thw": torch.tensor([[3, 4, 4], [2, 4, 6]]), "video_frame": torch.tensor([0, 1])}
    assert example_image_inputs(both, 1)["video_grid_thw"].tolist() == [2, 4, 6]


def test_wrapped_image_slot_of_a_prompt_template_is_repeated_per_image(fixtures_dir):
    from transformers import AutoProcessor

    backbone = AutoProcessor.from_pretrained(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf")
    wrapped = FLMMProcessor(backbone, prompt_template="<|im_start|>user\n<|vision_start|>{image}<|vision_end|>{question}")
    assert wrapped.build_prompt("Q", 2) == (
        "<|im_start|>user\n<|vision_start|><image><|vision_end|><|vision_start|><image><|vision_end|>Q")
    assert wrapped.build_prompt("Q") == "<|im_start|>user\n<|vision_start|><image><|vision_end|>Q"
    # a tag on one side only is not a wrapper (Mistral's [INST], a turn header): the images are just repeated
    for template, expected in (("USER: {image}\n{question} ASSISTANT:", "USER: <image><image>\nQ ASSISTANT:"),
                               ("[INST]{image}{question}[/INST]", "[INST]<image><image>Q[/INST]"),
                               ("<start_of_turn>user\n{image}{question}", "<start_of_turn>user\n<image><image>Q")):
        assert FLMMProcessor(backbone, prompt_template=template).build_prompt("Q", 2) == expected


def test_refusals_say_what_to_pass_and_name_model_types():
    layout = get_image_layout(tm.tiny_config("llava_next_video"))
    split = torch.tensor([tm.IMAGE_ID] * 5 + [5] + [tm.IMAGE_ID] * 5)
    with pytest.raises(ValueError, match="^llava_next_video: image tokens are not contiguous: .*num_images and "
                                         "image_index"):
        layout.grids(split, {"image_sizes": torch.tensor([40, 60])})
    internvl = tm.build_inputs("internvl", images=[tm.make_images([(40, 60), (60, 30)])])
    with pytest.raises(ValueError, match="^internvl: several runs of image tokens: .*num_images and image_index"):
        get_image_layout(tm.tiny_config("internvl")).grids(internvl["input_ids"][0], {})
    with pytest.raises(ValueError, match="t=2, a video's grid.*video_grid_thw.*video_frame"):
        get_image_layout(tm.tiny_config("qwen2_vl")).grids(torch.tensor([tm.IMAGE_ID] * 8),
                                                          {"image_grid_thw": torch.tensor([2, 4, 4])})
    supported = several_image_layouts()
    assert set(supported) <= set(FAMILIES) and {"llava", "gemma3", "qwen2_vl", "internvl", "mistral3"} <= set(supported)
    assert not {"llava_onevision", "granite_docling", "idefics3", "smolvlm", "aya_vision", "ovis2"} & set(supported)
    with pytest.raises(ValueError, match=r"several images: .*\bqwen2_vl\b"):
        get_image_layout(tm.tiny_config("idefics3")).image_blocks(torch.tensor([tm.IMAGE_ID]), {}, 2)


def test_granite_docling_takes_the_fine_path_when_tile_fine_mask_is_present():
    inputs = tm.build_inputs("granite_docling_fine")
    inputs["original_sizes"] = torch.tensor(tm.image_sizes("granite_docling_fine"))
    layout = get_image_layout(tm.tiny_config("granite_docling_fine"))
    fine = layout.grids(inputs["input_ids"][0], example_image_inputs(inputs, 0))
    inputs["tile_fine_mask"] = torch.zeros_like(inputs["tile_fine_mask"])  # the model reads presence, not values
    grids = layout.grids(inputs["input_ids"][0], example_image_inputs(inputs, 0))
    assert all(torch.equal(a, b) for a, b in zip(grids, fine))


def test_an_empty_list_of_images_is_refused_with_its_example(fixtures_dir):
    processor = tm.llava_flmm_processor(fixtures_dir)
    (image,) = tm.make_images([(30, 50)])
    with pytest.raises(ValueError, match="example 1: an empty list of images"):
        processor(images=[[image], []], texts=["a", "b"], return_sam_inputs=False)
    with pytest.raises(ValueError, match="example 0: an empty list of images"):
        processor(images=[[]], texts=["a"])

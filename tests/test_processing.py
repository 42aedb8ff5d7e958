"""FLMMProcessor with the real LLaVA-1.5 and SmolVLM processors, real RefCOCO expressions and COCO images."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from flmm_hf.grounded_chat import find_phrases
from flmm_hf.image_layout import FAMILIES, Family
from flmm_hf.processing_flmm import (
    FLMMProcessor,
    PhraseMatch,
    backbone_family,
    letterbox_geometry,
    match_phrases,
    processor_model_types,
    resolve_phrase_spans,
    sam_preprocess,
    to_rgb,
)

LLAVA_IMAGE_TOKEN = 32000
IMAGE_FILES = {
    157714: "COCO_train2014_000000157714.jpg",  # 640x480 (W x H)
    363252: "COCO_train2014_000000363252.jpg",  # 375x500
    460370: "COCO_train2014_000000460370.jpg",  # 640x427
}


@pytest.fixture(scope="module")
def llava(fixtures_dir):
    return FLMMProcessor.from_pretrained(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf")


@pytest.fixture(scope="module")
def smolvlm(fixtures_dir):
    return FLMMProcessor.from_pretrained(fixtures_dir / "tokenizers" / "SmolVLM-256M-Instruct", mode="native")


@pytest.fixture(scope="module")
def refcoco(fixtures_dir):
    """Per image, the reference "concat" answer and its phrases: the first sentence of each ref."""
    examples = []
    for name in ("refcoco_unc_val_3images.json", "refcoco+_unc_val_3images.json"):
        refs = json.loads((fixtures_dir / "refcoco" / name).read_text())
        by_image: dict[int, list[str]] = {}
        for ref in refs:
            by_image.setdefault(ref["image_id"], []).append(ref["sentences"][0]["sent"])
        for image_id, sentences in by_image.items():
            image = Image.open(fixtures_dir / "coco" / "images" / IMAGE_FILES[image_id])
            examples.append((image, " ".join(s + "." for s in sentences), sentences))
    return examples


@pytest.fixture(scope="module")
def all_sentences(fixtures_dir):
    sentences = []
    for name in ("refcoco_unc_val_3images.json", "refcoco+_unc_val_3images.json"):
        for ref in json.loads((fixtures_dir / "refcoco" / name).read_text()):
            sentences += [s["sent"] for s in ref["sentences"]]
    return sentences


@pytest.fixture(scope="module")
def cats(fixtures_dir):
    return Image.open(fixtures_dir / "coco" / "images" / "COCO_train2014_000000157714.jpg")


def assert_phrases_decode(processor, out, phrases_per_example):
    """Each phrase's tokens decode to the phrase (modulo the leading space); nothing else is marked."""
    for b, phrases in enumerate(phrases_per_example):
        ids, pid, mask = out["input_ids"][b], out["phrase_ids"][b], out["attention_mask"][b]
        assert int(pid.max()) == len(phrases) - 1
        for k, phrase in enumerate(phrases):
            positions = (pid == k).nonzero().flatten()
            assert len(positions) > 0
            # contiguous run of tokens
            assert positions.tolist() == list(range(int(positions[0]), int(positions[-1]) + 1))
            assert processor.decode(ids[positions]).strip() == phrase
        assert (pid[mask == 0] == -1).all()


# ---------------------------------------------------------------------------------- LLaVA-1.5
def test_llava_refcoco_phrases_decode_back(llava, refcoco):
    for image, answer, phrases in refcoco:
        out = llava(image, answer, phrases)
        assert_phrases_decode(llava, out, [phrases])
        ids, pid = out["input_ids"][0], out["phrase_ids"][0]
        # the unmarked answer tokens are exactly the "." separators of the concat answer
        last_prompt = int((ids == LLAVA_IMAGE_TOKEN).nonzero().max())
        answer_start = int((pid >= 0).nonzero().min())
        assert (pid[:answer_start] == -1).all()
        unmarked = ids[answer_start:][pid[answer_start:] == -1]
        assert llava.decode(unmarked).replace(" ", "") == "." * len(phrases)
        assert last_prompt < answer_start


def test_llava_every_refcoco_sentence(llava, cats, all_sentences):
    for sentence in all_sentences:
        out = llava(cats, f"I see {sentence} here.", [sentence], return_sam_inputs=False)
        assert_phrases_decode(llava, out, [[sentence]])


def test_llava_prompt_and_image_tokens(llava, cats):
    out = llava(cats, "a white bear.", ["white bear"])
    ids = out["input_ids"][0]
    assert int((ids == LLAVA_IMAGE_TOKEN).sum()) == 576
    assert (out["phrase_ids"][0][ids == LLAVA_IMAGE_TOKEN] == -1).all()
    text = llava.decode(ids[ids != LLAVA_IMAGE_TOKEN], skip_special_tokens=True)
    assert text.startswith("USER:")
    assert text.endswith("\nPlease give me a description of the image. ASSISTANT: a white bear.")
    # the original's token sequence: vicuna prompt, then the caption encoded on its own
    tok = llava.tokenizer
    prompt_ids = tok("USER: <image>\nPlease give me a description of the image. ASSISTANT:")["input_ids"]
    caption_ids = tok("a white bear.", add_special_tokens=False)["input_ids"]
    expected = [i for i in prompt_ids if i != LLAVA_IMAGE_TOKEN] + caption_ids
    assert ids[ids != LLAVA_IMAGE_TOKEN].tolist() == expected


def test_llava_letterbox(llava, cats):
    out = llava(cats, "a white bear.", ["white bear"])
    assert out["original_sizes"].tolist() == [[480, 640]]
    # the original's geometry: 480x640 -> 252x336, then 42 rows of padding above and below
    assert out["canvas_sizes"].tolist() == [[336, 336]]
    assert out["content_boxes"].tolist() == [[42, 0, 294, 336]]
    assert letterbox_geometry(500, 375, 336) == ((336, 336), (0, 42, 336, 294))  # 375*336/500 = 252
    pixels = out["pixel_values"]
    assert pixels.shape == (1, 3, 336, 336)

    ip = llava.image_processor
    mean, std = np.array(ip.image_mean), np.array(ip.image_std)
    pad = np.array([int(m * 255) for m in mean])  # (122, 116, 104)
    normalised_pad = torch.tensor((pad / 255 - mean) / std, dtype=torch.float32)
    # no centre crop: the top and bottom rows are padding; 80/640*336 = 42 rows on each side
    for row in (0, 37, 299, 335):  # away from the bicubic support of the edge
        torch.testing.assert_close(pixels[0, :, row, :], normalised_pad[:, None].expand(3, 336), atol=1e-4, rtol=0)
    for row in (44, 168, 291):
        assert (pixels[0, :, row, :] - normalised_pad[:, None]).abs().max() > 0.5  # image content

    # independent construction as the original: PIL bicubic to 252x336, pad to 336, normalise
    square = Image.new("RGB", (336, 336), tuple(int(v) for v in pad))
    square.paste(cats.resize((336, 252), Image.BICUBIC), (0, 42))
    expected = np.asarray(square, dtype=np.float64) / 255
    expected = torch.tensor(((expected - mean) / std).transpose(2, 0, 1), dtype=torch.float32)
    assert (pixels[0] - expected).abs().max() < 1e-5  # bit-exact pixels up to float rounding


def test_llava_native_mode_still_letterboxes_instead_of_cropping(fixtures_dir, cats):
    native = FLMMProcessor.from_pretrained(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf", mode="native")
    assert native.letterbox  # CLIP would centre-crop and lose pixels
    out = native(cats, "a white bear.", ["white bear"], return_sam_inputs=False)
    assert out["content_boxes"].tolist() == [[42, 0, 294, 336]]
    forced = FLMMProcessor(native.processor, mode="native", letterbox=False)
    out = forced(cats, "a white bear.", ["white bear"], return_sam_inputs=False)
    assert out["pixel_values"].shape == (1, 3, 336, 336)
    assert out["canvas_sizes"].tolist() == [[480, 640]] and out["content_boxes"].tolist() == [[0, 0, 480, 640]]
    # every pixel kept: the whole image squashed to 336x336, not a centre crop
    ip = native.image_processor
    mean, std = np.array(ip.image_mean), np.array(ip.image_std)
    expected = np.asarray(cats.resize((336, 336), Image.BICUBIC), dtype=np.float64) / 255
    expected = torch.tensor(((expected - mean) / std).transpose(2, 0, 1), dtype=torch.float32)
    assert (out["pixel_values"][0] - expected).abs().max() < 0.02


def test_phrase_spans_equal_substrings_and_repeats(llava, cats):
    answer = "the bear left of the bear."
    by_text = llava(cats, answer, ["the bear", "the bear"], return_sam_inputs=False)
    by_span = llava(cats, answer, [(0, 8), (17, 25)], return_sam_inputs=False)
    assert torch.equal(by_text["phrase_ids"], by_span["phrase_ids"])
    pid = by_text["phrase_ids"][0]
    assert (pid == 0).sum() == (pid == 1).sum() == 2  # "▁the ▁bear" twice, distinct tokens
    assert int((pid == 0).nonzero().max()) < int((pid == 1).nonzero().min())


def test_batch_padding_left_and_right(llava, smolvlm, refcoco):
    (image_a, answer_a, phrases_a), (image_b, _, phrases_b) = refcoco[0], refcoco[1]
    for processor, side in ((llava, "left"), (smolvlm, "right")):
        assert processor.tokenizer.padding_side == side
        out = processor([image_a, image_b], [answer_a, "a " + phrases_b[0] + "."], [phrases_a, phrases_b[:1]])
        mask = out["attention_mask"]
        assert (mask == 0).any(), "examples of different lengths must be padded"
        assert_phrases_decode(processor, out, [phrases_a, phrases_b[:1]])
        # padded batch == each example on its own
        for b, (image, answer, phrases) in enumerate(
            [(image_a, answer_a, phrases_a), (image_b, "a " + phrases_b[0] + ".", phrases_b[:1])]
        ):
            single = processor(image, answer, phrases, return_sam_inputs=False)
            assert out["input_ids"][b][mask[b] == 1].tolist() == single["input_ids"][0].tolist()
            assert out["phrase_ids"][b][mask[b] == 1].tolist() == single["phrase_ids"][0].tolist()
        pad_positions = (mask == 0).nonzero()
        if side == "left":
            assert (pad_positions[:, 1] < mask.shape[1] // 2).all()
        else:
            assert (pad_positions[:, 1] > mask.shape[1] // 2).all()


# ---------------------------------------------------------------------------------- SmolVLM
def test_smolvlm_native_phrases_and_canvas(smolvlm, refcoco, all_sentences):
    image, answer, phrases = refcoco[2]
    out = smolvlm(image, answer, phrases)
    assert_phrases_decode(smolvlm, out, [phrases])
    width, height = image.size
    assert out["canvas_sizes"].tolist() == [[height, width]]
    assert out["content_boxes"].tolist() == [[0, 0, height, width]]
    assert out["pixel_values"].dim() == 5 and "pixel_attention_mask" in out  # its own tiling
    # every sentence at once, as one long answer
    answer = " ".join(s + "." for s in all_sentences)
    out = smolvlm(image, answer, all_sentences, return_sam_inputs=False)
    assert_phrases_decode(smolvlm, out, [all_sentences])


# ---------------------------------------------------------------------------------- images
@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "I;16"])
def test_image_modes_are_converted(llava, cats, mode):
    image = cats.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(cats.convert("L"), dtype=np.uint16) * 200)
    out = llava(image, "a white bear.", ["white bear"])
    assert out["pixel_values"].shape == (1, 3, 336, 336)
    assert out["original_sizes"].tolist() == [[480, 640]]
    assert torch.isfinite(out["sam_pixel_values"]).all()


def test_transparent_pixels_get_the_mean_colour(llava):
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 255, 0, 255))
    rgb = to_rgb(rgba, background=llava.pad_color)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((3, 3)) == llava.pad_color == (122, 116, 104)
    assert rgb.getpixel((0, 0)) == (0, 255, 0)
    gray = to_rgb(Image.new("L", (4, 4), 77))
    assert gray.getpixel((1, 1)) == (77, 77, 77)
    with pytest.raises(ValueError, match="PIL images"):
        to_rgb("not an image")


def test_sam_preprocessing(llava, cats):
    out = llava(cats, "a white bear.", ["white bear"])
    sam = out["sam_pixel_values"]
    assert sam.shape == (1, 3, 1024, 1024) and sam.dtype == torch.float32
    # 480x640 -> 768x1024, zero padding below
    assert (sam[0, :, 768:, :] == 0).all()
    assert (sam[0, :, 767, :] != 0).any()
    resized = np.asarray(cats.resize((1024, 768), Image.BILINEAR), dtype=np.float32)
    expected = (resized - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
    torch.testing.assert_close(sam[0, :, :768, :], torch.tensor(expected.transpose(2, 0, 1), dtype=torch.float32))
    rounded = sam_preprocess(Image.new("RGB", (640, 333), (200, 10, 10)))  # 333 * 1.6 = 532.8 -> 533 rows
    assert (rounded[:, 533:] == 0).all() and (rounded[:, 532] != 0).all()
    tall = sam_preprocess(Image.new("RGB", (375, 500), (123, 116, 103)))
    assert (tall[:, :, 768:] == 0).all() and (tall[:, :, :768] != 0).any()  # 375*1024/500 = 768
    assert "sam_pixel_values" not in llava(cats, "a bear.", ["bear"], return_sam_inputs=False)


def test_masks_are_returned_at_original_size(llava, cats):
    masks = np.zeros((2, 480, 640), dtype=np.uint8)
    masks[0, 10:20, 30:40] = 1
    out = llava(cats, "a white bear and a kid.", ["white bear", "kid"], masks=masks)
    assert len(out["masks"]) == 1
    assert out["masks"][0].dtype == torch.bool and out["masks"][0].shape == (2, 480, 640)
    assert int(out["masks"][0].sum()) == 100
    # one image: a list of K HxW masks is the same; a list of images: one mask entry per image
    listed = llava(cats, "a white bear and a kid.", ["white bear", "kid"], masks=list(masks), return_sam_inputs=False)
    assert torch.equal(listed["masks"][0], out["masks"][0])
    batched = llava([cats], ["a white bear and a kid."], [["white bear", "kid"]], masks=[list(masks)], return_sam_inputs=False)
    assert torch.equal(batched["masks"][0], out["masks"][0])


def test_prompt_only_for_generation(llava, cats):
    out = llava(cats, return_sam_inputs=False)
    assert (out["phrase_ids"] == -1).all()
    assert llava.decode(out["input_ids"][0][-5:]).endswith("ASSISTANT:")
    custom = llava(cats, question="What is the kid holding?", return_sam_inputs=False)
    assert "What is the kid holding?" in llava.decode(custom["input_ids"][0])


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "phrases, message",
    [
        (["polar bear"], "not found in the text"),
        (["kid", "white bear"], "not found after the previous phrase"),
        ([""], "empty"),
        (["   "], "empty"),
        ([(5, 5)], "empty or outside"),
        ([(0, 999)], "empty or outside"),
        ([(1, 2, 3)], "string or an"),
    ],
)
def test_bad_phrases(llava, cats, phrases, message):
    with pytest.raises(ValueError, match=message):
        llava(cats, "a white bear hugged by a kid.", phrases, return_sam_inputs=False)


def test_phrases_sharing_a_token_are_refused(llava, cats):
    with pytest.raises(ValueError, match="overlaps phrases"):
        llava(cats, "a whitebear.", ["whi", "tebear"], return_sam_inputs=False)


def test_truncation(llava, cats):
    answer = "a white bear hugged by a kid in a red shirt."
    full = llava(cats, answer, ["white bear"], return_sam_inputs=False)
    length = full["input_ids"].shape[1]
    # cutting unmarked answer tokens is fine
    cut = llava(cats, answer, ["white bear"], max_length=length - 3, return_sam_inputs=False)
    assert cut["input_ids"].shape[1] == length - 3
    assert cut["input_ids"][0].tolist() == full["input_ids"][0, : length - 3].tolist()
    assert torch.equal(cut["phrase_ids"][0], full["phrase_ids"][0, : length - 3])
    with pytest.raises(ValueError, match="cuts phrase.*'kid in a red shirt'"):
        llava(cats, answer, ["white bear", "kid in a red shirt"], max_length=length - 3, return_sam_inputs=False)
    with pytest.raises(ValueError, match="prompt/image tokens"):
        llava(cats, answer, ["white bear"], max_length=100, return_sam_inputs=False)
    # in a batch, only the long example is cut and the batch is re-padded
    batch = llava([cats, cats], [answer, "a bear."], [["white bear"], ["bear"]], max_length=length - 3)
    assert batch["input_ids"].shape[1] == length - 3
    assert (batch["phrase_ids"][batch["attention_mask"] == 0] == -1).all()
    assert batch["attention_mask"][0].all() and batch["attention_mask"][1, 0] == 0  # LLaVA pads on the left
    assert_phrases_decode(llava, batch, [["white bear"], ["bear"]])


def test_bad_inputs(llava, cats):
    with pytest.raises(ValueError, match="masks must be"):
        llava(cats, "a white bear.", ["white bear"], masks=np.zeros((1, 10, 10), bool))
    with pytest.raises(ValueError, match="masks must be"):
        llava(cats, "a white bear.", ["white bear"], masks=np.zeros((2, 480, 640), bool))
    with pytest.raises(ValueError, match="2 images, 1 texts"):
        llava([cats, cats], ["a bear."], [["bear"], ["bear"]])
    with pytest.raises(ValueError, match="mode"):
        FLMMProcessor(llava.processor, mode="fancy")


BEAR = "a white bear."
MASK = np.zeros((1, 480, 640), bool)


@pytest.mark.parametrize(
    "images, kwargs, error, message",
    [
        # one image: one str, one flat phrase list, one mask stack
        ("one", dict(texts=BEAR, phrases="white bear"), TypeError,
         r"phrases must be a list of phrases, got the str 'white bear'.*pass \['white bear'\]"),
        ("one", dict(texts=BEAR, phrases=(2, 12)), TypeError, r"phrases must be a list of phrases, got the single span"),
        ("one", dict(texts=BEAR, phrases=[["white bear"]]), TypeError, r"phrases must be a flat list.*images=\[image"),
        ("one", dict(texts=BEAR, phrases={"white bear"}), TypeError, "phrases must be a list of phrases"),
        ("one", dict(texts=[BEAR], phrases=["white bear"]), TypeError, "images is one image, so texts must be one str"),
        ("one", dict(texts=BEAR, phrases=["white bear"], masks=[MASK]), TypeError,
         r"images is one image, so masks must be one \[K, H, W\]"),
        ("one", dict(phrases=["bear"]), ValueError, "need the answer texts"),
        # a list of images: one entry per image in every argument
        ("list", dict(texts=[BEAR], phrases=["white bear"]), TypeError, r"phrases\[0\] must be a list of phrases, got the str"),
        ("list", dict(texts=[BEAR], phrases=[(2, 12)]), TypeError, r"phrases\[0\] must be a list of phrases, got the single"),
        ("list", dict(texts=[BEAR], phrases=[[["white bear"]]]), TypeError, r"phrases\[0\] must be a flat list"),
        ("list", dict(texts=BEAR, phrases=[["white bear"]]), TypeError, "images is a list, so texts must be a list"),
        ("list", dict(texts=[BEAR], phrases=[["white bear"]], masks=MASK[None]), TypeError,
         "images is a list, so masks must be a list"),
        ("list", dict(texts=[BEAR], phrases=[["white bear"]], masks=[]), ValueError, "got 1 images, 0 masks"),
        ("list", dict(texts=[BEAR, BEAR], phrases=[["bear"]]), ValueError, "got 1 images, 2 texts"),
        ("list", dict(texts=[3]), TypeError, r"texts\[0\] must be a str"),
        ("none", dict(texts=[BEAR]), ValueError, "images is empty"),
    ],
)
def test_input_shapes_follow_images_and_are_never_guessed(llava, cats, images, kwargs, error, message):
    images = {"one": cats, "list": [cats], "none": []}[images]
    with pytest.raises(error, match=message):
        llava(images, return_sam_inputs=False, **kwargs)


def test_one_image_and_a_batch_of_one_give_the_same_inputs(llava, cats):
    masks = np.zeros((1, 480, 640), bool)
    one = llava(cats, "a white bear.", ["white bear"], masks=masks, return_sam_inputs=False)
    batch = llava([cats], ["a white bear."], [["white bear"]], masks=[masks], return_sam_inputs=False)
    assert one.keys() == batch.keys()
    for key in one:
        assert torch.equal(one[key][0] if key == "masks" else one[key], batch[key][0] if key == "masks" else batch[key]), key
    # an empty phrase list is a valid flat list: no phrase
    assert (llava(cats, "a white bear.", [], return_sam_inputs=False)["phrase_ids"] == -1).all()


# ---------------------------------------------------------------------------------- the phrase resolver
def test_resolver_searches_strings_in_reading_order_and_trims_spans():
    text = "the bear left of the bear. "
    assert match_phrases(text, ["the bear", "the bear"]) == [PhraseMatch((0, 8)), PhraseMatch((17, 25))]
    # a string is searched as given (its spaces too), then trimmed; the next search starts at its end
    assert resolve_phrase_spans(text, [" bear", "bear"]) == [(4, 8), (21, 25)]
    # explicit spans (tuples or lists) are trimmed of surrounding whitespace and move the search start too
    assert resolve_phrase_spans(text, [[8, 14], "bear"]) == [(9, 13), (21, 25)]
    assert resolve_phrase_spans(text, [(25, 27)]) == [(25, 26)]


def test_resolver_reports_phrases_it_cannot_place_and_the_processor_raises():
    text = "a white bear hugged by a kid."
    matches = match_phrases(text, ["kid", "white bear", (3, 3), (0, 99), (1, 2), "Kid"])
    assert matches[0] == PhraseMatch((25, 28))
    assert matches[1].span is None and "'white bear' not found after the previous phrase" in matches[1].problem
    assert matches[2].span is None and "span (3, 3) is empty or outside the text" in matches[2].problem
    assert matches[3].span is None and "outside the text (length 29)" in matches[3].problem
    assert matches[4].span is None and "covers only whitespace" in matches[4].problem
    assert matches[5].span is None and "not found in the text" in matches[5].problem  # strict: case matters
    with pytest.raises(ValueError, match=r"example 3: phrase 1 'white bear' not found after the previous phrase"):
        resolve_phrase_spans(text, ["kid", "white bear"], example=3)


def test_lenient_resolver_strips_then_searches_anywhere_then_ignoring_case():
    text = "A cat sat on the mat. The Cat left."
    # stripped, after the previous phrase
    assert [m.span for m in match_phrases(text, [" cat ", "cat"], lenient=True)] == [(2, 5), (2, 5)]
    # "the cat" is only there ignoring case; then "sat" only before the previous phrase
    assert [m.span for m in match_phrases(text, ["mat", "the cat", "sat"], lenient=True)] == [(17, 20), (22, 29), (6, 9)]
    assert [m.span for m in match_phrases(text, ["mat", "sat"])] == [(17, 20), None]  # strict: reading order only
    assert match_phrases(text, ["dog"], lenient=True)[0].span is None


def test_malformed_phrases_are_errors_in_every_mode():
    for lenient in (False, True):
        with pytest.raises(ValueError, match="phrase 1 is empty"):
            match_phrases("a cat", ["cat", "  "], lenient=lenient)
        with pytest.raises(ValueError, match=r"phrase 0 must be a string or an \(start, end\) pair"):
            match_phrases("a cat", [(0, 1, 2)], lenient=lenient)
        with pytest.raises(TypeError, match="got the str 'cat'"):
            match_phrases("a cat", "cat", lenient=lenient)


def test_chat_reports_missing_phrases_with_the_lenient_rules():
    text = "Two cats on a pink couch."
    spans, missing = find_phrases(text, ["two cats", "a dog", (14, 18), (20, 99)])
    assert spans == [(0, 8), (14, 18)]
    assert missing == ["a dog", f"{text[20:]!r} at span (20, 99)"]


# ---------------------------------------------------------------------------------- backbone families
def test_model_type_comes_from_the_folder_config_or_the_processor_class(llava, smolvlm):
    assert llava.model_type == "llava" and not llava.is_dynamic_resolution
    # the SmolVLM checkpoint is an Idefics3 config with an Idefics3Processor
    assert smolvlm.model_type == "idefics3" and smolvlm.is_dynamic_resolution and not smolvlm.letterbox
    # without a folder: the one registered family whose processor class it is
    assert FLMMProcessor(smolvlm.processor).model_type == "idefics3"
    # LlavaProcessor serves llava and vipllava: the family of the package that defines it (llava) is taken
    assert processor_model_types("LlavaProcessor") == ["llava", "vipllava"]
    assert FLMMProcessor(llava.processor).model_type == "llava"
    # a subclass defined elsewhere, shared by two families: no model type, their common trait
    outside = copy.copy(llava.processor)
    outside.__class__ = type("LlavaProcessor", (type(llava.processor),), {"__module__": "my_package.processing"})
    bare = FLMMProcessor(outside)
    assert bare.model_type is None and not bare.is_dynamic_resolution


def test_processor_traits_come_from_the_registry(llava):
    # an unregistered model type with a known processor class takes that class's family traits
    assert FLMMProcessor(llava.processor, model_type="my_new_vlm").family == Family(dynamic_resolution=False)
    # the user can name the family: as an Idefics3 backbone, this processor would keep its own resizing
    as_dynamic = FLMMProcessor(llava.processor, model_type="idefics3")
    assert as_dynamic.is_dynamic_resolution and not as_dynamic.letterbox and as_dynamic.image_processor_kwargs() == {}
    # Pixtral's processor serves two registered families that agree: dynamic, whatever the model type says
    assert sorted(processor_model_types("PixtralProcessor")) == ["mistral3", "pixtral"]
    assert backbone_family("my_new_vlm", "PixtralProcessor") == Family(dynamic_resolution=True)
    assert backbone_family("mistral3", "PixtralProcessor") is FAMILIES["mistral3"]
    assert backbone_family(None, "NoSuchProcessor") is None


def test_unknown_backbone_is_fixed_size_with_a_warning(llava, caplog):
    # an unregistered model type and a processor class no registered family uses
    backbone = copy.copy(llava.processor)
    backbone.__class__ = type("MyNewVLMProcessor", (type(llava.processor),), {})
    with caplog.at_level("WARNING", logger="flmm_hf.processing_flmm"):
        unknown = FLMMProcessor(backbone, model_type="my_new_vlm")
    assert "my_new_vlm" in caplog.text and "MyNewVLMProcessor" in caplog.text and "register_family" in caplog.text
    assert unknown.family == Family() and unknown.letterbox
    assert unknown.image_processor_kwargs() == llava.image_processor_kwargs()


# ---------------------------------------------------------------------------------- post-processing
def test_post_process_masks():
    logits = [torch.full((2, 64, 64), 5.0), torch.full((1, 24, 32), -5.0)]
    logits[0][1, :32] = -5.0  # top half off
    sizes = torch.tensor([[480, 640], [500, 375]])
    masks = FLMMProcessor.post_process_masks(logits, sizes)
    assert [m.shape for m in masks] == [(2, 480, 640), (1, 500, 375)]
    assert masks[0].dtype == torch.bool
    assert masks[0][0].all() and not masks[1].any()
    assert not masks[0][1, :230].any() and masks[0][1, 250:].all()
    probs = FLMMProcessor.post_process_masks(logits, sizes, return_probabilities=True)
    assert probs[0].dtype == torch.float32 and torch.allclose(probs[0][0], torch.sigmoid(torch.tensor(5.0)))
    stacked = FLMMProcessor.post_process_masks(torch.zeros(2, 3, 16, 16), [(20, 30), (40, 10)], threshold=0.4)
    assert [m.shape for m in stacked] == [(3, 20, 30), (3, 40, 10)] and stacked[0].all()
    empty = FLMMProcessor.post_process_masks([torch.zeros(0, 16, 16)], [(5, 7)])
    assert empty[0].shape == (0, 5, 7)


# ---------------------------------------------------------------------------------- save / load
def test_save_and_load(llava, smolvlm, cats, tmp_path):
    from transformers import AutoProcessor

    custom = FLMMProcessor(llava.processor, mode="native", question="Describe the picture.", letterbox=True)
    custom.save_pretrained(tmp_path / "llava")
    # the custom code is this file and the sibling it imports (the family registry)
    assert {"processing_flmm.py", "image_layout.py"} <= {p.name for p in (tmp_path / "llava").glob("*.py")}
    saved = json.loads((tmp_path / "llava" / "flmm_processor_config.json").read_text())
    assert saved["model_type"] == "llava"
    loaded = FLMMProcessor.from_pretrained(tmp_path / "llava")
    assert (loaded.mode, loaded.question, loaded.letterbox) == ("native", "Describe the picture.", True)
    assert loaded.model_type == "llava"
    assert FLMMProcessor.from_pretrained(tmp_path / "llava", model_type="my_new_vlm").model_type == "my_new_vlm"
    a = custom(cats, "a white bear.", ["white bear"])
    b = loaded(cats, "a white bear.", ["white bear"])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the folder is still a plain backbone processor folder ...
    assert type(AutoProcessor.from_pretrained(tmp_path / "llava")).__name__ == "LlavaProcessor"
    # ... and AutoProcessor with remote code gives the FLMMProcessor
    auto = AutoProcessor.from_pretrained(tmp_path / "llava", trust_remote_code=True)
    assert type(auto).__name__ == "FLMMProcessor" and auto.question == "Describe the picture."
    assert torch.equal(auto(cats, "a white bear.", ["white bear"])["phrase_ids"], a["phrase_ids"])

    smolvlm.save_pretrained(tmp_path / "smol")
    reloaded = FLMMProcessor.from_pretrained(tmp_path / "smol")
    assert reloaded.mode == "native" and type(reloaded.processor).__name__ == "Idefics3Processor"
    assert reloaded.model_type == "idefics3" and reloaded.is_dynamic_resolution
    assert reloaded.processor.image_seq_len == smolvlm.processor.image_seq_len

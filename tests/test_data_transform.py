"""Row -> model inputs: concat/single RefCOCO prompts, PNG rows, datasets transforms, collator,
token coverage with the real llava-1.5 tokenizer and the processor end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import load_dataset

from flmm_hf.data import FLMMCollator, FLMMTransform, build_concat_answer, explode_sentences, group_refs_by_image
from flmm_hf.datasets_io import rle_to_mask
from test_datasets import make_refcoco_inputs, run_png, run_refcoco

LLAVA_PROMPT = "USER: <image>\nPlease give me a description of the image. ASSISTANT:"


@pytest.fixture(scope="module")
def built(fixtures_dir, tmp_path_factory):
    """The RefCOCO (per ref + grouped) and PNG datasets built from the fixtures."""
    root = tmp_path_factory.mktemp("built")
    inputs = make_refcoco_inputs(fixtures_dir, root / "src")
    run_refcoco(fixtures_dir, inputs, root / "refcoco")
    run_png(fixtures_dir, root / "png")
    per_ref = load_dataset(str(root / "refcoco"), split="val")
    grouped = group_refs_by_image(per_ref, cache_dir=str(root / "cache"))
    png = load_dataset(str(root / "png"), split="val")
    return {"per_ref": per_ref, "grouped": grouped, "png": png, "train": load_dataset(str(root / "refcoco"), split="train")}


@pytest.fixture(scope="module")
def llava_tokenizer(fixtures_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf"))


def test_build_concat_answer():
    text, spans, pieces = build_concat_answer(["man texting", "guy on right", "x"])
    assert text == "man texting. guy on right. x."
    assert [text[s:e] for s, e in spans] == ["man texting", "guy on right", "x"]
    assert [(text[s:e], last) for s, e, last in pieces] == [
        ("man texting", 0), (".", 1), ("guy on right", 0), (".", 1), ("x", 0), (".", 1)
    ]


def test_grouped_concat_eval_uses_first_sentences(built):
    grouped, per_ref = built["grouped"], built["per_ref"]
    assert grouped.num_rows == 3 and sum(len(r) for r in grouped["ref_ids"]) == per_ref.num_rows == 7
    transform = FLMMTransform(train=False)
    by_ref = {r["ref_id"]: r for r in per_ref}
    for row in grouped:
        ex = transform.example(row)
        firsts = [by_ref[r]["raw_sentences"][0].lower() for r in row["ref_ids"]]
        assert ex["text"] == ". ".join(firsts) + "."
        assert [ex["text"][s:e] for s, e in ex["phrases"]] == firsts
        assert ex["masks"].dtype == torch.bool and ex["masks"].shape == (len(firsts), row["height"], row["width"])
        for k, ref_id in enumerate(row["ref_ids"]):
            assert np.array_equal(ex["masks"][k].numpy(), rle_to_mask(by_ref[ref_id]["mask"]))
        assert ex["image"].mode == "RGB" and ex["image"].size == (row["width"], row["height"])
    # the 460370 image: its three refs in order
    row = next(r for r in grouped if r["image_id"] == 460370)
    assert transform.example(row)["text"] == ("extreme left person with red bag. right man light brown coat. "
                                              "man checking his phone in foreground.")


def test_train_draws_are_seeded_random_and_valid(built):
    row = next(r for r in built["grouped"] if r["image_id"] == 460370)
    a, b, c = FLMMTransform(train=True, seed=1), FLMMTransform(train=True, seed=1), FLMMTransform(train=True, seed=2)
    texts_a = [a.example(row)["text"] for _ in range(12)]
    texts_b = [b.example(row)["text"] for _ in range(12)]
    texts_c = [c.example(row)["text"] for _ in range(12)]
    assert texts_a == texts_b  # reproducible
    assert texts_a != texts_c  # the seed matters
    assert len(set(texts_a)) > 2  # draws vary between reads (epochs)
    for text in texts_a:
        ex = a.example(row)
        for (s, e), sents in zip(ex["phrases"], row["raw_sentences"]):
            assert ex["text"][s:e] in [x.lower() for x in sents]
        assert ex["text"].endswith(".")


def test_single_sentence_rows(built):
    per_ref = built["per_ref"]
    ex = FLMMTransform(train=False, sentence_field="sentences").example(per_ref[0])
    assert ex["text"] == per_ref[0]["sentences"][0] + "." and ex["phrases"] == [[0, len(per_ref[0]["sentences"][0])]]
    assert ex["masks"].shape[0] == 1
    exploded = explode_sentences(per_ref)
    assert exploded.num_rows == sum(len(s) for s in per_ref["sentences"]) == 21
    texts = [FLMMTransform().example(r)["text"] for r in exploded.select(range(3))]
    assert texts == [s + "." for s in per_ref[0]["raw_sentences"]]


def test_png_rows(built, fixtures_dir):
    row = built["png"][0]
    ex = FLMMTransform().example(row)
    assert ex["text"] == row["caption"]
    assert [ex["text"][s:e] for s, e in ex["phrases"]] == [
        "two cats", "a pink couch", "a remote", "the couch", "another remote", "a blanket"]
    assert ex["plural"] == [True, False, False, False, False, False]
    assert ex["isthing"] == [True, True, True, True, True, False]
    assert ex["masks"].shape == (6, 480, 640)
    assert torch.equal(ex["masks"][1], ex["masks"][3])  # "a pink couch" and "the couch": one segment


def test_with_transform_batches(built):
    ds = built["grouped"].with_transform(FLMMTransform())
    one = ds[0]
    assert set(one) == {"image", "text", "phrases", "masks", "plural", "isthing", "image_id", "pieces", "question"}
    batch = ds[0:2]
    assert len(batch["text"]) == 2 and isinstance(batch["masks"][1], torch.Tensor)
    png = built["png"].with_transform(FLMMTransform())
    assert png[0]["text"].startswith("In this image")


class _RecordingProcessor:
    def __call__(self, **kwargs):
        self.kwargs = kwargs
        return {"input_ids": torch.zeros(len(kwargs["texts"]), 3, dtype=torch.long)}


def test_collator_calls_processor_once(built):
    proc = _RecordingProcessor()
    ds = built["grouped"].with_transform(FLMMTransform())
    items = [ds[i] for i in range(3)]
    out = FLMMCollator(proc)(items)
    assert set(out) == {"input_ids"}  # exactly the processor's keys by default
    assert proc.kwargs["texts"] == [it["text"] for it in items]
    assert proc.kwargs["phrases"][0] == [tuple(p) for p in items[0]["phrases"]]
    assert len(proc.kwargs["masks"]) == 3 and proc.kwargs["return_tensors"] == "pt"
    # raw rows + transform in the collator; extra keys on request
    out = FLMMCollator(proc, transform=FLMMTransform(), extra_keys=("image_id",), with_masks=False)(
        [built["grouped"][0], built["grouped"][1]])
    assert out["image_id"] == [built["grouped"][0]["image_id"], built["grouped"][1]["image_id"]]
    assert "masks" not in proc.kwargs


def _covered_chars(text: str, offsets, span) -> tuple[list[int], set[int]]:
    """Tokens overlapping ``span`` (offsets without the token's leading space) and their chars."""
    s, e = span
    tokens, chars = [], set()
    for i, (a, b) in enumerate(offsets):
        while a < b and text[a].isspace():
            a += 1
        if a < b and a < e and b > s:
            tokens.append(i)
            chars.update(range(a, b))
    return tokens, chars


@pytest.mark.parametrize("kind", ["grouped", "png"])
def test_llava_tokens_cover_each_phrase_exactly(built, llava_tokenizer, kind):
    for row in built[kind]:
        ex = FLMMTransform().example(row)
        full = LLAVA_PROMPT + " " + ex["text"]
        shift = len(LLAVA_PROMPT) + 1
        enc = llava_tokenizer(full, return_offsets_mapping=True, add_special_tokens=True)
        for s, e in ex["phrases"]:
            tokens, chars = _covered_chars(full, enc["offset_mapping"], (s + shift, e + shift))
            span_chars = set(range(s + shift, e + shift))
            assert chars <= span_chars  # no token straddles a phrase boundary
            assert chars >= {i for i in span_chars if not full[i].isspace()}  # every character covered
            decoded = llava_tokenizer.decode([enc["input_ids"][i] for i in tokens])
            assert decoded.strip() == ex["text"][s:e]


def test_end_to_end_through_processor(built, fixtures_dir, llava_tokenizer):
    from flmm_hf.processing_flmm import FLMMProcessor

    processor = FLMMProcessor.from_pretrained(str(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf"))
    collator = FLMMCollator(processor, extra_keys=("plural", "isthing"))
    for kind in ("grouped", "png"):
        ds = built[kind].with_transform(FLMMTransform())
        items = [ds[i] for i in range(min(2, ds.num_rows))]
        batch = collator(items)
        assert batch["input_ids"].shape == batch["phrase_ids"].shape
        for b, item in enumerate(items):
            k = len(item["phrases"])
            for p, (s, e) in enumerate(item["phrases"]):
                ids = batch["input_ids"][b][batch["phrase_ids"][b] == p]
                assert llava_tokenizer.decode(ids).strip() == item["text"][s:e]
            assert int(batch["phrase_ids"][b].max()) == k - 1
            assert batch["masks"][b].shape == item["masks"].shape and torch.equal(batch["masks"][b], item["masks"])
            assert batch["original_sizes"][b].tolist() == [item["image"].height, item["image"].width]
        assert batch["plural"] == [it["plural"] for it in items]


def test_png_spans_follow_the_processor_phrase_rules(built):
    """PNG segment spans are trimmed of surrounding whitespace, and a whitespace-only span is refused."""
    row = dict(built["png"][0])
    segment = dict(next(s for s in row["segments"] if s["segment_ids"]))
    row["caption"] = "  two cats  on a couch"
    row["segments"] = [dict(segment, start=1, end=11, utterance=" two cats ")]
    assert FLMMTransform().example(row)["phrases"] == [[2, 10]]
    row["segments"] = [dict(segment, start=10, end=12, utterance="  ")]
    with pytest.raises(ValueError, match=rf"image {row['image_id']}: segment span \(10, 12\) covers only whitespace"):
        FLMMTransform().example(row)

"""Reproduction mode: the token ids the original F-LMM fed its frozen LMM, through the public data path.

Rows go `FLMMTransform` -> `FLMMCollator` -> `FLMMProcessor` with the real llava-1.5-7b-hf
tokenizer (fixtures) and are compared with an independent encoding written here from the
original's recipe (method.md section 2): the prompt `encode(template.format(input=prompt),
add_special_tokens=True)` with the image token expanded, then every piece
`encode(piece, add_special_tokens=False)`, concatenated; RefCOCO appends
`encode('.', add_special_tokens=False)[-1]` (mask id -1) after each expression.
"""
from __future__ import annotations

import pytest
import torch
from datasets import load_dataset

from flmm_hf.data import FLMMCollator, FLMMTransform, group_refs_by_image
from flmm_hf.processing_flmm import FLMMProcessor
from test_datasets import make_refcoco_inputs, run_png, run_refcoco

ORIGINAL_LLAVA_TEMPLATE = "USER: {image}\n{question} ASSISTANT:"  # xtuner vicuna INSTRUCTION around "<image>\n" + question
QUESTION = "Please give me a description of the image."
IMAGE_TOKENS = 576  # llava-1.5: (336 / 14) ** 2

# Expressions that tokenise differently alone than inside one joined string.
TRICKY = ["the man on the left.", "2 guys standing", "the cat (left)", "a.b.", "man in 3rd row)"]


@pytest.fixture(scope="module")
def built(fixtures_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    run_refcoco(fixtures_dir, make_refcoco_inputs(fixtures_dir, root / "src"), root / "refcoco")
    run_png(fixtures_dir, root / "png")
    per_ref = load_dataset(str(root / "refcoco"), split="val")
    return {
        "per_ref": per_ref,
        "grouped": group_refs_by_image(per_ref, cache_dir=str(root / "cache")),
        "png": load_dataset(str(root / "png"), split="val"),
        "root": root,
    }


@pytest.fixture(scope="module")
def tokenizer(fixtures_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf"))


@pytest.fixture(scope="module")
def processor(fixtures_dir):
    return FLMMProcessor.from_pretrained(
        str(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf"), prompt_template=ORIGINAL_LLAVA_TEMPLATE
    )


def original_prompt(tokenizer, question: str = QUESTION) -> list[int]:
    """The original's prompt ids, the single `<image>` id expanded to the LMM's image tokens."""
    ids = tokenizer.encode(f"USER: <image>\n{question} ASSISTANT:", add_special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    at = ids.index(image_id)
    return ids[:at] + [image_id] * IMAGE_TOKENS + ids[at + 1:]


def original_refcoco(tokenizer, expressions: list[str]) -> tuple[list[int], list[int]]:
    """RefCOCO2PNG.transform_concat: each expression alone, then the '.' id; ids and mask ids."""
    ids = original_prompt(tokenizer)
    mask_ids = [-1] * len(ids)
    dot = tokenizer.encode(".", add_special_tokens=False)[-1]
    for k, expression in enumerate(expressions):
        piece = tokenizer.encode(expression, add_special_tokens=False)
        ids += piece + [dot]
        mask_ids += [k] * len(piece) + [-1]
    return ids, mask_ids


def original_png(tokenizer, segments: list[dict]) -> tuple[list[int], list[int]]:
    """PNGDataset.__getitem__: every utterance alone, no separator; grounded ones are phrases."""
    ids = original_prompt(tokenizer)
    mask_ids = [-1] * len(ids)
    count = 0
    for segment in segments:
        piece = tokenizer.encode(segment["utterance"], add_special_tokens=False)
        ids += piece
        if segment["segment_ids"]:
            mask_ids += [count] * len(piece)
            count += 1
        else:
            mask_ids += [-1] * len(piece)
    return ids, mask_ids


def real_tokens(batch, b: int) -> tuple[list[int], list[int]]:
    keep = batch["attention_mask"][b].bool()
    return batch["input_ids"][b][keep].tolist(), batch["phrase_ids"][b][keep].tolist()


def with_sentences(row: dict, sentences: list[str]) -> dict:
    """A grouped RefCOCO row whose refs' first sentences are `sentences` (one per ref)."""
    row = dict(row)
    n = len(row["ref_ids"])
    row["raw_sentences"] = [[sentences[i % len(sentences)]] for i in range(n)]
    return row


def test_refcoco_concat_matches_the_original(built, tokenizer, processor):
    collator = FLMMCollator(processor, transform=FLMMTransform(train=False))
    rows = [dict(built["grouped"][i]) for i in range(built["grouped"].num_rows)]
    rows.append(with_sentences(rows[0], TRICKY))
    batch = collator(rows)
    for b, row in enumerate(rows):
        expressions = [" ".join(s[0].split()).lower() for s in row["raw_sentences"]]
        assert real_tokens(batch, b) == original_refcoco(tokenizer, expressions)


def test_refcoco_split_matches_the_original(built, tokenizer, processor):
    """One ref per sequence (the original's `transform_split`): the per-ref rows, first sentence."""
    collator = FLMMCollator(processor, transform=FLMMTransform(train=False))
    rows = [dict(built["per_ref"][i]) for i in range(built["per_ref"].num_rows)]
    rows += [dict(rows[0], raw_sentences=[expression, "unused"]) for expression in TRICKY]
    batch = collator(rows)
    for b, row in enumerate(rows):
        expression = " ".join(row["raw_sentences"][0].split()).lower()
        assert real_tokens(batch, b) == original_refcoco(tokenizer, [expression])


def test_png_matches_the_original(built, tokenizer, processor):
    collator = FLMMCollator(processor, transform=FLMMTransform(train=False))
    rows = [dict(built["png"][i]) for i in range(built["png"].num_rows)]
    batch = collator(rows)
    for b, row in enumerate(rows):
        assert real_tokens(batch, b) == original_png(tokenizer, row["segments"])


def test_the_differences_from_a_joined_string_are_the_original_ones(built, tokenizer, processor):
    """The known llava-1.5 cases: `▁.` (869) not `.` (29889), no `..` (636) / `).` merges, the lone `▁` kept."""
    row = with_sentences(dict(built["grouped"][0]), ["guy on right.", "2 dogs", "cat (left)"])
    batch = FLMMCollator(processor, transform=FLMMTransform(train=False))([row])
    ids, phrase_ids = real_tokens(batch, 0)
    answer = list(zip(ids, phrase_ids))[len(original_prompt(tokenizer)):]
    dot, joined_dot, double_dot = 869, 29889, 636
    assert [i for i, p in answer if p == -1] == [dot] * len(row["ref_ids"])
    assert double_dot not in ids and tokenizer.convert_tokens_to_ids(").") not in ids
    assert (joined_dot, 0) in answer  # "right." keeps its own "." inside phrase 0
    assert (29871, 1) in answer  # the lone "▁" before "2" belongs to phrase 1
    # tokenising the joined text instead would differ
    joined = tokenizer.encode(batch_text := FLMMTransform().example(row)["text"], add_special_tokens=False)
    assert batch_text.startswith("guy on right.. 2 dogs.") and double_dot in joined


def test_prompt_template_equals_the_llava_chat_template(fixtures_dir, processor):
    """For llava-1.5 the original's xtuner template and the checkpoint's chat template give one prompt."""
    chat = FLMMProcessor.from_pretrained(str(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf"))
    assert processor.build_prompt() == chat.build_prompt() == "USER: <image>\nPlease give me a description of the image. ASSISTANT:"


def test_prompt_template_is_checked(fixtures_dir):
    folder = str(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf")
    with pytest.raises(ValueError, match=r"may only name \{image\} and \{question\}"):
        FLMMProcessor.from_pretrained(folder, prompt_template="USER: {input} ASSISTANT:")
    with pytest.raises(ValueError, match=r"must contain '\{image\}'"):
        FLMMProcessor.from_pretrained(folder, prompt_template="USER: {question} ASSISTANT:")


def test_per_example_questions_reach_the_prompt(built, tokenizer, processor):
    """A dataset's own question (WithQuestion / a `question` column) replaces the processor's for its rows."""
    rows = [dict(built["png"][0], question="What is shown in this image?"), dict(built["png"][0])]
    batch = FLMMCollator(processor, transform=FLMMTransform(train=False))(rows)
    first, second = real_tokens(batch, 0)[0], real_tokens(batch, 1)[0]
    assert first[: len(original_prompt(tokenizer, "What is shown in this image?"))] == original_prompt(
        tokenizer, "What is shown in this image?"
    )
    assert second[: len(original_prompt(tokenizer))] == original_prompt(tokenizer)


def test_native_mode_tokenises_the_joined_answer(fixtures_dir, tokenizer):
    """Native mode is unchanged: prompt + " " + answer tokenised as one string (pieces ignored)."""
    from PIL import Image

    native = FLMMProcessor.from_pretrained(str(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf"), mode="native")
    text = "guy on right.. 2 dogs."
    batch = native(Image.new("RGB", (40, 30)), text, [(0, 13)], pieces=[(0, 13), (13, 14, True), (15, 21), (21, 22, True)])
    ids = batch["input_ids"][0].tolist()
    joined = tokenizer.encode(native.build_prompt() + " " + text, add_special_tokens=True)
    assert ids[-len(joined) + 10:] == joined[10:]


@pytest.mark.parametrize(
    "pieces, message",
    [
        ([(0, 4)], r"the text ' cat' at 4:8 is in no piece"),
        ([(0, 5), (3, 8)], r"overlaps the previous piece"),
        ([(0, 9)], r"outside the text"),
        ([(0, 4, 1, 2)], r"must be \(start, end\[, last_token_only\]\)"),
    ],
)
def test_bad_pieces_are_refused(processor, pieces, message):
    from PIL import Image

    with pytest.raises(ValueError, match=message):
        processor(Image.new("RGB", (30, 30)), "big  cat", ["cat"], pieces=pieces, return_sam_inputs=False)


def test_text_mode_random_draws_once(built):
    """text_mode='random' (mmdet's): one sentence per ref for every read and epoch, seeded."""
    row = dict(built["grouped"][0])
    row["raw_sentences"] = [[f"ref {r} sentence {j}" for j in range(5)] for r in range(len(row["ref_ids"]))]
    once = FLMMTransform(train=True, seed=3, text_mode="random")
    texts = {once.example(row)["text"] for _ in range(8)}
    assert len(texts) == 1
    assert FLMMTransform(train=True, seed=3, text_mode="random").example(row)["text"] in texts
    resampled = FLMMTransform(train=True, seed=3)
    assert len({resampled.example(row)["text"] for _ in range(8)}) > 1
    draws = {FLMMTransform(train=True, seed=s, text_mode="random").example(row)["text"] for s in range(8)}
    assert len(draws) > 1  # the seed decides the draw
    with pytest.raises(ValueError, match="text_mode must be one of"):
        FLMMTransform(text_mode="first")


def test_train_questions_give_each_dataset_its_prompt(built, tokenizer, processor):
    """DataArguments.train_questions: PNG rows carry the default question, RefCOCO rows the processor's."""
    from flmm_hf.training import DataArguments, build_datasets, build_train_collator

    root = built["root"]
    args = DataArguments(train_datasets=[str(root / "png"), str(root / "refcoco")], train_split="val",
                         train_questions=["What is shown in this image?", ""])
    train, _ = build_datasets(args)
    png_rows, ref_rows = len(built["png"]), len(built["grouped"])
    assert len(train) == png_rows + ref_rows
    assert train[0]["question"] == "What is shown in this image?" and "question" not in train[png_rows]
    collator = build_train_collator(processor, use_sam=False, seed=0, text_mode="random")
    batch = collator([train[0], train[png_rows]])
    assert real_tokens(batch, 0)[0][:590] == original_prompt(tokenizer, "What is shown in this image?")[:590]
    assert real_tokens(batch, 1)[0][:590] == original_prompt(tokenizer)[:590]
    with pytest.raises(ValueError, match="train_questions has 1 entries for 2 train_datasets"):
        build_datasets(DataArguments(train_datasets=args.train_datasets, train_split="val", train_questions=["x"]))


# --------------------------------------------------------------------------------------
# DeepSeek-VL: the original's template, a byte-level tokenizer (no prefix space)
# --------------------------------------------------------------------------------------
DEEPSEEK_TEMPLATE = "User: {image}{question}\n\nAssistant:"  # the original configs: SYSTEM='', INSTRUCTION='User: {input}\n\nAssistant:'


@pytest.fixture(scope="module")
def deepseek(fixtures_dir):
    """A tiny DeepSeek-VL (SigLIP 28 px / patch 4: 49 image tokens) with SmolVLM's byte-level tokenizer."""
    from transformers import AutoTokenizer, DeepseekVLConfig, DeepseekVLImageProcessorPil, DeepseekVLProcessor

    from flmm_hf.modeling_flmm import FLMMForGrounding

    tok = AutoTokenizer.from_pretrained(
        str(fixtures_dir / "tokenizers" / "SmolVLM-256M-Instruct"), extra_special_tokens={"image_token": "<image_placeholder>"}
    )
    backbone = DeepseekVLProcessor(DeepseekVLImageProcessorPil(size={"height": 28, "width": 28}), tok, num_image_tokens=49)
    processor = FLMMProcessor(backbone, model_type="deepseek_vl", prompt_template=DEEPSEEK_TEMPLATE)
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=28, patch_size=4)
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    lmm = AutoModelForImageTextToText.from_config(
        DeepseekVLConfig(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"))
    )
    return tok, processor, FLMMForGrounding.from_lmm(lmm, use_sam=False, mask_head_channels=8).eval()


def test_deepseek_prompt_has_no_system_text_and_pieces_join_without_spaces(built, deepseek):
    tok, processor, model = deepseek
    row = with_sentences(dict(built["grouped"][0]), ["man texting", "guy on right."])
    batch = FLMMCollator(processor, transform=FLMMTransform(train=False))([row])
    ids, phrase_ids = real_tokens(batch, 0)
    image = "<image_placeholder>" * 49
    prompt = tok.encode(f"User: {image}Please give me a description of the image.\n\nAssistant:", add_special_tokens=True)
    expressions = [" ".join(s[0].split()).lower() for s in row["raw_sentences"]]
    expected, expected_phrases = list(prompt), [-1] * len(prompt)
    for k, expression in enumerate(expressions):
        piece = tok.encode(expression, add_special_tokens=False)
        expected += piece + [tok.encode(".", add_special_tokens=False)[-1]]
        expected_phrases += [k] * len(piece) + [-1]
    assert (ids, phrase_ids) == (expected, expected_phrases)
    decoded = tok.decode(ids)
    assert decoded.startswith("User: <image_placeholder>") and "system" not in decoded.lower()
    # byte-level pieces join with no added space: "Assistant:man texting.guy on right.."
    assert decoded.endswith("Assistant:" + "".join(e + "." for e in expressions))
    with torch.no_grad():
        out = model(**batch)
    assert out.coarse_logits[0].shape[0] == len(expressions)


def test_deepseek_visual_cot_prefix_is_part_of_the_prompt_string(deepseek, fixtures_dir):
    """The original's VisCoT appends ' The object ...' to its prompt string and encodes it whole: with a
    byte-level tokenizer the prefix keeps its space ('ĠThe'), which a separately encoded piece would lose."""
    from PIL import Image

    from flmm_hf.grounded_chat import generate_with_attention
    from flmm_hf.visual_cot import THOUGHT_PREFIX

    tok, processor, model = deepseek
    image = Image.open(fixtures_dir / "coco" / "images" / "000000039769.png")
    question = "What is on the couch?First think which object in this image is most relevant to the question."
    answer = generate_with_attention(model, image, question, processor, answer_prefix=THOUGHT_PREFIX, max_new_tokens=2)
    expected = tok.encode(
        "User: " + "<image_placeholder>" * 49 + question + "\n\nAssistant:" + THOUGHT_PREFIX, add_special_tokens=True
    )
    assert answer.inputs["input_ids"][0].tolist() == expected
    assert tok.convert_tokens_to_ids("ĠThe") in expected


def test_training_drops_png_narratives_that_ground_nothing(built, tmp_path):
    """The original's PNGDataset redraws a narrative without a grounded segment; training never sees one."""
    from datasets import concatenate_datasets

    from flmm_hf.training import load_split

    png = built["png"]
    ungrounded = png.map(lambda segments: {"segments": [dict(s, segment_ids=[]) for s in segments]},
                         input_columns="segments")
    folder = tmp_path / "png"
    (folder / "data").mkdir(parents=True)
    concatenate_datasets([ungrounded, png]).to_parquet(str(folder / "data" / "val-00000-of-00001.parquet"))
    rows = load_split(str(folder), "val", concat_refs=True)
    assert len(rows) == len(png) and all(any(s["segment_ids"] for s in r["segments"]) for r in rows)

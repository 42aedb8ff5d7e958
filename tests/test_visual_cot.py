"""Visual chain-of-thought (flmm_hf.visual_cot) and the VisCoT benchmark runner (flmm_hf.viscot_benchmark).

The original F-LMM is the spec: its prompt strings, token limits and box rule are asserted literally (they come
from flmm/models/frozen_deepseek_vl.py, scripts/visual_cot/visual_cot_inference.py and gpt_eval_cot_score*.py).
The model is a tiny random LLaVA with llava-1.5's processor files: it answers gibberish, so the checks are about
prompts, decoding settings, which tokens are grounded, geometry and files, never about meaning.
"""

from __future__ import annotations

import dataclasses
import http.server
import inspect
import json
import logging
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from flmm_hf import FLMMForGrounding, FLMMProcessor
from flmm_hf import viscot_benchmark as bench
from flmm_hf.grounded_chat import (
    StopWordsCriteria,
    generate_with_attention,
    generate_with_content,
    ground_generated_tokens,
)
from flmm_hf.visual_cot import (
    OBJECT_NAME_RECIPE,
    ORIGINAL_RECIPE,
    THOUGHT_PREFIX,
    VisualCoTRecipe,
    mask_to_box,
    original_mask_to_box,
    prompt_content,
    question_phrase_ids,
    resolve_recipe,
    visual_cot,
)
from tiny_models import llava_flmm_processor, tiny_flmm

QUESTION = "What is on the blanket?"
ORIGINAL_ANSWER_INSTRUCTION = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def processor(fixtures_dir) -> FLMMProcessor:
    return llava_flmm_processor(fixtures_dir)


@pytest.fixture(scope="module")
def model(fixtures_dir) -> FLMMForGrounding:
    return tiny_flmm(fixtures_dir).eval()


@pytest.fixture(scope="module")
def image(fixtures_dir) -> Image.Image:
    return Image.open(fixtures_dir / "coco" / "images" / "000000039769.png").convert("RGB")  # 640x480


class GenerateSpy:
    """Wraps `model.lmm.generate`: records each call's prompt ids, keyword arguments and returned sequences."""

    def __init__(self, model):
        self.generate = model.lmm.generate
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        out = self.generate(**kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        self.calls.append({"input_ids": kwargs["input_ids"][0].clone(), "kwargs": kwargs, "sequences": sequences[0].clone()})
        return out


def _text(processor, model, ids: torch.Tensor) -> str:
    """The prompt as text, each image's run of placeholders (576 for LLaVA-1.5) shown as one `<image>`."""
    image = ids == model.image_token_id
    first_of_run = image & ~torch.cat([image.new_zeros(1), image[:-1]])
    return processor.tokenizer.decode(ids[~image | first_of_run])


# ---- the defaults are the original's ------------------------------------------------------------
def test_original_recipe_is_the_originals_strings_and_limits():
    recipe = ORIGINAL_RECIPE
    assert inspect.signature(visual_cot).parameters["recipe"].default == "original"
    assert resolve_recipe("original") is ORIGINAL_RECIPE and VisualCoTRecipe() == ORIGINAL_RECIPE
    # visual_cot_v1: '<image_placeholder>' + question + 'First think which object in this image is most relevant ...'
    assert recipe.thought_question.replace("{question}", "Q?") == (
        "Q?First think which object in this image is most relevant to the question."
    )
    # prompt += ' The object most relevant to the question is'
    assert recipe.thought_prefix == " The object most relevant to the question is"
    # max_thought_tokens=16; stop words = template STOP_WORDS + ['.']; output_ids = outputs.sequences[0, :-1]
    assert recipe.thought_max_new_tokens == 16
    assert recipe.thought_stop_words == (".",)
    assert recipe.thought_drop_last_token is True
    assert recipe.thought_grounding == "all_tokens" and recipe.question_grounding == "prompt"
    # README: visual_cot_inference.py ... --discard_sam (coarse masks); mask2box: max(half extent, 8), box_scale 1.0
    assert recipe.use_refiner is False
    assert recipe.box_rule == "centre" and recipe.min_half_size == 8 and recipe.box_scale == 1.0
    # additional_prompt='\nAnswer the question using a single word or phrase.', max_new_tokens=32
    assert recipe.answer_instruction == "\nAnswer the question using a single word or phrase."
    assert recipe.answer_max_new_tokens == 32
    # f"<image_placeholder>the whole image, <image_placeholder>the image region that might help you answer the
    # question: {question}{self.additional_prompt}"
    assert prompt_content(recipe.two_image_prompt, "Q?", recipe.answer_instruction) == [
        {"type": "image"},
        {"type": "text", "text": "the whole image, "},
        {"type": "image"},
        {"type": "text", "text": "the image region that might help you answer the question: Q?"
                                 "\nAnswer the question using a single word or phrase."},
    ]
    # visual_cot_v3 (the baseline): f"<image_placeholder>{question}{self.additional_prompt}"
    assert prompt_content(recipe.one_image_prompt, "Q?", recipe.answer_instruction) == [
        {"type": "image"},
        {"type": "text", "text": "Q?\nAnswer the question using a single word or phrase."},
    ]
    # the question is cleaned as visual_cot_inference.py does
    assert bench.BBOX_REQUEST == (
        "Please provide the bounding box coordinate of the region that can help you answer the question better."
    )


def test_judge_prompts_are_the_originals():
    # gpt_eval_cot_score.py / gpt_eval_cot_score_single.py: BASE_PROMPT, PROMPT, GPT_EVAL_MODEL_NAME
    assert bench.JUDGE_SYSTEM_PROMPT == (
        "\nYou are responsible for proofreading the answers, you need to give a score to the model's answer by "
        "referring to the standard answer, based on the given question. The full score is 1 point and the minimum "
        "score is 0 points. Please output the score in the form \"score: <score>\". The evaluation criteria require "
        "that the closer the model's answer is to the standard answer, the higher the score.\n"
    )
    assert bench.JUDGE_USER_PROMPT == "\nquestion: %s\nstandard answer: %s\nmodel's answer: %s\n"
    assert bench.GPT_JUDGE_MODEL == "gpt-3.5-turbo-1106"
    assert bench.judge_messages("q", "r", "a") == [
        {"role": "system", "content": bench.JUDGE_SYSTEM_PROMPT},
        {"role": "user", "content": "\nquestion: q\nstandard answer: r\nmodel's answer: a\n"},
    ]


def test_recipe_settings_are_checked():
    with pytest.raises(ValueError, match="box_rule"):
        VisualCoTRecipe(box_rule="tight")
    with pytest.raises(ValueError, match="two_image_prompt"):
        VisualCoTRecipe(two_image_prompt="{image}{question}")
    with pytest.raises(ValueError, match="unknown VisCoT recipe 'paper'"):
        resolve_recipe("paper")
    assert resolve_recipe("object_name") is OBJECT_NAME_RECIPE


# ---- boxes ----------------------------------------------------------------------------------------
def test_original_box_rule_min_half_size_8():
    mask = torch.zeros(40, 50, dtype=torch.bool)
    mask[20, 25] = True  # one pixel: centre +- 8
    assert original_mask_to_box(mask) == (17, 12, 33, 28)
    mask[:] = False
    mask[0, 0] = True  # at a corner the box is clipped, not shifted inside
    assert original_mask_to_box(mask) == (0, 0, 8, 8)
    mask[:] = False
    mask[39, 49] = True
    assert original_mask_to_box(mask) == (41, 31, 50, 40)
    mask[:] = False
    mask[10:30, 5:45] = True  # rows 10..29, cols 5..44: half sides 9.5 and 19.5 around (19.5, 24.5)
    assert original_mask_to_box(mask) == (5, 10, 44, 29)  # the end is the last row/column itself
    assert original_mask_to_box(mask, scale=2.0) == (0, 0, 50, 38)  # 19.5 +- 19 -> [0.5, 38.5], truncated
    assert original_mask_to_box(torch.zeros(40, 50, dtype=torch.bool)) == (0, 0, 50, 40)  # empty: whole image
    with pytest.raises(ValueError, match="bool"):
        original_mask_to_box(mask.float())


def test_grow_box_rule_of_the_object_name_recipe():
    mask = torch.zeros(40, 50, dtype=torch.bool)
    mask[0, 0] = True
    assert mask_to_box(mask) == (0, 0, 16, 16)
    mask[:] = False
    mask[39, 49] = True
    assert mask_to_box(mask) == (34, 24, 50, 40)
    mask[10:30, 5:45] = True
    assert mask_to_box(mask) == (5, 10, 50, 40)
    assert mask_to_box(torch.zeros(40, 50, dtype=torch.bool)) == (0, 0, 50, 40)
    assert mask_to_box(torch.ones(8, 50, dtype=torch.bool)) == (0, 0, 50, 8)  # image shorter than 16


# ---- generation pieces ------------------------------------------------------------------------------
def test_stop_words_criteria_reads_the_generated_text_only(processor):
    tokenizer = processor.tokenizer
    prompt = tokenizer("USER: Which one. ASSISTANT:")["input_ids"]  # the prompt's own "." must not stop
    criterion = StopWordsCriteria(tokenizer, ["."], len(prompt))
    ids = lambda text: torch.tensor([prompt + tokenizer(text, add_special_tokens=False)["input_ids"]])
    assert not bool(criterion(ids("the cat"), None)[0])
    assert bool(criterion(ids("the cat."), None)[0])
    assert bool(criterion(ids("the cat.\n"), None)[0])  # new lines are removed first, as xtuner's criterion
    with pytest.raises(ValueError, match="stop_words"):
        StopWordsCriteria(tokenizer, ".", 0)


def test_drop_last_token_and_stop_words(model, processor, image):
    plain = generate_with_attention(model, image, QUESTION, processor, max_new_tokens=6)
    assert len(plain.token_ids) == 6
    dropped = generate_with_attention(model, image, QUESTION, processor, max_new_tokens=6, drop_last_token=True)
    assert dropped.token_ids.tolist() == plain.token_ids[:5].tolist()
    assert torch.allclose(dropped.attentions, plain.attentions[:, :, :5], atol=1e-6)
    assert torch.allclose(dropped.hidden_states, plain.hidden_states[:, :5], atol=1e-6)
    # A stop word that the decoded text reaches at the third token: generation stops there, that token is dropped.
    decode = lambda n: processor.tokenizer.decode(plain.token_ids[:n]).replace("\r", "").replace("\n", "")
    stop = decode(3)[-2:]
    first = next(n for n in range(1, 7) if decode(n).endswith(stop))
    stopped = generate_with_attention(
        model, image, QUESTION, processor, max_new_tokens=6, stop_words=[stop], drop_last_token=True
    )
    assert stopped.token_ids.tolist() == plain.token_ids[: first - 1].tolist()


def test_answer_prefix_is_part_of_the_prompt(model, processor, image):
    answer = generate_with_attention(model, image, QUESTION, processor, answer_prefix=THOUGHT_PREFIX, max_new_tokens=3)
    prompt = _text(processor, model, answer.inputs["input_ids"][0])
    # One space after "ASSISTANT:", as the original's 'Assistant:' + ' The object ...'
    assert prompt.endswith(f"{QUESTION} ASSISTANT: The object most relevant to the question is")
    expected_tail = processor.tokenizer(" ASSISTANT: The object most relevant to the question is", add_special_tokens=False)
    assert answer.inputs["input_ids"][0, -len(expected_tail["input_ids"]) + 1 :].tolist() == expected_tail["input_ids"][1:]
    assert "The object most relevant" not in answer.text  # generation continues the prefix


# ---- visual chain-of-thought, original recipe -------------------------------------------------------------
def test_original_v1_prompts_decoding_and_grounding(model, processor, image, monkeypatch):
    spy = GenerateSpy(model)
    monkeypatch.setattr(model.lmm, "generate", spy)
    result = visual_cot(model, image, QUESTION, "v1", processor)
    assert result.recipe == "original" and result.used_two_images
    thought_call, answer_call = spy.calls
    # Thought step: the original's user turn and forced assistant prefix, greedy, 16 new tokens, stop at ".".
    assert _text(processor, model, thought_call["input_ids"]).endswith(
        "\nWhat is on the blanket?First think which object in this image is most relevant to the question. "
        "ASSISTANT: The object most relevant to the question is"
    )
    assert (thought_call["input_ids"] == model.image_token_id).sum() == 576
    kwargs = thought_call["kwargs"]
    assert kwargs["max_new_tokens"] == 16 and kwargs["do_sample"] is False
    stops = [c for c in kwargs["stopping_criteria"] if isinstance(c, StopWordsCriteria)]
    assert len(stops) == 1 and stops[0].stop_words == (".",)
    # The thought is every generated token but the last one.
    generated = thought_call["sequences"][len(thought_call["input_ids"]) :]
    assert result.thought == processor.tokenizer.decode(generated[:-1], skip_special_tokens=True).strip()
    assert result.grounded_text == result.thought
    # Answer step: both images and the original two-image prompt, greedy, 32 new tokens.
    assert (answer_call["input_ids"] == model.image_token_id).sum() == 2 * 576
    answer_prompt = _text(processor, model, answer_call["input_ids"])
    assert "the whole image," in answer_prompt
    assert answer_prompt.endswith(
        "the image region that might help you answer the question: What is on the blanket?"
        "\nAnswer the question using a single word or phrase. ASSISTANT:"
    )
    assert answer_call["kwargs"]["max_new_tokens"] == 32 and answer_call["kwargs"]["do_sample"] is False

    # Every thought token is grounded as one phrase, from the coarse mask; the box is the original's rule.
    answer = generate_with_attention(
        model, image, ORIGINAL_RECIPE.thought_question.replace("{question}", QUESTION), processor,
        answer_prefix=THOUGHT_PREFIX, stop_words=["."], drop_last_token=True, max_new_tokens=16,
    )
    everything = torch.ones(1, len(answer.token_ids), dtype=torch.bool)
    coarse = ground_generated_tokens(model, answer, everything, image, use_refiner=False)
    expected = FLMMProcessor.post_process_masks([coarse], [(image.height, image.width)])[0][0]
    assert torch.equal(result.mask, expected)
    assert result.box == original_mask_to_box(expected)
    assert result.crop.size == (result.box[2] - result.box[0], result.box[3] - result.box[1])
    # Not vacuous: grounding only the first token, or refining with SAM, gives another mask here.
    first_only = everything.clone()
    first_only[0, 1:] = False
    other = FLMMProcessor.post_process_masks(
        [ground_generated_tokens(model, answer, first_only, image, use_refiner=False)], [(image.height, image.width)]
    )[0][0]
    assert not torch.equal(other, expected)
    refined = FLMMProcessor.post_process_masks(
        [ground_generated_tokens(model, answer, everything, image, use_refiner=True)], [(image.height, image.width)]
    )[0][0]
    assert not torch.equal(refined, expected)


def test_empty_thought_crops_the_whole_image(model, processor, image, caplog):
    recipe = dataclasses.replace(ORIGINAL_RECIPE, thought_max_new_tokens=1)  # the one token is dropped
    with caplog.at_level(logging.WARNING, logger="flmm_hf.visual_cot"):
        result = visual_cot(model, image, QUESTION, "v1", processor, recipe=recipe, max_new_tokens=2)
    assert result.thought == "" and "thought is empty" in caplog.text
    assert result.box == (0, 0, image.width, image.height) and not result.mask.any()
    assert isinstance(result.answer, str)


def test_original_v2_grounds_the_question_in_the_user_turn(model, processor, image, monkeypatch):
    inputs = processor(images=[image], texts=None, question=QUESTION)
    phrase_ids = question_phrase_ids(processor, inputs["input_ids"], inputs["attention_mask"], QUESTION)
    assert processor.tokenizer.decode(inputs["input_ids"][phrase_ids == 0]) == QUESTION
    # the marked tokens sit in the user turn, before the assistant prompt
    assert processor.tokenizer.decode(inputs["input_ids"][0, int((phrase_ids[0] == 0).nonzero().max()) + 1 :]) == "ASSISTANT:"
    spy = GenerateSpy(model)
    monkeypatch.setattr(model.lmm, "generate", spy)
    result = visual_cot(model, image, QUESTION, "v2", processor)
    assert result.thought == "" and result.grounded_text == QUESTION
    assert len(spy.calls) == 1  # v2 generates only the answer
    with torch.no_grad():
        out = model(**{**inputs, "phrase_ids": phrase_ids}, refine=False)
    expected = FLMMProcessor.post_process_masks(out.coarse_logits, inputs["original_sizes"])[0][0]
    assert torch.equal(result.mask, expected) and result.box == original_mask_to_box(expected)


def test_original_baseline_prompt(model, processor, image, monkeypatch):
    spy = GenerateSpy(model)
    monkeypatch.setattr(model.lmm, "generate", spy)
    result = visual_cot(model, image, QUESTION, "baseline", processor)
    assert result.box is None and isinstance(result.answer, str)
    (call,) = spy.calls
    assert _text(processor, model, call["input_ids"]).endswith(
        "\nWhat is on the blanket?\nAnswer the question using a single word or phrase. ASSISTANT:"
    )
    assert call["kwargs"]["max_new_tokens"] == 32
    with pytest.raises(ValueError, match="version"):
        visual_cot(model, image, "?", "v3", processor)
    with pytest.raises(ValueError, match="2 image item"):
        generate_with_content(model, [image], prompt_content(ORIGINAL_RECIPE.two_image_prompt, QUESTION), processor)


# ---- visual chain-of-thought, this package's earlier variant --------------------------------------------
def test_object_name_recipe_v1(model, processor, image, monkeypatch):
    spy = GenerateSpy(model)
    monkeypatch.setattr(model.lmm, "generate", spy)
    result = visual_cot(model, image, QUESTION, "v1", processor, recipe="object_name", use_refiner=False, max_new_tokens=4)
    thought_call, answer_call = spy.calls
    assert _text(processor, model, thought_call["input_ids"]).endswith(
        "To answer the question 'What is on the blanket?', which object in the image is the most relevant? "
        "Answer with the name of the object only. ASSISTANT:"
    )
    assert _text(processor, model, answer_call["input_ids"]).endswith(
        "The second image is a close-up of a region of the first image. What is on the blanket? ASSISTANT:"
    )
    assert result.used_two_images and result.recipe == "object_name"
    x0, y0, x1, y1 = result.box
    assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
    assert x1 - x0 >= 16 and y1 - y0 >= 16
    assert result.mask.shape == (image.height, image.width)


def test_object_name_recipe_v2_crop_only(model, processor, image):
    v2 = visual_cot(model, image, QUESTION, "v2", processor, recipe="object_name", two_images=False,
                    use_refiner=False, max_new_tokens=3)
    x0, y0, x1, y1 = v2.box
    assert 0 <= x0 and x1 <= image.width and 0 <= y0 and y1 <= image.height
    assert x1 - x0 >= 16 and y1 - y0 >= 16 and not v2.used_two_images
    assert v2.grounded_text == "What is on the blanket"


# ---- the benchmark runner --------------------------------------------------------------------------------
def _record(question_id: int, image: str, question: str, answer: str, box: list[int]) -> dict:
    """A record in the VisCoT benchmark format (scripts/visual_cot/benchmark/*.json)."""
    return {
        "dataset": "coco", "split": "val", "question_id": question_id,
        "image": [image, f"{image}###{box}"],
        "conversations": [
            {"from": "human", "value": f"<image>\n{question} {bench.BBOX_REQUEST}"},
            {"from": "gpt", "value": "[0.1, 0.2, 0.3, 0.4]"},
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": answer},
        ],
    }


@pytest.fixture
def benchmark_dir(tmp_path, fixtures_dir) -> Path:
    """3 records whose images sit under <tmp>/data/cot/coco and are referenced relative to <tmp>/data."""
    names = ["000000039769.png", "000000142238.jpg", "000000439180.jpg"]
    (tmp_path / "data" / "cot" / "coco").mkdir(parents=True)
    for name in names:
        shutil.copy(fixtures_dir / "coco" / "images" / name, tmp_path / "data" / "cot" / "coco" / name)
    records = [
        _record(0, f"cot/coco/{names[0]}", "What is on the blanket?", "cats", [10, 20, 300, 400]),
        _record(1, f"cot/coco/{names[1]}", "What sport is played?", "rugby", [0, 0, 640, 427]),
        _record(2, f"cot/coco/{names[2]}", "Is it sunny?", "yes", [5, 5, 50, 50]),
    ]
    (tmp_path / "benchmark").mkdir()
    (tmp_path / "benchmark" / "coco.json").write_text(json.dumps(records))
    return tmp_path


def test_parse_viscot_record():
    raw = {  # scripts/visual_cot/benchmark/gqa.json, the first record
        "dataset": "gqa", "split": "val", "question_id": 7,
        "image": ["cot/gqa/2316539.jpg", "cot/gqa/2316539.jpg###[217, 343, 242, 393]"],
        "conversations": [
            {"from": "human", "value": "<image>\nWhat are the tree branches in front of? Please provide the bounding box "
                                       "coordinate of the region that can help you answer the question better."},
            {"from": "gpt", "value": "[0.542, 0.686, 0.592, 0.786]"},
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": "window"},
        ],
    }
    record = bench.parse_viscot_record(raw, 0)
    assert record.question == "What are the tree branches in front of?"
    assert record.reference == "window" and record.gt_bbox == [217, 343, 242, 393]
    assert record.image == "cot/gqa/2316539.jpg" and record.question_id == 7 and record.dataset == "gqa"
    with pytest.raises(ValueError, match="record 3 needs 'conversations'"):
        bench.parse_viscot_record({"image": ["a.jpg"]}, 3)


def test_resume_drops_an_unfinished_last_line_and_names_clash(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"index": 0, "answer": "a"}) + "\n" + '{"index": 1, "ans')  # the write was cut
    kept = bench.prepare_output(path, overwrite=False, resume=True)
    assert list(kept) == [0] and path.read_text() == json.dumps({"index": 0, "answer": "a"}) + "\n"
    with pytest.raises(FileExistsError, match="--resume"):
        bench.prepare_output(path, overwrite=False, resume=False)
    assert bench.prepare_output(path, overwrite=True, resume=False) == {} and not path.exists()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "gqa.json").write_text("[]")
    with pytest.raises(ValueError, match="same name"):
        bench.benchmark_files([tmp_path / "a", tmp_path / "b"])


class KeywordJudge:
    """A deterministic judge: 1.0 when the reference occurs in the answer, else 0.0."""

    name = "keyword"

    def __init__(self):
        self.calls = 0

    def score(self, question: str, reference: str, answer: str) -> float:
        self.calls += 1
        return float(reference.lower() in answer.lower())


def test_runner_end_to_end_resume_and_refusal(model, processor, benchmark_dir, monkeypatch):
    out = benchmark_dir / "out"
    args = lambda **kw: bench.VisCoTBenchmarkArguments(
        benchmark=[str(benchmark_dir / "benchmark")], image_folder=str(benchmark_dir / "data"), output_dir=str(out),
        progress=False, **kw,
    )
    # First only one record, then resume: the first line is kept as it is, the other two are added.
    bench.run_viscot_benchmark(args(max_samples=1), model=model, processor=processor)
    first_line = (out / "coco.jsonl").read_text().splitlines()[0]
    judge = KeywordJudge()
    outcome = bench.run_viscot_benchmark(args(resume=True), model=model, processor=processor, judge=judge)
    lines = [json.loads(line) for line in (out / "coco.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and json.dumps(json.loads(first_line)) == json.dumps(lines[0])
    assert [row["index"] for row in lines] == [0, 1, 2]
    row = lines[1]
    assert row["question"] == "What sport is played?" and row["gt"] == "rugby" and row["gt_bbox"] == [0, 0, 640, 427]
    assert row["version"] == "v1" and row["recipe"] == "original" and isinstance(row["answer"], str)
    assert len(row["box"]) == 4 and isinstance(row["thought"], str)
    # Scores: one per answer, and the summary.
    scores = [json.loads(line) for line in (out / "coco.scores_keyword.jsonl").read_text().splitlines()]
    assert [s["score"] for s in scores] == [float(s["gt"] in s["answer"].lower()) for s in scores]
    assert judge.calls == 3 and all(s["judge"] == "keyword" for s in scores)
    summary = json.loads((out / "viscot_scores_keyword.json").read_text())
    assert summary == outcome["summary"] and summary["benchmarks"]["coco"]["num_scored"] == 3

    # An existing output is never replaced unasked, and the refusal comes before any work.
    monkeypatch.setattr(bench, "visual_cot", lambda *a, **k: pytest.fail("answered although the output exists"))
    with pytest.raises(FileExistsError, match=r"coco\.jsonl exists; pass --resume .* --overwrite"):
        bench.run_viscot_benchmark(args(), model=model, processor=processor)
    with pytest.raises(FileExistsError, match="scores_keyword"):
        bench.run_viscot_benchmark(args(), judge=KeywordJudge())  # scoring only: the scores file exists
    # Resuming a complete run does nothing; resuming with other settings is refused.
    bench.run_viscot_benchmark(args(resume=True), model=model, processor=processor)
    with pytest.raises(ValueError, match="written with"):
        bench.run_viscot_benchmark(args(resume=True, version="v2"), model=model, processor=processor)
    monkeypatch.undo()
    # --overwrite replaces exactly the files it writes (the inputs beside them stay).
    bench.run_viscot_benchmark(args(overwrite=True, version="baseline", max_samples=1), model=model, processor=processor)
    lines = [json.loads(line) for line in (out / "coco.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["version"] == "baseline"
    assert (out / "coco.scores_keyword.jsonl").exists() and (benchmark_dir / "benchmark" / "coco.json").exists()


def test_runner_reports_a_missing_image(model, processor, benchmark_dir):
    args = bench.VisCoTBenchmarkArguments(
        benchmark=[str(benchmark_dir / "benchmark" / "coco.json")], output_dir=str(benchmark_dir / "out"), progress=False,
    )  # no image_folder: paths are read relative to the JSON file's folder, where the images are not
    with pytest.raises(FileNotFoundError, match="--image_folder"):
        bench.run_viscot_benchmark(args, model=model, processor=processor)


# ---- judges --------------------------------------------------------------------------------------------
def test_parse_judge_score():
    assert bench.parse_judge_score("Score: 0.8") == 0.8
    assert bench.parse_judge_score("score: 1.5") == 1.0
    assert bench.parse_judge_score("The answer is right.") == 0.0
    assert bench.parse_judge_score("score: 0.5, no, score: 1") == 0.0  # not exactly one score
    assert bench.parse_judge_score("score: .") == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gpt_judge_fails_clearly_without_key_or_network(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(bench.JudgeUnavailableError, match="OPENAI_API_KEY"):
        bench.GPTJudge()
    closed = f"http://127.0.0.1:{_free_port()}/v1/chat/completions"  # nothing listens there
    judge = bench.GPTJudge(api_key="k", api_url=closed, retries=2, retry_wait_s=0, sleep_s=0, timeout_s=5)
    with pytest.raises(bench.JudgeUnavailableError, match=r"could not reach .*\(2 attempts"):
        judge.score("q", "r", "a")


def test_gpt_judge_sends_the_original_request():
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append((self.headers["Authorization"], body))
            reply = json.dumps({"choices": [{"message": {"content": "Score: 0.8"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
        judge = bench.GPTJudge(api_key="secret", api_url=url, sleep_s=0)
        assert judge.score("What is it?", "window", "a window") == 0.8
    finally:
        server.shutdown()
        server.server_close()
    authorization, body = received[0]
    assert authorization == "Bearer secret"
    assert body == {
        "model": "gpt-3.5-turbo-1106", "temperature": 0.2, "max_tokens": 100,
        "messages": bench.judge_messages("What is it?", "window", "a window"),
    }


@pytest.fixture(scope="module")
def tiny_lm_dir(fixtures_dir, tmp_path_factory) -> Path:
    """A tiny random Llama with llava-1.5's tokenizer, saved as a local judge model."""
    tokenizer = AutoTokenizer.from_pretrained(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf")
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=512)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_judge")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_judge_asks_the_original_prompt(tiny_lm_dir, monkeypatch):
    judge = bench.LocalLMMJudge(str(tiny_lm_dir), device="cpu", dtype=torch.float32, max_new_tokens=5)
    assert isinstance(judge, bench.Judge)
    value = judge.score("What is it?", "window", "a window")  # the random model's real reply
    assert 0.0 <= value <= 1.0
    tokenizer = judge.tokenizer
    seen = []

    def generate(input_ids, **kwargs):  # a model that answers "score: 0.5"
        seen.append((tokenizer.decode(input_ids[0]), kwargs))
        reply = torch.tensor([tokenizer("score: 0.5", add_special_tokens=False)["input_ids"]])
        return torch.cat([input_ids, reply], dim=1)

    monkeypatch.setattr(judge.model, "generate", generate)
    assert judge.score("What is it?", "window", "a window") == 0.5
    prompt, kwargs = seen[0]
    assert "You are responsible for proofreading the answers" in prompt
    assert "question: What is it?\nstandard answer: window\nmodel's answer: a window" in prompt
    assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 5


def test_cli_answers_and_scores_with_a_local_judge(model, processor, benchmark_dir, tiny_lm_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny_flmm")
    model.save_pretrained(model_dir, save_mode="full")  # the tiny LMM has no Hub id to reference
    processor.save_pretrained(model_dir)
    out = benchmark_dir / "cli_out"
    argv = [
        "--model_name_or_path", str(model_dir), "--benchmark", str(benchmark_dir / "benchmark" / "coco.json"),
        "--image_folder", str(benchmark_dir / "data"), "--output_dir", str(out), "--device", "cpu",
        "--version", "v2", "--every", "2", "--judge", "local", "--judge_model", str(tiny_lm_dir),
        "--progress", "false", "--lmm_dtype", "float32",
    ]
    outcome = bench.main(argv)
    answers = [json.loads(line) for line in (out / "coco.jsonl").read_text().splitlines()]
    assert [row["index"] for row in answers] == [0, 2] and all(row["version"] == "v2" for row in answers)
    assert len((out / "coco.scores_local.jsonl").read_text().splitlines()) == 2
    assert outcome["summary"]["judge"].startswith("local:")
    with pytest.raises(FileExistsError, match="--overwrite"):
        bench.main(argv)

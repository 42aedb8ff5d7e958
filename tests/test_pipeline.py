"""The `referring-segmentation` transformers pipeline: from a saved folder with remote code in a fresh process
(flmm_hf not importable), around a model in memory, and its errors.

The saved tiny F-LMM and its bases are test_hub's fixtures (a tiny LLaVA-1.5-shaped LMM and a tiny SAM saved to
folders, head weights perturbed). A random LMM answers gibberish: the grounded-chat checks take their phrase from
the answer it actually gives (greedy decoding is deterministic) and compare with `model.chat`.
"""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from flmm_hf import ReferringSegmentationPipeline
from flmm_hf.pipeline_flmm import CUSTOM_PIPELINE_ENTRY, TASK, segment_entry
from test_hub import PHRASES, TEXT, bases, image, processor, run_without_flmm_hf, saved, trained  # noqa: F401 (fixtures)

QUESTION = "What is in the image?"
NEW_TOKENS = 6

CHILD = textwrap.dedent(
    """
    from transformers import pipeline

    folder, image, out, args = sys.argv[1:5]
    text, phrases, question, answer_phrase, new_tokens = json.loads(args)
    pipe = pipeline("referring-segmentation", model=folder, trust_remote_code=True)
    grounded = pipe(image, text=text, phrases=phrases)
    chat = pipe(image, question=question, phrases=[answer_phrase], max_new_tokens=new_tokens)
    summary = {"classes": [type(pipe).__module__, type(pipe).__name__, type(pipe.model).__name__,
                           type(pipe.processor).__name__]}
    for name, segments in (("ground", grounded), ("chat", chat["segments"])):
        summary[name] = []
        for k, segment in enumerate(segments):
            path = f"{out}/{name}-{k}.png"
            segment["mask"].save(path)
            summary[name].append({"label": segment["label"], "score": segment["score"], "mode": segment["mask"].mode,
                                  "size": list(segment["mask"].size), "path": path})
    summary["answer"], summary["missing"] = chat["answer"], chat["missing"]
    print(json.dumps(summary))
    """
)


def _check_entry(entry: dict, label: str, probabilities: torch.Tensor, threshold: float = 0.5) -> None:
    """`entry` is the image-segmentation-style dict of a phrase whose probabilities are given."""
    assert set(entry) == {"label", "mask", "score"} and entry["label"] == label
    height, width = probabilities.shape
    assert entry["mask"].mode == "L" and entry["mask"].size == (width, height)
    mask = torch.from_numpy(np.array(entry["mask"]))
    assert set(mask.unique().tolist()) <= {0, 255}
    expected = probabilities > threshold
    # the same pixels, up to those within 1e-5 of the threshold (another process may round them differently)
    differ = (mask == 255) != expected
    assert not differ[(probabilities - threshold).abs() >= 1e-5].any()
    score = float(probabilities[expected].mean()) if expected.any() else 0.0
    assert 0.0 <= entry["score"] <= 1.0 and entry["score"] == pytest.approx(score, abs=1e-6)


@pytest.fixture(scope="module")
def answer(trained, processor, image):
    """The tiny model's own answer, and a visible word of it to ground."""
    answer = trained.chat(Image.open(image), QUESTION, processor=processor, selector="none", max_new_tokens=NEW_TOKENS)
    words = [w for w in answer.text.split() if any(c.isalnum() for c in w)]
    assert words, f"the tiny LMM's answer {answer.text!r} has no word to ground"
    return answer.text, words[0]


@pytest.fixture(scope="module")
def pipe(trained, processor):
    return pipeline(TASK, model=trained, processor=processor)


def test_save_writes_the_pipeline_code_and_its_custom_pipelines_entry(saved):
    config = json.loads((saved / "config.json").read_text())
    assert config["custom_pipelines"] == {TASK: CUSTOM_PIPELINE_ENTRY}
    assert CUSTOM_PIPELINE_ENTRY["impl"] == "pipeline_flmm.ReferringSegmentationPipeline"
    assert (saved / "pipeline_flmm.py").is_file()  # its siblings: test_hub's flat-and-hub-safe check covers them


def test_fresh_process_pipeline_from_folder_with_remote_code(trained, processor, saved, image, answer, tmp_path):
    """`pipeline("referring-segmentation", model=folder, trust_remote_code=True)` where flmm_hf is not importable
    gives the masks and scores of the in-process model, for a text's phrases and for a grounded answer."""
    answer_text, answer_phrase = answer
    out = tmp_path / "out"
    out.mkdir()
    args = json.dumps([TEXT, PHRASES, QUESTION, answer_phrase, NEW_TOKENS])
    result = run_without_flmm_hf(CHILD, [str(saved), str(image), str(out), args], tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    module, pipeline_class, model_class, processor_class = summary["classes"]
    assert module.startswith("transformers_modules.") and module.endswith(".pipeline_flmm")
    assert (pipeline_class, model_class, processor_class) == (
        "ReferringSegmentationPipeline", "FLMMForGrounding", "FLMMProcessor")

    pil_image = Image.open(image)
    probabilities = trained.ground(pil_image, TEXT, PHRASES, processor=processor, return_probabilities=True)
    assert [entry["label"] for entry in summary["ground"]] == PHRASES  # one entry per phrase, in order
    for entry, label, probs in zip(summary["ground"], PHRASES, probabilities):
        assert entry["mode"] == "L" and entry["size"] == list(pil_image.size)
        _check_entry({"label": entry["label"], "mask": Image.open(entry["path"]), "score": entry["score"]}, label, probs)

    chat = trained.chat(pil_image, QUESTION, phrases=[answer_phrase], processor=processor,
                        max_new_tokens=NEW_TOKENS, return_probabilities=True)
    assert summary["answer"] == chat.text == answer_text and summary["missing"] == []
    assert [entry["label"] for entry in summary["chat"]] == chat.phrases == [answer_phrase]
    for entry, label, probs in zip(summary["chat"], chat.phrases, chat.probabilities):
        _check_entry({"label": entry["label"], "mask": Image.open(entry["path"]), "score": entry["score"]}, label, probs)


def test_in_process_pipeline_around_a_model_in_memory(pipe, trained, processor, image):
    """With flmm_hf imported the task is registered: `pipeline(task, model=<FLMMForGrounding>, processor=...)`;
    images as a path, a PIL image or a numpy array; spans label with their text; a list of images gives a list."""
    assert isinstance(pipe, ReferringSegmentationPipeline)
    pil_image = Image.open(image).convert("RGB")
    probabilities = trained.ground(pil_image, TEXT, PHRASES, processor=processor, return_probabilities=True)
    entries = pipe(str(image), text=TEXT, phrases=PHRASES)
    assert len(entries) == len(PHRASES)
    for entry, label, probs in zip(entries, PHRASES, probabilities):
        _check_entry(entry, label, probs)
    # A numpy image, a character span (labelled with its text) and a threshold of the call.
    span = (TEXT.index(PHRASES[1]), TEXT.index(PHRASES[1]) + len(PHRASES[1]))
    entries = pipe(np.array(pil_image), text=TEXT, phrases=[PHRASES[0], span], threshold=0.2)
    for entry, label, probs in zip(entries, PHRASES, probabilities):
        _check_entry(entry, label, probs, threshold=0.2)
    # A list of images gives a list of results; without phrases the whole text is the one phrase.
    listed = pipe([pil_image, pil_image], text=TEXT)
    assert len(listed) == 2 and [[entry["label"] for entry in entries] for entries in listed] == [[TEXT], [TEXT]]
    whole = trained.ground(pil_image, TEXT, [TEXT], processor=processor, return_probabilities=True)[0]
    for entries in listed:
        _check_entry(entries[0], TEXT, whole)


def test_in_process_grounded_chat_and_the_model_processor(trained, processor, image, answer):
    """A grounded-chat call returns the answer text with the entries; `model.processor` serves when none is passed;
    phrases not in the answer are skipped and listed with on_missing='skip'."""
    answer_text, answer_phrase = answer
    trained.processor = processor
    try:
        pipe = pipeline(TASK, model=trained, max_new_tokens=NEW_TOKENS)
    finally:
        del trained.processor
    result = pipe(Image.open(image), question=QUESTION, phrases=[answer_phrase, "zebra crossing"], on_missing="skip")
    assert set(result) == {"answer", "segments", "missing"}
    assert result["answer"] == answer_text and result["missing"] == ["zebra crossing"]
    assert [entry["label"] for entry in result["segments"]] == [answer_phrase]
    chat = trained.chat(Image.open(image), QUESTION, phrases=[answer_phrase], processor=processor,
                        max_new_tokens=NEW_TOKENS, return_probabilities=True)
    _check_entry(result["segments"][0], answer_phrase, chat.probabilities[0])
    # max_new_tokens given once to pipeline(...) is a chat argument: a call with text does not use it.
    assert len(pipe(Image.open(image), text=TEXT, phrases=PHRASES)) == len(PHRASES)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({}, ValueError, "nothing to ground: pass text="),
        ({"phrases": ["two cats"]}, ValueError, "nothing to ground"),
        ({"text": TEXT, "question": QUESTION}, ValueError, "either text= .* or question=.*, not both"),
        ({"text": TEXT, "phrases": ["three dogs"]}, ValueError, "'three dogs' not found"),
        ({"text": TEXT, "phrases": "two cats"}, TypeError, r"pass phrases=\['two cats'\]"),
        ({"text": TEXT, "phrases": []}, ValueError, "phrases is empty"),
        ({"text": "  "}, ValueError, "text must be a non-empty string"),
        ({"text": TEXT, "threshold": 2.0}, ValueError, "threshold must be a probability"),
        ({"text": TEXT, "treshold": 0.3}, TypeError, r"unexpected arguments \['treshold'\]"),
        ({"question": QUESTION, "max_new_tokens": 2, "generate_kwargs": {"max_new_tokens": 3}}, ValueError,
         "max_new_tokens is given twice"),
    ],
)
def test_bad_calls_say_what_is_wrong(pipe, image, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe(str(image), **kwargs)


def test_bad_image_and_missing_processor_say_how_to_fix(pipe, trained):
    with pytest.raises(TypeError, match="image must be a PIL image, a numpy array"):
        pipe(torch.zeros(3, 8, 8), text=TEXT)
    assert not trained.name_or_path and getattr(trained, "processor", None) is None  # built with from_lmm
    with pytest.raises(ValueError, match="pass processor=FLMMProcessor"):
        pipeline(TASK, model=trained)


def test_segment_entry_score_is_the_mean_probability_inside_the_mask():
    probabilities = torch.tensor([[0.9, 0.7], [0.2, 0.5]])
    entry = segment_entry("a", probabilities, threshold=0.5)
    assert np.array_equal(np.array(entry["mask"]), np.array([[255, 255], [0, 0]], dtype=np.uint8))
    assert entry["score"] == pytest.approx(0.8)
    assert segment_entry("a", probabilities, threshold=0.95)["score"] == 0.0  # empty mask


def test_pipeline_save_pretrained_writes_a_folder_the_pipeline_loads_from(pipe, tmp_path):
    """`pipe.save_pretrained` saves the model (code, custom_pipelines) and the FLMMProcessor beside it."""
    pipe.save_pretrained(tmp_path / "pipe")
    config = json.loads((tmp_path / "pipe" / "config.json").read_text())
    assert config["custom_pipelines"] == {TASK: CUSTOM_PIPELINE_ENTRY}
    assert {"pipeline_flmm.py", "processor_config.json", "flmm_processor_config.json"} <= set(os.listdir(tmp_path / "pipe"))


def test_installed_pipeline_class_loads_a_folder_without_remote_code(trained, processor, saved, image):
    """With flmm_hf installed, `pipeline_class=ReferringSegmentationPipeline` loads a saved folder with the
    installed classes (no remote code); without it or `trust_remote_code`, transformers asks for remote code."""
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        pipeline(TASK, model=str(saved))
    pipe = pipeline(TASK, model=str(saved), pipeline_class=ReferringSegmentationPipeline)
    assert type(pipe.model).__module__ == "flmm_hf.modeling_flmm"
    assert type(pipe.processor).__module__ == "flmm_hf.processing_flmm"
    pil_image = Image.open(image)
    probabilities = trained.ground(pil_image, TEXT, PHRASES, processor=processor, return_probabilities=True)
    for entry, label, probs in zip(pipe(pil_image, text=TEXT, phrases=PHRASES), PHRASES, probabilities):
        _check_entry(entry, label, probs)

"""The Visual-CoT (VisCoT) benchmark: answer its questions with F-LMM's visual chain-of-thought, then score them.

    # answer every question of the benchmark files (one JSONL of answers per file)
    python -m flmm_hf.viscot_benchmark --model_name_or_path org/flmm-deepseek-vl-1.3b \\
        --benchmark viscot/benchmark --image_folder data --output_dir viscot_output
    # score those answers with the original's GPT judge (needs network access and OPENAI_API_KEY) ...
    python -m flmm_hf.viscot_benchmark --benchmark viscot/benchmark --output_dir viscot_output --judge gpt
    # ... or with a local model asked the same scoring prompt
    python -m flmm_hf.viscot_benchmark --benchmark viscot/benchmark --output_dir viscot_output \\
        --judge local --judge_model Qwen/Qwen2.5-7B-Instruct

Input: the benchmark files of the original F-LMM (`scripts/visual_cot/benchmark/*.json`, from Visual-CoT), one
JSON list of records per dataset. A record::

    {"dataset": "gqa", "split": "val", "question_id": 7,
     "image": ["cot/gqa/2316539.jpg", "cot/gqa/2316539.jpg###[217, 343, 242, 393]"],
     "conversations": [
        {"from": "human", "value": "<image>\\nWhat are the tree branches in front of? Please provide the bounding box
                                    coordinate of the region that can help you answer the question better."},
        {"from": "gpt", "value": "[0.542, 0.686, 0.592, 0.786]"},
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": "window"}]}

The question is the first turn without `<image>` and the bounding-box request (as the original's inference script
cleans it), the reference answer the last turn, the ground-truth box (pixels) the part of `image[1]` after `###`.
Image paths are relative to `--image_folder` (the original: `data`, images under `data/cot/...`; default: the
JSON file's folder).

Output, in `--output_dir`:

- `<name>.jsonl`: one line per answered record: `index`, `question_id`, `dataset`, `image`, `question`, `gt` (the
  reference), `answer`, `thought`, `grounded_text`, `box`, `gt_bbox`, `used_two_images`, `version`, `recipe`
  (the fields of the original's result files, which its GPT scripts read: `question`, `gt`, `answer`);
- `<name>.scores_<judge>.jsonl`: the same lines with `score` (0..1) and `judge`;
- `viscot_scores_<judge>.json`: the mean score per benchmark file and over the files.

An existing output file is never replaced unasked: the run stops with an error unless `--resume` (keep the lines
there, answer/score only the missing records) or `--overwrite` (replace that file) is given. Lines are written as
they are produced, so an interrupted run resumes where it stopped. The model runs in one process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import torch

from .quantization import QUANTIZATION_FLAG_HELP, RECORDED, parse_quantization_flag
from .visual_cot import VERSIONS, VisualCoTRecipe, resolve_recipe, visual_cot

logger = logging.getLogger(__name__)

BBOX_REQUEST = "Please provide the bounding box coordinate of the region that can help you answer the question better."
"""The part of a VisCoT question that asks for a box; removed from the question (as the original does)."""

# ---- the original's judge (scripts/visual_cot/gpt_eval_cot_score.py and gpt_eval_cot_score_single.py) ----------
JUDGE_SYSTEM_PROMPT = """
You are responsible for proofreading the answers, you need to give a score to the model's answer by referring to the standard answer, based on the given question. The full score is 1 point and the minimum score is 0 points. Please output the score in the form "score: <score>". The evaluation criteria require that the closer the model's answer is to the standard answer, the higher the score.
"""
"""The judge's system message (the original's `BASE_PROMPT`, newlines included)."""

JUDGE_USER_PROMPT = """
question: %s
standard answer: %s
model's answer: %s
"""
"""The judge's user message, `%` formatted with (question, reference answer, model's answer) (the original's `PROMPT`)."""

GPT_JUDGE_MODEL = "gpt-3.5-turbo-1106"
GPT_JUDGE_URL = "https://api.openai.com/v1/chat/completions"
SUMMARY_NAME = "viscot_scores_{judge}.json"


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------
@dataclass
class VisCoTRecord:
    """
    One VisCoT benchmark question.

    Args:
        index (`int`): position in its benchmark file (the key of resumed runs).
        question_id (`Any`): the record's `question_id`.
        dataset (`str`): the record's `dataset` (e.g. `"gqa"`).
        image (`str`): the image path as written in the record (relative to the image folder).
        question (`str`): the question, without `<image>` and the bounding-box request.
        reference (`str`): the reference answer (the last turn).
        gt_bbox (`list[int]`, *optional*): the ground-truth box `[x0, y0, x1, y1]` in pixels.
    """

    index: int
    question_id: Any
    dataset: str
    image: str
    question: str
    reference: str
    gt_bbox: list[int] | None = None


def parse_viscot_record(raw: dict[str, Any], index: int, source: str = "<records>") -> VisCoTRecord:
    """A [`VisCoTRecord`] from one raw record of a VisCoT benchmark file (see the module docstring for the format)."""
    where = f"{source}: record {index}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is a {type(raw).__name__}, not an object; a VisCoT file is a JSON list of records")
    images, turns = raw.get("image"), raw.get("conversations")
    if isinstance(images, str):
        images = [images]
    if not images or not isinstance(images, list) or not isinstance(images[0], str):
        raise ValueError(f"{where} needs 'image': [path, 'path###[x0, y0, x1, y1]'], got {images!r}")
    if not turns or not isinstance(turns, list) or not all(isinstance(t, dict) and "value" in t for t in turns):
        raise ValueError(f"{where} needs 'conversations': a list of {{'from', 'value'}} turns, got {turns!r}")
    question = turns[0]["value"].replace(BBOX_REQUEST, "").replace("<image>", "").strip()
    if not question:
        raise ValueError(f"{where} has an empty question: {turns[0]['value']!r}")
    gt_bbox = None
    if len(images) > 1 and "###" in images[1]:
        numbers = images[1].split("###")[-1].replace("[", "").replace("]", "")
        try:
            gt_bbox = [int(v) for v in numbers.split(",")]
        except ValueError:
            raise ValueError(f"{where}: cannot read the box in {images[1]!r}; expected 'path###[x0, y0, x1, y1]'") from None
    return VisCoTRecord(
        index=index,
        question_id=raw.get("question_id", index),
        dataset=str(raw.get("dataset", "")),
        image=images[0],
        question=question,
        reference=str(turns[-1]["value"]),
        gt_bbox=gt_bbox,
    )


def load_viscot_benchmark(path: str | os.PathLike) -> list[VisCoTRecord]:
    """All records of one VisCoT benchmark file (a JSON list)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a VisCoT benchmark file is a JSON list of records, got a {type(data).__name__}")
    return [parse_viscot_record(raw, i, str(path)) for i, raw in enumerate(data)]


def benchmark_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The JSON files named by `paths` (files as given, folders expanded to their `*.json`, sorted)."""
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                raise FileNotFoundError(f"no *.json benchmark file in the folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"benchmark {path} is neither a file nor a folder")
    stems = [f.stem for f in files]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(f"benchmark files with the same name {duplicates} would write the same outputs; rename one")
    return files


# ---------------------------------------------------------------------------------------------
# output files: never replaced unasked, resumable
# ---------------------------------------------------------------------------------------------
def refuse_existing(path: Path, overwrite: bool, resume: bool) -> bool:
    """Whether `path` exists; `FileExistsError` naming the fix when it does and neither `overwrite` nor `resume` is set."""
    if overwrite and resume:
        raise ValueError("pass either overwrite or resume, not both")
    if not path.exists():
        return False
    if not (overwrite or resume):
        raise FileExistsError(
            f"{path} exists; pass --resume to keep its lines and add the missing ones, --overwrite to replace it, "
            "or choose another --output_dir"
        )
    return True


def prepare_output(path: Path, overwrite: bool, resume: bool) -> dict[int, dict[str, Any]]:
    """
    Make `path` ready to receive JSONL lines; return the lines kept from an earlier run, by `index`.

    A missing file: nothing kept. An existing file: `FileExistsError` unless `resume` (its lines are kept; a last
    line cut by an interrupted write is dropped) or `overwrite` (the file, and only it, is removed).
    """
    if not refuse_existing(path, overwrite, resume):
        return {}
    if overwrite:
        path.unlink()
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    kept: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:  # the write of the last line was interrupted: that record is redone
                logger.warning("%s: dropping its unfinished last line", path)
                path.write_text("".join(json.dumps(r) + "\n" for r in kept.values()), encoding="utf-8")
                break
            raise ValueError(f"{path}: line {number + 1} is not JSON; fix or remove the file (or pass --overwrite)") from None
        kept[int(row["index"])] = row
    return kept


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _check_same_settings(path: Path, kept: dict[int, dict[str, Any]], settings: dict[str, Any]) -> None:
    """A resumed file must have been written with the same settings, or its lines would mix two runs."""
    for row in kept.values():
        differing = {k: row.get(k) for k, v in settings.items() if row.get(k) != v}
        if differing:
            raise ValueError(
                f"{path} was written with {differing}, this run has {settings}; pass the same settings, "
                "another --output_dir, or --overwrite"
            )


# ---------------------------------------------------------------------------------------------
# answering
# ---------------------------------------------------------------------------------------------
def _load_image(root: Path, relative: str):
    from PIL import Image

    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found; set --image_folder to the folder the records' paths start from")
    with Image.open(path) as image:
        image.load()
        return image.copy()


def answer_benchmark(
    model: Any,
    processor: Any,
    records: Sequence[VisCoTRecord],
    output_path: str | os.PathLike,
    image_folder: str | os.PathLike,
    *,
    version: str = "v1",
    recipe: str | VisualCoTRecipe = "original",
    use_refiner: bool | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    description: str | None = None,
) -> list[dict[str, Any]]:
    """
    Answer `records` with [`visual_cot`], one JSONL line per record in `output_path`, written as it is produced.

    Args:
        model, processor: an `FLMMForGrounding` and its `FLMMProcessor`.
        records: the questions (e.g. from [`load_viscot_benchmark`]).
        output_path: the JSONL file (see the module docstring for its fields).
        image_folder: the folder the records' image paths are relative to.
        version, recipe, use_refiner: passed to `visual_cot`.
        overwrite, resume: what to do with an existing `output_path` (see [`prepare_output`]).
        progress, description: the tqdm progress bar.

    Returns:
        The lines of the file, in record order (the kept ones of a resumed run included).
    """
    from tqdm.auto import tqdm

    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    recipe = resolve_recipe(recipe)
    path = Path(output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {"version": version, "recipe": recipe.name}
    kept = prepare_output(path, overwrite, resume)
    _check_same_settings(path, kept, settings)
    todo = [r for r in records if r.index not in kept]
    if kept:
        logger.info("%s: %d record(s) already answered, %d to go", path, len(kept), len(todo))
    root = Path(image_folder)
    rows = dict(kept)
    for record in tqdm(todo, desc=description or path.stem, disable=not progress, unit="question"):
        image = _load_image(root, record.image)
        result = visual_cot(model, image, record.question, version, processor, recipe=recipe, use_refiner=use_refiner)
        row = {
            "index": record.index,
            "question_id": record.question_id,
            "dataset": record.dataset,
            "image": record.image,
            "question": record.question,
            "gt": record.reference,
            "answer": result.answer,
            "thought": result.thought,
            "grounded_text": result.grounded_text,
            "box": list(result.box) if result.box is not None else [0, 0, image.width, image.height],
            "gt_bbox": record.gt_bbox,
            "used_two_images": result.used_two_images,
            **settings,
        }
        _append(path, row)
        rows[record.index] = row
    return [rows[i] for i in sorted(rows)]


# ---------------------------------------------------------------------------------------------
# judges
# ---------------------------------------------------------------------------------------------
@runtime_checkable
class Judge(Protocol):
    """Anything that scores an answer against the reference: `score(question, reference, answer) -> float` in [0, 1]."""

    def score(self, question: str, reference: str, answer: str) -> float:
        ...


class JudgeUnavailableError(RuntimeError):
    """The judge cannot be reached or used (no API key, no network, a refused key)."""


def judge_messages(question: str, reference: str, answer: str) -> list[dict[str, str]]:
    """The chat the judge is asked: the original's system prompt, then question / standard answer / model's answer."""
    return [
        {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
        {"role": "user", "content": JUDGE_USER_PROMPT % (question, reference, answer)},
    ]


def parse_judge_score(reply: str) -> float:
    """
    The score in a judge's reply, as the original reads it: lower-cased; 0.0 unless it holds exactly one
    `score: <number>`; clipped to [0, 1]. (A number that is not one, such as `score: .`, gives 0.0 here; the
    original would stop with an error.)
    """
    reply = reply.lower()
    if "score" not in reply:
        return 0.0
    found = re.findall(r"score: ([\d\.]+)", reply)
    if len(found) != 1:
        return 0.0
    try:
        value = float(found[0])
    except ValueError:
        return 0.0
    return min(max(value, 0.0), 1.0)


class GPTJudge:
    """
    The original's judge: an OpenAI chat-completions model (`gpt-3.5-turbo-1106`) asked `judge_messages` at
    temperature 0.2 with at most 100 tokens, the score read by [`parse_judge_score`].

    Needs network access and an API key. Unlike the original, which scores 0 when every retry failed, a request
    that keeps failing raises [`JudgeUnavailableError`] (a silent 0 would lower the benchmark's score); the scores
    written so far stay, and `--resume` continues.

    Args:
        model (`str`): the chat model.
        api_key (`str`, *optional*): default: the `OPENAI_API_KEY` environment variable.
        api_url (`str`, *optional*): default: `OPENAI_API_URL`, else OpenAI's chat-completions URL.
        temperature, max_tokens: of the request (the original's 0.2 and 100).
        retries, retry_wait_s: attempts per request and the wait between them (the original's 5 and 5 s).
        sleep_s: wait after each answered request, against rate limits (the original's 1 s).
        timeout_s: of one request (the original's 60 s).
    """

    def __init__(
        self,
        model: str = GPT_JUDGE_MODEL,
        api_key: str | None = None,
        api_url: str | None = None,
        *,
        temperature: float = 0.2,
        max_tokens: int = 100,
        retries: int = 5,
        retry_wait_s: float = 5.0,
        sleep_s: float = 1.0,
        timeout_s: float = 60.0,
    ):
        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise JudgeUnavailableError(
                "the GPT judge needs an OpenAI API key: set OPENAI_API_KEY (and OPENAI_API_URL for another endpoint), "
                "or score offline with --judge local --judge_model <a chat model>"
            )
        if retries < 1:
            raise ValueError(f"retries must be >= 1, got {retries}")
        self.model = model
        self.name = f"gpt:{model}"
        self.api_url = api_url or os.environ.get("OPENAI_API_URL", GPT_JUDGE_URL)
        self._api_key = api_key
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.retries = retries
        self.retry_wait_s = retry_wait_s
        self.sleep_s = sleep_s
        self.timeout_s = timeout_s

    def _post(self, messages: list[dict[str, str]]) -> str:
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": self.max_tokens}
        request = urllib.request.Request(
            self.api_url,
            data=json.dumps(payload).encode("utf-8"),
            headers={"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json"},
            method="POST",
        )
        last_error: Exception | None = None
        for attempt in range(self.retries):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    body = json.loads(response.read().decode("utf-8"))
                content = body["choices"][0]["message"]["content"]
                time.sleep(self.sleep_s)
                return content or ""
            except urllib.error.HTTPError as error:
                if error.code in (401, 403):  # retrying a refused key cannot help
                    raise JudgeUnavailableError(
                        f"the GPT judge's API key was refused by {self.api_url} (HTTP {error.code}); check OPENAI_API_KEY"
                    ) from error
                last_error = error
            except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, IndexError) as error:
                last_error = error
            logger.warning("GPT judge: attempt %d of %d failed: %s", attempt + 1, self.retries, last_error)
            if attempt + 1 < self.retries:
                time.sleep(self.retry_wait_s)
        raise JudgeUnavailableError(
            f"the GPT judge could not reach {self.api_url} ({self.retries} attempts; last error: {last_error}); "
            "check the network, OPENAI_API_URL and OPENAI_API_KEY, then rerun with --resume"
        )

    def check(self) -> None:
        """One trial request (the original starts with one too), so that a run fails before its first record."""
        self._post([{"role": "user", "content": "Who are you?"}])

    def reply(self, question: str, reference: str, answer: str) -> str:
        """The model's raw reply to the scoring prompt."""
        return self._post(judge_messages(question, reference, answer))

    def score(self, question: str, reference: str, answer: str) -> float:
        """The score of `answer` (0..1)."""
        return parse_judge_score(self.reply(question, reference, answer))


class LocalLMMJudge:
    """
    A local transformers model asked the original judge's prompt (`judge_messages`); the score is read by
    [`parse_judge_score`]. Decoding is greedy (reproducible), where the GPT judge samples at temperature 0.2.

    Args:
        model: a folder or Hub id, or a loaded model. A causal LM is loaded with `AutoModelForCausalLM`; a
            checkpoint it refuses (a vision-language model) with `AutoModelForImageTextToText`.
        tokenizer: its tokenizer or processor (loaded from `model` when it is a path).
        max_new_tokens: of the reply (the original's `max_tokens=100`).
        device, dtype: where and in which dtype a loaded model goes (`dtype` as in `from_pretrained`).

    The chat template of the tokenizer/processor frames the messages (with string contents, or text items for a
    multimodal template); without a template that shows them, the model gets the system text, a blank line and the
    user text.
    """

    def __init__(
        self, model: Any, tokenizer: Any | None = None, *, max_new_tokens: int = 100, device: str | None = None,
        dtype: Any = "auto",
    ):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        if isinstance(model, (str, os.PathLike)):
            name = str(model)
            try:
                model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
                tokenizer = tokenizer or AutoTokenizer.from_pretrained(name)
            except ValueError:  # not a causal LM config: a vision-language model
                model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype)
                tokenizer = tokenizer or AutoProcessor.from_pretrained(name)
            model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        elif tokenizer is None:
            raise ValueError("a loaded judge model needs its tokenizer (or processor): pass tokenizer=...")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.name = f"local:{getattr(model.config, '_name_or_path', '') or type(model).__name__}"

    def _encode(self, messages: list[dict[str, str]]) -> dict[str, torch.Tensor]:
        owner = self.tokenizer
        encoded = None
        if getattr(owner, "chat_template", None):
            # Text templates take string contents, multimodal ones lists of items (and render strings as nothing):
            # the first form whose rendering shows the scoring prompt is used.
            as_items = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
            for form in (messages, as_items):
                rendered = owner.apply_chat_template(form, add_generation_prompt=True, tokenize=False)
                if messages[-1]["content"].strip() in rendered:
                    encoded = owner.apply_chat_template(
                        form, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
                    )
                    break
        if encoded is None:
            text_tokenizer = getattr(owner, "tokenizer", owner)
            encoded = text_tokenizer(messages[0]["content"] + "\n\n" + messages[1]["content"], return_tensors="pt")
        return {k: v.to(self.model.device) for k, v in encoded.items() if torch.is_tensor(v)}

    @torch.no_grad()
    def reply(self, question: str, reference: str, answer: str) -> str:
        """The model's raw reply to the scoring prompt."""
        encoded = self._encode(judge_messages(question, reference, answer))
        text_tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        pad = text_tokenizer.pad_token_id if text_tokenizer.pad_token_id is not None else text_tokenizer.eos_token_id
        output = self.model.generate(**encoded, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
        new_tokens = output[0, encoded["input_ids"].shape[1] :]
        return text_tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    def score(self, question: str, reference: str, answer: str) -> float:
        """The score of `answer` (0..1)."""
        return parse_judge_score(self.reply(question, reference, answer))


def judge_name(judge: Any) -> str:
    """A judge's `name`, else its class name."""
    return str(getattr(judge, "name", type(judge).__name__))


def score_answers(
    judge: Judge,
    answers: Iterable[dict[str, Any]],
    output_path: str | os.PathLike,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    description: str | None = None,
) -> list[dict[str, Any]]:
    """
    Score answer lines (the output of [`answer_benchmark`]) with `judge`, one JSONL line per answer in
    `output_path` (the answer line plus `score` and `judge`), written as it is produced.

    Returns:
        The scored lines, in record order (the kept ones of a resumed run included).
    """
    from tqdm.auto import tqdm

    if not isinstance(judge, Judge):
        raise TypeError(f"judge must have score(question, reference, answer) -> float, got {type(judge).__name__}")
    path = Path(output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = judge_name(judge)
    kept = prepare_output(path, overwrite, resume)
    _check_same_settings(path, kept, {"judge": name})
    answers = list(answers)
    todo = [row for row in answers if int(row["index"]) not in kept]
    rows = dict(kept)
    for row in tqdm(todo, desc=description or path.stem, disable=not progress, unit="answer"):
        value = float(judge.score(row["question"], row["gt"], row["answer"]))
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"judge {name} gave the score {value} for record {row['index']}; scores must lie in [0, 1]")
        scored = dict(row, score=value, judge=name)
        _append(path, scored)
        rows[int(row["index"])] = scored
    return [rows[i] for i in sorted(rows)]


# ---------------------------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------------------------
@dataclass
class VisCoTBenchmarkArguments:
    """What to answer and score (`python -m flmm_hf.viscot_benchmark` parses these with `HfArgumentParser`)."""

    benchmark: list[str] = field(
        metadata={"help": "VisCoT benchmark JSON files, or folders of them (the original's scripts/visual_cot/benchmark)."}
    )
    output_dir: str = field(default="viscot_output", metadata={"help": "Where the answer and score files go."})
    image_folder: str | None = field(
        default=None,
        metadata={"help": "Folder the records' image paths start from (the original: data). Default: the JSON file's folder."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Folder or Hub id of a saved FLMMForGrounding: answer the questions with it."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Revision of the model on the Hub."})
    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "Folder or Hub id of the FLMMProcessor (default: the model's)."}
    )
    lmm_dtype: str = field(
        default="bfloat16",
        metadata={"help": "dtype of the frozen LMM (the original ran it in bf16), as evaluate.py's --lmm_dtype.",
                  "choices": ["bfloat16", "float16", "float32", "auto"]},
    )
    quantization_config: str = field(default=RECORDED, metadata={"help": QUANTIZATION_FLAG_HELP})
    device: str | None = field(default=None, metadata={"help": "Device of the model (default: cuda if available, else cpu)."})
    seed: int = field(default=0, metadata={"help": "Seed set before loading."})
    version: str = field(default="v1", metadata={"help": "VisCoT version: v1, v2 or baseline."})
    recipe: str = field(default="original", metadata={"help": "VisCoT recipe: original (default) or object_name."})
    use_refiner: bool | None = field(
        default=None, metadata={"help": "Box from the SAM-refined mask (default: the recipe's; the original: coarse)."}
    )
    max_samples: int | None = field(default=None, metadata={"help": "Answer at most N records per benchmark file."})
    every: int = field(default=1, metadata={"help": "Answer every N-th record only (the original's --debug: 50)."})
    judge: str | None = field(
        default=None, metadata={"help": "Score the answers: 'gpt' (the original's, needs OPENAI_API_KEY) or 'local'."}
    )
    judge_model: str | None = field(
        default=None,
        metadata={"help": f"gpt: the OpenAI model (default {GPT_JUDGE_MODEL}); local: folder or Hub id of a chat model."},
    )
    judge_api_url: str | None = field(
        default=None, metadata={"help": "gpt: the chat-completions URL (default: OPENAI_API_URL, else OpenAI's)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace existing output files."})
    resume: bool = field(default=False, metadata={"help": "Keep existing output files and add the missing records."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {self.version!r}")
        resolve_recipe(self.recipe)
        parse_quantization_flag(self.quantization_config)
        if self.judge not in (None, "gpt", "local"):
            raise ValueError(f"judge must be 'gpt' or 'local', got {self.judge!r}")
        if self.judge == "local" and not self.judge_model:
            raise ValueError("--judge local needs --judge_model (a folder or Hub id of a chat model)")
        if self.every < 1 or (self.max_samples is not None and self.max_samples < 1):
            raise ValueError(f"every and max_samples must be >= 1, got {self.every} and {self.max_samples}")
        if self.overwrite and self.resume:
            raise ValueError("pass either --overwrite or --resume, not both")


def build_judge(args: VisCoTBenchmarkArguments) -> Judge:
    """The judge `args.judge` names."""
    if args.judge == "gpt":
        return GPTJudge(model=args.judge_model or GPT_JUDGE_MODEL, api_url=args.judge_api_url)
    if args.judge == "local":
        return LocalLMMJudge(args.judge_model, device=args.device)
    raise ValueError(f"no judge named {args.judge!r}; choose 'gpt' or 'local'")


def _select(records: list[VisCoTRecord], every: int, max_samples: int | None) -> list[VisCoTRecord]:
    chosen = records[::every]
    return chosen[:max_samples] if max_samples is not None else chosen


def run_viscot_benchmark(
    args: VisCoTBenchmarkArguments, model: Any = None, processor: Any = None, judge: Judge | None = None
) -> dict[str, Any]:
    """
    Answer (with a model) and/or score (with a judge) every benchmark file of `args`.

    Args:
        args: what to do.
        model / processor: an in-memory `FLMMForGrounding` and `FLMMProcessor`; loaded from
            `args.model_name_or_path` when not given. Without either, the answers must already be in `output_dir`.
        judge: any [`Judge`]; built from `args.judge` when not given. Without either, nothing is scored.

    Returns:
        `{"answers": {name: path}, "scores": {name: path}, "summary": {...} or None}`; the summary (also written to
        `viscot_scores_<judge>.json`) holds the judge, the mean score and count per file, and their mean.
    """
    files = benchmark_files(args.benchmark)
    out_dir = Path(args.output_dir)
    answering = model is not None or args.model_name_or_path is not None
    if judge is None and args.judge is not None:
        judge = build_judge(args)
    if not answering and judge is None:
        raise ValueError("nothing to do: give --model_name_or_path to answer the questions and/or --judge to score them")
    tag = None
    if judge is not None:
        tag = args.judge or re.sub(r"[^A-Za-z0-9_.-]+", "_", judge_name(judge))
    # Every file this run would write is checked first: a refusal must come before hours of work, not after.
    planned = [out_dir / f"{file.stem}.jsonl" for file in files] if answering else []
    if tag is not None:
        planned += [out_dir / f"{file.stem}.scores_{tag}.jsonl" for file in files]
        planned.append(out_dir / SUMMARY_NAME.format(judge=tag))
    for path in planned:
        refuse_existing(path, args.overwrite, args.resume)
    if answering:
        if model is None:
            from .evaluation import load_model_and_processor

            model, loaded = load_model_and_processor(args)  # reads the model_*/processor_*/lmm_dtype/seed fields
            processor = processor if processor is not None else loaded
            model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        elif processor is None:
            raise ValueError("pass the processor together with an in-memory model")
        elif args.device is not None:
            model.to(args.device)
        model.eval()
    if judge is not None and hasattr(judge, "check"):
        judge.check()  # fail before the first record, not after an hour of answers

    outcome: dict[str, Any] = {"answers": {}, "scores": {}, "summary": None}
    answers_by_file: dict[str, list[dict[str, Any]]] = {}
    for file in files:
        answers_path = out_dir / f"{file.stem}.jsonl"
        if answering:
            records = _select(load_viscot_benchmark(file), args.every, args.max_samples)
            image_folder = Path(args.image_folder) if args.image_folder is not None else file.parent
            answers_by_file[file.stem] = answer_benchmark(
                model, processor, records, answers_path, image_folder,
                version=args.version, recipe=args.recipe, use_refiner=args.use_refiner,
                overwrite=args.overwrite, resume=args.resume, progress=args.progress, description=f"answer {file.stem}",
            )
        elif not answers_path.is_file():
            raise FileNotFoundError(f"no answers at {answers_path}: answer first with --model_name_or_path")
        else:
            lines = answers_path.read_text(encoding="utf-8").splitlines()
            answers_by_file[file.stem] = [json.loads(line) for line in lines if line.strip()]
        outcome["answers"][file.stem] = str(answers_path)

    if judge is None:
        return outcome
    summary_path = out_dir / SUMMARY_NAME.format(judge=tag)  # checked above; rewritten from the scores
    per_file: dict[str, dict[str, Any]] = {}
    for stem, answers in answers_by_file.items():
        scores_path = out_dir / f"{stem}.scores_{tag}.jsonl"
        scored = score_answers(
            judge, answers, scores_path, overwrite=args.overwrite, resume=args.resume, progress=args.progress,
            description=f"score {stem}",
        )
        values = [row["score"] for row in scored]
        per_file[stem] = {"mean_score": sum(values) / len(values) if values else None, "num_scored": len(values)}
        outcome["scores"][stem] = str(scores_path)
        logger.info("%s: mean score %s over %d answers", stem, per_file[stem]["mean_score"], len(values))
    means = [v["mean_score"] for v in per_file.values() if v["mean_score"] is not None]
    summary = {
        "judge": judge_name(judge),
        "benchmarks": per_file,
        "mean_score": sum(means) / len(means) if means else None,
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    outcome["summary"] = summary
    return outcome


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (`python -m flmm_hf.viscot_benchmark --help`)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(VisCoTBenchmarkArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    outcome = run_viscot_benchmark(args)
    if outcome["summary"] is not None:
        summary = outcome["summary"]
        for stem, values in summary["benchmarks"].items():
            print(f"{stem}\t{values['mean_score']:.4f}\t({values['num_scored']} answers)")
        if summary["mean_score"] is not None:
            print(f"mean\t{summary['mean_score']:.4f}\t(judge {summary['judge']})")
    return outcome


if __name__ == "__main__":
    main()

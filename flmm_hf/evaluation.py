"""Benchmark evaluation of an F-LMM model (RefCOCO/+/g RES and PNG): the logic behind ``evaluate.py``.

- Referring expression segmentation (RES): RefCOCO val/testA/testB, RefCOCO+ val/testA/testB,
  RefCOCOg (umd) val/test; cIoU and mIoU (gIoU). Three protocols, each reportable:

  * ``"concat"`` (the paper's numbers: the original's ``--concat``): the first sentence of every
    ref, all refs of an image in one sequence (:func:`flmm_hf.data.group_refs_by_image`); one
    example per image.
  * ``"split"`` (the original's evaluation without ``--concat``): the first sentence of every
    ref, one ref per sequence; one example per ref.
  * ``"per_sentence"`` (the common protocol of other papers): every sentence is its own example
    (:func:`flmm_hf.data.explode_sentences`).

- Panoptic narrative grounding (PNG, val2017): per-phrase IoU -> average recall overall, things,
  stuff, singulars, plurals, accuracy at IoU 0.5 and pixel accuracy, plus a recall-curve plot.

Datasets are checked before any model is loaded: an unknown ``--splits`` entry, a given dataset
left with no split to evaluate and a missing dataset folder are refused with the fix in the
message (:func:`load_dataset_source`). A dataset whose card names another dataset than the
benchmark it was passed as (e.g. the synthetic shapes set as ``--refcoco``) is evaluated but
reported under its own name in the table, the JSON (``dataset_labels``) and the model-index
(:func:`dataset_label`); results stay keyed by the flag it was passed with.

Coarse (U-Net) and refined (SAM) masks are both scored. A prediction is
``sigmoid(logits)`` resized bilinearly to the original image size, ``> 0.5``
(:meth:`FLMMProcessor.post_process_masks`).

Distribution (``accelerate launch evaluate.py`` / ``torchrun``): for every benchmark split and
protocol, process ``r`` of ``W`` takes the examples ``r, r + W, r + 2W, ...`` (index striding:
no padding, no duplicates), accumulates per-mask pixel counts
(:class:`flmm_hf.metrics.MaskIoUAccumulator`) and the processes gather their counts once
(``accelerate.utils.gather_object``). The gathered per-example counts are put back in dataset
order before the metrics are computed, so any number of processes gives exactly the numbers of
one process; a check fails loudly if an example is missing or counted twice. The same loop and
gather (:func:`evaluate_dataset`) serve ``FLMMTrainer.evaluate`` during and after training.

Python API::

    from flmm_hf.evaluation import EvaluationArguments, run_evaluation
    results = run_evaluation(EvaluationArguments(model_name_or_path="org/flmm-llava-1.5-7b",
                                                 refcoco="org/refcoco", png="org/png"))
    # or with a model already in memory:
    results = run_evaluation(args, model=model, processor=processor)

Library-only: nothing here is needed by the Hub custom code. This module must not import the
``evaluate`` library (see ``evaluate.py`` for why the name is delicate).
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .metrics import MaskIoUAccumulator, recall_curve
from .quantization import QUANTIZATION_FLAG_HELP, RECORDED, model_quantization, parse_quantization_flag

logger = logging.getLogger(__name__)

#: Benchmark key -> (pretty name, task, default splits). Keys are the names used in the results.
BENCHMARKS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "refcoco": ("RefCOCO", "res", ("val", "testA", "testB")),
    "refcoco+": ("RefCOCO+", "res", ("val", "testA", "testB")),
    "refcocog": ("RefCOCOg", "res", ("val", "test")),
    "png": ("PNG", "png", ("val",)),
}
#: Benchmark key -> the evaluate.py flag that names its dataset.
DATASET_FLAGS = {"refcoco": "--refcoco", "refcoco+": "--refcoco_plus", "refcocog": "--refcocog", "png": "--png"}
#: Benchmark key -> the dataset name the builders write as the card's ``pretty_name`` (before any " (...)").
CARD_NAMES = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg", "png": "Panoptic Narrative Grounding"}
#: Benchmark key -> the builder command that makes its dataset folder (``{out}``: the folder).
BUILD_COMMANDS = {
    "refcoco": "python dataset_scripts/build_refcoco.py --dataset refcoco --instances refcoco/instances.json "
    "--refs 'refcoco/refs(unc).p' --image-dir coco/train2014 --output-dir {out}",
    "refcoco+": "python dataset_scripts/build_refcoco.py --dataset refcoco+ --instances refcoco+/instances.json "
    "--refs 'refcoco+/refs(unc).p' --image-dir coco/train2014 --output-dir {out}",
    "refcocog": "python dataset_scripts/build_refcoco.py --dataset refcocog --instances refcocog/instances.json "
    "--refs 'refcocog/refs(umd).p' --image-dir coco/train2014 --output-dir {out}",
    "png": "python dataset_scripts/build_png.py --png-json png_coco_val2017.json --panoptic-json "
    "panoptic_val2017.json --panoptic-dir panoptic_val2017 --image-dir coco/val2017 --output-dir {out} --split val",
}
#: RES protocols: the paper's (first sentence per ref, refs of an image together), the original's
#: other one (first sentence, one ref per sequence) and the common one (every sentence alone).
PROTOCOLS = ("concat", "split", "per_sentence")
#: The protocols evaluated unless others are asked for.
DEFAULT_PROTOCOLS = ("concat", "per_sentence")
#: Mask variants: the U-Net's masks and the SAM refiner's masks.
VARIANTS = ("refined", "coarse")
RESULTS_FILE = "eval_results.json"
#: `EvaluationArguments.lmm_dtype` -> the `dtype` given to the LMM's `from_pretrained`.
LMM_DTYPES: dict[str, torch.dtype | str] = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto",
}
#: Size (width, height) of the recall-curve plot.
RECALL_PLOT_SIZE = (640, 480)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
@dataclass
class EvaluationArguments:
    """What to evaluate and how (``evaluate.py`` parses these with ``HfArgumentParser``)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Folder or Hub id of a saved FLMMForGrounding (its processor is loaded from it too)."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Revision of the model on the Hub."})
    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "Folder or Hub id of the FLMMProcessor (default: the model's)."}
    )
    refcoco: str | None = field(default=None, metadata={"help": "RefCOCO dataset folder or Hub id (build_refcoco.py)."})
    refcoco_plus: str | None = field(default=None, metadata={"help": "RefCOCO+ dataset folder or Hub id."})
    refcocog: str | None = field(default=None, metadata={"help": "RefCOCOg (umd) dataset folder or Hub id."})
    png: str | None = field(default=None, metadata={"help": "PNG dataset folder or Hub id (build_png.py)."})
    splits: list[str] | None = field(
        default=None,
        metadata={"help": "Only these splits (default: RefCOCO/+ val testA testB, RefCOCOg val test, PNG val)."},
    )
    protocols: list[str] = field(
        default_factory=lambda: list(DEFAULT_PROTOCOLS),
        metadata={"help": "RES protocols: 'concat' (the paper's), 'split' (first sentence, one ref per sequence) "
                  "and/or 'per_sentence' (every sentence alone)."},
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Evaluate at most N examples per split and protocol (images for concat)."}
    )
    batch_size: int = field(default=1, metadata={"help": "Examples per forward pass, per process."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader workers (decoding, preprocessing)."})
    sentence_field: str = field(
        default="raw_sentences",
        metadata={"help": "'raw_sentences' (lower-cased annotator text, as the original) or 'sentences'."},
    )
    threshold: float = field(default=0.5, metadata={"help": "Probability threshold of the masks."})
    lmm_dtype: str = field(
        default="bfloat16",
        metadata={
            "help": "dtype the frozen LMM is loaded in: 'bfloat16' (the paper's, default), 'float16', 'float32', or "
            "'auto' (the checkpoint's own). The head stays float32 and SAM float32. Ignored for a model passed in "
            "memory.",
            "choices": list(LMM_DTYPES),
        },
    )
    quantization_config: str = field(default=RECORDED, metadata={"help": QUANTIZATION_FLAG_HELP})
    output_dir: str = field(default="eval_output", metadata={"help": "Where the JSON results and plots are written."})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder."})
    seed: int = field(
        default=0, metadata={"help": "Seed set before loading (only matters for randomly initialised parts)."}
    )
    update_model_card: bool = field(
        default=False, metadata={"help": "Write the results into the model folder's README.md model-index."}
    )

    def __post_init__(self) -> None:
        unknown = set(self.protocols) - set(PROTOCOLS)
        if unknown:
            raise ValueError(f"unknown protocols {sorted(unknown)}; choose from {PROTOCOLS}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.lmm_dtype not in LMM_DTYPES:
            raise ValueError(f"lmm_dtype must be one of {sorted(LMM_DTYPES)}, got {self.lmm_dtype!r}")
        if self.sentence_field not in ("raw_sentences", "sentences"):
            raise ValueError(f"sentence_field must be 'raw_sentences' or 'sentences', got {self.sentence_field!r}")
        if not self.protocols:
            raise ValueError(f"protocols is empty: RES would evaluate nothing; choose from {PROTOCOLS}")
        parse_quantization_flag(self.quantization_config)  # refuse a malformed one before anything is loaded
        if self.datasets():
            self.selected_splits()  # refuse a bad --splits at parse time, before any model is loaded

    def datasets(self) -> dict[str, str]:
        """Benchmark key -> dataset folder / Hub id, for the benchmarks given."""
        given = {"refcoco": self.refcoco, "refcoco+": self.refcoco_plus, "refcocog": self.refcocog, "png": self.png}
        return {key: value for key, value in given.items() if value}

    def selected_splits(self) -> dict[str, list[str]]:
        """Benchmark key -> the splits to evaluate, for every benchmark given.

        Raises:
            ValueError: when no dataset is given, when ``splits`` names a split that none of the
                given benchmarks has (the valid ones are listed per benchmark), or when ``splits``
                leaves a given benchmark with nothing to evaluate.
        """
        sources = self.datasets()
        if not sources:
            raise ValueError("no dataset given: pass --refcoco, --refcoco_plus, --refcocog and/or --png")
        if self.splits is None:
            return {benchmark: list(BENCHMARKS[benchmark][2]) for benchmark in sources}
        valid = {benchmark: BENCHMARKS[benchmark][2] for benchmark in sources}
        listing = "; ".join(f"{BENCHMARKS[b][0]} ({DATASET_FLAGS[b]}): {', '.join(s)}" for b, s in valid.items())
        if not self.splits:
            raise ValueError(f"splits is empty: nothing would be evaluated; valid splits are {listing}")
        known = {split for splits in valid.values() for split in splits}
        unknown = [split for split in self.splits if split not in known]
        if unknown:
            hints = [f"{split!r} -> did you mean {_closest(split, known)!r}?" for split in unknown if _closest(split, known)]
            raise ValueError(
                f"unknown split(s) {unknown} for the datasets given; valid splits are {listing}"
                + (f" ({'; '.join(hints)})" if hints else "")
            )
        selected = {benchmark: [s for s in splits if s in self.splits] for benchmark, splits in valid.items()}
        empty = [benchmark for benchmark, splits in selected.items() if not splits]
        if empty:
            # a dataset that was passed but would be silently skipped is a mistake either way
            raise ValueError(
                f"--splits {' '.join(self.splits)} selects no split of "
                + ", ".join(f"{BENCHMARKS[b][0]} (has {', '.join(valid[b])})" for b in empty)
                + ": add one of its splits to --splits or drop "
                + ", ".join(DATASET_FLAGS[b] for b in empty)
            )
        return selected


def build_hint(benchmark: str | None, folder: str) -> str:
    """How to make the dataset folder ``folder``: the builder command of ``benchmark`` (all builders if None)."""
    if benchmark is not None:
        return f"build it with `{BUILD_COMMANDS[benchmark].format(out=folder)}`"
    commands = [BUILD_COMMANDS[key].format(out=folder) for key in ("refcoco", "png")]
    commands.append(f"python dataset_scripts/build_shapes.py --output-dir {folder}")
    return "build it with one of `" + "`, `".join(commands) + "` (RefCOCO/+/g, PNG, the demo's shapes)"


def looks_like_local_path(source: str) -> bool:
    """Whether ``source`` is meant as a local folder rather than a Hub dataset id.

    Hub ids are ``name`` or ``org/name`` with no leading ``.``, ``/`` or ``~``; anything with more
    parts, a backslash, an absolute form, a parent folder that exists here, or characters the Hub
    does not allow is a path.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if source.startswith((".", "~", "/")) or os.path.isabs(source) or "\\" in source:
        return True
    parts = source.split("/")
    if len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir()):
        return True
    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    return False


def load_dataset_source(source: str, benchmark: str | None = None, **kwargs: Any):
    """``datasets.load_dataset(source, **kwargs)`` for a built dataset folder or Hub id, with errors that
    say which it was taken for and how to make a missing folder.

    Args:
        source: a folder written by ``dataset_scripts/build_*.py`` or a Hub dataset id.
        benchmark: key of :data:`BENCHMARKS` the dataset is for (names the builder in errors).
        **kwargs: passed on to ``load_dataset`` (``split``, ``cache_dir``, ...).

    Raises:
        FileNotFoundError: ``source`` is a missing folder, a folder without data files, or neither a
            folder nor a dataset the Hub could give; the message names the builder command.
    """
    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError

    path = Path(source).expanduser()
    where = "" if path.is_absolute() else " (relative to the working directory)"
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{source!r} is a file, not a dataset folder; {build_hint(benchmark, source)}")
        try:
            return load_dataset(str(path), **kwargs)
        except FileNotFoundError as error:  # EmptyDatasetError / DataFilesNotFoundError: no data files
            raise FileNotFoundError(
                f"dataset folder {source!r} holds no data files ({error}); {build_hint(benchmark, source)}"
            ) from error
    if looks_like_local_path(source):
        # checked before load_dataset, which would report "Couldn't reach ... on the Hub" (or,
        # offline, silently reuse a cached dataset of the same name)
        raise FileNotFoundError(
            f"dataset folder {source!r} does not exist{where}; {build_hint(benchmark, source)}, "
            "or pass a Hub dataset id (org/name)"
        )
    try:
        return load_dataset(source, **kwargs)
    except (ConnectionError, FileNotFoundError, DatasetNotFoundError) as error:
        raise FileNotFoundError(
            f"dataset folder {source!r} does not exist{where}, and the Hub could not give a dataset of that "
            f"id either ({error}). "
            f"If it is meant to be a local folder, {build_hint(benchmark, source)}"
        ) from error


def dataset_card_name(source: str) -> str | None:
    """The ``pretty_name`` in the dataset card (``README.md``) of a dataset folder or Hub dataset, or
    None when there is no card, it has no name, or it cannot be read (e.g. offline)."""
    from huggingface_hub import DatasetCard

    readme = Path(source).expanduser() / "README.md"
    try:
        card = DatasetCard.load(readme if readme.is_file() else source, repo_type="dataset")
    except Exception as error:  # no card, no network, a card that does not parse: the name is unknown
        logger.debug("no dataset card for %r: %s", source, error)
        return None
    name = getattr(card.data, "pretty_name", None)
    return str(name).strip() if name else None


def dataset_label(benchmark: str, source: str) -> str:
    """The name results of ``source`` are reported under when it was passed as ``benchmark``.

    The benchmark's name (``RefCOCO``, ...) when the dataset card says the dataset is that benchmark
    (or the dataset has no readable card, with a warning); otherwise the card's own name, so that
    e.g. the synthetic shapes set passed as ``--refcoco`` is never reported as RefCOCO.
    """
    pretty = BENCHMARKS[benchmark][0]
    name = dataset_card_name(source)
    if name is None:
        logger.warning("%s: no dataset card with a pretty_name in %r; its results are labelled %s unchecked",
                       pretty, source, pretty)
        return pretty
    if name.split(" (")[0].strip().lower() == CARD_NAMES[benchmark].lower():
        return pretty
    logger.warning("%r, passed as %s, is %r according to its dataset card: its results are labelled %r, not %s",
                   source, DATASET_FLAGS[benchmark], name, name, pretty)
    return name


def _closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice ``name`` most likely meant (a case slip first, then the nearest spelling), if any."""
    choices = sorted(choices)
    by_case = [c for c in choices if c.lower() == name.lower()]
    close = by_case or difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return close[0] if close else None


# ---------------------------------------------------------------------------------------------
# Tasks: one (benchmark, split, protocol) each
# ---------------------------------------------------------------------------------------------
@dataclass
class EvalTask:
    """One evaluation unit: a benchmark split under one protocol, as a dataset of model examples."""

    benchmark: str  # key of BENCHMARKS
    split: str
    protocol: str | None  # "concat" / "per_sentence" for RES, None for PNG
    dataset: Any  # datasets.Dataset, rows in the layout FLMMTransform reads
    source: str = ""  # dataset folder / Hub id
    label: str = ""  # the name reported (dataset_label: the benchmark's, or the card's for another dataset)

    @property
    def name(self) -> str:
        return "/".join(p for p in (self.benchmark, self.split, self.protocol) if p)

    @property
    def task_type(self) -> str:
        return BENCHMARKS[self.benchmark][1]


def prepare_res_split(dataset, protocol: str, max_samples: int | None = None, cache_dir: str | None = None):
    """Per-ref RefCOCO rows -> the rows evaluated under ``protocol`` (first ``max_samples`` of them)."""
    from .data import explode_sentences, group_refs_by_image

    if protocol == "concat":
        rows = group_refs_by_image(dataset, cache_dir=cache_dir)
    elif protocol == "split":
        rows = dataset  # one ref per row; FLMMTransform(train=False) takes its first sentence
    elif protocol == "per_sentence":
        rows = explode_sentences(dataset)
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    return _head(rows, max_samples)


def prepare_png_split(dataset, max_samples: int | None = None):
    """PNG rows with at least one grounded phrase (first ``max_samples`` of them)."""
    before = len(dataset)
    dataset = dataset.filter(
        lambda segments: any(len(s["segment_ids"]) > 0 for s in segments), input_columns="segments"
    )
    if len(dataset) < before:
        logger.warning("PNG: %d narratives without a grounded phrase are not evaluated", before - len(dataset))
    return _head(dataset, max_samples)


def _head(dataset, max_samples: int | None):
    if max_samples is not None and len(dataset) > max_samples:
        dataset = dataset.select(range(max_samples))
    return dataset


def build_tasks(args: EvaluationArguments, state: Any = None) -> list[EvalTask]:
    """Load every dataset named in ``args`` and prepare its splits under each protocol.

    Dataset preparation (grouping, exploding, filtering) runs on the main process first, so that
    the other processes reuse its ``datasets`` cache instead of racing to write it.
    """
    state = state if state is not None else process_state()
    tasks: list[EvalTask] = []
    selected = args.selected_splits()
    sources = args.datasets()
    for benchmark, source in sources.items():
        pretty, task_type, _ = BENCHMARKS[benchmark]
        splits = selected[benchmark]
        with state.main_process_first():
            available = load_dataset_source(source, benchmark, cache_dir=args.cache_dir)
        label = dataset_label(benchmark, source)
        present = [split for split in splits if split in available]
        if not present:
            raise ValueError(
                f"{pretty} dataset {source!r} has none of the splits to evaluate ({', '.join(splits)}); "
                f"it has {', '.join(sorted(available)) or 'no splits'}. Pass a {pretty} dataset to {DATASET_FLAGS[benchmark]} "
                f"(built with `{BUILD_COMMANDS[benchmark].format(out='<folder>')}`), or choose its splits with --splits"
            )
        for split in splits:
            if split not in available:
                logger.warning("%s (%s) has no split %r; skipped (has: %s)", pretty, source, split, sorted(available))
                continue
            with state.main_process_first():
                if task_type == "png":
                    rows = prepare_png_split(available[split], args.max_samples)
                    tasks.append(EvalTask(benchmark, split, None, rows, source, label))
                    continue
                for protocol in args.protocols:
                    rows = prepare_res_split(available[split], protocol, args.max_samples, args.cache_dir)
                    tasks.append(EvalTask(benchmark, split, protocol, rows, source, label))
    if not any(len(task.dataset) for task in tasks):
        raise ValueError(
            "nothing to evaluate: every selected split is empty ("
            + ", ".join(f"{task.name}: 0 examples" for task in tasks) + ")"
        )
    return tasks


# ---------------------------------------------------------------------------------------------
# Sharded prediction and exact gathering (shared by evaluate.py and FLMMTrainer.evaluate)
# ---------------------------------------------------------------------------------------------
#: Example keys that are targets of the metrics, not inputs of the model (masks are both with a loss).
TARGET_KEYS = ("masks", "isthing", "plural")


def shard_indices(num_examples: int, process_index: int, num_processes: int) -> list[int]:
    """Index striding: process ``r`` of ``W`` takes ``r, r + W, ...`` (disjoint, covering, unpadded)."""
    return list(range(process_index, num_examples, num_processes))


class _IndexedRows(torch.utils.data.Dataset):
    """``(global index, row)`` for the given indices of a dataset."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, dict]:
        index = self.indices[i]
        return index, self.dataset[index]


class _IndexedCollator:
    """Rows -> (global indices, processor batch with ``masks``/``isthing``/``plural`` lists)."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, items: list[tuple[int, dict]]) -> tuple[list[int], dict]:
        indices = [index for index, _ in items]
        return indices, self.collator([row for _, row in items])


def make_collator(processor, use_sam: bool, sentence_field: str = "raw_sentences", with_loss: bool = False):
    """The evaluation collator: the first sentence of every ref, the targets in the batch.

    Args:
        processor: the ``FLMMProcessor``.
        use_sam: also prepare SAM's inputs (``sam_pixel_values``).
        sentence_field: ``"raw_sentences"`` or ``"sentences"``.
        with_loss: the ground-truth ``masks`` go to the model too (which then returns its loss);
            otherwise they are, like ``isthing`` / ``plural``, a target kept beside the model's inputs.
    """
    from .data import FLMMCollator, FLMMTransform

    call = functools.partial(processor, return_sam_inputs=use_sam)
    return FLMMCollator(
        call,
        transform=FLMMTransform(train=False, sentence_field=sentence_field),
        with_masks=with_loss,
        extra_keys=tuple(key for key in TARGET_KEYS if not (with_loss and key == "masks")),
    )


@dataclass
class MaskPrediction:
    """One example's predicted masks (refined where the model refines, else coarse) and its targets."""

    index: int  # position of the example in the evaluated dataset
    masks: torch.Tensor  # [K, H, W] bool at the original image size, on the CPU
    targets: torch.Tensor  # [K, H, W] bool, the ground truth, on the CPU


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside lists and tuples) moved to ``device``; anything else unchanged."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


class _ShardScorer:
    """Runs the model batch by batch over one process's shard and counts per-mask pixels per variant."""

    def __init__(self, model, processor, threshold: float, with_loss: bool, keep_predictions: int,
                 autocast: Callable[[], Any] | None) -> None:
        self.model, self.processor, self.threshold, self.with_loss = model, processor, threshold, with_loss
        self.keep_predictions, self.autocast = keep_predictions, autocast
        self.use_sam = bool(model.config.use_sam)
        self.accumulators = {v: MaskIoUAccumulator() for v in VARIANTS if self.use_sam or v == "coarse"}
        self.payload: dict[str, Any] = {"index": [], "num_masks": [], "loss_sum": 0.0, "loss_batches": 0, "kept": []}

    def add(self, batch_indices: Sequence[int], batch: dict[str, Any]) -> None:
        """Score one collated batch (``batch_indices``: the examples' positions in the dataset)."""
        given = ("masks",) if self.with_loss else ()  # the model's loss needs the masks too
        targets = {key: batch[key] if key in given else batch.pop(key) for key in TARGET_KEYS}
        inputs = _to_device(batch, self.model.device)
        with self.autocast() if self.autocast is not None else contextlib.nullcontext():
            output = self.model(**inputs)
        if output.loss is not None:
            self.payload["loss_sum"] += float(output.loss)
            self.payload["loss_batches"] += 1
        sizes = inputs["original_sizes"].cpu()
        logits = {"coarse": output.coarse_logits, "refined": output.refined_logits}
        # resized, thresholded and counted where the logits are (the GPU in real runs)
        predictions = {
            variant: self.processor.post_process_masks([x.float() for x in logits[variant]], sizes, threshold=self.threshold)
            for variant in self.accumulators
        }
        shown = "refined" if self.use_sam else "coarse"
        for b, index in enumerate(batch_indices):
            gt = targets["masks"][b]
            for variant, accumulator in self.accumulators.items():
                accumulator.add(predictions[variant][b], gt, isthing=targets["isthing"][b], plural=targets["plural"][b])
            self.payload["index"].append(int(index))
            self.payload["num_masks"].append(int(gt.shape[0]))
            if index < self.keep_predictions:
                self.payload["kept"].append(MaskPrediction(int(index), predictions[shown][b].cpu(), gt.cpu()))

    def result(self) -> dict[str, Any]:
        """The picklable payload (see :func:`predict_shard`)."""
        return dict(self.payload, **{variant: acc.state_dict() for variant, acc in self.accumulators.items()})


@torch.no_grad()
def predict_shard(
    model,
    processor,
    dataset,
    indices: Sequence[int],
    batch_size: int = 1,
    num_workers: int = 0,
    sentence_field: str = "raw_sentences",
    threshold: float = 0.5,
    with_loss: bool = False,
    keep_predictions: int = 0,
    autocast: Callable[[], Any] | None = None,
    progress: bool = False,
    description: str = "",
) -> dict[str, Any]:
    """Run the model on ``dataset[indices]`` and count per-mask pixels for each variant.

    Args:
        model: an ``FLMMForGrounding`` (inputs go to ``model.device``; it is put in eval mode and
            back in training mode afterwards if it was).
        processor: its ``FLMMProcessor`` (batches and ``post_process_masks``).
        dataset / indices: the rows (RefCOCO or PNG layout) and which of them this process scores.
        batch_size / num_workers: of the ``DataLoader``.
        sentence_field / threshold: see :class:`EvaluationArguments`.
        with_loss: give the model the ground-truth masks and sum its loss.
        keep_predictions: keep the predicted masks of the examples with index below this.
        autocast: a context-manager factory entered around every forward (the Trainer's autocast).
        progress / description: a tqdm progress bar.

    Returns:
        A picklable payload: ``index`` (the global example indices, in processing order),
        ``num_masks`` (masks per example), one :meth:`MaskIoUAccumulator.state_dict` per variant
        (``"coarse"`` and, with a refiner, ``"refined"``; masks in processing order),
        ``loss_sum`` / ``loss_batches`` (batches that returned a loss) and ``kept`` (a list of
        :class:`MaskPrediction`).
    """
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(
        _IndexedRows(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_IndexedCollator(make_collator(processor, bool(model.config.use_sam), sentence_field, with_loss)),
    )
    scorer = _ShardScorer(model, processor, threshold, with_loss, keep_predictions, autocast)
    was_training = model.training
    model.eval()
    try:
        for batch_indices, batch in tqdm(loader, desc=description, disable=not progress, unit="batch"):
            scorer.add(batch_indices, batch)
    finally:
        if was_training:
            model.train()
    return scorer.result()


def merge_payloads(payloads: Sequence[dict[str, Any]], num_examples: int) -> dict[str, MaskIoUAccumulator]:
    """Gathered per-process payloads -> one accumulator per variant, masks in dataset order.

    Raises:
        RuntimeError: if an example is missing or was evaluated more than once.
    """
    seen: dict[int, int] = {}
    pieces: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    variants = [v for v in VARIANTS if all(v in p for p in payloads)] if payloads else []
    for payload in payloads:
        bounds = np.concatenate([[0], np.cumsum(payload["num_masks"], dtype=np.int64)])
        for j, index in enumerate(payload["index"]):
            seen[index] = seen.get(index, 0) + 1
            for variant in variants:
                state = payload[variant]
                pieces.setdefault(variant, {})[index] = {k: v[bounds[j] : bounds[j + 1]] for k, v in state.items()}
    duplicated = sorted(i for i, count in seen.items() if count > 1)
    missing = sorted(set(range(num_examples)) - set(seen))
    extra = sorted(set(seen) - set(range(num_examples)))
    if duplicated or missing or extra:
        raise RuntimeError(
            f"gathered results do not cover each of the {num_examples} examples exactly once: "
            f"duplicated {duplicated[:10]}, missing {missing[:10]}, unexpected {extra[:10]}"
        )
    return {
        variant: MaskIoUAccumulator.merge([pieces[variant][i] for i in range(num_examples)])
        if num_examples
        else MaskIoUAccumulator()
        for variant in variants
    }


def process_state():
    """accelerate's process state. Without GPUs, a multi-process launch (``torchrun``,
    ``accelerate launch --multi_gpu``) must ask for CPU explicitly, or accelerate silently runs
    every process as a lone single process."""
    from accelerate import PartialState

    world_size = max(int(os.environ.get(k, "1") or 1) for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    cpu = world_size > 1 and not torch.cuda.is_available()
    cpu = cpu or os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return PartialState(cpu=cpu)


def gather_payloads(payload: dict[str, Any], num_processes: int) -> list[dict[str, Any]]:
    """Every process's payload, in process order: one ``accelerate.utils.gather_object`` (which works
    under ``accelerate launch``, ``torchrun`` and the Trainer's distributed set-up alike)."""
    if num_processes == 1:
        return [payload]
    from accelerate.utils import gather_object

    return gather_object([payload])


@dataclass
class DatasetEvaluation:
    """What :func:`evaluate_dataset` returns, the same on every process."""

    accumulators: dict[str, MaskIoUAccumulator]  # per variant ("coarse", "refined"), masks in dataset order
    num_examples: int
    loss: float | None = None  # mean loss over all processes' batches (with_loss=True)
    predictions: list[MaskPrediction] = field(default_factory=list)  # the first kept examples, dataset order


def evaluate_dataset(
    model,
    processor,
    dataset,
    state: Any = None,
    batch_size: int = 1,
    num_workers: int = 0,
    sentence_field: str = "raw_sentences",
    threshold: float = 0.5,
    with_loss: bool = False,
    keep_predictions: int = 0,
    autocast: Callable[[], Any] | None = None,
    progress: bool | None = None,
    description: str = "",
) -> DatasetEvaluation:
    """Score ``dataset`` over all processes: each runs :func:`predict_shard` on its strided share,
    the payloads are gathered once and merged in dataset order, so any number of processes gives
    exactly the counts of one.

    Args:
        state: anything with ``process_index`` and ``num_processes``: an ``accelerate``
            ``PartialState`` / ``Accelerator`` (default: :func:`process_state`).
        progress: show a progress bar (default: on the main process).
        Others: see :func:`predict_shard`.
    """
    state = state if state is not None else process_state()
    num_examples = len(dataset)
    payload = predict_shard(
        model, processor, dataset, shard_indices(num_examples, state.process_index, state.num_processes),
        batch_size=batch_size, num_workers=num_workers, sentence_field=sentence_field, threshold=threshold,
        with_loss=with_loss, keep_predictions=keep_predictions, autocast=autocast,
        progress=state.process_index == 0 if progress is None else progress, description=description,
    )
    payloads = gather_payloads(payload, state.num_processes)
    batches = sum(p["loss_batches"] for p in payloads)
    return DatasetEvaluation(
        accumulators=merge_payloads(payloads, num_examples),
        num_examples=num_examples,
        loss=sum(p["loss_sum"] for p in payloads) / batches if batches else None,
        predictions=sorted((kept for p in payloads for kept in p["kept"]), key=lambda kept: kept.index),
    )


def evaluate_task(
    model,
    processor,
    task: EvalTask,
    state: Any = None,
    batch_size: int = 1,
    num_workers: int = 0,
    sentence_field: str = "raw_sentences",
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Evaluate one task over all processes; every process returns the same result dict.

    Returns:
        ``{"num_examples", "num_masks", "<variant>": metrics, ...}`` with RES metrics ``ciou`` /
        ``miou`` or PNG metrics (``ar``, ``ar_things``, ``ar_stuff``, ``ar_singulars``,
        ``ar_plurals``, ``acc_50``, ``pixel_acc``); the private key ``"_ious"`` holds the per-mask
        IoUs per variant (dataset order) for plots.
    """
    evaluation = evaluate_dataset(
        model, processor, task.dataset, state,
        batch_size=batch_size, num_workers=num_workers, sentence_field=sentence_field, threshold=threshold,
        description=task.name,
    )
    merged = evaluation.accumulators
    result: dict[str, Any] = {"num_examples": evaluation.num_examples, "num_masks": len(merged["coarse"])}
    for variant in VARIANTS:
        if variant not in merged:
            continue
        accumulator = merged[variant]
        metrics = accumulator.compute_png() if task.task_type == "png" else accumulator.compute_refer_seg()
        result[variant] = {k: float(v) for k, v in metrics.items()}
    result["_ious"] = {variant: merged[variant].ious for variant in merged}
    return result


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------
def load_model_and_processor(args: EvaluationArguments):
    """``FLMMForGrounding`` and ``FLMMProcessor`` from ``args.model_name_or_path`` (folder or Hub id); the frozen
    LMM in ``args.lmm_dtype`` (bf16 by default, as the paper ran it), quantized as ``args.quantization_config``
    says (by default as the saved model records)."""
    from transformers import set_seed

    from .modeling_flmm import FLMMForGrounding
    from .processing_flmm import FLMMProcessor

    if not args.model_name_or_path:
        raise ValueError("model_name_or_path is required (or pass a model to run_evaluation)")
    set_seed(args.seed)
    model = FLMMForGrounding.from_pretrained(
        args.model_name_or_path,
        revision=args.model_revision,
        dtype=LMM_DTYPES[args.lmm_dtype],
        quantization_config=parse_quantization_flag(args.quantization_config),
    )
    processor_kwargs: dict[str, Any] = {"trust_remote_code": False}  # our class is imported: no remote code
    if args.processor_name_or_path is None and args.model_revision:
        processor_kwargs["revision"] = args.model_revision
    # (without trust_remote_code=False the backbone processor's loader asks interactively about the
    # auto_map that FLMMProcessor.save_pretrained writes)
    processor = FLMMProcessor.from_pretrained(args.processor_name_or_path or args.model_name_or_path, **processor_kwargs)
    return model, processor


def run_evaluation(
    args: EvaluationArguments, model: Any = None, processor: Any = None, state: Any = None
) -> dict[str, Any]:
    """Evaluate on every dataset/split/protocol in ``args``; write the JSON (and plots) on the main process.

    Args:
        args: what to evaluate.
        model / processor: an in-memory ``FLMMForGrounding`` and ``FLMMProcessor``; loaded from
            ``args.model_name_or_path`` when not given.
        state: an ``accelerate.PartialState`` (created when not given; it reads the
            ``accelerate launch`` / ``torchrun`` environment).

    Returns:
        The results written to ``<output_dir>/eval_results.json`` (see :func:`results_table`):
        ``results[benchmark][split][protocol]`` for RES and ``results["png"][split]`` for PNG, each
        with ``num_examples``, ``num_masks``, ``refined`` and ``coarse`` metric dicts (0-100; an
        empty PNG subgroup is ``None``).
    """
    state = state if state is not None else process_state()
    if model is not None and processor is None:
        raise ValueError("pass the processor together with an in-memory model")
    tasks = build_tasks(args, state)  # data errors (a missing folder, no split) before the slow model load
    if model is None:
        model, loaded_processor = load_model_and_processor(args)
        processor = processor if processor is not None else loaded_processor
    model.to(state.device)
    model.eval()
    results: dict[str, Any] = {}
    curves: dict[str, dict[str, np.ndarray]] = {}
    for task in tasks:
        logger.info("evaluating %s: %d examples on %d process(es)", task.name, len(task.dataset), state.num_processes)
        outcome = evaluate_task(
            model, processor, task, state,
            batch_size=args.batch_size, num_workers=args.dataloader_num_workers,
            sentence_field=args.sentence_field, threshold=args.threshold,
        )
        ious = outcome.pop("_ious")
        node = results.setdefault(task.benchmark, {}).setdefault(task.split, {})
        if task.protocol is None:
            node.update(outcome)
            curves[task.name] = ious
        else:
            node[task.protocol] = outcome

    output = {
        "model": args.model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None),
        "datasets": args.datasets(),
        # what each dataset is (results are keyed by the flag it was passed with)
        "dataset_labels": {task.benchmark: task.label for task in tasks},
        "num_processes": state.num_processes,
        "settings": {
            "protocols": list(args.protocols),
            "max_samples": args.max_samples,
            "batch_size": args.batch_size,
            "sentence_field": args.sentence_field,
            "threshold": args.threshold,
            # what ran, also for a model passed in memory (which `lmm_dtype` does not change)
            "lmm_dtype": str(model.lmm.dtype).removeprefix("torch."),
            "attention_numerics": getattr(model.config, "attention_numerics", None),
            "lmm_quantization": model_quantization(model.lmm),
        },
        "results": results,
        "plots": {},
    }
    output = _json_safe(output)  # NaN (an empty subgroup) -> None, in the file and the return value alike
    if state.is_main_process:
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, variant_ious in curves.items():
            path = out_dir / f"{name.replace('/', '_')}_recall_curve.png"
            title = f"{_label(output, name.split('/')[0])} {name.split('/')[1]}: recall at IoU >= t"
            plot_recall_curves(variant_ious, path, title=title)
            output["plots"][name] = path.name
        (out_dir / RESULTS_FILE).write_text(json.dumps(output, indent=2) + "\n")
        logger.info("results written to %s", out_dir / RESULTS_FILE)
        if args.update_model_card:
            update_model_card(args.model_name_or_path, output)
    state.wait_for_everyone()
    return output


def _json_safe(value: Any) -> Any:
    """NaN (an empty subgroup) -> null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Reporting: table, model-index, plot
# ---------------------------------------------------------------------------------------------
RES_COLUMNS = (("ciou", "cIoU"), ("miou", "gIoU"))
PNG_COLUMNS = (
    ("ar", "AR"), ("ar_things", "things"), ("ar_stuff", "stuff"), ("ar_singulars", "singular"),
    ("ar_plurals", "plural"), ("acc_50", "acc@0.5"), ("pixel_acc", "pix.acc"),
)


def iter_results(results: dict[str, Any]) -> Iterable[tuple[str, str, str | None, dict[str, Any]]]:
    """``(benchmark, split, protocol, entry)`` for every evaluated unit of ``output["results"]``."""
    for benchmark, splits in results.items():
        for split, node in splits.items():
            if BENCHMARKS[benchmark][1] == "png":
                yield benchmark, split, None, node
            else:
                for protocol, entry in node.items():
                    yield benchmark, split, protocol, entry


def _label(output: dict[str, Any], benchmark: str) -> str:
    """The name of the dataset evaluated as ``benchmark`` (results written before labels: the benchmark's)."""
    return (output.get("dataset_labels") or {}).get(benchmark) or BENCHMARKS[benchmark][0]


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def results_table(output: dict[str, Any]) -> str:
    """A plain-text table: one row per RES split/protocol (cIoU, gIoU), one per PNG split."""
    lines = []
    rows = list(iter_results(output["results"]))
    res = [r for r in rows if r[2] is not None]
    png = [r for r in rows if r[2] is None]
    for group, columns in ((res, RES_COLUMNS), (png, PNG_COLUMNS)):
        if not group:
            continue
        variants = [v for v in VARIANTS if v in group[0][3]]
        header = ["dataset", "split", "protocol", "masks"] + [f"{v} {label}" for v in variants for _, label in columns]
        body = []
        for benchmark, split, protocol, entry in group:
            body.append(
                [_label(output, benchmark), split, protocol or "-", str(entry["num_masks"])]
                + [_fmt(entry.get(v, {}).get(key)) for v in variants for key, _ in columns]
            )
        widths = [max(len(str(x)) for x in column) for column in zip(header, *body)]
        for row in [header] + body:
            cells = [str(x).rjust(w) if i >= 3 else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def model_index_results(output: dict[str, Any]) -> list[dict[str, Any]]:
    """The results as Hub ``model-index`` entries (``task``, ``dataset``, ``metrics``), refined masks
    where the model has a refiner, else coarse ones."""
    entries = []
    for benchmark, split, protocol, entry in iter_results(output["results"]):
        pretty, task_type, _ = BENCHMARKS[benchmark]
        variant = "refined" if "refined" in entry else "coarse"
        suffix = f" ({protocol.replace('_', '-')}, {variant})" if protocol else f" ({variant})"
        if task_type == "res":
            task, columns = {"type": "image-segmentation", "name": "Referring Expression Segmentation"}, RES_COLUMNS
        else:
            task, columns = {"type": "image-segmentation", "name": "Panoptic Narrative Grounding"}, PNG_COLUMNS
        metrics = [
            {"type": key, "name": label + suffix, "value": entry[variant][key]}
            for key, label in columns
            if entry[variant].get(key) is not None and math.isfinite(entry[variant][key])
        ]
        source = output.get("datasets", {}).get(benchmark)
        name = _label(output, benchmark)
        # the Hub dataset id when evaluated from the Hub; a local folder is not named (no machine
        # paths): the benchmark key, or a slug of its own name for a dataset that is not the benchmark
        local_type = benchmark if name == pretty else re.sub(r"[^a-z0-9+]+", "-", name.lower()).strip("-")
        dataset_type = source if source and not os.path.exists(source) else local_type
        dataset = {"name": name, "type": dataset_type, "split": split}
        entries.append({"task": task, "dataset": dataset, "metrics": metrics})
    return entries


def update_model_card(model_dir: str | os.PathLike | None, output: dict[str, Any]) -> None:
    """Write the results into the ``model-index`` of a local model folder's ``README.md``.

    Delegates to :func:`flmm_hf.model_card.update_model_index` (which owns the card format) with
    :func:`model_index_results` entries; results of the same dataset, split and metric are replaced.
    """
    if not model_dir or not Path(model_dir).is_dir():
        raise ValueError(f"update_model_card needs a local model folder, got {model_dir!r}")
    from .model_card import update_model_index

    update_model_index(model_dir, model_index_results(output))
    logger.info("model-index of %s updated", Path(model_dir) / "README.md")


def plot_recall_curves(
    variant_ious: dict[str, np.ndarray], path: str | os.PathLike, title: str = "", size: tuple[int, int] = RECALL_PLOT_SIZE
) -> Path:
    """Draw recall(IoU >= t) over t in [0, 1] per mask variant as a PNG (PIL only, no matplotlib).

    The legend gives each curve's average recall (its area, :func:`flmm_hf.metrics.average_recall`).
    """
    from PIL import Image, ImageDraw

    from .metrics import average_recall

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 40, height - 50
    colours = {"refined": (31, 119, 180), "coarse": (255, 127, 14)}

    def xy(t: float, r: float) -> tuple[float, float]:
        return left + t * (right - left), bottom - r * (bottom - top)

    # axes, grid and ticks
    for k in range(11):
        v = k / 10
        x, _ = xy(v, 0)
        _, y = xy(0, v)
        draw.line([x, top, x, bottom], fill=(230, 230, 230))
        draw.line([left, y, right, y], fill=(230, 230, 230))
        if k % 2 == 0:
            draw.text((x - 8, bottom + 6), f"{v:.1f}", fill="black")
            draw.text((left - 30, y - 6), f"{v:.1f}", fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2 - 40, bottom + 24), "IoU threshold t", fill="black")
    draw.text((left, 12), title or "recall at IoU >= t", fill="black")
    draw.text((8, top - 16), "recall", fill="black")

    legend_y = top + 10
    samples = np.linspace(0, len(np.arange(0, 1, 1e-5)) - 1, num=right - left + 1).astype(int)
    for variant, ious in variant_ious.items():
        thresholds, recall = recall_curve(ious)
        if len(ious) == 0:
            continue
        points = [xy(thresholds[i], recall[i]) for i in samples]
        colour = colours.get(variant, (44, 160, 44))
        draw.line(points, fill=colour, width=2)
        draw.line([right - 170, legend_y + 6, right - 150, legend_y + 6], fill=colour, width=2)
        draw.text((right - 145, legend_y), f"{variant} AR {average_recall(ious):.2f}", fill="black")
        legend_y += 16
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path

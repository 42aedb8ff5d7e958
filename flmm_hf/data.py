"""From dataset rows to model inputs: the row transform, RefCOCO grouping helpers and the collator.

The transform (:class:`FLMMTransform`) turns one row into the processor's per-example inputs:

- ``image``: PIL RGB image; ``text``: the answer text; ``phrases``: ``[start, end)`` character
  spans of the grounded phrases in ``text`` (``text[start:end]`` is exactly the expression or
  utterance, without surrounding spaces); ``masks``: ``BoolTensor [K, H, W]`` at the original
  image size; ``plural`` / ``isthing``: one bool per phrase (PNG metrics; RefCOCO refs are
  singular things); ``image_id``; ``pieces``: the answer cut as the original F-LMM encoded it,
  ``[start, end, last_token_only]`` spans of ``text`` that reproduction mode encodes one by one
  (see :mod:`flmm_hf.answer_tokens`); ``question``: the row's ``question`` column if it has one
  (a per-dataset prompt, see :class:`WithQuestion`), else None (the processor's question).

Row kinds (detected from the columns):

- PNG row (``caption`` + ``segments``): the answer is the caption; every segment with
  ``segment_ids`` is a phrase. Pieces: every segment's utterance as stored (leading space
  included), with nothing between them, as the original's PNGDataset encodes them.
- RefCOCO row grouped by image (``ref_ids``, see :func:`group_refs_by_image`): the reference
  "concat" prompt: the expressions of all refs of the image, each followed by ``"."``,
  joined by a space for display (``"man texting. guy on right."``). Pieces: each expression
  alone, then a ``"."`` piece of which only the last token is kept, as the original's
  RefCOCO2PNG appends ``tokenizer.encode('.', add_special_tokens=False)[-1]``; every token of an
  expression is a phrase token.
- RefCOCO row with one ref (``ref_id``, the Parquet layout): one expression per example,
  also followed by ``"."`` (the original's "split" mode: one ref per sequence).
  :func:`explode_sentences` gives one row per sentence (RES evaluation, the common protocol).

Sentence choice per ref (``text_mode``, mmdet's RefCocoDataset names): ``"random"`` draws one
sentence per ref ONCE (seeded by ``seed`` and the ref id) and keeps it for every epoch, as mmdet
does when it loads the data list (the paper configs' choice); ``"resample"`` draws a fresh one
each time the row is read (seeded and reproducible, different per DataLoader worker and epoch);
``"select_first"`` takes the first one. The default is ``"resample"`` with ``train=True`` and
``"select_first"`` otherwise. As in the original, the annotators' ``raw`` sentence lower-cased
is used; ``sentence_field="sentences"`` picks the tokenised ``sent`` strings instead.

Use with ``datasets``::

    ds = load_dataset(folder)["train"]
    ds = group_refs_by_image(ds)                      # concat mode (RefCOCO)
    ds.set_transform(FLMMTransform(train=True))       # batched dict-of-lists in, dict-of-lists out
    collator = FLMMCollator(processor)                # calls the processor on the whole batch
    Trainer(..., train_dataset=ds, data_collator=collator,
            args=TrainingArguments(..., remove_unused_columns=False))

``remove_unused_columns=False`` is required: the Trainer would otherwise drop every dataset
column not named in ``forward`` (``image``, ``sentences``, ...) before the transform runs.
The collator returns exactly the processor's output (the model's forward inputs), plus any
``extra_keys`` asked for (for evaluation).
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .datasets_io import rle_feature, rle_to_mask
from .processing_flmm import match_phrases

EXAMPLE_KEYS = ("image", "text", "phrases", "masks", "plural", "isthing", "image_id", "pieces", "question")
TEXT_MODES = ("random", "resample", "select_first")

# What each row kind needs (a tuple entry: any one of those columns) and what writes such rows, so
# that a dataset missing a column fails up front with the fix, not deep inside a map or the model.
REFCOCO_BUILDER = "dataset_scripts/build_refcoco.py"
PNG_BUILDER = "dataset_scripts/build_png.py"
ROW_KINDS: dict[str, tuple[tuple[str | tuple[str, ...], ...], str]] = {
    "PNG": (("image", "image_id", "caption", "segments"), PNG_BUILDER),
    "RefCOCO grouped by image": (
        ("image", "image_id", "ref_ids", "masks", ("raw_sentences", "sentences")),
        f"flmm_hf.data.group_refs_by_image over a dataset of {REFCOCO_BUILDER}",
    ),
    "RefCOCO": (("image", "image_id", "ref_id", "mask", ("raw_sentences", "sentences")), REFCOCO_BUILDER),
}
PNG_SEGMENT_FIELDS = ("utterance", "start", "end", "segment_ids", "plural", "isthing", "mask")
# group_refs_by_image copies every column of a RefCOCO row
GROUPED_SOURCE_COLUMNS = (
    "image", "image_id", "file_name", "height", "width", "ref_id", "ann_id", "category_id", "category",
    "sentences", "raw_sentences", "bbox", "mask",
)


def _name(entry: str | tuple[str, ...]) -> str:
    return " or ".join(repr(c) for c in entry) if isinstance(entry, tuple) else repr(entry)


def check_columns(columns: Sequence[str], where: str = "dataset") -> str:
    """The row kind of a dataset with these columns (a key of :data:`ROW_KINDS`).

    Raises ``ValueError`` naming the missing columns and the builder that writes them, or, when
    no kind fits, what each kind needs. ``where`` names the dataset in the message.
    """
    cols = set(columns)
    if "segments" in cols or "caption" in cols:
        kind = "PNG"
    elif "ref_ids" in cols:
        kind = "RefCOCO grouped by image"
    elif "ref_id" in cols:
        kind = "RefCOCO"
    else:
        kinds = "; ".join(
            f"{kind} rows ({', '.join(_name(c) for c in need)}) come from {writer}"
            for kind, (need, writer) in ROW_KINDS.items()
        )
        raise ValueError(f"{where}: unknown row layout with columns {sorted(cols)}: {kinds}")
    need, writer = ROW_KINDS[kind]
    missing = [_name(c) for c in need if not (set(c) & cols if isinstance(c, tuple) else c in cols)]
    if missing:
        raise ValueError(
            f"{where}: {kind} rows need the column(s) {', '.join(missing)}, missing from {sorted(cols)}; "
            f"such rows are written by {writer}: rebuild the dataset with it"
        )
    return kind


# --------------------------------------------------------------------------------------
# Dataset-level helpers
# --------------------------------------------------------------------------------------
def grouped_refcoco_features():
    """Features of a RefCOCO row grouped by image (one row per image, lists over its refs)."""
    from datasets import Features, Image, List, Value

    return Features(
        {
            "image": Image(),
            "image_id": Value("int64"),
            "file_name": Value("string"),
            "height": Value("int32"),
            "width": Value("int32"),
            "ref_ids": List(Value("int64")),
            "ann_ids": List(Value("int64")),
            "category_ids": List(Value("int64")),
            "categories": List(Value("string")),
            "sentences": List(List(Value("string"))),
            "raw_sentences": List(List(Value("string"))),
            "bboxes": List(List(Value("float64"), length=4)),
            "masks": List(rle_feature()),
        }
    )


def group_refs_by_image(dataset, cache_dir: str | None = None, keep_in_memory: bool = False):
    """Per-ref RefCOCO rows -> one row per image with all its refs (the "concat" prompt mode).

    Images are passed through as stored bytes (no re-encoding). Image order follows the first
    appearance in ``dataset``; refs keep their order. Written with ``Dataset.from_generator``
    (cached like any ``datasets`` result, in ``cache_dir`` if given).
    """
    from datasets import Dataset, Image

    missing = [c for c in GROUPED_SOURCE_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"group_refs_by_image needs per-ref RefCOCO rows; the columns {missing} are missing from "
            f"{dataset.column_names}: build the dataset with {REFCOCO_BUILDER}"
        )
    src = dataset.cast_column("image", Image(decode=False))
    groups: dict[int, list[int]] = defaultdict(list)
    for i, image_id in enumerate(src["image_id"]):
        groups[int(image_id)].append(i)
    index_lists = list(groups.values())

    def gen(index_lists: list[list[int]]):
        for idxs in index_lists:
            rows = src[idxs]
            yield {
                "image": rows["image"][0],
                "image_id": rows["image_id"][0],
                "file_name": rows["file_name"][0],
                "height": rows["height"][0],
                "width": rows["width"][0],
                "ref_ids": rows["ref_id"],
                "ann_ids": rows["ann_id"],
                "category_ids": rows["category_id"],
                "categories": rows["category"],
                "sentences": rows["sentences"],
                "raw_sentences": rows["raw_sentences"],
                "bboxes": rows["bbox"],
                "masks": rows["mask"],
            }

    return Dataset.from_generator(
        gen,
        features=grouped_refcoco_features(),
        gen_kwargs={"index_lists": index_lists},
        cache_dir=cache_dir,
        keep_in_memory=keep_in_memory,
        # the fingerprint of the source makes the cache specific to this dataset
        config_name=f"grouped-{dataset._fingerprint}",
    )


def explode_sentences(dataset):
    """Per-ref RefCOCO rows -> one row per sentence (each row keeps a single sentence).

    RES benchmarks score every sentence; evaluate such rows with ``FLMMTransform(train=False)``.
    """
    from datasets import Image

    src = dataset.cast_column("image", Image(decode=False))
    per_sentence = ("sentences", "raw_sentences", "sent_ids")

    def explode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in batch}
        for i in range(len(batch["ref_id"])):
            for j in range(len(batch["sentences"][i])):
                for k in batch:
                    out[k].append([batch[k][i][j]] if k in per_sentence else batch[k][i])
        return out

    return src.map(explode, batched=True).cast_column("image", Image())


# --------------------------------------------------------------------------------------
# Row -> example
# --------------------------------------------------------------------------------------
def _decode_masks(rles: Sequence[dict], height: int, width: int) -> torch.Tensor:
    """RLEs -> BoolTensor [K, H, W]; every RLE must have the image's size."""
    masks = []
    for rle in rles:
        if [int(s) for s in rle["size"]] != [height, width]:
            raise ValueError(f"mask size {list(rle['size'])} != image size {[height, width]}")
        masks.append(rle_to_mask(rle))
    if not masks:
        return torch.zeros(0, height, width, dtype=torch.bool)
    return torch.from_numpy(np.stack(masks))


def build_concat_answer(expressions: Sequence[str]) -> tuple[str, list[tuple[int, int]], list[list[int]]]:
    """``["a b", "c"]`` -> ``("a b. c.", [(0, 3), (5, 6)], pieces)``: each expression followed by ``.``.

    ``pieces`` (see :mod:`flmm_hf.answer_tokens`): ``[0, 3, 0], [3, 4, 1], [5, 6, 0], [6, 7, 1]``:
    each expression encoded alone, then the last token of ``"."`` encoded alone.
    """
    parts, spans, pieces, pos = [], [], [], 0
    for k, expr in enumerate(expressions):
        if k:
            parts.append(" ")
            pos += 1
        spans.append((pos, pos + len(expr)))
        pieces += [[pos, pos + len(expr), 0], [pos + len(expr), pos + len(expr) + 1, 1]]
        parts.append(expr + ".")
        pos += len(expr) + 1
    return "".join(parts), spans, pieces


class FLMMTransform:
    """Row(s) -> model-input examples; usable as ``datasets`` ``set_transform``/``with_transform``.

    Args:
        train: training (default sentence choice ``"resample"``) or evaluation (``"select_first"``).
        seed: base seed of the sentence draws.
        sentence_field: ``"raw_sentences"`` (lower-cased, as the original) or ``"sentences"``.
        text_mode: the sentence per ref: ``"random"`` (drawn once per ref, fixed for every epoch:
            mmdet's, the paper's), ``"resample"`` (a fresh draw per read) or ``"select_first"``;
            None: by ``train`` (see the module docstring).
    """

    def __init__(
        self, train: bool = False, seed: int = 0, sentence_field: str = "raw_sentences", text_mode: str | None = None
    ) -> None:
        if sentence_field not in ("raw_sentences", "sentences"):
            raise ValueError(f"sentence_field must be 'raw_sentences' or 'sentences', got {sentence_field!r}")
        if text_mode is None:
            text_mode = "resample" if train else "select_first"
        if text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
        self.seed = seed
        self.sentence_field = sentence_field
        self.text_mode = text_mode
        self._draws: dict[Any, int] = defaultdict(int)

    # -- datasets entry point ----------------------------------------------------------
    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """Batched dict of lists -> dict of lists with :data:`EXAMPLE_KEYS`."""
        n = len(next(iter(batch.values())))
        examples = [self.example({k: v[i] for k, v in batch.items()}) for i in range(n)]
        return {k: [ex[k] for ex in examples] for k in EXAMPLE_KEYS}

    # -- one row -----------------------------------------------------------------------
    def example(self, row: dict) -> dict:
        """One decoded row -> one example dict (see the module docstring)."""
        kind = check_columns(list(row), where="row")
        image = row["image"]
        if image is not None and not hasattr(image, "convert"):  # undecoded {"bytes", "path"} (Image(decode=False))
            from datasets import Image as ImageFeature

            image = ImageFeature().decode_example(image) if (image.get("bytes") or image.get("path")) else None
        if image is None:
            raise ValueError(
                f"row of image_id {row['image_id']} has no image (a null image cell): rebuild the dataset "
                f"with {ROW_KINDS[kind][1]}, which skips records whose image is missing"
            )
        image = image.convert("RGB")
        height, width = image.height, image.width
        if kind == "PNG":
            return self._png_example(row, image)
        if "ref_ids" in row:
            keys = [int(r) for r in row["ref_ids"]]
            sentences = self._sentences(row)
            rles = row["masks"]
        else:  # one ref per row (check_columns saw "ref_id")
            keys = [int(row["ref_id"])]
            sentences = [self._sentences(row)]
            rles = [row["mask"]]
        expressions = [self._choose(key, sents) for key, sents in zip(keys, sentences)]
        text, phrases, pieces = build_concat_answer(expressions)
        k = len(phrases)
        return {
            "image": image,
            "text": text,
            "phrases": [list(p) for p in phrases],
            "masks": _decode_masks(rles, height, width),
            "plural": [False] * k,
            "isthing": [True] * k,
            "image_id": int(row["image_id"]),
            "pieces": pieces,
            "question": row.get("question"),
        }

    def _sentences(self, row: dict) -> Any:
        """The ``sentence_field`` column, else the other sentence column (a source may have one only)."""
        if self.sentence_field in row:
            return row[self.sentence_field]
        return row["sentences" if "sentences" in row else "raw_sentences"]

    def _choose(self, key: int, sentences: Sequence[str]) -> str:
        """The sentence of ref ``key`` by ``text_mode``; whitespace normalised."""
        if not sentences:
            raise ValueError(f"ref {key} has no sentences")
        idx = 0
        if self.text_mode == "random":
            # One draw per ref for the whole run (mmdet draws when it loads the data list).
            idx = random.Random(f"{self.seed}:{key}").randrange(len(sentences))
        elif self.text_mode == "resample" and len(sentences) > 1:
            count = self._draws[key]
            self._draws[key] += 1
            info = torch.utils.data.get_worker_info()
            # The worker seed changes per worker and per epoch (DataLoader draws it from the seeded
            # main RNG), the draw count per read in one process: reproducible yet not frozen.
            worker_seed = info.seed if info is not None else 0
            idx = random.Random(f"{self.seed}:{key}:{count}:{worker_seed}").randrange(len(sentences))
        sentence = " ".join(str(sentences[idx]).split())
        return sentence.lower() if self.sentence_field == "raw_sentences" else sentence

    def _png_example(self, row: dict, image) -> dict:
        caption = row["caption"]
        spans, rles, plural, isthing, pieces = [], [], [], [], []
        for seg in row["segments"]:
            missing = [f for f in PNG_SEGMENT_FIELDS if f not in seg]
            if missing:
                raise ValueError(
                    f"image {row['image_id']}: PNG segments need the fields {missing}; "
                    f"they are written by {PNG_BUILDER}: rebuild the dataset with it"
                )
            start, end = int(seg["start"]), int(seg["end"])
            if caption[start:end] != seg["utterance"]:
                raise ValueError(f"segment span {start}:{end} does not index {seg['utterance']!r}")
            if start < end:
                pieces.append([start, end, 0])
            if not seg["segment_ids"]:
                continue
            spans.append((start, end))
            rles.append(seg["mask"])
            plural.append(bool(seg["plural"]))
            isthing.append(bool(seg["isthing"]))
        # the processor's own phrase rules: spans trimmed of surrounding whitespace
        phrases = []
        for match in match_phrases(caption, spans):
            if match.span is None:
                raise ValueError(f"image {row['image_id']}: segment {match.problem}")
            phrases.append(list(match.span))
        return {
            "image": image,
            "text": caption,
            "phrases": phrases,
            "masks": _decode_masks(rles, image.height, image.width),
            "plural": plural,
            "isthing": isthing,
            "image_id": int(row["image_id"]),
            "pieces": pieces,
            "question": row.get("question"),
        }


class WithQuestion(torch.utils.data.Dataset):
    """A dataset whose rows carry a ``question`` (the prompt's user turn for this dataset's examples).

    The original F-LMM gives each dataset of a training mix its own prompt (e.g. the LLaVA-NeXT
    configs train on PNG with ``What is shown in this image?`` and on RefCOCO with the
    description prompt); :class:`FLMMTransform` passes the question to the processor per example.
    """

    def __init__(self, dataset: Any, question: str) -> None:
        self.dataset = dataset
        self.question = question

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "question": self.question}


# --------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------
class FLMMCollator:
    """Examples -> one padded batch, by calling the processor once on the whole batch.

    Args:
        processor: an ``FLMMProcessor`` (or any callable with its signature).
        transform: if given, applied to each item first, so the collator also accepts raw rows
            (then no ``set_transform`` is needed; ``remove_unused_columns=False`` still is).
        with_masks: pass the ground-truth masks (training / evaluation with targets).
        extra_keys: example keys copied to the batch as lists (e.g. ``("plural", "isthing",
            "image_id")`` for the PNG metrics). Empty by default, so the batch keys are exactly
            the processor's outputs, the model's forward arguments.
    """

    def __init__(
        self,
        processor: Callable,
        transform: FLMMTransform | None = None,
        with_masks: bool = True,
        extra_keys: Sequence[str] = (),
    ) -> None:
        self.processor = processor
        self.transform = transform
        self.with_masks = with_masks
        self.extra_keys = tuple(extra_keys)

    def __call__(self, items: list[dict]) -> dict:
        examples = [self.transform.example(it) for it in items] if self.transform is not None else items
        kwargs = {}
        if self.with_masks:
            kwargs["masks"] = [ex["masks"] for ex in examples]
        batch = self.processor(
            images=[ex["image"] for ex in examples],
            texts=[ex["text"] for ex in examples],
            phrases=[[tuple(int(v) for v in p) for p in ex["phrases"]] for ex in examples],
            pieces=[ex.get("pieces") for ex in examples],
            question=[ex.get("question") for ex in examples],
            return_tensors="pt",
            **kwargs,
        )
        out = dict(batch)
        for key in self.extra_keys:
            out[key] = [ex[key] for ex in examples]
        return out

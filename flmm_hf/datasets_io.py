"""Building blocks shared by the dataset builders in ``dataset_scripts/``.

One job each:

- :func:`load_refs_pickle`: read the original RefCOCO ``refs(*).p`` pickles with an unpickler
  that only rebuilds plain containers, so a tampered download cannot run code.
- RLE helpers (:func:`segmentation_to_rle`, :func:`mask_to_rle`, :func:`rle_to_mask`): masks are
  stored as COCO compressed RLE (``{"size": [h, w], "counts": str}``), the format pycocotools reads.
- :class:`ShardedParquetWriter`: writes ``data/<split>-NNNNN.parquet`` shards of bounded size; it is
  resumable and idempotent (rows whose key is already in a finished shard are not written again).
- :func:`write_dataset_card`: ``README.md`` with the YAML block that ``datasets.load_dataset(folder)``
  and the Hub read (configs/splits, features), plus license, citation and how it was built.
- :class:`BuildSummary`: what was written and what was skipped and why (logged, printed, saved).

Library-only: nothing here is needed by the Hub custom code.
"""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import argparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

#: The start of the DeprecationWarning numpy 2 raises inside pycocotools' RLE decode (harmless).
PYCOCOTOOLS_COPY_WARNING = "__array__ implementation doesn't accept a copy keyword"

logger = logging.getLogger(__name__)

DATA_DIR = "data"
SUMMARY_FILE = "build_summary.json"


# --------------------------------------------------------------------------------------
# Row schemas
# --------------------------------------------------------------------------------------
def rle_feature() -> dict:
    """Arrow/datasets feature of one COCO compressed RLE."""
    from datasets import List, Value

    return {"size": List(Value("int32")), "counts": Value("string")}


def refcoco_features():
    """Schema of a RefCOCO-style row (one row per ref); the synthetic shapes set uses it too.

    ``sentences`` are the tokenised lower-case ``sent`` strings, ``raw_sentences`` the annotators'
    ``raw`` strings (equal to ``sentences`` where a source has no raw text), ``bbox`` is COCO xywh
    of the referred instance, ``mask`` its instance mask.
    """
    from datasets import Features, Image, List, Value

    return Features(
        {
            "image": Image(),
            "image_id": Value("int64"),
            "file_name": Value("string"),
            "height": Value("int32"),
            "width": Value("int32"),
            "ref_id": Value("int64"),
            "ann_id": Value("int64"),
            "category_id": Value("int64"),
            "category": Value("string"),
            "sentences": List(Value("string")),
            "raw_sentences": List(Value("string")),
            "sent_ids": List(Value("int64")),
            "bbox": List(Value("float64"), length=4),
            "mask": rle_feature(),
        }
    )


def png_features():
    """Schema of a Panoptic Narrative Grounding row (one row per narrative).

    ``segments`` cover the caption in order: ``start``/``end`` index the caption
    (``caption[start:end] == utterance``); grounded segments have ``segment_ids`` and the union
    ``mask`` of those panoptic segments; ungrounded ones have empty ids and a null mask.
    """
    from datasets import Features, Image, List, Value

    return Features(
        {
            "image": Image(),
            "image_id": Value("int64"),
            "narrative_id": Value("string"),
            "file_name": Value("string"),
            "height": Value("int32"),
            "width": Value("int32"),
            "caption": Value("string"),
            "segments": List(
                {
                    "utterance": Value("string"),
                    "start": Value("int32"),
                    "end": Value("int32"),
                    "segment_ids": List(Value("int64")),
                    "plural": Value("bool"),
                    "isthing": Value("bool"),
                    "noun": Value("bool"),
                    "mask": rle_feature(),
                }
            ),
        }
    )


def image_cell(path: Path, embed: bool) -> dict:
    """The ``Image`` cell for a file: its original bytes (no re-encoding) or its absolute path."""
    path = Path(path).resolve()
    return {"bytes": path.read_bytes() if embed else None, "path": str(path) if not embed else path.name}


# --------------------------------------------------------------------------------------
# Safe unpickling
# --------------------------------------------------------------------------------------
class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a pickle asks for anything beyond plain containers and scalars."""


# Containers that pickle can only rebuild through a global lookup. Everything else a refs file
# holds (dict, list, tuple, str, bytes, int, float, bool, None) is built by opcodes directly.
_ALLOWED_GLOBALS = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "set"),  # Python 2 pickles (the original refs files) name the module so
    ("__builtin__", "frozenset"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except ``set``/``frozenset``.

    ``find_class`` is the only path by which a pickle reaches a callable (class instances,
    ``__reduce__`` payloads such as ``os.system``); refusing it means nothing is executed.
    """

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102
        if (module, name) in _ALLOWED_GLOBALS:
            return set if name == "set" else frozenset
        raise UnsafePickleError(
            f"refusing to unpickle global '{module}.{name}': only plain containers "
            "(dict, list, tuple, set, str, numbers, None) are allowed in annotation pickles"
        )

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102
        raise UnsafePickleError("refusing a pickle with persistent ids")


def safe_pickle_loads(data: bytes, encoding: str = "latin1") -> Any:
    """Unpickle ``data`` allowing only plain containers (see :class:`RestrictedUnpickler`).

    ``encoding`` decodes Python 2 ``str`` objects; the RefCOCO pickles were written by Python 2.
    """
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def load_refs_pickle(path: str | os.PathLike, encoding: str = "latin1") -> list[dict]:
    """Read a RefCOCO ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p`` file safely.

    Returns the list of ref records (``ref_id``, ``ann_id``, ``image_id``, ``split``,
    ``sentences``, ``category_id``, ...). Raises :class:`UnsafePickleError` for any
    non-container object and ``ValueError`` if the top level is not a list of dicts.
    """
    refs = safe_pickle_loads(Path(path).read_bytes(), encoding=encoding)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
    return [_decode_bytes(r) for r in refs]


def _decode_bytes(obj: Any) -> Any:
    """Turn ``bytes`` left by ``encoding='bytes'`` style pickles into ``str`` recursively."""
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    if isinstance(obj, dict):
        return {_decode_bytes(k): _decode_bytes(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_decode_bytes(v) for v in obj)
    return obj


# --------------------------------------------------------------------------------------
# RLE helpers
# --------------------------------------------------------------------------------------
def _rle_to_storable(rle: dict) -> dict:
    """pycocotools RLE (counts as bytes) -> ``{"size": [h, w], "counts": str}``."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """COCO ``segmentation`` (polygons, uncompressed RLE or compressed RLE) -> compressed RLE.

    Several polygons of one object are merged into one mask, as pycocotools' ``annToRLE`` does.
    """
    if isinstance(segmentation, list):
        if len(segmentation) == 0:
            raise ValueError("empty polygon list")
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unknown segmentation type {type(segmentation).__name__}")
    if [int(s) for s in rle["size"]] != [height, width]:
        raise ValueError(f"segmentation size {list(rle['size'])} != image size {[height, width]}")
    return _rle_to_storable(rle)


def mask_to_rle(mask: np.ndarray) -> dict:
    """Binary mask [H, W] -> storable compressed RLE."""
    arr = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    return _rle_to_storable(mask_utils.encode(arr))


def rle_to_mask(rle: dict) -> np.ndarray:
    """Storable (or pycocotools) compressed RLE -> bool mask [H, W]."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    with warnings.catch_warnings():
        # pycocotools 2.0.x passes copy=False to an __array__ that numpy 2 warns about on every call
        warnings.filterwarnings("ignore", message=PYCOCOTOOLS_COPY_WARNING, category=DeprecationWarning)
        return mask_utils.decode({"size": [int(s) for s in rle["size"]], "counts": counts}).astype(bool)


# --------------------------------------------------------------------------------------
# Build summary
# --------------------------------------------------------------------------------------
@dataclass
class BuildSummary:
    """Counts what a builder wrote and what it skipped, with reasons and a few examples each.

    Skips are logged as warnings when they happen, so nothing is dropped silently.
    """

    written: Counter = field(default_factory=Counter)  # split -> new rows this run
    already_present: Counter = field(default_factory=Counter)  # split -> rows found from a previous run
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict = field(default_factory=lambda: defaultdict(list))  # reason -> first details
    max_examples: int = 5

    def skip(self, reason: str, detail: str) -> None:
        """Record one skipped item under ``reason`` (a short, stable category)."""
        self.skipped[reason] += 1
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append(detail)
        logger.warning("skipped (%s): %s", reason, detail)

    def to_dict(self) -> dict:
        """A JSON-serialisable view."""
        return {
            "written": dict(self.written),
            "already_present": dict(self.already_present),
            "skipped": dict(self.skipped),
            "skipped_examples": {k: list(v) for k, v in self.examples.items()},
        }

    def report(self) -> str:
        """A human-readable multi-line report."""
        lines = ["Build summary:"]
        splits = sorted(set(self.written) | set(self.already_present))
        for split in splits:
            lines.append(
                f"  {split}: {self.written[split]} rows written"
                + (f", {self.already_present[split]} already present" if self.already_present[split] else "")
            )
        if not splits:
            lines.append("  no rows written")
        if self.skipped:
            lines.append(f"  skipped {sum(self.skipped.values())} items:")
            for reason, n in self.skipped.most_common():
                lines.append(f"    {n} x {reason} (e.g. {'; '.join(self.examples[reason][:3])})")
        else:
            lines.append("  nothing skipped")
        return "\n".join(lines)

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write ``build_summary.json`` next to the data."""
        path = Path(output_dir) / SUMMARY_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


# --------------------------------------------------------------------------------------
# Sharded Parquet writing
# --------------------------------------------------------------------------------------
def _row_nbytes(row: dict) -> int:
    """Cheap size estimate of an encoded row (images dominate; strings count their length)."""
    total = 0
    stack: list[Any] = [row]
    while stack:
        v = stack.pop()
        if isinstance(v, (bytes, str)):
            total += len(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        else:
            total += 8
    return total


class ShardedParquetWriter:
    """Write one split as ``<output_dir>/data/<split>-NNNNN.parquet`` shards of bounded size.

    Resumable and idempotent: each row carries a unique ``key_column`` value. On start, the keys
    in finished shards are read back; :meth:`has` tells the builder to skip them, and new rows go
    to new shards numbered after the existing ones. A shard is written to a temporary name and
    renamed when complete, so an interrupted run leaves no half shard behind.

    ``features`` (a ``datasets.Features``) gives the Arrow schema, including the metadata that
    makes ``load_dataset`` decode images; rows are encoded with it.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        split: str,
        features: Any,
        key_column: str,
        max_rows_per_shard: int = 10_000,
        max_bytes_per_shard: int = 256 * 1024 * 1024,
    ) -> None:
        self.data_dir = Path(output_dir) / DATA_DIR
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.features = features
        self.schema = features.arrow_schema
        self.key_column = key_column
        self.max_rows = max_rows_per_shard
        self.max_bytes = max_bytes_per_shard
        # A leftover temporary file is an interrupted shard: its rows are not counted, rewrite them.
        for tmp in self.data_dir.glob(f".{split}-*.parquet.tmp"):
            tmp.unlink()
        self.existing_shards = sorted(self.data_dir.glob(f"{split}-*.parquet"))
        self.existing_keys: set = set()
        for shard in self.existing_shards:
            self.existing_keys.update(pq.read_table(shard, columns=[key_column]).column(0).to_pylist())
        self._next_index = 1 + max((self._index_of(p) for p in self.existing_shards), default=-1)
        self._buffer: list[dict] = []
        self._buffer_bytes = 0
        self.rows_written = 0
        self.shards_written: list[Path] = []

    @staticmethod
    def _index_of(path: Path) -> int:
        return int(path.stem.rsplit("-", 1)[1])

    @property
    def num_new(self) -> int:
        """Rows accepted by this writer so far (written shards + buffer)."""
        return self.rows_written + len(self._buffer)

    def has(self, key: Any) -> bool:
        """Whether a row with this key was already written (by a previous run or this one)."""
        return key in self.existing_keys

    def write(self, row: dict) -> None:
        """Buffer one row (decoded form, e.g. images as ``{"bytes", "path"}``); flush if full."""
        key = row[self.key_column]
        if key in self.existing_keys:
            return  # idempotence: a key is never written twice
        encoded = self.features.encode_example(row)
        self.existing_keys.add(key)
        self._buffer.append(encoded)
        self._buffer_bytes += _row_nbytes(encoded)
        if len(self._buffer) >= self.max_rows or self._buffer_bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one new shard (atomic rename)."""
        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        final = self.data_dir / f"{self.split}-{self._next_index:05d}.parquet"
        tmp = self.data_dir / f".{final.name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        self._next_index += 1
        self.rows_written += len(self._buffer)
        self.shards_written.append(final)
        self._buffer, self._buffer_bytes = [], 0

    def close(self) -> None:
        """Flush the remaining rows."""
        self.flush()

    def __enter__(self) -> "ShardedParquetWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # On an error the rows buffered so far are still valid: keep them, so a rerun resumes.
        self.flush()


def split_num_rows(output_dir: str | os.PathLike) -> dict[str, int]:
    """Rows per split, from the Parquet footers of every finished shard (cheap, no data read)."""
    return {split: rows for split, (rows, _) in split_stats(output_dir).items()}


def split_stats(output_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """(rows, uncompressed bytes) per split, from the Parquet footers."""
    stats: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for shard in sorted((Path(output_dir) / DATA_DIR).glob("*-*.parquet")):
        meta = pq.ParquetFile(shard).metadata
        entry = stats[shard.stem.rsplit("-", 1)[0]]
        entry[0] += meta.num_rows
        entry[1] += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return {k: (v[0], v[1]) for k, v in stats.items()}


# --------------------------------------------------------------------------------------
# Dataset card
# --------------------------------------------------------------------------------------
def write_dataset_card(
    output_dir: str | os.PathLike,
    *,
    pretty_name: str,
    features: Any,
    description: str,
    license: str,
    citation: str,
    build_command: str,
    summary: BuildSummary | None = None,
    split_order: Sequence[str] | None = None,
    tags: Sequence[str] = ("referring-expression-segmentation",),
) -> Path:
    """Write ``README.md`` with the YAML metadata ``datasets`` and the Hub understand.

    The YAML lists one ``default`` config whose splits point at ``data/<split>-*`` (so
    ``load_dataset(folder)`` needs no code), ``dataset_info`` with features and split sizes,
    the license and tags. The body says what the rows are, how they were built and the citation.
    """
    import yaml  # a dependency of datasets

    stats = split_stats(output_dir)
    counts = {k: v[0] for k, v in stats.items()}
    order = [s for s in (split_order or []) if s in counts] + sorted(s for s in counts if s not in (split_order or []))
    meta = {
        "pretty_name": pretty_name,
        "license": license,
        "task_categories": ["image-segmentation"],
        "tags": list(tags),
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": f"{DATA_DIR}/{s}-*"} for s in order],
            }
        ],
        "dataset_info": {
            "features": features._to_yaml_list(),
            "splits": [{"name": s, "num_bytes": stats[s][1], "num_examples": counts[s]} for s in order],
        },
    }
    table = "\n".join(f"| {s} | {counts[s]} |" for s in order)
    skipped = ""
    if summary is not None and summary.skipped:
        skipped = "\n\nItems skipped while building (see `build_summary.json`):\n\n" + "\n".join(
            f"- {n} x {reason}" for reason, n in summary.skipped.most_common()
        )
    body = f"""# {pretty_name}

{description}

| split | rows |
|---|---|
{table}

## Loading

```python
from datasets import load_dataset
ds = load_dataset("<this folder or Hub id>")
```

Masks are COCO compressed RLE (`{{"size": [h, w], "counts": str}}`); decode with
`pycocotools.mask.decode` or `flmm_hf.datasets_io.rle_to_mask`.

## How it was built

```
{build_command}
```{skipped}

## Citation

```bibtex
{citation.strip()}
```
"""
    path = Path(output_dir) / "README.md"
    path.write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body)
    return path


def push_folder_to_hub(output_dir: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload a built dataset folder (data shards + card + summary) to a Hub dataset repo."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private)
    api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, repo_type="dataset")
    return f"https://huggingface.co/datasets/{repo_id}"



# ---------------------------------------------------------------------------------------------
# command-line plumbing shared by dataset_scripts/build_*.py
# ---------------------------------------------------------------------------------------------
def add_output_arguments(parser: "argparse.ArgumentParser", embed_images: bool = True) -> None:
    """The flags every builder takes: output folder, sample cap, Hub upload, sharding, overwrite."""
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--max-samples", type=int, default=None, help="at most N rows per split")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload to this Hub dataset repo")
    if embed_images:
        parser.add_argument("--no-embed-images", action="store_true", help="store image paths instead of bytes")
    parser.add_argument("--max-rows-per-shard", type=int, default=5000)
    parser.add_argument("--max-shard-mb", type=float, default=256.0)
    parser.add_argument("--overwrite", action="store_true", help="delete earlier output instead of resuming")


def run_builder(parse_args, build, argv: list[str] | None = None) -> "BuildSummary":
    """A builder's `main`: parse, build, print the summary and the rows per split, push if asked."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv  # recorded in the dataset card's build command
    summary = build(args)
    print(summary.report())
    print(split_num_rows(args.output_dir))
    if args.push_to_hub:
        print("pushed to", push_folder_to_hub(args.output_dir, args.push_to_hub))
    return summary

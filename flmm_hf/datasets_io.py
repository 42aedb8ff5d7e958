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
- :class:`BuildManifest`: ``build_manifest.json``, the files a build wrote and a fingerprint of
  its inputs and arguments; only those files are ever replaced or deleted, and a rerun resumes
  only a build with the same fingerprint.

Library-only: nothing here is needed by the Hub custom code.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

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


def resolve_inside(folder: str | os.PathLike, name: Any) -> Path:
    """``folder / name`` resolved (``..`` and symlinks followed), refused unless it stays inside ``folder``.

    Annotation files name images by ``file_name``; a ``../`` or absolute name (or a symlink in the
    folder pointing elsewhere) would otherwise read, embed and upload a file from anywhere on the
    machine. Raises ``ValueError`` saying why; the message holds ``name`` but no resolved path,
    since builders keep skip details in the published ``build_summary.json``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"file name {name!r} is not a non-empty string")
    root = Path(folder).resolve()
    try:
        path = (root / name).resolve()
    except (OSError, ValueError) as err:  # e.g. an embedded NUL byte, a symlink loop
        raise ValueError(f"file name {name!r} cannot be resolved ({err})") from None
    if path == root or not path.is_relative_to(root):
        raise ValueError(f"file name {name!r} leads outside the folder (after resolving '..' and symlinks)")
    return path


def check_image_file(path: Path, height: int, width: int) -> str | None:
    """None if ``path`` decodes completely at the annotated ``height`` x ``width``; else the skip reason.

    Opening an image reads only its header, so a truncated download with a valid header would
    pass and fail later in training; the pixels are decoded here (``Image.load``), which PIL
    refuses for truncated files unless ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` was switched on.
    """
    from PIL import Image as PILImage

    if not path.is_file():
        return "image file missing"
    try:
        with PILImage.open(path) as im:
            im.load()
            w, h = im.size
    except Exception:  # noqa: BLE001 - any decode failure (truncated, corrupt, not an image) means unusable
        return "image file unreadable (truncated or corrupt)"
    if (h, w) != (height, width):
        return "image size differs from annotation"
    return None


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


# The largest real refs file (RefCOCO unc, 142k sentences) expands to a few million nodes; a
# pickle that expands to far more is shared-reference inflation ("billion laughs"), not data.
MAX_PICKLE_NODES = 50_000_000


def load_refs_pickle(
    path: str | os.PathLike, encoding: str = "latin1", max_nodes: int = MAX_PICKLE_NODES
) -> list[dict]:
    """Read a RefCOCO ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p`` file safely.

    Returns the list of ref records (``ref_id``, ``ann_id``, ``image_id``, ``split``,
    ``sentences``, ``category_id``, ...). Raises :class:`UnsafePickleError` for any
    non-container object, for a self-containing structure and for one that expands (counting
    every shared reference as often as it is referenced) to more than ``max_nodes`` nodes;
    ``ValueError`` if the top level is not a list of dicts.
    """
    refs = safe_pickle_loads(Path(path).read_bytes(), encoding=encoding)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
    return _decode_bytes(refs, max_nodes=max_nodes, source=str(path))


_CONTAINERS = (dict, list, tuple, set, frozenset)


def _children(obj: Any) -> list[Any]:
    """The objects a container refers to (dict keys and values alike)."""
    if type(obj) is dict:
        return [x for kv in obj.items() for x in kv]
    return list(obj)


def _decode_bytes(obj: Any, max_nodes: int = MAX_PICKLE_NODES, source: str = "pickle") -> Any:
    """Turn ``bytes`` left by ``encoding='bytes'`` style pickles into ``str`` throughout ``obj``.

    Pickle memo references let a few hundred bytes describe a tree of 10**30 nodes (a list
    holding the same list ten times, thirty levels deep), so the walk is iterative (no recursion
    limit), converts each distinct object once and shares the result where the input shares it,
    and refuses an input whose expanded size (what any later traversal of it would visit)
    exceeds ``max_nodes``, or that contains itself.
    """
    done: dict[int, tuple[Any, int]] = {}  # id(original) -> (converted, expanded node count)
    open_ids: set[int] = set()  # containers whose children are still being converted
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)  # every original stays alive inside `obj`, so ids are not reused
        if key in done:
            continue
        if type(node) not in _CONTAINERS:
            done[key] = (node.decode("utf-8", errors="replace") if isinstance(node, bytes) else node, 1)
            continue
        if not children_done:
            if key in open_ids:  # reached again while its own children are pending: a cycle
                raise UnsafePickleError(
                    f"{source}: the pickle holds a {type(node).__name__} that contains itself; "
                    "annotation files are trees of plain containers, re-export the file"
                )
            open_ids.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if id(child) not in done)
            continue
        kids = [done[id(child)] for child in _children(node)]
        size = 1 + sum(n for _, n in kids)
        if size > max_nodes:
            raise UnsafePickleError(
                f"{source}: the pickle expands to more than {max_nodes:,} nodes through shared "
                "references (a 'billion laughs' file, not annotations); if it is a genuine file this "
                "large, raise max_nodes of load_refs_pickle"
            )
        values = [v for v, _ in kids]
        if type(node) is dict:
            converted: Any = dict(zip(values[0::2], values[1::2]))
        else:
            converted = type(node)(values)
        open_ids.discard(key)
        done[key] = (converted, size)
    return done[id(obj)][0]


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


def rle_area(rle: dict) -> int:
    """Foreground pixel count of a storable (or pycocotools) compressed RLE."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return int(mask_utils.area({"size": [int(s) for s in rle["size"]], "counts": counts}))


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
# Build manifest: which files in the output folder a build wrote, and from what
# --------------------------------------------------------------------------------------
MANIFEST_FILE = "build_manifest.json"
MANIFEST_VERSION = 1
CARD_FILE = "README.md"


class BuildOutputError(ValueError):
    """The output folder cannot be used as asked; the message names the file and the fix."""


def _is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (both resolved, so links count)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_inputs_outside_output(output_dir: str | os.PathLike, inputs: dict[str, str | os.PathLike]) -> None:
    """Refuse any input (``{"--flag": path}``) that lies inside ``output_dir``.

    A build owns its output folder; an input in there could be replaced or deleted by a later
    ``--overwrite``, so it is refused up front, before anything is read or written.
    """
    for flag, path in inputs.items():
        if _is_inside(Path(path), Path(output_dir)):
            raise BuildOutputError(
                f"{flag} {path} lies inside --output-dir {output_dir}: a build must not write where its inputs "
                f"are. Choose an --output-dir outside the input files (e.g. a sibling folder), or move {path} out."
            )


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content, read in chunks (annotation files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_signature(folder: str | os.PathLike, names: Iterable[str]) -> str:
    """A cheap signature of many files (images): SHA-256 over their sorted names and byte sizes.

    Content hashes of a whole COCO image folder would take minutes; a replaced or missing image
    changes its size (or turns it to -1) and so the signature.
    """
    digest = hashlib.sha256()
    for name in sorted({str(n) for n in names}):  # str: a malformed record must not crash this
        path = Path(folder) / name
        size = path.stat().st_size if path.is_file() else -1
        digest.update(f"{name}\0{size}\n".encode("utf-8", errors="surrogateescape"))
    return digest.hexdigest()


def _describe_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every fingerprint entry that differs (hashes shortened)."""

    def short(value: Any) -> str:
        text = json.dumps(value)
        return text[:15] + "...\"" if isinstance(value, str) and len(value) == 64 else text

    return [
        f"{key}: {short(old.get(key))} -> {short(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


class BuildManifest:
    """``build_manifest.json``: the files a build wrote in its output folder and its fingerprint.

    Only files listed here are ever replaced or deleted (``--overwrite`` deletes exactly these,
    never the folder), so inputs, notes or a README.md of the user's in the same folder survive.
    The card and summary are listed with their SHA-256: if the user edited them since, they are
    no longer the builder's and are not replaced. The fingerprint (relevant arguments, content
    hashes of the annotation files, signatures of image folders) decides whether a rerun may
    resume: rows of a build from other inputs or arguments are never mixed with new ones.

    Use :meth:`plan` (checks only, changes nothing), then :meth:`begin` (deletes the previous
    build's files if overwriting, creates the folder) before writing.
    """

    def __init__(self, output_dir: str | os.PathLike, builder: str, fingerprint: dict) -> None:
        self.output_dir = Path(output_dir)
        self.builder = builder
        self.fingerprint = dict(fingerprint, manifest_version=MANIFEST_VERSION)
        self.files: dict[str, dict] = {}  # relative posix path -> {"sha256": ...} for card/summary
        self._previous: dict[str, dict] = {}  # files of the build found on disk
        self._previous_meta: dict = {}
        self._overwrite = False

    @property
    def path(self) -> Path:
        return self.output_dir / MANIFEST_FILE

    # ---- checks (no side effects) ---------------------------------------------------------
    @classmethod
    def plan(
        cls,
        output_dir: str | os.PathLike,
        *,
        builder: str,
        fingerprint: dict,
        inputs: dict[str, str | os.PathLike],
        overwrite: bool,
    ) -> "BuildManifest":
        """Check that ``output_dir`` can take this build; raise :class:`BuildOutputError` if not.

        Refused: an input inside the folder; a file at a name the builder writes (``README.md``,
        ``build_summary.json``, anything in ``data/``) that an earlier build did not write or that
        was edited since; without ``overwrite``, an earlier build whose fingerprint differs.
        Nothing is changed on disk.
        """
        check_inputs_outside_output(output_dir, inputs)
        self = cls(output_dir, builder, fingerprint)
        self._overwrite = overwrite
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise BuildOutputError(f"--output-dir {out} is a file, not a folder; name a folder.")
        if self.path.is_file():
            self._previous = self._read_previous()
        self._check_foreign_files()
        if self._previous and not overwrite:  # an earlier build that wrote nothing leaves nothing stale
            old = self._previous_meta
            if old.get("builder") != builder:
                raise BuildOutputError(
                    f"{out} holds a build of {old.get('builder')!r}, not of {builder!r}. Pass --overwrite to "
                    "replace it (only the files listed in its build_manifest.json are deleted) or choose "
                    "another --output-dir."
                )
            changes = _describe_changes(old.get("fingerprint", {}), self.fingerprint)
            if changes:
                raise BuildOutputError(
                    f"{out} holds a build from other inputs or arguments, and resuming would mix its rows "
                    f"with new ones. Changed: {'; '.join(changes)}. Pass --overwrite to rebuild from scratch "
                    "(deletes only the files listed in its build_manifest.json) or choose another --output-dir."
                )
            self.files = dict(self._previous)  # resuming: the earlier shards stay ours
        return self

    def _read_previous(self) -> dict[str, dict]:
        try:
            meta = json.loads(self.path.read_text())
            files = meta["files"]
            if not isinstance(files, dict):
                raise TypeError("'files' is not a mapping")
        except (ValueError, KeyError, TypeError) as err:
            raise BuildOutputError(
                f"{self.path} is not a readable build manifest ({err}), so it cannot tell which files a build "
                "wrote. Nothing was changed; delete the folder yourself or choose another --output-dir."
            ) from err
        root = self.output_dir.resolve()
        for name in files:
            # A tampered or hand-edited manifest must not lead a deletion outside the folder.
            target = (root / name).resolve()
            if Path(name).is_absolute() or ".." in Path(name).parts or root not in target.parents:
                raise BuildOutputError(
                    f"{self.path} lists {name!r}, a path outside the output folder; a build never writes there, "
                    "so the manifest was edited. Nothing was changed; fix or remove that entry."
                )
        self._previous_meta = meta
        return {str(k): dict(v or {}) for k, v in files.items()}

    def _check_foreign_files(self) -> None:
        """Refuse files at the builder's names that are not (or no longer) the builder's."""
        out = self.output_dir
        owned = self._previous
        candidates = [out / CARD_FILE, out / SUMMARY_FILE]
        if (out / DATA_DIR).is_dir():
            # load_dataset(folder) reads data/<split>-*: a stranger's file there would join the data.
            candidates += sorted(p for p in (out / DATA_DIR).rglob("*") if not p.is_dir())
        for path in candidates:
            if not (path.exists() or path.is_symlink()):
                continue
            name = path.relative_to(out).as_posix()
            if name not in owned:
                raise BuildOutputError(
                    f"{path} was not written by a build of this folder (it is not in {MANIFEST_FILE}), and the "
                    f"builder would {'replace' if path.parent == out else 'load it as data beside'} it. Nothing "
                    "was changed: move it elsewhere or choose another --output-dir."
                )
            recorded = owned[name].get("sha256")
            if recorded is not None and (not path.is_file() or file_sha256(path) != recorded):
                raise BuildOutputError(
                    f"{path} was edited after the build wrote it, so it is no longer the builder's to replace. "
                    "Nothing was changed: move your version elsewhere (or delete it) and rerun."
                )

    # ---- changes ---------------------------------------------------------------------------
    def begin(self) -> None:
        """Make the folder ready: with ``overwrite``, delete the files the previous build wrote."""
        if self._overwrite and self._previous:
            removed = 0
            for name in self._previous:
                path = self.output_dir / name
                if path.is_file() or path.is_symlink():
                    path.unlink()
                    removed += 1
            logger.info("--overwrite: deleted the %d files of the previous build in %s", removed, self.output_dir)
            data = self.output_dir / DATA_DIR
            if data.is_dir() and not any(data.iterdir()):
                data.rmdir()
            self.files = {}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self) -> None:
        """Write the manifest atomically (an interrupted run keeps a valid list of its files)."""
        meta = {"builder": self.builder, "fingerprint": self.fingerprint, "files": self.files}
        tmp = self.output_dir / f".{MANIFEST_FILE}.tmp"
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def _name(self, path: str | os.PathLike) -> str:
        # abspath, not resolve: a link in the folder is named by where it sits, not where it points
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(self.output_dir)).as_posix()

    def owns(self, name: str) -> bool:
        """Whether the relative path ``name`` was written by this build (or the one it resumes)."""
        return name in self.files

    def record(self, path: str | os.PathLike, *, content_hash: bool = False) -> None:
        """Add a file this build wrote (call before it appears, so a crash cannot orphan it)."""
        name = self._name(path)
        self.files[name] = {"sha256": file_sha256(path)} if content_hash and Path(path).is_file() else {}
        self.save()

    def forget(self, path: str | os.PathLike) -> None:
        """Drop a file from the list (a temporary file that was renamed)."""
        name = self._name(path)
        if self.files.pop(name, None) is not None:
            self.save()

    def write_text(self, name: str, text: str) -> Path:
        """Write a small builder file (card, summary) if it is absent or the builder's own."""
        path = self.output_dir / name
        if (path.exists() or path.is_symlink()) and not self.owns(name):
            raise BuildOutputError(
                f"{path} exists and was not written by this build; not replacing it. Move it elsewhere or "
                "choose another --output-dir."
            )
        self.record(path)  # listed first: a crash mid-write leaves a file still known as ours
        if path.is_symlink():
            path.unlink()  # write a file of our own, never through a link into someone else's
        path.write_text(text)
        self.record(path, content_hash=True)
        return path


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

    def save(self, output_dir: str | os.PathLike, manifest: "BuildManifest | None" = None) -> Path:
        """Write ``build_summary.json`` next to the data (through ``manifest`` when given).

        Without a manifest an existing file is never replaced (it may not be the builder's).
        """
        text = json.dumps(self.to_dict(), indent=1)
        if manifest is not None:
            return manifest.write_text(SUMMARY_FILE, text)
        return _write_new(Path(output_dir) / SUMMARY_FILE, text)


# --------------------------------------------------------------------------------------
# Sharded Parquet writing
# --------------------------------------------------------------------------------------
def _write_new(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` unless a file is already there (whose it is is unknown)."""
    if path.exists():
        raise BuildOutputError(
            f"{path} exists and nothing records that a build wrote it; not replacing it. Move it elsewhere "
            "or build through the dataset_scripts/ builders, which keep a build manifest."
        )
    path.write_text(text)
    return path


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
    makes ``load_dataset`` decode images; rows are encoded with it. With a ``manifest`` (what the
    builders pass), only shards it lists count as earlier rows, and every shard (and temporary
    file) is recorded there before it is written, so ``--overwrite`` can delete exactly these.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        split: str,
        features: Any,
        key_column: str,
        max_rows_per_shard: int = 10_000,
        max_bytes_per_shard: int = 256 * 1024 * 1024,
        manifest: "BuildManifest | None" = None,
    ) -> None:
        self.manifest = manifest
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
            if manifest is None or manifest.owns(f"{DATA_DIR}/{tmp.name}"):
                tmp.unlink()
                if manifest is not None:
                    manifest.forget(tmp)
        self.existing_shards = sorted(
            p for p in self.data_dir.glob(f"{split}-*.parquet")
            if manifest is None or manifest.owns(f"{DATA_DIR}/{p.name}")
        )
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
        if final.exists() and (self.manifest is None or not self.manifest.owns(f"{DATA_DIR}/{final.name}")):
            raise BuildOutputError(f"{final} exists and was not written by this build; not replacing it.")
        if self.manifest is not None:
            self.manifest.record(tmp)  # listed before it exists: a crash cannot leave an unowned file
            self.manifest.record(final)
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        if self.manifest is not None:
            self.manifest.forget(tmp)
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
    manifest: "BuildManifest | None" = None,
) -> Path:
    """Write ``README.md`` with the YAML metadata ``datasets`` and the Hub understand.

    The YAML lists one ``default`` config whose splits point at ``data/<split>-*`` (so
    ``load_dataset(folder)`` needs no code), ``dataset_info`` with features and split sizes,
    the license and tags. The body says what the rows are, how they were built and the citation.
    With ``manifest`` the card is written only if ``README.md`` is absent or the builder's own
    (unedited); without one an existing ``README.md`` is never replaced.
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
    text = "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body
    if manifest is not None:
        return manifest.write_text(CARD_FILE, text)
    return _write_new(Path(output_dir) / CARD_FILE, text)


def push_folder_to_hub(output_dir: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload a built dataset folder (data shards + card + summary) to a Hub dataset repo.

    With a build manifest only the files the build wrote are uploaded (not the manifest, which
    holds local paths, nor anything else the user keeps in the folder).
    """
    from huggingface_hub import HfApi

    allow = None
    manifest_path = Path(output_dir) / MANIFEST_FILE
    if manifest_path.is_file():
        allow = sorted(n for n in json.loads(manifest_path.read_text())["files"]
                       if (Path(output_dir) / n).is_file() and not Path(n).name.startswith("."))
    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private)
    api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, repo_type="dataset", allow_patterns=allow)
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
    parser.add_argument(
        "--overwrite", action="store_true",
        help="rebuild from scratch: delete the files an earlier build wrote (listed in build_manifest.json; "
        "nothing else) instead of resuming",
    )


def read_json_input(path: Path, flag: str) -> Any:
    """Parse an input JSON file; a parse error names the flag, the file and where it broke.

    ``json.loads`` alone says only "Expecting value: line 1 column 5", not which of the several
    input files is broken (typically a truncated download).
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{flag} {path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}). "
            "Check that it is the complete, unmodified file (downloads get cut off); fetch it again."
        ) from None


def start_build(
    args: "argparse.Namespace", builder: str, inputs: dict[str, Path], fingerprint: dict
) -> BuildManifest:
    """Check ``args.output_dir`` for this build (see :meth:`BuildManifest.plan`), then prepare it.

    Call after the inputs were read (so a bad input leaves an earlier build untouched) and before
    anything is written. ``fingerprint`` holds what decides the rows; ``--no-embed-images`` is
    added here when the builder has it.
    """
    fingerprint = dict(fingerprint)
    if hasattr(args, "no_embed_images"):
        fingerprint["--no-embed-images"] = bool(args.no_embed_images)
    manifest = BuildManifest.plan(
        args.output_dir, builder=builder, fingerprint=fingerprint, inputs=inputs, overwrite=args.overwrite
    )
    manifest.begin()
    return manifest


def run_builder(parse_args, build, argv: list[str] | None = None) -> "BuildSummary":
    """A builder's `main`: parse, build, print the summary and the rows per split, push if asked."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv  # recorded in the dataset card's build command
    try:
        summary = build(args)
    except BuildOutputError as err:
        if not from_command_line:
            raise
        raise SystemExit(f"error: {err}") from None  # a refusal with its fix, not a traceback
    print(summary.report())
    print(split_num_rows(args.output_dir))
    if args.push_to_hub:
        print("pushed to", push_folder_to_hub(args.output_dir, args.push_to_hub))
    return summary

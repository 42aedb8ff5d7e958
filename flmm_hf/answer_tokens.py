"""How an answer text becomes the tokens after the prompt, and which phrase each token grounds.

Two encodings, one per `FLMMProcessor` mode:

- **piece-wise** (reproduction mode; the original F-LMM's): the answer is a sequence of
  `Piece`s, character spans of the answer text. Each piece is encoded ALONE with
  `tokenizer.encode(piece_text, add_special_tokens=False)` and the ids are concatenated; the text
  between pieces (joining spaces) is not encoded. A piece marked `last_token_only` contributes
  only the last id of its encoding: the original appends `tokenizer.encode('.',
  add_special_tokens=False)[-1]` after each RefCOCO expression. A piece whose visible
  characters lie inside phrase k gives ALL its tokens to phrase k (a lone `▁` that sentencepiece
  puts before a leading digit included), as the original's `mask_ids` do; the tokens of any
  other piece are assigned by character overlap. With llava-1.5's tokenizer this differs from
  tokenising the joined string: `"." -> ▁.` (869) instead of `.` (29889), no `e.` + `.` -> `..`
  or `)` + `.` -> `).` merges, and the lone `▁` is kept.
- **joint** (native mode): prompt and answer are tokenised as one string, as the LMM would have
  generated the answer; a token grounds phrase k if its characters overlap phrase k's.

Library and Hub code: imports only torch and transformers' logging, like `processing_flmm.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

logger = logging.getLogger(__name__)


class Piece(NamedTuple):
    """One separately encoded part of an answer: `text[start:end]` (see the module docstring)."""

    start: int
    end: int
    last_token_only: bool = False


PieceSpec = Any
"""A piece as given: a `Piece`, or a `(start, end)` / `(start, end, last_token_only)` tuple or list."""


def as_pieces(text: str, pieces: Sequence[PieceSpec] | None, example: int = 0) -> list[Piece]:
    """`pieces` checked against `text`; None -> the whole answer as one piece (empty answer: none).

    Pieces must be in order, not overlap, lie inside the text, and leave no visible character
    outside every piece (it would silently not be encoded): otherwise `ValueError`.
    """
    if pieces is None:
        return [Piece(0, len(text))] if text else []
    result, cursor = [], 0
    for j, spec in enumerate(pieces):
        if not isinstance(spec, (tuple, list)) or len(spec) not in (2, 3):
            raise ValueError(f"example {example}: piece {j} must be (start, end[, last_token_only]), got {spec!r}")
        piece = Piece(int(spec[0]), int(spec[1]), bool(spec[2]) if len(spec) == 3 else False)
        if not cursor <= piece.start < piece.end <= len(text):
            raise ValueError(
                f"example {example}: piece {j} {tuple(piece[:2])} is empty, outside the text (length {len(text)}) "
                f"or overlaps the previous piece (which ends at {cursor}); pieces are ordered (start, end) spans"
            )
        _check_gap(text, cursor, piece.start, example)
        result.append(piece)
        cursor = piece.end
    _check_gap(text, cursor, len(text), example)
    return result


def _check_gap(text: str, start: int, end: int, example: int) -> None:
    if text[start:end].strip():
        raise ValueError(
            f"example {example}: the text {text[start:end]!r} at {start}:{end} is in no piece and would not be "
            "encoded; add a piece for it"
        )


def encode_pieces(
    tokenizer: Any, text: str, spans: Sequence[tuple[int, int]], pieces: Sequence[Piece], example: int = 0
) -> tuple[list[int], list[int]]:
    """Piece-wise encoding of `text`: its token ids and, per token, the phrase index (-1: none).

    `spans` are the phrases' `(start, end)` in `text` (whitespace-trimmed, as `match_phrases` gives).
    """
    ids: list[int] = []
    phrase_of_token: list[int] = []
    covered: list[list[tuple[int, int]]] = [[] for _ in spans]  # characters of each phrase's tokens
    for piece in pieces:
        piece_text = text[piece.start:piece.end]
        encoding = tokenizer(piece_text, add_special_tokens=False, return_offsets_mapping=True)
        piece_ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
        if piece.last_token_only:
            piece_ids, offsets = piece_ids[-1:], offsets[-1:]
        owner = _owning_phrase(piece_text, piece.start, spans)
        for token_id, (s, e) in zip(piece_ids, offsets):
            s, e = s + piece.start, e + piece.start
            if owner is not None:
                k = owner
            else:
                k = _overlapping_phrase(text, s, e, spans, example)
            ids.append(token_id)
            phrase_of_token.append(k)
            if k >= 0:
                covered[k].append((s, e))
    check_phrase_coverage(text, spans, covered, example)
    return ids, phrase_of_token


def _owning_phrase(piece_text: str, piece_start: int, spans: Sequence[tuple[int, int]]) -> int | None:
    """The phrase whose span holds every visible character of the piece, if one does."""
    lo = piece_start + (len(piece_text) - len(piece_text.lstrip()))
    hi = piece_start + len(piece_text.rstrip())
    for k, (ps, pe) in enumerate(spans):
        if ps <= lo and hi <= pe:
            return k
    return None


def _overlapping_phrase(text: str, start: int, end: int, spans: Sequence[tuple[int, int]], example: int) -> int:
    """The phrase a token of characters `start:end` overlaps (-1: none); an error if several."""
    hits = [k for k, (ps, pe) in enumerate(spans) if start < pe and end > ps and start < end]
    if len(hits) > 1:
        raise ValueError(
            f"example {example}: token {text[start:end]!r} overlaps phrases {hits}; "
            "phrases must be separated by at least a token boundary"
        )
    return hits[0] if hits else -1


def encode_joint(
    tokenizer: Any, full_text: str, answer_start: int, spans: Sequence[tuple[int, int]], example: int = 0
) -> tuple[list[int], list[int]]:
    """Joint encoding: token ids of the answer part of `full_text` and, per token, the phrase index.

    `full_text` (prompt + answer) is tokenised once, with the image placeholder unexpanded (it is
    one special token, so the text around it tokenises as in the backbone's expanded string); the
    answer part = the tokens from the first one ending after `answer_start`. `spans` are the
    phrases in `full_text` coordinates. A token belongs to phrase k if its characters overlap
    phrase k's (sentencepiece `▁` / byte-level `Ġ` spaces are part of a token's span, not of the
    phrase, so a space never decides).
    """
    if answer_start >= len(full_text):
        return [], []
    encoding = tokenizer(full_text, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    first = next((i for i, (s, e) in enumerate(offsets) if e > answer_start), len(ids))
    phrase_of_token = [_overlapping_phrase(full_text, s, e, spans, example) for s, e in offsets[first:]]
    covered: list[list[tuple[int, int]]] = [[] for _ in spans]
    for (s, e), k in zip(offsets[first:], phrase_of_token):
        if k >= 0:
            covered[k].append((s, e))
    check_phrase_coverage(full_text, spans, covered, example)
    return list(ids[first:]), phrase_of_token


def check_phrase_coverage(
    text: str, spans: Sequence[tuple[int, int]], covered: Sequence[Sequence[tuple[int, int]]], example: int
) -> None:
    """`ValueError` for a phrase without tokens; a warning when its tokens cover more than the phrase."""
    for k, (ps, pe) in enumerate(spans):
        if not covered[k]:
            raise ValueError(f"example {example}: phrase {k} {text[ps:pe]!r} has no token")
        lo, hi = min(s for s, _ in covered[k]), max(e for _, e in covered[k])
        while lo < hi and text[lo].isspace():
            lo += 1
        if (lo, hi) != (ps, pe):
            # The phrase starts/ends inside a token ("man" in "woman"): the token is kept whole,
            # so the grounded tokens decode to more than the phrase.
            logger.warning(
                "example %d: phrase %d %r does not fall on token boundaries; its tokens cover %r",
                example, k, text[ps:pe], text[lo:hi],
            )


# ---------------------------------------------------------------------- batches
def token_aligned_keys(data: Mapping[str, Any]) -> list[str]:
    """The keys of a backbone processor's output with one value per token ([B, L] tensors).

    `input_ids`, `attention_mask`, `phrase_ids` and any `*token_type_ids` (PaliGemma/Gemma3's
    `token_type_ids`, multimodal `mm_token_type_ids`); image tensors are never token-aligned.
    """
    input_ids = data["input_ids"]
    names = [k for k in data if k in ("input_ids", "attention_mask", "phrase_ids") or k.endswith("token_type_ids")]
    return [k for k in names if torch.is_tensor(data[k]) and data[k].shape[:2] == input_ids.shape[:2]]


def pack_rows(rows: Sequence[Mapping[str, torch.Tensor]], pad_values: Mapping[str, int], left: bool) -> dict[str, torch.Tensor]:
    """Per-example token rows (dicts of 1-D tensors of one length each) -> padded `[B, L]` tensors.

    Padding goes left or right (`left`) with `pad_values[key]` (0 for keys not named).
    """
    length = max(len(row["input_ids"]) for row in rows)
    out: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        first = rows[0][key]
        tensor = torch.full((len(rows), length) + tuple(first.shape[1:]), pad_values.get(key, 0), dtype=first.dtype)
        for b, row in enumerate(rows):
            n = len(row[key])
            if left:
                tensor[b, length - n:] = row[key]
            else:
                tensor[b, :n] = row[key]
        out[key] = tensor
    return out


__all__ = [
    "Piece",
    "as_pieces",
    "check_phrase_coverage",
    "encode_joint",
    "encode_pieces",
    "pack_rows",
    "token_aligned_keys",
]

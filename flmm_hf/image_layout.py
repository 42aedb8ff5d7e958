"""Where the image tokens of each backbone family sit, and the one registry of backbone families.

F-LMM reads attention from text tokens to image tokens and reshapes the image axis to the
image's spatial grid. Every backbone family lays its image tokens out differently, so each
family gets one small adapter (an :class:`ImageLayout`) that answers, for one example:

* ``grids(input_ids, image_inputs)`` -> a list of ``num_grids`` LongTensors ``[h_g, w_g]``
  holding the SEQUENCE POSITIONS of the image tokens, row-major in image geometry
  (``grid[r, c]`` is the position of the token that looks at row ``r``, column ``c``);
* ``num_grids``: constant per backbone config, so the mask head's input width is fixed;
* ``main_grid``: the index of the grid whose size every grid is resized to by
  :meth:`ImageLayout.stack` / :func:`stack_grids` (channels are concatenated in grid order).

Image tokens are ``input_ids == image_token_id(config)`` (``image_token_id``, or
``image_token_index`` in older configs; for Gemma3 it is the id of the MODEL config, not the
processor's boi token).

Grid -> original image. Every grid of every family spans the whole *canvas* the LMM saw
(``canvas_sizes`` in the processor output: the letterboxed square in reproduction mode, the
original image for dynamic-resolution processors): cell ``(r, c)`` of an ``h x w`` grid covers
``[r * H / h, (r + 1) * H / h) x [c * W / w, (c + 1) * W / w)`` of a canvas ``H x W``. This holds
because the tiles of the tiled families partition the resized image, the global / thumbnail /
base views are the whole image resized, and the dynamic-resolution families resize the whole
image (to multiples of their patch size, so the mapping is exact up to that rounding;
LLaVA-NeXT's un-padded grid is exact up to the one-cell rounding of ``unpad_image``).

``image_inputs`` of one example is a mapping holding that example's row of the per-image
inputs the family needs (``image_sizes``, ``image_grid_thw``, ``original_sizes``,
``image_rows`` / ``image_cols``, ``tile_grid``, ``image_merge_sizes``, ``tile_fine_mask``); :func:`example_image_inputs` picks them
from a batch.

Several images per example. ``grids`` lays out ONE image. An example may hold several images (a reference and
a target); then the batch carries ``num_images`` ([B], images per example, in sequence order) and
``image_index`` ([B], the image each example's phrases are grounded in; FLMMProcessor's default is the last
image), the per-image keys of :data:`PER_IMAGE_KEYS` hold one row per image of the whole batch (all images of
example 0, then example 1, ...), and :meth:`ImageLayout.example_grids` finds the grounded image's block among the
example's image blocks (:meth:`ImageLayout.image_blocks`, counted by the family's placeholder structure) and lays
out that block alone; the other images' tokens stay in the sequence as context. Families whose blocks cannot be
told apart yet refuse several images with a ValueError (:func:`several_image_layouts` names the model types that
accept them).

Video as time x grid. Qwen2-VL and Qwen2.5-VL (:data:`VIDEO_GRID_MODEL_TYPES`) lay a video's tokens out as
``t`` temporal slices (each merging ``temporal_patch_size`` frames) of one ``(h / m) x (w / m)`` grid, from
``video_grid_thw``. With ``video_frame`` t >= 0 an example's phrases are grounded in slice t of its one video
(:meth:`ImageLayout.frame_grids`): one grid, so one mask per phrase for that frame group; ground every slice by
asking once per t. Every other family refuses ``video_frame`` with a ValueError; their video tokens (another
placeholder id) stay context when an image is grounded.

Families. :data:`FAMILIES` maps a config's ``model_type`` to a :class:`Family`: its layout
factory (``config -> ImageLayout``; None when F-LMM has no adapter for it yet) and the traits
of its processor that ``FLMMProcessor`` needs (``dynamic_resolution``: the processor resizes or
tiles images itself, so they are not letterboxed and the canvas is the original image). To
support a new family: subclass :class:`ImageLayout`, implement ``grids`` and call
:func:`register_family` (or :func:`register_image_layout` for the layout alone).

Support. :data:`REFUSED` gives the one-line reason for each model type F-LMM does not support
(Q-Former, encoder-decoder, cross-attention, discrete image tokens, or no adapter yet), and
:func:`backbone_support` answers every model type of the installed transformers'
``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`` from the two registries (``docs/backbones.md``
is its table). :func:`get_image_layout` refuses a model type of that mapping without a layout;
its square-grid fallback is only for model types outside it.
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from transformers.utils import logging


logger = logging.get_logger(__name__)

# per-example image inputs an adapter may read (everything else, e.g. pixel_values, is ignored)
PER_EXAMPLE_KEYS = (
    "image_sizes",
    "image_grid_thw",
    "original_sizes",
    "image_rows",
    "image_cols",
    "rows",  # Idefics3/SmolVLM image processors' names for image_rows / image_cols
    "cols",
    "tile_grid",
    "image_merge_sizes",  # VideoLLaMA3: the spatial merge of each image (1 for images by default)
    "tile_fine_mask",  # Granite-Docling: the example's tiles take the fine connector path (4x the tokens)
    "video_grid_thw",  # Qwen-VL videos: (t, h, w), one row per VIDEO; read only with video_frame (then one per example)
    "video_frame",  # the temporal slice (frame group) of that video the phrases are grounded in; -1: none
)

# keys with one row per IMAGE of the batch (images of all examples concatenated in order); the others of
# PER_EXAMPLE_KEYS have one row per example (original_sizes: the grounded image's size; Idefics3's rows/cols are
# nested per example)
PER_IMAGE_KEYS = ("image_sizes", "image_grid_thw", "image_rows", "image_cols", "tile_grid", "image_merge_sizes")

# a token id no vocabulary has: other images' tokens are masked with it so that grids() sees one image
_MASKED_ID = -1

# families whose videos are laid out as time x grid (frame_grids); tested with a painted frame in tests/
VIDEO_GRID_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def image_token_id(config) -> int:
    """The image placeholder id of a multimodal config (``image_token_id`` or ``image_token_index``)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(
        f"The {getattr(config, 'model_type', type(config).__name__)!r} config has no image_token_id / "
        "image_token_index: cannot find its image tokens."
    )


def _row(value) -> list[int]:
    """One example's row of a per-image input as a flat list of ints; rejects several images."""
    t = torch.as_tensor(value)
    if t.dim() > 1:
        if t.shape[0] != 1:
            raise ValueError(
                f"Got image inputs for {t.shape[0]} images in one example where one image per example is laid out; "
                "several images need num_images and image_index (FLMMProcessor gives them)."
            )
        t = t[0]
    return [int(v) for v in t.reshape(-1).tolist()]


def _image_positions(input_ids: torch.Tensor, token_id: int) -> torch.LongTensor:
    if input_ids.dim() != 1:
        raise ValueError(f"grids() takes one example's input_ids [L], got shape {tuple(input_ids.shape)}")
    return torch.nonzero(input_ids == token_id).flatten()


def _check_count(model_type: str, found: int, expected: int, detail: str = "") -> None:
    """Clear errors for a placeholder count that does not match what the image inputs imply."""
    if found == expected:
        return
    if expected > 0 and found > expected and found % expected == 0:
        raise ValueError(
            f"{model_type}: the example has {found} image tokens, {found // expected} times the {expected} "
            "of one image; one image per example is laid out unless the inputs give num_images (FLMMProcessor "
            "does for several images per example)."
        )
    raise ValueError(
        f"{model_type}: token count mismatch: input_ids hold {found} image tokens but the image inputs "
        f"give {expected}{' (' + detail + ')' if detail else ''}."
    )


def _count_runs(input_ids: torch.Tensor, token_id: int) -> int:
    """Number of maximal runs of consecutive image tokens."""
    is_img = (input_ids == token_id).long()
    starts = is_img.clone()
    starts[1:] = is_img[1:] & (1 - is_img[:-1])
    return int(starts.sum())


def _tile_grid_from_aspect(n_tiles: int, original_size: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) with rows * cols == n_tiles whose aspect ratio cols/rows is closest to W/H.

    Tiling processors (InternVL's GotOcr2 ``crop_to_patches``, Idefics3's splitting) choose the
    tile grid from the image's aspect ratio; given the number of tiles they produced, the chosen
    grid is the factorisation closest in (log) aspect ratio. Used when the processor output
    carries no explicit row/column counts.
    """
    h, w = (float(v) for v in original_size)
    target = math.log(w / h)
    pairs = [(r, n_tiles // r) for r in range(1, n_tiles + 1) if n_tiles % r == 0]
    return min(pairs, key=lambda rc: (abs(math.log(rc[1] / rc[0]) - target), rc[0]))


def _stitch(tiles: list[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """Row-major tiles [s, s] -> one [rows*s, cols*s] grid."""
    return torch.cat([torch.cat(tiles[r * cols : (r + 1) * cols], dim=1) for r in range(rows)], dim=0)


def stack_grids(maps_per_grid: Sequence[torch.Tensor], main_grid: int = 0) -> torch.Tensor:
    """Resize every grid's maps to the main grid's size and concatenate their channels.

    Args:
        maps_per_grid: one tensor ``[K, C, h_g, w_g]`` per grid (K phrases, C = layers*heads).
        main_grid: index of the grid whose ``(h, w)`` the others are resized to.

    Returns:
        ``[K, num_grids * C, h, w]``, channels in grid order. Resizing is bilinear with
        ``align_corners=False`` (as the reference does for LLaVA-NeXT); the main grid is untouched.
    """
    if not maps_per_grid:
        raise ValueError("stack_grids needs at least one grid")
    size = tuple(maps_per_grid[main_grid].shape[-2:])
    out = []
    for maps in maps_per_grid:
        if maps.dim() != 4:
            raise ValueError(f"each grid's maps must be [K, C, h, w], got shape {tuple(maps.shape)}")
        if tuple(maps.shape[-2:]) != size:
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        out.append(maps)
    return torch.cat(out, dim=1)


def images_per_example(inputs: Mapping[str, Any], batch_size: int) -> list[int]:
    """How many images each example of a batch holds: ``inputs["num_images"]``, else one each.

    Checks that every per-image key (:data:`PER_IMAGE_KEYS`) has one row per image, so that a batch with
    several images per example but no ``num_images`` is refused instead of read with the wrong rows.
    """
    given = inputs.get("num_images")
    counts = [1] * batch_size if given is None else [int(n) for n in torch.as_tensor(given).reshape(-1).tolist()]
    if len(counts) != batch_size or min(counts, default=1) < 1:
        raise ValueError(f"num_images must give each of the {batch_size} examples at least one image, got {counts}")
    for key in PER_IMAGE_KEYS:
        value = inputs.get(key)
        if value is not None and len(value) != sum(counts):
            hint = ("several images per example need num_images ([B], images per example; FLMMProcessor gives it)"
                    if given is None else "num_images does not match the image inputs")
            raise ValueError(
                f"the batch holds {len(value)} rows of {key} for {sum(counts)} images ({batch_size} examples): {hint}."
            )
    return counts


def example_image_inputs(
    inputs: Mapping[str, Any], index: int, num_images: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Example ``index``'s image inputs that a layout reads (see PER_EXAMPLE_KEYS).

    Args:
        inputs: the batch (per-image keys with one row per image, others one row per example).
        index: the example.
        num_images: images per example (:func:`images_per_example`); None: one image per example.

    Returns:
        the example's row of every per-example key; with ``num_images``, its images' rows ``[n, ...]`` of every
        per-image key plus ``num_images`` (n) and ``image_index`` (the grounded image, in ``[0, n)``; from
        ``inputs["image_index"]``, default the last image), which :meth:`ImageLayout.example_grids` reads.
    """
    out = {}
    skip = _unread_video_keys(inputs)
    if num_images is None:
        for key in PER_EXAMPLE_KEYS:
            value = inputs.get(key)
            if value is not None and key not in skip:
                out[key] = torch.as_tensor(value)[index]
        return out
    start, n = sum(num_images[:index]), num_images[index]
    for key in PER_EXAMPLE_KEYS:
        value = inputs.get(key)
        if value is not None and key not in skip:
            value = torch.as_tensor(value)
            out[key] = value[start : start + n] if key in PER_IMAGE_KEYS else value[index]
    if inputs.get("video_frame") is not None:
        out["video_frame"] = torch.as_tensor(inputs["video_frame"]).reshape(-1)[index]
    chosen = inputs.get("image_index")
    k = n - 1 if chosen is None else int(torch.as_tensor(chosen).reshape(-1)[index])
    if not -n <= k < n:
        raise ValueError(f"example {index}: image_index {k} is out of range for its {n} image(s)")
    out["num_images"], out["image_index"] = torch.tensor(n), torch.tensor(k % n)
    return out


def _unread_video_keys(inputs: Mapping[str, Any]) -> tuple[str, ...]:
    """``("video_grid_thw",)`` when no example grounds in a video frame, else ``()`` after checking its rows.

    The backbone gives ``video_grid_thw`` one row per VIDEO, not per example: without a ``video_frame`` >= 0 it is
    never read (an example without a video would take another example's row); with one, every example must hold
    exactly one video, so that row ``b`` is example ``b``'s.
    """
    grid, frames = inputs.get("video_grid_thw"), inputs.get("video_frame")
    if grid is None:
        return ()
    frames = None if frames is None else torch.as_tensor(frames).reshape(-1)
    if frames is None or not bool((frames >= 0).any()):
        return ("video_grid_thw",)
    if len(grid) != len(frames):
        raise ValueError(
            f"video_frame needs one video per example: video_grid_thw has {len(grid)} rows for {len(frames)} "
            "examples. Fix: batch the examples grounded in a video frame apart, each with its one video."
        )
    return ()


def _split_by_counts(pos: torch.Tensor, counts: Sequence[int], model_type: str) -> list[torch.Tensor]:
    """An example's image-token positions cut into consecutive blocks of the given sizes, one per image."""
    if sum(counts) != pos.numel():
        raise ValueError(
            f"{model_type}: token count mismatch: input_ids hold {pos.numel()} image tokens but the "
            f"{len(counts)} images' inputs give {' + '.join(map(str, counts))} = {sum(counts)}."
        )
    return list(pos.split(list(counts)))


def _runs(input_ids: torch.Tensor, token_id: int) -> list[torch.Tensor]:
    """Positions of each maximal run of consecutive image tokens, in order."""
    pos = _image_positions(input_ids, token_id)
    if pos.numel() == 0:
        return []
    breaks = torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1
    return list(pos.tensor_split(breaks))


# --------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------
class ImageLayout:
    """Base adapter: one backbone config's image-token geometry.

    Attributes:
        model_type: the config's ``model_type``.
        image_token_id: the placeholder id of image tokens.
        num_grids: grids returned per example (constant for a config).
        main_grid: index of the grid the others are resized to by :meth:`stack`.
        grid_names: a short name per grid, for documentation and debugging.
    """

    num_grids: int = 1
    main_grid: int = 0
    grid_names: tuple[str, ...] = ("image",)

    def __init__(self, config):
        self.config = config
        self.model_type = getattr(config, "model_type", type(config).__name__)
        self.image_token_id = image_token_id(config)

    def grids(self, input_ids: torch.Tensor, image_inputs: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Sequence positions of one example's image tokens (ONE image): ``num_grids`` LongTensors [h_g, w_g]."""
        raise NotImplementedError

    def example_grids(self, input_ids: torch.Tensor, image_inputs: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """:meth:`grids` of the grounded image of one example that may hold several images.

        ``image_inputs`` as :func:`example_image_inputs` gives them: without ``num_images`` (or with 1) this is
        :meth:`grids`. With several images, the example's image tokens are cut into one block per image
        (:meth:`image_blocks`), the other images' tokens are hidden from :meth:`grids` and the per-image keys cut
        to the grounded image's row, so the returned positions are those of image ``image_index`` alone.
        """
        image_inputs = dict(image_inputs or {})
        n = int(image_inputs.pop("num_images", 1))
        k = int(image_inputs.pop("image_index", n - 1))
        if n == 1:
            return self.grids(input_ids, image_inputs)
        blocks = self.image_blocks(input_ids, image_inputs, n)
        if len(blocks) != n:
            raise ValueError(f"{self.model_type}: found {len(blocks)} image blocks in an example with {n} images")
        masked = input_ids.clone()
        others = torch.cat([b for i, b in enumerate(blocks) if i != k])
        masked[others] = _MASKED_ID
        one = {key: (value[k] if key in PER_IMAGE_KEYS else value) for key, value in image_inputs.items()}
        return self.grids(masked, one)

    video_token_id: int | None = None
    """The placeholder id of video tokens, for layouts that ground in video frames (:meth:`frame_grids`)."""

    def frame_grids(self, input_ids: torch.Tensor, video_inputs: Mapping[str, torch.Tensor], frame: int) -> list[torch.Tensor]:
        """Sequence positions of temporal slice ``frame`` of one example's video: ``num_grids`` LongTensors.

        The base class refuses: only :data:`VIDEO_GRID_MODEL_TYPES` lay video tokens out per frame group.
        """
        raise ValueError(
            f"{self.model_type}: grounding in a video frame (video_frame={frame}) is not supported; only "
            f"{', '.join(VIDEO_GRID_MODEL_TYPES)} lay out video tokens as time x grid. Fix: ground in an image "
            "(e.g. the frame itself, passed as an image), or drop video_frame (the video then stays context)."
        )

    def image_blocks(self, input_ids: torch.Tensor, image_inputs: Mapping[str, torch.Tensor], num_images: int) -> list[torch.Tensor]:
        """Sequence positions of each image's tokens (``num_images`` LongTensors, in sequence order).

        ``image_inputs`` hold the example's ``[num_images, ...]`` rows of the per-image keys. The base class
        refuses several images: a family that can tell its image blocks apart overrides this.
        """
        raise ValueError(
            f"{self.model_type}: an example with {num_images} images, but {type(self).__name__} cannot tell one "
            f"image's tokens from another's yet; only one image per example is supported for this family "
            f"(several images: {', '.join(several_image_layouts())}). Fix: give each example one image."
        )

    def tells_images_apart(self) -> bool:
        """Whether this layout finds each image's block in an example of several (overrides :meth:`image_blocks`)."""
        return _overrides_image_blocks(type(self))

    def _one_run_error(self, what: str) -> ValueError:
        """The error for image tokens that are not one image's structure (``what``): several images, unannounced."""
        if self.tells_images_apart():
            fix = ("several images per example need num_images and image_index in the image inputs (FLMMProcessor "
                   "gives them for images=[[reference, target], ...])")
        else:
            fix = f"{self.model_type} lays out one image per example (several images: {', '.join(several_image_layouts())})"
        return ValueError(f"{self.model_type}: {what}: {fix}.")

    def stack(self, maps_per_grid: Sequence[torch.Tensor]) -> torch.Tensor:
        """:func:`stack_grids` at this layout's ``main_grid``: ``[K, num_grids*C, h, w]``."""
        if len(maps_per_grid) != self.num_grids:
            raise ValueError(f"{self.model_type}: expected {self.num_grids} grids, got {len(maps_per_grid)}")
        return stack_grids(maps_per_grid, self.main_grid)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_type={self.model_type!r}, grids={self.grid_names}, main={self.main_grid})"


def _overrides_image_blocks(cls: type) -> bool:
    # resolved through the MRO: a subclass that resets image_blocks to the base's (LLaVA-OneVision) refuses
    return cls.image_blocks is not ImageLayout.image_blocks


def _factory_layout_classes(factory: LayoutFactory) -> tuple[type, ...]:
    """The layout classes a family's factory may return: the class itself, or its return annotation's members."""
    if isinstance(factory, type):
        return (factory,)
    try:
        hint = typing.get_type_hints(factory).get("return")
    except Exception:  # an unannotated or unresolvable factory (a lambda of register_family): unknown
        return ()
    members = typing.get_args(hint) or (hint,)
    return tuple(m for m in members if isinstance(m, type)) if all(isinstance(m, type) for m in members) else ()


def several_image_layouts() -> list[str]:
    """Model types of the registered families that accept several images per example, sorted.

    A family is listed when every layout class its factory may give resolves :meth:`ImageLayout.image_blocks` to an
    override (so LLaVA-OneVision, whose layout resets it to the refusing base, is not); a factory whose classes cannot
    be told (no return annotation) is not listed.
    """
    found = []
    for model_type, family in FAMILIES.items():
        classes = _factory_layout_classes(family.layout) if family.layout is not None else ()
        if classes and all(_overrides_image_blocks(cls) for cls in classes):
            found.append(model_type)
    return sorted(found)


class SquareLayout(ImageLayout):
    """A fixed ``side x side`` grid of consecutive image tokens (PaliGemma, Gemma3, DeepSeek-VL, LLaVA).

    ``side`` None means "take it from the token count" (generic fallback); a count that is not
    a perfect square is then an error.
    """

    def __init__(self, config, side: int | None, n_extra_leading: int = 0):
        super().__init__(config)
        self.side = side
        # leading tokens that are not patches (a CLS kept by vision_feature_select_strategy="full")
        self.n_extra_leading = n_extra_leading

    def grids(self, input_ids, image_inputs=None):
        pos = _image_positions(input_ids, self.image_token_id)
        side = self.side
        if side is None:
            side = math.isqrt(pos.numel())
            if side * side != pos.numel() or side == 0:
                raise _unknown_family_error(self.model_type, pos.numel())
        _check_count(self.model_type, pos.numel(), side * side + self.n_extra_leading,
                     f"a {side}x{side} grid" + (f" + {self.n_extra_leading} CLS" if self.n_extra_leading else ""))
        if _count_runs(input_ids, self.image_token_id) != 1:
            raise self._one_run_error("image tokens are not contiguous")
        return [pos[self.n_extra_leading :].view(side, side)]

    def tells_images_apart(self) -> bool:
        return self.side is not None  # the generic fallback (side from the count) cannot cut the blocks

    def image_blocks(self, input_ids, image_inputs, num_images):
        # every image gives the same count, in order (LLaVA, Gemma3, PaliGemma: image blocks may even touch)
        if self.side is None:
            return super().image_blocks(input_ids, image_inputs, num_images)
        pos = _image_positions(input_ids, self.image_token_id)
        return _split_by_counts(pos, [self.side * self.side + self.n_extra_leading] * num_images, self.model_type)


def _llava_side(config) -> int:
    return config.vision_config.image_size // config.vision_config.patch_size


def _has_cls(vision_config) -> bool:
    # CLIP-style towers prepend a CLS token; SigLIP and most others do not
    return getattr(vision_config, "model_type", "").startswith("clip")


class LlavaLayout(SquareLayout):
    """LLaVA(-1.5): ``P x P`` with ``P = image_size // patch_size``.

    With ``vision_feature_select_strategy == "full"`` and a CLS-bearing tower (CLIP) the
    first image token is the CLS feature: it has no place in the grid and is dropped.
    """

    def __init__(self, config):
        full = getattr(config, "vision_feature_select_strategy", "default") == "full"
        super().__init__(config, _llava_side(config), int(full and _has_cls(config.vision_config)))


def _llava_next_unpadded_shape(config, image_size: Sequence[int]) -> tuple[int, int]:
    """(h, w) of LLaVA-NeXT's un-padded high-res grid for an original image size (H, W).

    Mirrors ``LlavaNextModel.pack_image_features`` + ``unpad_image``: the best pinpoint
    resolution is tiled into base-size crops, each crop gives ``P x P`` features, and the rows
    (or columns) added by the aspect-preserving padding are cut off.
    """
    from transformers.image_processing_utils import select_best_resolution

    size = config.vision_config.image_size
    p = size // config.vision_config.patch_size
    best_h, best_w = select_best_resolution(list(image_size), config.image_grid_pinpoints)
    n_h, n_w = best_h // size, best_w // size
    cur_h, cur_w = p * n_h, p * n_w
    h, w = image_size
    if w / h > cur_w / cur_h:
        new_h = int(round(h * (cur_w / w), 7))
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(w * (cur_h / h), 7))
        cur_w -= ((cur_w - new_w) // 2) * 2
    return cur_h, cur_w


class LlavaNextLayout(ImageLayout):
    """LLaVA-NeXT: [base ``P x P`` grid, un-padded high-res grid]; the high-res grid is main.

    Sequence: ``P*P`` base tokens, then the high-res grid row by row, each row followed by
    one ``image_newline`` token (also an image placeholder; its column is dropped). As in the
    reference F-LMM, both grids are resized to the high-res grid size and concatenated
    (base first). Needs ``image_sizes`` (the ORIGINAL H, W the processor reports).
    If ``pixel_values`` hold the base crop only, the model keeps the base features (+ one
    newline); the base grid is then returned twice so that ``num_grids`` stays 2.
    """

    num_grids = 2
    main_grid = 1
    grid_names = ("base", "high_res")

    def grids(self, input_ids, image_inputs=None):
        if image_inputs is None or "image_sizes" not in image_inputs:
            raise ValueError(f"{self.model_type}: grids() needs image_inputs['image_sizes'] (the original H, W)")
        hw = _row(image_inputs["image_sizes"])
        pos = _image_positions(input_ids, self.image_token_id)
        p = _llava_side(self.config)
        base = p * p
        if _count_runs(input_ids, self.image_token_id) != 1:
            raise self._one_run_error("image tokens are not contiguous")
        if pos.numel() == base + 1:
            # pixel_values with the base crop only: the model appends one newline to the base
            grid = pos[:base].view(p, p)
            return [grid, grid]
        h, w = self.high_res_shape(hw)
        _check_count(self.model_type, pos.numel(), base + h * (w + 1),
                     f"{p}x{p} base + {h}x{w} high-res + {h} newlines for image size {tuple(hw)}")
        return [pos[:base].view(p, p), pos[base:].view(h, w + 1)[:, :-1]]

    def high_res_shape(self, image_size: Sequence[int]) -> tuple[int, int]:
        """(h, w) of the high-res grid (newlines excluded) for an original image size (H, W)."""
        return _llava_next_unpadded_shape(self.config, image_size)

    def image_blocks(self, input_ids, image_inputs, num_images):
        # each image: base grid + high-res grid with its newlines (the base-only case is single-image only)
        if "image_sizes" not in image_inputs:
            raise ValueError(f"{self.model_type}: several images need image_inputs['image_sizes'] (one row per image)")
        base = _llava_side(self.config) ** 2
        counts = []
        for hw in torch.as_tensor(image_inputs["image_sizes"]).view(-1, 2).tolist():
            h, w = self.high_res_shape(hw)
            counts.append(base + h * (w + 1))
        return _split_by_counts(_image_positions(input_ids, self.image_token_id), counts, self.model_type)


class LlavaOnevisionLayout(LlavaNextLayout):
    """LLaVA-OneVision: LLaVA-NeXT's [base, un-padded high-res] grids, the high-res grid capped.

    ``vision_aspect_ratio = "anyres_max_N"``: when the un-padded grid holds more than
    ``N * P * P`` features by a factor ``ratio**2`` with ``ratio > 1.1``, the model resizes it
    bilinearly to ``(h // ratio, w // ratio)`` before appending the newlines (as
    ``LlavaOnevisionModel.pack_image_features`` does); the resized grid still spans the whole
    image, so the canvas mapping is unchanged.
    """

    # with several images per prompt the model skips the any-res patching (base features only): not written
    image_blocks = ImageLayout.image_blocks

    def high_res_shape(self, image_size):
        h, w = _llava_next_unpadded_shape(self.config, image_size)
        p = _llava_side(self.config)
        max_crops = int(self.config.vision_aspect_ratio.strip("anyres_max_"))
        ratio = math.sqrt(h * w / (max_crops * p * p))
        if ratio > 1.1:
            return int(h // ratio), int(w // ratio)
        return h, w


class QwenVLLayout(ImageLayout):
    """Qwen-style dynamic resolution: ``(h / m) x (w / m)`` merged tokens from ``image_grid_thw = (t, h, w)``.

    ``m = vision_config.spatial_merge_size``. The vision tower returns merged tokens row-major
    (Qwen2.5-VL's window reordering is undone inside the tower), wrapped in
    ``<|vision_start|> ... <|vision_end|>`` (not image tokens). Images have ``t == 1``.

    The same geometry serves the families whose towers patch and merge images as Qwen2-VL does:

    * Qwen3-VL (+ MoE): its deepstack features are added to the text hidden states AT the image
      tokens, so they do not move them;
    * GLM-4.1V / GLM-4.5V (MoE) / GLM-4.6V: wrapped in ``<|begin_of_image|> ... <|end_of_image|>``;
      the merger is a stride-``m`` convolution over the same ``m x m`` blocks;
    * PaddleOCR-VL (a SigLIP-style tower; the projector merges the ``m x m`` blocks) and
      ERNIE-4.5-VL (its resampler merges them; images are not merged in time);
    * the thinkers of Qwen2.5-Omni (a Qwen2.5-VL tower) and Qwen3-Omni-MoE (a Qwen3-VL tower);
    * EXAONE-4.5 and HyperCLOVAX-Vision-V2 (Qwen2.5-VL towers, 1-D text positions), Cosmos3 (``cosmos3_omni``,
      Qwen3-VL itself), Cohere Compass (a Qwen3-VL tower), GLM-GA (GLM-4.6V's model) and Cosmos3-Edge (a SigLIP2
      tower over Qwen's block-ordered patches, merged ``m x m`` by its projector).
    """

    def grids(self, input_ids, image_inputs=None):
        rows, cols = self.merged_shape(image_inputs)
        pos = _image_positions(input_ids, self.image_token_id)
        _check_count(self.model_type, pos.numel(), rows * cols, self._grid_detail(image_inputs))
        return [pos.view(rows, cols)]

    def merged_shape(self, image_inputs: Mapping[str, torch.Tensor] | None) -> tuple[int, int]:
        """(rows, cols) of the merged token grid of one image: ``(h / m, w / m)`` from ``image_grid_thw``."""
        if image_inputs is None or "image_grid_thw" not in image_inputs:
            raise ValueError(f"{self.model_type}: grids() needs image_inputs['image_grid_thw']")
        t, h, w = _row(image_inputs["image_grid_thw"])
        if t != 1:
            raise ValueError(
                f"{self.model_type}: image_grid_thw has t={t}, a video's grid: images have t=1. Fix: pass a video as "
                f"pixel_values_videos + video_grid_thw and ground one of its temporal slices with video_frame "
                f"({', '.join(VIDEO_GRID_MODEL_TYPES)}), or pass the frame itself as an image."
            )
        m = self.merge_size(image_inputs)
        return h // m, w // m

    def _grid_detail(self, image_inputs: Mapping[str, torch.Tensor]) -> str:
        return f"image_grid_thw {tuple(_row(image_inputs['image_grid_thw']))}, merge {self.merge_size(image_inputs)}"

    def __init__(self, config):
        super().__init__(config)
        if self.model_type in VIDEO_GRID_MODEL_TYPES:
            self.video_token_id = getattr(config, "video_token_id", None)

    def merge_size(self, image_inputs: Mapping[str, torch.Tensor]) -> int:
        """Patches merged per token along each side: the vision config's ``spatial_merge_size``."""
        return self.config.vision_config.spatial_merge_size

    def frame_grids(self, input_ids, video_inputs, frame):
        """Slice ``frame`` of the video's ``t x (h / m) x (w / m)`` tokens (``video_grid_thw`` = (t, h, w)):
        the vision tower emits a video's merged tokens time-major, each slice row-major like an image."""
        if self.video_token_id is None:
            return super().frame_grids(input_ids, video_inputs, frame)
        if "video_grid_thw" not in video_inputs:
            raise ValueError(f"{self.model_type}: grounding in a video frame needs video_grid_thw (one row per video)")
        t, h, w = _row(video_inputs["video_grid_thw"])
        if not 0 <= frame < t:
            raise ValueError(f"{self.model_type}: video_frame {frame} is out of range for a video of {t} temporal "
                             "slices (video_grid_thw[0]; each slice merges temporal_patch_size frames)")
        m = self.merge_size(video_inputs)
        pos = _image_positions(input_ids, self.video_token_id)
        if pos.numel() > t * (h // m) * (w // m):
            raise ValueError(f"{self.model_type}: the example has {pos.numel()} video tokens, more than its one video "
                             f"{(t, h, w)} gives; grounding in a frame supports one video per example.")
        _check_count(self.model_type, pos.numel(), t * (h // m) * (w // m), f"video_grid_thw {(t, h, w)}, merge {m}")
        return [pos.view(t, h // m, w // m)[frame]]

    def image_blocks(self, input_ids, image_inputs, num_images):
        # image i gives t*h*w / m**2 tokens (its row of image_grid_thw), in the order of the rows
        if "image_grid_thw" not in image_inputs:
            raise ValueError(f"{self.model_type}: several images need image_inputs['image_grid_thw'] (one row per image)")
        counts = []
        for i in range(torch.as_tensor(image_inputs["image_grid_thw"]).view(-1, 3).shape[0]):
            one = {key: (value[i] if key in PER_IMAGE_KEYS else value) for key, value in image_inputs.items()}
            counts.append(self.image_token_count(one))
        return _split_by_counts(_image_positions(input_ids, self.image_token_id), counts, self.model_type)

    def image_token_count(self, image_inputs: Mapping[str, torch.Tensor]) -> int:
        """Image tokens of one image (its row of ``image_grid_thw``): the merged grid's cells."""
        rows, cols = self.merged_shape(image_inputs)
        return rows * cols


class VideoLlama3Layout(QwenVLLayout):
    """VideoLLaMA3: Qwen-VL's grid, with the merge size given per image in ``image_merge_sizes``.

    Its vision tower merges each image's ``m x m`` patch blocks by bilinear down-sampling
    (``pixel_unshuffle``), with ``m`` chosen by the processor per image (1 for images, 2 for
    video frames by default) rather than fixed by the config; the text model has 1-D positions.
    """

    def merge_size(self, image_inputs):
        if "image_merge_sizes" not in image_inputs:
            raise ValueError(
                f"{self.model_type}: grids() needs image_inputs['image_merge_sizes'] (returned by its image processor "
                "with image_grid_thw); pass it through with the other image inputs."
            )
        return _row(image_inputs["image_merge_sizes"])[0]


class HunYuanVLLayout(QwenVLLayout):
    """HunYuan-VL: Qwen-VL's ``(h / m) x (w / m)`` merged grid, each row ended by a newline feature, the whole image
    opened by a begin feature and closed by an end feature; all of them are image tokens.

    Its image processor orders the patches row-major (not in Qwen's ``m x m`` blocks) and its merger, a stride-``m``
    convolution over the ``h x w`` patch map, appends the learned ``image_newline`` column and then the
    ``image_begin`` / ``image_end`` rows: ``1 + rows * (cols + 1) + 1`` image tokens per image, which is also the
    span its processor writes (``cat_extra_token=True``; without the two extra tokens the model's feature count does
    not match the placeholders).
    """

    def grids(self, input_ids, image_inputs=None):
        rows, cols = self.merged_shape(image_inputs)
        pos = _image_positions(input_ids, self.image_token_id)
        _check_count(self.model_type, pos.numel(), rows * (cols + 1) + 2,
                     f"{self._grid_detail(image_inputs)}: begin + {rows} rows of {cols} + newline + end")
        return [pos[1:-1].view(rows, cols + 1)[:, :-1]]

    def image_token_count(self, image_inputs):
        rows, cols = self.merged_shape(image_inputs)
        return rows * (cols + 1) + 2  # begin + rows of (cols + newline) + end


class PixtralGridLayout(ImageLayout):
    """Pixtral-tower grid: ``(H / s) x (W / s)`` with ``s = patch_size * merge``, ``(H, W)`` from ``image_sizes``.

    ``image_sizes`` holds the PROCESSED image size (H, W): the Pixtral image processor resizes
    each image to multiples of ``s`` and the tower keeps its patches row-major (its patch
    merger, when there is one, merges ``merge x merge`` blocks row-major too). With
    ``row_breaks`` every row of ``[IMG]`` tokens is followed by ``[IMG_BREAK]`` (``[IMG_END]``
    after the last), which are not image tokens; without, the image tokens are one run.

    Serves LLaVA configs with a Pixtral tower (Pixtral-12B: ``model_type`` "llava", no merge,
    ``PixtralProcessor`` with breaks) through :func:`_llava`, and the subclasses below.
    """

    row_breaks: bool = True

    def __init__(self, config, merge: int = 1):
        super().__init__(config)
        self.stride = config.vision_config.patch_size * merge

    def grids(self, input_ids, image_inputs=None):
        if image_inputs is None or "image_sizes" not in image_inputs:
            raise ValueError(f"{self.model_type}: grids() needs image_inputs['image_sizes'] (the processed H, W)")
        H, W = _row(image_inputs["image_sizes"])
        h, w = H // self.stride, W // self.stride
        pos = _image_positions(input_ids, self.image_token_id)
        _check_count(self.model_type, pos.numel(), h * w, f"{h}x{w} for processed size {(H, W)}")
        runs = _count_runs(input_ids, self.image_token_id)
        if self.row_breaks and runs != h:
            raise ValueError(f"{self.model_type}: expected {h} rows of image tokens separated by [IMG_BREAK], "
                             f"found {runs} runs")
        if not self.row_breaks and runs != 1:
            raise self._one_run_error("image tokens are not contiguous")
        return [pos.view(h, w)]

    def image_blocks(self, input_ids, image_inputs, num_images):
        # image i gives (H / s) x (W / s) tokens (its row of image_sizes)
        if "image_sizes" not in image_inputs:
            raise ValueError(f"{self.model_type}: several images need image_inputs['image_sizes'] (one row per image)")
        s = self.stride
        counts = [(H // s) * (W // s) for H, W in torch.as_tensor(image_inputs["image_sizes"]).view(-1, 2).tolist()]
        return _split_by_counts(_image_positions(input_ids, self.image_token_id), counts, self.model_type)


class Mistral3Layout(PixtralGridLayout):
    """Mistral3: the Pixtral grid after the ``spatial_merge_size`` patch merger, rows split by ``[IMG_BREAK]``."""

    def __init__(self, config):
        super().__init__(config, merge=config.spatial_merge_size)


class LightOnOcrLayout(Mistral3Layout):
    """LightOnOCR: Mistral3's merged Pixtral grid, but its processor writes the ``h * w`` image tokens as one run
    (``LightOnOcrProcessor.replace_image_token`` has no ``[IMG_BREAK]`` / ``[IMG_END]``)."""

    row_breaks = False


class TiledLayout(ImageLayout):
    """Tiles stitched row-major into one grid + the global view: Idefics3/SmolVLM and InternVL.

    Grids: [tiles stitched into ``rows*s x cols*s``, global view ``s x s``]; the tile grid is
    main. Each tile (and the global view) gives ``s x s`` tokens, ``s * s = seq_len``.

    * Idefics3/SmolVLM: tiles first (row-major, each after ``<fake_token_around_image>
      <row_i_col_j>``), then the global view. Not split (``rows == cols == 0``): only the
      global view.
    * InternVL: ``<img>`` + tiles row-major + thumbnail + ``</img>``; a single tile has no
      thumbnail.

    When the image is not split there is one view: it is returned as both grids, so
    ``num_grids`` stays 2 and the channels keep their meaning (tiles ~ global when whole).
    The tile counts come from ``image_rows`` / ``image_cols`` (Idefics3 processor with
    ``return_row_col_info``), ``tile_grid`` = (rows, cols), or else from the number of tiles
    and ``original_sizes`` (the factorisation closest to the image's aspect ratio).
    """

    num_grids = 2
    main_grid = 0
    grid_names = ("tiles", "global")

    def __init__(self, config, seq_len: int):
        super().__init__(config)
        self.side = math.isqrt(seq_len)
        if self.side * self.side != seq_len:
            raise ValueError(f"{self.model_type}: {seq_len} tokens per tile is not a square grid")
        self.seq_len = seq_len

    def _rows_cols(self, n_tiles: int, image_inputs: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        for r_key, c_key in (("image_rows", "image_cols"), ("rows", "cols")):
            if r_key in image_inputs and c_key in image_inputs:
                return _row(image_inputs[r_key])[0], _row(image_inputs[c_key])[0]
        if "tile_grid" in image_inputs:
            r, c = _row(image_inputs["tile_grid"])
            return r, c
        if "original_sizes" in image_inputs:
            return _tile_grid_from_aspect(n_tiles, _row(image_inputs["original_sizes"]))
        raise ValueError(
            f"{self.model_type}: the image was split into {n_tiles} tiles; grids() needs image_inputs with "
            "'image_rows'/'image_cols', 'tile_grid' or 'original_sizes' to know their arrangement."
        )

    def grids(self, input_ids, image_inputs=None):
        image_inputs = image_inputs or {}
        pos = _image_positions(input_ids, self.image_token_id)
        views = _square_views(pos, self.side, self.model_type, "tile")
        n_views = len(views)
        if n_views == 1:
            return [views[0], views[0]]
        rows, cols = self._rows_cols(n_views - 1, image_inputs)
        if rows * cols == 0:  # Idefics3 "not split" but several views: more than one image
            _check_count(self.model_type, pos.numel(), self.seq_len, "one unsplit image")
        _check_count(self.model_type, pos.numel(), (rows * cols + 1) * self.seq_len,
                     f"{rows}x{cols} tiles + a global view of {self.seq_len} tokens each")
        return [_stitch(views[:-1], rows, cols), views[-1]]


def _square_views(pos: torch.Tensor, side: int, model_type: str, unit: str) -> list[torch.Tensor]:
    """Image-token positions cut into consecutive ``side x side`` views; an error unless they split evenly."""
    n_views, rem = divmod(pos.numel(), side * side)
    if rem or n_views == 0:
        raise ValueError(
            f"{model_type}: token count mismatch: {pos.numel()} image tokens is not a positive multiple "
            f"of the {side * side} tokens per {unit}."
        )
    return [v.view(side, side) for v in pos.split(side * side)]


class Idefics3Layout(TiledLayout):
    """Idefics3 / SmolVLM: ``seq_len = (image_size // patch_size)**2 / scale_factor**2`` per view."""

    def __init__(self, config):
        vc = config.vision_config
        seq_len = (vc.image_size // vc.patch_size) ** 2 // (config.scale_factor**2)
        super().__init__(config, seq_len)


class InternVLLayout(TiledLayout):
    """InternVL: ``image_seq_length`` tokens per view; assumes the processor's default
    ``use_thumbnail=True`` (several tiles are followed by a thumbnail of the whole image)."""

    def __init__(self, config):
        super().__init__(config, config.image_seq_length)

    def grids(self, input_ids, image_inputs=None):
        # InternVL wraps all views of one image in a single <img> ... </img> run
        if _count_runs(input_ids, self.image_token_id) > 1:
            raise self._one_run_error("several runs of image tokens")
        return super().grids(input_ids, image_inputs)

    def image_blocks(self, input_ids, image_inputs, num_images):
        # one <img> ... </img> run per image (its tiles and thumbnail are contiguous inside it)
        runs = _runs(input_ids, self.image_token_id)
        if len(runs) != num_images:
            raise ValueError(f"{self.model_type}: {len(runs)} runs of image tokens for {num_images} images; each "
                             "image must be one <img> ... </img> run.")
        return runs


class GraniteDoclingLayout(TiledLayout):
    """Granite-Docling: Idefics3's prompt layout over GotOcr2-style tiles, ``s x s`` tokens per view.

    Tiles row-major (each after ``<fake_token_around_image><row_i_col_j>``), then, when the page
    has more than one tile, the global thumbnail; a single tile has no thumbnail. The connector
    pixel-shuffles each tile's ``P x P`` patches (``P = image_size // patch_size``) by
    ``scale_factor`` on the coarse path, ``s = P / scale_factor``, or by half of it on the fine
    path (``tile_fine_mask`` present in the processor output, with ``fine_route=True``; as the model, its presence,
    not its values, selects the path), ``s = 2P / scale_factor``.
    Its DeepStack features are added to the hidden states AT the image tokens, so they do not move
    them. The tile grid comes from ``rows`` / ``cols`` (the image processor's output; the processor
    drops them), else from ``original_sizes`` (see :class:`TiledLayout`).
    """

    def __init__(self, config):
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        super().__init__(config, (side // vc.scale_factor) ** 2)
        self.fine = TiledLayout(config, (side // (vc.scale_factor // 2)) ** 2) if vc.use_fine_route else None

    def grids(self, input_ids, image_inputs=None):
        image_inputs = image_inputs or {}
        # the model takes the fine path for the whole batch when tile_fine_mask is PRESENT, whatever its values
        if image_inputs.get("tile_fine_mask") is not None:
            if self.fine is None:
                raise ValueError(f"{self.model_type}: tile_fine_mask asks for the fine connector path, but the config "
                                 "has vision_config.use_fine_route=False.")
            return self.fine.grids(input_ids, image_inputs)
        return super().grids(input_ids, image_inputs)


class Ovis2Layout(ImageLayout):
    """Ovis2: the global view first, then (when the image is cropped) its tiles row-major.

    Sequence: ``<IMG_START>`` + global view + ``<IMG_GRID>`` + tiles, ``<IMG_COL>`` between two
    tiles of a row and ``<IMG_ROW>`` between rows, + ``<IMG_END>``; the indicators are
    ``config.visual_indicator_token_ids`` (start, grid, col, row, end), not image tokens. Each
    view gives ``s x s`` tokens, ``s = ceil(image_size / patch_size / hidden_stride)`` (the tower
    pads its patch grid to a multiple of ``hidden_stride``, then merges ``hidden_stride``-blocks
    row-major). The tile grid is read from the ``<IMG_ROW>`` / ``<IMG_COL>`` tokens, so no
    extra input is needed (the processor's ``grids`` never reaches the model).

    Grids: [tiles stitched into ``rows*s x cols*s``, global ``s x s``]; the tile grid is main.
    An image that is not cropped has one view, returned as both grids.
    """

    num_grids = 2
    main_grid = 0
    grid_names = ("tiles", "global")

    def __init__(self, config):
        super().__init__(config)
        vc = config.vision_config
        self.side = math.ceil(vc.image_size / vc.patch_size / vc.hidden_stride)
        self.seq_len = self.side * self.side
        _start, _grid, self.col_token_id, self.row_token_id, _end = config.visual_indicator_token_ids

    def grids(self, input_ids, image_inputs=None):
        pos = _image_positions(input_ids, self.image_token_id)
        views = _square_views(pos, self.side, self.model_type, "view")
        rows = int((input_ids == self.row_token_id).sum()) + 1
        cols_between = int((input_ids == self.col_token_id).sum())
        if cols_between % rows:
            raise ValueError(f"{self.model_type}: {cols_between} <IMG_COL> tokens do not split into {rows} equal rows.")
        cols = cols_between // rows + 1
        n_tiles = rows * cols if rows * cols > 1 else 0  # a single view is not cropped
        _check_count(self.model_type, pos.numel(), (n_tiles + 1) * self.seq_len,
                     f"a global view + {rows}x{cols} tiles of {self.seq_len} tokens each")
        if _count_runs(input_ids, self.image_token_id) != n_tiles + 1:
            raise self._one_run_error("image tokens are not one run per view")
        if n_tiles == 0:
            return [views[0], views[0]]
        return [_stitch(views[1:], rows, cols), views[0]]


def _square_patch_grid(config) -> SquareLayout:
    """PaliGemma, DeepSeek-VL: one ``P x P`` grid, ``P = image_size // patch_size``, no CLS.

    DeepSeek-VL-7B (``deepseek_vl_hybrid``) too: ``vision_config`` is its SigLIP branch (384 px,
    patch 16: 24 x 24 = 576 tokens); the SAM branch's features are resized to the same grid and
    joined to them channel-wise, token by token, so the sequence holds one grid of 576 tokens.
    """
    return SquareLayout(config, _llava_side(config))


class AyaVisionLayout(TiledLayout):
    """Aya Vision: GotOcr2 tiles row-major + the global view, ``s x s`` tokens each.

    ``s = (image_size // patch_size) // downsample_factor``: the projector's pixel shuffle
    merges ``downsample_factor x downsample_factor`` neighbouring patches row-major (it is the
    same merge as InternVL's). Tiles are preceded by ``TILE_i`` and the global view by
    ``TILE_GLOBAL`` (text tokens); a single tile has no separate global view.
    """

    def __init__(self, config):
        vc = config.vision_config
        side = (vc.image_size // vc.patch_size) // config.downsample_factor
        super().__init__(config, side * side)


def _llava(config) -> LlavaLayout | PixtralGridLayout:
    """LLaVA configs: :class:`LlavaLayout`, or the Pixtral grid when the tower is Pixtral's (Pixtral-12B).

    A Pixtral tower keeps each image at its processed size (no CLS, so the checkpoints use
    ``vision_feature_select_strategy="full"``) and ``PixtralProcessor`` ends each row with
    ``[IMG_BREAK]``; LLaVA has no patch merger, so one token per ``patch_size`` patch.
    """
    if getattr(config.vision_config, "model_type", None) == "pixtral":
        return PixtralGridLayout(config, merge=1)
    return LlavaLayout(config)


def _gemma3(config) -> SquareLayout:
    # the projector average-pools the patch grid to sqrt(mm_tokens_per_image) per side
    side = math.isqrt(config.mm_tokens_per_image)
    if side * side != config.mm_tokens_per_image:
        raise ValueError(f"gemma3: mm_tokens_per_image={config.mm_tokens_per_image} is not square")
    return SquareLayout(config, side)


# --------------------------------------------------------------------------------------------
# families
# --------------------------------------------------------------------------------------------
LayoutFactory = Callable[[Any], ImageLayout]


@dataclass(frozen=True)
class Family:
    """What F-LMM knows about one backbone family (one config ``model_type``).

    Attributes:
        layout: ``config -> ImageLayout`` for this family's configs; None when F-LMM has no
            adapter yet (:func:`get_image_layout` then takes the generic square fallback).
        dynamic_resolution: the family's processor resizes or tiles images itself (LLaVA-NeXT's
            any-res, Qwen-VL's dynamic resolution, Idefics3's splitting, ...): ``FLMMProcessor``
            then never letterboxes them and the canvas is the original image. False: the
            processor feeds one fixed-size image, which ``FLMMProcessor`` letterboxes.
    """

    layout: LayoutFactory | None = None
    dynamic_resolution: bool = False


FAMILIES: dict[str, Family] = {
    # the supported families (deepseek_vl_hybrid is DeepSeek-VL-7B, deepseek_vl the 1.3B model)
    "llava": Family(_llava),  # a Pixtral tower (Pixtral-12B) gets the Pixtral grid
    "llava_next": Family(LlavaNextLayout, dynamic_resolution=True),
    "qwen2_vl": Family(QwenVLLayout, dynamic_resolution=True),
    "qwen2_5_vl": Family(QwenVLLayout, dynamic_resolution=True),
    "paligemma": Family(_square_patch_grid),
    "gemma3": Family(_gemma3),
    "deepseek_vl": Family(_square_patch_grid),
    "deepseek_vl_hybrid": Family(_square_patch_grid),
    "idefics3": Family(Idefics3Layout, dynamic_resolution=True),
    "smolvlm": Family(Idefics3Layout, dynamic_resolution=True),
    "internvl": Family(InternVLLayout, dynamic_resolution=True),
    "mistral3": Family(Mistral3Layout, dynamic_resolution=True),
    # LLaVA-like; the video families' video tokens (another placeholder id) are not mapped, only images
    "vipllava": Family(_square_patch_grid),  # always drops the CLS of its CLIP tower
    "video_llava": Family(LlavaLayout),
    "llava_next_video": Family(LlavaNextLayout, dynamic_resolution=True),
    "llava_onevision": Family(LlavaOnevisionLayout, dynamic_resolution=True),
    "aya_vision": Family(AyaVisionLayout, dynamic_resolution=True),
    "shieldgemma2": Family(_gemma3),  # a Gemma3 model with a classification head on its logits
    # Qwen-style dynamic resolution: image_grid_thw + spatial merge, 3-D (m-rope) positions
    "qwen3_vl": Family(QwenVLLayout, dynamic_resolution=True),
    "qwen3_vl_moe": Family(QwenVLLayout, dynamic_resolution=True),
    "glm4v": Family(QwenVLLayout, dynamic_resolution=True),
    "glm4v_moe": Family(QwenVLLayout, dynamic_resolution=True),
    "glm46v": Family(QwenVLLayout, dynamic_resolution=True),
    "video_llama_3": Family(VideoLlama3Layout, dynamic_resolution=True),
    "paddleocr_vl": Family(QwenVLLayout, dynamic_resolution=True),
    "ernie4_5_vl_moe": Family(QwenVLLayout, dynamic_resolution=True),
    "qwen2_5_omni_thinker": Family(QwenVLLayout, dynamic_resolution=True),
    "qwen3_omni_moe_thinker": Family(QwenVLLayout, dynamic_resolution=True),
    "ovis2": Family(Ovis2Layout, dynamic_resolution=True),
    "glm_ocr": Family(QwenVLLayout, dynamic_resolution=True),  # GLM-4.1V's merge and 3-D positions
    "janus": Family(_square_patch_grid),  # its SigLIP understanding tower; the VQ tower only generates
    # issue #15: Qwen-VL-style merged grids (image_grid_thw + an m x m merge, row-major over the merged grid)
    "exaone4_5": Family(QwenVLLayout, dynamic_resolution=True),  # a Qwen2.5-VL tower; 1-D positions
    "hyperclovax_vision_v2": Family(QwenVLLayout, dynamic_resolution=True),  # a Qwen2.5-VL tower; 1-D positions
    "cosmos3_omni": Family(QwenVLLayout, dynamic_resolution=True),  # Qwen3-VL's architecture, its own model type
    "glmga": Family(QwenVLLayout, dynamic_resolution=True),  # runs Glm46VForConditionalGeneration
    "cohere_compass": Family(QwenVLLayout, dynamic_resolution=True),  # a Qwen3-VL tower, a Cohere2 LM
    "cosmos3_edge": Family(QwenVLLayout, dynamic_resolution=True),  # a SigLIP2 tower, Qwen's block order + merge
    "hunyuan_vl": Family(HunYuanVLLayout, dynamic_resolution=True),
    # issue #15: Pixtral grids and tiled families
    "lighton_ocr": Family(LightOnOcrLayout, dynamic_resolution=True),
    "qianfan_ocr": Family(InternVLLayout, dynamic_resolution=True),  # InternVL with a Qwen3 text model
    "granite_docling": Family(GraniteDoclingLayout, dynamic_resolution=True),
    # processors known to resize/tile images themselves, registered for that trait only: idefics2's resampler has no
    # grid (REFUSED); "pixtral" is PixtralProcessor's home model type, while Pixtral-12B's config is a "llava" one
    "idefics2": Family(dynamic_resolution=True),
    "pixtral": Family(dynamic_resolution=True),
}
"""The registry of backbone families, keyed by config ``model_type`` (see :class:`Family`)."""


def get_family(model_type: str | None) -> Family | None:
    """The registered :class:`Family` of ``model_type``, or None."""
    return FAMILIES.get(model_type) if model_type is not None else None


def register_family(model_type: str, layout: LayoutFactory | None = None, dynamic_resolution: bool = False) -> None:
    """Register (or replace) the :class:`Family` of configs of ``model_type``.

    A layout registered for a model type of :data:`REFUSED` wins over the refusal.

    Args:
        model_type: the backbone config's ``model_type``.
        layout: ``config -> ImageLayout`` (e.g. an :class:`ImageLayout` subclass).
        dynamic_resolution: whether the family's processor resizes/tiles images itself.
    """
    FAMILIES[model_type] = Family(layout=layout, dynamic_resolution=dynamic_resolution)


def register_image_layout(model_type: str, factory: LayoutFactory) -> None:
    """Make ``get_image_layout`` use ``factory(config)`` for configs of ``model_type``.

    The family's processor traits stay as registered (fixed-size for a new family).
    """
    previous = FAMILIES.get(model_type, Family())
    FAMILIES[model_type] = Family(layout=factory, dynamic_resolution=previous.dynamic_resolution)


# --------------------------------------------------------------------------------------------
# refused families and the support table
# --------------------------------------------------------------------------------------------
_QFORMER = (
    "Q-Former: the LM sees a fixed set of learned query tokens with no spatial position, so text-to-image "
    "attention has no grid to lay out"
)
_ENCODER_DECODER = (
    "encoder-decoder: the image is read by the encoder and the generating decoder reaches it only through "
    "cross-attention, while F-LMM reads the decoder's self-attention over image tokens"
)
_VQ = (
    "discrete image tokens: a VQ tokenizer turns the image into codebook ids embedded like words; no layout "
    "written for its latent grid"
)


_TORCHVISION = "; its image processor needs torchvision (no PIL backend), so {} cannot be checked here"


def _no_layout(geometry: str) -> str:
    """Reason for a decoder-only family whose image tokens do lie on a grid but that has no adapter yet."""
    return f"no layout yet ({geometry})"


REFUSED: dict[str, str] = {
    # decoder-only families whose image tokens lie on a grid, not adapted yet
    "gemma3n": _no_layout("a 16 x 16 row-major grid from a timm MobileNet tower; timm is not installed, so no tiny "
                          "model can be built here to test a layout"),
    "fast_vlm": _no_layout("a flattened conv feature map from a timm FastViT tower; timm is not installed, so no tiny "
                           "model can be built here to test a layout"),
    "cohere2_vision": _no_layout("Aya Vision's tiles + global view with a line-break token per tile; its image "
                                 "processor needs torchvision, so the tile order cannot be checked here"),
    "perception_lm": _no_layout("a pooled tile grid; its image processor needs torchvision, so it cannot be checked "
                                "here"),
    "lfm2_vl": _no_layout("tiles + thumbnail with row/column tokens; its image processor needs torchvision, so it "
                          "cannot be checked here"),
    "got_ocr2": _no_layout("tiles like InternVL's, but two strided 3x3 convolutions shift each token about 3/8 of a "
                           "cell up and left; mapping it needs an offset in the canvas geometry"),
    "idefics2": "a perceiver resampler turns the patches into 64 learned latents, which have no spatial grid",
    # no spatial grid reaches the LM
    "blip-2": _QFORMER,
    "instructblip": _QFORMER,
    "instructblipvideo": _QFORMER,
    "aria": "its projector cross-attends learned queries to the patches, so the LM's image tokens are queries "
            "with no spatial grid",
    "kosmos-2": "a resampler turns the patches into 64 learned latent queries, which have no spatial grid",
    "kosmos-2.5": "a resampler turns the patches into learned latent queries (latent_query_num), which have no "
                  "spatial grid",
    "deepseek_ocr2": "its encoder appends learned queries (12x12 or 16x16) read out causally from the patches and "
                     "only the queries reach the LM, in the encoder's causal-flow order, not image geometry",
    # the generating model never self-attends to image tokens
    "florence2": _ENCODER_DECODER,
    "pix2struct": _ENCODER_DECODER,
    "udop": _ENCODER_DECODER,
    "vision-encoder-decoder": _ENCODER_DECODER,
    "t5gemma2": _ENCODER_DECODER,
    "pp_formulanet": _ENCODER_DECODER,
    "blip": "BLIP's text decoder reaches the ViT patches only through cross-attention; no image tokens are in "
            "its sequence (cross-attention capture is not written)",
    "idefics": "gated cross-attention layers: the LM reaches the image (its patch features, or 64 Perceiver "
               "latents) only through cross-attention; no image tokens are in its sequence",
    "mllama": "cross-attention: its self-attention layers see the image as one <|image|> token; text reaches the "
              "vision tiles only in the cross-attention layers (text_config.cross_attention_layers, 8 of 40 in the "
              "11B model), whose maps are [batch, heads, text, max_images * max_num_tiles * (P*P + 1)] over the "
              "projected vision states, not over sequence positions. They would lay out as grids (per real tile a "
              "CLS then P x P patches, tiles placed by aspect_ratio_ids on a canvas padded bottom/right), but the "
              "capture, the layouts and FLMMProcessor address image tokens by input_ids position: a capture of the "
              "cross-attention layers' vision-key columns, a layout in that key space and cross_attention_mask "
              "carried over the answer tokens are not written (docs/cross-attention.md)",
    "git": "no image placeholder tokens: GIT prepends the image features to the text embeddings, so input_ids "
           "do not say where they are",
    # discrete image tokens
    "chameleon": _VQ,
    "emu3": _VQ,
    "apertus1p5": _VQ,
    # not an image-to-text decoder F-LMM can ground
    "evolla": "a protein-sequence-to-text model: no images",
    "mistral4": "a text-only causal LM (no vision tower, no image tokens)",
    "pi0": "a vision-language-action policy: a flow-matching action expert outputs robot actions, not text "
           "whose words could be grounded",
    "diffusion_gemma": "a block-diffusion generator: text is denoised in blocks, not generated word by word "
                       "with a causal attention to the image that F-LMM reads",
    # issue #15: the Qwen-VL-style families not supported, each with its real obstacle
    "kimi_k25": _no_layout("row-major patches pooled by merge_kernel_size into a row-major merged grid, a DeepSeek-V3 "
                           "MLA LM; its only image processor needs torchvision, which does not import here, so no "
                           "tiny batch can be built to test a layout"),
    "minimax_m3_vl": _no_layout("Qwen-VL-style merged grid from image_grid_thw, an LM mixing dense and block-sparse "
                                "top-k attention layers; its only image processor needs torchvision, which does not "
                                "import here, so no tiny batch can be built to test a layout"),
    **{mt: _no_layout("Qwen-VL-style merged grid from image_grid_thw; its only image processor "
                      "(MuseGlimmerImageProcessor) needs torchvision, which does not import here, so no tiny batch "
                      "can be built to test a layout") for mt in ("muse_glimmer", "muse_spark")},
    **{mt: "LM attention adds a hidden-state-conditioned relative position bias and attention sinks to the "
           "scores and runs eager only (no SDPA); the capture's softmax(QK^T + mask) models neither (its image "
           "processor also needs torchvision)" for mt in ("inkling2", "inkling2_loop")},
    "hy_v4_vl": "LM attention has learned per-head attention sinks (an extra softmax column) on DeepSeek-V3.2 top-k "
                "sparse attention and runs eager only (no SDPA); the capture's softmax over the keys does not model "
                "sinks (its image tokens: HunYuan-VL's merged grid with a newline per row)",
    "glm5_next": "hybrid LM: 34 of its 45 decoder layers are Kimi Delta Attention (linear attention, no attention "
                 "map), the rest DeepSeek-V3.2 top-k attention; capturing only its softmax-attention layers is not "
                 "written",
    "qwen4_exp": "hybrid LM: 30 of its 40 decoder layers are Gated DeltaNet (linear attention, no attention map); "
                 "capturing only its softmax-attention layers is not written",
    "lfm3_vl": "hybrid LM: 13 of its 24 decoder layers are gated short convolutions (no attention map); capturing "
               "only its attention layers is not written",
    "dots3_note": "its decoder layers differ in head count (per_layer_config: 128 heads in the DeepSeek-V3.2 top-k "
                  "layers, 64 in the sliding-window ones), while F-LMM's mask head takes layers x heads channels of "
                  "one head count (its image tokens: a Qwen-VL-style merged grid from image_grid_thw)",
    # Qwen3-VL's image geometry, but the LM is hybrid: only every full_attention_interval-th layer is
    # softmax attention, the rest are Gated DeltaNet, which has no attention map to capture
    **{mt: "hybrid LM: Qwen3-VL's merged grid, but most decoder layers are Gated DeltaNet (linear attention, no "
           "attention map); capturing only its full-attention layers is not written" for mt in ("qwen3_5",
                                                                                               "qwen3_5_moe")},
    "mistral_large4": "DeepSeek-V3.2-style sparse attention: each query attends only to the index_topk (2048) keys its "
                      "learned indexer picks, a mask the model adds only under attn_implementation 'eager'/'sdpa', so "
                      "the capture's attention function would drop it and change the outputs (Mistral3's image grid)",
    "granite4_vision": _no_layout("LLaVA-NeXT-style any-res grids with newline tokens, downsampled by a window "
                                  "Q-Former that keeps the windows in place"),
    "llama4": _no_layout("tiles and a global view, each pixel-shuffled to a square grid"
                         + _TORCHVISION.format("the tile order")),
    "nemotron_h_omni": "hybrid LM: its NemotronH decoder interleaves Mamba-2 layers (no attention map) with MLP/MoE "
                       "layers and a few attention layers; capturing only those is not written (a RADIO tower's pixel-shuffled grid "
                       "from image_grid_hw)",
    # MiniCPM-V 4.6 / 4.7 / OCR: a thumbnail + slices, each slice resized on its own (unequal token grids), on a
    # Qwen3.5 text model
    **{mt: "hybrid LM: its Qwen3.5 text model is mostly Gated DeltaNet layers (linear attention, no attention map); "
           "capturing only its full-attention layers is not written (MiniCPM-V thumbnail + slices of unequal grids)"
       for mt in ("minicpm_ocr", "minicpmv4_6", "minicpmv4_7")},
    "molmo2": _no_layout("overlapping crops and a global view, pooled to grids" + _TORCHVISION.format("the crop order")),
    "step3p7": _no_layout("crops and a global view" + _TORCHVISION.format("the crop order")),
    "unlimited_ocr": _no_layout("DeepSeek-OCR-style local tiles and a global view, each row ended by a newline "
                                "token" + _TORCHVISION.format("the tile order")),
    "gemma4": _no_layout("variable-resolution patches pooled to soft tokens placed by image_position_ids"),
    "gemma4_unified": _no_layout("variable-resolution patches pooled to soft tokens placed by "
                                 "image_position_ids"),
    "inkling_mm_model": _no_layout("one soft token per space-to-depth-folded patch block of the resized image"
                                   + _TORCHVISION.format("the token order")),
    "pp_chart2table": _no_layout("runs GotOcr2ForConditionalGeneration, so got_ocr2's obstacle: two strided 3x3 "
                                 "convolutions shift each token about 3/8 of a cell up and left, which needs an offset "
                                 "in the canvas geometry"),
    "fuyu": _no_layout("patches embedded directly, one row of image tokens per patch row, each ended by an "
                       "image-newline token"),
}
"""Model types F-LMM refuses, with a one-line reason each (read by :func:`backbone_support`).

A registered layout wins over a refusal (see :func:`register_family`); a reason starting with
"no layout yet" marks a family whose image tokens do lie on a grid, so an adapter can be written.
"""

SUPPORTED = "supported"
REFUSED_STATUS = "refused"
UNCLASSIFIED = "unclassified"


@dataclass(frozen=True)
class BackboneSupport:
    """Whether F-LMM supports one backbone ``model_type``, and why not.

    Attributes:
        model_type: the config's ``model_type``.
        status: ``"supported"`` (a layout is registered), ``"refused"`` (listed in :data:`REFUSED`)
            or ``"unclassified"`` (in the installed transformers' image-text-to-text mapping but
            in neither registry: a family newer than flmm_hf's table).
        layout: the layout's name when supported, else None.
        reason: the refusal's one-line reason (or why it is unclassified), else None.
        dynamic_resolution: the registered family's processor trait (False when not registered).
    """

    model_type: str
    status: str
    layout: str | None = None
    reason: str | None = None
    dynamic_resolution: bool = False


def image_text_to_text_model_types() -> list[str]:
    """The model types of the installed transformers' ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def _layout_name(factory: LayoutFactory) -> str:
    """A layout factory's name for the table: the class, or the layout class a factory function returns."""
    if isinstance(factory, type):
        return factory.__name__
    returned = getattr(factory, "__annotations__", {}).get("return")
    returned = returned if isinstance(returned, str) else getattr(returned, "__name__", None)
    name = getattr(factory, "__name__", type(factory).__name__)
    # a factory annotated with the base class says nothing more than its own name
    return f"{returned} ({name})" if returned and returned != "ImageLayout" else name


def backbone_support(model_types: Sequence[str] | None = None) -> dict[str, BackboneSupport]:
    """What F-LMM says about each backbone model type: its layout, or the reason it is refused.

    Args:
        model_types: the model types to answer; None: every model type of the installed
            transformers' ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``.

    Returns:
        ``model_type -> BackboneSupport``, in the order asked (sorted for the default).
        A model type outside both registries is ``"unclassified"`` when it is in the mapping
        and ``"refused"`` otherwise (the square-grid fallback of :func:`get_image_layout` is a
        guess, not support).
    """
    in_mapping = set(image_text_to_text_model_types())
    answer = {}
    for model_type in image_text_to_text_model_types() if model_types is None else model_types:
        family = FAMILIES.get(model_type)
        dynamic = family.dynamic_resolution if family is not None else False
        if family is not None and family.layout is not None:
            support = BackboneSupport(model_type, SUPPORTED, layout=_layout_name(family.layout),
                                      dynamic_resolution=dynamic)
        elif model_type in REFUSED:
            support = BackboneSupport(model_type, REFUSED_STATUS, reason=REFUSED[model_type],
                                      dynamic_resolution=dynamic)
        elif model_type in in_mapping:
            support = BackboneSupport(
                model_type, UNCLASSIFIED, dynamic_resolution=dynamic,
                reason="an image-text-to-text family of the installed transformers that flmm_hf has not classified "
                       "yet (newer than its table in flmm_hf/image_layout.py)",
            )
        else:
            support = BackboneSupport(
                model_type, REFUSED_STATUS, dynamic_resolution=dynamic,
                reason="not an image-text-to-text model type of the installed transformers and no layout registered",
            )
        answer[model_type] = support
    return answer


def _table_cell(text: str) -> str:
    return text.replace("|", "\\|")


def backbone_table() -> str:
    """The Markdown document ``docs/backbones.md``: :func:`backbone_support` of the installed transformers.

    Regenerate it with ``python -m flmm_hf.backbones --write docs/backbones.md``.
    """
    support = backbone_support()
    n_supported = sum(s.status == SUPPORTED for s in support.values())
    lines = [
        "# Backbone support",
        "",
        "<!-- generated by `python -m flmm_hf.backbones --write docs/backbones.md`; do not edit -->",
        "",
        # no transformers version here: only a change of the mapping should make the committed table stale
        "Every model type of the installed transformers' `MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`"
        f" ({len(support)} model types, {n_supported} supported), as `flmm_hf.backbone_support()` answers it.",
        "A supported model type has an image-token layout (`flmm_hf/image_layout.py`); a refused one has the reason.",
        "\"dynamic resolution\": the family's processor resizes or tiles images itself, so `FLMMProcessor` does not",
        "letterbox them. `get_image_layout` raises a ValueError with the reason for a refused model type; the",
        "square-grid fallback (with a warning) is only for model types outside this mapping.",
        "A refusal that starts with \"no layout yet\" is a decoder-only family whose image tokens lie on a grid:",
        "an `ImageLayout` subclass registered with `register_family` adds it.",
        "",
        "Cross-attention families: mllama is refused. Its text reaches the image only through cross-attention",
        "layers interleaved with the self-attention ones, and F-LMM's attention capture reads attention from text",
        "tokens to image tokens at their positions in the sequence; the tiles' patch grids would allow a layout of",
        "the cross-attention keys, but capturing them is not written. `docs/cross-attention.md` gives the shapes",
        "and what an implementation needs.",
        "",
        "| model type | status | layout or reason | dynamic resolution |",
        "|---|---|---|---|",
    ]
    for s in support.values():
        what = _table_cell(f"`{s.layout}`" if s.status == SUPPORTED else s.reason or "")
        lines.append(f"| `{s.model_type}` | {s.status} | {what} | {'yes' if s.dynamic_resolution else ''} |")
    return "\n".join(lines) + "\n"


def _unknown_family_error(model_type: str, count: int | None) -> ValueError:
    what = f"{count} image tokens, not a square grid" if count is not None else "no known image-token count"
    return ValueError(
        f"No image layout for model_type {model_type!r} ({what}). Add an adapter: subclass "
        "flmm_hf.image_layout.ImageLayout with a grids() that returns the image tokens' sequence positions "
        f"in image geometry, and call register_image_layout({model_type!r}, YourLayout)."
    )


def _config_token_count(config) -> int | None:
    """Image tokens per image an unknown family's config implies, if it says."""
    for name in ("image_seq_length", "mm_tokens_per_image", "num_image_tokens"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    vc = getattr(config, "vision_config", None)
    size, patch = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int) and patch > 0:
        return (size // patch) ** 2
    return None


def get_image_layout(lmm_config) -> ImageLayout:
    """The image-layout adapter of a multimodal backbone config: its ``model_type``'s registered layout.

    A model type of the installed transformers' image-text-to-text mapping without a registered
    layout is refused with a ValueError: with its reason from :data:`REFUSED`, or, for a family
    newer than this table, saying so. Only model types outside that mapping (remote-code or
    custom backbones) fall back to a square grid when their image-token count (from the config,
    or else from each example's input_ids) is a perfect square, with a warning; otherwise a
    ValueError explains how to add an adapter.
    """
    model_type = getattr(lmm_config, "model_type", None)
    family = get_family(model_type)
    if family is not None and family.layout is not None:
        return family.layout(lmm_config)
    if model_type in image_text_to_text_model_types():
        # a known transformers family: guessing a square grid would give silently wrong masks
        support = backbone_support([model_type])[model_type]
        raise ValueError(
            f"F-LMM does not support model_type {model_type!r}: {support.reason}. Pick a supported backbone "
            "(flmm_hf.backbone_support(), docs/backbones.md), or, if its image tokens do lie on a grid, subclass "
            "flmm_hf.image_layout.ImageLayout with a grids() that returns their sequence positions in image "
            f"geometry and call register_family({model_type!r}, YourLayout, dynamic_resolution=...)."
        )
    count = _config_token_count(lmm_config)
    if count is not None and math.isqrt(count) ** 2 != count:
        raise _unknown_family_error(model_type, count)
    logger.warning(
        f"No image layout for model_type {model_type!r}: assuming its image tokens form one square grid "
        f"({'%d tokens' % count if count is not None else 'size from the token count'}), row-major. "
        "Check this, or register an adapter with register_image_layout()."
    )
    return SquareLayout(lmm_config, math.isqrt(count) if count is not None else None)

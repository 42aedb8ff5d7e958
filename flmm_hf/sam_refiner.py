"""The SAM refiner of F-LMM and the phrase text embeddings that prompt it.

`SamRefiner` holds a transformers `SamModel`: its vision encoder stays frozen, its prompt encoder and
mask decoder are trained. Per phrase it prompts SAM with the coarse mask (as a dense mask prompt), the
box of the coarse mask and the phrase's text embedding (as extra sparse tokens), and returns one
refined mask at the original image size. With converted weights the outputs equal those of F-LMM's
`SAMWrapper` on the `segment_anything` package.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SamConfig, SamModel


class TextProjection(nn.Module):
    """Phrase text embeddings for SAM: softmax-weighted sum of the LMM's layer outputs, then a linear layer.

    Args:
        num_layers (`int`): decoder layers of the LMM (one learnable weight each, initialised equal).
        hidden_size (`int`): hidden size of the LMM.
        out_size (`int`, *optional*, defaults to 256): SAM's prompt width.
    """

    def __init__(self, num_layers: int, hidden_size: int, out_size: int = 256):
        super().__init__()
        self.layer_weights = nn.Parameter(torch.ones(num_layers))
        self.proj = nn.Linear(hidden_size, out_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(num_layers, num_tokens, hidden_size)`):
                outputs of the LMM's decoder layers at the phrase tokens (the embedding output excluded).

        Returns:
            `torch.Tensor` of shape `(num_tokens, out_size)`.
        """
        weights = self.layer_weights.softmax(dim=0)
        # The frozen LMM may run in bf16; mix in the (float32) dtype of the trained weights, as the original.
        mixed = (hidden_states.to(weights.dtype) * weights.view(-1, 1, 1)).sum(dim=0)  # [n_tokens, hidden]
        return self.proj(mixed)


def sam_input_size(original_size: Sequence[int], longest_side: int = 1024) -> tuple[int, int]:
    """Size of the image after SAM's `ResizeLongestSide`, i.e. the un-padded part of SAM's 1024 input.

    Each side is at least 1 pixel: `ResizeLongestSide` rounds the short side of an image thinner than
    2048:1 to 0, which leaves nothing to prompt or crop; elsewhere the sizes are the original's.
    """
    height, width = (int(v) for v in original_size)
    scale = longest_side * 1.0 / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


# SAM parameters that F-LMM's prompts never reach (no point prompts, a mask prompt is always given, the IoU
# prediction is not trained). Freezing them changes nothing (AdamW skips parameters without gradients) and lets
# DDP run without `find_unused_parameters`. Names relative to `SamModel`.
UNUSED_SAM_PARAMETERS = (
    "prompt_encoder.no_mask_embed.",
    "prompt_encoder.point_embed.0.",
    "prompt_encoder.point_embed.1.",
    "prompt_encoder.not_a_point_embed.",
    "mask_decoder.iou_prediction_head.",
)
# The parts of SAM that F-LMM trains; the vision encoder (and the positional matrix) stay frozen.
TRAINED_SAM_PARTS = ("prompt_encoder", "mask_decoder")


class SamRefiner(nn.Module):
    """SAM-based mask refiner around a transformers `SamModel` (vision encoder frozen; prompt encoder and mask
    decoder trained).

    Args:
        sam (`SamModel` or `SamConfig`):
            a loaded `SamModel`, used as is (not copied: its vision encoder is frozen and set to eval mode, the
            parameters in `UNUSED_SAM_PARAMETERS` and the random-Fourier positional matrix get
            `requires_grad=False`, and with `match_segment_anything` its mask decoder's LayerNorm eps changes),
            or a configuration (a new, randomly initialised `SamModel`; the config is copied, not modified).
        match_segment_anything (`bool`, *optional*, defaults to `True`):
            Give the mask decoder's two-way attention blocks the LayerNorm eps of `segment_anything`
            (1e-5, PyTorch's default) instead of transformers' 1e-6. F-LMM was trained on `segment_anything`;
            with 1e-6 the refined logits move by about 2e-5 (measured on the reference fixture), with 1e-5 they
            match to float precision.
    """

    def __init__(self, sam: SamConfig | SamModel, match_segment_anything: bool = True):
        super().__init__()
        self.sam = sam if isinstance(sam, SamModel) else SamModel(copy.deepcopy(sam))
        self.sam.vision_encoder.requires_grad_(False)
        self.sam.vision_encoder.eval()
        # segment_anything keeps the random-Fourier matrix as a buffer, so F-LMM never trained it.
        self.sam.prompt_encoder.shared_embedding.positional_embedding.requires_grad_(False)
        for name, param in self.sam.named_parameters():
            if name.startswith(UNUSED_SAM_PARAMETERS):
                param.requires_grad_(False)
        if match_segment_anything:
            for layer in self.sam.mask_decoder.transformer.layers:
                for norm in (layer.layer_norm1, layer.layer_norm2, layer.layer_norm3, layer.layer_norm4):
                    norm.eps = 1e-5

    @property
    def config(self) -> SamConfig:
        return self.sam.config

    def trained_modules(self) -> dict[str, nn.Module]:
        """The trained parts of SAM by their names under this module (`sam.prompt_encoder`, `sam.mask_decoder`)."""
        return {f"sam.{name}": getattr(self.sam, name) for name in TRAINED_SAM_PARTS}

    def train(self, mode: bool = True) -> SamRefiner:
        super().train(mode)
        self.sam.vision_encoder.eval()  # frozen: never in training mode (as the original)
        return self

    @property
    def image_size(self) -> int:
        """Side of SAM's square input (1024)."""
        return self.config.prompt_encoder_config.image_size

    @property
    def mask_prompt_size(self) -> int:
        """Side of the dense mask prompt (4 x the image-embedding side: 256)."""
        return 4 * self.config.prompt_encoder_config.image_embedding_size

    @torch.no_grad()
    def image_embeddings(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen SAM image encoder: `[B, 3, 1024, 1024]` -> `[B, 256, 64, 64]` (no gradient)."""
        return self.sam.get_image_embeddings(sam_pixel_values)

    def mask_prompts(self, coarse_logits: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
        """Dense mask prompts from coarse logits, as the original refiner makes them.

        The logits are resized (bilinear) to SAM's resized-image size, padded bottom/right to the
        1024 square with `min(-1, min logit)` (the minimum over ALL given phrases, as the original does
        for the phrases of one image), then resized to 256 x 256.

        Args:
            coarse_logits (`torch.Tensor` of shape `(K, h, w)`): coarse logits cropped to the image.
            input_size (`(height, width)`): `sam_input_size(original_size)`.

        Returns:
            `torch.Tensor` of shape `(K, 1, 256, 256)`.
        """
        if coarse_logits.shape[-2] == 0 or coarse_logits.shape[-1] == 0:
            raise ValueError(
                f"coarse logits of shape {tuple(coarse_logits.shape)} have no pixels; crop them with "
                "mask_head.crop_to_content, which keeps at least one row and column"
            )
        if coarse_logits.shape[0] == 0:  # no phrases: no prompts
            size = (self.mask_prompt_size, self.mask_prompt_size)
            return coarse_logits.new_zeros((0, 1) + size)
        pad_value = min(-1.0, coarse_logits.min().item())
        masks = F.interpolate(coarse_logits[:, None].float(), size=tuple(input_size), mode="bilinear")
        masks = masks.to(coarse_logits.dtype)
        height, width = masks.shape[-2:]
        masks = F.pad(masks, (0, self.image_size - width, 0, self.image_size - height), value=pad_value)
        size = (self.mask_prompt_size, self.mask_prompt_size)
        return F.interpolate(masks.float(), size=size, mode="bilinear").to(coarse_logits.dtype)

    @torch.no_grad()
    def box_prompts(self, coarse_logits: torch.Tensor, original_size: Sequence[int]) -> torch.Tensor:
        """Box prompts `[x0, y0, x1 + 1, y1 + 1]` of the coarse masks, in original-image pixels.

        The mask is `sigmoid(logits)` resized (bilinear) to the original size, `> 0.5`; an empty mask
        gives the whole image `[0, 0, W, H]`. No gradient flows through boxes (as the original).

        Args:
            coarse_logits (`torch.Tensor` of shape `(K, h, w)`).
            original_size (`(H, W)`).

        Returns:
            `torch.Tensor` of shape `(K, 4)`, float32.
        """
        height, width = (int(v) for v in original_size)
        probs = F.interpolate(coarse_logits.detach()[None].float().sigmoid(), size=(height, width), mode="bilinear")
        masks = probs[0] > 0.5  # [K, H, W]
        rows, cols = masks.any(dim=2), masks.any(dim=1)  # [K, H], [K, W]
        row_ids = torch.arange(height, device=masks.device)
        col_ids = torch.arange(width, device=masks.device)
        y0 = torch.where(rows, row_ids, height).amin(dim=1)
        y1 = torch.where(rows, row_ids, -1).amax(dim=1) + 1
        x0 = torch.where(cols, col_ids, width).amin(dim=1)
        x1 = torch.where(cols, col_ids, -1).amax(dim=1) + 1
        boxes = torch.stack([x0, y0, x1, y1], dim=1)
        empty = ~rows.any(dim=1)
        whole = torch.tensor([0, 0, width, height], device=boxes.device)
        return torch.where(empty[:, None], whole, boxes).float()

    def scale_boxes(self, boxes: torch.Tensor, original_size: Sequence[int]) -> torch.Tensor:
        """Original-image boxes -> SAM input coordinates (`ResizeLongestSide.apply_boxes`, in float64)."""
        height, width = (int(v) for v in original_size)
        new_h, new_w = sam_input_size((height, width), self.image_size)
        scale = torch.tensor([new_w / width, new_h / height] * 2, dtype=torch.float64, device=boxes.device)
        return (boxes.double() * scale).float()

    def forward(
        self,
        image_embeddings: torch.Tensor,
        coarse_logits: torch.Tensor,
        text_embeds: Sequence[torch.Tensor],
        original_size: Sequence[int],
    ) -> torch.Tensor:
        """Refine the coarse masks of the phrases of ONE image.

        Args:
            image_embeddings (`torch.Tensor` of shape `(1, 256, 64, 64)`):
                `self.image_embeddings(sam_pixel_values)` of the image.
            coarse_logits (`torch.Tensor` of shape `(K, h, w)`):
                coarse mask logits cropped to the image region (`crop_to_content`).
            text_embeds (list of `K` tensors of shape `(n_k, 256)`):
                text prompt tokens of each phrase (`TextProjection`); `n_k` may differ.
            original_size (`(H, W)`): original image size.

        Returns:
            `torch.Tensor` of shape `(K, H, W)`: refined mask logits at the original size.
        """
        num_phrases = coarse_logits.shape[0]
        if len(text_embeds) != num_phrases:
            raise ValueError(f"got {len(text_embeds)} text embeddings for {num_phrases} coarse masks")
        height, width = (int(v) for v in original_size)
        input_size = sam_input_size((height, width), self.image_size)
        dtype = image_embeddings.dtype

        prompt_masks = self.mask_prompts(coarse_logits, input_size)  # [K, 1, 256, 256]
        boxes = self.scale_boxes(self.box_prompts(coarse_logits, (height, width)), (height, width))  # [K, 4]
        # Box tokens: [K, 1, 2, 256]; dense prompts: [K, 256, 64, 64].
        sparse, dense = self.sam.prompt_encoder(
            input_points=None, input_labels=None, input_boxes=boxes[:, None].to(dtype), input_masks=prompt_masks
        )
        # segment_anything's `get_dense_pe`: SamModel ties this matrix to the prompt encoder's.
        image_pe = self.sam.get_image_wide_positional_embeddings()

        # Phrases have different numbers of text tokens. Rather than padding (which would need masks in
        # the decoder's self- and image-to-token attention), phrases with the same token count run as
        # one batch and the groups run in turn: exact, with no padding tokens.
        low_res = coarse_logits.new_zeros(num_phrases, self.mask_prompt_size, self.mask_prompt_size, dtype=dtype)
        counts = [int(t.shape[0]) for t in text_embeds]
        for count in sorted(set(counts)):
            ids = [k for k, c in enumerate(counts) if c == count]
            group = len(ids)
            texts = torch.stack([text_embeds[k] for k in ids]).to(dtype)  # [G, n, 256]
            tokens = torch.cat([sparse[ids].to(dtype), texts[:, None]], dim=2)  # [G, 1, 2 + n, 256]
            masks, _ = self.sam.mask_decoder(
                image_embeddings=image_embeddings.expand(group, -1, -1, -1),
                image_positional_embeddings=image_pe.to(dtype).expand(group, -1, -1, -1),
                sparse_prompt_embeddings=tokens,
                dense_prompt_embeddings=dense[ids].to(dtype),
                multimask_output=False,
            )  # [G, 1, 1, 256, 256]
            low_res = low_res.index_copy(0, torch.tensor(ids, device=low_res.device), masks[:, 0, 0])

        return self.postprocess_masks(low_res, input_size, (height, width))

    def postprocess_masks(
        self, low_res_masks: torch.Tensor, input_size: Sequence[int], original_size: Sequence[int]
    ) -> torch.Tensor:
        """`[K, 256, 256]` decoder logits -> `[K, H, W]`: upsample to 1024, drop SAM's padding, resize.

        `segment_anything`'s `Sam.postprocess_masks`, on logits (transformers has it only in `SamImageProcessor`,
        whose default backend needs torchvision).
        """
        masks = F.interpolate(
            low_res_masks[:, None], size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        masks = masks[..., : int(input_size[0]), : int(input_size[1])]
        masks = F.interpolate(masks, size=tuple(int(v) for v in original_size), mode="bilinear", align_corners=False)
        return masks[:, 0]

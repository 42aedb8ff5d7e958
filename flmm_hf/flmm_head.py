"""The trained part of F-LMM: from phrase attention maps to mask logits and losses.

`FLMMHead` holds everything F-LMM trains: the U-Net mask head, the per-layer weights and text projection
of the phrase embeddings, and the SAM refiner (whose SAM image encoder stays frozen). It knows nothing of
the LMM: its inputs are tensors.

    maps [K_b, C, h, w] per example  --coarse_logits-->  [K_b, h', w'] cropped to the image content
    coarse + phrase hidden states + SAM pixels  --refined_logits-->  [K_b, H_b, W_b] at the original size
    coarse / refined logits + ground-truth masks  --losses-->  BCE + Dice (and accuracy / IoU for logging)

`trained_modules()` names the trained sub-modules; the adapter-sized save is exactly their state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import SamConfig, SamModel

from .losses import mask_losses
from .mask_head import UNetMaskHead, crop_to_content
from .sam_refiner import SamRefiner, TextProjection

# Width of SAM's prompt tokens, which the text projection produces.
SAM_PROMPT_WIDTH = 256


class FLMMHead(nn.Module):
    """
    U-Net mask head, text projection and SAM refiner of F-LMM.

    Args:
        in_channels (`int`): attention maps per phrase (grids x captured layers x heads).
        num_text_layers (`int`): decoder layers of the LMM (one text-projection weight each).
        text_hidden_size (`int`): hidden size of the LMM.
        base_channels (`int`, *optional*, defaults to 64): width of the first U-Net stage.
        num_stages (`int`, *optional*, defaults to 4): U-Net encoder stages.
        sam (`SamModel` or `SamConfig`, *optional*): the SAM the refiner is built around (see `SamRefiner`);
            `None` builds neither the refiner nor the text projection, whose embeddings only prompt SAM.
    """

    def __init__(
        self,
        in_channels: int,
        num_text_layers: int,
        text_hidden_size: int,
        base_channels: int = 64,
        num_stages: int = 4,
        sam: SamModel | SamConfig | None = None,
    ):
        super().__init__()
        self.mask_head = UNetMaskHead(in_channels=in_channels, base_channels=base_channels, num_stages=num_stages)
        self.text_projection = None
        self.sam_refiner = None
        if sam is not None:
            self.text_projection = TextProjection(num_text_layers, text_hidden_size, out_size=SAM_PROMPT_WIDTH)
            self.sam_refiner = SamRefiner(sam)

    @property
    def has_refiner(self) -> bool:
        return self.sam_refiner is not None

    # ---- what is trained ------------------------------------------------------------------------
    def trained_modules(self) -> dict[str, nn.Module]:
        """The trained sub-modules by their names under this head; everything else (SAM's image encoder) is frozen."""
        modules: dict[str, nn.Module] = {"mask_head": self.mask_head}
        if self.sam_refiner is not None:
            modules["text_projection"] = self.text_projection
            modules.update({f"sam_refiner.{name}": m for name, m in self.sam_refiner.trained_modules().items()})
        return modules

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The state of `trained_modules()`, keyed by names under this head."""
        return {
            f"{name}.{key}": value
            for name, module in self.trained_modules().items()
            for key, value in module.state_dict().items()
        }

    def attach_sam(self, sam: SamModel) -> None:
        """Refine with `sam` (e.g. loaded after the trained weights): it receives this head's trained prompt
        encoder and mask decoder, and its image encoder is used as the frozen one."""
        if self.sam_refiner is None:
            raise ValueError("this head has no SAM refiner (built with use_sam=False)")
        for name, module in self.sam_refiner.trained_modules().items():
            sam.get_submodule(name.removeprefix("sam.")).load_state_dict(module.state_dict())
        self.sam_refiner = SamRefiner(sam)

    # ---- maps -> coarse logits ------------------------------------------------------------------
    def coarse_logits(
        self, maps: Sequence[torch.Tensor], canvas_sizes: torch.Tensor, content_boxes: torch.Tensor
    ) -> list[torch.Tensor]:
        """
        U-Net logits of every phrase, cropped to the image content of its example.

        Args:
            maps: per example `[K_b, C, h, w]` phrase maps on the canvas grid.
            canvas_sizes: `[B, 2]` (H, W) of the canvas the LMM saw.
            content_boxes: `[B, 4]` (top, left, bottom, right) of the image in the canvas.

        Returns:
            per example `[K_b, h_b, w_b]` logits over the image content.
        """
        head_dtype = next(self.mask_head.parameters()).dtype
        if len({m.shape[1:] for m in maps}) == 1:  # all grids agree (the usual case): one U-Net batch
            padded = list(self.mask_head(torch.cat(list(maps)).to(head_dtype)).split([m.shape[0] for m in maps]))
        else:
            padded = [self.mask_head(m.to(head_dtype)) for m in maps]
        return [
            crop_to_content(padded[b], canvas_sizes[b].tolist(), content_boxes[b].tolist()) for b in range(len(maps))
        ]

    # ---- coarse logits -> refined logits --------------------------------------------------------
    def refined_logits(
        self,
        coarse_logits: Sequence[torch.Tensor],
        phrase_hidden_states: Sequence[Sequence[torch.Tensor]],
        sam_pixel_values: torch.Tensor | None,
        original_sizes: torch.Tensor,
    ) -> list[torch.Tensor]:
        """
        SAM-refined logits at the original image size.

        Args:
            coarse_logits: per example `[K_b, h_b, w_b]` (`coarse_logits`).
            phrase_hidden_states: per example, per phrase, the LMM's decoder-layer outputs at the phrase's
                tokens, `[num_text_layers, n_k, hidden]`.
            sam_pixel_values: `[B, 3, 1024, 1024]` SAM inputs of the images.
            original_sizes: `[B, 2]` (H, W) of the original images.

        Returns:
            per example `[K_b, H_b, W_b]` logits.
        """
        if self.sam_refiner is None:
            raise ValueError("this head has no SAM refiner (built with use_sam=False)")
        if sam_pixel_values is None:
            raise ValueError("this model refines with SAM: pass sam_pixel_values (FLMMProcessor makes them)")
        image_embeddings = self.sam_refiner.image_embeddings(sam_pixel_values)  # [B, 256, 64, 64], no gradient
        refined = []
        for b, coarse in enumerate(coarse_logits):
            if coarse.shape[0] == 0:  # no phrases: nothing to prompt SAM with
                height, width = (int(v) for v in original_sizes[b].tolist())
                refined.append(coarse.new_zeros(0, height, width))
                continue
            text_embeds = [self.text_projection(hidden) for hidden in phrase_hidden_states[b]]  # [n_k, 256] each
            original_size = tuple(original_sizes[b].tolist())
            refined.append(self.sam_refiner(image_embeddings[b : b + 1], coarse, text_embeds, original_size))
        return refined

    # ---- losses ---------------------------------------------------------------------------------
    @staticmethod
    def losses(
        coarse_logits: Sequence[torch.Tensor],
        refined_logits: Sequence[torch.Tensor] | None,
        masks: Sequence[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """
        Coarse and refined BCE + Dice: means over all phrases of the batch, which equal the original's
        per-example losses weighted by phrase count.

        Returns:
            `loss` (the sum of the four losses, or two without refined logits), `loss_bce`, `loss_dice`,
            `accuracy`, `aiou` of the coarse logits, and the same with a `sam_` prefix for the refined ones.
        """
        if len(masks) != len(coarse_logits):
            raise ValueError(f"got {len(masks)} mask tensors for {len(coarse_logits)} examples")
        groups = {"": coarse_logits} if refined_logits is None else {"": coarse_logits, "sam_": refined_logits}
        out: dict[str, torch.Tensor] = {}
        loss = 0
        for prefix, predictions in groups.items():
            parts = mask_losses(predictions, masks)
            out.update({prefix + name: value for name, value in parts.items()})
            loss = loss + parts["loss_bce"] + parts["loss_dice"]
        out["loss"] = loss
        return out

"""F-LMM: grounding a frozen large multimodal model (Wu et al., CVPR 2025).

Reads top to bottom as the method does: the frozen LMM runs once while its word-to-image
attention is captured -> the attention rows of each phrase are merged into maps laid out on
the image grid -> a U-Net turns the maps into coarse mask logits -> a SAM refiner, prompted by
the coarse mask, its box and the phrase's text embedding, refines them -> BCE + Dice losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageTextToText, PreTrainedModel
from transformers.utils import ModelOutput

from .attention_capture import AttentionCapture, enable_capture
from .configuration_flmm import DEFAULT_SAM, FLMMConfig
from .image_layout import example_image_inputs, get_image_layout
from .losses import mask_losses
from .mask_head import UNetMaskHead, crop_to_content
from .sam_refiner import SamRefiner, TextProjection

# Forward arguments that describe the batch rather than the backbone's image inputs.
_FLMM_INPUTS = (
    "input_ids",
    "attention_mask",
    "phrase_ids",
    "original_sizes",
    "canvas_sizes",
    "content_boxes",
    "sam_pixel_values",
    "masks",
)


@dataclass
class FLMMOutput(ModelOutput):
    """
    Output of [`FLMMForGrounding.forward`]. Per-example tensors are lists because examples have
    different numbers of phrases and image sizes.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Coarse BCE + Dice plus refined BCE + Dice (method.md 3.7), when `masks` are given.
        coarse_logits (`list[torch.FloatTensor]`):
            One `[K_b, h_b, w_b]` tensor per example: U-Net logits cropped to the image content.
        refined_logits (`list[torch.FloatTensor]`, *optional*):
            One `[K_b, H_b, W_b]` tensor per example at the original image size (SAM refiner).
        loss_mask, loss_dice, sam_loss_mask, sam_loss_dice (`torch.FloatTensor`, *optional*):
            The loss parts of the coarse (`loss_*`) and refined (`sam_loss_*`) masks.
        accuracy, aiou, sam_accuracy, sam_aiou (`torch.FloatTensor`, *optional*):
            Pixel accuracy and mean IoU at threshold 0.5, for logging.
    """

    loss: torch.FloatTensor | None = None
    coarse_logits: list[torch.FloatTensor] | None = None
    refined_logits: list[torch.FloatTensor] | None = None
    loss_mask: torch.FloatTensor | None = None
    loss_dice: torch.FloatTensor | None = None
    sam_loss_mask: torch.FloatTensor | None = None
    sam_loss_dice: torch.FloatTensor | None = None
    accuracy: torch.FloatTensor | None = None
    aiou: torch.FloatTensor | None = None
    sam_accuracy: torch.FloatTensor | None = None
    sam_aiou: torch.FloatTensor | None = None


def _mark_initialized(module: nn.Module) -> None:
    # `post_init` would otherwise re-run the backbone's `_init_weights` over pretrained weights.
    for m in module.modules():
        m._is_hf_initialized = True


# SAM parameters that F-LMM's prompts never reach (no point prompts, a mask prompt is always
# given, the IoU prediction is not trained). Freezing them changes nothing (AdamW skips
# parameters without gradients) and lets DDP run without `find_unused_parameters`.
UNUSED_SAM_PARAMETERS = (
    "prompt_encoder.no_mask_embed.",
    "prompt_encoder.point_embed.0.",
    "prompt_encoder.point_embed.1.",
    "prompt_encoder.not_a_point_embed.",
    "mask_decoder.iou_prediction_head.",
)


class FLMMPreTrainedModel(PreTrainedModel):
    config_class = FLMMConfig
    base_model_prefix = "flmm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The head modules initialise themselves as the original does (mmcv's Kaiming convs);
        # only the per-layer text weights need their value restated (equal, as in the paper).
        if isinstance(module, TextProjection):
            module.layer_weights.fill_(1.0)


class FLMMForGrounding(FLMMPreTrainedModel):
    """
    A frozen image-text-to-text model plus the F-LMM head: U-Net mask head over word-to-image
    attention, per-layer weights and text projection, and an optional SAM refiner.

    The LMM never receives gradients and stays in eval mode even when the model is in train
    mode. Build a new, untrained model with [`FLMMForGrounding.from_lmm`].
    """

    # Frozen parts are referenced by name in the config, not saved (design.md decision 1).
    _keys_to_ignore_on_save = [r"^lmm\.", r"^sam_refiner\.vision_encoder\."]
    _keys_to_ignore_on_load_missing = [r"^lmm\.", r"^sam_refiner\.vision_encoder\."]

    def __init__(self, config: FLMMConfig, lmm: PreTrainedModel | None = None, sam: nn.Module | None = None):
        super().__init__(config)
        lmm_config = config.get_lmm_config()
        if lmm is None:
            lmm = AutoModelForImageTextToText.from_config(lmm_config)
        self.lmm = lmm
        self.lmm.requires_grad_(False)
        self.lmm.eval()
        enable_capture(self.lmm)
        self.layout = get_image_layout(self.lmm.config)

        text_config = lmm_config.get_text_config(decoder=True)
        self.mask_head = UNetMaskHead(
            in_channels=config.mask_head_in_channels,
            base_channels=config.mask_head_channels,
            num_stages=config.mask_head_stages,
        )
        self.text_projection = TextProjection(
            num_layers=text_config.num_hidden_layers, hidden_size=text_config.hidden_size, out_size=256
        )
        self.sam_refiner = SamRefiner(sam if sam is not None else config.get_sam_config()) if config.use_sam else None
        if self.sam_refiner is not None:
            for name, param in self.sam_refiner.named_parameters():
                if name.startswith(UNUSED_SAM_PARAMETERS):
                    param.requires_grad_(False)
        _mark_initialized(self.lmm)
        if self.sam_refiner is not None:
            _mark_initialized(self.sam_refiner.vision_encoder)
        self.post_init()

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_lmm(
        cls,
        lmm: str | PreTrainedModel,
        sam: str | nn.Module | Any | None = None,
        *,
        lmm_revision: str | None = None,
        sam_revision: str | None = None,
        **config_overrides: Any,
    ) -> "FLMMForGrounding":
        """
        A new, untrained F-LMM around a frozen backbone.

        Args:
            lmm: Hub id / local folder of an image-text-to-text model, or a loaded model.
            sam: Hub id / folder of a SAM checkpoint, a loaded `SamModel`, or a `SamConfig`
                (random SAM, for tests). `None` means `facebook/sam-vit-large`; pass
                `use_sam=False` to build without the refiner.
            config_overrides: any [`FLMMConfig`] field (`attention_layers`, `merge`, `mode`, ...).
        """
        from transformers import SamConfig, SamModel

        lmm_name = None
        if isinstance(lmm, str):
            lmm_name = lmm
            lmm = AutoModelForImageTextToText.from_pretrained(lmm, revision=lmm_revision)
        elif not isinstance(lmm, PreTrainedModel):
            raise TypeError(f"lmm must be a model name/path or a PreTrainedModel, got {type(lmm).__name__}")
        else:
            lmm_name = getattr(lmm, "name_or_path", None) or None

        use_sam = config_overrides.get("use_sam", True)
        sam_name: str | None = None
        sam_model = None
        if use_sam:
            if sam is None:
                sam = DEFAULT_SAM
            if isinstance(sam, str):
                sam_name = sam
                sam_model = SamModel.from_pretrained(sam, revision=sam_revision)
            elif isinstance(sam, SamConfig):
                sam_model = SamModel(sam)
            elif isinstance(sam, SamModel):
                sam_model = sam
                sam_name = getattr(sam, "name_or_path", None) or None
            else:
                raise TypeError(f"sam must be a name/path, SamModel or SamConfig, got {type(sam).__name__}")

        layout = get_image_layout(lmm.config)
        config_overrides.setdefault("num_grids", layout.num_grids)
        config = FLMMConfig(
            lmm_name_or_path=lmm_name,
            lmm_revision=lmm_revision,
            lmm_config=lmm.config,
            sam_name_or_path=sam_name,
            sam_revision=sam_revision,
            sam_config=sam_model.config if sam_model is not None else None,
            **config_overrides,
        )
        return cls(config, lmm=lmm, sam=sam_model)

    def train(self, mode: bool = True) -> "FLMMForGrounding":
        super().train(mode)
        self.lmm.eval()  # frozen: dropout and friends stay off
        if self.sam_refiner is not None:
            self.sam_refiner.vision_encoder.eval()
        return self

    @property
    def image_token_id(self) -> int:
        config = self.lmm.config
        for name in ("image_token_id", "image_token_index"):
            value = getattr(config, name, None)
            if value is not None:
                return int(value)
        raise ValueError(f"{type(config).__name__} has no image_token_id: cannot locate image tokens")

    # ---- 1-3: attention -> per-phrase maps ---------------------------------------------------
    def _run_lmm(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, phrase_ids: torch.Tensor, image_inputs: dict
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        """One frozen forward; returns per-example attention [layers, heads, n_query, n_image] and hidden states."""
        if phrase_ids.shape != input_ids.shape:
            raise ValueError(f"phrase_ids {tuple(phrase_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
        image_mask = input_ids == self.image_token_id
        if not image_mask.any(dim=1).all():
            raise ValueError("every example needs image tokens in input_ids; found an example without any")
        with torch.no_grad():
            with AttentionCapture(
                self.lmm, layers=self.config.selected_layers, query_mask=phrase_ids >= 0, key_mask=image_mask
            ) as capture:
                outputs = self.lmm(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    output_hidden_states=True,
                    use_cache=False,
                    return_dict=True,
                    **image_inputs,
                )
        num_layers = self.config.num_text_layers
        hidden_states = outputs.hidden_states[-num_layers:]  # decoder layer outputs, embeddings excluded
        return capture.attentions, hidden_states

    def _phrase_maps(
        self, attentions: torch.Tensor, input_ids: torch.Tensor, phrase_ids: torch.Tensor, image_inputs: dict
    ) -> torch.Tensor:
        """Merge one example's attention rows per phrase and lay them on the image grid(s) -> [K, C, h, w]."""
        query_phrase = phrase_ids[phrase_ids >= 0]  # phrase id of each captured query row
        num_phrases = int(query_phrase.max()) + 1
        layers, heads = attentions.shape[:2]
        merged = []
        for k in range(num_phrases):
            rows = attentions[:, :, query_phrase == k]  # [layers, heads, n_k, n_image]
            if rows.shape[2] == 0:
                raise ValueError(f"phrase {k} has no tokens; phrase ids must be 0..K-1 without gaps")
            merged.append(rows.mean(2) if self.config.merge == "mean" else rows.amax(2))
        merged = torch.stack(merged).flatten(1, 2)  # [K, layers*heads, n_image], layer-major as the original

        # Column j of the captured maps is the j-th image token; grids give sequence positions.
        image_positions = (input_ids == self.image_token_id).nonzero().squeeze(1)
        column_of_position = torch.full_like(input_ids, -1)
        column_of_position[image_positions] = torch.arange(len(image_positions), device=input_ids.device)
        grids = self.layout.grids(input_ids, image_inputs)
        per_grid = [merged[:, :, column_of_position[grid]] for grid in grids]  # [K, C, h_g, w_g] each
        return self.layout.merge(per_grid)

    def _all_phrase_maps(
        self,
        attentions: list[torch.Tensor],
        input_ids: torch.Tensor,
        phrase_ids: torch.Tensor,
        image_inputs: dict,
        original_sizes: torch.Tensor | None,
    ) -> list[torch.Tensor]:
        # Tiled layouts may need the original size to know the tile arrangement.
        layout_inputs = dict(image_inputs, original_sizes=original_sizes) if original_sizes is not None else image_inputs
        return [
            self._phrase_maps(attentions[b], input_ids[b], phrase_ids[b], example_image_inputs(layout_inputs, b))
            for b in range(input_ids.shape[0])
        ]

    def phrase_attention(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        phrase_ids: torch.Tensor,
        **image_inputs: Any,
    ) -> list[torch.Tensor]:
        """
        The merged word-to-image attention maps that the mask head receives.

        Takes the processor's output (keys the LMM does not take, such as `masks` or
        `sam_pixel_values`, are ignored).

        Returns:
            One float32 tensor per example of shape `[K, C, h, w]` (K phrases, C =
            `config.mask_head_in_channels`, (h, w) the image-token grid).
        """
        original_sizes = image_inputs.get("original_sizes")
        image_inputs = {k: v for k, v in image_inputs.items() if k not in _FLMM_INPUTS and v is not None}
        attentions, _ = self._run_lmm(input_ids, attention_mask, phrase_ids, image_inputs)
        return self._all_phrase_maps(attentions, input_ids, phrase_ids, image_inputs, original_sizes)

    # ---- 4: U-Net over all phrases of the batch --------------------------------------------
    def _coarse_logits(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run the head on all phrases at once when the grids agree (the usual case), else per example."""
        head_dtype = next(self.mask_head.parameters()).dtype
        if len({m.shape[1:] for m in maps}) == 1:
            logits = self.mask_head(torch.cat(maps).to(head_dtype))
            return list(logits.split([m.shape[0] for m in maps]))
        return [self.mask_head(m.to(head_dtype)) for m in maps]

    # ---- full forward ------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        phrase_ids: torch.Tensor,
        original_sizes: torch.Tensor,
        canvas_sizes: torch.Tensor,
        content_boxes: torch.Tensor,
        sam_pixel_values: torch.Tensor | None = None,
        masks: list[torch.Tensor] | None = None,
        **image_inputs: Any,
    ) -> FLMMOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `[B, L]`): prompt + answer, padded.
            attention_mask (`torch.LongTensor` of shape `[B, L]`).
            phrase_ids (`torch.LongTensor` of shape `[B, L]`): -1, or k for the tokens of phrase k.
            original_sizes (`torch.LongTensor` of shape `[B, 2]`): (H, W) of each original image.
            canvas_sizes (`torch.LongTensor` of shape `[B, 2]`): the canvas the LMM saw, in original pixels.
            content_boxes (`torch.LongTensor` of shape `[B, 4]`): (top, left, bottom, right) of the image in the canvas.
            sam_pixel_values (`torch.FloatTensor` of shape `[B, 3, 1024, 1024]`, *optional*): SAM's input; required with SAM.
            masks (`list[torch.BoolTensor]`, *optional*): `[K_b, H_b, W_b]` ground truth at the original size.
            image_inputs: `pixel_values` and whatever else the backbone takes (`image_sizes`, `image_grid_thw`, ...).
        """
        image_inputs = {k: v for k, v in image_inputs.items() if v is not None}
        attentions, hidden_states = self._run_lmm(input_ids, attention_mask, phrase_ids, image_inputs)
        batch = input_ids.shape[0]
        maps = self._all_phrase_maps(attentions, input_ids, phrase_ids, image_inputs, original_sizes)
        padded_logits = self._coarse_logits(maps)
        coarse = [
            crop_to_content(padded_logits[b], canvas_sizes[b].tolist(), content_boxes[b].tolist()) for b in range(batch)
        ]

        refined = None
        if self.sam_refiner is not None:
            if sam_pixel_values is None:
                raise ValueError("this model refines with SAM: pass sam_pixel_values (FLMMProcessor makes them)")
            # [layers, B, L, D] -> weighted sum over layers per token, then to SAM's prompt width
            stacked = torch.stack(hidden_states)
            with torch.no_grad():
                image_embeddings = self.sam_refiner.image_embeddings(sam_pixel_values)
            refined = []
            for b in range(batch):
                token_phrase = phrase_ids[b]
                text_embeds = [
                    self.text_projection(stacked[:, b, token_phrase == k]) for k in range(coarse[b].shape[0])
                ]
                refined.append(
                    self.sam_refiner(
                        image_embeddings[b : b + 1], coarse[b], text_embeds, tuple(original_sizes[b].tolist())
                    )
                )

        output = FLMMOutput(coarse_logits=coarse, refined_logits=refined)
        if masks is not None:
            self._add_losses(output, masks)
        return output

    def _add_losses(self, output: FLMMOutput, masks: list[torch.Tensor]) -> None:
        """Coarse and refined BCE + Dice: means over all phrases of the batch, which equal the
        original's per-example losses weighted by phrase count."""
        if len(masks) != len(output.coarse_logits):
            raise ValueError(f"got {len(masks)} mask tensors for {len(output.coarse_logits)} examples")
        groups = {"": output.coarse_logits}
        if output.refined_logits is not None:
            groups["sam_"] = output.refined_logits
        loss = 0
        for prefix, predictions in groups.items():
            parts = mask_losses(predictions, masks)
            for name, value in parts.items():
                setattr(output, prefix + name, value)
            loss = loss + parts["loss_mask"] + parts["loss_dice"]
        output.loss = loss

    # ---- convenience -------------------------------------------------------------------------
    @torch.no_grad()
    def ground(
        self,
        image: Any,
        text: str,
        phrases: list[str] | list[tuple[int, int]],
        processor: Any | None = None,
        threshold: float = 0.5,
        use_refiner: bool = True,
    ) -> torch.BoolTensor:
        """
        Ground `phrases` (substrings of `text`, or character spans) in `image`.

        Returns:
            `torch.BoolTensor` of shape `[len(phrases), H, W]` at the original image size.
        """
        processor = processor if processor is not None else getattr(self, "processor", None)
        if processor is None:
            raise ValueError(
                "ground() needs an FLMMProcessor: pass processor=FLMMProcessor.from_pretrained(...) "
                "or set model.processor"
            )
        inputs = processor(
            images=[image], texts=[text], phrases=[list(phrases)], return_tensors="pt",
            return_sam_inputs=self.sam_refiner is not None,
        )
        device = next(self.mask_head.parameters()).device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        output = self(**inputs)
        logits = output.refined_logits if (use_refiner and output.refined_logits is not None) else output.coarse_logits
        return processor.post_process_masks(logits, inputs["original_sizes"], threshold=threshold)[0]

    # ---- grounded conversation (flmm_hf/grounded_chat.py) -------------------------------------
    def chat(self, image: Any, question: str, phrases: list[str] | None = None, processor: Any | None = None, **generate_kwargs: Any):
        """The frozen LMM answers `question` about `image`, and the phrases of its answer are grounded.

        See `grounded_chat.chat` for the arguments; returns a `GroundedAnswer`.
        """
        from .grounded_chat import chat

        return chat(self, image, question, phrases=phrases, processor=processor, **generate_kwargs)

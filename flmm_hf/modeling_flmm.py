"""F-LMM: grounding a frozen large multimodal model (Wu et al., CVPR 2025).

Reads top to bottom as the method does:

1. the frozen LMM runs once over prompt + answer while the exact attention probabilities from the phrase tokens
   to the image tokens are captured, for every selected layer and head (`capture_attention`);
2. the rows of each phrase are averaged (or max-pooled) and laid out on the image-token grid(s) (`phrase_maps`);
3. the trained head (`FLMMHead`) turns the maps into coarse mask logits with a U-Net, refines them with SAM
   prompted by the coarse mask, its box and the phrase's text embedding, and computes BCE + Dice losses.

Building a new model (`from_lmm`), saving and loading live in `frozen_parts.FrozenPartsMixin`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, PreTrainedModel, SamModel
from transformers.utils import ModelOutput

from .attention_capture import AttentionCapture
from .configuration_flmm import FLMMConfig
from .flmm_head import FLMMHead
from .frozen_parts import FrozenPartsMixin, FrozenPlaceholder, freeze_lmm, mark_initialized, present_no_split_modules
from .image_layout import example_image_inputs, get_image_layout, images_per_example
from .processing_flmm import backbone_image_inputs, check_threshold
from .sam_refiner import TextProjection

logger = logging.getLogger(__name__)


@dataclass
class FLMMOutput(ModelOutput):
    """
    Output of [`FLMMForGrounding.forward`]. Per-example tensors are lists because examples have
    different numbers of phrases and image sizes.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Coarse BCE + Dice plus refined BCE + Dice, when `masks` are given.
        coarse_logits (`list[torch.FloatTensor]`):
            One `[K_b, h_b, w_b]` tensor per example: U-Net logits cropped to the image content.
        refined_logits (`list[torch.FloatTensor]`, *optional*):
            One `[K_b, H_b, W_b]` tensor per example at the original image size (SAM refiner).
        loss_bce, loss_dice, sam_loss_bce, sam_loss_dice (`torch.FloatTensor`, *optional*):
            The loss parts of the coarse (`loss_*`) and refined (`sam_loss_*`) masks.
        accuracy, aiou, sam_accuracy, sam_aiou (`torch.FloatTensor`, *optional*):
            Pixel accuracy and mean IoU at threshold 0.5, for logging.
    """

    loss: torch.FloatTensor | None = None
    coarse_logits: list[torch.FloatTensor] | None = None
    refined_logits: list[torch.FloatTensor] | None = None
    loss_bce: torch.FloatTensor | None = None
    loss_dice: torch.FloatTensor | None = None
    sam_loss_bce: torch.FloatTensor | None = None
    sam_loss_dice: torch.FloatTensor | None = None
    accuracy: torch.FloatTensor | None = None
    aiou: torch.FloatTensor | None = None
    sam_accuracy: torch.FloatTensor | None = None
    sam_aiou: torch.FloatTensor | None = None


def phrase_hidden_states(
    hidden_states: tuple[torch.Tensor, ...], phrase_ids: torch.Tensor, num_phrases: list[int]
) -> list[list[torch.Tensor]]:
    """Per example, per phrase: the decoder layers' outputs at the phrase's tokens, `[layers, n_k, hidden]`."""
    stacked = torch.stack(hidden_states)  # [layers, B, L, hidden]
    return [[stacked[:, b, phrase_ids[b] == k] for k in range(count)] for b, count in enumerate(num_phrases)]


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


class FLMMForGrounding(FrozenPartsMixin, FLMMPreTrainedModel):
    """
    A frozen image-text-to-text model (`lmm`) plus the trained F-LMM head (`head`): a U-Net over word-to-image
    attention maps, per-layer weights and a text projection, and an optional SAM refiner.

    The LMM never receives gradients and stays in eval mode even when the model is in train mode. No state of a
    call is kept on the model: one model may serve several threads. Build a new, untrained model with
    [`FLMMForGrounding.from_lmm`]; load a saved one with [`FLMMForGrounding.from_pretrained`] (both, and
    `save_pretrained`, come from `FrozenPartsMixin`: the frozen parts are referenced, not saved).
    """

    def __init__(self, config: FLMMConfig, lmm: PreTrainedModel | None = None, sam: SamModel | None = None, *,
                 _defer_frozen: bool = False):
        super().__init__(config)
        lmm_config = config.get_lmm_config()
        text_config = lmm_config.get_text_config(decoder=True)
        if _defer_frozen:
            # Set by `from_pretrained` only: this runs on the meta device, where a nested `from_pretrained` fails and
            # a model built here would lose its non-persistent buffers (RoPE inv_freq) to the loader. Placeholders
            # hold the frozen parts' slots until `attach_frozen_parts`.
            self.lmm = FrozenPlaceholder("the frozen LMM")
        else:
            self.lmm = freeze_lmm(lmm if lmm is not None else AutoModelForImageTextToText.from_config(lmm_config))
        self.layout = get_image_layout(lmm_config if _defer_frozen else self.lmm.config)
        # Derived once, read by every forward.
        self.captured_layers = config.selected_layers
        self.num_text_layers = text_config.num_hidden_layers
        if config.use_sam and sam is None:
            sam = config.get_sam_config()
        self.head = FLMMHead(
            in_channels=config.mask_head_in_channels,
            num_text_layers=text_config.num_hidden_layers,
            text_hidden_size=text_config.hidden_size,
            base_channels=config.mask_head_channels,
            num_stages=config.mask_head_stages,
            sam=sam if config.use_sam else None,
        )
        if self.head.has_refiner:
            if _defer_frozen:  # the frozen parts of SAM come with the SAM that `attach_frozen_parts` receives
                self.head.sam_refiner.sam.vision_encoder = FrozenPlaceholder("SAM's image encoder")
                self.head.sam_refiner.sam.shared_image_embedding = FrozenPlaceholder("SAM's positional embedding")
            mark_initialized(self.head.sam_refiner.sam)
        self.post_init()
        # Only classes present: accelerate's FSDP wrap policy refuses a listed class it cannot find.
        self._no_split_modules = present_no_split_modules(self)
        if not _defer_frozen and self.lmm.device.type != "meta":
            self.head.to(self.lmm.device)  # the head sits on the LMM's first device, as after from_pretrained

    def get_input_embeddings(self) -> nn.Module:
        """The frozen LMM's token embeddings (accelerate's FSDP2 shards them as a unit of their own)."""
        if isinstance(self.lmm, FrozenPlaceholder):
            raise NotImplementedError("the frozen LMM is not attached yet: it has no input embeddings")
        return self.lmm.get_input_embeddings()

    @property
    def image_token_id(self) -> int:
        """The id of the LMM's image placeholder tokens."""
        return self.layout.image_token_id

    # ---- 1. the frozen LMM, its word-to-image attention captured ---------------------------------
    def capture_attention(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        phrase_ids: torch.Tensor,
        with_hidden_states: bool = True,
        *,
        video_frame: torch.Tensor | None = None,
        **image_inputs: Any,
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...] | None]:
        """
        One frozen forward over `[B, L]` token batches (the backbone's `image_inputs` beside them).

        The attention is captured with `config.attention_numerics`: `"float32"` (the model runs SDPA; exact float32
        probabilities) or `"eager"` (the original's numerics: the language model runs eager attention in its dtype
        and the maps are its probabilities, in that dtype; see `attention_capture.eager_attention`).

        `video_frame` ([B], optional): examples with `video_frame[b] >= 0` are grounded in a video frame, so their
        video tokens are captured beside the image tokens (see `visual_token_mask`).

        Returns:
            per example the attention of its phrase tokens (`phrase_ids >= 0`) to its image tokens,
            `[layers, heads, n_phrase_tokens, n_image]` (layers `self.captured_layers`; float32, or the LMM's dtype
            with eager numerics), and with `with_hidden_states` the decoder layers' outputs (a tuple of
            `num_text_layers` tensors `[B, L, D]`).
        """
        if phrase_ids.shape != input_ids.shape:
            raise ValueError(f"phrase_ids {tuple(phrase_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
        self._check_length(attention_mask)
        image_mask = self.visual_token_mask(input_ids, video_frame)
        if not image_mask.any(dim=1).all():
            raise ValueError("every example needs image tokens in input_ids (or video tokens, grounded with "
                             "video_frame); found an example without any")
        # Without hidden states nothing after the deepest captured layer's attention is needed.
        stop_early = not with_hidden_states
        with torch.no_grad(), AttentionCapture(
            self.lmm, self.captured_layers, phrase_ids >= 0, image_mask, stop_after_last_layer=stop_early,
            numerics=self.config.attention_numerics,
        ) as capture:
            outputs = self.lmm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=with_hidden_states,  # all layers x all tokens: only the refiner reads them
                use_cache=False,
                logits_to_keep=1,  # only hidden states and attention are used: skip the vocabulary projection
                return_dict=True,
                **image_inputs,
            )
        hidden_states = outputs.hidden_states[-self.num_text_layers :] if with_hidden_states else None
        return capture.attentions, hidden_states  # hidden states: decoder layer outputs, embeddings excluded

    def visual_token_mask(self, input_ids: torch.Tensor, video_frame: torch.Tensor | None = None) -> torch.BoolTensor:
        """`[B, L]` (or `[L]`): the tokens whose attention is captured and laid out: the image tokens, plus the
        video tokens of the examples grounded in a video frame (`video_frame[b] >= 0`; layouts with a
        `video_token_id`, see `image_layout.VIDEO_GRID_MODEL_TYPES`)."""
        mask = input_ids == self.image_token_id
        if video_frame is None:
            return mask
        grounded = torch.as_tensor(video_frame, device=input_ids.device).reshape(-1, *([1] * (input_ids.dim() - 1))) >= 0
        if not grounded.any():
            return mask
        if self.layout.video_token_id is None:
            self.layout.frame_grids(input_ids, {}, int(torch.as_tensor(video_frame).max()))  # raises the reason
        return mask | ((input_ids == self.layout.video_token_id) & grounded)

    def _check_length(self, attention_mask: torch.Tensor) -> None:
        """Warn when a sequence is longer than the LMM's position limit: it runs (RoPE extrapolates), but the LMM
        never saw such positions, so its attention there, and the masks made from it, are unreliable."""
        limit = getattr(self.lmm.config.get_text_config(decoder=True), "max_position_embeddings", None)
        longest = int(attention_mask.sum(dim=1).max()) if attention_mask.numel() else 0
        if limit is not None and longest > limit:
            logger.warning(
                "a sequence has %d tokens, more than the LMM's position limit of %d (max_position_embeddings): its "
                "attention, and the masks, are unreliable past it. Shorten the text or the question, or pass "
                "max_length=%d to the processor (it refuses to cut phrases).", longest, limit, limit,
            )

    # ---- 2. per-phrase maps on the image grid -------------------------------------------------------
    def phrase_maps(
        self,
        attentions: list[torch.Tensor],
        input_ids: torch.Tensor,
        phrase_ids: torch.Tensor,
        layout_inputs: dict[str, Any],
    ) -> list[torch.Tensor]:
        """
        Merge each phrase's attention rows and lay them on the image grid(s).

        The rows are merged in the dtype of `attentions` (bf16 maps of eager numerics are averaged in bf16, as the
        original did) and the merged maps are cast to float32 before they are laid out and resized.

        Args:
            attentions: per example `[layers, heads, n_b, n_image]`, the rows of the tokens with `phrase_ids >= 0`.
            input_ids, phrase_ids: `[B, L]`; phrase k's tokens have id k (ids 0..K_b-1, no gaps).
            layout_inputs: the batch's per-image inputs the layout reads (`image_sizes`, `image_grid_thw`,
                `original_sizes`, ...); with several images per example also `num_images` and `image_index`
                ([B] each: the maps are laid on image `image_index` of each example, default its last image).

        Returns:
            per example `[K_b, C, h, w]` float32, C = `config.mask_head_in_channels` (grid-major, then layer, head).
        """
        counts = images_per_example(layout_inputs, input_ids.shape[0])
        return [
            self._example_phrase_maps(attentions[b], input_ids[b], phrase_ids[b],
                                      example_image_inputs(layout_inputs, b, counts))
            for b in range(input_ids.shape[0])
        ]

    def _example_phrase_maps(
        self, attentions: torch.Tensor, input_ids: torch.Tensor, phrase_ids: torch.Tensor, layout_inputs: dict
    ) -> torch.Tensor:
        query_phrase = phrase_ids[phrase_ids >= 0]  # phrase id of each captured row
        # An example without phrases gives K = 0 maps (and later [0, H, W] masks), not an error.
        num_phrases = int(query_phrase.max()) + 1 if query_phrase.numel() else 0
        rows_per_phrase = [attentions[:, :, query_phrase == k] for k in range(num_phrases)]
        if any(rows.shape[2] == 0 for rows in rows_per_phrase):
            raise ValueError("a phrase has no tokens; phrase ids must be 0..K-1 without gaps")
        pool = (lambda rows: rows.mean(2)) if self.config.merge == "mean" else (lambda rows: rows.amax(2))
        layers, heads, _, n_image = attentions.shape
        # Merged in the maps' dtype, then float32: the original averaged its bf16 maps in bf16 and resized in float32.
        merged = (
            torch.stack([pool(rows) for rows in rows_per_phrase]).flatten(1, 2).float()
            if rows_per_phrase
            else attentions.new_zeros(0, layers * heads, n_image, dtype=torch.float32)
        )  # [K, layers*heads, n_image]
        # Column j of the captured rows is the j-th image token; the layout's grids hold sequence positions.
        frame = int(layout_inputs.get("video_frame", -1))
        image_positions = self.visual_token_mask(input_ids, torch.tensor(frame)).nonzero().squeeze(1)
        column_of_position = torch.full_like(input_ids, -1)
        column_of_position[image_positions] = torch.arange(len(image_positions), device=input_ids.device)
        if frame >= 0:  # one temporal slice of the example's video
            grids = self.layout.frame_grids(input_ids, layout_inputs, frame)
        else:  # the grounded image's grids; the example's other images are context (columns never laid out)
            grids = self.layout.example_grids(input_ids, layout_inputs)
        return self.layout.stack([merged[:, :, column_of_position[grid]] for grid in grids])  # [K, C, h, w]

    def phrase_attention(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, phrase_ids: torch.Tensor, **inputs: Any
    ) -> list[torch.Tensor]:
        """The maps the head receives, from the processor's output (keys the LMM does not take are ignored):
        per example `[K_b, C, h, w]` (see `phrase_maps`)."""
        image_inputs = backbone_image_inputs(inputs)
        attentions, _ = self.capture_attention(input_ids, attention_mask, phrase_ids, False,
                                               video_frame=inputs.get("video_frame"), **image_inputs)
        return self.phrase_maps(attentions, input_ids, phrase_ids, dict(inputs, **image_inputs))

    # ---- 3. the whole method: attention -> maps -> head -> loss -------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        phrase_ids: torch.Tensor | None = None,
        original_sizes: torch.Tensor | None = None,
        canvas_sizes: torch.Tensor | None = None,
        content_boxes: torch.Tensor | None = None,
        sam_pixel_values: torch.Tensor | None = None,
        masks: list[torch.Tensor] | None = None,
        refine: bool = True,
        num_images: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        video_frame: torch.Tensor | None = None,
        **image_inputs: Any,
    ) -> FLMMOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `[B, L]`): prompt + answer, padded.
            attention_mask (`torch.LongTensor` of shape `[B, L]`).
            phrase_ids (`torch.LongTensor` of shape `[B, L]`): -1, or k for the tokens of phrase k. This and the
                three geometry tensors below are required (FLMMProcessor makes them); a ValueError names any missing.
            original_sizes (`torch.LongTensor` of shape `[B, 2]`): (H, W) of each original image.
            canvas_sizes (`torch.LongTensor` of shape `[B, 2]`): the canvas the LMM saw, in its pixel units.
            content_boxes (`torch.LongTensor` of shape `[B, 4]`): (top, left, bottom, right) of the image in the canvas.
            sam_pixel_values (`torch.FloatTensor` of shape `[B, 3, 1024, 1024]`, *optional*): SAM's input; required with SAM.
            masks (`list[torch.BoolTensor]`, *optional*): `[K_b, H_b, W_b]` ground truth at the original size.
            refine (`bool`, *optional*, defaults to `True`): run the SAM refiner (when the model has one).
            num_images (`torch.LongTensor` of shape `[B]`, *optional*): images per example (default one each); the
                per-image inputs (`image_grid_thw`, `image_sizes`, ...) then hold one row per image of the batch.
            image_index (`torch.LongTensor` of shape `[B]`, *optional*): the image of each example its phrases are
                grounded in (default: the last); the geometry, `sam_pixel_values` and `masks` are that image's.
            video_frame (`torch.LongTensor` of shape `[B]`, *optional*): ground example b in temporal slice
                `video_frame[b]` of its one video (`video_grid_thw`, `pixel_values_videos`; -1: in its image), for the
                families of `image_layout.VIDEO_GRID_MODEL_TYPES`; the geometry and `masks` are then the frames'.
            image_inputs: `pixel_values` and whatever else the backbone takes (`image_sizes`, `image_grid_thw`, ...).
        """
        given = {"phrase_ids": phrase_ids, "original_sizes": original_sizes, "canvas_sizes": canvas_sizes,
                 "content_boxes": content_boxes}
        missing = [name for name, value in given.items() if value is None]
        if missing:
            # Optional in the signature only to say this instead of "missing 4 required positional arguments".
            raise ValueError(
                f"the inputs lack {', '.join(missing)}: they come from FLMMProcessor, not from the backbone's own "
                "processor. Fix: load the processor with FLMMProcessor.from_pretrained(folder) or "
                "AutoProcessor.from_pretrained(folder, trust_remote_code=True)."
            )
        image_inputs = {k: v for k, v in image_inputs.items() if v is not None}
        refine = refine and self.head.has_refiner
        attentions, hidden_states = self.capture_attention(input_ids, attention_mask, phrase_ids, refine,
                                                           video_frame=video_frame, **image_inputs)
        layout_inputs = dict(image_inputs, original_sizes=original_sizes, num_images=num_images, image_index=image_index,
                             video_frame=video_frame)
        maps = self.phrase_maps(attentions, input_ids, phrase_ids, {k: v for k, v in layout_inputs.items() if v is not None})
        coarse = self.head.coarse_logits(maps, canvas_sizes, content_boxes)
        refined = None
        if refine:
            phrase_hidden = phrase_hidden_states(hidden_states, phrase_ids, [m.shape[0] for m in maps])
            refined = self.head.refined_logits(coarse, phrase_hidden, sam_pixel_values, original_sizes)
        losses = self.head.losses(coarse, refined, masks) if masks is not None else {}
        return FLMMOutput(coarse_logits=coarse, refined_logits=refined, **losses)

    # ---- convenience ---------------------------------------------------------------------------------
    def resolve_processor(self, processor: Any | None = None) -> Any:
        """`processor`, else `self.processor` (set by the user); a ValueError saying how to fix it if neither."""
        processor = processor if processor is not None else getattr(self, "processor", None)
        if processor is None:
            raise ValueError("pass processor=FLMMProcessor.from_pretrained(...) or set model.processor")
        # Duck-typed: with remote code the FLMMProcessor class comes from another module than flmm_hf's.
        if not (callable(getattr(processor, "post_process_masks", None)) and callable(getattr(processor, "build_prompt", None))):
            raise TypeError(
                f"the processor is a {type(processor).__name__}, not an FLMMProcessor: its outputs have no phrase_ids. "
                "A saved F-LMM folder loads as the backbone's plain processor unless remote code is allowed. Fix: load "
                "the processor with FLMMProcessor.from_pretrained(folder) or AutoProcessor.from_pretrained(folder, "
                "trust_remote_code=True), or wrap a backbone processor as FLMMProcessor(processor)."
            )
        return processor

    @torch.no_grad()
    def ground(
        self,
        image: Any,
        text: str,
        phrases: list[str] | list[tuple[int, int]],
        processor: Any | None = None,
        threshold: float = 0.5,
        use_refiner: bool = True,
        return_probabilities: bool = False,
        ground_image: int | None = None,
    ) -> torch.Tensor:
        """
        Ground `phrases` (substrings of `text`, or character spans) in `image`.

        `image` may be a list of images of one prompt (e.g. `[reference, target]`): they all reach the LMM, one
        after the other, and the phrases are grounded in image `ground_image` (default: the last one).

        Args:
            return_probabilities: return the foreground probabilities (float32) instead of the masks
                `probabilities > threshold`.

        Returns:
            `torch.BoolTensor` (or `torch.FloatTensor` with `return_probabilities`) of shape `[len(phrases), H, W]`
            at the size of the (grounded) image.
        """
        processor = self.resolve_processor(processor)
        check_threshold(threshold)  # before the forward, not after it
        refine = use_refiner and self.head.has_refiner
        inputs = processor(images=[image], texts=[text], phrases=[phrases], return_sam_inputs=refine,
                           ground_image=ground_image)
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        output = self(**inputs, refine=refine)
        logits = output.refined_logits if refine else output.coarse_logits
        return processor.post_process_masks(
            logits, inputs["original_sizes"], threshold=threshold, return_probabilities=return_probabilities
        )[0]

    def chat(self, image: Any, question: str, phrases: list[str] | None = None, processor: Any | None = None, **kwargs: Any):
        """The frozen LMM answers `question` about `image`, and the phrases of its answer are grounded.

        See `grounded_chat.chat` for the arguments; returns a `GroundedAnswer`.
        """
        from .grounded_chat import chat

        return chat(self, image, question, phrases=phrases, processor=processor, **kwargs)

    def train(self, mode: bool = True) -> FLMMForGrounding:
        super().train(mode)
        self.lmm.eval()  # frozen: dropout and friends stay off (the head keeps SAM's image encoder in eval)
        return self


# `save_pretrained` / `push_to_hub` then write `auto_map` and copy this file and its relative-import
# siblings, so that `AutoModel.from_pretrained(..., trust_remote_code=True)` works without flmm_hf.
FLMMForGrounding.register_for_auto_class("AutoModel")

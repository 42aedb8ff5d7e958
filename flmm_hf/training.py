"""Training with the Hugging Face `Trainer`: argument dataclasses, the F-LMM trainer, the paper's
learning-rate schedule, data and model set-up, and the pieces of the offline demo.

`train.py` stays thin (parse arguments, call :func:`run_training`); everything here is library code.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from transformers import HfArgumentParser, Trainer, TrainingArguments

logger = logging.getLogger(__name__)

# Loss parts and metrics of FLMMOutput that are averaged over the logging interval.
LOGGED_PARTS = ("loss_mask", "loss_dice", "accuracy", "aiou", "sam_loss_mask", "sam_loss_dice", "sam_accuracy", "sam_aiou")


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    """Which frozen backbone and SAM to use, and the head's shape (see `FLMMConfig`)."""

    lmm_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or folder of the frozen image-text-to-text model. None: the demo's small LLaVA."},
    )
    lmm_revision: str | None = field(default=None, metadata={"help": "Revision of lmm_name_or_path."})
    lmm_dtype: str = field(
        default="bfloat16", metadata={"help": "dtype of the frozen LMM weights (paper: bfloat16): bfloat16, float16, float32."}
    )
    use_sam: bool = field(default=True, metadata={"help": "Refine the coarse masks with the SAM refiner."})
    sam_name_or_path: str = field(default="facebook/sam-vit-large", metadata={"help": "SAM checkpoint (paper: ViT-L)."})
    sam_revision: str | None = field(default=None, metadata={"help": "Revision of sam_name_or_path."})
    attention_layers: list[int] | None = field(
        default=None, metadata={"help": "Decoder layers whose attention feeds the head (default: all, the paper)."}
    )
    merge: str = field(default="mean", metadata={"help": "Merge of a phrase's token rows: mean (paper) or max."})
    mask_head_channels: int = field(default=64, metadata={"help": "Width of the first U-Net stage (paper: 64)."})
    mask_head_stages: int = field(default=4, metadata={"help": "U-Net encoder stages (paper: 4)."})
    mode: str = field(default="reproduction", metadata={"help": "reproduction (original prompt + letterbox) or native."})
    save_mode: str = field(default="adapter", metadata={"help": "adapter (trained weights only) or full."})
    # The offline demo's backbone (used when lmm_name_or_path is None).
    demo_image_size: int = field(default=224, metadata={"help": "Demo backbone: input size (px)."})
    demo_patch_size: int = field(default=16, metadata={"help": "Demo backbone: patch size (grid = size // patch)."})
    demo_pretrain_steps: int = field(default=400, metadata={"help": "Demo backbone: caption pre-training steps (0: random)."})
    demo_pretrain_batch_size: int = field(default=16, metadata={"help": "Demo backbone: pre-training batch size."})
    demo_pretrain_learning_rate: float = field(default=1e-3, metadata={"help": "Demo backbone: pre-training lr."})
    demo_pretrain_max_seconds: float | None = field(
        default=None, metadata={"help": "Demo backbone: stop pre-training after this many seconds."}
    )
    demo_backbone_dir: str | None = field(
        default=None, metadata={"help": "Where the pre-trained demo backbone is cached (default: <output_dir>/backbone)."}
    )


@dataclass
class DataArguments:
    """Training / evaluation data: dataset folders or Hub ids built by `dataset_scripts/`, or the shapes demo."""

    train_datasets: list[str] | None = field(
        default=None,
        metadata={"help": "Datasets concatenated for training (paper: PNG + RefCOCO + RefCOCO+ + RefCOCOg). None: shapes."},
    )
    train_split: str = field(default="train", metadata={"help": "Split of every training dataset."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out dataset evaluated during training."})
    eval_split: str = field(default="val", metadata={"help": "Split of eval_dataset."})
    concat_refs: bool = field(
        default=True, metadata={"help": "RefCOCO: all refs of an image in one sequence (the reference 'concat' mode)."}
    )
    sentence_field: str = field(default="raw_sentences", metadata={"help": "raw_sentences (original) or sentences."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    # The synthetic shapes set (used when train_datasets is None).
    shapes_train_scenes: int = field(default=600, metadata={"help": "Shapes demo: training scenes."})
    shapes_eval_scenes: int = field(default=150, metadata={"help": "Shapes demo: held-out scenes."})
    shapes_seed: int = field(default=0, metadata={"help": "Shapes demo: seed of the training scenes (eval uses seed+1)."})
    shapes_image_size: int = field(default=224, metadata={"help": "Shapes demo: image size (px)."})


@dataclass
class FLMMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the paper's warm-up start factor and demo outputs."""

    warmup_start_factor: float | None = field(
        default=1e-5,
        metadata={
            "help": "Linear warm-up from lr*factor (mmengine LinearLR start_factor; paper: 1e-5) followed by cosine "
            "to 0, when lr_scheduler_type is 'cosine'. None: transformers' own schedule (warm-up from 0)."
        },
    )
    overlay_examples: int = field(default=8, metadata={"help": "Held-out examples drawn into predictions.png (0: none)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator needs the raw dataset columns."}
    )


# ---------------------------------------------------------------------------------------------
# Config files: YAML -> command-line arguments (so that the command line overrides the file)
# ---------------------------------------------------------------------------------------------
def yaml_to_argv(config: dict[str, Any]) -> list[str]:
    """`{"learning_rate": 1e-4, "use_sam": false, "attention_layers": [1, 2]}` -> `--learning_rate 0.0001 ...`."""
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        flag = f"--{key}"
        if isinstance(value, bool):
            argv += [flag, "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            if not value:
                continue
            argv += [flag] + [json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_arguments(
    argv: Sequence[str] | None = None, default_config: str | os.PathLike | None = None
) -> tuple[ModelArguments, DataArguments, FLMMTrainingArguments]:
    """
    `--config file.yaml` (default: `default_config`) gives the values; any other `--flag value` on the
    command line overrides them. Unknown keys in the YAML are an error (HfArgumentParser's).
    """
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = default_config
    if "--config" in argv:
        i = argv.index("--config")
        config_path = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    config: dict[str, Any] = {}
    if config_path is not None:
        with open(config_path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    parser = HfArgumentParser((ModelArguments, DataArguments, FLMMTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=yaml_to_argv(config) + argv)
    return model_args, data_args, training_args


# ---------------------------------------------------------------------------------------------
# The paper's schedule: linear warm-up from start_factor, then cosine to 0 (mmengine LinearLR + CosineAnnealingLR)
# ---------------------------------------------------------------------------------------------
def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, start_factor: float) -> float:
    """
    lr factor at optimizer step `step` (0-based), exactly the closed form of mmengine's
    `LinearLR(start_factor, end_factor=1, end=warmup_steps)` followed by
    `CosineAnnealingLR(eta_min=0, begin=warmup_steps, end=total_steps)` that F-LMM uses.
    """
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def paper_warmup_steps(args: TrainingArguments, num_training_steps: int) -> int:
    """
    Warm-up length: `warmup_steps` when >= 1, else that fraction of the total (transformers 5 has no
    `warmup_ratio`), rounded down like mmengine's epoch -> iteration conversion (`int(0.03 * total)`).
    """
    if args.warmup_steps >= 1:
        return int(args.warmup_steps)
    return int(args.warmup_steps * num_training_steps)


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------
class FLMMTrainer(Trainer):
    """
    `Trainer` for `FLMMForGrounding`: logs every loss part (coarse BCE/Dice, refined BCE/Dice, pixel
    accuracy, IoU) averaged over the logging interval and all processes, uses the paper's schedule,
    and evaluates referring segmentation (cIoU / mIoU) exactly: each process scores a disjoint
    strided share of the eval set and the per-mask counts are gathered once.

    Args (beyond `Trainer`'s):
        eval_collator: collator for evaluation (first sentence per ref); defaults to `data_collator`.
        eval_processor: the `FLMMProcessor` (its `post_process_masks` turns logits into masks).
    """

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The F-LMM model card (base model and revision, how to load, results kept), not the Trainer's generic one."""
        from .model_card import write_model_card

        if self.is_world_process_zero():
            repo_id = self.args.hub_model_id if self.args.push_to_hub else None
            write_model_card(self.args.output_dir, self.model.config, repo_id=repo_id)

    def __init__(self, *args: Any, eval_collator: Any = None, eval_processor: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator or self.data_collator
        self.eval_processor = eval_processor
        self._part_sums: dict[str, float] = {}
        self._part_count = 0

    # ---- loss + logging of its parts ----
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss
        if model.training:
            for name in LOGGED_PARTS:
                value = getattr(outputs, name, None)
                if value is not None:
                    self._part_sums[name] = self._part_sums.get(name, 0.0) + float(value.detach())
            self._part_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._part_count:
            names = sorted(self._part_sums)
            local = torch.tensor([self._part_sums[n] / self._part_count for n in names], dtype=torch.float64)
            if self.accelerator.num_processes > 1:
                local = self.accelerator.reduce(local.to(self.accelerator.device), reduction="mean").cpu()
            logs.update({n: round(float(v), 6) for n, v in zip(names, local)})
            self._part_sums, self._part_count = {}, 0
        super().log(logs, start_time)

    # ---- schedule ----
    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        start_factor = getattr(self.args, "warmup_start_factor", None)
        kind = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
        if self.lr_scheduler is None and start_factor is not None and kind == "cosine":
            optimizer = optimizer if optimizer is not None else self.optimizer
            warmup = paper_warmup_steps(self.args, num_training_steps)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                functools.partial(
                    warmup_cosine_factor, warmup_steps=warmup, total_steps=num_training_steps, start_factor=start_factor
                ),
            )
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    # ---- evaluation ----
    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        rank, world = self.args.process_index, self.args.world_size
        share = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))
        return DataLoader(
            share,
            batch_size=self.args.per_device_eval_batch_size,
            collate_fn=self.eval_collator,
            num_workers=self.args.dataloader_num_workers,
            shuffle=False,
        )

    @torch.no_grad()
    def predict_masks(self, dataset: Dataset, limit: int | None = None) -> tuple[list, list, dict]:
        """This process's share of `dataset`: predicted and ground-truth masks per example, and mean loss."""
        from .metrics import MaskIoUAccumulator

        model = self.model
        was_training = model.training
        model.eval()
        predictions, targets = [], []
        loss_sum, batches = 0.0, 0
        accumulator, coarse_accumulator = MaskIoUAccumulator(), MaskIoUAccumulator()
        for inputs in self._eval_loader(dataset):
            inputs = self._prepare_inputs(inputs)
            with self.autocast_smart_context_manager():
                outputs = model(**inputs)
            if outputs.loss is not None:
                loss_sum += float(outputs.loss)
                batches += 1
            sizes = inputs["original_sizes"]
            coarse = self.eval_processor.post_process_masks(outputs.coarse_logits, sizes)
            refined = (
                self.eval_processor.post_process_masks(outputs.refined_logits, sizes)
                if outputs.refined_logits is not None
                else coarse
            )
            for b, gt in enumerate(inputs["masks"]):
                accumulator.add(refined[b].cpu(), gt.cpu())
                coarse_accumulator.add(coarse[b].cpu(), gt.cpu())
                if limit is None or len(predictions) < limit:
                    predictions.append(refined[b].cpu())
                    targets.append(gt.cpu())
        if was_training:
            model.train()
        return predictions, targets, {
            "loss_sum": loss_sum,
            "batches": batches,
            "counts": accumulator.state_dict(),
            "coarse_counts": coarse_accumulator.state_dict(),
        }

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        from .metrics import MaskIoUAccumulator

        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval dataset")
        start = time.time()
        _, _, local = self.predict_masks(dataset, limit=0)
        shares = [local]
        if self.accelerator.num_processes > 1:
            shares = gather_objects(local)
        counts = MaskIoUAccumulator.merge([s["counts"] for s in shares])
        coarse = MaskIoUAccumulator.merge([s["coarse_counts"] for s in shares])
        batches = sum(s["batches"] for s in shares)
        metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in counts.compute_refer_seg().items()}
        if self.model.sam_refiner is not None:
            metrics.update({f"{metric_key_prefix}_coarse_{k}": float(v) for k, v in coarse.compute_refer_seg().items()})
        if batches:
            metrics[f"{metric_key_prefix}_loss"] = sum(s["loss_sum"] for s in shares) / batches
        metrics[f"{metric_key_prefix}_samples"] = len(counts)
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 3)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def gather_objects(obj: Any) -> list[Any]:
    """`torch.distributed.all_gather_object` in process order (a one-element list without distribution)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_split(name: str, split: str, concat_refs: bool, max_samples: int | None = None):
    """One dataset split (folder or Hub id); per-ref RefCOCO rows grouped per image in concat mode."""
    from datasets import load_dataset

    from .data import group_refs_by_image

    dataset = load_dataset(name, split=split)
    if concat_refs and "ref_id" in dataset.column_names:
        dataset = group_refs_by_image(dataset)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset


def build_datasets(data_args: DataArguments) -> tuple[Dataset, Dataset | None]:
    """Training set (concatenation) and held-out set; the synthetic shapes set when no dataset is named."""
    if not data_args.train_datasets:
        return shapes_datasets(data_args)
    parts = [load_split(n, data_args.train_split, data_args.concat_refs) for n in data_args.train_datasets]
    train = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    if data_args.max_train_samples is not None:
        train = torch.utils.data.Subset(train, range(min(data_args.max_train_samples, len(train))))
    evaluation = None
    if data_args.eval_dataset:
        evaluation = load_split(data_args.eval_dataset, data_args.eval_split, data_args.concat_refs, data_args.max_eval_samples)
    return train, evaluation


def shapes_datasets(data_args: DataArguments):
    """Shapes scenes in concat mode (one row per scene, all its objects): training and held-out."""
    from .data import group_refs_by_image
    from .shapes import make_shapes_dataset

    train = make_shapes_dataset(data_args.shapes_train_scenes, seed=data_args.shapes_seed, image_size=data_args.shapes_image_size)
    held_out = make_shapes_dataset(
        data_args.shapes_eval_scenes,
        seed=data_args.shapes_seed + 1,
        image_size=data_args.shapes_image_size,
        id_offset=10 * (data_args.shapes_train_scenes + 1),
    )
    train = group_refs_by_image(train, keep_in_memory=True)
    held_out = group_refs_by_image(held_out, keep_in_memory=True)
    if data_args.max_eval_samples is not None:
        held_out = held_out.select(range(min(data_args.max_eval_samples, len(held_out))))
    return train, held_out


def build_collators(processor: Any, use_sam: bool, seed: int, sentence_field: str = "raw_sentences"):
    """Training collator (random sentence per ref) and evaluation collator (first sentence)."""
    from .data import FLMMCollator, FLMMTransform

    call = functools.partial(processor, return_sam_inputs=use_sam)
    train = FLMMCollator(call, transform=FLMMTransform(train=True, seed=seed, sentence_field=sentence_field))
    evaluation = FLMMCollator(call, transform=FLMMTransform(train=False, sentence_field=sentence_field))
    return train, evaluation


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}


def head_config_overrides(model_args: ModelArguments) -> dict[str, Any]:
    return {
        "use_sam": model_args.use_sam,
        "attention_layers": model_args.attention_layers,
        "merge": model_args.merge,
        "mask_head_channels": model_args.mask_head_channels,
        "mask_head_stages": model_args.mask_head_stages,
        "mode": model_args.mode,
        "save_mode": model_args.save_mode,
    }


def build_model(model_args: ModelArguments, lmm: Any = None, sam: Any = None):
    """A new F-LMM around a frozen backbone: `lmm` given (a model) or loaded by `lmm_name_or_path`.

    `sam` (a `SamModel`/`SamConfig`) overrides `sam_name_or_path` (tests build a tiny one).
    """
    from transformers import AutoModelForImageTextToText

    from .modeling_flmm import FLMMForGrounding

    if lmm is None:
        if model_args.lmm_name_or_path is None:
            raise ValueError("lmm_name_or_path is required (or build the demo backbone)")
        lmm = AutoModelForImageTextToText.from_pretrained(
            model_args.lmm_name_or_path, revision=model_args.lmm_revision, dtype=DTYPES[model_args.lmm_dtype]
        )
    if sam is None and model_args.use_sam:
        sam = model_args.sam_name_or_path
    return FLMMForGrounding.from_lmm(
        lmm, sam=sam, lmm_revision=model_args.lmm_revision, sam_revision=model_args.sam_revision,
        **head_config_overrides(model_args),
    )


def build_processor(model_args: ModelArguments, lmm_processor: Any = None):
    """The `FLMMProcessor` around the backbone's processor (given, or loaded by name)."""
    from .processing_flmm import FLMMProcessor

    if lmm_processor is not None:
        return FLMMProcessor(lmm_processor, mode=model_args.mode)
    return FLMMProcessor.from_pretrained(model_args.lmm_name_or_path, revision=model_args.lmm_revision, mode=model_args.mode)


def build_demo_backbone_for(model_args: ModelArguments, train_dataset, output_dir: str):
    """The demo's frozen LLaVA: loaded from its cache folder, or built + pre-trained on the training scenes."""
    from .data import FLMMTransform
    from .demo_backbone import DemoBackboneArguments, PretrainArguments, load_or_pretrain_demo_backbone

    folder = model_args.demo_backbone_dir or os.path.join(output_dir, "backbone")
    scenes, words = [], set()
    if not (Path(folder) / "config.json").is_file():
        transform = FLMMTransform(train=False)
        for i in range(len(train_dataset)):
            row = train_dataset[i]
            words.update(s for per_ref in row["raw_sentences"] for s in per_ref)
            example = transform.example(row)
            expressions = [example["text"][s:e] for s, e in example["phrases"]]
            scenes.append((example["image"], expressions, [m.numpy() for m in example["masks"]]))
    return load_or_pretrain_demo_backbone(
        folder,
        scenes=scenes,
        backbone_args=DemoBackboneArguments(image_size=model_args.demo_image_size, patch_size=model_args.demo_patch_size),
        pretrain_args=PretrainArguments(
            steps=model_args.demo_pretrain_steps,
            batch_size=model_args.demo_pretrain_batch_size,
            learning_rate=model_args.demo_pretrain_learning_rate,
            max_seconds=model_args.demo_pretrain_max_seconds,
            seed=0,
        ),
        words=sorted(words),
    )


# ---------------------------------------------------------------------------------------------
# Demo extras: trivial baseline and overlay picture
# ---------------------------------------------------------------------------------------------
def _examples(dataset, sentence_field: str = "raw_sentences"):
    from .data import FLMMTransform

    transform = FLMMTransform(train=False, sentence_field=sentence_field)
    for i in range(len(dataset)):
        yield transform.example(dataset[i])


def mean_mask_baseline(train_dataset, eval_dataset, size: int = 64) -> dict[str, float]:
    """
    The trivial baseline: every phrase gets the same mask, the mean training mask (in normalised
    image coordinates) thresholded at the level that maximises the training mIoU. Returns mIoU/cIoU
    on `eval_dataset`.
    """
    from .metrics import MaskIoUAccumulator

    def normalised(masks: torch.Tensor) -> torch.Tensor:
        return F.interpolate(masks[:, None].float(), size=(size, size), mode="area")[:, 0]

    train_masks = torch.cat([normalised(ex["masks"]) for ex in _examples(train_dataset)])
    mean = train_masks.mean(0)
    best, best_threshold = -1.0, 0.5
    binary_train = train_masks > 0.5
    for threshold in torch.linspace(0.02, 0.5, 25).tolist():
        pred = mean > threshold
        inter = (binary_train & pred).flatten(1).sum(1).float()
        union = (binary_train | pred).flatten(1).sum(1).float()
        miou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union)).mean().item()
        if miou > best:
            best, best_threshold = miou, threshold
    accumulator = MaskIoUAccumulator()
    for ex in _examples(eval_dataset):
        gt = ex["masks"]
        h, w = gt.shape[-2:]
        prob = F.interpolate(mean[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        accumulator.add((prob > best_threshold)[None].expand(gt.shape[0], h, w).clone(), gt)
    return accumulator.compute_refer_seg()


PALETTE = [(255, 0, 0), (0, 200, 255), (255, 200, 0), (0, 255, 0), (255, 0, 255), (255, 128, 0)]


def save_overlay(images: Sequence[Any], predictions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                 path: str | os.PathLike, texts: Sequence[str] | None = None, columns: int = 4) -> None:
    """Predicted masks blended over each image, ground-truth outlines in white; one tile per image."""
    from PIL import Image, ImageDraw

    tiles = []
    for i, (image, pred, gt) in enumerate(zip(images, predictions, targets)):
        base = np.asarray(image.convert("RGB")).astype(np.float32)
        out = base.copy()
        for k in range(pred.shape[0]):
            colour = np.array(PALETTE[k % len(PALETTE)], dtype=np.float32)
            m = pred[k].numpy()
            out[m] = 0.45 * out[m] + 0.55 * colour
            g = gt[k].numpy()
            edge = g & ~(np.roll(g, 1, 0) & np.roll(g, -1, 0) & np.roll(g, 1, 1) & np.roll(g, -1, 1))
            out[edge] = 255
        tile = Image.fromarray(out.clip(0, 255).astype(np.uint8))
        if texts is not None:
            ImageDraw.Draw(tile).text((3, 3), texts[i][:60], fill=(255, 255, 255))
        tiles.append(tile)
    if not tiles:
        return
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    canvas = Image.new("RGB", (w * min(columns, len(tiles)), h * rows), (0, 0, 0))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, ((i % columns) * w, (i // columns) * h))
    canvas.save(path)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def setup_training(model_args: ModelArguments, data_args: DataArguments, training_args: FLMMTrainingArguments):
    """Data, frozen backbone, model, processor and `FLMMTrainer`; returns (trainer, extras) without training."""
    from transformers import set_seed

    if training_args.remove_unused_columns:
        raise ValueError("remove_unused_columns must be False: the collator reads raw dataset columns")
    demo = model_args.lmm_name_or_path is None
    set_seed(training_args.seed)
    train_dataset, eval_dataset = build_datasets(data_args)
    extras: dict[str, Any] = {"demo": demo, "train_dataset": train_dataset, "eval_dataset": eval_dataset, "metrics": {}}
    if demo:
        # Rank 0 builds (and pre-trains) the backbone; the other ranks load what it saved.
        with training_args.main_process_first(desc="demo backbone"):
            lmm, lmm_processor, stats = build_demo_backbone_for(model_args, train_dataset, training_args.output_dir)
        extras["metrics"].update({f"backbone_{k}": v for k, v in stats.items()})
        set_seed(training_args.seed)  # the head's initialisation must not depend on the backbone's cache state
        model, processor = build_model(model_args, lmm=lmm), build_processor(model_args, lmm_processor)
        backbone = Path(model_args.demo_backbone_dir or os.path.join(training_args.output_dir, "backbone")).resolve()
        output = Path(training_args.output_dir).resolve()
        if backbone.is_relative_to(output):
            # Recorded relative to the model folder, so the saved demo can be moved or copied.
            model.config.lmm_name_or_path = backbone.relative_to(output).as_posix()
    else:
        model, processor = build_model(model_args), build_processor(model_args)
    train_collator, eval_collator = build_collators(processor, model_args.use_sam, training_args.seed, data_args.sentence_field)
    trainer = FLMMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=train_collator,
        eval_collator=eval_collator,
        eval_processor=processor,
        processing_class=processor,
    )
    return trainer, extras


def run_training(model_args: ModelArguments, data_args: DataArguments, training_args: FLMMTrainingArguments) -> dict:
    """Build data + model, train (resuming if asked), evaluate, save; the demo adds its baseline and picture."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    t0 = time.time()
    trainer, extras = setup_training(model_args, data_args, training_args)
    demo, train_dataset, eval_dataset = extras["demo"], extras["train_dataset"], extras["eval_dataset"]
    extra_metrics = extras["metrics"]
    metrics: dict[str, float] = {}
    if training_args.do_train:
        resume = training_args.resume_from_checkpoint
        if isinstance(resume, str) and resume.lower() in ("true", "last"):
            resume = True  # the last checkpoint-* in output_dir
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        train_metrics = dict(result.metrics)
        train_metrics.update(extra_metrics)
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
    if eval_dataset is not None and (training_args.do_eval or demo):
        eval_metrics = trainer.evaluate()
        if demo and trainer.is_world_process_zero():
            baseline = mean_mask_baseline(train_dataset, eval_dataset)
            eval_metrics.update({f"eval_baseline_{k}": float(v) for k, v in baseline.items()})
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
        if training_args.overlay_examples and trainer.is_world_process_zero():
            n = min(training_args.overlay_examples, len(eval_dataset))
            subset = torch.utils.data.Subset(eval_dataset, range(n))
            preds, gts = local_predictions(trainer, subset)
            examples = list(_examples(subset))
            save_overlay([e["image"] for e in examples], preds, gts, Path(training_args.output_dir) / "predictions.png",
                         texts=[e["text"] for e in examples])
    if demo and trainer.is_world_process_zero() and "eval_miou" in metrics:
        logger.info(
            "demo: held-out mIoU %.1f / cIoU %.1f  vs  mean-mask baseline mIoU %.1f / cIoU %.1f  (%.0f s in all)",
            metrics["eval_miou"], metrics["eval_ciou"], metrics["eval_baseline_miou"], metrics["eval_baseline_ciou"],
            time.time() - t0,
        )
        print(
            f"\nF-LMM demo on held-out shapes scenes: mIoU {metrics['eval_miou']:.1f}, cIoU {metrics['eval_ciou']:.1f}"
            f"  |  trivial baseline (mean training mask): mIoU {metrics['eval_baseline_miou']:.1f},"
            f" cIoU {metrics['eval_baseline_ciou']:.1f}  |  {time.time() - t0:.0f} s\n"
        )
    if training_args.push_to_hub:
        trainer.push_to_hub()  # every process calls it (saving may be collective); rank 0 uploads
    return metrics


def local_predictions(trainer: FLMMTrainer, dataset) -> tuple[list, list]:
    """Predicted and ground-truth masks of `dataset` in this process alone (for the overlay picture)."""
    loader = DataLoader(dataset, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=trainer.eval_collator)
    model = trainer.model
    model.eval()
    preds, gts = [], []
    with torch.no_grad():
        for inputs in loader:
            inputs = trainer._prepare_inputs(inputs)
            outputs = model(**inputs)
            logits = outputs.refined_logits if outputs.refined_logits is not None else outputs.coarse_logits
            masks = trainer.eval_processor.post_process_masks(logits, inputs["original_sizes"])
            preds += [m.cpu() for m in masks]
            gts += [g.cpu() for g in inputs["masks"]]
    return preds, gts

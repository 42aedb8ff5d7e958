"""Training with the Hugging Face `Trainer`: argument dataclasses, config files, the paper's
learning-rate schedule, the F-LMM trainer, data and model set-up, and :func:`run_training`.

`train.py` stays thin (parse arguments, call :func:`run_training`); everything here is library code.
The offline demo's own pieces (shapes data, demo backbone, baseline, overlay picture) are in
:mod:`flmm_hf.demo`; evaluation runs the loop of :mod:`flmm_hf.evaluation`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset
from transformers import HfArgumentParser, Trainer, TrainingArguments

from .configuration_flmm import FLMMConfig
from .data import WithQuestion
from .modeling_flmm import FLMMOutput
from .quantization import parse_quantization_config
from .demo import (
    build_demo_backbone_for,
    demo_backbone_folder,
    demo_backbone_reference,
    mean_mask_baseline,
    save_prediction_overlay,
    shapes_datasets,
)

logger = logging.getLogger(__name__)

# Loss parts and metrics of FLMMOutput (its scalar fields but the total loss), averaged over the logging interval.
LOGGED_PARTS = tuple(
    f.name for f in dataclasses.fields(FLMMOutput) if f.name not in ("loss", "coarse_logits", "refined_logits")
)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
#: `FLMMConfig` fields that are training arguments; their type, default and help come from FLMMConfig.
CONFIG_ARGUMENTS = (
    "lmm_name_or_path", "lmm_revision", "use_sam", "sam_name_or_path", "sam_revision",
    "attention_layers", "merge", "attention_numerics", "mask_head_channels", "mask_head_stages", "mode", "save_mode",
)
#: The config arguments that name the frozen parts (given to `FLMMForGrounding.from_lmm` as its own
#: arguments); the others are the head's config overrides (:func:`head_config_overrides`).
FROZEN_PART_ARGUMENTS = ("lmm_name_or_path", "lmm_revision", "sam_name_or_path", "sam_revision")
#: What a config argument means for train.py beyond its FLMMConfig description.
TRAINING_NOTES = {"lmm_name_or_path": "train.py: None trains on the offline demo's small LLaVA."}

# An `Args:` entry: `name (`type`, *optional*, defaults to ...):` (text may follow on the same line).
_ARG_ENTRY = re.compile(r"^(?P<indent>\s*)(?P<name>\w+)\s*\((?P<spec>.*)\)\s*:(?P<rest>.*)$")


def docstring_arguments(doc: str | None) -> dict[str, str]:
    """The `Args:` section of a transformers-style docstring as `{name: description}`.

    An entry is a line `name (`type`, *optional*, defaults to ...):` followed by lines indented
    deeper; the description is their text joined by single spaces. The section ends at the first
    non-blank line indented no deeper than `Args:` itself.
    """
    entries: dict[str, list[str]] = {}
    section_indent = entry_indent = None
    name = None
    for line in inspect.cleandoc(doc or "").splitlines():
        indent = len(line) - len(line.lstrip())
        if section_indent is None:
            if line.strip() in ("Args:", "Arguments:", "Parameters:"):
                section_indent = indent
            continue
        if not line.strip():
            continue
        if indent <= section_indent:
            break
        match = _ARG_ENTRY.match(line)
        if match and (entry_indent is None or indent <= entry_indent):
            entry_indent, name = indent, match["name"]
            entries[name] = [match["rest"].strip()]
        elif name is not None:
            entries[name].append(line.strip())
    return {key: " ".join(part for part in parts if part) for key, parts in entries.items()}


def config_argument_fields(
    config_class: type = FLMMConfig, names: Sequence[str] = CONFIG_ARGUMENTS
) -> list[tuple[str, Any, dataclasses.Field]]:
    """`(name, type, field)` for each of `names`, taken from `config_class.__init__`'s signature
    (type and default) and its docstring's `Args:` (help); for `dataclasses.make_dataclass`."""
    parameters = inspect.signature(config_class.__init__, eval_str=True).parameters
    docs = docstring_arguments(config_class.__doc__)
    fields = []
    for name in names:
        if name not in parameters:
            raise TypeError(f"{config_class.__name__} has no argument {name!r}")
        parameter = parameters[name]
        text = " ".join(t for t in (docs.get(name, ""), TRAINING_NOTES.get(name, "")) if t)
        metadata = {"help": text.replace("%", "%%")}  # argparse formats help with %
        default = None if parameter.default is inspect.Parameter.empty else parameter.default
        if isinstance(default, (list, dict, set)):
            spec = field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
        else:
            spec = field(default=default, metadata=metadata)
        fields.append((name, parameter.annotation, spec))
    return fields


# Arguments of train.py that are not FLMMConfig fields.
_TRAINING_ONLY_FIELDS: list[tuple[str, Any, dataclasses.Field]] = [
    ("lmm_dtype", str, field(
        default="bfloat16", metadata={"help": "dtype of the frozen LMM weights (paper: bfloat16): bfloat16, float16, float32."}
    )),
    ("quantization_config", str | None, field(
        default=None,
        metadata={"help": "Quantize the frozen LMM as it loads (as QLoRA's base): a transformers quantization config "
                  "as a YAML mapping or a JSON string, e.g. {quant_method: bitsandbytes, load_in_4bit: true, "
                  "bnb_4bit_quant_type: nf4, bnb_4bit_compute_dtype: bfloat16} (CUDA GPU) or {quant_method: torchao, "
                  "quant_type: {default: {_type: Int8WeightOnlyConfig, _version: 2, _data: {}}}} (runs on CPU). "
                  "The saved model records it and loads quantized. None: unquantized."},
    )),
    # FLMMProcessor settings (saved with the processor, so evaluation and inference prompt alike).
    ("question", str | None, field(
        default=None, metadata={"help": "The prompt's user question (None: the original F-LMM's description question)."}
    )),
    ("prompt_template", str | None, field(
        default=None,
        metadata={"help": "The prompt as a format string with {image} and {question}, instead of the chat template "
                  "(the paper configs give the original's, e.g. 'USER: {image}\\n{question} ASSISTANT:')."},
    )),
    # The offline demo's backbone (used when lmm_name_or_path is None).
    ("demo_image_size", int, field(default=224, metadata={"help": "Demo backbone: input size (px)."})),
    ("demo_patch_size", int, field(default=16, metadata={"help": "Demo backbone: patch size (grid = size // patch)."})),
    ("demo_pretrain_steps", int, field(
        default=400, metadata={"help": "Demo backbone: caption pre-training steps (0: random)."}
    )),
    ("demo_pretrain_batch_size", int, field(default=16, metadata={"help": "Demo backbone: pre-training batch size."})),
    ("demo_pretrain_learning_rate", float, field(default=1e-3, metadata={"help": "Demo backbone: pre-training lr."})),
    ("demo_pretrain_max_seconds", float | None, field(
        default=None, metadata={"help": "Demo backbone: stop pre-training after this many seconds."}
    )),
    ("demo_backbone_dir", str | None, field(
        default=None, metadata={"help": "Where the pre-trained demo backbone is cached (default: <output_dir>/backbone)."}
    )),
]

ModelArguments = dataclasses.make_dataclass(
    "ModelArguments",
    config_argument_fields() + _TRAINING_ONLY_FIELDS,
    namespace={
        "__module__": __name__,
        "__doc__": "Which frozen backbone and SAM to use and the head's shape (the `FLMMConfig` fields "
        "named in `CONFIG_ARGUMENTS`, with FLMMConfig's types, defaults and help), the frozen LMM's dtype, "
        "and the offline demo backbone's sizes and pre-training (`demo_*`).",
    },
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
    text_mode: str = field(
        default="resample",
        metadata={"help": "RefCOCO training sentence per ref: 'random' (drawn once, kept for every epoch: mmdet's, "
                  "the paper's), 'resample' (a fresh draw per read) or 'select_first'."},
    )
    train_questions: list[str] | None = field(
        default=None,
        metadata={"help": "One prompt question per train dataset ('' = the processor's question); the original "
                  "LLaVA-NeXT configs train PNG on 'What is shown in this image?'."},
    )
    sentence_field: str = field(default="raw_sentences", metadata={"help": "raw_sentences (original) or sentences."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    # The synthetic shapes set (used when train_datasets is None).
    shapes_train_scenes: int = field(default=600, metadata={"help": "Shapes demo: training scenes."})
    shapes_eval_scenes: int = field(default=150, metadata={"help": "Shapes demo: held-out scenes."})
    shapes_seed: int = field(default=0, metadata={"help": "Shapes demo: seed of the training scenes (eval uses seed+1)."})
    shapes_image_size: int = field(default=224, metadata={"help": "Shapes demo: image size (px)."})


#: Values of `FLMMTrainingArguments.weight_decay_scope`.
WEIGHT_DECAY_SCOPES = ("transformers", "all")


@dataclass
class FLMMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the paper's warm-up start factor, which parameters weight decay applies to, and
    demo outputs."""

    warmup_start_factor: float | None = field(
        default=1e-5,
        metadata={
            "help": "Linear warm-up from lr*factor (mmengine LinearLR start_factor; paper: 1e-5) followed by cosine "
            "to 0, when lr_scheduler_type is 'cosine'. None: transformers' own schedule (warm-up from 0)."
        },
    )
    weight_decay_scope: str = field(
        default="transformers",
        metadata={
            "help": "Which trained parameters get weight_decay: 'transformers' (the Trainer's default: all but biases "
            "and norm weights) or 'all' (every trained parameter, as the original's mmengine optimizer did).",
            "choices": list(WEIGHT_DECAY_SCOPES),
        },
    )
    resume_without_optimizer_state: bool = field(
        default=False,
        metadata={"help": "Allow resuming from a checkpoint without optimizer.pt / scheduler.pt (e.g. saved with "
                  "save_only_model): the optimizer and learning-rate schedule then restart from scratch. "
                  "False: such a resume is refused with an error."},
    )
    overlay_examples: int = field(default=8, metadata={"help": "Held-out examples drawn into predictions.png (0: none)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator needs the raw dataset columns."}
    )

    def __post_init__(self) -> None:
        if self.weight_decay_scope not in WEIGHT_DECAY_SCOPES:
            raise ValueError(
                f"weight_decay_scope must be one of {WEIGHT_DECAY_SCOPES}, got {self.weight_decay_scope!r} "
                "('all' decays every trained parameter, as the original did)"
            )
        super().__post_init__()


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
# Checkpoints: which are complete, which one to resume from
# ---------------------------------------------------------------------------------------------
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Any of these holds a checkpoint's model weights (single file or sharded index; FSDP writes folders).
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def checkpoint_missing(folder: str | os.PathLike, optimizer_state: bool = True) -> list[str]:
    """What `folder` lacks to be a complete Trainer checkpoint (empty: complete).

    Complete means: a readable `trainer_state.json` (the Trainer writes it after the weights, optimizer and
    scheduler, so a save cut short lacks it), the model weights and, with `optimizer_state`, `optimizer.pt`
    and `scheduler.pt` (without them a resume restarts the optimizer and the learning-rate schedule).
    """
    folder = Path(folder)
    names = set(os.listdir(folder)) if folder.is_dir() else set()
    missing = []
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        missing.append("trainer_state.json")
    if not (names & set(_WEIGHT_FILES) or any(n.startswith("pytorch_model_fsdp") for n in names)):
        missing.append("model weights (model.safetensors)")
    if optimizer_state:
        # optimizer.bin / an optimizer_* folder: other layouts the Trainer loads too (accelerate, FSDP)
        if not ({"optimizer.pt", "optimizer.bin"} & names or any("optimizer" in n and (folder / n).is_dir() for n in names)):
            missing.append("optimizer.pt")
        if "scheduler.pt" not in names:
            missing.append("scheduler.pt")
    return missing


def resolve_resume_checkpoint(
    resume: str | bool | None, output_dir: str | os.PathLike, optimizer_state: bool = True
) -> str | None:
    """The checkpoint to resume from, checked: `resume` is a folder, or `True` / `"last"` / `"true"` for the
    newest COMPLETE `checkpoint-N` of `output_dir` (see :func:`checkpoint_missing`; incomplete newer ones,
    e.g. from a save cut short by a kill, are skipped with a warning). `None` / `False`: no resume.

    Raises:
        ValueError: the named checkpoint is incomplete, or `output_dir` holds no complete checkpoint.
    """
    if resume is None or resume is False or (isinstance(resume, str) and resume.lower() in ("", "false", "none")):
        return None
    opt_in = "pass --resume_without_optimizer_state true to restart the optimizer and schedule from this state"
    if resume is True or (isinstance(resume, str) and resume.lower() in ("true", "last")):
        found = sorted(
            (int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
            if p.is_dir() and (m := _CHECKPOINT_NAME.match(p.name))
        )
        skipped = []
        for _, path in reversed(found):
            missing = checkpoint_missing(path, optimizer_state)
            if not missing:
                for name, lacks in skipped:
                    logger.warning("skipped incomplete checkpoint %s (missing %s)", name, ", ".join(lacks))
                logger.info("resuming from %s, the newest complete checkpoint of %s", path, output_dir)
                return str(path)
            skipped.append((str(path), missing))
        detail = "; ".join(f"{name} lacks {', '.join(lacks)}" for name, lacks in skipped)
        raise ValueError(
            f"--resume_from_checkpoint last: no complete checkpoint-N in {output_dir}"
            + (f" ({detail})" if detail else " (none at all)")
            + ". Fix: name a checkpoint folder, start without --resume_from_checkpoint"
            + (f", or {opt_in}" if optimizer_state and skipped else "") + "."
        )
    missing = checkpoint_missing(resume, optimizer_state)
    if missing:
        only_optimizer = all(m in ("optimizer.pt", "scheduler.pt") for m in missing)
        raise ValueError(
            f"cannot resume from {resume}: it lacks {', '.join(missing)}"
            + (" (resuming would silently restart the learning rate and optimizer moments)" if only_optimizer else
               " (an incomplete or cut-short save)")
            + ". Fix: resume from another checkpoint (--resume_from_checkpoint last picks the newest complete one)"
            + (f", or {opt_in}" if only_optimizer else "") + "."
        )
    if not optimizer_state and checkpoint_missing(resume, True):
        logger.warning("resuming from %s without optimizer/scheduler state: they restart from scratch", resume)
    return str(resume)


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def check_distributed_backend(args: TrainingArguments, distributed_type: Any) -> None:
    """Refuse a run whose FSDP or DeepSpeed request accelerate did not set up.

    `accelerate launch` with an FSDP or DeepSpeed config (or `--fsdp` / `--deepspeed`) asks for them, but
    accelerate 1.15 enables them only on accelerators (CUDA, XPU, NPU, ...): on CPU processes it silently trains
    with plain data parallelism instead, every process holding the whole frozen LMM.

    Raises:
        ValueError: naming what was asked, what accelerate set up, and the fix.
    """
    from accelerate.utils import DistributedType

    asked = {
        DistributedType.FSDP: _flag("ACCELERATE_USE_FSDP") or bool(getattr(args, "fsdp", None)),
        DistributedType.DEEPSPEED: _flag("ACCELERATE_USE_DEEPSPEED") or bool(getattr(args, "deepspeed", None)),
    }
    for wanted, requested in asked.items():
        if requested and distributed_type != wanted:
            raise ValueError(
                f"{wanted.value} was requested (accelerate config distributed_type: {wanted.value}, or the "
                f"--{wanted.value.lower()} argument) but accelerate set up {getattr(distributed_type, 'value', distributed_type)}: "
                "accelerate runs FSDP and DeepSpeed only on accelerators (CUDA, XPU, NPU, ...) and would train "
                "every process with the whole LMM instead. Fix: launch on GPUs, or on CPU processes use "
                "configs/accelerate/cpu_2proc.yaml (data parallel)."
            )


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------
class FLMMTrainer(Trainer):
    """
    `Trainer` for `FLMMForGrounding`: logs every loss part (coarse BCE/Dice, refined BCE/Dice, pixel
    accuracy, IoU) averaged over the logging interval and all processes, uses the paper's schedule,
    and evaluates referring segmentation (cIoU / mIoU) exactly with the loop of `evaluate.py`
    (:func:`flmm_hf.evaluation.evaluate_dataset`): each process scores a disjoint strided share of
    the eval set and the per-mask counts are gathered once, in dataset order.

    The processor (`processing_class`, an `FLMMProcessor`) batches the evaluation examples and
    turns logits into masks.

    Weight decay follows `args.weight_decay_scope` (see :meth:`get_decay_parameter_names`).

    Nothing in `output_dir` that this run did not write is deleted or overwritten: `save_total_limit`
    rotates only the checkpoints this run saved (a `checkpoint-*` found there at start is kept and never
    counted), a found folder of the same name as a new checkpoint is moved aside to
    `checkpoint-N.replaced-<time>` first, and a `README.md` that flmm-hf did not generate is kept (see
    :func:`flmm_hf.model_card.write_model_card`). Each of these is logged.

    Args (beyond `Trainer`'s):
        sentence_field: the rows' sentence column read in evaluation (first sentence per ref).
    """

    def __init__(self, *args: Any, sentence_field: str = "raw_sentences", **kwargs: Any):
        super().__init__(*args, **kwargs)
        check_distributed_backend(self.args, self.accelerator.distributed_type)
        self.sentence_field = sentence_field
        self._part_sums: dict[str, float] = {}
        self._part_count = 0
        # Checkpoint folders this run saved (real paths); only these are ever rotated away.
        self._saved_checkpoints: list[str] = []

    # ---- resuming: only from a complete checkpoint ----
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any):
        """`Trainer.train`, resuming only from a complete checkpoint (:func:`resolve_resume_checkpoint`):
        `True` / `"last"` pick the newest complete `checkpoint-N` of `output_dir`; a checkpoint without
        optimizer or scheduler state is refused unless `resume_without_optimizer_state` is set."""
        optimizer_state = not getattr(self.args, "resume_without_optimizer_state", False) and not self.is_deepspeed_enabled
        resume = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir, optimizer_state)
        return super().train(resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    # ---- checkpoints: rotate only this run's own ----
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """`Trainer._save_checkpoint`, but `save_total_limit` rotates only this run's checkpoints and a
        found folder of the new checkpoint's name is moved aside, not written into."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.lexists(folder) and os.path.realpath(folder) not in self._saved_checkpoints:
            aside = f"{folder}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(folder, aside)
            logger.warning("%s existed before this run saved there: moved it to %s (nothing deleted)", folder, aside)
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()  # no rank writes into the folder before it was moved aside
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # transformers' rotation deletes any checkpoint-* of output_dir
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self._saved_checkpoints.append(os.path.realpath(folder))
        if self.args.should_save:
            self._rotate_own_checkpoints(run_dir)

    def _rotate_own_checkpoints(self, run_dir: str) -> None:
        """Delete this run's oldest checkpoints beyond `save_total_limit`, keeping the newest and the best one;
        checkpoints found in `run_dir` that this run did not save are listed once and never deleted."""
        limit = self.args.save_total_limit
        if limit is None or limit <= 0:
            return
        own = [path for path in self._saved_checkpoints if os.path.isdir(path)]
        if not getattr(self, "_reported_foreign", False):
            foreign = sorted(
                str(p) for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and os.path.realpath(p) not in own
            )
            if foreign:
                logger.info("save_total_limit=%d counts only this run's checkpoints; kept as found: %s", limit, foreign)
            self._reported_foreign = True
        protected = {own[-1]} if own else set()
        if self.state.best_model_checkpoint:
            protected.add(os.path.realpath(self.state.best_model_checkpoint))
        excess = len(own) - max(limit, len(protected))
        for path in [p for p in own if p not in protected][: max(0, excess)]:
            logger.info("save_total_limit=%d: deleting this run's checkpoint %s", limit, path)
            shutil.rmtree(path, ignore_errors=True)
            self._saved_checkpoints.remove(path)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The F-LMM model card (base model and revision, how to load, results kept), not the Trainer's generic one."""
        from .model_card import write_model_card

        if self.is_world_process_zero():
            repo_id = self.args.hub_model_id if self.args.push_to_hub else None
            write_model_card(self.args.output_dir, self.model.config, repo_id=repo_id)

    # ---- optimizer: which parameters decay ----
    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """Names of the parameters `create_optimizer` puts in the weight-decay group (the rest get decay 0).

        `weight_decay_scope="transformers"`: the Trainer's own choice (every parameter but biases and norm
        weights). `"all"`: every parameter, as the original's mmengine optimizer applied `weight_decay` to all
        trained parameters (no `paramwise_cfg`); the frozen ones have `requires_grad=False` and are left out of
        both groups by `create_optimizer`.
        """
        if getattr(self.args, "weight_decay_scope", "transformers") == "all":
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    # ---- loss + logging of its parts ----
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss; in training, its parts (`LOGGED_PARTS`) are summed for :meth:`log`."""
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
        """`Trainer.log`, plus the loss parts' means since the last training log (over all processes)."""
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
        """The paper's warm-up + cosine (see :func:`warmup_cosine_factor`) when `warmup_start_factor`
        is set and `lr_scheduler_type` is cosine; the Trainer's own schedule otherwise."""
        start_factor = getattr(self.args, "warmup_start_factor", None)
        kind = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
        if self.lr_scheduler is None and start_factor is not None and kind == "cosine":
            # The Trainer's own cosine scheduler first, for its bookkeeping (a scheduler it created is
            # rebuilt on the next train()); then ours replaces it on the same optimizer.
            super().create_scheduler(num_training_steps, optimizer)
            optimizer = optimizer if optimizer is not None else self.optimizer
            warmup = paper_warmup_steps(self.args, num_training_steps)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                functools.partial(
                    warmup_cosine_factor, warmup_steps=warmup, total_steps=num_training_steps, start_factor=start_factor
                ),
            )
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    # ---- evaluation ----
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Referring-segmentation metrics of `eval_dataset` (default: the trainer's); see
        :meth:`evaluate_with_predictions`. `ignore_keys` is unused (no logits are returned)."""
        metrics, _ = self.evaluate_with_predictions(eval_dataset, metric_key_prefix=metric_key_prefix)
        return metrics

    def evaluate_with_predictions(
        self, eval_dataset=None, metric_key_prefix: str = "eval", keep_predictions: int = 0
    ) -> tuple[dict[str, float], list]:
        """Evaluate over all processes, log the metrics and call the `on_evaluate` callbacks.

        Returns:
            The metrics: `<prefix>_miou` / `<prefix>_ciou` (0-100) of the refined masks where the model
            refines, else the coarse ones; `<prefix>_coarse_miou` / `_ciou` too when it refines;
            `<prefix>_loss` (mean over batches), `<prefix>_samples` (the number of masks scored) and
            `<prefix>_runtime` (s). And the predictions of the first `keep_predictions` examples of
            the dataset (`flmm_hf.evaluation.MaskPrediction`, in dataset order, on every process).
        """
        from .evaluation import evaluate_dataset

        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval dataset")
        if self.processing_class is None:
            raise ValueError("FLMMTrainer evaluates with its processing_class: pass the FLMMProcessor")
        start = time.time()
        result = evaluate_dataset(
            self.model, self.processing_class, dataset, self.accelerator,
            batch_size=self.args.per_device_eval_batch_size, num_workers=self.args.dataloader_num_workers,
            sentence_field=self.sentence_field, with_loss=True, keep_predictions=keep_predictions,
            autocast=self.autocast_smart_context_manager,
            progress=not self.args.disable_tqdm and self.is_world_process_zero(), description="evaluation",
        )
        shown = result.accumulators.get("refined", result.accumulators["coarse"])
        metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in shown.compute_refer_seg().items()}
        if "refined" in result.accumulators:
            coarse = result.accumulators["coarse"].compute_refer_seg()
            metrics.update({f"{metric_key_prefix}_coarse_{k}": float(v) for k, v in coarse.items()})
        if result.loss is not None:
            metrics[f"{metric_key_prefix}_loss"] = result.loss
        metrics[f"{metric_key_prefix}_samples"] = len(shown)
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 3)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics, result.predictions


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_split(name: str, split: str, concat_refs: bool, max_samples: int | None = None):
    """One dataset split (folder or Hub id); per-ref RefCOCO rows grouped per image in concat mode."""
    from .data import check_columns, group_refs_by_image
    from .evaluation import load_dataset_source

    dataset = load_dataset_source(name, split=split)  # a missing folder is named as such, with its builder
    check_columns(dataset.column_names, where=f"dataset {name!r} (split {split!r})")
    if concat_refs and "ref_id" in dataset.column_names:
        dataset = group_refs_by_image(dataset)
    if "segments" in dataset.column_names:
        from .evaluation import prepare_png_split

        # The original redraws a PNG narrative that grounds nothing; dropping it is the same in expectation.
        dataset = prepare_png_split(dataset)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset


def build_datasets(data_args: DataArguments) -> tuple[Dataset, Dataset | None]:
    """Training set (concatenation) and held-out set; the synthetic shapes set when no dataset is named."""
    if not data_args.train_datasets:
        return shapes_datasets(data_args)
    parts = [load_split(n, data_args.train_split, data_args.concat_refs) for n in data_args.train_datasets]
    if data_args.train_questions is not None:
        if len(data_args.train_questions) != len(parts):
            raise ValueError(
                f"train_questions has {len(data_args.train_questions)} entries for {len(parts)} train_datasets: "
                "give one question per dataset ('' for the processor's question)"
            )
        parts = [WithQuestion(part, q) if q else part for part, q in zip(parts, data_args.train_questions)]
    train = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    if data_args.max_train_samples is not None:
        train = torch.utils.data.Subset(train, range(min(data_args.max_train_samples, len(train))))
    evaluation = None
    if data_args.eval_dataset:
        evaluation = load_split(data_args.eval_dataset, data_args.eval_split, data_args.concat_refs, data_args.max_eval_samples)
    return train, evaluation


def build_train_collator(
    processor: Any, use_sam: bool, seed: int, sentence_field: str = "raw_sentences", text_mode: str = "resample"
):
    """The training collator: a seeded sentence per ref by `text_mode` (see `FLMMTransform`), masks given to the model.
    (Evaluation builds its own: :func:`flmm_hf.evaluation.make_collator`.)"""
    from .data import FLMMCollator, FLMMTransform

    call = functools.partial(processor, return_sam_inputs=use_sam)
    transform = FLMMTransform(train=True, seed=seed, sentence_field=sentence_field, text_mode=text_mode)
    return FLMMCollator(call, transform=transform)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}


def head_config_overrides(model_args: ModelArguments) -> dict[str, Any]:
    """The `FLMMConfig` fields of `model_args` other than those naming the frozen parts
    (`FROZEN_PART_ARGUMENTS`), as keyword arguments of `FLMMForGrounding.from_lmm`."""
    return {name: getattr(model_args, name) for name in CONFIG_ARGUMENTS if name not in FROZEN_PART_ARGUMENTS}


def build_model(model_args: ModelArguments, lmm: Any = None, sam: Any = None):
    """A new F-LMM around a frozen backbone: `lmm` given (a model, used as is, or a folder / Hub id) or loaded by
    `lmm_name_or_path`; by name it loads in `lmm_dtype` and quantized by `quantization_config`.

    `sam` (a `SamModel`/`SamConfig`) overrides `sam_name_or_path` (tests build a tiny one).
    """
    from .modeling_flmm import FLMMForGrounding

    load_kwargs: dict[str, Any] = {}
    if lmm is None:
        if model_args.lmm_name_or_path is None:
            raise ValueError("lmm_name_or_path is required (or build the demo backbone)")
        lmm = model_args.lmm_name_or_path
    if isinstance(lmm, (str, os.PathLike)):
        lmm = str(lmm)
        load_kwargs = {"dtype": DTYPES[model_args.lmm_dtype],
                       "quantization_config": parse_quantization_config(model_args.quantization_config)}
    elif model_args.quantization_config is not None:
        raise ValueError(
            "quantization_config quantizes an LMM loaded by name, but build_model was given a loaded model. Fix: pass "
            "its folder or Hub id instead."
        )
    if sam is None and model_args.use_sam:
        sam = model_args.sam_name_or_path
    return FLMMForGrounding.from_lmm(
        lmm, sam=sam, lmm_revision=model_args.lmm_revision, sam_revision=model_args.sam_revision,
        **load_kwargs, **head_config_overrides(model_args),
    )


def build_processor(model_args: ModelArguments, lmm_processor: Any = None):
    """The `FLMMProcessor` around the backbone's processor (given, or loaded by name)."""
    from .processing_flmm import FLMMProcessor

    settings: dict[str, Any] = {"mode": model_args.mode, "prompt_template": model_args.prompt_template}
    if model_args.question is not None:
        settings["question"] = model_args.question
    if lmm_processor is not None:
        return FLMMProcessor(lmm_processor, **settings)
    return FLMMProcessor.from_pretrained(model_args.lmm_name_or_path, revision=model_args.lmm_revision, **settings)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def setup_training(model_args: ModelArguments, data_args: DataArguments, training_args: FLMMTrainingArguments):
    """Data, frozen backbone, model, processor and `FLMMTrainer`; returns (trainer, extras) without training.

    `extras`: `demo` (whether this is the offline demo), `train_dataset`, `eval_dataset` and
    `metrics` (the demo backbone's pre-training statistics, `backbone_*`).
    """
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
            lmm, lmm_processor, stats = build_demo_backbone_for(
                model_args, train_dataset, training_args.output_dir,
                progress=not training_args.disable_tqdm and training_args.local_process_index == 0,
            )
        extras["metrics"].update({f"backbone_{k}": v for k, v in stats.items()})
        set_seed(training_args.seed)  # the head's initialisation must not depend on the backbone's cache state
        if model_args.quantization_config is not None:
            # quantized as it loads: from the folder it was just saved to (`from_lmm` quantizes models it loads)
            lmm = str(demo_backbone_folder(model_args, training_args.output_dir).resolve())
        model, processor = build_model(model_args, lmm=lmm), build_processor(model_args, lmm_processor)
        model.config.lmm_name_or_path = demo_backbone_reference(model_args, training_args.output_dir)
    else:
        model, processor = build_model(model_args), build_processor(model_args)
    trainer = FLMMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=build_train_collator(
            processor, model_args.use_sam, training_args.seed, data_args.sentence_field, data_args.text_mode
        ),
        processing_class=processor,
        sentence_field=data_args.sentence_field,
    )
    return trainer, extras


def _train(trainer: FLMMTrainer, extra_metrics: dict[str, Any]) -> dict[str, float]:
    """Train (resuming if asked), save the model, metrics and state; the train metrics."""
    # "last" / "true": the newest complete checkpoint-* in output_dir (FLMMTrainer.train checks it)
    result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model()
    metrics = dict(result.metrics)
    metrics.update(extra_metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def _evaluate(trainer: FLMMTrainer, extras: dict[str, Any], sentence_field: str) -> dict[str, float]:
    """Evaluate on the held-out set (the demo adds its baseline), save the metrics and draw the first
    `overlay_examples` predictions into `predictions.png`; the eval metrics."""
    eval_dataset = extras["eval_dataset"]
    metrics, predictions = trainer.evaluate_with_predictions(keep_predictions=trainer.args.overlay_examples)
    if extras["demo"] and trainer.is_world_process_zero():
        baseline = mean_mask_baseline(extras["train_dataset"], eval_dataset)
        metrics.update({f"eval_baseline_{k}": float(v) for k, v in baseline.items()})
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    if predictions and trainer.is_world_process_zero():
        save_prediction_overlay(eval_dataset, predictions, Path(trainer.args.output_dir) / "predictions.png", sentence_field)
    return metrics


def _written_since(folder: str | os.PathLike, start: float) -> list[str]:
    """The entries of `folder` changed since `start` (a `time.time()`), folders with a trailing `/`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.stat().st_mtime >= start - 1)


def _report_demo(metrics: dict[str, float], seconds: float, output_dir: str | os.PathLike, written: list[str]) -> None:
    """The demo's result lines: held-out IoU against the trivial baseline, then where its outputs are."""
    logger.info(
        "demo: held-out mIoU %.1f / cIoU %.1f  vs  mean-mask baseline mIoU %.1f / cIoU %.1f  (%.0f s in all)",
        metrics["eval_miou"], metrics["eval_ciou"], metrics["eval_baseline_miou"], metrics["eval_baseline_ciou"], seconds,
    )
    print(
        f"\nF-LMM demo on held-out shapes scenes: mIoU {metrics['eval_miou']:.1f}, cIoU {metrics['eval_ciou']:.1f}"
        f"  |  trivial baseline (mean training mask): mIoU {metrics['eval_baseline_miou']:.1f},"
        f" cIoU {metrics['eval_baseline_ciou']:.1f}  |  {seconds:.0f} s"
    )
    print(f"Outputs in {Path(output_dir).resolve()}: {', '.join(written) or '(nothing written)'}\n")


def run_training(model_args: ModelArguments, data_args: DataArguments, training_args: FLMMTrainingArguments) -> dict:
    """Build data + model, train (resuming if asked), evaluate, save; the demo adds its baseline and picture.

    Returns the train and eval metrics (`train_*`, `eval_*`; the demo adds `eval_baseline_*` and
    `backbone_*`), as `all_results.json` holds them.
    """
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    t0 = time.time()
    trainer, extras = setup_training(model_args, data_args, training_args)
    metrics: dict[str, float] = {}
    if training_args.do_train:
        metrics.update(_train(trainer, extras["metrics"]))
    if extras["eval_dataset"] is not None and (training_args.do_eval or extras["demo"]):
        metrics.update(_evaluate(trainer, extras, data_args.sentence_field))
    if extras["demo"] and trainer.is_world_process_zero() and "eval_miou" in metrics:
        _report_demo(metrics, time.time() - t0, training_args.output_dir, _written_since(training_args.output_dir, t0))
    if training_args.push_to_hub:
        trainer.push_to_hub()  # every process calls it (saving may be collective); rank 0 uploads
    return metrics

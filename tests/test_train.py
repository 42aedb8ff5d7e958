"""train.py and flmm_hf.training: the demo end to end, two processes, kill-and-resume, backbone configs.

Everything runs on CPU, offline, with the demo's tiny LLaVA (64 px images, a 4 x 4 grid, a random
frozen backbone: caption pre-training is skipped) so that each training run takes seconds.
"""
from __future__ import annotations

import json
import math
import shutil
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"

# A shortened demo: tiny images and backbone, a handful of scenes and steps.
TINY_DEMO = [
    "--demo_image_size", "64",
    "--demo_patch_size", "16",
    "--demo_pretrain_steps", "0",
    "--shapes_image_size", "64",
    "--shapes_train_scenes", "12",
    "--shapes_eval_scenes", "4",
    "--mask_head_channels", "8",
    "--per_device_train_batch_size", "2",
    "--per_device_eval_batch_size", "4",
    "--logging_steps", "1",
    "--report_to", "none",
    "--disable_tqdm", "true",
    "--overlay_examples", "0",
    "--seed", "0",
]


def _env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args: list[str], timeout: int = 240, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def _head(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# 1. The demo config, shortened, end to end: train, save, load the saved folder, predict
# ---------------------------------------------------------------------------------------------
def test_demo_end_to_end(tmp_path):
    from train import main

    out = tmp_path / "demo"
    metrics = main(["--output_dir", str(out)] + TINY_DEMO + ["--max_steps", "3", "--overlay_examples", "2"])
    for key in ("eval_miou", "eval_ciou", "eval_baseline_miou", "eval_baseline_ciou", "train_loss"):
        assert key in metrics and math.isfinite(metrics[key]), key
    results = json.loads((out / "all_results.json").read_text())
    for key in ("eval_miou", "eval_ciou", "eval_baseline_miou"):
        assert 0.0 <= results[key] <= 100.0
    assert (out / "predictions.png").is_file()
    assert (out / "backbone" / "config.json").is_file()  # the cached frozen backbone
    saved = _head(out)
    assert saved and not any(k.startswith("lmm.") for k in saved), "the frozen LMM must not be saved in adapter mode"
    # TensorBoard-free run here; the loss parts are in the log history.
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert logged and all("loss_mask" in h and "loss_dice" in h for h in logged)

    # Load the saved folder and predict.
    from PIL import Image

    from flmm_hf import FLMMForGrounding, FLMMProcessor
    from flmm_hf.shapes import generate_scene
    import numpy as np

    # the folder records its backbone relative to itself, so a moved copy loads too
    assert json.loads((out / "config.json").read_text())["lmm_name_or_path"] == "backbone"
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(out / "backbone")
    model = FLMMForGrounding.from_pretrained(moved).eval()
    processor = FLMMProcessor.from_pretrained(moved)
    for name, value in saved.items():
        torch.testing.assert_close(model.state_dict()[name], value)
    image, objects = generate_scene(np.random.default_rng(123), image_size=64)
    text = ". ".join(f"the {o['colour']} {o['shape']}" for o in objects) + "."
    phrases = [f"the {o['colour']} {o['shape']}" for o in objects]
    masks = model.ground(image, text, phrases, processor=processor)
    assert masks.shape == (len(objects), 64, 64) and masks.dtype == torch.bool
    assert isinstance(image, Image.Image)


# ---------------------------------------------------------------------------------------------
# 2. Two processes (torchrun, gloo on CPU): both ranks train, the saved heads are equal
# ---------------------------------------------------------------------------------------------
DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from transformers import TrainerCallback
    from flmm_hf.training import parse_arguments, setup_training

    kill_at = int(os.environ.get("FLMM_TEST_KILL_AT", "0"))
    report = os.environ.get("FLMM_TEST_REPORT")

    class KillAfterSave(TrainerCallback):
        # Simulates a crash right after the checkpoint of step `kill_at` was written.
        def on_save(self, args, state, control, **kwargs):
            if kill_at and state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    model_args, data_args, training_args = parse_arguments(sys.argv[1:], default_config="configs/demo.yaml")
    trainer, _ = setup_training(model_args, data_args, training_args)
    trainer.add_callback(KillAfterSave())
    seen = []
    collate = trainer.data_collator
    def recording_collator(items):
        batch = collate(items)
        seen.append(float(batch["pixel_values"].double().sum()))
        return batch
    trainer.data_collator = recording_collator
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        os.remove(os.path.join(trainer.args.output_dir, "README.md"))  # save_model wrote one already
    trainer.create_model_card()  # what push_to_hub writes before uploading
    if report:
        rank = trainer.args.process_index
        head = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items() if not k.startswith("lmm.")}
        torch.save({"world_size": trainer.args.world_size, "batches": seen, "head": head}, f"{report}.rank{rank}.pt")
    """
)


def _driver(tmp_path: Path) -> Path:
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


def test_two_processes_torchrun(tmp_path):
    driver = _driver(tmp_path)
    out = tmp_path / "ddp"
    report = tmp_path / "report"
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561", str(driver),
        "--output_dir", str(out), "--max_steps", "3", "--ddp_backend", "gloo", "--save_strategy", "no",
    ] + TINY_DEMO
    env_report = {"FLMM_TEST_REPORT": str(report)}
    result = subprocess.run(args, cwd=REPO_ROOT, env={**_env(), **env_report}, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-6000:]
    ranks = [torch.load(f"{report}.rank{r}.pt") for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    # Both ranks trained (3 steps each) on different shards of every global batch.
    assert all(len(r["batches"]) >= 3 for r in ranks)
    assert ranks[0]["batches"][:3] != ranks[1]["batches"][:3]
    # DDP kept the heads identical, and the saved file is that head.
    assert ranks[0]["head"].keys() == ranks[1]["head"].keys()
    for name in ranks[0]["head"]:
        torch.testing.assert_close(ranks[0]["head"][name], ranks[1]["head"][name], rtol=0, atol=0)
    saved = _head(out)
    for name, value in saved.items():
        torch.testing.assert_close(value, ranks[0]["head"][name], rtol=0, atol=0)
    # push_to_hub's card is F-LMM's own (library, base model, how to load), written once by rank 0
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "trust_remote_code=True" in card.text


# ---------------------------------------------------------------------------------------------
# 3. Kill after step 2's checkpoint, resume, and end where an uninterrupted run ends
# ---------------------------------------------------------------------------------------------
def test_kill_and_resume_matches_uninterrupted(tmp_path):
    driver = _driver(tmp_path)
    common = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
              "--demo_backbone_dir", str(tmp_path / "backbone")] + TINY_DEMO
    straight = tmp_path / "straight"
    _run([sys.executable, str(driver), "--output_dir", str(straight)] + common)

    interrupted = tmp_path / "interrupted"
    killed = subprocess.run(
        [sys.executable, str(driver), "--output_dir", str(interrupted)] + common,
        cwd=REPO_ROOT, env={**_env(), "FLMM_TEST_KILL_AT": "2"}, capture_output=True, text=True, timeout=240,
    )
    assert killed.returncode != 0, "the run should have been killed after the step-2 checkpoint"
    checkpoint = interrupted / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "scheduler.pt").is_file()
    assert not (interrupted / "checkpoint-4").exists()

    _run([sys.executable, str(driver), "--output_dir", str(interrupted), "--resume_from_checkpoint", str(checkpoint)] + common)
    a, b = _head(straight), _head(interrupted)
    assert a.keys() == b.keys()
    # Same seed, same data order and sentence draws, same optimizer/scheduler state: equal up to
    # float32 round-off (observed: exactly equal).
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 4. Backbone YAMLs: parse, the paper's hyper-parameters, and a tiny same-architecture model
# ---------------------------------------------------------------------------------------------
# model_type each Hub repo resolves to (checked against transformers' model docs).
BACKBONES = {
    "llava-1.5-7b.yaml": ("llava-hf/llava-1.5-7b-hf", "llava"),
    "llava-next-vicuna-7b.yaml": ("llava-hf/llava-v1.6-vicuna-7b-hf", "llava_next"),
    "llava-next-mistral-7b.yaml": ("llava-hf/llava-v1.6-mistral-7b-hf", "llava_next"),
    "deepseek-vl-1.3b-chat.yaml": ("deepseek-community/deepseek-vl-1.3b-chat", "deepseek_vl"),
    "deepseek-vl-7b-chat.yaml": ("deepseek-community/deepseek-vl-7b-chat", "deepseek_vl_hybrid"),
    "qwen2.5-vl-7b.yaml": ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl"),
    "smolvlm2-2.2b.yaml": ("HuggingFaceTB/SmolVLM2-2.2B-Instruct", "smolvlm"),
}
PAPER_BACKBONES = [name for name, (repo, _) in BACKBONES.items() if "Qwen" not in repo and "SmolVLM" not in repo]


def test_every_backbone_yaml_is_listed():
    found = {p.name for p in CONFIGS.glob("*.yaml")} - {"demo.yaml"}
    assert found == set(BACKBONES)
    assert len(PAPER_BACKBONES) == 5


def _tiny_lmm(model_type: str):
    """A tiny random model of `model_type` (the test family builders, plus DeepSeek-VL hybrid)."""
    from tiny_models import FAMILIES, build_tiny

    if model_type in FAMILIES:
        return build_tiny(model_type)[0]
    assert model_type == "deepseek_vl_hybrid"
    from transformers import AutoModelForImageTextToText, DeepseekVLHybridConfig

    config = DeepseekVLHybridConfig(
        text_config=dict(model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        high_res_vision_config=dict(model_type="sam_vision_model", hidden_size=32, output_channels=16, num_hidden_layers=2,
                                    num_attention_heads=4, image_size=64, patch_size=8, global_attn_indexes=[1],
                                    mlp_dim=64),
        image_token_id=250,
    )
    return AutoModelForImageTextToText.from_config(config)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_yaml(name, tmp_path):
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    from flmm_hf.training import build_model, parse_arguments, paper_warmup_steps

    repo, model_type = BACKBONES[name]
    # use_cpu: bf16 TrainingArguments refuse a machine without a bf16 GPU otherwise.
    model_args, data_args, args = parse_arguments(
        ["--config", str(CONFIGS / name), "--output_dir", str(tmp_path), "--use_cpu", "true"]
    )
    assert model_args.lmm_name_or_path == repo
    # The paper's recipe (method.md section 4).
    assert model_args.lmm_dtype == "bfloat16" and model_args.use_sam
    assert model_args.sam_name_or_path == "facebook/sam-vit-large"
    assert (model_args.mask_head_channels, model_args.mask_head_stages, model_args.merge) == (64, 4, "mean")
    assert data_args.train_datasets == ["data/png", "data/refcoco", "data/refcoco+", "data/refcocog"]
    assert data_args.concat_refs
    assert args.learning_rate == 1e-4 and args.weight_decay == 0.01
    assert (args.adam_beta1, args.adam_beta2) == (0.9, 0.999) and args.max_grad_norm == 1.0
    assert args.num_train_epochs == 8 and args.per_device_train_batch_size == 1
    assert args.gradient_accumulation_steps == 1 and args.bf16
    assert getattr(args.lr_scheduler_type, "value", None) == "cosine" and args.warmup_steps == 0.03
    assert args.warmup_start_factor == 1e-5
    assert args.remove_unused_columns is False and args.do_train
    assert paper_warmup_steps(args, 1000) == 30
    expected_mode = "native" if model_type in ("qwen2_5_vl", "smolvlm") else "reproduction"
    assert model_args.mode == expected_mode

    # A tiny model of the same architecture, built as train.py builds the real one.
    lmm = _tiny_lmm(model_type)
    assert lmm.config.model_type == model_type
    sam = SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=64, patch_size=16, global_attn_indexes=[1], mlp_dim=32),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                                                 iou_head_hidden_dim=16),
    )
    model = build_model(model_args, lmm=lmm, sam=sam)
    assert model.config.use_sam and model.sam_refiner is not None
    assert model.config.mask_head_in_channels == model.config.num_grids * len(model.config.selected_layers) * (
        lmm.config.get_text_config(decoder=True).num_attention_heads
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("lmm.") for n in trainable)
    assert not any(n.startswith("sam_refiner.vision_encoder.") for n in trainable)


# ---------------------------------------------------------------------------------------------
# The schedule: linear warm-up from 1e-5 then cosine to 0, as mmengine's LinearLR + CosineAnnealingLR
# ---------------------------------------------------------------------------------------------
def test_paper_schedule_matches_mmengine_closed_form():
    from transformers import TrainingArguments

    from flmm_hf.training import FLMMTrainer, warmup_cosine_factor

    total, warmup, start = 200, 6, 1e-5
    factors = [warmup_cosine_factor(i, warmup, total, start) for i in range(total + 1)]
    assert factors[0] == start
    assert factors[3] == pytest.approx(start + (1 - start) * 3 / 6)
    assert factors[warmup] == 1.0
    assert factors[warmup + (total - warmup) // 2] == pytest.approx(0.5, abs=1e-3)
    assert factors[total] == pytest.approx(0.0, abs=1e-12)
    # Same numbers through the Trainer's scheduler.
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-4)
    trainer = FLMMTrainer.__new__(FLMMTrainer)
    trainer.args = TrainingArguments(output_dir="unused", lr_scheduler_type="cosine", warmup_steps=0.03, report_to="none")
    trainer.args.warmup_start_factor = start
    trainer.lr_scheduler = None
    scheduler = trainer.create_scheduler(total, optimizer)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:warmup + 1] == pytest.approx([1e-4 * f for f in factors[:warmup + 1]], rel=1e-9)
    assert lrs == pytest.approx([1e-4 * f for f in factors[:total]], rel=1e-9, abs=1e-15)


def test_yaml_and_command_line_override(tmp_path):
    from flmm_hf.training import parse_arguments

    model_args, data_args, args = parse_arguments(
        ["--config", str(CONFIGS / "llava-1.5-7b.yaml"), "--output_dir", str(tmp_path), "--use_cpu", "true", "--learning_rate", "2e-4",
         "--use_sam", "false", "--attention_layers", "1", "3"]
    )
    assert args.learning_rate == 2e-4 and not model_args.use_sam and model_args.attention_layers == [1, 3]
    model_args, data_args, args = parse_arguments(["--output_dir", str(tmp_path)], default_config=CONFIGS / "demo.yaml")
    assert model_args.lmm_name_or_path is None and data_args.train_datasets is None

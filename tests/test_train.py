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
# The demo config, shortened, end to end: train, save, evaluate, draw, load the saved folder, predict
# ---------------------------------------------------------------------------------------------
def _held_out(out: Path, extra: list[str] = ()):
    """The held-out shapes scenes the shortened demo evaluates on (rebuilt from the same arguments)."""
    from flmm_hf.demo import shapes_datasets
    from flmm_hf.training import parse_arguments

    _, data_args, _ = parse_arguments(["--output_dir", str(out)] + TINY_DEMO + list(extra), default_config=CONFIGS / "demo.yaml")
    return shapes_datasets(data_args)[1]


def _independent_metrics(model, processor, rows) -> tuple[dict[str, float], int]:
    """cIoU / mIoU of `model` on `rows`, one batch, computed here without the evaluation loop."""
    from flmm_hf.data import FLMMTransform
    from flmm_hf.metrics import refer_seg_metrics

    examples = [FLMMTransform(train=False).example(rows[i]) for i in range(len(rows))]
    inputs = processor(images=[e["image"] for e in examples], texts=[e["text"] for e in examples],
                       phrases=[e["phrases"] for e in examples], return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs)
    logits = output.refined_logits if model.config.use_sam else output.coarse_logits
    predictions = torch.cat(processor.post_process_masks(logits, inputs["original_sizes"]))
    targets = torch.cat([e["masks"] for e in examples])
    return refer_seg_metrics(predictions, targets), len(targets)


def test_demo_trains_and_reports_the_held_out_metrics_of_its_saved_model(tmp_path):
    from train import main

    out = tmp_path / "demo"
    metrics = main(["--output_dir", str(out)] + TINY_DEMO + ["--max_steps", "3", "--overlay_examples", "2"])
    for key in ("eval_miou", "eval_ciou", "eval_loss", "eval_samples", "eval_baseline_miou", "eval_baseline_ciou",
                "train_loss"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert "eval_coarse_miou" not in metrics  # the demo has no refiner: its coarse masks are the reported ones
    results = json.loads((out / "all_results.json").read_text())
    assert {k: results[k] for k in metrics} == pytest.approx(metrics)
    assert (out / "backbone" / "config.json").is_file()  # the cached frozen backbone
    saved = _head(out)
    assert saved and not any(k.startswith("lmm.") for k in saved), "the frozen LMM must not be saved in adapter mode"
    # TensorBoard-free run here; the loss parts are in the log history.
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert logged and all("loss_bce" in h and "loss_dice" in h for h in logged)
    # the overlay: the first 2 held-out scenes (64 px each) side by side, each a tile of prediction
    # and ground truth with a legend below
    from PIL import Image

    from flmm_hf.demo import MIN_TILE_WIDTH

    with Image.open(out / "predictions.png") as picture:
        assert picture.width == 2 * max(2 * 64, MIN_TILE_WIDTH) and picture.height > 64

    # Load the saved folder: the folder records its backbone relative to itself, so a moved copy loads too.
    from flmm_hf import FLMMForGrounding, FLMMProcessor
    from flmm_hf.shapes import generate_scene
    import numpy as np

    assert json.loads((out / "config.json").read_text())["lmm_name_or_path"] == "backbone"
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(out / "backbone")
    model = FLMMForGrounding.from_pretrained(moved).eval()
    processor = FLMMProcessor.from_pretrained(moved)
    for name, value in saved.items():
        torch.testing.assert_close(model.state_dict()[name], value)
    # The reported held-out metrics are those of the saved model, recomputed here on the same scenes
    # in the same single batch (per_device_eval_batch_size 4 = all 4 scenes).
    expected, num_masks = _independent_metrics(model, processor, _held_out(out))
    assert metrics["eval_samples"] == num_masks
    assert metrics["eval_miou"] == pytest.approx(expected["miou"], abs=1e-6)
    assert metrics["eval_ciou"] == pytest.approx(expected["ciou"], abs=1e-6)

    image, objects = generate_scene(np.random.default_rng(123), image_size=64)
    text = ". ".join(f"the {o['colour']} {o['shape']}" for o in objects) + "."
    phrases = [f"the {o['colour']} {o['shape']}" for o in objects]
    masks = model.ground(image, text, phrases, processor=processor)
    assert masks.shape == (len(objects), 64, 64) and masks.dtype == torch.bool
    assert isinstance(image, Image.Image)


def test_demo_backbone_pretraining_lowers_the_caption_loss():
    """A few steps of the demo backbone's caption pre-training on tiny sizes: the loss falls."""
    import numpy as np

    from flmm_hf.demo_backbone import DemoBackboneArguments, PretrainArguments, build_demo_backbone, pretrain_demo_backbone
    from flmm_hf.shapes import generate_scene

    rng = np.random.default_rng(0)
    scenes = []
    for _ in range(8):
        image, objects = generate_scene(rng, image_size=32)
        scenes.append((image, [f"the {o['colour']} {o['shape']}" for o in objects], [o["mask"] for o in objects]))
    sizes = DemoBackboneArguments(image_size=32, patch_size=16, vision_hidden_size=32, text_hidden_size=32, text_layers=2)
    model, processor = build_demo_backbone(sizes, seed=0)
    stats = pretrain_demo_backbone(
        model, processor, scenes, PretrainArguments(steps=30, batch_size=8, learning_rate=1e-2, warmup_steps=3, seed=0)
    )
    assert stats["pretrain_steps"] == 30
    # the mean of the last 20 steps' losses against the first step's
    assert stats["pretrain_final_loss"] < 0.7 * stats["pretrain_first_loss"], stats
    assert not model.training and not any(p.requires_grad for p in model.parameters())  # frozen afterwards


# ---------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo on CPU): both ranks train, the saved heads are equal, evaluation
# gathers both shares and gives the numbers of one process
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
        metrics, kept = trainer.evaluate_with_predictions(keep_predictions=3)  # every rank takes part
        rank = trainer.args.process_index
        head = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items() if not k.startswith("lmm.")}
        torch.save({"world_size": trainer.args.world_size, "batches": seen, "head": head, "metrics": metrics,
                    "kept": [(p.index, p.masks, p.targets) for p in kept]}, f"{report}.rank{rank}.pt")
    """
)


def _driver(tmp_path: Path) -> Path:
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


def test_two_processes_train_one_head_and_evaluate_as_one_process(tmp_path):
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

    # Trainer evaluation over 2 processes (2 + 2 held-out scenes): every rank reports the gathered
    # metrics and the first 3 predictions in dataset order; one process on the saved folder gives the
    # same counts, and metrics equal up to float rounding (batches of 2 there, of 4 here).
    from types import SimpleNamespace

    from flmm_hf import FLMMForGrounding, FLMMProcessor
    from flmm_hf.evaluation import evaluate_dataset

    assert ranks[0]["metrics"].keys() == ranks[1]["metrics"].keys()
    assert {k: v for k, v in ranks[0]["metrics"].items() if k != "eval_runtime"} == {
        k: v for k, v in ranks[1]["metrics"].items() if k != "eval_runtime"}
    assert [index for index, _, _ in ranks[0]["kept"]] == [0, 1, 2]
    held_out = _held_out(out)
    single = evaluate_dataset(
        FLMMForGrounding.from_pretrained(out).eval(), FLMMProcessor.from_pretrained(out), held_out,
        SimpleNamespace(process_index=0, num_processes=1), batch_size=4, with_loss=True, keep_predictions=3,
    )
    coarse = single.accumulators["coarse"]
    assert ranks[0]["metrics"]["eval_samples"] == len(coarse) == sum(len(r) for r in held_out["ref_ids"])
    for key, value in coarse.compute_refer_seg().items():
        assert ranks[0]["metrics"][f"eval_{key}"] == pytest.approx(value, abs=1e-4), key
    # eval_loss is the mean of per-batch mean losses, so it depends on how the scenes are batched
    assert ranks[0]["metrics"]["eval_loss"] == pytest.approx(single.loss, rel=2e-2)
    for (index, masks, targets), kept in zip(ranks[0]["kept"], single.predictions):
        assert index == kept.index and torch.equal(targets, kept.targets)
        assert (masks != kept.masks).float().mean() < 1e-3


# ---------------------------------------------------------------------------------------------
# Kill after step 2's checkpoint, resume, and end where an uninterrupted run ends
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
# Backbone YAMLs: parse, the paper's hyper-parameters, and a tiny same-architecture model
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
    # the paper's recipe on five newer families (issue #15)
    "qwen3-vl-8b.yaml": ("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl"),
    "gemma-3-4b.yaml": ("google/gemma-3-4b-it", "gemma3"),
    "internvl3-8b.yaml": ("OpenGVLab/InternVL3-8B-hf", "internvl"),
    "llava-onevision-7b.yaml": ("llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava_onevision"),
    "mistral-small-3.1-24b.yaml": ("mistralai/Mistral-Small-3.1-24B-Instruct-2503", "mistral3"),
}
# backbone -> (the original's template with {image} and {question}, PNG trained on the default prompt)
ORIGINAL_PROMPTS = {
    "llava-1.5-7b.yaml": ("USER: {image}\n{question} ASSISTANT:", False),
    "llava-next-vicuna-7b.yaml": ("USER: {image}\n{question} ASSISTANT:", True),
    "llava-next-mistral-7b.yaml": ("[INST] {image}\n{question} [/INST]", True),
    "deepseek-vl-1.3b-chat.yaml": ("User: {image}{question}\n\nAssistant:", False),
    "deepseek-vl-7b-chat.yaml": ("User: {image}{question}\n\nAssistant:", False),
}
# The chat format of each newer family for one user turn of image + question, without system text, as its
# prompt_template writes it. No tokenizer or chat template of these families is among the offline fixtures,
# so `test_new_family_prompt_template_structure` checks the structure and the tokens that place the image; the
# fixture-backed families are checked against their real chat templates in test_reproduction_tokens.py.
NEW_FAMILY_PROMPTS = {
    # template -> (text right before {image}, text right after {image}, generation prompt it ends with)
    "qwen3-vl-8b.yaml": ("<|im_start|>user\n<|vision_start|>", "<|vision_end|>", "<|im_end|>\n<|im_start|>assistant\n"),
    "gemma-3-4b.yaml": ("<start_of_turn>user\n", "", "<end_of_turn>\n<start_of_turn>model\n"),
    "internvl3-8b.yaml": ("<|im_start|>user\n", "\n", "<|im_end|>\n<|im_start|>assistant\n"),
    "llava-onevision-7b.yaml": ("<|im_start|>user ", "\n", "<|im_end|>\n<|im_start|>assistant\n"),
    "mistral-small-3.1-24b.yaml": ("[INST]", "", "[/INST]"),
}
NATIVE_BACKBONES = {"qwen2.5-vl-7b.yaml", "smolvlm2-2.2b.yaml", *NEW_FAMILY_PROMPTS}
PAPER_BACKBONES = [name for name in BACKBONES if name not in NATIVE_BACKBONES]


def test_every_backbone_yaml_is_listed():
    found = {p.name for p in CONFIGS.glob("*.yaml")} - {"demo.yaml"}
    assert found == set(BACKBONES)
    assert len(PAPER_BACKBONES) == 5 and len(NEW_FAMILY_PROMPTS) == 5


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_yaml_names_a_supported_family(name):
    """Each YAML's Hub id resolves to a model type with a registered image layout (not refused, not the fallback)."""
    from flmm_hf.image_layout import FAMILIES, SUPPORTED, backbone_support

    _, model_type = BACKBONES[name]
    assert FAMILIES[model_type].layout is not None
    assert backbone_support([model_type])[model_type].status == SUPPORTED


@pytest.mark.parametrize("name", sorted(NEW_FAMILY_PROMPTS))
def test_new_family_prompt_template_structure(name, tmp_path, fixtures_dir):
    """The STRUCTURE of the newer families' prompt_template: {image} and {question} once each, the pieces of the
    family's chat format written down here (its user-turn opening and image wrapper, its generation prompt at the
    end), no system turn; and FLMMProcessor accepts it. (No tokenizer or chat template of these families is in the
    offline fixtures, so the real template's rendering cannot be compared here.)"""
    import string

    from tiny_models import llava_flmm_processor

    from flmm_hf.training import parse_arguments

    model_args, _, _ = parse_arguments(
        ["--config", str(CONFIGS / name), "--output_dir", str(tmp_path), "--use_cpu", "true"]
    )
    template = model_args.prompt_template
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    assert sorted(fields) == ["image", "question"], template
    before, after, generation = NEW_FAMILY_PROMPTS[name]
    assert template.startswith(before + "{image}" + after + "{question}"), template
    assert template.endswith("{question}" + generation), template
    assert "system" not in template.lower() and "[SYSTEM_PROMPT]" not in template
    # the image token the backbone processor expands replaces {image}; the question is placed as given
    prompt = template.format(image="<IMG>", question="Please give me a description of the image.")
    assert prompt.count("<IMG>") == 1 and prompt.count("Please give me a description of the image.") == 1
    # FLMMProcessor's own check of a template (only {image} and {question}, {image} present), here around the
    # fixture LLaVA processor: the check does not depend on the backbone
    processor = llava_flmm_processor(fixtures_dir)
    wrapped = type(processor)(processor.processor, mode=model_args.mode, prompt_template=template)
    assert wrapped.build_prompt().count(wrapped.image_token) == 1


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


def _tiny_sam_config():
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    return SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=64, patch_size=16, global_attn_indexes=[1], mlp_dim=32),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                                                 iou_head_hidden_dim=16),
    )


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_yaml(name, tmp_path):
    from flmm_hf.training import build_model, parse_arguments, paper_warmup_steps

    repo, model_type = BACKBONES[name]
    # use_cpu: bf16 TrainingArguments refuse a machine without a bf16 GPU otherwise.
    model_args, data_args, args = parse_arguments(
        ["--config", str(CONFIGS / name), "--output_dir", str(tmp_path), "--use_cpu", "true"]
    )
    assert model_args.lmm_name_or_path == repo
    # The paper's recipe.
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
    expected_mode = "native" if name in NATIVE_BACKBONES else "reproduction"
    assert model_args.mode == expected_mode
    # The original's prompt per backbone (its configs' prompt_template INSTRUCTION around the prompt),
    # its sentence draw, and each training dataset's prompt (the LLaVA-NeXT configs give PNG the default one).
    # The newer families' recipes pin their own chat format (test_new_family_prompt_template_structure).
    original = ORIGINAL_PROMPTS.get(name)
    if name in NEW_FAMILY_PROMPTS:
        assert model_args.prompt_template is not None
    else:
        assert model_args.prompt_template == (original[0] if original else None)
    if original or name in NEW_FAMILY_PROMPTS:
        assert data_args.text_mode == "random"
        assert data_args.train_questions == (["What is shown in this image?", "", "", ""] if original and original[1] else None)
    # The paper's backbones reproduce the original's numerics: bf16 eager attention maps. Weight decay on every
    # parameter is the paper's optimizer, kept by the newer families' recipes too (their maps: exact float32).
    paper = name in PAPER_BACKBONES
    assert model_args.attention_numerics == ("eager" if paper else "float32")
    assert args.weight_decay_scope == ("all" if paper or name in NEW_FAMILY_PROMPTS else "transformers")

    # A tiny model of the same architecture, built as train.py builds the real one.
    lmm = _tiny_lmm(model_type)
    assert lmm.config.model_type == model_type
    model = build_model(model_args, lmm=lmm, sam=_tiny_sam_config())
    assert model.config.use_sam and model.config.attention_numerics == model_args.attention_numerics
    assert model.config.mask_head_in_channels == model.config.num_grids * len(model.config.selected_layers) * (
        lmm.config.get_text_config(decoder=True).num_attention_heads
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("lmm.") for n in trainable)
    assert not any("vision_encoder." in n for n in trainable)  # SAM's image encoder stays frozen
    assert any("mask_decoder." in n for n in trainable)  # its mask decoder trains


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
    # the demo keeps the library defaults: float32 maps under SDPA, the Trainer's weight-decay groups
    assert model_args.attention_numerics == "float32" and args.weight_decay_scope == "transformers"


# ---------------------------------------------------------------------------------------------
# Weight decay: the Trainer's groups, or every trained parameter as mmengine's optimizer
# ---------------------------------------------------------------------------------------------
def test_weight_decay_scope_sets_the_optimizer_groups(tmp_path):
    """`weight_decay_scope="all"` gives every trained parameter (biases and norm weights included) weight decay 0.01,
    as the original's mmengine AdamW did; the default keeps the Trainer's groups (biases and norms at 0.0)."""
    from tiny_models import build_tiny

    from flmm_hf import FLMMForGrounding
    from flmm_hf.training import FLMMTrainer, FLMMTrainingArguments

    model = FLMMForGrounding.from_lmm(build_tiny("llava")[0], sam=_tiny_sam_config(), mask_head_channels=8)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    no_decay_in_transformers = {name for name in trained if "bias" in name or "norm" in name}
    # the head has both kinds: conv/linear biases, GroupNorm weights (U-Net), LayerNorms (SAM's mask decoder)
    assert any(n.endswith(".bias") for n in no_decay_in_transformers)
    assert any("norm" in n and n.endswith(".weight") for n in no_decay_in_transformers)
    assert "head.text_projection.proj.bias" in no_decay_in_transformers

    decay_of = {}
    for scope in ("transformers", "all"):
        args = FLMMTrainingArguments(
            output_dir=str(tmp_path / scope), weight_decay=0.01, weight_decay_scope=scope, use_cpu=True, report_to="none"
        )
        optimizer = FLMMTrainer(model=model, args=args).create_optimizer()
        by_id = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
        assert len(by_id) == len(trained)  # every trained parameter once, nothing frozen
        decay_of[scope] = {name: by_id[id(p)] for name, p in trained.items()}
    assert set(decay_of["all"].values()) == {0.01}
    assert {n for n, decay in decay_of["transformers"].items() if decay == 0.0} == no_decay_in_transformers
    decayed = {n for n, decay in decay_of["transformers"].items() if decay == 0.01}
    assert decayed == set(trained) - no_decay_in_transformers

    with pytest.raises(ValueError, match="weight_decay_scope must be one of .*'mmengine'"):
        FLMMTrainingArguments(output_dir=str(tmp_path), weight_decay_scope="mmengine", use_cpu=True, report_to="none")


# ---------------------------------------------------------------------------------------------
# ModelArguments: FLMMConfig's fields with FLMMConfig's types, defaults and help
# ---------------------------------------------------------------------------------------------
def test_model_arguments_take_type_default_and_help_from_flmm_config(monkeypatch):
    import dataclasses
    import inspect
    import typing

    from transformers import HfArgumentParser

    from flmm_hf.configuration_flmm import FLMMConfig
    from flmm_hf.training import (
        CONFIG_ARGUMENTS, FROZEN_PART_ARGUMENTS, DataArguments, FLMMTrainingArguments, ModelArguments,
        docstring_arguments, head_config_overrides,
    )

    parameters = inspect.signature(FLMMConfig.__init__, eval_str=True).parameters
    docs = docstring_arguments(FLMMConfig.__doc__)
    fields = {f.name: f for f in dataclasses.fields(ModelArguments)}
    def non_optional(annotation):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation

    for name in CONFIG_ARGUMENTS:
        # HfArgumentParser rewrites a field's `X | None` to `X` in place once it has parsed the dataclass
        assert fields[name].type in (parameters[name].annotation, non_optional(parameters[name].annotation)), name
        assert fields[name].default == parameters[name].default, name
        assert len(docs[name]) > 10 and fields[name].metadata["help"].startswith(docs[name].replace("%", "%%")), name
    # the defaults build FLMMConfig's defaults; the frozen parts are named apart
    defaults = ModelArguments()
    overrides = head_config_overrides(defaults)
    assert set(overrides) == set(CONFIG_ARGUMENTS) - set(FROZEN_PART_ARGUMENTS)
    reference = FLMMConfig()
    assert all(getattr(reference, k) == v for k, v in overrides.items())
    assert (defaults.sam_name_or_path, defaults.lmm_dtype, defaults.demo_pretrain_steps) == (reference.sam_name_or_path, "bfloat16", 400)
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps the help at the terminal's width
    help_text = HfArgumentParser((ModelArguments, DataArguments, FLMMTrainingArguments)).format_help()
    assert "Number of U-Net encoder stages" in help_text and "--demo_backbone_dir" in help_text


def test_docstring_arguments_parses_reworded_entries():
    from flmm_hf.training import docstring_arguments

    doc = """Summary line.

        Args:
            alpha (`int`, *optional*, defaults to 3): The first
                value, 50% of it (see `beta`):

                still alpha.
            beta (`dict` or `PreTrainedConfig`, *optional*, defaults to `{"a": (1, 2)}`):
                Beta, e.g. `f(x)`.
        Returns:
            gamma (`int`): not an argument.
        """
    assert docstring_arguments(doc) == {
        "alpha": "The first value, 50% of it (see `beta`): still alpha.",
        "beta": "Beta, e.g. `f(x)`.",
    }
    assert docstring_arguments("No arguments here.") == {}

"""FSDP: `accelerate launch` with configs/accelerate/fsdp.yaml's settings runs train.py over 2 CPU processes (gloo).

accelerate 1.15 sets up FSDP only on accelerators: on CPU processes it silently falls back to data parallelism.
So that FSDP's code path (the model sharded with FSDP2's `fully_shard`, the frozen LMM's layers as units, the
early stop of the attention capture inside a sharded layer, the gathered state dict saved as the trained keys)
runs here, the FSDP test's driver makes accelerate's state take the FSDP branch that it takes on GPUs; everything
else (launcher, Trainer, accelerate's FSDP2 preparation and state-dict gathering) is unchanged. Without that
driver, train.py refuses the run (`check_distributed_backend`), which the second test checks.

Same tiny demo as tests/test_train.py (64 px images, random frozen backbone, 3 steps).
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_train import TINY_DEMO, _env

REPO_ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO_ROOT / "configs" / "accelerate"

pytestmark = pytest.mark.fsdp

# train.py's main, with accelerate's state taking its FSDP branch on CPU processes, and a report of what ran.
FSDP_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        plugin = fsdp_plugin if fsdp_plugin is not None else getattr(self, "fsdp_plugin", None)
        # accelerate gives CPU processes MULTI_CPU and drops the FSDP plugin; on GPUs this is FSDP.
        if getattr(self, "distributed_type", None) == DistributedType.MULTI_CPU and plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = init

    from flmm_hf.frozen_parts import trained_state_dict
    from flmm_hf.training import FLMMTrainer

    report = os.environ["FLMM_TEST_REPORT"]
    original_train, original_save = FLMMTrainer.train, FLMMTrainer.save_model

    def train(self, *args, **kwargs):
        if self.is_world_process_zero():  # the head before training (the model is not wrapped yet)
            torch.save({k: v.clone() for k, v in trained_state_dict(self.model).items()}, report + ".init.pt")
        return original_train(self, *args, **kwargs)

    def save_model(self, *args, **kwargs):
        from torch.distributed.tensor import DTensor

        lmm = [p for n, p in self.model.named_parameters() if n.startswith("lmm.")]
        sharded = [p for p in lmm if isinstance(p, DTensor) and p.to_local().numel() < p.numel()]
        with open(f"{report}.rank{self.args.process_index}.json", "w") as f:
            json.dump({"fsdp2": self.accelerator.is_fsdp2, "model_class": type(self.model).__name__,
                       "lmm_parameters": len(lmm), "lmm_sharded": len(sharded),
                       "lmm_trainable": sum(p.requires_grad for p in lmm)}, f)
        return original_save(self, *args, **kwargs)

    FLMMTrainer.train, FLMMTrainer.save_model = train, save_model
    sys.path.insert(0, os.getcwd())
    from train import main

    main()
    """
)


# Plain SGD, so that equal gradients give equal weights: Adam's first steps turn the rounding noise of a gradient
# near 0 into a whole step of +-lr, which makes two runs that differ only in reduction order differ by ~lr.
SGD = ["--optim", "sgd", "--learning_rate", "0.05"]


def cpu_fsdp_config(path: Path) -> Path:
    """configs/accelerate/fsdp.yaml for 2 CPU processes: its fsdp_config as shipped, without bf16 or GPUs."""
    config = yaml.safe_load((ACCELERATE_CONFIGS / "fsdp.yaml").read_text())
    config.update(num_processes=2, use_cpu=True, mixed_precision="no")
    config.pop("gpu_ids", None)
    assert config["fsdp_config"]["fsdp_version"] == 2, "the shipped FSDP config is the FSDP2 one tested here"
    path.write_text(yaml.safe_dump(config))
    return path


def _free_port() -> int:
    """A TCP port nothing listens on now (a fixed one collides with a rerun or a parallel session)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(config: Path, script: Path, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    port = _free_port()
    args = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
        str(port), str(script), "--output_dir", str(out), "--max_steps", "3", "--save_strategy", "no",
    ] + TINY_DEMO + SGD
    return subprocess.run(args, cwd=REPO_ROOT, env={**_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=300)


def test_fsdp_two_cpu_processes_train_and_save_only_the_trained_head(tmp_path):
    driver = tmp_path / "fsdp_driver.py"
    driver.write_text(FSDP_DRIVER)
    report = tmp_path / "report"
    fsdp_out, ddp_out = tmp_path / "fsdp", tmp_path / "ddp"
    result = _launch(cpu_fsdp_config(tmp_path / "fsdp_cpu.yaml"), driver, fsdp_out,
                     {"FLMM_TEST_REPORT": str(report)})
    assert result.returncode == 0, result.stderr[-6000:]
    # The reference: the same run, data parallel (configs/accelerate/cpu_2proc.yaml, train.py itself).
    reference = _launch(ACCELERATE_CONFIGS / "cpu_2proc.yaml", REPO_ROOT / "train.py", ddp_out)
    assert reference.returncode == 0, reference.stderr[-6000:]

    # FSDP2 ran on both ranks, with the frozen LMM's weights sharded and still frozen.
    ranks = [json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["fsdp2"] and rank["model_class"] == "FSDPFLMMForGrounding", rank
        assert rank["lmm_parameters"] > 0 and rank["lmm_sharded"] > 0.5 * rank["lmm_parameters"], rank
        assert rank["lmm_trainable"] == 0, rank

    # Both runs had 2 processes: 3 steps of 2 x 2 examples are one epoch of the 12 scenes (one process: half).
    state = json.loads((fsdp_out / "trainer_state.json").read_text())
    assert state["epoch"] == 1.0 and json.loads((ddp_out / "trainer_state.json").read_text())["epoch"] == 1.0
    # The loss is finite at every step.
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    assert math.isfinite(json.loads((fsdp_out / "all_results.json").read_text())["train_loss"])

    # Saved: exactly the trained keys (the head), changed by training, equal to the data-parallel run's.
    saved, init, ddp = load_file(str(fsdp_out / "model.safetensors")), torch.load(f"{report}.init.pt"), load_file(
        str(ddp_out / "model.safetensors"))
    assert set(saved) == set(init) == set(ddp) and all(k.startswith("head.") for k in saved)
    # The same training, its gradients averaged by reduce-scatter instead of all-reduce: equal up to rounding.
    tolerance = 1e-5
    moved = max(float((saved[k] - init[k]).abs().max()) for k in saved)
    assert moved > 10 * tolerance, f"training hardly changed the head (max change {moved})"
    for key in saved:
        torch.testing.assert_close(saved[key], ddp[key], rtol=0, atol=tolerance)

    # The folder is F-LMM's own: its Hub code (not FSDP2's wrapper class from torch), the same files as the
    # data-parallel run's.
    config = json.loads((fsdp_out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_flmm.FLMMForGrounding"
    assert config["architectures"] == ["FLMMForGrounding"]
    assert sorted(p.name for p in fsdp_out.glob("*.py")) == sorted(p.name for p in ddp_out.glob("*.py"))

    # It loads and grounds: finite logits, one mask per phrase.
    import numpy as np

    from flmm_hf import FLMMForGrounding, FLMMProcessor
    from flmm_hf.shapes import generate_scene

    model = FLMMForGrounding.from_pretrained(fsdp_out).eval()
    processor = FLMMProcessor.from_pretrained(fsdp_out)
    image, objects = generate_scene(np.random.default_rng(5), image_size=64)
    phrases = [f"the {o['colour']} {o['shape']}" for o in objects]
    inputs = processor(images=[image], texts=[". ".join(phrases) + "."], phrases=[phrases], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).coarse_logits[0]
    assert logits.shape[0] == len(phrases) and torch.isfinite(logits).all()
    masks = model.ground(image, ". ".join(phrases) + ".", phrases, processor=processor)
    assert masks.shape == (len(phrases), 64, 64) and masks.dtype == torch.bool


def test_fsdp_request_that_accelerate_did_not_set_up_is_refused(tmp_path):
    """On CPU processes accelerate would silently train data parallel: train.py says so and stops."""
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_SYNC_MODULE_STATES": "false"}
    result = subprocess.run(
        [sys.executable, "train.py", "--output_dir", str(tmp_path / "out"), "--max_steps", "1"] + TINY_DEMO,
        cwd=REPO_ROOT, env={**_env(), **env}, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode != 0
    assert "FSDP was requested" in result.stderr and "configs/accelerate/cpu_2proc.yaml" in result.stderr, (
        result.stderr[-3000:])

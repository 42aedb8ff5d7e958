"""Hub packaging: remote code, adapter-sized and full saves, clear errors about the base, model cards.

A "trained" tiny F-LMM (tiny LLaVA-1.5-shaped LMM and tiny SAM, each saved to a local folder and
referenced by path, head weights perturbed away from their initialisation) is saved once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaConfig, Qwen2VLConfig, SamModel
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

from flmm_hf import FLMMForGrounding, FLMMProcessor
from flmm_hf.model_card import build_model_card, update_model_index
from tiny_models import tiny_llava, tiny_sam_config

TEXT = "two cats lying on a pink blanket."
PHRASES = ["two cats", "a pink blanket"]
# The head's trained modules (FLMMHead.trained_modules), as the saved keys must spell them.
TRAINED_PREFIXES = (
    "head.mask_head.", "head.text_projection.", "head.sam_refiner.sam.prompt_encoder.",
    "head.sam_refiner.sam.mask_decoder.",
)
FROZEN_PREFIXES = ("lmm.", "head.sam_refiner.sam.vision_encoder.")
# What the copied custom code may import: the model's own dependencies, and the standard library.
HUB_SAFE_IMPORTS = {"torch", "transformers", "numpy", "PIL", "huggingface_hub"} | set(sys.stdlib_module_names)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, fixtures_dir):
    """Local folders of the frozen parts: a tiny LLaVA (with the real llava-1.5 processor files) and a tiny SAM."""
    root = tmp_path_factory.mktemp("bases")
    tiny_llava(fixtures_dir).save_pretrained(root / "lmm")
    AutoProcessor.from_pretrained(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf").save_pretrained(root / "lmm")
    torch.manual_seed(1)
    SamModel(tiny_sam_config()).save_pretrained(root / "sam")
    return root


@pytest.fixture(scope="module")
def trained(bases):
    """An F-LMM over the saved bases whose trained parts differ from any initialisation."""
    model = FLMMForGrounding.from_lmm(str(bases / "lmm"), sam=str(bases / "sam"), mask_head_channels=8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(TRAINED_PREFIXES):
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def processor(bases):
    return FLMMProcessor(AutoProcessor.from_pretrained(bases / "lmm"))


@pytest.fixture(scope="module")
def saved(trained, processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flmm") / "adapter"
    trained.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image(fixtures_dir):
    return fixtures_dir / "coco" / "images" / "000000039769.png"


def _inputs(processor, image):
    return processor(images=[Image.open(image)], texts=[TEXT], phrases=[PHRASES])


def _copy(folder: Path, target: Path, **config_changes) -> Path:
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_adapter_file_holds_only_trained_weights(trained, saved):
    """No LMM or SAM-image-encoder tensor; exactly the state of the head's trained modules."""
    assert tuple(f"head.{name}." for name in trained.head.trained_modules()) == TRAINED_PREFIXES
    with safe_open(saved / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    expected = {k for k in trained.state_dict() if k.startswith(TRAINED_PREFIXES)}
    assert keys == expected
    assert not any(k.startswith(FROZEN_PREFIXES) for k in keys)
    assert all(k.startswith(TRAINED_PREFIXES) for k in keys)
    for prefix in TRAINED_PREFIXES:
        assert any(k.startswith(prefix) for k in keys), prefix
    frozen = sum(v.numel() for k, v in trained.state_dict().items() if k.startswith(FROZEN_PREFIXES))
    stored = sum(v.numel() for v in load_file(saved / "model.safetensors").values())
    assert stored < frozen  # the tiny bases already outweigh the head
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_flmm.FLMMConfig",
        "AutoModel": "modeling_flmm.FLMMForGrounding",
    }
    assert config["lmm_name_or_path"].endswith("lmm") and config["sam_name_or_path"].endswith("sam")
    assert config["lmm_config"]["model_type"] == "llava"
    assert config["lmm_config"]["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["save_mode"] == "adapter"


def test_custom_code_is_flat_complete_and_hub_safe(saved):
    """Every relative import of the copied code is copied; nothing imports beyond torch/transformers/numpy/PIL."""
    copied = {p.name for p in saved.glob("*.py")}
    needed = {Path(f).name for f in get_relative_import_files(saved / "modeling_flmm.py")}
    needed |= {Path(f).name for f in get_relative_import_files(saved / "processing_flmm.py")}
    assert needed <= copied, f"missing siblings: {needed - copied}"
    assert {"modeling_flmm.py", "configuration_flmm.py", "processing_flmm.py", "attention_capture.py",
            "image_layout.py", "mask_head.py", "sam_refiner.py", "losses.py"} <= copied
    # Library-only modules stay out (the Hub would require their dependencies).
    assert not copied & {"data.py", "metrics.py", "datasets_io.py", "training.py", "convert.py", "evaluation.py"}
    for name in sorted(copied):
        # The same check transformers runs on each file of a Hub repo (imports inside `try:` are optional).
        extra = set(get_imports(saved / name)) - HUB_SAFE_IMPORTS
        assert not extra, f"{name} imports {sorted(extra)}: users loading from the Hub would need them"
    processor_config = json.loads((saved / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_flmm.FLMMProcessor"}


WITHOUT_FLMM_HF = textwrap.dedent(
    """
    import json
    import sys

    # The editable install of flmm_hf adds an import finder; remove it so that only the folder's code can be used.
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    try:
        import flmm_hf
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"flmm_hf is importable from {flmm_hf.__file__}")
    """
)
"""The start of a child script that proves flmm_hf cannot be imported (only a saved folder's code can be used)."""


def run_without_flmm_hf(script: str, args: list[str], tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    """Run `WITHOUT_FLMM_HF + script` with `args` in a fresh, isolated, offline interpreter, outside the repo."""
    path = tmp_path / "child.py"
    path.write_text(WITHOUT_FLMM_HF + script)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    # -I: no PYTHONPATH, no user site, no script/cwd directory on sys.path; cwd is outside the repository.
    return subprocess.run([sys.executable, "-I", str(path), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


CHILD = textwrap.dedent(
    """
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoProcessor

    folder, image, out = sys.argv[1:4]
    text, phrases = json.loads(sys.argv[4])
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(images=[Image.open(image)], texts=[text], phrases=[phrases])
    with torch.no_grad():
        output = model(**inputs)
    masks = model.ground(Image.open(image), text, phrases, processor=processor)
    tensors = {"input." + k: v.contiguous() for k, v in inputs.items() if torch.is_tensor(v)}
    tensors.update(coarse=output.coarse_logits[0].contiguous(), refined=output.refined_logits[0].contiguous(), masks=masks)
    save_file(tensors, out)
    print(type(model).__module__, type(model).__name__, type(processor).__name__)
    """
)


def test_fresh_process_without_flmm_hf_gives_identical_outputs(trained, processor, saved, image, tmp_path):
    """AutoModel / AutoProcessor with remote code, in a process where flmm_hf is not importable."""
    out = tmp_path / "child.safetensors"
    result = run_without_flmm_hf(CHILD, [str(saved), str(image), str(out), json.dumps([TEXT, PHRASES])], tmp_path,
                                 timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    module, model_class, processor_class = result.stdout.split()[-3:]
    assert module.startswith("transformers_modules.") and model_class == "FLMMForGrounding"
    assert processor_class == "FLMMProcessor"
    # transformers' "You are using a model of type flmm to instantiate a model of type ..." would mean that
    # some loader read our config.json as a config of another class.
    assert "to instantiate a model of type" not in result.stdout + result.stderr, result.stderr[-3000:]

    child = load_file(out)
    inputs = _inputs(processor, image)
    for key, value in inputs.items():
        if torch.is_tensor(value):
            assert torch.equal(child[f"input.{key}"], value), key
    with torch.no_grad():
        output = trained(**inputs)
    assert torch.equal(child["coarse"], output.coarse_logits[0])
    assert torch.equal(child["refined"], output.refined_logits[0])
    assert torch.equal(child["masks"], trained.ground(Image.open(image), TEXT, PHRASES, processor=processor))


def test_adapter_round_trip_in_process(trained, processor, saved, image):
    loaded = FLMMForGrounding.from_pretrained(saved)
    assert not loaded.training and not any(p.requires_grad for p in loaded.lmm.parameters())
    assert not any(p.requires_grad for p in loaded.head.sam_refiner.sam.vision_encoder.parameters())
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable
    expected, found = trained.state_dict(), loaded.state_dict()
    assert set(found) == set(expected)
    for name, value in expected.items():  # key by key: the same names hold the same values
        assert torch.equal(value, found[name]), name
    for name, buffer in trained.named_buffers():  # non-persistent ones too (RoPE inv_freq)
        assert torch.equal(buffer, loaded.get_buffer(name)), name
    inputs = _inputs(processor, image)
    with torch.no_grad():
        a, b = trained(**inputs), loaded(**inputs)
    assert torch.equal(a.refined_logits[0], b.refined_logits[0])


def test_auto_classes_load_without_remote_code_when_installed(trained, processor, saved, image):
    """With flmm_hf imported, the Auto classes know model type "flmm": no `trust_remote_code`, and loading the
    folder's processor (whose tokenizer loader reads our config.json) gives no "model of type" warning."""
    from transformers import AutoConfig, AutoModel
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as hf_logging

    from flmm_hf import FLMMConfig

    assert type(AutoConfig.from_pretrained(saved)) is FLMMConfig
    model = AutoModel.from_pretrained(saved)
    assert type(model) is FLMMForGrounding
    with CaptureLogger(hf_logging.get_logger("transformers.configuration_utils")) as captured:
        loaded_processor = FLMMProcessor.from_pretrained(saved)
    assert "to instantiate a model of type" not in captured.out
    inputs = _inputs(loaded_processor, image)
    with torch.no_grad():
        assert torch.equal(model(**inputs).refined_logits[0], trained(**inputs).refined_logits[0])


def test_full_save_round_trip_without_the_bases(trained, processor, image, tmp_path):
    """The full save bundles lmm/ and sam/ and loads the same way, even with the bases gone."""
    trained.save_pretrained(tmp_path / "full", save_mode="full")
    with safe_open(tmp_path / "full" / "model.safetensors", "pt") as f:
        assert not any(k.startswith(FROZEN_PREFIXES) for k in f.keys())
    assert (tmp_path / "full" / "lmm" / "model.safetensors").is_file()
    assert (tmp_path / "full" / "sam" / "model.safetensors").is_file()
    assert trained.config.save_mode == "adapter"  # saving in another mode leaves the model's config alone
    # Point the references at nothing: only the bundled weights can satisfy the load.
    folder = _copy(tmp_path / "full", tmp_path / "moved", lmm_name_or_path="missing/lmm", sam_name_or_path="missing/sam")
    loaded = FLMMForGrounding.from_pretrained(folder)
    assert loaded.config.save_mode == "full"
    expected, found = trained.state_dict(), loaded.state_dict()
    assert set(found) == set(expected)
    for name, value in expected.items():
        assert torch.equal(value, found[name]), name
    inputs = _inputs(processor, image)
    with torch.no_grad():
        a, b = trained(**inputs), loaded(**inputs)
    assert torch.equal(a.coarse_logits[0], b.coarse_logits[0])
    assert torch.equal(a.refined_logits[0], b.refined_logits[0])


def test_missing_base_lmm_says_which_and_how_to_fix(saved, tmp_path):
    """A missing base LMM or SAM: the error names it and says how to fix it."""
    missing = tmp_path / "nowhere" / "llava"
    folder = _copy(saved, tmp_path / "copy", lmm_name_or_path=str(missing))
    with pytest.raises(OSError) as error:
        FLMMForGrounding.from_pretrained(folder)
    message = str(error.value)
    assert "base LMM" in message and str(missing) in message
    assert "lmm=" in message and "lmm_name_or_path" in message
    folder = _copy(saved, tmp_path / "nosam", sam_name_or_path=str(tmp_path / "nowhere" / "sam"))
    with pytest.raises(OSError, match="(?s)base SAM.*nowhere.*sam="):
        FLMMForGrounding.from_pretrained(folder)


def test_base_lmm_of_another_architecture_says_which_and_how_to_fix(saved, bases, tmp_path):
    """A base of another architecture or shape than recorded is refused before any weight is read."""
    Qwen2VLConfig().save_pretrained(tmp_path / "qwen")
    folder = _copy(saved, tmp_path / "copy", lmm_name_or_path=str(tmp_path / "qwen"))
    with pytest.raises(ValueError) as error:
        FLMMForGrounding.from_pretrained(folder)
    message = str(error.value)
    assert "'llava' was recorded" in message and "'qwen2_vl'" in message and "lmm=" in message

    deeper = LlavaConfig.from_pretrained(bases / "lmm")
    deeper.text_config.num_hidden_layers = 5
    deeper.save_pretrained(tmp_path / "deeper")
    with pytest.raises(ValueError, match="num_hidden_layers=3.*num_hidden_layers=5.*Fix"):
        FLMMForGrounding.from_pretrained(saved, lmm=str(tmp_path / "deeper"))
    # A SAM of another size than recorded is refused the same way.
    other_sam = tiny_sam_config()
    other_sam.vision_config.hidden_size = 64
    other_sam.save_pretrained(tmp_path / "sam64")
    with pytest.raises(ValueError, match="SAM.*hidden_size=32.*hidden_size=64"):
        FLMMForGrounding.from_pretrained(saved, sam=str(tmp_path / "sam64"))


def test_saved_model_card_parses_and_names_the_bases(saved):
    """A model over local bases: the card's metadata validates; its text names the base model and revision."""
    card = ModelCard.load(saved / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-segmentation"
    assert data.license == "apache-2.0" and "f-lmm" in data.tags and "llava" in data.tags
    assert data.base_model is None  # local folders are not Hub ids, which `base_model` must be
    config = json.loads((saved / "config.json").read_text())
    assert f"`{config['lmm_name_or_path']}`" in card.text and "main (not pinned)" in card.text
    assert "trust_remote_code=True" in card.text
    ModelCardData(**data.to_dict())  # strict re-validation of every field


def test_model_card_metadata_for_hub_bases_and_results(saved, tmp_path):
    """A model over Hub bases: base_model and revision; evaluation results become model-index."""
    config = json.loads((saved / "config.json").read_text())
    config.update(lmm_name_or_path="llava-hf/llava-1.5-7b-hf", lmm_revision="a" * 40, sam_revision="b" * 40,
                  sam_name_or_path="facebook/sam-vit-large")
    card = build_model_card(config, repo_id="org/flmm-llava-1.5-7b")
    data = ModelCard(str(card)).data  # reparse from text, as the Hub does
    assert data.base_model == ["llava-hf/llava-1.5-7b-hf", "facebook/sam-vit-large"]
    assert "a" * 40 in card.text and "b" * 40 in card.text
    assert 'AutoModel.from_pretrained("org/flmm-llava-1.5-7b"' in card.text

    folder = _copy(saved, tmp_path / "card")
    refcoco = {"type": "refcoco", "name": "RefCOCO", "split": "val"}
    task = {"type": "image-segmentation", "name": "Referring Expression Segmentation"}
    update_model_index(folder, [{"task": task, "dataset": refcoco,
                                 "metrics": [{"type": "ciou", "name": "cIoU", "value": 75.2},
                                             {"type": "giou", "name": "gIoU", "value": 76.1}]}])
    update_model_index(folder, [{"task": task, "dataset": refcoco,
                                 "metrics": [{"type": "ciou", "name": "cIoU", "value": 75.9}]}])
    card = ModelCard.load(folder / "README.md")
    assert "model-index" in card.content
    values = {(r.dataset_type, r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values == {("refcoco", "val", "ciou"): 75.9, ("refcoco", "val", "giou"): 76.1}
    assert "| RefCOCO | val | cIoU | 75.90 |" in card.text
    # Saving the model again into the folder keeps the results in the regenerated card.
    FLMMForGrounding.from_pretrained(folder).save_pretrained(folder)
    assert len(ModelCard.load(folder / "README.md").data.eval_results) == 2


def test_folder_in_the_earlier_key_layout_loads_the_same(trained, processor, saved, image, tmp_path):
    """Folders saved before the head became its own module (top-level `mask_head.*`, `sam_refiner.prompt_encoder.*`)
    load with the same weights."""
    from safetensors.torch import save_file

    folder = _copy(saved, tmp_path / "earlier")
    tensors = load_file(folder / "model.safetensors")
    earlier = {k.removeprefix("head.").replace("sam_refiner.sam.", "sam_refiner."): v for k, v in tensors.items()}
    assert any(k.startswith("sam_refiner.prompt_encoder.") for k in earlier)
    save_file(earlier, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = FLMMForGrounding.from_pretrained(folder)
    for key, value in tensors.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs = _inputs(processor, image)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).refined_logits[0], trained(**inputs).refined_logits[0])


def test_saving_leaves_the_model_config_as_it_was(trained, tmp_path):
    """Adapter and full saves write their own copy of the config; the model's changes only where transformers'
    own save_pretrained records architectures, dtype and auto_map."""
    def comparable(config):
        return {k: v for k, v in config.to_dict().items() if k not in ("architectures", "dtype", "auto_map")}

    before = comparable(trained.config)
    trained.save_pretrained(tmp_path / "adapter")
    trained.save_pretrained(tmp_path / "full", save_mode="full")
    assert comparable(trained.config) == before
    assert json.loads((tmp_path / "full" / "config.json").read_text())["save_mode"] == "full"


def test_attaching_a_backbone_of_another_shape_is_refused(saved, bases, fixtures_dir):
    loaded = FLMMForGrounding.from_pretrained(saved)
    other = tiny_llava(fixtures_dir)
    other.config.text_config.num_hidden_layers = 5
    with pytest.raises(ValueError, match="num_hidden_layers=3.*num_hidden_layers=5"):
        loaded.attach_frozen_parts(other, None)

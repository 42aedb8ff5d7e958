"""evaluate.py and flmm_hf.evaluation end to end on the real fixtures: the script name, sharding and
gathering, both protocols, every benchmark and metric, the CLI over two processes.

Datasets are built by the real builders (dataset_scripts/) from the fixture annotations; the
model is the tiny LLaVA-1.5-shaped LMM + tiny SAM of test_modeling.py.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_dataset
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoProcessor, SamConfig

from flmm_hf import FLMMForGrounding, FLMMProcessor
from flmm_hf.datasets_io import rle_to_mask
from flmm_hf.evaluation import (
    BENCHMARKS,
    RECALL_PLOT_SIZE,
    EvaluationArguments,
    load_model_and_processor,
    merge_payloads,
    model_index_results,
    prepare_res_split,
    results_table,
    run_evaluation,
    shard_indices,
)
from flmm_hf.metrics import MaskIoUAccumulator, png_metrics, refer_seg_metrics
from test_datasets import make_refcoco_inputs, run_png, run_refcoco
from tiny_models import tiny_llava, tiny_sam_config

REPO = Path(__file__).resolve().parents[1]
RES_KEYS = {"ciou", "miou"}
PNG_KEYS = {"ar", "ar_things", "ar_stuff", "ar_singulars", "ar_plurals", "acc_50", "pixel_acc"}
# one val image per split of the fixture refs (3, 2 and 2 refs, 3 sentences each); RefCOCOg: 1 val, 2 test
SPLIT_OF_IMAGE = {
    "refcoco": {460370: "val", 363252: "testA", 157714: "testB"},
    "refcocog": {460370: "val", 363252: "test", 157714: "test"},
}


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false")


# --------------------------------------------------------------------------------------
# Data and model, built once
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(fixtures_dir, tmp_path_factory):
    """RefCOCO / RefCOCO+ / RefCOCOg folders with every evaluation split, a val-only RefCOCO
    folder (3 images, 7 refs) and the PNG val folder, all built by dataset_scripts/."""
    root = tmp_path_factory.mktemp("eval_data")
    instances, _, refs = make_refcoco_inputs(fixtures_dir, root / "src")
    val_refs = [dict(r) for r in refs if r["split"] == "val"]
    out = {}
    first_ref_per_image = list({r["image_id"]: r for r in reversed(val_refs)}.values())[::-1]
    for name, variant in (("refcoco", "refcoco"), ("refcoco+", "refcoco"), ("refcocog", "refcocog")):
        # RefCOCO+/g: one ref per image keeps the test fast; RefCOCO keeps all (3, 2, 2 refs)
        chosen = val_refs if name == "refcoco" else first_ref_per_image
        split_refs = [dict(r, split=SPLIT_OF_IMAGE[variant][r["image_id"]]) for r in chosen]
        refs_path = root / f"refs_{name}.p"
        refs_path.write_bytes(pickle.dumps(split_refs, protocol=2))
        run_refcoco(fixtures_dir, (instances, refs_path, None), root / name, "--dataset", name)
        out[name] = root / name
    refs_path = root / "refs_val.p"
    refs_path.write_bytes(pickle.dumps(val_refs, protocol=2))
    run_refcoco(fixtures_dir, (instances, refs_path, None), root / "refcoco_val")
    out["refcoco_val"] = root / "refcoco_val"
    run_png(fixtures_dir, root / "png")
    out["png"] = root / "png"
    out["cache"] = root / "cache"
    return out


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while this file runs: on busy shared cores, competing OpenMP threads made
    the in-process evaluations 2-3x slower (torchrun's processes use one thread each too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def processor(fixtures_dir) -> FLMMProcessor:
    return FLMMProcessor(AutoProcessor.from_pretrained(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf"))


def small_sam_config() -> SamConfig:
    """test_modeling's tiny SAM with windowed instead of global attention: half the evaluation time."""
    config = tiny_sam_config()
    config.vision_config.global_attn_indexes = []
    config.vision_config.window_size = 8
    return config


@pytest.fixture(scope="module")
def model(fixtures_dir) -> FLMMForGrounding:
    torch.manual_seed(0)
    return FLMMForGrounding.from_lmm(tiny_llava(fixtures_dir), sam=small_sam_config(), mask_head_channels=8).eval()


@pytest.fixture(scope="module")
def model_dir(model, processor, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_flmm")
    model.save_pretrained(folder, save_mode="full")  # the tiny LMM has no Hub id to reference
    processor.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------
# 1. The script name does not shadow the `evaluate` library
# --------------------------------------------------------------------------------------
def test_help_from_repo_root_and_metric_modules_load():
    env = _env()
    run = subprocess.run([sys.executable, "evaluate.py", "--help"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for flag in ("--model_name_or_path", "--refcoco_plus", "--png", "--max_samples", "--batch_size", "--protocols"):
        assert flag in run.stdout
    # The process context of `python evaluate.py`: the repo root first on sys.path. After the script
    # ran (--help), `import evaluate` must be the library and the metric modules must load and compute.
    # Then, with the library forgotten, a plain `import evaluate` from the repo root (as `python -c` or
    # `python -m pytest` there do) finds evaluate.py first: the script must hand over the library.
    check = r"""
import importlib, json, runpy, sys
sys.path.insert(0, sys.argv[1]); sys.argv = ["evaluate.py", "--help"]
try:
    runpy.run_path("evaluate.py", run_name="__main__")
except SystemExit as e:
    assert e.code == 0, e.code
import evaluate, numpy as np
from flmm_hf.metrics import metric_module_path
assert hasattr(evaluate, "load") and "site-packages" in evaluate.__file__, evaluate.__file__
m = np.zeros((4, 4), bool); m[:2] = True
res = evaluate.load(metric_module_path("refer_seg")).compute(predictions=[m], references=[m])
png = evaluate.load(metric_module_path("png_recall"))
for name in [k for k in sys.modules if k == "evaluate" or k.startswith("evaluate.")]:
    del sys.modules[name]
again = importlib.import_module("evaluate")
print(json.dumps({"ciou": res["ciou"], "png": type(png).__name__, "shadowed": again.__file__.endswith(
    "site-packages/evaluate/__init__.py") and hasattr(again, "load")}))
"""
    run = subprocess.run([sys.executable, "-c", check, str(REPO)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"ciou": 100.0, "png": "PngRecall", "shadowed": True}


# --------------------------------------------------------------------------------------
# 2. Sharding and gathering: every example exactly once, dataset order restored
# --------------------------------------------------------------------------------------
def test_shards_cover_once_and_merge_in_dataset_order():
    rng = np.random.default_rng(0)
    n, world = 7, 3
    shards = [shard_indices(n, r, world) for r in range(world)]
    assert sorted(sum(shards, [])) == list(range(n)) and [len(s) for s in shards] == [3, 2, 2]
    assert shard_indices(1, 1, 2) == []
    masks = [(rng.random((k, 5, 6)) > 0.5, rng.random((k, 5, 6)) > 0.5) for k in (1, 3, 2, 1, 2, 1, 3)]
    single = MaskIoUAccumulator()
    for pred, gt in masks:
        single.add(pred, gt)
    payloads = []
    for shard in shards:
        acc = MaskIoUAccumulator()
        for i in shard:
            acc.add(*masks[i])
        payloads.append({"index": shard, "num_masks": [len(masks[i][0]) for i in shard],
                         "coarse": acc.state_dict(), "refined": acc.state_dict()})
    merged = merge_payloads(payloads, n)
    for variant in ("coarse", "refined"):
        np.testing.assert_array_equal(merged[variant].ious, single.ious)  # dataset order, not shard order
        assert merged[variant].compute_refer_seg() == single.compute_refer_seg()
    with pytest.raises(RuntimeError, match="exactly once"):
        merge_payloads(payloads + [payloads[0]], n)  # duplicates
    with pytest.raises(RuntimeError, match="exactly once"):
        merge_payloads(payloads[:2], n)  # a missing shard


def test_shards_of_the_model_loop_merge_to_the_one_process_run(model, processor, data):
    """predict_shard on the two shares of 2 processes, merged, gives exactly the one-process counts
    (batch 1 in both, so every forward is the same); the first predictions are kept in dataset order;
    the loss only comes when the model is given the masks (with_loss)."""
    from types import SimpleNamespace

    from flmm_hf.evaluation import evaluate_dataset, predict_shard

    rows = prepare_res_split(load_dataset(str(data["refcoco_val"]), split="val"), "concat", cache_dir=str(data["cache"]))
    one = evaluate_dataset(model, processor, rows, SimpleNamespace(process_index=0, num_processes=1),
                           with_loss=True, keep_predictions=2)
    shards = [predict_shard(model, processor, rows, shard_indices(len(rows), r, 2), keep_predictions=2) for r in range(2)]
    merged = merge_payloads(shards, len(rows))
    assert set(merged) == set(one.accumulators) == {"coarse", "refined"}
    for variant in merged:
        np.testing.assert_array_equal(merged[variant].state_dict()["intersection"], one.accumulators[variant].state_dict()["intersection"])
        np.testing.assert_array_equal(merged[variant].ious, one.accumulators[variant].ious)
    assert len(one.accumulators["coarse"]) == 7 and one.num_examples == 3  # 3 images, 7 refs
    assert one.loss is not None and math.isfinite(one.loss)
    assert all(shard["loss_batches"] == 0 for shard in shards)
    kept = sorted((p for shard in shards for p in shard["kept"]), key=lambda p: p.index)
    assert [p.index for p in one.predictions] == [p.index for p in kept] == [0, 1]
    for ours, theirs in zip(one.predictions, kept):
        assert torch.equal(ours.masks, theirs.masks) and torch.equal(ours.targets, theirs.targets)
        assert ours.masks.dtype == torch.bool and ours.masks.shape == ours.targets.shape


def test_protocols_concat_and_per_sentence(data):
    """concat: one example per image with the first sentence of each of its refs; per_sentence: every
    sentence of every ref alone (7 refs x 3 sentences); --max_samples counts examples after that."""
    from flmm_hf.data import FLMMTransform

    refs = load_dataset(str(data["refcoco_val"]), split="val")
    transform = FLMMTransform(train=False)
    concat = prepare_res_split(refs, "concat", cache_dir=str(data["cache"]))
    assert len(concat) == 3 and sum(len(r["ref_ids"]) for r in concat) == 7
    first = transform.example(concat[0])
    own = [r for r in refs if r["image_id"] == concat[0]["image_id"]]
    assert first["text"] == _first_sentence_concat(own)[0] and first["masks"].shape[0] == len(own)
    per_sentence = prepare_res_split(refs, "per_sentence")
    assert len(per_sentence) == sum(len(r["sentences"]) for r in refs) == 21
    texts = [transform.example(per_sentence[i])["text"] for i in range(3)]
    assert texts == [" ".join(s.lower().split()) + "." for s in refs[0]["raw_sentences"]]
    assert len(prepare_res_split(refs, "per_sentence", max_samples=4)) == 4
    assert len(prepare_res_split(refs, "concat", max_samples=2, cache_dir=str(data["cache"]))) == 2


def test_split_protocol_is_one_ref_per_sequence_with_its_first_sentence(model, processor, data, tmp_path):
    """The original's evaluation without --concat: 7 refs -> 7 examples of one expression each, and
    the reported metrics equal a direct prediction on each ref's first sentence alone."""
    from flmm_hf.data import FLMMTransform

    refs = load_dataset(str(data["refcoco_val"]), split="val")
    split = prepare_res_split(refs, "split")
    assert len(split) == len(refs) == 7
    transform = FLMMTransform(train=False)
    for i in range(len(refs)):
        example = transform.example(split[i])
        expression = " ".join(refs[i]["raw_sentences"][0].lower().split())
        assert example["text"] == expression + "." and example["phrases"] == [[0, len(expression)]]
    args = EvaluationArguments(
        refcoco=str(data["refcoco_val"]), protocols=["split"], max_samples=2, output_dir=str(tmp_path / "out"),
        cache_dir=str(data["cache"]),
    )
    entry = run_evaluation(args, model=model, processor=processor)["results"]["refcoco"]["val"]["split"]
    assert entry["num_examples"] == entry["num_masks"] == 2
    predictions, truths = [], []
    for row in (refs[0], refs[1]):
        expression = " ".join(row["raw_sentences"][0].lower().split())
        coarse, _ = _predict(model, processor, row["image"], expression + ".", [expression], _concat_pieces([expression]))
        predictions.append(coarse[0])
        truths.append(torch.from_numpy(rle_to_mask(row["mask"])))
    intersections = [float((p & t).sum()) for p, t in zip(predictions, truths)]
    unions = [float((p | t).sum()) for p, t in zip(predictions, truths)]
    assert entry["coarse"]["ciou"] == pytest.approx(100 * sum(intersections) / sum(unions), abs=1e-9)
    with pytest.raises(ValueError, match="unknown protocols"):
        EvaluationArguments(refcoco="x", protocols=["splits"])


# --------------------------------------------------------------------------------------
# 3. End to end: every benchmark, split, protocol and metric; the recall plot
# --------------------------------------------------------------------------------------
def _first_sentence_concat(rows) -> tuple[str, list[str]]:
    """The paper's concat text, written out independently: 'first raw sentence.' per ref."""
    expressions = [" ".join(r["raw_sentences"][0].lower().split()) for r in rows]
    return " ".join(e + "." for e in expressions), expressions


def _concat_pieces(expressions) -> list[tuple[int, int, bool]]:
    """The original's pieces of that text: each expression alone, then the last token of '.'."""
    pieces, pos = [], 0
    for e in expressions:
        pieces += [(pos, pos + len(e), False), (pos + len(e), pos + len(e) + 1, True)]
        pos += len(e) + 2
    return pieces


def _predict(model, processor, image, text, phrases, pieces=None):
    inputs = processor(images=[image], texts=[text], phrases=[phrases], pieces=[pieces], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    sizes = inputs["original_sizes"]
    return (processor.post_process_masks(out.coarse_logits, sizes)[0],
            processor.post_process_masks(out.refined_logits, sizes)[0])


def test_end_to_end_every_split_and_metric(model, processor, data, tmp_path):
    args = EvaluationArguments(
        refcoco=str(data["refcoco"]), refcoco_plus=str(data["refcoco+"]), refcocog=str(data["refcocog"]),
        png=str(data["png"]), max_samples=1, output_dir=str(tmp_path / "out"), cache_dir=str(data["cache"]),
    )
    output = run_evaluation(args, model=model, processor=processor)
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(output["results"]))
    results = saved["results"]
    assert set(results) == {"refcoco", "refcoco+", "refcocog", "png"}
    for benchmark in ("refcoco", "refcoco+", "refcocog"):
        assert set(results[benchmark]) == set(BENCHMARKS[benchmark][2])
        for split, node in results[benchmark].items():
            assert set(node) == {"concat", "per_sentence"}
            for protocol, entry in node.items():
                assert entry["num_examples"] == 1  # --max_samples 1
                for variant in ("refined", "coarse"):
                    assert set(entry[variant]) == RES_KEYS
                    assert all(0 <= v <= 100 for v in entry[variant].values())
            assert node["per_sentence"]["num_masks"] == 1
    assert results["refcoco"]["val"]["concat"]["num_masks"] == 3  # the 3 refs of image 460370 together
    assert results["refcocog"]["test"]["concat"]["num_masks"] == 1  # one ref per image in this folder

    # independent check of one RES entry: text and masks built here from the dataset rows
    rows = [r for r in load_dataset(str(data["refcoco"]), split="val")]
    text, expressions = _first_sentence_concat(rows)
    coarse, refined = _predict(model, processor, rows[0]["image"], text, expressions, _concat_pieces(expressions))
    gts = torch.from_numpy(np.stack([rle_to_mask(r["mask"]) for r in rows]))
    entry = results["refcoco"]["val"]["concat"]
    for variant, pred in (("coarse", coarse), ("refined", refined)):
        expected = refer_seg_metrics(pred, gts)
        assert entry[variant]["ciou"] == pytest.approx(expected["ciou"], abs=1e-9)
        assert entry[variant]["miou"] == pytest.approx(expected["miou"], abs=1e-9)
    assert entry["coarse"] != entry["refined"]  # both variants are really reported

    # PNG: every metric, and an independent check against the phrases of the narrative
    png = results["png"]["val"]
    row = load_dataset(str(data["png"]), split="val")[0]
    segments = [s for s in row["segments"] if s["segment_ids"]]
    assert png["num_examples"] == 1 and png["num_masks"] == len(segments)
    caption = row["caption"]
    spans = []
    for s in segments:  # the utterance's characters without surrounding spaces
        utterance = caption[s["start"]:s["end"]]
        start = s["start"] + len(utterance) - len(utterance.lstrip())
        spans.append((start, start + len(utterance.strip())))
    utterances = [(s["start"], s["end"]) for s in row["segments"] if s["end"] > s["start"]]  # the original's pieces
    coarse, refined = _predict(model, processor, row["image"], caption, spans, utterances)
    gts = torch.from_numpy(np.stack([rle_to_mask(s["mask"]) for s in segments]))
    flags = dict(isthing=[s["isthing"] for s in segments], plural=[s["plural"] for s in segments])
    for variant, pred in (("coarse", coarse), ("refined", refined)):
        assert set(png[variant]) == PNG_KEYS
        expected = png_metrics(pred, gts, **flags)
        for key in PNG_KEYS:
            if math.isnan(expected[key]):
                assert png[variant][key] is None  # an empty subgroup is null in the JSON
            else:
                assert png[variant][key] == pytest.approx(expected[key], abs=1e-9)

    # the recall plot: a real PNG file of the documented size
    plot = tmp_path / "out" / saved["plots"]["png/val"]
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == RECALL_PLOT_SIZE
        pixels = np.asarray(image.convert("RGB"))
    blue = (np.abs(pixels.astype(int) - [31, 119, 180]).sum(-1) < 30).sum()
    orange = (np.abs(pixels.astype(int) - [255, 127, 14]).sum(-1) < 30).sum()
    assert blue > 200 and orange > 200  # both curves are drawn (refined blue, coarse orange)

    # table and model-index views of the same numbers
    table = results_table(saved)
    assert "RefCOCO+" in table and "per_sentence" in table and "AR" in table
    assert f"{results['refcoco']['val']['concat']['refined']['ciou']:.2f}" in table
    entries = model_index_results(saved)
    assert len(entries) == 3 * 2 + 3 * 2 + 2 * 2 + 1
    assert {e["dataset"]["name"] for e in entries} == {"RefCOCO", "RefCOCO+", "RefCOCOg", "PNG"}


# --------------------------------------------------------------------------------------
# 4. The CLI on a saved model folder; two processes give the numbers of one
# --------------------------------------------------------------------------------------
def assert_same_results(actual, expected, atol: float, where: str = "results") -> None:
    """Equal nested results: same keys, exact integers and strings, floats within `atol`."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same_results(actual[key], expected[key], atol, f"{where}/{key}")
    elif isinstance(expected, float):
        assert isinstance(actual, float) and abs(actual - expected) <= atol, f"{where}: {actual} != {expected}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def test_cli_two_processes_equal_one_process(model, processor, model_dir, data, tmp_path):
    """One process (the API, model in memory) vs `torchrun --nproc_per_node 2 evaluate.py` on the saved
    folder: the same counts and the same metrics, which also proves the folder loads the same model.

    The two runs batch the examples differently (batch 2 in one process; 2 + 1 examples over two), so the
    refiner's float rounding may differ across machines: metrics agree to 1e-4 (measured: up to 1.6e-5 on a
    0-100 scale); counts are exact."""
    sources = dict(refcoco=str(data["refcoco_val"]), png=str(data["png"]))
    one = run_evaluation(
        EvaluationArguments(**sources, protocols=["concat"], max_samples=3, batch_size=2, output_dir=str(tmp_path / "one"),
                            cache_dir=str(data["cache"])),
        model=model, processor=processor,
    )
    run = subprocess.run(  # torchrun; on CPU the processes talk over gloo
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "evaluate.py",
         "--model_name_or_path", str(model_dir), "--refcoco", sources["refcoco"], "--png", sources["png"],
         "--protocols", "concat", "--max_samples", "3", "--batch_size", "2", "--cache_dir", str(data["cache"]),
         "--output_dir", str(tmp_path / "two"), "--update_model_card", "--lmm_dtype", "float32"],  # as in memory
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-5000:]
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert one["settings"]["lmm_dtype"] == two["settings"]["lmm_dtype"] == "float32"
    assert one["settings"]["attention_numerics"] == two["settings"]["attention_numerics"] == "float32"
    results = json.loads(json.dumps(one["results"]))
    # concat: 3 images, 7 refs (2 + 1 images per process); PNG: 1 narrative (one process idle)
    assert results["refcoco"]["val"]["concat"]["num_examples"] == 3
    assert results["refcoco"]["val"]["concat"]["num_masks"] == 7
    assert set(results["refcoco"]["val"]) == {"concat"}  # --protocols concat
    assert set(results["refcoco"]) == {"val"}  # this folder has no testA/testB: skipped, not invented
    assert_same_results(two["results"], results, atol=1e-4)
    # the CLI prints the table once (main process only) and writes the model card's model-index
    assert run.stdout.count("concat") == 1 and "PNG" in run.stdout
    # the card holds what the two-process run wrote (its metrics differ from one process's by float rounding only)
    card = ModelCard.load(model_dir / "README.md")
    index = {(r.dataset_name, r.dataset_split, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert index[("RefCOCO", "val", "cIoU (concat, refined)")] == pytest.approx(
        two["results"]["refcoco"]["val"]["concat"]["refined"]["ciou"])
    assert index[("PNG", "val", "AR (refined)")] == pytest.approx(two["results"]["png"]["val"]["refined"]["ar"])


def test_lmm_dtype_defaults_to_bf16(model_dir):
    """evaluate.py loads the frozen LMM in bf16 (the paper's dtype) unless told otherwise; the head and SAM stay
    float32."""
    for given, expected in ((None, torch.bfloat16), ("float32", torch.float32)):
        arguments = {} if given is None else {"lmm_dtype": given}
        loaded, _ = load_model_and_processor(EvaluationArguments(model_name_or_path=str(model_dir), **arguments))
        assert loaded.lmm.dtype == expected
        assert {p.dtype for p in loaded.head.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="lmm_dtype must be one of .*'bf16'"):
        EvaluationArguments(lmm_dtype="bf16")

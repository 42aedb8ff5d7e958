"""The model card (`README.md`) of a saved F-LMM folder: Hub metadata + how to load and run it.

`FLMMForGrounding.save_pretrained` writes it; `update_model_index` adds evaluation results
(`evaluate.py` calls it) as the Hub's `model-index`. The card is built with `huggingface_hub`'s
`ModelCard` / `ModelCardData`, so it is validated the way the Hub reads it.

This file is copied with the model's custom code (`frozen_parts.py` imports it lazily), so it
imports only the standard library and `huggingface_hub` (a dependency of transformers).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

CARD_NAME = "README.md"
PIPELINE_TAG = "image-segmentation"
DEFAULT_TAGS = ("f-lmm", "referring-expression-segmentation", "visual-grounding", "custom_code")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

[F-LMM](https://arxiv.org/abs/2406.05821) (Wu et al., CVPR 2025) grounds the words of a **frozen**
large multimodal model in the image: the LMM's word-to-image attention is turned into masks by a
small U-Net head, then refined by SAM. Only the head was trained; the LMM keeps its chat skills.

{{ origin }}

| part | checkpoint | revision |
|---|---|---|
| frozen LMM ({{ lmm_type }}) | `{{ lmm_name }}` | `{{ lmm_revision }}` |
{{ sam_row }}

- Save mode: `{{ save_mode }}` ({{ save_mode_text }})
- Prompt and preprocessing: `{{ mode }}` mode ({{ mode_text }})
- Head: U-Net over {{ in_channels }} attention channels{{ layers_text }}

## Usage

```python
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{{ repo_id }}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{{ repo_id }}", trust_remote_code=True)

image = Image.open("cats.jpg")
masks = model.ground(image, "two cats lying on a pink blanket.", ["two cats", "a pink blanket"], processor=processor)
# masks: BoolTensor [phrases, height, width] at the image's size
```

The frozen parts are loaded with their own `from_pretrained`; `dtype`, `device_map` and
`attn_implementation` given to `AutoModel.from_pretrained` are passed to the LMM.
{{ results_text }}
## Citation

```bibtex
@inproceedings{wu2025flmm,
  title={F-LMM: Grounding Frozen Large Multimodal Models},
  author={Wu, Size and Jin, Sheng and Zhang, Wenwei and Xu, Lumin and Liu, Wentao and Li, Wei and Loy, Chen Change},
  booktitle={CVPR},
  year={2025}
}
```
"""


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def hub_ids(*names: str | None) -> list[str]:
    """The names that are Hub repo ids (`org/name`), leaving out local folders (not valid `base_model`s)."""
    return [n for n in names if n and _HUB_ID.match(n) and not os.path.isdir(n)]


def build_model_card(
    config: Any,
    *,
    repo_id: str | None = None,
    save_mode: str | None = None,
    eval_results: list[EvalResult] | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    tags: Iterable[str] = (),
    source: str | None = None,
) -> ModelCard:
    """
    The model card of an F-LMM model.

    Args:
        config: the model's `FLMMConfig` (or its dict, as in `config.json`).
        repo_id: the model's Hub id, for the usage snippet (default: a placeholder).
        save_mode: `"adapter"` or `"full"` (default: `config.save_mode`).
        eval_results: evaluation results, written as `model-index`.
        datasets: Hub ids of the training datasets.
        license: the license of the trained weights (the base models keep their own).
        tags: extra tags.
        source: where the weights come from (e.g. the original checkpoint a converted model was made from).

    Returns:
        A `huggingface_hub.ModelCard` whose metadata validates.
    """
    lmm_name = _get(config, "lmm_name_or_path") or "(built from a config)"
    lmm_revision = _get(config, "lmm_revision") or "main (not pinned)"
    lmm_config = _get(config, "lmm_config") or {}
    sam_name = _get(config, "sam_name_or_path") if _get(config, "use_sam", True) else None
    save_mode = save_mode or _get(config, "save_mode", "adapter")
    mode = _get(config, "mode", "reproduction")
    model_name = repo_id.split("/")[-1] if repo_id else f"F-LMM on {lmm_name.rstrip('/').split('/')[-1]}"

    sam_row = "| SAM refiner | (none: coarse masks only) | |"
    if sam_name or _get(config, "use_sam", True):
        sam_row = f"| SAM refiner | `{sam_name or '(built from a config)'}` | `{_get(config, 'sam_revision') or 'main (not pinned)'}` |"
    layers = _get(config, "attention_layers")
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        base_model=hub_ids(_get(config, "lmm_name_or_path"), sam_name) or None,
        license=license,
        datasets=list(datasets) if datasets else None,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, lmm_config.get("model_type", "lmm"), *tags])),
        model_name=model_name,
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=model_name,
        repo_id=repo_id or "<your-org>/<this-model>",
        origin=f"Converted from {source}." if source else "",
        lmm_name=lmm_name,
        lmm_revision=lmm_revision,
        lmm_type=lmm_config.get("model_type", "unknown"),
        sam_row=sam_row,
        save_mode=save_mode,
        save_mode_text=(
            "only the trained weights are stored; the frozen LMM and SAM are loaded from the checkpoints above"
            if save_mode == "adapter"
            else "the frozen LMM and SAM are bundled in `lmm/` and `sam/`"
        ),
        mode=mode,
        mode_text=(
            "the original F-LMM prompt and 336-pixel pad-to-square preprocessing"
            if mode == "reproduction"
            else "the backbone's own processor and chat template"
        ),
        in_channels=_in_channels(config),
        layers_text=f" (decoder layers {layers})" if layers is not None else " (all decoder layers)",
        results_text=_results_table(eval_results),
    )


def _results_table(eval_results: list[EvalResult] | None) -> str:
    """The card's "Results" section: one Markdown row per result (empty without results)."""
    if not eval_results:
        return ""
    rows = "\n".join(
        f"| {r.dataset_name} | {r.dataset_split or ''} | {r.metric_name or r.metric_type} | "
        + (f"{r.metric_value:.2f} |" if isinstance(r.metric_value, float) else f"{r.metric_value} |")
        for r in eval_results
    )
    return f"\n## Results\n\n| dataset | split | metric | value |\n|---|---|---|---|\n{rows}\n"


def _in_channels(config: Any) -> str:
    value = getattr(config, "mask_head_in_channels", None)  # an FLMMConfig computes it; a dict does not
    return str(value) if value is not None else "the"


def _read_card(folder: str | os.PathLike) -> ModelCard | None:
    path = os.path.join(folder, CARD_NAME)
    return ModelCard.load(path) if os.path.isfile(path) else None


def write_model_card(
    folder: str | os.PathLike, config: Any, *, keep_results: bool = True, **kwargs: Any
) -> ModelCard:
    """Write `README.md` into `folder` (see `build_model_card` for kwargs); results of an existing card are kept."""
    existing = _read_card(folder) if keep_results else None
    if existing is not None and "eval_results" not in kwargs and existing.data.eval_results:
        kwargs["eval_results"] = existing.data.eval_results
    if existing is not None and "datasets" not in kwargs and existing.data.datasets:
        kwargs["datasets"] = existing.data.datasets
    card = build_model_card(config, **kwargs)
    card.save(os.path.join(folder, CARD_NAME))
    return card


def _eval_results(entries: Iterable[Mapping[str, Any]]) -> list[EvalResult]:
    """Hub `model-index` result entries (`task`, `dataset`, `metrics`) -> `EvalResult`s."""
    results = []
    for entry in entries:
        task, dataset = entry["task"], entry["dataset"]
        for metric in entry["metrics"]:
            results.append(
                EvalResult(
                    task_type=task["type"],
                    task_name=task.get("name"),
                    dataset_type=dataset["type"],
                    dataset_name=dataset["name"],
                    dataset_split=dataset.get("split"),
                    dataset_config=dataset.get("config"),
                    metric_type=metric["type"],
                    metric_name=metric.get("name"),
                    metric_value=metric["value"],
                )
            )
    return results


def update_model_index(folder: str | os.PathLike, entries: Iterable[Mapping[str, Any]]) -> ModelCard:
    """
    Add evaluation results to the model card of a saved F-LMM folder (its `model-index`).

    Args:
        folder: a folder written by `FLMMForGrounding.save_pretrained` (it has `config.json`).
        entries: Hub `model-index` results, each `{"task": {"type", "name"}, "dataset": {"name",
            "type", "split"}, "metrics": [{"type", "name", "value"}, ...]}`. A result for the same
            task, dataset, split and metric replaces the old one.

    Returns:
        The updated card (also written to `folder/README.md`).
    """
    import json

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    existing = _read_card(folder)
    old = list(existing.data.eval_results or []) if existing is not None else []
    new = _eval_results(entries)

    def key(r: EvalResult) -> tuple:
        return (r.task_type, r.dataset_type, r.dataset_name, r.dataset_split, r.metric_type, r.metric_name)

    replaced = {key(r) for r in new}
    merged = [r for r in old if key(r) not in replaced] + new
    return write_model_card(folder, config, eval_results=merged)

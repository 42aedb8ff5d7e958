"""Panoptic narrative grounding average recall as an ``evaluate`` module.

A thin wrapper over :func:`flmm_hf.metrics.png_metrics` and
:func:`flmm_hf.metrics.png_average_recall`; needs ``flmm_hf`` installed. Two configurations:

- ``"default"``: inputs ``predictions`` / ``references`` (one boolean mask [H, W] per phrase),
  ``isthing``, ``plural``; returns the average recalls, ``acc_50`` and ``pixel_acc``.
- ``"ious"``: inputs ``ious`` (one IoU per phrase), ``isthing``, ``plural``; returns the
  average recalls and ``acc_50``.

Load offline from the local path::

    import evaluate
    from flmm_hf.metrics import metric_module_path
    metric = evaluate.load(metric_module_path("png_recall"), "ious")
    metric.compute(ious=[0.7, 0.2], isthing=[True, False], plural=[False, False])
"""

import datasets
import evaluate
import numpy as np

from flmm_hf.metrics import png_average_recall, png_metrics

_DESCRIPTION = (
    "Panoptic narrative grounding: average recall = area under recall(IoU >= t) over thresholds "
    "np.arange(0, 1, 1e-5) as the original PNG evaluation integrates it, overall and for things, "
    "stuff, singulars and plurals (plural phrases count as things), plus accuracy at IoU > 0.5."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions ("default" config): one predicted boolean mask [H, W] per phrase.
    references ("default" config): the ground-truth boolean mask [H, W] of each phrase.
    ious ("ious" config): the IoU of each phrase.
    isthing: whether each phrase is a "thing" (plural phrases count as things anyway).
    plural: whether each phrase is plural.
Returns:
    ar, ar_things, ar_stuff, ar_singulars, ar_plurals, acc_50 (0-100; NaN for an empty subgroup),
    and pixel_acc (0-100) with the "default" config.
"""

_CITATION = """\
@inproceedings{gonzalez2021panoptic,
  title={Panoptic Narrative Grounding},
  author={Gonz{\\'a}lez, Cristina and Ayobi, Nicol{\\'a}s and Hern{\\'a}ndez, Isabela and Hern{\\'a}ndez, Jos{\\'e} and Pont-Tuset, Jordi and Arbel{\\'a}ez, Pablo},
  booktitle={ICCV},
  year={2021}
}
"""

_LIST = getattr(datasets, "List", datasets.Sequence)
_MASK = _LIST(_LIST(datasets.Value("bool")))
_FLAGS = {"isthing": datasets.Value("bool"), "plural": datasets.Value("bool")}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PngRecall(evaluate.Metric):
    """Average recall of panoptic narrative grounding."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name == "ious":
            features = {"ious": datasets.Value("float64"), **_FLAGS}
        elif self.config_name == "default":
            features = {"predictions": _MASK, "references": _MASK, **_FLAGS}
        else:
            raise ValueError(f"unknown config {self.config_name!r}: use 'default' or 'ious'")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
        )

    def _compute(self, isthing, plural, predictions=None, references=None, ious=None) -> dict:
        if self.config_name == "ious":
            return png_average_recall(np.asarray(ious, dtype=np.float64), isthing=isthing, plural=plural)
        preds = [np.asarray(p, dtype=bool) for p in predictions]
        gts = [np.asarray(g, dtype=bool) for g in references]
        return png_metrics(preds, gts, isthing=isthing, plural=plural)

"""Referring expression segmentation metric (cIoU, mIoU/gIoU) as an ``evaluate`` module.

A thin wrapper over :func:`flmm_hf.metrics.refer_seg_metrics`; needs ``flmm_hf`` installed.
Load offline from the local path::

    import evaluate
    from flmm_hf.metrics import metric_module_path
    metric = evaluate.load(metric_module_path("refer_seg"))
    metric.compute(predictions=[pred_mask, ...], references=[gt_mask, ...])
"""

import datasets
import evaluate
import numpy as np

from flmm_hf.metrics import refer_seg_metrics

_DESCRIPTION = (
    "Referring expression segmentation: cIoU = 100 * sum of intersections / sum of unions over "
    "all expressions; mIoU (gIoU) = 100 * mean per-expression IoU, an empty union counting as 0."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions: one predicted boolean mask [H, W] per expression (sizes may differ between expressions).
    references: the ground-truth boolean mask [H, W] of each expression, same size as its prediction.
Returns:
    ciou: cumulative IoU in 0-100.
    miou: mean IoU in 0-100.
"""

_CITATION = """\
@article{wu2024flmm,
  title={F-LMM: Grounding Frozen Large Multimodal Models},
  author={Wu, Size and Jin, Sheng and Zhang, Wenwei and Xu, Lumin and Liu, Wentao and Li, Wei and Loy, Chen Change},
  journal={arXiv preprint arXiv:2406.05821},
  year={2024}
}
"""

_LIST = getattr(datasets, "List", datasets.Sequence)
_MASK = _LIST(_LIST(datasets.Value("bool")))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReferSeg(evaluate.Metric):
    """cIoU and mIoU of referring expression segmentation masks."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _MASK, "references": _MASK}),
        )

    def _compute(self, predictions, references) -> dict:
        preds = [np.asarray(p, dtype=bool) for p in predictions]
        gts = [np.asarray(g, dtype=bool) for g in references]
        return refer_seg_metrics(preds, gts)

"""flmm-hf: F-LMM (Grounding Frozen Large Multimodal Models) as a Hugging Face-native package."""

from .configuration_flmm import FLMMConfig
from .image_layout import BackboneSupport, backbone_support
from .modeling_flmm import FLMMForGrounding, FLMMOutput
from .processing_flmm import FLMMProcessor

__version__ = "0.1.0"

# With flmm_hf installed, saved folders load through the Auto classes without remote code, and tools that read a
# folder's config.json (the backbone's tokenizer loader, for one) recognise model type "flmm".
# (Not in configuration_flmm.py / modeling_flmm.py: those files are copied into saved folders as remote code.)
from transformers import AutoConfig, AutoModel  # noqa: E402
from transformers.pipelines import PIPELINE_REGISTRY  # noqa: E402

from .pipeline_flmm import TASK as _PIPELINE_TASK, ReferringSegmentationPipeline  # noqa: E402

AutoConfig.register(FLMMConfig.model_type, FLMMConfig, exist_ok=True)
AutoModel.register(FLMMConfig, FLMMForGrounding, exist_ok=True)
# `pipeline("referring-segmentation", model=<FLMMForGrounding>, processor=...)` for a model in memory. (A saved
# folder records the pipeline in config.json's `custom_pipelines`, which transformers reads before this registry.)
if _PIPELINE_TASK not in PIPELINE_REGISTRY.supported_tasks:
    PIPELINE_REGISTRY.register_pipeline(
        _PIPELINE_TASK, pipeline_class=ReferringSegmentationPipeline, pt_model=AutoModel, type="multimodal"
    )


def __getattr__(name: str):
    # Lazy, so that `python -m flmm_hf.convert` does not import the module twice.
    if name == "convert_original_checkpoint":
        from .convert import convert_original_checkpoint

        return convert_original_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BackboneSupport",
    "backbone_support",
    "FLMMConfig",
    "convert_original_checkpoint",
    "FLMMForGrounding",
    "FLMMOutput",
    "FLMMProcessor",
    "ReferringSegmentationPipeline",
]

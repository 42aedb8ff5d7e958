"""flmm-hf: F-LMM (Grounding Frozen Large Multimodal Models) as a Hugging Face-native package."""

from .configuration_flmm import FLMMConfig
from .modeling_flmm import FLMMForGrounding, FLMMOutput
from .processing_flmm import FLMMProcessor

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `python -m flmm_hf.convert` does not import the module twice.
    if name == "convert_original_checkpoint":
        from .convert import convert_original_checkpoint

        return convert_original_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["FLMMConfig", "convert_original_checkpoint", "FLMMForGrounding", "FLMMOutput", "FLMMProcessor"]

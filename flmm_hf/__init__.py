"""flmm-hf: F-LMM (Grounding Frozen Large Multimodal Models) as a Hugging Face-native package."""

from .configuration_flmm import FLMMConfig
from .modeling_flmm import FLMMForGrounding, FLMMOutput
from .processing_flmm import FLMMProcessor

__version__ = "0.1.0"

__all__ = ["FLMMConfig", "FLMMForGrounding", "FLMMOutput", "FLMMProcessor"]

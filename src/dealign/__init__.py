"""dealign: decoding-time alignment (DeAL) for Hugging Face causal language models."""

from .api import Aligner, GenerationResult
from .search import SearchConfig

__version__ = "0.1.0"
__all__ = ["Aligner", "GenerationResult", "SearchConfig", "__version__"]

"""dealign: decoding-time alignment (DeAL) for Hugging Face causal language models."""

from .api import Aligner, GenerationResult
from .errors import ConfigError, ModelLoadError, RemoteEngineError, RewardError, UsageError
from .search import SearchConfig

__version__ = "0.1.0"
__all__ = ["Aligner", "ConfigError", "GenerationResult", "ModelLoadError", "RemoteEngineError", "RewardError",
           "SearchConfig", "UsageError", "__version__"]

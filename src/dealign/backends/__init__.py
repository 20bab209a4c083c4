from .base import Backend, Beam, Rollout, Sampler
from .hf import HFBackend, NaiveHFBackend

__all__ = ["Backend", "Beam", "HFBackend", "NaiveHFBackend", "Rollout", "Sampler"]

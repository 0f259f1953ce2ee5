"""Architecture adapters by Hugging Face ``model_type``."""
from __future__ import annotations

from common.errors import UserError

from .gemma3 import Gemma3Adapter
from .llama import LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter
from .opt import OPTAdapter

ADAPTERS = {"opt": OPTAdapter, "llama": LlamaAdapter, "mistral": MistralAdapter, "qwen2": Qwen2Adapter,
            "qwen3": Qwen3Adapter, "gemma3_text": Gemma3Adapter}
# Checkpoints of a family whose text model has an adapter: what to pass instead.
INSTEAD = {"gemma3": "this is the multimodal Gemma 3 checkpoint; pass a text-only one (Gemma3ForCausalLM, "
                     "model_type gemma3_text), e.g. gemma3-270m"}


def adapter_for(config):
    model_type = getattr(config, "model_type", None)
    if model_type in INSTEAD:
        raise UserError(f"architecture {model_type!r}: {INSTEAD[model_type]}")
    if model_type not in ADAPTERS:
        raise UserError(f"architecture {model_type!r} has no adapter; supported: {', '.join(sorted(ADAPTERS))}")
    adapter = ADAPTERS[model_type]()
    adapter.check(config)
    return adapter

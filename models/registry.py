"""Architecture adapters by Hugging Face ``model_type``."""
from __future__ import annotations

from common.errors import UserError

from .llama import LlamaAdapter
from .opt import OPTAdapter

ADAPTERS = {"opt": OPTAdapter, "llama": LlamaAdapter}


def adapter_for(config):
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UserError(f"architecture {model_type!r} has no adapter; supported: {', '.join(sorted(ADAPTERS))}")
    adapter = ADAPTERS[model_type]()
    adapter.check(config)
    return adapter

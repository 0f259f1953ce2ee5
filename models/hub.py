"""Decide once, quickly, whether the Hugging Face hub can be reached.

Without this, a lookup on a machine with no route to the hub retries for about a
minute before failing. When the hub is unreachable we switch the libraries to
offline mode, so cached files still load and everything else fails at once.
"""
from __future__ import annotations

import os
import socket
from functools import lru_cache

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _env_offline() -> bool:
    return any(os.environ.get(var, "").lower() in ("1", "true", "yes") for var in OFFLINE_VARS)


@lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    if _env_offline():
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def go_offline() -> None:
    """Offline mode for huggingface_hub, datasets and transformers, even if already imported."""
    for var in OFFLINE_VARS:
        os.environ[var] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    try:
        import datasets.config as ds_config

        ds_config.HF_HUB_OFFLINE = True
        ds_config.HF_DATASETS_OFFLINE = True
    except (ImportError, AttributeError):
        pass


def configure_hub() -> bool:
    """Probe the hub; go offline when it cannot be reached. Returns reachability."""
    reachable = hub_reachable()
    if not reachable:
        go_offline()
    return reachable

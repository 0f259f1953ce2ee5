"""Decide once, quickly, whether the Hugging Face hub can be reached.

Without this, a lookup on a machine with no route to the hub retries for about a
minute before failing. When the hub is unreachable we switch the libraries to
offline mode, so cached files still load and everything else fails at once.
"""
from __future__ import annotations

import os
import socket
import ssl
import threading
from functools import lru_cache

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
HUB_HOST = ("huggingface.co", 443)


def offline_by_env() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in OFFLINE_VARS)


def probe_hub(timeout: float = 3.0) -> bool:
    """A TCP connect plus a certificate-verified TLS handshake with the hub.

    The handshake matters: some sandboxes accept every TCP connection, so a bare
    connect proves nothing. The probe runs in a daemon thread, so even a stuck name
    lookup cannot hold the caller longer than ``timeout`` + 0.5 s.
    """
    ok: list[bool] = []

    def probe():
        try:
            with socket.create_connection(HUB_HOST, timeout=timeout) as raw:
                with ssl.create_default_context().wrap_socket(raw, server_hostname=HUB_HOST[0]):
                    ok.append(True)
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok)


@lru_cache(maxsize=1)
def _probe_once() -> bool:
    return probe_hub()


def hub_reachable() -> bool:
    """False at once when an offline variable is set; otherwise one probe per process."""
    return not offline_by_env() and _probe_once()


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

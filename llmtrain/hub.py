"""Hugging Face Hub names without a network: fail (or use the local cache) at once, not after retries.

With no network, huggingface_hub retries every request with back-off (about a minute of "Retrying in N s"
lines) before transformers gives up. Before the first hub-name lookup we probe the Hub's host once; if it
cannot be reached within a few seconds, this process switches to offline mode, where a name is served
from the local cache or fails at once with one line.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


def offline_by_env() -> bool:
    return any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                               "HF_DATASETS_OFFLINE"))


@functools.cache
def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the Hub's endpoint (HF_ENDPOINT, default huggingface.co:443)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
        return True
    except OSError:
        return False


def go_offline() -> None:
    """Offline mode for this process: for the libraries already imported and those imported later."""
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[k] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config as dc

        dc.HF_HUB_OFFLINE = True


def prepare_hub_lookup() -> bool:
    """Call before resolving a hub name; returns whether the Hub is used online."""
    if offline_by_env():
        return False
    if hub_reachable():
        return True
    go_offline()
    return False


OFFLINE_HINT = "the Hugging Face Hub cannot be reached and the name is not in the local cache; use a local dir"

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
from pathlib import Path
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


def hf_model_dir(name_or_dir: str, key: str) -> Path:
    """A local Hugging Face model dir: `name_or_dir` itself, or a hub name's snapshot (downloaded, or from
    the local cache when offline). Raises ConfigError(key) with one line when there is none."""
    from llmtrain.errors import ConfigError

    path = Path(name_or_dir).expanduser()
    if path.exists() or name_or_dir.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ConfigError(key, f"{name_or_dir} is not a Hugging Face model dir (no config.json)")
        return path
    online = prepare_hub_lookup()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_dir, allow_patterns=MODEL_FILES))
    except Exception as e:  # offline and not cached, unknown repo, no access: one line
        why = str(e).splitlines()[0] if online and str(e) else OFFLINE_HINT
        raise ConfigError(key, f"cannot load {name_or_dir!r}: {why}") from None


MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
               "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json"]

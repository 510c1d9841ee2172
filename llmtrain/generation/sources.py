"""Where a model to generate from comes from: a run dir, an exported / Hugging Face GPT-2 dir, a hub name.

Every source gives a causal LM (models/protocol.py) and its tokenizer: a model dir through `load_hf` (native
GPT-2), a run's checkpoint through its family's `ModelSpec.causal_lm`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmtrain.errors import ConfigError
from llmtrain.models.gpt2_native import load_hf
from llmtrain.models.protocol import CausalLM
from llmtrain.rundir import CONFIG_FILE


def is_run(path: Path) -> bool:
    """A training run's dir (its config.yaml), not a model dir (config.json)."""
    return (path / CONFIG_FILE).is_file() and not (path / "config.json").is_file()


def final_export(run_dir: Path) -> Path | None:
    """The run's final/ export; None before the run has written one."""
    final = run_dir / "final"
    return final if (final / "config.json").is_file() else None


def load_source(source: str) -> tuple[CausalLM, Any]:
    """(causal LM in eval mode, its tokenizer) for `source`; one-line ConfigError("source") otherwise."""
    from llmtrain.data.tokenizers import Tokenizer

    path = Path(source).expanduser()
    if is_run(path):
        return _from_run(path)
    from llmtrain.hub import hf_model_dir

    path = hf_model_dir(source, "source")
    try:
        model = load_hf(path)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ConfigError("source", f"{source} is not a GPT-2 model dir ({e})") from None
    if not any((path / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise ConfigError("source", f"{source} holds no tokenizer (tokenizer.json or vocab.json + merges.txt)")
    return model.eval(), Tokenizer.from_dir(path)


def _from_run(run_dir: Path) -> tuple[CausalLM, Any]:
    """A run's final/ export; else its newest checkpoint of any strategy, consolidated in memory."""
    if (final := final_export(run_dir)) is not None:
        return load_source(str(final))
    from llmtrain import checkpoint as ckpt
    from llmtrain.models.base import get_model_spec
    from llmtrain.restore import checkpoint_state, plain_model
    from llmtrain.rundir import read_config

    cfg = read_config(run_dir, "source")
    if get_model_spec(cfg.model.family).task != "lm":
        raise ConfigError("source", f"{run_dir} trains a {cfg.model.family} model, not a language model")
    ck = ckpt.resolve_resume("auto", run_dir, aside=False)
    if ck is None:
        raise ConfigError("source", f"{run_dir} has neither final/ nor a complete checkpoint yet")
    spec, data, state = checkpoint_state(cfg, ck)  # a frozen or LoRA run's checkpoint made whole
    lm = spec.causal_lm(plain_model(spec, cfg.model, data.info, state))  # LoRA merged, as in final/
    if lm is None:
        raise ConfigError("source", f"{run_dir}'s {cfg.model.family} model cannot generate text")
    return lm.eval(), data.info.tokenizer

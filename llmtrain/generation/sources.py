"""Where a model to generate from comes from: a run dir, an exported model dir of any family, a Hugging Face
GPT-2 dir, a hub name.

Every source gives a causal LM (models/protocol.py) and its tokenizer: a model dir through its family's loader
(restore.load_export), a run's checkpoint through restore.checkpoint_state; then `ModelSpec.causal_lm`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmtrain.errors import ConfigError
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
    """(causal LM in eval mode, its tokenizer) for `source`: a run dir, an exported model dir of any family (its
    tokenizer beside it), a Hugging Face GPT-2 dir or a hub name; one-line ConfigError("source") otherwise."""
    from llmtrain.restore import load_export

    path = Path(source).expanduser()
    if is_run(path):
        return _from_run(path)
    from llmtrain.hub import hf_model_dir

    path = hf_model_dir(source, "source")
    spec, model = load_export(path, "source")
    return _causal_lm(spec, model, source), _tokenizer(path, source)


def _causal_lm(spec: Any, model: Any, source: Any) -> CausalLM:
    lm = spec.causal_lm(model)
    if lm is None:
        raise ConfigError("source", f"{source} holds a {spec.name} model, which does not generate text")
    return lm.eval()


def _tokenizer(path: Path, source: Any) -> Any:
    from llmtrain.data.tokenizers import Tokenizer

    if not any((path / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise ConfigError("source", f"{source} holds no tokenizer (tokenizer.json or vocab.json + merges.txt)")
    return Tokenizer.from_dir(path)


def _from_run(run_dir: Path) -> tuple[CausalLM, Any]:
    """A run's final/ export; else its newest checkpoint of any strategy, consolidated in memory."""
    from llmtrain.models.base import get_model_spec
    from llmtrain.restore import load_export
    from llmtrain.rundir import read_config

    cfg = read_config(run_dir, "source")
    if get_model_spec(cfg.model.family).task != "lm":
        raise ConfigError("source", f"{run_dir} trains a {cfg.model.family} model, not a language model")
    if (final := final_export(run_dir)) is not None:
        spec, model = load_export(final, "source", cfg.model)
        return _causal_lm(spec, model, run_dir), _tokenizer(final, final)
    from llmtrain import checkpoint as ckpt
    from llmtrain.restore import checkpoint_state, plain_model

    ck = ckpt.resolve_resume("auto", run_dir, aside=False)
    if ck is None:
        raise ConfigError("source", f"{run_dir} has neither final/ nor a complete checkpoint yet")
    spec, data, state = checkpoint_state(cfg, ck)  # a frozen or LoRA run's checkpoint made whole
    return _causal_lm(spec, plain_model(spec, cfg.model, data.info, state), run_dir), data.info.tokenizer

"""Where a model to generate from comes from: a run dir, an exported / Hugging Face GPT-2 dir, a hub name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmtrain.errors import ConfigError
from llmtrain.models.gpt2_native import GPT2, from_hf_state, load_hf
from llmtrain.rundir import CONFIG_FILE


def is_run(path: Path) -> bool:
    """A training run's dir (its config.yaml), not a model dir (config.json)."""
    return (path / CONFIG_FILE).is_file() and not (path / "config.json").is_file()


def final_export(run_dir: Path) -> Path | None:
    """The run's final/ export; None before the run has written one."""
    final = run_dir / "final"
    return final if (final / "config.json").is_file() else None


def load_source(source: str) -> tuple[GPT2, Any]:
    """(native GPT-2 in eval mode, its tokenizer) for `source`; one-line ConfigError("source") otherwise."""
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


def _from_run(run_dir: Path) -> tuple[GPT2, Any]:
    """A run's final/ export; else its newest checkpoint of any strategy, consolidated in memory."""
    if (final := final_export(run_dir)) is not None:
        return load_source(str(final))
    from llmtrain import checkpoint as ckpt
    from llmtrain.export import checkpoint_state, plain_model
    from llmtrain.rundir import read_config

    cfg = read_config(run_dir, "source")
    if cfg.model.family != "gpt2":
        raise ConfigError("source", f"{run_dir} trains a {cfg.model.family} model, not a language model")
    ck = ckpt.resolve_resume("auto", run_dir, aside=False)
    if ck is None:
        raise ConfigError("source", f"{run_dir} has neither final/ nor a complete checkpoint yet")
    spec, data, state = checkpoint_state(cfg, ck)  # a frozen or LoRA run's checkpoint made whole
    model = plain_model(spec, cfg.model, data.info, state)  # LoRA merged, as in final/
    if not isinstance(model, GPT2):  # model.impl=hf: transformers' layout, converted
        from llmtrain.models.gpt2_native import dims_from_hf_config

        d = dims_from_hf_config(model.config.to_dict())
        state = model.state_dict()
        model = GPT2(d)
        model.load_state_dict(from_hf_state(state, d))
    return model.eval(), data.info.tokenizer

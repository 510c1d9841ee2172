"""Every preset composes into the typed schema; typos, wrong types and bad values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import compose
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from llmtrain.config import checked, conf_dir
from llmtrain.errors import ConfigError

GROUPS = ["model", "data", "optim", "scheduler", "strategy", "trainer", "logger", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_typed(experiment: str) -> None:
    cfg = compose([f"experiment={experiment}"])
    assert cfg.name == experiment
    obj = OmegaConf.to_object(cfg)  # instantiates every dataclass: types and required keys hold
    assert obj.trainer.max_steps > 0
    if experiment.startswith("gpt2_"):
        checked(cfg)  # presets pass the semantic checks as shipped


@pytest.mark.parametrize("group", [g for g in GROUPS if g not in ("experiment", "model", "data")])
def test_every_group_option_composes(group: str) -> None:
    for option in _options(group):
        cfg = compose([f"{group}={option}"])
        OmegaConf.to_object(cfg)


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_option_composes(model: str) -> None:
    from llmtrain.models.base import MODELS

    task = MODELS.get(compose([f"model={model}"]).model.family).task
    data = {"lm": "text", "regression": "regression"}.get(task, "images")
    cfg = compose([f"model={model}", f"data={data}"])
    OmegaConf.to_object(cfg)
    if model == "hf":  # any transformers causal LM: which one is the user's to say
        with pytest.raises(ConfigError) as ei:
            checked(cfg)
        assert ei.value.key == "model.pretrained"
        return
    checked(cfg)


def test_presets_set_gpt2_sizes() -> None:
    sizes = {m: compose([f"model={m}"]).model for m in ("gpt2_small", "gpt2_medium", "gpt2_large", "gpt2_xl")}
    assert [(s.n_layer, s.n_head, s.n_embd) for s in sizes.values()] == [
        (12, 12, 768), (24, 16, 1024), (36, 20, 1280), (48, 25, 1600)]


@pytest.mark.parametrize("override,exc", [
    ("model.n_layr=3", ConfigCompositionException),  # typo in a key
    ("trainer.max_step=3", ConfigCompositionException),
    ("model.n_layer=abc", ConfigCompositionException),  # wrong type
    ("trainer.precision=fp8", ConfigCompositionException),  # not an allowed value
    ("optim=lion", ConfigCompositionException),  # unknown group option
])
def test_typos_and_wrong_types_fail_at_compose(override: str, exc: type) -> None:
    with pytest.raises((exc, ConfigKeyError, ValidationError)):
        compose([override])


@pytest.mark.parametrize("override,key", [
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1e-3", "optim.lr"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
    ("trainer.grad_accum_steps=0", "trainer.grad_accum_steps"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("data.seq_len=1024", "data.seq_len"),  # > gpt2_tiny's 256 positions
    ("model.family=transformerxl", "model.family"),
    ("scheduler.min_lr_ratio=2", "scheduler.min_lr_ratio"),
    ("strategy.zero_stage=4", "strategy.zero_stage"),
    ("data=regression", "model"),  # GPT-2 on regression data
    ("trainer.dropout_rng=device", "trainer.dropout_rng"),
])
def test_semantic_errors_name_the_key(override: str, key: str) -> None:
    cfg = compose([override])
    with pytest.raises(ConfigError) as ei:
        checked(cfg)
    assert ei.value.key == key
    assert "\n" not in str(ei.value)


def test_conf_dir_is_the_repo_conf() -> None:
    assert conf_dir() == Path(__file__).resolve().parents[2] / "conf"


def test_global_dropout_masks_need_a_model_that_draws_them() -> None:
    checked(compose(["trainer.dropout_rng=global"]))  # native GPT-2 draws llmtrain's masks
    with pytest.raises(ConfigError) as ei:
        checked(compose(["trainer.dropout_rng=global", "model.impl=hf"]))
    assert ei.value.key == "trainer.dropout_rng" and "model.impl=native" in ei.value.message

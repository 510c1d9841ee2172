"""Root config: the typed schema of every group, registered in Hydra's ConfigStore, plus checks.

Each component's dataclass lives next to its code; this module only assembles and validates. The schemas, tasks
and presets of the model families and data kinds come from their registries (llmtrain.registry).
Typos and wrong types fail in Hydra's compose; semantic checks raise ConfigError (exit 2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from llmtrain import preference
from llmtrain.data.base import DATA
from llmtrain.distributed.base import StrategyConfig, sequence_parallel
from llmtrain.errors import ConfigError, require, unknown_key
from llmtrain.models import adapters, quantize
from llmtrain.models.base import MODELS
from llmtrain.optim import OptimConfig, SchedulerConfig
from llmtrain.registry import discover, store_once
from llmtrain.tracking import LoggerConfig
from llmtrain.trainer import TrainerConfig


@dataclass
class Config:
    """The whole run. `model` and `data` are typed by the schema their group option names."""

    name: str = "run"  # names the default run dir: runs/<name>
    model: Any = MISSING
    data: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


REGISTRIES = (MODELS, DATA)  # the groups whose options a family or kind brings, typed by its registered schema


def register_configs() -> None:
    """The root schema, every registered family's and kind's schema and the presets of plugins into Hydra's
    ConfigStore (a plugin that cannot be loaded: one line on stderr, exit 2)."""
    store_once(None, "base_config", Config, __name__)
    try:
        discover(*REGISTRIES)
        for registry in REGISTRIES:
            registry.store(conf_dir())
    except ConfigError as err:
        from llmtrain.cli import report_and_exit

        report_and_exit(err)
    from omegaconf import OmegaConf

    from llmtrain.rundir import trial_name

    OmegaConf.register_new_resolver("llmtrain_trial", trial_name, replace=True)  # hydra.sweep.subdir


def conf_dir() -> Path:
    """The conf/ tree: inside the installed package, else at the repository root."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise FileNotFoundError("llmtrain's conf/ directory is missing from the installation")


def unknown_keys(node: Any, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Keys a typed node does not declare (e.g. added with Hydra's `+key=value`), with their siblings.

    Hydra refuses a misspelt key unless it is prefixed with `+`, which opens the node; the schema still
    knows which fields exist.
    """
    from omegaconf import DictConfig, OmegaConf

    out: list[tuple[str, list[str]]] = []
    typ = OmegaConf.get_type(node)
    allowed = {f.name for f in dataclasses.fields(typ)} if dataclasses.is_dataclass(typ) else None
    for key in node.keys():
        path = f"{prefix}{key}"
        if allowed is not None and key not in allowed:
            out.append((path, sorted(allowed)))
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            out += unknown_keys(child, path + ".")
    return out


def check_known_keys(cfg: Any) -> None:
    """One line naming the first key no schema declares, with the closest real key."""
    for path, siblings in unknown_keys(cfg):
        raise unknown_key(path, siblings)


def checked(cfg: Any) -> Config:
    """A composed run config, checked (no undeclared key, every semantic check) and typed: `Config` holding
    each group's dataclass (model and data: their registered schema's), what every component takes."""
    check_known_keys(cfg)
    conf = typed(cfg)
    validate(conf)
    return conf


def typed(cfg: Any) -> Config:
    """A run config (composed by Hydra, or read from a run dir's config.yaml) as `Config` of dataclasses.
    A config.yaml's model and data sections are typed by the schemas their family and kind name; a key no
    schema declares, or a value of the wrong type, is one line."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is Config:
        return OmegaConf.to_object(cfg)  # composed: every node is typed already
    sections = {}
    for registry in REGISTRIES:
        name = OmegaConf.select(cfg, registry.key)
        sections[registry.group] = OmegaConf.structured(registry.get(str(name)).config)
    conf = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), sections, cfg))
    MODELS.get(conf.model.family).target.check_config(conf.model)  # what a model must be to be built at all
    return conf


def validate(cfg: Config) -> None:
    """Cross-field and semantic checks of a typed config (checked() runs them); each component checks its own
    keys first."""
    t = cfg.trainer
    require(t.max_steps > 0, "trainer.max_steps", f"must be > 0 (got {t.max_steps})")
    require(t.micro_batch_size > 0, "trainer.micro_batch_size", f"must be > 0 (got {t.micro_batch_size})")
    require(t.grad_accum_steps > 0, "trainer.grad_accum_steps", f"must be > 0 (got {t.grad_accum_steps})")
    require(t.grad_clip >= 0, "trainer.grad_clip", f"must be >= 0, 0 disables clipping (got {t.grad_clip})")
    for key in ("eval_every", "ckpt_every", "eval_batches", "sample_tokens", "sample_every", "keep_checkpoints",
                "sample_top_k", "max_bad_steps"):
        require(getattr(t, key) >= 0, f"trainer.{key}", f"must be >= 0 (got {getattr(t, key)})")
    require(0 <= t.seed < 2**32, "trainer.seed", f"must be in [0, 2**32) (got {t.seed})")
    require(t.sample_temperature >= 0, "trainer.sample_temperature",
            f"must be >= 0, 0 for greedy (got {t.sample_temperature})")
    require(t.preempt_grace_s > 0, "trainer.preempt_grace_s", f"must be > 0 seconds (got {t.preempt_grace_s})")
    require(t.device in ("auto", "cpu", "cuda"), "trainer.device", f"must be auto, cpu or cuda (got {t.device!r})")
    require(t.dropout_rng in ("rank", "global"), "trainer.dropout_rng",
            f"must be rank or global (got {t.dropout_rng!r})")
    if t.device == "cuda":
        import torch

        require(torch.cuda.is_available(), "trainer.device", "cuda requested but no GPU is visible; use "
                                                              "trainer.device=cpu or auto")
    o = cfg.optim
    require(o.lr > 0, "optim.lr", f"must be > 0 (got {o.lr})")
    require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0 (got {o.weight_decay})")
    require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
            f"must be two numbers in [0, 1) (got {list(o.betas)})")
    require(o.eps > 0, "optim.eps", f"must be > 0 (got {o.eps})")
    require(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1) (got {o.momentum})")
    require(0 < o.alpha < 1, "optim.alpha", f"must be in (0, 1) (got {o.alpha})")
    s = cfg.scheduler
    require(s.warmup_steps >= 0, "scheduler.warmup_steps", f"must be >= 0 (got {s.warmup_steps})")
    require(0 <= s.min_lr_ratio <= 1, "scheduler.min_lr_ratio", f"must be in [0, 1] (got {s.min_lr_ratio})")
    lg = cfg.logger
    require(lg.log_every > 0, "logger.log_every", f"must be > 0 (got {lg.log_every})")
    require(lg.peak_tflops is None or lg.peak_tflops > 0, "logger.peak_tflops",
            f"must be > 0 TFLOP/s, or null for the table (got {lg.peak_tflops})")
    st = cfg.strategy
    require(st.zero_stage in (0, 1, 2, 3), "strategy.zero_stage", f"must be 0, 1, 2 or 3 (got {st.zero_stage})")
    require(st.timeout_s > 0, "strategy.timeout_s", f"must be > 0 seconds (got {st.timeout_s})")
    require(st.bucket_cap_mb > 0, "strategy.bucket_cap_mb", f"must be > 0 (got {st.bucket_cap_mb})")
    if st.deepspeed_config:
        require(Path(st.deepspeed_config).is_file(), "strategy.deepspeed_config",
                f"file not found: {st.deepspeed_config}")
    preference.check(cfg)  # trainer.objective against the model, data and strategy
    _check_model_data(cfg)
    quantize.check(cfg.model, st.name.value, st.tp)
    adapters.check(cfg.model, st.name.value)
    _check_tp(cfg)
    _check_bench(cfg)
    require(st.dp_replicate >= 1, "strategy.dp_replicate", f"must be >= 1 (got {st.dp_replicate})")
    require(st.dp_replicate == 1 or st.name.value == "fsdp", "strategy.dp_replicate",
            f"HSDP (replicate across groups, shard within) runs under strategy=fsdp, not {st.name.value}; set "
            "strategy=fsdp or strategy.dp_replicate=1")
    require(t.early_stop_patience >= 0, "trainer.early_stop_patience",
            f"must be >= 0, 0 disables early stopping (got {t.early_stop_patience})")
    if (t.keep_best or t.early_stop_patience) and t.eval_every == 0:
        key = "trainer.keep_best" if t.keep_best else "trainer.early_stop_patience"
        raise ConfigError(key, "needs evaluations during the run; set trainer.eval_every > 0")


def _check_model_data(cfg: Any) -> None:
    """The model family and data kind must be registered and share a task."""
    model, data = MODELS.get(cfg.model.family), DATA.get(cfg.data.kind)
    spec = model.target
    spec.check_config(cfg.model)
    adapters.resolve_targets(cfg.model, spec.lora_targets(cfg.model))
    if model.task != data.task:
        fits = [f"data={o}" for e in DATA.entries() if e.task == model.task
                and (e.name == "preference") == (cfg.trainer.objective == "dpo") for o in e.options]
        raise ConfigError("model", f"model family {model.name!r} trains on {model.task} data, but data.kind "
                                   f"{data.name!r} is {data.task} data; pick {' or '.join(fits) or 'another model='} "
                                   "or an experiment=")
    require(cfg.trainer.dropout_rng != "global" or spec.global_dropout(cfg.model), "trainer.dropout_rng",
            f"global needs a model whose dropout draws llmtrain's masks (models/dropout.py); this {model.name} model "
            "draws from its own dropout modules: use trainer.dropout_rng=rank" +
            (" or model.impl=native" if getattr(cfg.model, "impl", None) == "hf" else ""))
    ctx, seq_len = spec.context_length(cfg.model), getattr(cfg.data, "seq_len", None)
    if ctx is not None and seq_len is not None:
        require(cfg.data.seq_len <= ctx, "data.seq_len",
                f"{cfg.data.seq_len} exceeds the model context of {ctx}; set data.seq_len<={ctx} "
                f"or model.n_positions>={cfg.data.seq_len}")


def _check_bench(cfg: Config) -> None:
    """trainer.bench_*: local multiple-choice files, scored by a language model."""
    t = cfg.trainer
    for key in ("bench_every", "bench_limit"):
        require(getattr(t, key) >= 0, f"trainer.{key}", f"must be >= 0 (got {getattr(t, key)})")
    if t.bench_every == 0:
        return
    require(bool(t.bench_tasks), "trainer.bench_tasks", "is empty while trainer.bench_every > 0; give "
                                                        "[items.jsonl, ...] or set trainer.bench_every=0")
    require(MODELS.get(cfg.model.family).target.task == "lm", "trainer.bench_tasks",
            f"scores language models, not model={cfg.model.family}")
    for task in t.bench_tasks:
        if task.endswith(".jsonl"):
            require(Path(task).expanduser().is_file(), "trainer.bench_tasks", f"{task}: no such file")
            continue
        import importlib.util

        require(importlib.util.find_spec("lm_eval") is not None, "trainer.bench_tasks",
                f"{task!r} is an lm-eval task and lm-eval is not installed; pip install 'llmtrain[eval]' (or give a "
                "local .jsonl of multiple-choice items)")


def _check_tp(cfg: Config) -> None:
    """strategy.tp: a model family with a tensor-parallel plan, under fsdp or ddp (dp × tp) or single (tp alone); what
    this first slice of tensor parallelism does not cover is refused in one line. The world size is checked
    at launch (distributed.tp.check_world)."""
    st, t, tp = cfg.strategy, cfg.trainer, cfg.strategy.tp
    require(tp >= 1, "strategy.tp", f"must be >= 1 (got {tp})")
    if tp == 1:
        return
    if st.name.value not in ("fsdp", "ddp", "single"):
        raise ConfigError("strategy.tp", f"tensor parallelism runs under strategy=fsdp or ddp (dp × tp) or "
                                         f"strategy=single (tp alone), not {st.name.value}; set strategy.tp=1 or "
                                         "change strategy")
    spec = MODELS.get(cfg.model.family).target
    if spec.tp_plan(cfg.model) is None:
        impl = getattr(cfg.model, "impl", None)
        what = f"model={cfg.model.family}" + (f" (impl={impl})" if impl else "")
        fix = "or model.impl=native" if impl == "hf" else "(model=llama and model=gpt2 have one)"
        raise ConfigError("strategy.tp", f"{what} has no tensor-parallel plan; set strategy.tp=1 {fix}")
    spec.check_tp(cfg.model, tp)
    if adapters.lora_settings(cfg.model) is not None:
        raise ConfigError("strategy.tp", "LoRA adapters are not split over tensor-parallel ranks; set strategy.tp=1")
    require(not getattr(cfg.model, "dropout", 0.0) or t.dropout_rng == "global", "strategy.tp",
            "the ranks of a tensor-parallel group must drop the same activations: with model.dropout > 0 set "
            "trainer.dropout_rng=global")
    root = spec.tp_root_plan(cfg.model)
    if st.sequence_parallel and not root:
        raise ConfigError("strategy.sequence_parallel", f"model={cfg.model.family} splits only its blocks over "
                                                        "tensor-parallel ranks, not the sequence; unset it")
    if sequence_parallel(st, root):
        seq = int(getattr(cfg.data, "seq_len", 0) or 0)
        require(seq % tp == 0, "strategy.sequence_parallel", f"data.seq_len={seq} does not split over "
                                                             f"strategy.tp={tp} ranks; use a multiple of {tp} or "
                                                             "strategy.sequence_parallel=false")
        require(not getattr(cfg.model, "dropout", 0.0), "strategy.sequence_parallel",
                "model.dropout > 0 with the sequence split over the ranks is not supported; set "
                "strategy.sequence_parallel=false (or model.dropout=0)")

"""`llmtrain-train` / `python -m llmtrain.train`: compose → validate → build → fit → export."""

from __future__ import annotations

import gc
import os
import random
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from llmtrain import checkpoint as ckpt
from llmtrain.config import conf_dir, register_configs, validate
from llmtrain.data.base import build_data
from llmtrain.distributed import SetupArgs, Strategy, build_strategy
from llmtrain.distributed.env import (
    destroy_process_group,
    init_process_group,
    pick_device,
    read_env,
    strip_local_rank_arg,
)
from llmtrain.errors import ConfigError, user_errors_exit
from llmtrain.export import export_final, sample_text
from llmtrain.models.base import get_model_spec
from llmtrain.optim import Scheduler, build_optimizer
from llmtrain.precision import Precision, check_supported
from llmtrain.tracking import MetricsLogger
from llmtrain.trainer import Trainer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@user_errors_exit
def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train one run into run_dir; returns the last metrics. Every rank calls this."""
    validate(cfg)
    env = read_env()
    device = pick_device(cfg.trainer.device, env)
    precision = Precision(cfg.trainer.precision)
    if (why := check_supported(precision, device)) is not None:
        raise ConfigError("trainer.precision", why)
    init_process_group(env, device, cfg.strategy.backend, cfg.strategy.timeout_s)
    strategy = None
    try:
        strategy = build_strategy(cfg.strategy, env, device)
        return _fit(cfg, run_dir, strategy, device, precision)
    finally:
        if strategy is not None:
            strategy.close()
        gc.collect()  # backend objects go now, with the process group alive, not in destructors at exit
        destroy_process_group()


def _fit(cfg: DictConfig, run_dir: Path, strategy: Strategy, device: torch.device, precision: Precision) -> dict:
    run_dir = Path(strategy.broadcast_object(str(run_dir)))  # rank 0's run dir for all ranks
    resume_from = ckpt.resolve_resume(cfg.trainer.resume, run_dir)
    if cfg.trainer.resume == "never" and ckpt.list_checkpoints(run_dir):
        raise ConfigError("trainer.resume", f"never, but {run_dir} already holds checkpoints; use "
                                            "trainer.resume=auto to continue it or hydra.run.dir=<new dir>")
    spec = get_model_spec(cfg.model.family)
    data = build_data(cfg.data, model_cfg=cfg.model, is_main=strategy.is_main, barrier=strategy.barrier)
    seed_everything(cfg.trainer.seed)
    model = spec.build(cfg.model, data.info)
    t = cfg.trainer
    strategy.setup(model, lambda m: build_optimizer(cfg.optim, m),
                   SetupArgs(precision=precision, gradient_checkpointing=t.gradient_checkpointing, compile=t.compile,
                             block_classes=spec.block_classes(model), micro_batch_size=t.micro_batch_size,
                             grad_accum_steps=t.grad_accum_steps, grad_clip=t.grad_clip))
    scheduler = Scheduler(cfg.scheduler, strategy.optimizer, cfg.optim.lr, t.max_steps)
    if strategy.is_main and resume_from is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    logger = MetricsLogger(cfg.logger, run_dir, enabled=strategy.is_main, total_steps=t.max_steps,
                           run_config=OmegaConf.to_container(cfg, resolve=True))
    trainer = Trainer(t, spec, strategy, data, scheduler, logger, run_dir, cfg.logger.log_every,
                      fingerprint=ckpt.resume_fingerprint(cfg))
    if resume_from is not None:
        trainer.resume(resume_from)
    _announce(strategy, trainer, cfg, resume_from)
    last = trainer.fit()
    final = export_final(spec, strategy, cfg.model, data.info, run_dir)
    if strategy.is_main and final is not None and data.info.task == "lm" and t.sample_tokens > 0:
        text = sample_text(spec, cfg.model, data.info, final, t, device)
        (run_dir / "samples.txt").write_text(text + "\n")
        print(f"\n--- sample ({t.sample_tokens} tokens) ---\n{text}\n---", flush=True)
    return last


def _announce(strategy: Any, trainer: Trainer, cfg: DictConfig, resume_from: Any) -> None:
    if not strategy.is_main:
        return
    t = cfg.trainer
    n_params = strategy.num_parameters()
    gb = t.micro_batch_size * t.grad_accum_steps * strategy.world_size
    where = f"resuming from {resume_from} at step {trainer.step}" if resume_from else "starting fresh"
    print(f"llmtrain: {cfg.model.family} ({n_params / 1e6:.2f}M params) · strategy {cfg.strategy.name.value} × "
          f"{strategy.world_size} on {strategy.device} · global batch {gb} "
          f"({t.micro_batch_size}×{t.grad_accum_steps}×{strategy.world_size}) · {where} · run dir {trainer.run_dir}",
          flush=True)


register_configs()


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    sys.argv = strip_local_rank_arg(sys.argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed (also imported by transformers) on CPU
    _hydra_main()


if __name__ == "__main__":
    main()

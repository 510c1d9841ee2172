"""`llmtrain-train` / `python -m llmtrain.train`: compose → validate → build → fit → export."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from llmtrain import checkpoint as ckpt
from llmtrain import faults, rundir
from llmtrain.cli import run_app
from llmtrain.config import conf_dir, register_configs, validate
from llmtrain.data.base import build_data
from llmtrain.distributed import SetupArgs, Strategy, build_strategy, comm_stats
from llmtrain.distributed.env import (
    destroy_process_group,
    init_process_group,
    pick_device,
    read_env,
    strip_local_rank_arg,
    watch_launcher,
)
from llmtrain.errors import ConfigError, Stopped, user_errors_exit
from llmtrain.export import check_target, export_final, read_export_step
from llmtrain.generation.training import TrainingSampler, truncate_samples
from llmtrain.models import adapters
from llmtrain.models.base import DataInfo, ModelSpec, format_count, get_model_spec
from llmtrain.optim import Scheduler, build_optimizer
from llmtrain.precision import Precision, check_supported, resolve, slow_precision_warning
from llmtrain.runlock import RunLock
from llmtrain.tracking import MetricsLogger
from llmtrain.tracking.flops import peak_flops
from llmtrain.tracking.sinks import check_wandb, sweep_group
from llmtrain.trainer import Trainer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@user_errors_exit
def run(cfg: DictConfig, run_dir: Path, *, pick_dir: bool = False, overrides: list[str] | None = None,
        group: str | None = None) -> dict[str, Any]:
    """Train one run into run_dir; returns the last metrics (train and eval). Every rank calls this.

    pick_dir: run_dir is a default, not the user's choice; when it holds a run of another configuration
    the run goes to a free sibling instead (rundir.pick). overrides: the command line's, for run.json;
    group: the sweep a trial belongs to (wandb's group)."""
    faults.reset()  # LLMTRAIN_FAULT is read afresh by every run (tests run several in one process)
    validate(cfg)
    check_wandb(cfg.logger)
    env = read_env()
    device = pick_device(cfg.trainer.device, env)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.trainer.tf32)
    precision = resolve(cfg.trainer.precision, device)
    if (why := check_supported(precision, device)) is not None:
        raise ConfigError("trainer.precision", why)
    if env.is_main and (warning := slow_precision_warning(precision, device)):
        print(warning, file=sys.stderr, flush=True)
    if comm_stats.enabled():
        comm_stats.install()  # before any backend binds the collectives
    init_process_group(env, device, cfg.strategy.backend, cfg.strategy.timeout_s)
    strategy = None
    try:
        strategy = build_strategy(cfg.strategy, env, device)
        return _fit(cfg, run_dir, strategy, device, precision, pick_dir, overrides or [], group)
    finally:
        if strategy is not None:
            strategy.close()
        gc.collect()  # backend objects go now, with the process group alive, not in destructors at exit
        destroy_process_group()


def _fit(cfg: DictConfig, run_dir: Path, strategy: Strategy, device: torch.device, precision: Precision,
         pick_dir: bool, overrides: list[str], group: str | None) -> dict[str, Any]:
    """Pick and lock the run dir (rank 0), find the checkpoint to resume, then train."""
    fingerprint = rundir.fingerprint(cfg)
    lock = RunLock(run_dir)

    def claim() -> tuple[str, Path | None]:  # rank 0: the run dir, locked, and the checkpoint to resume
        nonlocal lock
        where, note = rundir.pick(run_dir, fingerprint) if pick_dir else (run_dir, None)
        if note:
            print(note, file=sys.stderr, flush=True)
        lock = RunLock(where)
        if (took := lock.acquire()) is not None:
            print(took, file=sys.stderr, flush=True)
        try:
            if cfg.trainer.resume == "never" and ckpt.list_checkpoints(where):
                raise ConfigError("trainer.resume", f"never, but {where} already holds checkpoints; use "
                                                    "trainer.resume=auto to continue it or hydra.run.dir=<new dir>")
            for sub in ("final", "best"):  # the run's exports replace these: they must hold nothing else
                check_target(where / sub, "run dir")
            found = ckpt.resolve_resume(cfg.trainer.resume, where)
            if found is not None:
                ckpt.check_world_size(found, strategy)
                if batch := rundir.check_resumable(found, ckpt.saved_fingerprint(found), fingerprint):
                    print(batch, file=sys.stderr, flush=True)
        except BaseException:
            lock.release()
            raise
        return str(where), found

    where, resume_from = strategy.on_main(claim)  # the ranks follow rank 0's dir and checkpoint
    try:
        return _fit_locked(cfg, Path(where), resume_from, strategy, device, precision, fingerprint, overrides, group)
    finally:
        lock.release()


def _fit_locked(cfg: DictConfig, run_dir: Path, resume_from: Path | None, strategy: Strategy, device: torch.device,
                precision: Precision, fingerprint: dict[str, Any], overrides: list[str],
                group: str | None) -> dict[str, Any]:
    t = cfg.trainer
    if resume_from is not None:
        if _is_complete(run_dir, resume_from, t.max_steps):
            if strategy.is_main:
                done = int(ckpt.read_manifest(resume_from)["step"])
                how = " (stopped early)" if done < t.max_steps else ""
                print(f"llmtrain: {run_dir} is complete (step {done} of {t.max_steps}{how}, final model in "
                      f"{run_dir / 'final'}); nothing to do. Raise trainer.max_steps to train on, or give a new "
                      "name=... (or hydra.run.dir=...) for a new run", flush=True)
                if rundir.read_run_record(run_dir).get("status") != "complete":  # killed after its export
                    rundir.write_run_record(run_dir, status="complete")
            return rundir.last_metrics(run_dir)
    spec = get_model_spec(cfg.model.family)
    data = build_data(cfg.data, model_cfg=cfg.model, is_main=strategy.is_main, barrier=strategy.barrier)
    seed_everything(t.seed)
    model = adapters.apply(spec.build(cfg.model, data.info), cfg.model)  # freezing, LoRA
    partly_frozen = any(not p.requires_grad for p in model.parameters())
    fused_ok = not (cfg.strategy.name.value == "fsdp" and precision == Precision.fp16)
    strategy.setup(model, lambda m: build_optimizer(cfg.optim, m, fused_default=fused_ok),
                   SetupArgs(precision=precision, gradient_checkpointing=t.gradient_checkpointing, compile=t.compile,
                             block_classes=spec.block_classes(model), micro_batch_size=t.micro_batch_size,
                             grad_accum_steps=t.grad_accum_steps, grad_clip=t.grad_clip,
                             trainable_only=partly_frozen))
    scheduler = Scheduler(cfg.scheduler, strategy.optimizer, cfg.optim.lr, t.max_steps)
    from omegaconf import OmegaConf

    logger = MetricsLogger(cfg.logger, run_dir, enabled=strategy.is_main, total_steps=t.max_steps,
                           run_config=OmegaConf.to_container(cfg, resolve=True), group=group)
    sampler = TrainingSampler(t, spec, cfg.model, data.info, strategy, run_dir, logger.write)
    seq_len = getattr(cfg.data, "seq_len", None)
    trainer = Trainer(t, spec, strategy, data, scheduler, logger, run_dir, cfg.logger.log_every,
                      fingerprint=fingerprint, sampler=sampler if sampler.enabled else None,
                      flops_per_token=spec.flops_per_token(model, seq_len) if seq_len else None,
                      peak_flops=peak_flops(device, precision.value, cfg.logger.peak_tflops),
                      on_best=lambda step, loss: _export_best(spec, strategy, cfg, data.info, run_dir, step, loss))
    if resume_from is not None:
        trainer.resume(resume_from)  # before anything is written: a refused checkpoint leaves the run as it was
    if strategy.is_main:
        truncate_samples(run_dir, trainer.step)  # samples of steps no checkpoint holds (a fresh start: all)
    started = time.time()
    if strategy.is_main:
        if resume_from is None:
            rundir.write_config(run_dir, cfg)
        rundir.write_run_record(run_dir, status="running", overrides=overrides, started=started)
    _announce(strategy, trainer, cfg, precision, resume_from)
    try:
        last = trainer.fit()
        _finish(spec, strategy, cfg, data.info, run_dir, trainer.step, sampler)
    except BaseException as e:
        if strategy.is_main:
            status = e.status if isinstance(e, Stopped) else f"failed: {type(e).__name__}: {str(e)[:200]}"
            _record_end(run_dir, started, status)
            with contextlib.suppress(Exception):  # a stopped or failed run has its loss plot too
                _plot(run_dir, cfg)
        raise
    if strategy.is_main:
        _record_end(run_dir, started, "complete")
    return last or rundir.last_metrics(run_dir)


def _export_best(spec: ModelSpec, strategy: Strategy, cfg: DictConfig, info: DataInfo, run_dir: Path, step: int,
                 loss: float) -> None:
    """keep_best: the weights of a new lowest eval loss go to best/ (every rank calls this)."""
    best = export_final(spec, strategy, cfg.model, info, run_dir, step, out=run_dir / "best",
                        record={"eval_loss": loss})
    if best is not None:
        print(f"llmtrain: step {step}: new best eval_loss {loss:.4f}, exported to {best}", flush=True)


def _record_end(run_dir: Path, started: float, status: str) -> None:
    """run.json's status and wall time (added over every invocation of a resumed run)."""
    wall = rundir.read_run_record(run_dir).get("wall_s", 0.0) + time.time() - started
    rundir.write_run_record(run_dir, status=status, finished=time.time(), wall_s=round(wall, 2))


def _is_complete(run_dir: Path, resume_from: Path, max_steps: int) -> bool:
    """The run trained to max_steps and exported that step: a rerun has nothing to do."""
    manifest = ckpt.read_manifest(resume_from)
    step = int(manifest["step"])
    done = step >= max_steps or bool(manifest.get("early_stopped"))
    return done and read_export_step(run_dir / "final") == step


def _finish(spec: ModelSpec, strategy: Strategy, cfg: DictConfig, info: DataInfo, run_dir: Path, step: int,
            sampler: TrainingSampler) -> None:
    """Export final/, then the end-of-run sample and the model's own report (every rank takes part)."""
    main = strategy.is_main
    if main:
        print(f"llmtrain: exporting {run_dir / 'final'} ...", flush=True)
    t0 = time.perf_counter()
    final = export_final(spec, strategy, cfg.model, info, run_dir, step)
    if main:
        print(f"llmtrain: exported step {step} to {final} ({time.perf_counter() - t0:.1f}s)", flush=True)
    if sampler.enabled:
        if main:
            print(f"llmtrain: sampling {cfg.trainer.sample_tokens} tokens ...", flush=True)
        out = sampler(step)
        if main:
            (run_dir / "samples.txt").write_text("\n\n".join(c.text for c in out) + "\n")
    if main and final is not None:
        for line in spec.report(cfg.model, info, final):
            print(line, flush=True)
    if main:
        _plot(run_dir, cfg)


def _plot(run_dir: Path, cfg: DictConfig) -> None:
    """<run>/plots/loss.png from metrics.jsonl (logger.plots)."""
    if cfg.logger.plots:
        from llmtrain.tracking.plots import loss_plot

        if (png := loss_plot(run_dir)) is not None:
            print(f"llmtrain: plotted {png}", flush=True)


def _announce(strategy: Strategy, trainer: Trainer, cfg: DictConfig, precision: Precision, resume_from: Any) -> None:
    if not strategy.is_main:
        return
    t = cfg.trainer
    gb = t.micro_batch_size * t.grad_accum_steps * strategy.world_size
    where = f"resuming from {resume_from} at step {trainer.step}" if resume_from else "starting fresh"
    n, trainable = strategy.num_parameters(), sum(p.numel() for p in strategy.unwrap().parameters() if p.requires_grad)
    params = f"{format_count(n)} params" + (f", {format_count(trainable)} trainable" if trainable < n else "")
    print(f"llmtrain: {cfg.model.family} ({params}) · strategy "
          f"{cfg.strategy.name.value} × {strategy.world_size} on {strategy.device} · {precision.value} · global batch "
          f"{gb} ({t.micro_batch_size}×{t.grad_accum_steps}×{strategy.world_size}) · {where} · run dir "
          f"{trainer.run_dir}", flush=True)


def _explicit_dir() -> bool:
    """Whether the command line names the run dir (hydra.run.dir=..., name=...) or Hydra sweeps."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    keys = {o.split("=", 1)[0].lstrip("+~") for o in [*hc.overrides.hydra, *hc.overrides.task]}
    return hc.mode != RunMode.RUN or bool(keys & {"hydra.run.dir", "name"})


register_configs()


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
@user_errors_exit
def _hydra_main(cfg: DictConfig) -> float | None:
    """The task function; returns the objective a Hydra sweeper minimises: the final eval loss (else the
    last train loss)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    group = sweep_group(hc)
    try:
        last = run(cfg, run_dir, pick_dir=not _explicit_dir() and cfg.trainer.resume == "auto",
                   overrides=list(hc.overrides.task), group=group)
    finally:
        rundir.remove_if_empty(run_dir)  # Hydra creates it before a run can refuse its config
    return objective(last)


def objective(metrics: dict[str, Any]) -> float | None:
    value = metrics.get("eval_loss", metrics.get("loss"))
    return float(value) if value is not None else None


def main() -> None:
    sys.argv = strip_local_rank_arg(sys.argv)
    watch_launcher()  # a worker whose launcher died exits instead of training on, orphaned
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed (also imported by transformers) on CPU
    run_app(_hydra_main)


if __name__ == "__main__":
    main()

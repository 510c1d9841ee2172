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
from llmtrain import faults, preference, rundir
from llmtrain.cli import run_app, user_errors_exit
from llmtrain.config import Config, checked, conf_dir, register_configs, validate
from llmtrain.context import RunContext
from llmtrain.data.base import build_data
from llmtrain.distributed import Dist, SetupArgs, Strategy, StrategyName, build_strategy, comm_stats
from llmtrain.distributed.base import sequence_parallel
from llmtrain.distributed.env import (
    destroy_process_group,
    init_process_group,
    pick_device,
    read_env,
    strip_local_rank_arg,
    watch_launcher,
)
from llmtrain.errors import ConfigError, Stopped
from llmtrain.export import check_target, export_final, read_export_step
from llmtrain.generation.training import TrainingSampler, truncate_samples
from llmtrain.models import adapters, quantize
from llmtrain.models.base import ModelSpec, format_count, get_model_spec
from llmtrain.optim import Scheduler, build_optimizer
from llmtrain.precision import Precision, auto_reason, check_supported, resolve, slow_precision_warning
from llmtrain.runlock import RunLock
from llmtrain.tracking import MetricsLogger
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
    (and trainer.resume=auto) the run goes to a free sibling instead (rundir.pick). overrides: the command
    line's, for run.json; group: the sweep a trial belongs to (wandb's group)."""
    faults.reset()  # LLMTRAIN_FAULT is read afresh by every run (tests run several in one process)
    conf = checked(cfg)
    check_wandb(conf.logger)
    dist = read_env()
    device = pick_device(conf.trainer.device, dist)
    if conf.strategy.name == StrategyName.auto:
        conf = _auto_layout(conf, dist, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = conf.trainer.tf32
    precision = resolve(conf.trainer.precision, device, training=True)
    quantize.check_device(conf.model, device)
    if (why := check_supported(precision, device)) is not None:
        raise ConfigError("trainer.precision", why)
    if dist.is_main and conf.trainer.precision == Precision.auto:
        print(f"llmtrain: {auto_reason(device)}", flush=True)
    if dist.is_main and (warning := slow_precision_warning(precision, device)):
        print(warning, file=sys.stderr, flush=True)
    if comm_stats.enabled():
        comm_stats.install()  # before any backend binds the collectives
    init_process_group(dist, device, conf.strategy.backend, conf.strategy.timeout_s)
    strategy = None
    try:
        strategy = build_strategy(conf.strategy, dist, device)
        fingerprint = rundir.fingerprint(conf, dist.world_size)
        held: list[RunLock] = []  # rank 0's lock on the run dir, for the whole run

        def claim() -> tuple[str, Path | None]:
            where, found, lock = _claim(conf, run_dir, pick_dir and conf.trainer.resume == "auto", fingerprint,
                                        strategy, dist)
            held.append(lock)
            return where, found

        where, resume_from = dist.on_main(claim)  # the ranks follow rank 0's dir and checkpoint
        try:
            return _fit(conf, Path(where), resume_from, strategy, dist, device, precision, fingerprint,
                        overrides or [], group)
        finally:
            for lock in held:
                lock.release()
    finally:
        if strategy is not None:
            strategy.close()
        gc.collect()  # backend objects go now, with the process group alive, not in destructors at exit
        destroy_process_group()


def _claim(conf: Config, requested: Path, pick_dir: bool, fingerprint: dict[str, Any], strategy: Strategy,
           dist: Dist) -> tuple[str, Path | None, RunLock]:
    """Rank 0: the run dir (a free sibling when `pick_dir`), its lock (taken), and the checkpoint to resume."""
    where, note = rundir.pick(requested, fingerprint) if pick_dir else (requested, None)
    if note:
        print(note, file=sys.stderr, flush=True)
    lock = RunLock(where)
    if (took := lock.acquire()) is not None:
        print(took, file=sys.stderr, flush=True)
    try:
        resume = conf.trainer.resume
        if resume == "never" and ckpt.list_checkpoints(where):
            raise ConfigError("trainer.resume", f"never, but {where} already holds checkpoints; use "
                                                "trainer.resume=auto to continue it or hydra.run.dir=<new dir>")
        for sub in ("final", "best"):  # the run's exports replace these: they must hold nothing else
            check_target(where / sub, "run dir")
        found = ckpt.resolve_resume(resume, where)
        if found is not None:
            ckpt.check_compatible(found, strategy, dist)
            if batch := rundir.check_resumable(found, ckpt.saved_fingerprint(found), fingerprint):
                print(batch, file=sys.stderr, flush=True)
    except BaseException:
        lock.release()
        raise
    return str(where), found, lock


def _fit(conf: Config, run_dir: Path, resume_from: Path | None, strategy: Strategy, dist: Dist,
         device: torch.device, precision: Precision, fingerprint: dict[str, Any], overrides: list[str],
         group: str | None) -> dict[str, Any]:
    """Build the model, data and loop in the claimed run dir, then train, export and sample."""
    t = conf.trainer
    if resume_from is not None and _is_complete(run_dir, resume_from, t.max_steps):
        if dist.is_main:
            _say_complete(run_dir, resume_from, t.max_steps)
        return rundir.last_metrics(run_dir)
    spec = get_model_spec(conf.model.family)
    data = build_data(conf.data, dist=dist, model_tokenizer=spec.tokenizer_source(conf.model))
    ctx = RunContext(conf, run_dir, dist, device, precision, spec, data, fingerprint)
    seed_everything(t.seed)
    model = spec.build(conf.model, data.info)
    model = adapters.apply(quantize.apply(model, conf.model, spec, precision.dtype), conf.model)  # 4 bits, LoRA
    reference = preference.reference_copy(t, model)  # dpo: the starting weights, before the strategy wraps them
    fused_ok = not (conf.strategy.name == StrategyName.fsdp and precision == Precision.fp16)
    strategy.setup(model, lambda m: build_optimizer(conf.optim, m, fused_default=fused_ok),
                   SetupArgs(precision=precision, gradient_checkpointing=t.gradient_checkpointing, compile=t.compile,
                             block_classes=spec.block_classes(model), micro_batch_size=t.micro_batch_size,
                             grad_accum_steps=t.grad_accum_steps, grad_clip=t.grad_clip,
                             trainable_only=any(not p.requires_grad for p in model.parameters()),
                             **_tp_args(conf, spec)))
    scheduler = Scheduler(conf.scheduler, strategy.optimizer, conf.optim.lr, t.max_steps)
    logger = MetricsLogger(conf.logger, run_dir, enabled=dist.is_main, total_steps=t.max_steps,
                           run_config=rundir.plain_config(conf), group=group)
    sampler = TrainingSampler(ctx, strategy, logger.write)
    trainer = Trainer(ctx, strategy, scheduler, logger, sampler=sampler if sampler.enabled else None,
                      on_best=lambda step, loss: _export_best(ctx, strategy, step, loss), reference=reference)
    if resume_from is not None:
        trainer.resume(resume_from)  # before anything is written: a refused checkpoint leaves the run as it was
    started = time.time()
    if dist.is_main:
        truncate_samples(run_dir, trainer.step)  # samples of steps no checkpoint holds (a fresh start: all)
        if resume_from is None:
            rundir.write_config(run_dir, conf)
        rundir.write_run_record(run_dir, status="running", overrides=overrides, started=started,
                                world_size=dist.world_size)
        _announce(ctx, strategy, trainer.step, resume_from)
    try:
        last = trainer.fit()
        _finish(ctx, strategy, trainer.step, sampler)
    except BaseException as e:
        if dist.is_main:
            status = e.status if isinstance(e, Stopped) else f"failed: {type(e).__name__}: {str(e)[:200]}"
            _record_end(run_dir, started, status)
            with contextlib.suppress(Exception):  # a stopped or failed run has its loss plot too
                _plot(ctx)
        raise
    if dist.is_main:
        _record_end(run_dir, started, "complete")
    return last or rundir.last_metrics(run_dir)


def _say_complete(run_dir: Path, resume_from: Path, max_steps: int) -> None:
    done = int(ckpt.read_manifest(resume_from)["step"])
    how = " (stopped early)" if done < max_steps else ""
    print(f"llmtrain: {run_dir} is complete (step {done} of {max_steps}{how}, final model in "
          f"{run_dir / 'final'}); nothing to do. Raise trainer.max_steps to train on, or give a new "
          "name=... (or hydra.run.dir=...) for a new run", flush=True)
    if rundir.read_run_record(run_dir).get("status") != "complete":  # killed after its export
        rundir.write_run_record(run_dir, status="complete")


def _export_best(ctx: RunContext, strategy: Strategy, step: int, loss: float) -> None:
    """keep_best: the weights of a new lowest eval loss go to best/ (every rank calls this)."""
    best = export_final(ctx, strategy, step, out=ctx.run_dir / "best", record={"eval_loss": loss})
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


def _finish(ctx: RunContext, strategy: Strategy, step: int, sampler: TrainingSampler) -> None:
    """Export final/, then the end-of-run sample and the model's own report (every rank takes part)."""
    main, run_dir = ctx.dist.is_main, ctx.run_dir
    if main:
        print(f"llmtrain: exporting {run_dir / 'final'} ...", flush=True)
    t0 = time.perf_counter()
    final = export_final(ctx, strategy, step)
    if main:
        print(f"llmtrain: exported step {step} to {final} ({time.perf_counter() - t0:.1f}s)", flush=True)
    if sampler.enabled:
        if main:
            print(f"llmtrain: sampling {ctx.cfg.trainer.sample_tokens} tokens ...", flush=True)
        out = sampler(step)
        if main:
            (run_dir / "samples.txt").write_text("\n\n".join(c.text for c in out) + "\n")
    if main and final is not None:
        for line in ctx.spec.report(ctx.cfg.model, ctx.data.info, final):
            print(line, flush=True)
    if main:
        _plot(ctx)


def _plot(ctx: RunContext) -> None:
    """<run>/plots/loss.png from metrics.jsonl (logger.plots)."""
    if ctx.cfg.logger.plots:
        from llmtrain.tracking.plots import loss_plot

        if (png := loss_plot(ctx.run_dir)) is not None:
            print(f"llmtrain: plotted {png}", flush=True)


def _auto_layout(conf: Config, dist: Dist, device: torch.device) -> Config:
    """strategy=auto resolved to a layout (distributed/auto.py), said on rank 0, checked as if it had been asked."""
    from llmtrain.distributed import auto

    conf, line = auto.resolve(conf, dist.world_size, device)
    if dist.is_main:
        print(f"llmtrain: {line}", flush=True)
    validate(conf)
    return conf


def _tp_args(conf: Config, spec: ModelSpec) -> dict[str, Any]:
    """SetupArgs' tensor-parallel fields: the model's plans and whether the sequence is split too."""
    if conf.strategy.tp <= 1:
        return {}
    root = spec.tp_root_plan(conf.model)
    return {"tp_plan": spec.tp_plan(conf.model), "tp_root_plan": root,
            "sequence_parallel": sequence_parallel(conf.strategy, root)}


def _announce(ctx: RunContext, strategy: Strategy, step: int, resume_from: Path | None) -> None:
    t, world, st = ctx.cfg.trainer, ctx.dist.world_size, ctx.cfg.strategy
    replicas = strategy.data_shard()[1]  # the ranks of a tensor-parallel group share their batches
    gb = t.micro_batch_size * t.grad_accum_steps * replicas
    mesh = ""
    if st.tp > 1 or st.dp_replicate > 1:
        dp = f"{st.dp_replicate} × {replicas // st.dp_replicate}" if st.dp_replicate > 1 else str(replicas)
        mesh = f" (dp {dp}" + (f" × tp {st.tp}" if st.tp > 1 else "") + ")"
    where = f"resuming from {resume_from} at step {step}" if resume_from else "starting fresh"
    n, trainable = strategy.num_parameters(), sum(p.numel() for p in strategy.unwrap().parameters() if p.requires_grad)
    params = f"{format_count(n)} params" + (f", {format_count(trainable)} trainable" if trainable < n else "")
    print(f"llmtrain: {ctx.cfg.model.family} ({params}) · strategy {st.name.value} × {world}{mesh} on "
          f"{ctx.device} · {ctx.precision.value} · global batch {gb} ({t.micro_batch_size}×{t.grad_accum_steps}×"
          f"{replicas}) · {where} · run dir {ctx.run_dir}", flush=True)


def _explicit_dir() -> bool:
    """Whether the command line names the run dir (hydra.run.dir=..., name=...) or Hydra sweeps."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    keys = {o.split("=", 1)[0].lstrip("+~") for o in [*hc.overrides.hydra, *hc.overrides.task]}
    return hc.mode != RunMode.RUN or bool(keys & {"hydra.run.dir", "name"})


def register_train_app() -> None:
    """The run's schemas, and hydra/launcher=torchrun (its config and class: Hydra's plugin scan does not see
    the modules of an editable install)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.llmtrain_launcher.torchrun_launcher import TorchrunLauncher

    register_configs()
    Plugins.instance().register(TorchrunLauncher)


register_train_app()


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """The task function; returns the objective a Hydra sweeper minimises (rundir.objective)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        last = run(cfg, run_dir, pick_dir=not _explicit_dir(), overrides=list(hc.overrides.task),
                   group=sweep_group(hc))
    finally:
        rundir.remove_if_empty(run_dir)  # Hydra creates it before a run can refuse its config
    return rundir.objective(last)


def main() -> None:
    sys.argv = strip_local_rank_arg(sys.argv)
    watch_launcher()  # a worker whose launcher died exits instead of training on, orphaned
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed (also imported by transformers) on CPU
    register_train_app()  # again: the plugins this process's environment names (a forked one's may differ)
    run_app(_hydra_main)


if __name__ == "__main__":
    main()

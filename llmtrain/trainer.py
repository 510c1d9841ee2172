"""The training loop. It knows the ModelSpec and Strategy interfaces and nothing concrete."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmtrain import checkpoint as ckpt
from llmtrain.data.base import DataModule, Loader
from llmtrain.distributed.base import Strategy
from llmtrain.errors import Stopped
from llmtrain.interrupt import StopRequest, hold_signals
from llmtrain.models.base import Batch, ModelSpec
from llmtrain.optim import Scheduler
from llmtrain.precision import Precision
from llmtrain.tracking import MetricsLogger
from llmtrain.tracking.flops import mfu

EXIT_SIGINT = 130


@dataclass
class TrainerConfig:
    """`trainer.*`: the loop's contract keys."""

    max_steps: int = 300
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    precision: Precision = Precision.fp32  # auto: bf16 (or fp16) on GPU, fp32 on CPU
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    gradient_checkpointing: bool = False
    compile: bool = False
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8  # micro-batches per rank per evaluation
    ckpt_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    seed: int = 1337
    resume: str = "auto"  # auto | never | <checkpoint or run dir>
    device: str = "auto"  # auto | cpu | cuda
    sample_tokens: int = 200  # tokens per sample (LMs); 0 disables sampling
    sample_every: int = 0  # steps between samples during training (samples.jsonl); 0: only at the end
    sample_prompt: str = ""  # prompt of the samples ("" starts from the end-of-text token)
    sample_prompts: list[str] = field(default_factory=list)  # several prompts (wins over sample_prompt)
    sample_temperature: float = 0.8  # 0: greedy
    sample_top_k: int = 50
    keep_best: bool = False  # export the weights of the lowest eval loss to best/ whenever it improves
    early_stop_patience: int = 0  # stop after this many evaluations without a lower eval loss; 0: never


class Trainer:
    """Runs optimizer steps with accumulation, logs, evaluates and checkpoints."""

    def __init__(self, cfg: TrainerConfig, spec: ModelSpec, strategy: Strategy, data: DataModule,
                 scheduler: Scheduler, logger: MetricsLogger, run_dir: Path, log_every: int,
                 fingerprint: dict[str, Any] | None = None, stop: StopRequest | None = None,
                 sampler: Callable[[int], Any] | None = None, flops_per_token: float | None = None,
                 peak_flops: float | None = None, on_best: Callable[[int, float], Any] | None = None) -> None:
        self.cfg, self.spec, self.strategy, self.data = cfg, spec, strategy, data
        self.sampler = sampler  # samples from the current weights (a collective); see generation.training
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops  # MFU when both are known
        self.scheduler, self.logger, self.run_dir, self.log_every = scheduler, logger, run_dir, log_every
        self.fingerprint = fingerprint  # config a checkpoint is valid for (stored in every checkpoint)
        self.stop = stop or StopRequest(announce=strategy.is_main)
        self.on_best = on_best  # keep_best: called (every rank) with (step, eval_loss) when eval loss improves
        self.best: dict[str, Any] = {"loss": math.inf, "step": None, "since": 0}  # since: evals without a new best
        self.early_stopped = False
        self.step = 0
        self.saved_step = -1  # step of the newest checkpoint this process wrote or resumed from
        self.train_loader = self._loader("train", shuffle=True)
        self._loader("val", shuffle=False)  # fail at start, not at the first eval, if val is too small
        self.lm = data.info.task == "lm"

    def _loader(self, split: str, shuffle: bool) -> Loader:
        s = self.strategy
        batch = self.cfg.micro_batch_size
        if split == "val":  # a small eval set (a few fine-tuning examples) is evaluated in smaller batches
            batch = max(1, min(batch, len(self.data.split("val")) // s.world_size))
        return self.data.loader(split, batch, seed=self.cfg.seed, shuffle=shuffle,
                                rank=s.rank, world_size=s.world_size, device=s.device)

    # public ----------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train from the current step to max_steps; returns the last train and eval metrics.

        A stop signal (Ctrl-C) ends the run after the current step with a checkpoint: raises Stopped."""
        last: dict[str, Any] = {}
        self.strategy.model.train()  # pretrained loaders hand models over in eval mode
        self.logger.open(self.step)
        try:
            with self.stop.installed():
                while self.step < self.cfg.max_steps and not self.early_stopped:
                    last = self._one_step()
                    if self.strategy.any_rank(self.stop.requested):  # every rank stops after the same step
                        self._stop_here()
                if self.early_stopped and self.saved_step != self.step:
                    self.save()  # the rerun finds the run complete
        except KeyboardInterrupt:  # a second Ctrl-C: the step in flight is abandoned
            hold_signals(self.stop.signals)
            raise Stopped(f"aborted during step {self.step + 1}; {self._resume_hint()}", EXIT_SIGINT) from None
        except Stopped:
            hold_signals(self.stop.signals)  # the run is ending: one more Ctrl-C changes nothing
            raise
        finally:
            self.logger.close()
        return last

    def _stop_here(self) -> None:
        if self.saved_step != self.step:
            self.save()
        raise Stopped(f"stopped at step {self.step} of {self.cfg.max_steps}; {self._resume_hint()}", EXIT_SIGINT)

    def _resume_hint(self) -> str:
        ckpts = ckpt.list_checkpoints(self.run_dir)
        if not ckpts:
            return "no checkpoint was written yet, so a rerun starts from step 0"
        return f"checkpoint {ckpts[-1]}; rerun the same command to resume from it"

    def _one_step(self) -> dict[str, Any]:
        """train_step, then log / eval / checkpoint as due."""
        t0 = time.perf_counter()
        last = self.train_step()
        last.update(self._throughput(last, time.perf_counter() - t0))
        self.step += 1
        self.logger.advance()
        if self.step % self.log_every == 0 or self.step == self.cfg.max_steps:
            self.logger.log(last)
        if self._due(self.cfg.eval_every):
            rec = self.evaluate()
            last.update(rec)
            self._track_best(rec["eval_loss"])
        if self._due(self.cfg.ckpt_every):
            self.save()
        every = self.cfg.sample_every
        if self.sampler is not None and every > 0 and self.step % every == 0 and self.step < self.cfg.max_steps:
            self.sampler(self.step)  # the end-of-run sample is the run's last act, after export
        return last

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum_steps micro-batches, normalised by the global count."""
        s, k = self.strategy, self.cfg.grad_accum_steps
        t0 = time.perf_counter()
        batches = [next(self.train_loader) for _ in range(k)]
        data_wait = time.perf_counter() - t0
        counts = torch.tensor([sum(self.spec.count(b) for b in batches), sum(_rows(b) for b in batches)],
                              dtype=torch.float64, device=s.device)
        s.all_reduce(counts)  # global targets, global samples
        scale = s.world_size / counts[0].item()  # backends average gradients over ranks
        loss_sum = torch.zeros((), dtype=torch.float64, device=s.device)
        for i, batch in enumerate(batches):
            with s.micro_step(sync_grads=(i == k - 1)):
                with s.autocast():
                    part, _ = self.spec.loss(s.model, batch)
                s.backward(part.float() * scale)
            loss_sum += part.detach().double()
        grad_norm = s.clip_grad_norm(self.cfg.grad_clip)
        lr = self.scheduler.lr()
        stepped = s.step()
        self.scheduler.step()
        s.all_reduce(loss_sum)
        norm = float(grad_norm) if grad_norm is not None else s.last_grad_norm()
        out = {"step": self.step + 1, "loss": (loss_sum / counts[0]).item(), "lr": lr, "grad_norm": norm,
               "targets": int(counts[0].item()), "samples": int(counts[1].item()), "data_wait_s": data_wait}
        if s.loss_scale() is not None:
            out.update(loss_scale=s.loss_scale(), skipped=not stepped)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean loss over the first eval_batches micro-batches of every rank's val shard."""
        s = self.strategy
        s.model.eval()
        loader = self._loader("val", shuffle=False)
        n = max(1, min(self.cfg.eval_batches, loader.sampler.batches_per_epoch))
        self.logger.status(f"step {self.step}: evaluating ({n} batches per rank)")
        sums: dict[str, torch.Tensor] = {}
        for _ in range(n):
            batch = next(loader)
            with s.autocast():
                part = self.spec.eval_batch(s.model, batch)  # {"loss": sum, "count": n, ...}
            for key, v in part.items():
                sums[key] = sums.get(key, 0) + v.detach().double()
        s.model.train()
        keys = sorted(sums)
        tot = s.all_reduce(torch.stack([sums[key] for key in keys]))
        sums = dict(zip(keys, tot.tolist(), strict=True))
        rec: dict[str, Any] = {"step": self.step, "eval_loss": sums["loss"] / sums["count"]}
        if self.lm:
            rec["perplexity"] = math.exp(min(rec["eval_loss"], 700.0))
        if "correct" in sums:
            rec["accuracy"] = sums["correct"] / sums["count"]
        self.logger.log(rec)
        extra = "".join(f", {k} {rec[k]:.4g}" for k in ("perplexity", "accuracy") if k in rec)
        self.logger.write(f"step {self.step}: eval_loss {rec['eval_loss']:.4f}{extra}")
        return rec

    def _track_best(self, loss: float) -> None:
        """keep_best and early stopping: every rank sees the same (all-reduced) eval loss."""
        c, b = self.cfg, self.best
        if not (c.keep_best or c.early_stop_patience):
            return
        if loss < b["loss"]:
            b.update(loss=loss, step=self.step, since=0)
            if c.keep_best and self.on_best is not None:
                self.on_best(self.step, loss)
            return
        b["since"] += 1
        if c.early_stop_patience and b["since"] >= c.early_stop_patience and self.step < c.max_steps:
            self.early_stopped = True
            self.logger.write(f"step {self.step}: early stop: eval_loss has not improved on {b['loss']:.4f} "
                              f"(step {b['step']}) for {b['since']} evaluations")

    # checkpoints ---------------------------------------------------------------------------------------
    def save(self) -> Path:
        self.logger.status(f"step {self.step}: saving checkpoint")
        state = {"step": self.step, "loader": self.train_loader.state_dict(), "config": self.fingerprint,
                 "scheduler": self.scheduler.state_dict(), "best": dict(self.best),
                 "early_stopped": self.early_stopped}
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.strategy, state, self.cfg.keep_checkpoints)
        self.saved_step = self.step
        return path

    def resume(self, path: Path) -> None:
        """Restore everything a checkpoint holds (its config was checked against this run's beforehand)."""
        state = ckpt.load_checkpoint(path, self.strategy)
        self.step = self.saved_step = int(state["step"])
        self.train_loader.load_state_dict(state["loader"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best = dict(state.get("best", self.best))
        self.early_stopped = bool(state.get("early_stopped", False))

    # helpers ---------------------------------------------------------------------------------------------
    def _due(self, every: int) -> bool:
        return self.step == self.cfg.max_steps or (every > 0 and self.step % every == 0)

    def _throughput(self, m: dict[str, Any], dt: float) -> dict[str, float]:
        """Rates of the optimizer step alone (evaluation and checkpoints excluded), over all ranks."""
        out = {"samples_per_s": m["samples"] / dt, "step_time_s": dt}
        if self.lm:
            out["tokens_per_s"] = m["targets"] / dt
            if self.flops_per_token and self.peak_flops:
                out["mfu"] = mfu(self.flops_per_token, out["tokens_per_s"], self.peak_flops, self.strategy.world_size)
        if self.strategy.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.strategy.device) / 2**30
        return out


def _rows(batch: Batch) -> int:
    return int(next(iter(batch.values())).shape[0])

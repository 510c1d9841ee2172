"""The training loop. It knows the ModelSpec and Strategy interfaces and nothing concrete."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmtrain import checkpoint as ckpt
from llmtrain import faults, preference
from llmtrain.context import RunContext
from llmtrain.data.base import Loader
from llmtrain.distributed import comm_stats
from llmtrain.distributed.base import Strategy
from llmtrain.errors import EXIT_INTERRUPTED, RunFailed, Stopped
from llmtrain.interrupt import StopRequest, hold_signals
from llmtrain.models import dropout
from llmtrain.models.base import Batch
from llmtrain.optim import Scheduler
from llmtrain.precision import Precision
from llmtrain.tracking import MetricsLogger
from llmtrain.tracking.flops import mfu, peak_flops


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
    tf32: bool = True  # CUDA: fp32 matmuls and convolutions on TF32 tensor cores (bf16/fp16 runs are unaffected)
    max_bad_steps: int = 5  # a non-finite loss or grad norm skips the update; this many in a row stop the run
    # dropout masks: rank (each process's generator; exact resume on the same world size) | global (from each
    # sample's row in the global micro-batch: every strategy and world size draws the same; models/dropout.py)
    dropout_rng: str = "rank"
    preempt_grace_s: float = 120.0  # SIGTERM/SIGUSR1: finish the step and checkpoint within this, else exit 143
    objective: str = "lm"  # lm: the model's own loss | dpo: preference pairs (data=preference; llmtrain/preference.py)
    dpo_beta: float = 0.1  # dpo: β, how far the policy may move from the reference
    dpo_label_smoothing: float = 0.0  # dpo: ε, the share of pairs assumed mislabelled (conservative DPO)
    # dpo: model (the reference runs beside the policy every step: LoRA's adapters off, or a frozen copy) |
    # precomputed (its log-probs of every pair computed once at start, sharded over the ranks; no reference kept)
    dpo_reference: str = "model"
    bench_every: int = 0  # steps between benchmark scores of the weights being trained; 0: none
    bench_tasks: list[str] = field(default_factory=list)  # multiple-choice .jsonl files, lm-eval task names or YAMLs
    bench_limit: int = 0  # items scored per task (0: all)


class Trainer:
    """Runs optimizer steps with accumulation, logs, evaluates and checkpoints."""

    read_every_step_on_cpu = True  # False: a GPU's cadence (reads on log steps only), e.g. to test for syncs

    def __init__(self, ctx: RunContext, strategy: Strategy, scheduler: Scheduler, logger: MetricsLogger, *,
                 sampler: Callable[[int], Any] | None = None, on_best: Callable[[int, float], Any] | None = None,
                 stop: StopRequest | None = None, reference: torch.nn.Module | None = None) -> None:
        """`reference`: DPO's frozen copy of the starting model, unplaced (preference.reference_copy)."""
        self.ctx, self.cfg, self.spec, self.data = ctx, ctx.cfg.trainer, ctx.spec, ctx.data
        self.strategy, self.dist, self.run_dir = strategy, ctx.dist, ctx.run_dir
        self.scheduler, self.logger, self.log_every = scheduler, logger, ctx.cfg.logger.log_every
        self.sampler = sampler  # samples from the current weights (a collective); see generation.training
        seq_len = getattr(ctx.cfg.data, "seq_len", None)
        self.flops_per_token = ctx.spec.flops_per_token(strategy.unwrap(), seq_len) if seq_len else None
        self.peak_flops = peak_flops(ctx.device, ctx.precision.value, ctx.cfg.logger.peak_tflops)  # MFU: both known
        self.stop = stop or StopRequest(announce=self.dist.is_main, grace_s=self.cfg.preempt_grace_s)
        self.on_best = on_best  # keep_best: called (every rank) with (step, eval_loss) when eval loss improves
        self.best: dict[str, Any] = {"loss": math.inf, "step": None, "since": 0}  # since: evals without a new best
        self.early_stopped = False
        self.step = 0
        self.saved_step = -1  # step of the newest checkpoint this process wrote or resumed from
        # Per-step values stay on the device and are read on log steps (every step on CPU, where reading is
        # free): no host sync in between.
        self._read_every_step = ctx.device.type == "cpu" and self.read_every_step_on_cpu
        self._count_comm = comm_stats.enabled()
        # non-finite steps on the device: in a row now, the longest run since the last read, in all
        self._bad = {k: torch.zeros((), dtype=torch.int64, device=ctx.device) for k in ("streak", "peak", "total")}
        self._bad_seen = 0  # the total at the last read
        self._diverged: RunFailed | None = None  # max_bad_steps reached: raised once the step is logged
        self._since = {"t": time.perf_counter(), "steps": 0, "excluded_s": 0.0}  # the interval being timed
        # dropout_rng=global: the micro-step's mask key, on the device, rewritten in place (models/dropout.py)
        self._mask_key = torch.zeros((), dtype=torch.int64, device=ctx.device) \
            if self.cfg.dropout_rng == "global" else None
        self.train_loader = self._loader("train", shuffle=True)
        self._loader("val", shuffle=False)  # fail at start, not at the first eval, if val is too small
        self.objective = preference.build(self.cfg, self.spec, strategy, reference)  # how a micro-batch becomes a loss
        self.objective.prepare(strategy, self.data, self.cfg.micro_batch_size, self.logger)  # dpo: precomputed
        self.bench = None  # trainer.bench_tasks scored every bench_every steps (generation/bench.py)
        if self.cfg.bench_every > 0 and self.cfg.bench_tasks:
            from llmtrain.generation.bench import TrainingBench

            self.bench = TrainingBench(ctx, strategy)
        self.lm = self.data.info.task == "lm" and self.cfg.objective == "lm"

    def _loader(self, split: str, shuffle: bool) -> Loader:
        batch = self.cfg.micro_batch_size
        rank, replicas = self.strategy.data_shard()  # tensor-parallel ranks share their batches
        if split == "val":  # a small eval set (a few fine-tuning examples) is evaluated in smaller batches
            batch = max(1, min(batch, len(self.data.split("val")) // replicas))
        return self.data.loader(split, batch, seed=self.cfg.seed, shuffle=shuffle,
                                rank=rank, world_size=replicas, device=self.ctx.device)

    # public ----------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train from the current step to max_steps; returns the last train and eval metrics.

        A stop signal (Ctrl-C) ends the run after the current step with a checkpoint: raises Stopped."""
        last: dict[str, Any] = {}
        self.strategy.model.train()  # pretrained loaders hand models over in eval mode
        self.logger.open(self.step)
        faults.arm()
        try:
            with self.stop.installed():
                while self.step < self.cfg.max_steps and not self.early_stopped:
                    last = self._one_step() or last
                    wanted = self.dist.max(_stop_code(self.stop))  # every rank, after the same step
                    if wanted:
                        self._stop_here(preempted=wanted == _PREEMPT)
                if self.early_stopped and self.saved_step != self.step:
                    self.save()  # the rerun finds the run complete
        except KeyboardInterrupt:  # a second Ctrl-C: the step in flight is abandoned
            hold_signals(self.stop.signals)
            raise Stopped(f"aborted during step {self.step + 1}; {self._resume_hint()}", EXIT_INTERRUPTED) from None
        except Stopped:
            hold_signals(self.stop.signals)  # the run is ending: one more Ctrl-C changes nothing
            raise
        finally:
            self.logger.close()
            if self._count_comm:
                comm_stats.dump(self.run_dir, self.dist.rank, self.strategy.model)
        return last

    def _stop_here(self, preempted: bool) -> None:
        if self.saved_step != self.step:
            self.save()
        why = "preempted" if preempted else "stopped"
        raise Stopped(f"{why} at step {self.step} of {self.cfg.max_steps}; {self._resume_hint()}",
                      0 if preempted else EXIT_INTERRUPTED, status=why, quiet=not self.dist.is_main)

    def _resume_hint(self) -> str:
        ckpts = ckpt.list_checkpoints(self.run_dir)
        if not ckpts:
            return "no checkpoint was written yet, so a rerun starts from step 0"
        return f"checkpoint {ckpts[-1]}; rerun the same command to resume from it"

    def _one_step(self) -> dict[str, Any] | None:
        """train_step, then log / eval / checkpoint as due; returns the record when this step was read."""
        with comm_stats.optimizer_step() if self._count_comm else contextlib.nullcontext():
            pending = self.train_step()
        self.step += 1
        self.logger.advance()
        log_now = self.step % self.log_every == 0 or self.step == self.cfg.max_steps
        rec = self._read(pending) if log_now or self._read_every_step else None
        if log_now and rec is not None:
            self.logger.log(rec)
        if (failed := self._diverged) is not None:
            raise failed
        if self._due(self.cfg.eval_every):
            with self._excluded():
                ev = self.evaluate()
            rec = {**(rec or {}), **ev}
            self._track_best(ev["eval_loss"])
        if self.bench is not None and self.bench.due(self.step):
            with self._excluded():
                scores = self.bench(self.step)
            self.logger.log({"step": self.step, **scores})
            self.logger.write(f"step {self.step}: " + ", ".join(f"{k.removeprefix('bench/')} {v:.3f}"
                                                                for k, v in scores.items()))
            rec = {**(rec or {}), **scores}
        every = self.cfg.sample_every  # before the checkpoint: a resume from it never has to redo these samples
        if self.sampler is not None and every > 0 and self.step % every == 0 and self.step < self.cfg.max_steps:
            with self._excluded():
                self.sampler(self.step)  # the end-of-run sample is the run's last act, after export
        if self._due(self.cfg.ckpt_every):
            with self._excluded():
                self.save()
        return rec

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum_steps micro-batches, normalised by the global count.

        Returns device tensors (loss, grad norm, counts, whether the update was applied) and host timings;
        nothing here waits for the device. A non-finite loss or grad norm skips the update (see _read)."""
        s, d, k, dev = self.strategy, self.dist, self.cfg.grad_accum_steps, self.ctx.device
        t0 = time.perf_counter()
        hosts = [self.train_loader.next_host() for _ in range(k)]
        data_wait = time.perf_counter() - t0
        counts = torch.tensor([sum(self.objective.count(b) for b in hosts), sum(_rows(b) for b in hosts)],
                              dtype=torch.float64)  # targets, samples: counted on the host
        counts = (counts.pin_memory() if dev.type == "cuda" else counts).to(dev, non_blocking=True)
        batches = [self.train_loader.to_device(b) for b in hosts]
        d.all_reduce(counts)  # global targets, global samples (each counted by the `tp` ranks that share them)
        replicas = self.strategy.data_shard()[1]
        copies = d.world_size // replicas
        if copies > 1:
            counts /= copies
        scale = (replicas / counts[0]).float()  # backends average gradients over the data-parallel ranks
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for i, batch in enumerate(batches):
            with s.micro_step(sync_grads=(i == k - 1)), self._masks(i):
                with s.autocast():
                    part, _ = self.objective.loss(s.model, batch)
                part = faults.poison("loss", part)
                s.backward(part.float() * scale)
            loss_sum += part.detach().double()
        faults.point("step")
        grad_norm = s.clip_grad_norm(self.cfg.grad_clip)
        d.all_reduce(loss_sum)
        extra = self.objective.reduce(d)  # the objective's own sums (dpo: rewards), all-reduced
        if copies > 1:
            loss_sum /= copies
        finite = torch.isfinite(loss_sum)
        if grad_norm is not None and not s.loss_scaling:  # fp16: the scaler skips overflowed gradients itself
            finite = finite & torch.isfinite(grad_norm)
        lr = self.scheduler.lr()
        stepped = s.step(finite)
        self.scheduler.step()
        if not s.loss_scaling:  # a backend that measures the norm in its step skips non-finite gradients there
            finite = finite & torch.as_tensor(stepped, device=dev)
        bad, b = (~finite).long(), self._bad
        b["streak"] = (b["streak"] + 1) * bad
        b["peak"] = torch.maximum(b["peak"], b["streak"])
        b["total"] = b["total"] + bad
        return {"loss_sum": loss_sum, "counts": counts, "grad_norm": grad_norm, "finite": finite,
                "stepped": stepped, "lr": lr, "data_wait_s": data_wait, "extra": extra}

    def _masks(self, micro: int) -> contextlib.AbstractContextManager:
        """dropout_rng=global: micro-step `micro`'s masks, this rank's rows placed in the global micro-batch."""
        if self._mask_key is None:
            return contextlib.nullcontext()
        self._mask_key.fill_(dropout.step_key(self.cfg.seed, self.step, micro))
        return dropout.masks(self._mask_key, row0=self.strategy.data_shard()[0] * self.cfg.micro_batch_size)

    def _read(self, p: dict[str, Any]) -> dict[str, Any]:
        """The step's record (a host sync), the interval's rates, and the non-finite guard."""
        s = self.strategy
        targets, samples = (int(v) for v in p["counts"].tolist())
        norm = p["grad_norm"]
        norm = float(norm) if norm is not None else s.last_grad_norm()
        rec: dict[str, Any] = {"step": self.step, "loss": float(p["loss_sum"]) / targets, "lr": p["lr"],
                               "grad_norm": norm, "targets": targets, "samples": samples,
                               "data_wait_s": p["data_wait_s"], **self.objective.record(p["extra"], targets)}
        if s.loss_scale() is not None:
            rec.update(loss_scale=s.loss_scale(), skipped=not bool(p["stepped"]))
        self._guard(rec)
        if self._bad_seen:
            rec["bad_steps"] = self._bad_seen
        rec.update(self._throughput(rec))
        return rec

    def _guard(self, rec: dict[str, Any]) -> None:
        """Non-finite steps were skipped (no weight changed); max_bad_steps of them in a row stop the run
        (`_diverged`, raised by _one_step after logging the step)."""
        b = self._bad
        streak, peak, total = (int(v) for v in torch.stack([b["streak"], b["peak"], b["total"]]).tolist())
        b["peak"] = b["streak"].clone()
        new, self._bad_seen = total - self._bad_seen, total
        if not new:
            return
        what = "loss" if not math.isfinite(rec["loss"]) else "loss or gradient norm"
        limit = self.cfg.max_bad_steps
        self.logger.write(f"llmtrain: warning: step {self.step}: the {what} was not finite; {new} update(s) skipped "
                          f"({streak} in a row now, {total} in all; trainer.max_bad_steps={limit} in a row stop the run)")
        if limit > 0 and peak >= limit:
            ckpts = ckpt.list_checkpoints(self.run_dir)
            keep = f"the newest checkpoint, {ckpts[-1]}, is good" if ckpts else "no checkpoint was written"
            self._diverged = RunFailed(f"step {self.step}: the {what} was not finite for {peak} steps in a row "
                                       f"(trainer.max_bad_steps={limit}); stopping ({keep}: skipped steps change "
                                       "no weight). Lower optim.lr or check the data", quiet=not self.dist.is_main)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean loss over the first eval_batches micro-batches of every rank's val shard."""
        s = self.strategy
        s.model.eval()
        loader = self._loader("val", shuffle=False)
        n = max(1, min(self.cfg.eval_batches, loader.sampler.batches_per_epoch))
        self.logger.status(f"step {self.step}: evaluating ({n} batches per rank)")
        sums: dict[str, torch.Tensor] = {}
        for i in range(n):
            batch = next(loader)
            with s.autocast():
                part = self.objective.eval_batch(s.model, batch)  # {"loss": sum, "count": n, ...}
            for key, v in part.items():
                sums[key] = sums.get(key, 0) + v.detach().double()
            if i == 0:
                faults.point("eval")
        s.model.train()
        keys = sorted(sums)
        tot = self.dist.all_reduce(torch.stack([sums[key] for key in keys]))
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
        state = {"step": self.step, "loader": self.train_loader.state_dict(), "config": self.ctx.fingerprint,
                 "scheduler": self.scheduler.state_dict(), "best": dict(self.best),
                 "early_stopped": self.early_stopped}
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.strategy, self.dist, state, self.cfg.keep_checkpoints)
        self.saved_step = self.step
        return path

    def resume(self, path: Path) -> None:
        """Restore everything a checkpoint holds (its config was checked against this run's beforehand)."""
        state = ckpt.load_checkpoint(path, self.strategy, self.dist)
        self.step = self.saved_step = int(state["step"])
        self.train_loader.load_state_dict(state["loader"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best = dict(state.get("best", self.best))
        self.early_stopped = bool(state.get("early_stopped", False))

    # helpers ---------------------------------------------------------------------------------------------
    def _due(self, every: int) -> bool:
        return self.step == self.cfg.max_steps or (every > 0 and self.step % every == 0)

    @contextlib.contextmanager
    def _excluded(self) -> Iterator[None]:
        """Time that the rates leave out (evaluation, checkpoints, samples)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._since["excluded_s"] += time.perf_counter() - t0

    def _throughput(self, m: dict[str, Any]) -> dict[str, float]:
        """Rates over the steps since the last read, over all ranks, evaluation and checkpoints excluded. The
        read waited for the device, so the wall time is the device's: steps ran ahead of the host in between."""
        now, since = time.perf_counter(), self._since
        steps = self.step - since["steps"]
        dt = max(1e-9, now - since["t"] - since["excluded_s"]) / max(1, steps)  # one step
        self._since = {"t": now, "steps": self.step, "excluded_s": 0.0}
        out = {"samples_per_s": m["samples"] / dt, "step_time_s": dt}
        if self.lm:
            out["tokens_per_s"] = m["targets"] / dt
            if self.flops_per_token and self.peak_flops:
                out["mfu"] = mfu(self.flops_per_token, out["tokens_per_s"], self.peak_flops, self.dist.world_size)
        if self.ctx.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        return out


_PREEMPT = 2  # stop codes agreed over ranks: 0 none, 1 Ctrl-C, 2 preemption (it wins: exit 0 after the save)


def _stop_code(stop: StopRequest) -> int:
    return 0 if not stop.requested else _PREEMPT if stop.preempted else 1


def _rows(batch: Batch) -> int:
    return int(next(iter(batch.values())).shape[0])

"""Run tracking: metrics.jsonl (always), a progress bar, and optional TensorBoard / wandb sinks."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class LoggerConfig:
    """`logger.*`: where metrics go (rank 0 only)."""

    log_every: int = 10  # steps between metrics records
    progress: bool = True  # tqdm progress bar on stderr
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "llmtrain"


def truncate_after(path: Path, step: int) -> None:
    """Drop records of steps after `step` (those of a run that died after its last checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


class MetricsLogger:
    """Appends one JSON object per record to metrics.jsonl; drives the progress bar; rank 0 only."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, *, enabled: bool, total_steps: int,
                 run_config: dict[str, Any] | None = None) -> None:
        self.cfg, self.enabled, self.run_dir = cfg, enabled, run_dir
        self.total_steps, self.run_config = total_steps, run_config
        self.path = run_dir / "metrics.jsonl"
        self._bar = None
        self._sinks: list[Any] = []

    def open(self, start_step: int) -> None:
        """Start (or continue after `start_step`) the metrics file, bar and sinks."""
        cfg, run_dir, total_steps, run_config = self.cfg, self.run_dir, self.total_steps, self.run_config
        if not self.enabled:
            return
        truncate_after(self.path, start_step)
        self._file = open(self.path, "a", buffering=1)
        if cfg.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             file=sys.stderr, dynamic_ncols=True)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._sinks.append(("tb", SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
        if cfg.wandb:
            import wandb

            self._sinks.append(("wandb", wandb.init(project=cfg.wandb_project, dir=str(run_dir),
                                                    config=run_config, resume="allow")))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # full precision (repr round-trips), so runs can be compared bit for bit; NaN/inf as null
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        step = int(record["step"])
        for kind, sink in self._sinks:
            scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            if kind == "tb":
                for k, v in scalars.items():
                    sink.add_scalar(k, v, step)
            else:
                sink.log(scalars, step=step)
        if self._bar is not None and "loss" in record:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            if self._bar.desc != "train":
                self._bar.set_description_str("train", refresh=False)
            self._bar.update(n)

    def status(self, msg: str) -> None:
        """What the run is doing now (a phase that may take a while): the bar's label, else a line."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(msg, refresh=True)
        else:
            print(msg, flush=True)

    def write(self, msg: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str("train", refresh=False)
            self._bar.close()
        self._file.close()
        for kind, sink in self._sinks:
            sink.close() if kind == "tb" else sink.finish()

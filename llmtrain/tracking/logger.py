"""MetricsLogger: one `log(record)` for every sink (metrics.jsonl, TensorBoard, wandb) and the progress display.

Rank 0 only: on other ranks every method is a no-op. metrics.jsonl is the record of a run (its values in
full precision, so runs compare bit for bit); the other sinks get the same scalars under the same names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtrain import faults
from llmtrain.jsonl import read_jsonl
from llmtrain.rundir import METRICS_FILE
from llmtrain.tracking.progress import Progress


@dataclass
class LoggerConfig:
    """`logger.*`: where metrics go (rank 0 only)."""

    log_every: int = 10  # steps between metrics records
    progress: bool = True  # a bar on a terminal, else one plain line per log step (stderr)
    tensorboard: bool = True  # <run>/tensorboard (llmtrain-dashboard serves every run's)
    wandb: bool = False
    # online | offline (sync later with `wandb sync <run>/wandb/offline-run-*`) | disabled; a WANDB_MODE
    # environment variable, when set, wins over it (for the login check and the wandb run alike)
    wandb_mode: str = "online"
    wandb_project: str = "llmtrain"
    wandb_entity: str | None = None
    wandb_group: str | None = None  # None: the sweep's name in a multirun
    wandb_tags: list[str] = field(default_factory=list)
    wandb_name: str | None = None  # None: the run dir's name
    wandb_notes: str | None = None
    peak_tflops: float | None = None  # accelerator peak for MFU; None: the table (by device name and precision)
    plots: bool = True  # <run>/plots/loss.png at the end of a run


def truncate_after(path: Path, step: int) -> None:
    """Drop records of steps after `step` (those of a run that died after its last checkpoint) and a torn or
    garbled line (with one warning); the file is rewritten atomically when anything is dropped."""
    read_jsonl(path, keep=lambda r: isinstance(r.get("step"), int) and r["step"] <= step, repair=True)


class MetricsLogger:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, *, enabled: bool, total_steps: int,
                 run_config: dict[str, Any] | None = None, group: str | None = None) -> None:
        self.cfg, self.enabled, self.run_dir = cfg, enabled, run_dir
        self.total_steps, self.run_config, self.group = total_steps, run_config, group
        self.path = run_dir / METRICS_FILE
        self.progress = Progress(total_steps, 0, enabled=False)
        self._sinks: list[Any] = []

    def open(self, start_step: int) -> None:
        """Start (or continue after `start_step`) the metrics file, the progress display and the sinks."""
        if not self.enabled:
            return
        from llmtrain.tracking.sinks import TensorBoardSink, WandbSink, wandb_mode

        truncate_after(self.path, start_step)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115  (closed in close())
        self.progress = Progress(self.total_steps, start_step, enabled=self.cfg.progress)
        if self.cfg.tensorboard:
            self._sinks.append(TensorBoardSink(self.run_dir, start_step))
        if self.cfg.wandb and wandb_mode(self.cfg) != "disabled":
            self._sinks.append(WandbSink(self.cfg, self.run_dir, self.run_config, self.group))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # full precision (repr round-trips), so runs can be compared bit for bit; NaN/inf as null
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        faults.torn_write(self._file, json.dumps(clean) + "\n", "metrics")
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for sink in self._sinks:
            sink.log(scalars, int(record["step"]))
        self.progress.metrics(record)

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.progress.advance(n)

    def status(self, msg: str) -> None:
        """What the run is doing now (a phase that may take a while)."""
        if self.enabled:
            self.progress.status(msg)

    def write(self, msg: str) -> None:
        """A line on stdout that does not break the progress bar."""
        if self.enabled:
            self.progress.write(msg)

    def close(self) -> None:
        if not self.enabled:
            return
        self.progress.close()
        self._file.close()
        for sink in self._sinks:
            sink.close()
        self._sinks = []

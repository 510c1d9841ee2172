"""`hydra/launcher=torchrun`: every trial of a sweep as its own `torchrun` job.

    llmtrain-train -m hydra/launcher=torchrun hydra.launcher.nproc_per_node=2 strategy=ddp optim.lr=1e-3,3e-4

Each trial's run dir is the one Hydra gives it (`hydra.sweep.dir`/`hydra.sweep.subdir`); the trial runs
`python -m torch.distributed.run --standalone --nproc_per_node=N -m llmtrain.train <its overrides>
hydra.run.dir=<that dir>` with the sweep's name in LLMTRAIN_SWEEP (the trial's wandb group: it runs in
Hydra's RUN mode, which knows no sweep), and its result (the final eval loss, for a sweeper to minimise) is
read back from the run dir. Trials run one after another; a trial refused for a bad value (exit 2) ends the
sweep.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module before it is in
# sys.modules, where dataclasses cannot resolve string annotations.
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict


@dataclass
class TorchrunLauncherConf:
    _target_: str = "hydra_plugins.llmtrain_launcher.torchrun_launcher.TorchrunLauncher"
    nproc_per_node: int = 2  # processes per trial
    module: str = "llmtrain.train"  # what torchrun runs
    python: str | None = None  # interpreter of the trials; None: the sweep's own
    timeout_s: float | None = None  # per trial; None: no limit


ConfigStore.instance().store(group="hydra/launcher", name="torchrun", node=TorchrunLauncherConf,
                             provider="llmtrain")


class TorchrunLauncher(Launcher):
    def __init__(self, nproc_per_node: int = 2, module: str = "llmtrain.train", python: str | None = None,
                 timeout_s: float | None = None) -> None:
        self.nproc_per_node, self.module = nproc_per_node, module
        self.python, self.timeout_s = python or sys.executable, timeout_s
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        from llmtrain.cli import hydra_quote
        from llmtrain.config import checked
        from llmtrain.rundir import last_metrics, objective
        from llmtrain.tracking.sinks import SWEEP_ENV

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        trials = []
        for i, overrides in enumerate(job_overrides):  # every trial's config first: a bad value ends the sweep
            idx = initial_job_idx + i  # before any trial has run, with one line
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id, cfg.hydra.job.num = f"{cfg.hydra.job.name}_{idx}", idx
                task = {k: v for k, v in cfg.items() if k != "hydra"}
            checked(OmegaConf.create(task))
            trials.append((idx, list(overrides), cfg))
        runs = []
        for idx, overrides, cfg in trials:
            HydraConfig.instance().set_config(cfg)
            run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            cmd = [self.python, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                   f"--nproc_per_node={self.nproc_per_node}", "--max_restarts=0", "-m", self.module,
                   *overrides, f"hydra.run.dir={hydra_quote(str(run_dir))}"]
            print(f"llmtrain: trial #{idx} on {self.nproc_per_node} processes: {' '.join(overrides)}", file=sys.stderr,
                  flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                   SWEEP_ENV: Path(str(cfg.hydra.sweep.dir)).name}  # the trial's wandb group (a RUN of its own)
            code = subprocess.run(cmd, env=env, timeout=self.timeout_s).returncode
            if code == 2:  # the trial's own one-line error said why
                sys.exit(2)
            ret = JobReturn(overrides=overrides, cfg=cfg, hydra_cfg=cfg, working_dir=os.getcwd(),
                            task_name=str(cfg.hydra.job.name))
            if code == 0:
                ret.status, ret.return_value = JobStatus.COMPLETED, objective(last_metrics(run_dir))
            else:
                ret.status, ret.return_value = JobStatus.FAILED, RuntimeError(f"trial #{idx} exited with {code}")
            runs.append(ret)
        return runs

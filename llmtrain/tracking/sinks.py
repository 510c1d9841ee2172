"""Where metrics records go besides metrics.jsonl: TensorBoard event files and Weights & Biases.

Each sink takes the same scalars under the same names as metrics.jsonl. Both are rank 0 only (the
MetricsLogger is disabled elsewhere).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llmtrain.errors import ConfigError

WANDB_MODES = ("online", "offline", "disabled")
WANDB_ID_FILE = "wandb_id"
WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what this file may hold (ours: 8 hex digits)
SWEEP_ENV = "LLMTRAIN_SWEEP"  # the sweep's name, set by hydra/launcher=torchrun for the trials it starts


class TensorBoardSink:
    """<run>/tensorboard event files; a resumed run hides the events after its checkpoint (purge_step)."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                    purge_step=start_step + 1 if start_step > 0 else None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A wandb run for this run dir: its id is kept in <run>/wandb_id, so a resumed run continues it.

    Steps are logged as the `step` metric that every chart uses as its x-axis (wandb's own step only ever
    increases, while a resumed run logs again the steps after its checkpoint)."""

    def __init__(self, cfg: Any, run_dir: Path, run_config: dict[str, Any] | None, group: str | None) -> None:
        import wandb

        from llmtrain.safeio import atomic_write_text

        id_file = run_dir / WANDB_ID_FILE
        run_id = read_wandb_id(id_file) or secrets.token_hex(4)  # wandb's id form
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, group=cfg.wandb_group or group,
                              tags=list(cfg.wandb_tags) or None, name=cfg.wandb_name or run_dir.name,
                              notes=cfg.wandb_notes, config=run_config, dir=str(run_dir), id=run_id, resume="allow",
                              mode=wandb_mode(cfg), settings=wandb.Settings(silent=True, console="off"))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        atomic_write_text(id_file, run_id + "\n")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({"step": step, **scalars})

    def close(self) -> None:
        self.run.finish()


def read_wandb_id(id_file: Path) -> str | None:
    """The wandb run id kept in `id_file`; None when there is none, or (with one warning) when it is empty or
    garbled: the run then starts a new wandb run."""
    try:
        text = id_file.read_bytes().decode("ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        text = None
    if text and WANDB_ID.fullmatch(text):
        return text
    from llmtrain.jsonl import warn

    what = "empty" if text == "" else "not a wandb run id"
    warn(id_file, f"{what}; this run logs to a new wandb run")
    return None


def wandb_mode(cfg: Any) -> str:
    """The mode a run's wandb uses: the WANDB_MODE environment variable when it is set (wandb's own setting,
    which wins over logger.wandb_mode; 'dryrun' means offline, 'run' online), else logger.wandb_mode. The
    login check and the wandb run both follow it."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if not env:
        return str(cfg.wandb_mode)
    mode = {"dryrun": "offline", "run": "online"}.get(env, env)
    if mode not in WANDB_MODES:
        raise ConfigError("WANDB_MODE", f"the environment variable must be one of {list(WANDB_MODES)} (got "
                                        f"{os.environ['WANDB_MODE']!r}); unset it to use logger.wandb_mode")
    return mode


def sweep_group(hydra_cfg: Any) -> str | None:
    """The sweep a run is a trial of (wandb's default group), from the run's Hydra config: the sweep dir's
    name in a multirun; in a trial the torchrun launcher started (a run of its own, in Hydra's RUN mode) the
    name the launcher passed in LLMTRAIN_SWEEP; None for a run outside a sweep."""
    from hydra.types import RunMode

    if hydra_cfg.mode == RunMode.MULTIRUN:
        return Path(str(hydra_cfg.sweep.dir)).name
    return os.environ.get(SWEEP_ENV) or None


def check_wandb(cfg: Any) -> None:
    """Before training: a wandb mode that can work here, or one line saying why not (never a hang)."""
    if cfg.wandb_mode not in WANDB_MODES:
        raise ConfigError("logger.wandb_mode", f"must be one of {list(WANDB_MODES)} (got {cfg.wandb_mode!r})")
    if not cfg.wandb or wandb_mode(cfg) != "online":
        return
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    if not _wandb_credentials(url.hostname or ""):
        raise ConfigError("logger.wandb_mode", "online, but there is no wandb login (run `wandb login` or set "
                                               "WANDB_API_KEY); or use logger.wandb_mode=offline and `wandb sync` later")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError:
        raise ConfigError("logger.wandb_mode", f"online, but {url.hostname} cannot be reached; use "
                                               "logger.wandb_mode=offline and `wandb sync` later") from None


def _wandb_credentials(host: str) -> bool:
    """An API key in the environment, an identity token, or a netrc entry for the host (what `wandb login`
    writes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import netrc

    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False

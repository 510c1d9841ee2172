"""Shared test helpers: compose configs in-process, run the CLI, launch 2-process jobs with timeouts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PY = sys.executable

# A tiny GPT-2 on a tiny corpus: fast enough for many multi-process runs on 2 CPU cores.
TINY_LM = [
    "experiment=gpt2_tiny", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.n_positions=64",
    "data.tokenizer=byte", "data.seq_len=32", "data.embedded_max_bytes=200000", "trainer.micro_batch_size=4",
    "trainer.eval_batches=2", "trainer.sample_tokens=0", "logger.log_every=1", "logger.progress=false",
]


# Greedy samples every 10 steps (samples.jsonl): equal across strategies when the weights are (sharded ones gathered).
SAMPLING = ["trainer.sample_tokens=8", "trainer.sample_every=10", "trainer.sample_temperature=0",
            'trainer.sample_prompts=["def ","x = "]']


def samples(run_dir: Path) -> list[tuple[int, str]]:
    return [(r["step"], r["text"]) for r in (json.loads(ln) for ln in (run_dir / "samples.jsonl").read_text().splitlines())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(tmp_cache: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    if tmp_cache is not None:
        env["LLMTRAIN_CACHE"] = str(tmp_cache)
    return env


def descendants(root: int) -> list[int]:
    """Live descendants of root, from /proc (empty where there is none).

    torchrun starts each worker in a session of its own, so killing the launcher's process group
    alone would leave the workers running.
    """
    kids: dict[int, list[int]] = {}
    proc_dir = Path("/proc")
    for entry in proc_dir.iterdir() if proc_dir.is_dir() else []:
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the launcher's group (torchrun then stops its workers), then SIGKILL whatever is left."""
    pids = descendants(proc.pid)
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    for pid in [proc.pid, *pids]:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def run_cmd(cmd: list[str], *, timeout: float = 240, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run cmd in its own process group; on timeout kill the whole group and fail loudly."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or base_env(),
                            cwd=str(cwd or REPO), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n--- stdout\n{out[-3000:]}\n"
                             f"--- stderr\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train_cli(overrides: list[str], run_dir: Path, *, nproc: int = 1, timeout: float = 240,
              env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m llmtrain.train` (nproc == 1) or torchrun with nproc processes over gloo."""
    args = ["-m", "llmtrain.train", *overrides, f"hydra.run.dir={run_dir}"]
    if nproc == 1:
        cmd = [PY, *args]
    else:
        cmd = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
               f"--master_port={free_port()}", "--max_restarts=0", *args]
    res = run_cmd(cmd, timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}: {' '.join(cmd)}\n--- stdout\n{res.stdout[-4000:]}\n"
                             f"--- stderr\n{res.stderr[-6000:]}")
    return res


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def compose(overrides: list[str]) -> Any:
    """The config the CLI would build, composed in-process."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from llmtrain.config import conf_dir, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return _compose(config_name="config", overrides=overrides)

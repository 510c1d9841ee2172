"""Rank and world facts from the launcher's environment; process-group start and stop."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from llmtrain.distributed.dist import Dist


def strip_local_rank_arg(argv: list[str]) -> list[str]:
    """Remove `--local_rank=N` / `--local-rank N` (injected by `deepspeed` and old launchers).

    The value goes to LOCAL_RANK so Hydra never sees the flag.
    """
    out: list[str] = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        for flag in ("--local_rank", "--local-rank"):
            if a == flag and i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
                skip = True
                break
            if a.startswith(flag + "="):
                os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
                break
        else:
            out.append(a)
    return out


def read_env() -> Dist:
    """Rank facts from torchrun / deepspeed / accelerate / SLURM variables (1 process if none)."""
    e = os.environ
    if "RANK" not in e and "SLURM_PROCID" in e and "WORLD_SIZE" not in e and "SLURM_NTASKS" in e:
        # One task per GPU started by SLURM itself (srun, submitit), no torchrun: map SLURM's variables to
        # torch's, and rendezvous at the job's first node on a port derived from the job id.
        e["RANK"], e["WORLD_SIZE"] = e["SLURM_PROCID"], e["SLURM_NTASKS"]
        e.setdefault("LOCAL_RANK", e.get("SLURM_LOCALID", "0"))
        if int(e["WORLD_SIZE"]) > 1:
            e.setdefault("MASTER_ADDR", first_slurm_host(e.get("SLURM_JOB_NODELIST", "")))
            e.setdefault("MASTER_PORT", str(20000 + int(e.get("SLURM_JOB_ID", "0")) % 20000))
    rank = int(e.get("RANK", "0"))
    world = int(e.get("WORLD_SIZE", "1"))
    local = int(e.get("LOCAL_RANK", "0"))
    return Dist(rank=rank, world_size=world, local_rank=local)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[03-05],gpu07" → gpu03), by `scontrol` when present."""
    import re
    import shutil
    import subprocess

    if shutil.which("scontrol") and nodelist:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    m = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist)
    return (m.group(1) + (m.group(2) or "")) if m else "127.0.0.1"


def pick_device(requested: str, env: Dist) -> torch.device:
    """'auto' → this rank's GPU when CUDA is present, else CPU."""
    from llmtrain.device import pick_device as pick

    return pick(requested, env.local_rank)


_CONTROL: list[Any] = []  # the gloo group for small CPU control messages (see control_group)


def init_process_group(env: Dist, device: torch.device, backend: str | None = None,
                       timeout_s: float = 600.0) -> None:
    """Start the default process group once (no-op for one process), and a gloo control group beside NCCL."""
    if not env.distributed or dist.is_initialized():
        return
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    # Stop requests are agreed on every step; over gloo on CPU tensors that never waits for the GPU.
    _CONTROL[:] = [None if backend == "gloo" else dist.new_group(backend="gloo",
                                                                 timeout=timedelta(seconds=timeout_s))]


def control_group() -> Any:
    """The process group for CPU control collectives (None: the default group, already gloo)."""
    return _CONTROL[0] if _CONTROL else None


def init_single_process_group(device: torch.device, backend: str | None = None) -> None:
    """A 1-rank process group (in-memory store) for backends that need one even in a single process.

    No-op when a group exists; `destroy_process_group()` ends it like any other.
    """
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend=backend, rank=0, world_size=1, store=dist.HashStore())


def destroy_process_group() -> None:
    _CONTROL.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "GROUP_RANK")  # set by torchrun (and what runs it)


def launched_by_launcher() -> bool:
    """Whether this process is a worker started by torchrun / deepspeed / accelerate (not a shell's child)."""
    e = os.environ
    return any(k in e for k in LAUNCHER_VARS) or int(e.get("WORLD_SIZE", "1")) > 1


def watch_launcher(poll_s: float = 1.0) -> None:
    """Exit soon after the launcher that started this worker dies (kill -9 of torchrun leaves its workers,
    each in a session of its own, training on). No-op for a process that a shell started."""
    if not launched_by_launcher():
        return
    import sys
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                print(f"llmtrain: the launcher (pid {parent}) is gone; this worker (pid {os.getpid()}) exits",
                      file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="llmtrain-launcher-watch").start()

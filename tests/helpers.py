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

# A tiny GPT-2 on a tiny corpus: fast enough for many multi-process runs on 2 CPU cores. fp32 pinned: the preset's
# precision=auto is bf16 on a CPU with native bf16, and the tests compare losses across strategies bit for bit.
TINY_LM = [
    "experiment=gpt2_tiny", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.n_positions=64",
    "data.tokenizer=byte", "data.seq_len=32", "data.embedded_max_bytes=200000", "trainer.micro_batch_size=4",
    "trainer.eval_batches=2", "trainer.sample_tokens=0", "logger.log_every=1", "logger.progress=false",
    "trainer.precision=fp32",
]


# Greedy samples every 10 steps (samples.jsonl): equal across strategies when the weights are (sharded ones gathered).
SAMPLING = ["trainer.sample_tokens=8", "trainer.sample_every=10", "trainer.sample_temperature=0",
            'trainer.sample_prompts=["def ","x = "]']


def samples(run_dir: Path) -> list[tuple[int, str]]:
    return [(r["step"], r["text"]) for r in (json.loads(ln) for ln in (run_dir / "samples.jsonl").read_text().splitlines())]


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range (32768-60999): one the OS hands out for bind(0) or to
    a connection's local end (gloo opens many) could be taken by another test's process before the launcher
    binds it (the likely cause of one CI run's two-node rendezvous losing its store connection)."""
    import random

    pick = random.SystemRandom()  # not the module's generator: in-process runs seed it alike in every worker
    for _ in range(200):
        port = pick.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


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


# Training processes are forked from a server that has already imported torch, llmtrain and DeepSpeed (about 6 s
# saved per process on 2 cores). A child gets the environment, working dir and argv a launcher would give
# it and runs the same `main()` the console script runs; a 2-rank job gets torchrun's RANK / WORLD_SIZE /
# LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Tests of launching itself (torchrun, the launch scripts, signals,
# installation, the README) start real processes instead.
PRELOAD = ["torch", "torch._dynamo", "torch.distributed.fsdp", "torch.distributed.checkpoint", "llmtrain.train",
           "llmtrain.export", "llmtrain.generation.cli", "llmtrain.distributed.fsdp", "llmtrain.distributed.deepspeed",
           "deepspeed"]
_FORK: list[Any] = []


def _fork_ctx() -> Any:
    if not _FORK:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # read when the server loads torch's OpenMP runtime
        ctx.set_forkserver_preload(PRELOAD)
        _FORK.append(ctx)
    return _FORK[0]


def _forked_main(module: str, argv: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """In the forked child: the environment (PYTHONPATH's entries on sys.path, as a new interpreter has them),
    fds 1/2 to files, then `module.main()` (SystemExit → exit code)."""
    import importlib

    os.environ.clear()
    os.environ.update(env)
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.argv = [module, *argv]
    importlib.import_module(module).main()


def fork_cli(module: str, argv: list[str], *, nproc: int = 1, timeout: float = 240, env: dict[str, str] | None = None,
             cwd: Path | None = None, logs: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> argv` as `nproc` forked ranks; like torchrun, the first rank to fail ends the job."""
    import tempfile
    import time

    env = dict(env or base_env())
    logs = Path(logs or tempfile.mkdtemp(prefix="llmtrain-fork-"))
    logs.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for r in range(nproc):
        renv = dict(env)
        if nproc > 1:
            renv.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        p = _fork_ctx().Process(target=_forked_main, args=(module, argv, renv, str(cwd or REPO),
                                                           str(logs / f"out{r}"), str(logs / f"err{r}")))
        p.start()
        procs.append(p)
    deadline, failed_at, grace = time.monotonic() + timeout, None, 5.0
    while any(p.is_alive() for p in procs):
        codes = [p.exitcode for p in procs]
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()  # torchrun stops the other ranks when one fails
            if any(c is not None and c < 0 for c in codes):  # killed by a signal: the others at once
                grace = 0.0
        if time.monotonic() > deadline or (failed_at is not None and time.monotonic() > failed_at + grace):
            for p in procs:
                p.kill()
            break
        time.sleep(0.02)
    for p in procs:
        p.join()
    read = [((logs / f"out{r}").read_text(errors="replace"), (logs / f"err{r}").read_text(errors="replace"))
            for r in range(nproc)]
    out, err = "".join(o for o, _ in read), "".join(e for _, e in read)
    if time.monotonic() > deadline:
        raise AssertionError(f"timed out after {timeout}s: {module} {' '.join(argv)}\n--- stdout\n{out[-3000:]}\n"
                             f"--- stderr\n{err[-3000:]}")
    code = next((p.exitcode for p in procs if p.exitcode), 0)
    return subprocess.CompletedProcess([module, *argv], code, out, err)


def train_cli(overrides: list[str], run_dir: Path, *, nproc: int = 1, timeout: float = 240,
              env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m llmtrain.train` as `nproc` ranks over gloo (forked: see fork_cli)."""
    args = [*overrides, f"hydra.run.dir={run_dir}"]
    res = fork_cli("llmtrain.train", args, nproc=nproc, timeout=timeout, env=env,
                   logs=Path(run_dir).parent / f".logs-{Path(run_dir).name}")
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}: llmtrain.train {' '.join(args)} ×{nproc}\n--- stdout\n"
                             f"{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-6000:]}")
    return res


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def max_rel(got: dict[int, float], want: dict[int, float], steps: Any = None) -> float:
    """The largest relative difference of `got` from `want` over `steps` (default: every step of `want`)."""
    return max(abs(got[s] - want[s]) / abs(want[s]) for s in (want if steps is None else steps))


def ckpt_state(ck: Path) -> dict[str, Any]:
    """A checkpoint's model and optimizer state ({"model": {name: tensor}, "optim": {"state": {name: ...},
    "param_groups": ...}}), its DCP files read whole in this process."""
    from llmtrain.distributed.dcp import read_dcp

    return read_dcp(ck, ("model", "optim"))


def compose(overrides: list[str], config_name: str = "config") -> Any:
    """The config the CLI would build, composed in-process (`config_name`: generate, eval for those apps)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from llmtrain.config import conf_dir, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return _compose(config_name=config_name, overrides=overrides)


def random_gpt2_export(out: Path, n_positions: int) -> Path:
    """A tiny random native GPT-2 exported to `out` on the byte vocabulary, with its tokenizer. Its weights are
    scaled up: at the usual init greedy decoding repeats one token whatever the context, and endings score
    alike, which would hide a masking or cache bug."""
    import torch

    from llmtrain.data.tokenizers import byte_tokenizer
    from llmtrain.models.gpt2_native import GPT2, GPT2Dims, save_hf

    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT2(GPT2Dims(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                          eos_token_id=tok.eos_token_id))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    save_hf(model, out)
    tok.save_pretrained(out)
    return out


def transformers_gpt2_dir(d: Path) -> Path:
    """A 2-layer GPT-2 on the byte vocabulary, saved as transformers saves it (no dropout), with its tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmtrain.data.tokenizers import byte_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=256,
                               eos_token_id=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d

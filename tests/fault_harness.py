"""Kill -9 anywhere, resume, and get the uninterrupted run bit for bit.

For each strategy: one uninterrupted reference run, then a chain of runs into one run dir, each killed
(SIGKILL, one rank; the launcher stand-in then kills the others, as torchrun does) at a seeded random
point — inside an optimizer step, inside a checkpoint save, inside an export, during an evaluation, halfway
through a line of metrics.jsonl or samples.jsonl (a torn last line), between run.json's temp file and its
rename, or (`--mode timed`) after a random delay — and rerun with `trainer.resume=auto` until one finishes.
The final `loss` of every step, the exported weights and samples.jsonl must equal the reference's exactly
(CPU, fp32, gradient accumulation and dropout on; the single strategy also samples during training).

    python tests/fault_harness.py --seed 0 --chains 10 --kills 4 --strategies single ddp fsdp zero2 zero3
    python tests/fault_harness.py --mode timed --seed 1 --chains 20

tests/distributed/test_fault_injection.py runs a short seeded set in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import TINY_LM, base_env, losses, train_cli  # noqa: E402

STEPS, CKPT_EVERY, EVAL_EVERY = 8, 2, 4
SAMPLE_EVERY = 5  # not a checkpoint step: a resume from before it samples it again
SAMPLING = ["trainer.sample_tokens=4", f"trainer.sample_every={SAMPLE_EVERY}", "trainer.sample_temperature=0"]
COMMON = [*TINY_LM, f"trainer.max_steps={STEPS}", f"trainer.ckpt_every={CKPT_EVERY}",
          f"trainer.eval_every={EVAL_EVERY}", "trainer.keep_checkpoints=2", "trainer.grad_accum_steps=2",
          "model.dropout=0.1", "logger.tensorboard=false", "logger.plots=false"]
ZERO3_JSON = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}  # partition every tensor
STRATEGIES: dict[str, tuple[list[str], int]] = {
    "single": (["trainer.micro_batch_size=8", *SAMPLING], 1),
    "ddp": (["strategy=ddp"], 2),
    "fsdp": (["strategy=fsdp"], 2),
    "zero2": (["strategy=deepspeed", "strategy.zero_stage=2"], 2),
    "zero3": (["strategy=deepspeed", "strategy.zero_stage=3"], 2),
}
STATE_POINTS = ("step", "save", "eval", "export")  # inside training, checkpoints and exports
WRITE_POINTS = ("metrics", "record", "samples")  # inside a write to metrics.jsonl, run.json, samples.jsonl
POINTS = STATE_POINTS + WRITE_POINTS
MAIN_ONLY = ("export", "metrics", "record", "samples")  # rank 0 writes these; the others wait for it


@dataclass
class Chain:
    """One run dir killed `kills` times, then finished."""

    strategy: str
    faults: list[str] = field(default_factory=list)  # LLMTRAIN_FAULT of each killed run
    killed: int = 0  # runs that did die
    identical: bool | None = None
    seconds: float = 0.0


def args_for(strategy: str, root: Path) -> tuple[list[str], int]:
    overrides, nproc = STRATEGIES[strategy]
    args = [*COMMON, *overrides]
    if strategy == "zero3":
        cfg = root / "zero3.json"
        cfg.write_text(json.dumps(ZERO3_JSON))
        args.append(f"strategy.deepspeed_config={cfg}")
    return args, nproc


def newest_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint (0 without one)."""
    from llmtrain import checkpoint as ckpt

    found = ckpt.list_checkpoints(run_dir)
    return int(found[-1].name[5:]) if found else 0


def reachable(start: int, sampling: bool = False) -> dict[str, int]:
    """How often each fault point is visited by a run resuming from step `start` (1-based counts), up to its
    export (a kill after it leaves a complete run: the end-of-run sample and run record are not counted)."""
    rest = range(start + 1, STEPS + 1)
    evals = sum(s % EVAL_EVERY == 0 for s in rest)
    return {"step": len(rest), "save": sum(s % CKPT_EVERY == 0 for s in rest), "eval": evals, "export": 1,
            "metrics": len(rest) + evals,  # logger.log_every=1: a train record per step, and the evals'
            "record": 1,  # run.json's "running" at the start
            "samples": sum(s % SAMPLE_EVERY == 0 and s < STEPS for s in rest) if sampling else 0}


def pick_fault(rng: random.Random, start: int, nproc: int, mode: str, span_ms: int = 1500,
               sampling: bool = False, points: tuple[str, ...] = POINTS) -> str:
    """A kill at a uniformly random visit of one of `points` (so a step is likelier than the one export), or
    (`timed`) at a random instant within `span_ms` of the start of training."""
    rank = rng.randrange(nproc)
    if mode == "timed":
        return f"kill:time:{rng.randrange(10, max(20, span_ms))}:{rank}"
    visits = [(point, n) for point, count in sorted(reachable(start, sampling).items()) if point in points
              for n in range(1, count + 1)]
    point, n = rng.choice(visits)
    if point in MAIN_ONLY:
        rank = 0
    return f"kill:{point}:{n}:{rank}"


def reference(strategy: str, root: Path) -> Path:
    run_dir = root / f"ref-{strategy}"
    if not (run_dir / "final").is_dir():
        args, nproc = args_for(strategy, root)
        train_cli(args, run_dir, nproc=nproc, timeout=240)
    return run_dir


def run_chain(strategy: str, root: Path, rng: random.Random, kills: int, mode: str = "points",
              name: str = "chain", points: tuple[str, ...] = POINTS) -> Chain:
    """Kill a run `kills` times at random points, then let it finish; compare it with the reference."""
    ref = reference(strategy, root)
    args, nproc = args_for(strategy, root)
    sampling = any(a.startswith("trainer.sample_every=") for a in args)
    run_dir = root / f"{name}-{strategy}"
    shutil.rmtree(run_dir, ignore_errors=True)
    chain, t0 = Chain(strategy), time.monotonic()
    span = int(1000 * json.loads((ref / "run.json").read_text()).get("wall_s", 1.5))  # the reference's training
    for _ in range(kills):
        fault = pick_fault(rng, newest_step(run_dir), nproc, mode, span, sampling, points)
        env = base_env()
        env["LLMTRAIN_FAULT"] = fault
        res = train_cli(args, run_dir, nproc=nproc, env=env, timeout=240, check=False)
        chain.faults.append(fault)
        if res.returncode == 0:  # the point was not reached (a timed kill after the end): the run is done
            break
        chain.killed += 1
    train_cli(args, run_dir, nproc=nproc, timeout=240)  # the same command, resume=auto: finish it
    chain.identical = same_run(ref, run_dir)
    chain.seconds = time.monotonic() - t0
    return chain


def same_run(ref: Path, run_dir: Path) -> bool:
    """The losses of every step, the exported weights and samples.jsonl (byte for byte) equal the reference's."""
    def read(path: Path) -> bytes | None:
        return path.read_bytes() if path.exists() else None

    return losses(run_dir) == losses(ref) and _same_weights(ref / "final", run_dir / "final") \
        and read(ref / "samples.jsonl") == read(run_dir / "samples.jsonl")


def _same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chains", type=int, default=4, help="chains per strategy")
    ap.add_argument("--kills", type=int, default=4, help="kills per chain")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--mode", choices=["points", "timed"], default="points")
    ap.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS),
                    help="fault points to kill at (--mode points)")
    ap.add_argument("--root", type=Path, help="work dir (default: a temp dir, removed at the end)")
    a = ap.parse_args()
    root = a.root or Path(tempfile.mkdtemp(prefix="llmtrain-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    total: dict[str, list[int]] = {}
    try:
        for strategy in a.strategies:
            for i in range(a.chains):
                c = run_chain(strategy, root, rng, a.kills, a.mode, name=f"chain{i}", points=tuple(a.points))
                t = total.setdefault(strategy, [0, 0, 0])
                t[0], t[1], t[2] = t[0] + c.killed, t[1] + 1, t[2] + int(bool(c.identical))
                print(f"{strategy} chain {i}: {c.killed} kills {c.faults} → "
                      f"{'bit-identical' if c.identical else 'DIFFERENT'} ({c.seconds:.0f}s)", flush=True)
    finally:
        if a.root is None:
            shutil.rmtree(root, ignore_errors=True)
    for strategy, (kills, chains, same) in total.items():
        print(f"{strategy}: {kills} kills over {chains} chains, {same}/{chains} chains bit-identical")
    sys.exit(0 if all(t[1] == t[2] for t in total.values()) else 1)


if __name__ == "__main__":
    main()

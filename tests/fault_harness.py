"""Kill -9 anywhere, resume, and get the uninterrupted run bit for bit.

For each strategy: one uninterrupted reference run, then a chain of runs into one run dir, each killed
(SIGKILL, one rank; the launcher stand-in then kills the others, as torchrun does) at a seeded random
point — inside an optimizer step, inside a checkpoint save, inside an export, during an evaluation, or
(`--mode timed`) after a random delay — and rerun with `trainer.resume=auto` until one finishes. The final
`loss` of every step and the exported weights must equal the reference's exactly (CPU, fp32, gradient
accumulation and dropout on).

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
COMMON = [*TINY_LM, f"trainer.max_steps={STEPS}", f"trainer.ckpt_every={CKPT_EVERY}",
          f"trainer.eval_every={EVAL_EVERY}", "trainer.keep_checkpoints=2", "trainer.grad_accum_steps=2",
          "model.dropout=0.1", "logger.tensorboard=false", "logger.plots=false"]
ZERO3_JSON = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}  # partition every tensor
STRATEGIES: dict[str, tuple[list[str], int]] = {
    "single": (["trainer.micro_batch_size=8"], 1),
    "ddp": (["strategy=ddp"], 2),
    "fsdp": (["strategy=fsdp"], 2),
    "zero2": (["strategy=deepspeed", "strategy.zero_stage=2"], 2),
    "zero3": (["strategy=deepspeed", "strategy.zero_stage=3"], 2),
}
POINTS = ("step", "save", "eval", "export")


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


def reachable(start: int) -> dict[str, int]:
    """How often each fault point is visited by a run resuming from step `start` (1-based counts)."""
    rest = range(start + 1, STEPS + 1)
    return {"step": len(rest), "save": sum(s % CKPT_EVERY == 0 for s in rest),
            "eval": sum(s % EVAL_EVERY == 0 for s in rest), "export": 1}


def pick_fault(rng: random.Random, start: int, nproc: int, mode: str, span_ms: int = 1500) -> str:
    """A kill at a uniformly random visit of a fault point (so a step is likelier than the one export), or
    (`timed`) at a random instant within `span_ms` of the start of training."""
    rank = rng.randrange(nproc)
    if mode == "timed":
        return f"kill:time:{rng.randrange(10, max(20, span_ms))}:{rank}"
    visits = [(point, n) for point, count in sorted(reachable(start).items()) for n in range(1, count + 1)]
    point, n = rng.choice(visits)
    if point == "export":
        rank = 0  # rank 0 writes the export; the others wait for it
    return f"kill:{point}:{n}:{rank}"


def reference(strategy: str, root: Path) -> Path:
    run_dir = root / f"ref-{strategy}"
    if not (run_dir / "final").is_dir():
        args, nproc = args_for(strategy, root)
        train_cli(args, run_dir, nproc=nproc, timeout=240)
    return run_dir


def run_chain(strategy: str, root: Path, rng: random.Random, kills: int, mode: str = "points",
              name: str = "chain") -> Chain:
    """Kill a run `kills` times at random points, then let it finish; compare it with the reference."""
    ref = reference(strategy, root)
    args, nproc = args_for(strategy, root)
    run_dir = root / f"{name}-{strategy}"
    shutil.rmtree(run_dir, ignore_errors=True)
    chain, t0 = Chain(strategy), time.monotonic()
    span = int(1000 * json.loads((ref / "run.json").read_text()).get("wall_s", 1.5))  # the reference's training
    for _ in range(kills):
        fault = pick_fault(rng, newest_step(run_dir), nproc, mode, span)
        env = base_env()
        env["LLMTRAIN_FAULT"] = fault
        res = train_cli(args, run_dir, nproc=nproc, env=env, timeout=240, check=False)
        chain.faults.append(fault)
        if res.returncode == 0:  # the point was not reached (a timed kill after the end): the run is done
            break
        chain.killed += 1
    train_cli(args, run_dir, nproc=nproc, timeout=240)  # the same command, resume=auto: finish it
    chain.identical = losses(run_dir) == losses(ref) and _same_weights(ref / "final", run_dir / "final")
    chain.seconds = time.monotonic() - t0
    return chain


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
    ap.add_argument("--root", type=Path, help="work dir (default: a temp dir, removed at the end)")
    a = ap.parse_args()
    root = a.root or Path(tempfile.mkdtemp(prefix="llmtrain-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    total: dict[str, list[int]] = {}
    try:
        for strategy in a.strategies:
            for i in range(a.chains):
                c = run_chain(strategy, root, rng, a.kills, a.mode, name=f"chain{i}")
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

"""Counting the bytes handed to collectives (LLMTRAIN_COUNT_COMM=1): what llmtrain-plan's communication
estimate is checked against. Off unless asked for; it wraps the torch.distributed functions that FSDP2 and
DeepSpeed call, and reads DDP's bucket sizes from DDP's own record (its reducer calls the process group
directly). Each rank writes `<run>/comm_rank<r>.json` at the end: bytes per collective, and the steps run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV = "LLMTRAIN_COUNT_COMM"
TOTALS: Counter[str] = Counter()
STATE = {"active": False, "steps": 0}  # counting only inside optimizer steps (not eval, export or samples)
_GATHERS = ("all_gather_into_tensor", "all_gather_single", "_all_gather_base", "all_gather")
_SCATTERS = ("reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base", "reduce_scatter")
_WRAPPED = ("all_reduce", "reduce", "broadcast", *_GATHERS, *_SCATTERS)


def enabled() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0")


def _nbytes(x: Any) -> int:
    import torch

    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _counted(name: str, fn: Any) -> Any:
    """fn, counting the bytes of the tensor that carries the data: the output of a gather, the input of a
    reduce-scatter, the tensor itself otherwise."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if STATE["active"] and not STATE.get("inside"):  # an alias calling its successor counts once
            if name in _GATHERS:
                kind = "all_gather"
                data = kwargs.get("output_tensor", kwargs.get("tensor_list", args[0] if args else None))
            elif name in _SCATTERS:
                kind = "reduce_scatter"
                data = kwargs.get("input", kwargs.get("input_tensor", kwargs.get("input_list", args[1] if len(args) > 1
                                                                                else None)))
            else:
                kind, data = name, kwargs.get("tensor", args[0] if args else None)
            TOTALS[kind] += _nbytes(data)
        outer = not STATE.get("inside")
        STATE["inside"] = True
        try:
            return fn(*args, **kwargs)
        finally:
            if outer:
                STATE["inside"] = False

    wrapper._llmtrain_counted = True  # type: ignore[attr-defined]
    return wrapper


def install() -> None:
    """Wrap the collectives (once per process)."""
    import torch.distributed as dist

    for name in _WRAPPED:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "_llmtrain_counted", False):
            setattr(dist, name, _counted(name, fn))


@contextlib.contextmanager
def optimizer_step() -> Iterator[None]:
    """Count the collectives of one optimizer step."""
    STATE["active"] = True
    try:
        yield
    finally:
        STATE["active"] = False
        STATE["steps"] += 1


def count_ddp(model: Any, syncs: int) -> None:
    """DDP's all-reduced bytes: its buckets' sizes (from DDP's record) times the syncing micro-steps."""
    try:
        sizes = model._get_ddp_logging_data().get("bucket_sizes", "")
    except Exception:  # no DDP wrapper (one process)
        return
    per_sync = sum(int(x) for x in str(sizes).split(",") if x.strip()) if isinstance(sizes, str) else sum(sizes)
    TOTALS["all_reduce"] += per_sync * syncs


def dump(run_dir: Path, rank: int, model: Any) -> None:
    """Write this rank's counts (DDP's buckets added: one all-reduce of each per optimizer step)."""
    count_ddp(model, STATE["steps"])
    rec = {"steps": STATE["steps"], "bytes": dict(TOTALS)}
    (run_dir / f"comm_rank{rank}.json").write_text(json.dumps(rec, indent=1))

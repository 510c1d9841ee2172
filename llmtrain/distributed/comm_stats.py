"""Counting the bytes handed to collectives (LLMTRAIN_COUNT_COMM=1): what llmtrain-plan's communication
estimate is checked against. Off unless asked for; it wraps the torch.distributed functions that FSDP2,
DeepSpeed and the vocabulary-parallel loss call and the functional collectives DTensor's tensor parallelism
calls, and reads DDP's bucket sizes from DDP's own record (its reducer calls the process group directly).
Collectives over a tensor-parallel group (`tp_group`) count as "tp.<kind>". Each rank writes
`<run>/comm_rank<r>.json` at the end: bytes per collective, and the steps run.
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
_WRAPPED = ("all_reduce", "reduce", "broadcast", "all_to_all_single", *_GATHERS, *_SCATTERS)
# DTensor's functional collectives: name → (kind, the data's bytes: the input's, or × the group size: a gather)
_FUNCTIONAL = {"all_reduce": ("all_reduce", False), "all_gather_single": ("all_gather", True),
               "all_gather_tensor": ("all_gather", True), "reduce_scatter_single": ("reduce_scatter", False),
               "reduce_scatter_tensor": ("reduce_scatter", False), "all_to_all_single": ("all_to_all", False)}
TP_GROUPS: set[str] = set()  # names of the tensor-parallel process groups


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
            elif name == "all_to_all_single":
                kind, data = "all_to_all", kwargs.get("input", args[1] if len(args) > 1 else None)
            else:
                kind, data = name, kwargs.get("tensor", args[0] if args else None)
            TOTALS[_tagged(kind, kwargs.get("group"))] += _nbytes(data)
        outer = not STATE.get("inside")
        STATE["inside"] = True
        try:
            return fn(*args, **kwargs)
        finally:
            if outer:
                STATE["inside"] = False

    wrapper._llmtrain_counted = True  # type: ignore[attr-defined]
    return wrapper


def _tagged(kind: str, group: Any) -> str:
    """"tp.<kind>" for a collective over a tensor-parallel group, else kind."""
    if group is None or not TP_GROUPS:
        return kind
    name = group if isinstance(group, str) else getattr(group, "group_name", None)
    if name is None:
        from torch.distributed._functional_collectives import _resolve_group_name

        name = _resolve_group_name(group)
    return f"tp.{kind}" if name in TP_GROUPS else kind


def _counted_functional(name: str, fn: Any) -> Any:
    """A functional collective (fn(tensor, ..., group)), counting its data's bytes under its kind."""
    kind, gathers = _FUNCTIONAL[name]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if STATE["active"]:
            group = kwargs.get("group", args[-1] if len(args) > 1 else None)
            n = _nbytes(args[0] if args else kwargs.get("self"))
            if gathers:  # the gathered tensor: the input from every rank of the group
                from torch.distributed._functional_collectives import _resolve_group_name
                from torch.distributed.distributed_c10d import _resolve_process_group

                n *= _resolve_process_group(_resolve_group_name(group)).size()
            TOTALS[_tagged(kind, group)] += n
        return fn(*args, **kwargs)

    wrapper._llmtrain_counted = True  # type: ignore[attr-defined]
    return wrapper


def tp_group(group: Any) -> None:
    """Count the collectives over `group` (a tensor-parallel mesh dim's process group) as "tp.<kind>"."""
    if enabled():
        TP_GROUPS.add(group.group_name)


def install() -> None:
    """Wrap the collectives (once per process)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    for name in _WRAPPED:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "_llmtrain_counted", False):
            setattr(dist, name, _counted(name, fn))
    for name in _FUNCTIONAL:
        fn = getattr(funcol, name, None)
        if fn is not None and not getattr(fn, "_llmtrain_counted", False):
            setattr(funcol, name, _counted_functional(name, fn))


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

"""`Dist`: this process's rank facts and the collectives that checkpoints, data, the run dir and the loop need.

Strategies wrap, step and save a model; everything else that must agree across ranks (the run dir claimed by
rank 0, a checkpoint's manifest, a stop request, a loss sum) goes through this handle. With one process every
collective is a no-op, so checkpoint and run-dir logic run and test without a process group (`Dist()`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Dist:
    """Rank facts (from the launcher's environment: `distributed.env.read_env`) and collectives over the default
    process group; small control messages go over a CPU (gloo) group, so they never wait for a GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) a tensor over ranks in place, on its device; returns it."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t

    def max(self, value: int) -> int:
        """The largest of every rank's `value`, on every rank (a CPU collective: no device sync)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        from llmtrain.distributed.env import control_group

        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group())
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank."""
        return self.max(int(flag)) > 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (picklable objects)."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        from llmtrain.distributed.env import control_group

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=control_group())
        return out

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """fn() on rank 0, its result (or its ConfigError, raised on every rank, reported once) on every rank."""
        from llmtrain.errors import ConfigError

        out: tuple[Any, ConfigError | None] = (None, None)
        if self.is_main:
            try:
                out = (fn(), None)
            except ConfigError as e:
                out = (None, e)
        result, err = self.broadcast(out)
        if err is not None:
            err.quiet = not self.is_main
            raise err
        return result


def share_rounds(n: int, index: int, count: int, per_round: int = 1) -> Iterator[list[int]]:
    """Data-parallel rank `index` of `count`'s share of n items (index, index + count, ...) in rounds of up to
    `per_round`. Every rank gets the same number of rounds, so collective forwards (FSDP's and ZeRO-3's gathers)
    pair up; a round past a rank's share is empty: the caller runs an uncounted filler."""
    mine = range(index, n, count)
    for r in range(-(-n // (count * per_round))):
        yield list(mine[r * per_round:(r + 1) * per_round])

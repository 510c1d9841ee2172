"""The row trade of a fused column-wise projection (distributed/tp_fused.py), simulated in one process: each
rank sends rows of its contiguous Shard(0) shard and receives, in rank order, its share of every part."""

from __future__ import annotations

import pytest
import torch

from llmtrain.distributed.tp_fused import trade_plan


@pytest.mark.parametrize(("rows", "parts", "tp"), [(24, 3, 2), (96, 3, 4), (48, 3, 8), (16, 2, 2)])
def test_each_rank_receives_its_share_of_every_part(rows: int, parts: int, tp: int) -> None:
    full = torch.arange(rows)  # the global rows, by index
    own, share = rows // tp, rows // parts // tp
    plans = [trade_plan(rows, parts, tp, r) for r in range(tp)]
    for send, send_counts, _ in plans:
        assert sorted(send.tolist()) == list(range(own))  # every stored row goes somewhere, once
        assert sum(send_counts) == own
    for r, (_, _, recv_counts) in enumerate(plans):
        got = []
        for s, (send, send_counts, _) in enumerate(plans):  # what rank s sends to rank r
            sent = full[s * own:(s + 1) * own][send].split(send_counts)[r]
            assert len(sent) == recv_counts[s]
            got.append(sent)
        want = torch.cat([torch.arange(p * rows // parts + r * share, p * rows // parts + (r + 1) * share)
                          for p in range(parts)])  # [q_r; k_r; v_r]
        assert torch.equal(torch.cat(got), want), r

"""Loader: deterministic order, disjoint rank shards that cover the data, exact resume, read-ahead."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmtrain.data.base import Loader, ShardedSampler
from llmtrain.data.text import TokenBlocks

CPU = torch.device("cpu")


class Items:
    """n items whose value is their index."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def get(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return {"x": torch.as_tensor(np.asarray(indices, dtype=np.int64))}


def blocks(tmp_path, n_tokens: int = 5000, seq_len: int = 16, shard: int = 1500) -> tuple[TokenBlocks, np.ndarray]:
    toks = np.random.default_rng(0).integers(0, 60000, n_tokens).astype(np.uint16)
    paths = []
    for k, a in enumerate(range(0, n_tokens, shard)):
        paths.append(tmp_path / f"train_{k:03d}.bin")
        toks[a : a + shard].tofile(paths[-1])
    return TokenBlocks(paths, "uint16", seq_len), toks


def take(loader: Loader, k: int) -> list[np.ndarray]:
    return [next(loader)["x"].numpy() for _ in range(k)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_rank_shards_are_disjoint_and_cover_the_data(shuffle):
    n, b, world = 48, 3, 4
    per_rank = []
    for r in range(world):
        s = ShardedSampler(n, b, seed=7, shuffle=shuffle, rank=r, world_size=world)
        assert s.batches_per_epoch == n // (b * world)
        per_rank.append(np.concatenate([s.next_indices() for _ in range(s.batches_per_epoch)]))
    seen = np.concatenate(per_rank)
    assert len(set(seen.tolist())) == len(seen) == n  # disjoint and complete
    single = ShardedSampler(n, b * world, seed=7, shuffle=shuffle)
    for step in range(n // (b * world)):  # one global micro-batch == a single process's batch of b*world
        assert np.array_equal(np.concatenate([p[step * b : (step + 1) * b] for p in per_rank]), single.next_indices())
    if not shuffle:
        assert np.array_equal(per_rank[0][:b], np.arange(b))


def test_order_is_deterministic_from_the_seed_and_changes_per_epoch():
    a = [ShardedSampler(20, 5, seed=1, shuffle=True).next_indices() for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    s = ShardedSampler(20, 5, seed=1, shuffle=True)
    e0 = np.concatenate([s.next_indices() for _ in range(4)])
    e1 = np.concatenate([s.next_indices() for _ in range(4)])
    assert sorted(e0) == sorted(e1) == list(range(20)) and not np.array_equal(e0, e1) and s.epoch == 1
    assert not np.array_equal(e0, np.concatenate([ShardedSampler(20, 5, seed=2, shuffle=True).next_indices()
                                                  for _ in range(4)]))


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_continues_at_the_exact_next_block(tmp_path, prefetch):
    ds, _ = blocks(tmp_path, n_tokens=600, shard=200)  # 37 blocks: 4 global batches of 8 per epoch
    mk = lambda: Loader(ds, ShardedSampler(len(ds), 4, seed=3, shuffle=True, rank=1, world_size=2), CPU,  # noqa: E731
                        prefetch=prefetch)
    ref = mk()
    want = [next(ref)["input_ids"] for _ in range(12)]  # three epochs
    a = mk()
    for _ in range(7):
        next(a)
    state = a.state_dict()
    assert state["pos"] == (7 % 4) * 8 and state["epoch"] == 1  # consumed, not read ahead
    b = mk()
    b.load_state_dict(state)
    for k in range(7, 12):
        assert torch.equal(next(b)["input_ids"], want[k])
    a.load_state_dict(state)  # rewinding a running loader works too
    assert torch.equal(next(a)["input_ids"], want[7])


def test_prefetch_yields_the_same_sequence_and_stops_its_thread():
    import gc
    import threading

    plain = take(Loader(Items(30), ShardedSampler(30, 4, seed=0, shuffle=True), CPU, prefetch=0), 20)
    ahead = Loader(Items(30), ShardedSampler(30, 4, seed=0, shuffle=True), CPU, prefetch=2)
    assert all(np.array_equal(x, y) for x, y in zip(plain, take(ahead, 20), strict=True))
    assert Loader(Items(30), ShardedSampler(30, 4, seed=0, shuffle=True), CPU).prefetch == 0  # CPU default
    del ahead
    gc.collect()
    for t in threading.enumerate():
        if t.name == "llmtrain-prefetch":
            t.join(timeout=2)
    assert not [t for t in threading.enumerate() if t.name == "llmtrain-prefetch" and t.is_alive()]


def test_token_blocks_give_inputs_and_shifted_targets(tmp_path):
    ds, toks = blocks(tmp_path, seq_len=16)
    assert len(ds) == (5000 - 1) // 16
    b = ds.get(np.array([0, 93, 200]))  # block 93 spans shards 0 and 1 (tokens 1488..1505)
    for row, i in enumerate([0, 93, 200]):
        assert b["input_ids"][row].tolist() == toks[i * 16 : i * 16 + 16].tolist()
        assert b["labels"][row].tolist() == toks[i * 16 + 1 : i * 16 + 17].tolist()
    assert b["input_ids"].dtype == torch.int64 and b["input_ids"].is_contiguous()

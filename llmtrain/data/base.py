"""The data interface: a DataModule gives DataInfo and resumable, rank-sharded loaders.

Every dataset (regression, images, text blocks) is an indexable collection; one sampler decides the
order for all of them, so determinism, rank sharding and exact resume are written once.
"""

from __future__ import annotations

import queue
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from llmtrain.datainfo import Batch, DataInfo
from llmtrain.distributed.dist import Dist
from llmtrain.registry import Presets, Registry


class IndexedDataset(Protocol):
    """A fixed-size collection whose items are fetched by index, many at a time."""

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> Batch:
        """Stack the items at `indices` into a batch of CPU tensors."""
        ...


class ShardedSampler:
    """Deterministic order over `n` items, split across ranks, resumable mid-epoch.

    Each global micro-batch takes `batch_size * world_size` consecutive items of the epoch's order;
    rank r takes its slice [r*b, (r+1)*b). So ranks see disjoint items, and the union of one global
    micro-batch equals what a single process with batch `b * world_size` sees.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool, rank: int = 0,
                 world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        if self.global_batch > n:
            raise ValueError(f"batch of {self.global_batch} items exceeds the {n} items available")
        self.epoch, self.pos = 0, 0
        self._order = self._order_for(0)

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def _order_for(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n, dtype=np.int64)
        g = np.random.default_rng([self.seed, epoch])
        return g.permutation(self.n).astype(np.int64)

    def next_indices(self) -> np.ndarray:
        if self.pos + self.global_batch > self.n:  # drop the incomplete tail, start a new epoch
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._order_for(self.epoch)
        start = self.pos + self.rank * self.batch_size
        out = self._order[start : start + self.batch_size]
        self.pos += self.global_batch
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state` left off. The epoch's order depends on the seed and epoch only, and `pos`
        counts items of it, so a state saved with another global batch (another world size or micro-batch)
        continues the same epoch: no item of it is skipped or seen twice."""
        if state["n"] != self.n:
            raise ValueError(f"loader state is for {state['n']} items, not {self.n}: resume with the same data")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._order_for(self.epoch)


class Loader:
    """Endless iterator of micro-batches on `device`; its position is part of every checkpoint.

    With `prefetch` > 0 a background thread reads (and on CUDA pins) that many batches ahead; the
    saved state is still the position after the last batch handed out, so resume stays exact.
    `prefetch=None`: 2 on CUDA, 0 (read in the caller's thread) elsewhere.
    """

    def __init__(self, dataset: IndexedDataset, sampler: ShardedSampler, device: torch.device,
                 prefetch: int | None = None) -> None:
        self.dataset, self.sampler, self.device = dataset, sampler, device
        self._pin = device.type == "cuda"
        self.prefetch = (2 if self._pin else 0) if prefetch is None else max(0, int(prefetch))
        self._worker: _Prefetcher | None = None
        self._state: dict[str, int] = sampler.state_dict()  # after the last consumed batch

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.to_device(self.next_host())

    def next_host(self) -> Batch:
        """The next micro-batch in host memory (pinned on CUDA): what can be counted without a device sync."""
        if self.prefetch > 0:
            if self._worker is None:
                self._worker = _Prefetcher(self.dataset, self.sampler, self._pin, self.prefetch)
                weakref.finalize(self, self._worker.stop)
            batch, self._state = self._worker.get()
        else:
            batch = self.dataset.get(self.sampler.next_indices())
            if self._pin:
                batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def to_device(self, batch: Batch) -> Batch:
        """A host batch copied to the loader's device (asynchronously from pinned memory)."""
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state) if self._worker is not None else self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.sampler.load_state_dict(state)
        self._state = self.sampler.state_dict()

    def close(self) -> None:
        """Stop the read-ahead thread; the sampler is rewound to the consumed position."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
            self.sampler.load_state_dict(self._state)


class _Prefetcher:
    """A daemon thread filling a bounded queue with (batch, sampler state after it)."""

    def __init__(self, dataset: IndexedDataset, sampler: ShardedSampler, pin: bool, depth: int) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_prefetch_loop, args=(dataset, sampler, pin, self._q, self._stop),
                                        daemon=True, name="llmtrain-prefetch")
        self._thread.start()

    def get(self) -> tuple[Batch, dict[str, int]]:
        batch, state = self._q.get()
        if isinstance(batch, BaseException):
            raise batch
        return batch, state

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _prefetch_loop(dataset: IndexedDataset, sampler: ShardedSampler, pin: bool, q: queue.Queue,
                   stop: threading.Event) -> None:
    """Holds no reference to the Loader, so a dropped loader stops its thread (weakref.finalize)."""
    try:
        while not stop.is_set():
            batch = dataset.get(sampler.next_indices())
            if pin:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            item = (batch, sampler.state_dict())
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
    except BaseException as e:  # surfaced by the consumer's next get()
        q.put((e, None))


class DataModule(ABC):
    """Builds the dataset once; hands out loaders for the train and val splits."""

    info: DataInfo

    @abstractmethod
    def split(self, name: str) -> IndexedDataset:
        """The 'train' or 'val' dataset."""

    def loader(self, split: str, batch_size: int, *, seed: int, shuffle: bool, rank: int, world_size: int,
               device: torch.device, prefetch: int | None = None) -> Loader:
        """A resumable loader over this rank's share of `split` (see ShardedSampler, Loader)."""
        from llmtrain.errors import ConfigError

        if prefetch is None:  # the data config's read-ahead (data.prefetch) when it has one
            prefetch = getattr(getattr(self, "cfg", None), "prefetch", None)
        ds = self.split(split)
        if batch_size * world_size > len(ds):
            raise ConfigError("trainer.micro_batch_size", f"one global micro-batch takes {batch_size}x{world_size} "
                                                          f"items but the {split} split has only {len(ds)}; lower "
                                                          "trainer.micro_batch_size or use more data")
        sampler = ShardedSampler(len(ds), batch_size, seed=seed, shuffle=shuffle, rank=rank,
                                 world_size=world_size)
        return Loader(ds, sampler, device, prefetch=prefetch)


DATA = Registry("data", "kind", "llmtrain.data", "register_data")
DataModuleT = TypeVar("DataModuleT", bound=DataModule)


def register_data(name: str, *, config: type, task: str,
                  presets: Presets) -> Callable[[type[DataModuleT]], type[DataModuleT]]:
    """Class decorator: register a DataModule as data kind `name` (cfg.data.kind), with its schema (`config`, a
    dataclass whose `kind` defaults to `name`), its task (what its DataInfo.task says) and its YAML presets (see
    llmtrain.registry). The class is built as `cls(cfg, dist=..., model_tokenizer=...)`."""

    def deco(cls: type[DataModuleT]) -> type[DataModuleT]:
        DATA.add(name, cls, config=config, task=task, presets=presets, module=cls.__module__)
        return cls

    return deco


def build_data(cfg: Any, *, dist: Dist | None = None, model_tokenizer: str | None = None) -> DataModule:
    """Build the DataModule named by cfg.kind. `dist`: rank 0 prepares files first, the others wait for it.
    `model_tokenizer`: the tokenizer the model brings (a local dir: its pretrained one), for data that has none
    of its own; the data never sees the model's config."""
    from llmtrain.errors import ConfigError

    entry = DATA.get(cfg.kind)
    data = entry.target(cfg, dist=dist or Dist(), model_tokenizer=model_tokenizer)
    if data.info.task != entry.task:
        raise ConfigError("data.kind", f"data kind {cfg.kind!r} is registered with task {entry.task!r} but its "
                                       f"DataInfo says {data.info.task!r} ({entry.module})")
    return data

"""Data modules: registry, resumable rank-sharded loaders, text/synthetic/image datasets."""

from llmtrain.data.base import DataModule, IndexedDataset, Loader, ShardedSampler, build_data, register_data

__all__ = ["DataModule", "IndexedDataset", "Loader", "ShardedSampler", "build_data", "register_data"]

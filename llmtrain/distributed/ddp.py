"""DistributedDataParallel: replicas on every rank, gradients all-reduced (averaged) on the last micro-step."""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from llmtrain.distributed.single import SingleStrategy


class DDPStrategy(SingleStrategy):
    """SingleStrategy's precision and checkpoints, plus DDP's gradient all-reduce."""

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # gradient_as_bucket_view: the gradients are views into the all-reduce buckets, not a second copy
        return DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=self.cfg.bucket_cap_mb,
                                       find_unused_parameters=self.cfg.find_unused_parameters,
                                       gradient_as_bucket_view=True)

    def micro_step(self, sync_grads: bool) -> contextlib.AbstractContextManager:
        if sync_grads or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

"""Benchmarks while training (`trainer.bench_every`, `trainer.bench_tasks`): multiple-choice tasks (local JSONL
files in HellaSwag's format, generation/choice.py; or lm-eval's multiple-choice tasks by name or task YAML, their
items built as lm-eval builds its requests: lm_eval_adapter.task_items) scored on the weights being trained, under
any strategy.

Every rank takes its data-parallel share of each task's items (`Strategy.data_shard`: the ranks of a
tensor-parallel group take the same ones) and runs one forward of the strategy's own model per item — all the
item's endings as rows, right-padded to a multiple of strategy.tp — so FSDP's and ZeRO-3's gathers and tensor
parallelism's collectives run as in evaluation; a rank whose share is shorter scores a filler item it does not
count, so every rank makes the same number of forwards. The counts are summed over the ranks (a tensor-parallel
group counts its items tp times, in the numerator and the denominator alike). Logged as
`bench/<task>/acc` and `bench/<task>/acc_norm` beside the loss (metrics.jsonl, TensorBoard, wandb).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmtrain.distributed.dist import share_rounds
from llmtrain.generation.choice import DELIMITER, choose, encode_pair, likelihoods, padded_rows, read_items

if TYPE_CHECKING:
    from llmtrain.context import RunContext
    from llmtrain.distributed.base import Strategy


def task_name(path: str) -> str:
    """A local task's name in the metrics: its file name without .jsonl."""
    return Path(path).name.removesuffix(".jsonl")


def load_tasks(specs: list[str], limit: int) -> dict[str, list[dict[str, Any]]]:
    """{name: its first `limit` items (0: all)} of each trainer.bench_tasks entry: a local .jsonl, or an lm-eval task
    (a name, a task YAML; a group gives each of its tasks); one-line ConfigError("trainer.bench_tasks")."""
    out: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        if spec.endswith(".jsonl"):
            items = read_items(Path(spec).expanduser(), "trainer.bench_tasks")
            out[task_name(spec)] = items[:limit] if limit > 0 else items
        else:
            from llmtrain.generation.lm_eval_adapter import task_items

            out.update(task_items(spec, limit))
    return out


class TrainingBench:
    def __init__(self, ctx: RunContext, strategy: Strategy) -> None:
        self.ctx, self.strategy = ctx, strategy
        t = ctx.cfg.trainer
        self.every = t.bench_every
        self.tasks = load_tasks(list(t.bench_tasks), t.bench_limit) if self.enabled else {}

    @property
    def enabled(self) -> bool:
        t = self.ctx.cfg.trainer
        return t.bench_every > 0 and bool(t.bench_tasks) and self.ctx.data.info.task == "lm"

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def __call__(self, step: int) -> dict[str, float]:
        """Score every task on the current weights (a collective: every rank calls it); the metrics."""
        s = self.strategy
        s.model.eval()
        try:
            out: dict[str, float] = {}
            for name, items in self.tasks.items():
                acc, acc_norm, n = self._score(items)
                out[f"bench/{name}/acc"], out[f"bench/{name}/acc_norm"] = acc / n, acc_norm / n
        finally:
            s.model.train()
        return out

    def _score(self, items: list[dict[str, Any]]) -> tuple[float, float, float]:
        """(items right, right after length normalisation, items) summed over the ranks."""
        ctx, s = self.ctx, self.strategy
        index, count = s.data_shard()
        tok, device = ctx.data.info.tokenizer, ctx.device
        tp = max(1, ctx.cfg.strategy.tp)
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for take in share_rounds(len(items), index, count):
            item = items[take[0]] if take else items[0]  # a filler: the same number of forwards everywhere
            pairs = [encode_pair(tok, item["context"], item.get("delimiter", DELIMITER) + e) for e in item["endings"]]
            ids, tgt = padded_rows(pairs, ctx.spec.context_length(ctx.cfg.model) or 1 << 30, device, tp)
            with torch.no_grad(), s.autocast():
                out = s.model(input_ids=ids)
            if take:
                a, a_norm = choose(item, [ll for ll, _ in likelihoods(getattr(out, "logits", out), tgt)])
                sums += torch.tensor([a, a_norm, 1], dtype=torch.float64, device=device)
        acc, acc_norm, n = ctx.dist.all_reduce(sums).tolist()
        return acc, acc_norm, n


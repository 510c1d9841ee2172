"""Training objectives: the language-model loss (`trainer.objective=lm`) and DPO (`trainer.objective=dpo`).

The trainer asks its objective for a micro-batch's (loss sum, count), the count of a host batch and the sums of an
evaluation batch; the LM objective hands these to the model spec. DPO (Rafailov et al. 2023; the sigmoid loss of
TRL's DPOTrainer, equal to it for ε = 0 (tests/unit/test_dpo_trl.py); ε > 0 is conservative DPO's label smoothing,
which TRL 1.16's sigmoid loss does not apply) reads preference batches (llmtrain/data/preference.py:
B chosen rows, then B rejected rows) and per pair takes the summed log-probabilities of the response tokens under
the policy (π) and a frozen reference (ref):

    z = β·((π_c − π_r) − (ref_c − ref_r)),   loss = −(1−ε)·logσ(z) − ε·logσ(−z)

summed over the pairs and divided by the global pair count, as the LM loss is by the global target count. The
reference is the model with its LoRA adapters disabled, or else (full fine-tuning) a frozen copy of the model as
the run built it, taken before the strategy wraps it (and before any resume: `reference_copy`) and placed by the
strategy as the model is (`Strategy.shard_frozen`): whole on every rank under single, ddp and DeepSpeed ZeRO 1/2,
sharded under fsdp (fully_shard on the same mesh) and ZeRO-3 (an engine of its own, without an optimizer). Not
under tensor parallelism, nor strategy=auto (its memory estimates leave the reference out).

`trainer.dpo_reference=precomputed` keeps no reference: before training (and before any resume) the model as
the run built it scores every train and val pair once, each data-parallel rank its share (`prepare`), and the
step looks each pair's reference log-probs up by its number (the batch's `pair_index`).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.datainfo import IGNORE_INDEX, Batch
from llmtrain.distributed.dist import share_rounds
from llmtrain.errors import require

OBJECTIVES = ("lm", "dpo")
REFERENCES = ("model", "precomputed")


def check(cfg: Any) -> None:
    """One-line refusals of trainer.objective and its keys against the model, data and strategy."""
    from llmtrain.models.base import MODELS

    t, kind = cfg.trainer, cfg.data.kind
    require(t.objective in OBJECTIVES, "trainer.objective", f"must be one of {', '.join(OBJECTIVES)} "
                                                            f"(got {t.objective!r})")
    if t.objective == "lm":
        require(kind != "preference", "trainer.objective", "data=preference holds (chosen, rejected) pairs, which "
                                                           "train with trainer.objective=dpo; set it")
        return
    model = MODELS.get(cfg.model.family)
    require(model.task == "lm", "trainer.objective", f"dpo trains a language model, but model family "
                                                     f"{model.name!r} is a {model.task} model; use "
                                                     "trainer.objective=lm")
    require(kind == "preference", "trainer.objective", f"dpo reads preference pairs (data=preference), not "
                                                       f"data.kind={kind!r}")
    require(t.dpo_beta > 0, "trainer.dpo_beta", f"must be > 0 (got {t.dpo_beta})")
    require(0 <= t.dpo_label_smoothing < 0.5, "trainer.dpo_label_smoothing",
            f"must be in [0, 0.5) (got {t.dpo_label_smoothing})")
    require(t.dpo_reference in REFERENCES, "trainer.dpo_reference", f"must be one of {', '.join(REFERENCES)} "
                                                                    f"(got {t.dpo_reference!r})")
    st = cfg.strategy
    require(st.name.value != "auto", "trainer.objective", "dpo needs a named strategy (single, ddp, fsdp or "
                                                          "deepspeed): strategy=auto's estimates leave out the frozen "
                                                          "reference")
    require(st.tp == 1, "trainer.objective", "dpo does not run under tensor parallelism; set strategy.tp=1")


def reference_copy(cfg: Any, model: nn.Module) -> nn.Module | None:
    """DPO with full fine-tuning (trainer config `cfg`): a frozen copy of the plain `model`, before any strategy
    wraps or shards it, for build(); else None (LoRA: the reference is the model with its adapters disabled)."""
    if cfg.objective != "dpo" or _has_lora(model) or cfg.dpo_reference == "precomputed":
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


def build(cfg: Any, spec: Any, strategy: Any, reference: nn.Module | None = None) -> LMObjective | DPOObjective:
    """The objective of trainer config `cfg` for the model `strategy` trains; `reference`: reference_copy()'s,
    which the strategy places and shards as it does the model."""
    if cfg.objective == "dpo":
        frozen = strategy.shard_frozen(reference) if reference is not None else None
        return DPOObjective(strategy.unwrap(), cfg.dpo_beta, cfg.dpo_label_smoothing, frozen=frozen,
                            precomputed=cfg.dpo_reference == "precomputed")
    return LMObjective(spec)


def _has_lora(model: nn.Module) -> bool:
    return any(".lora_" in n for n, _ in model.named_parameters())


class LMObjective:
    """The model spec's own loss: summed over the targets, divided by their global count."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    def count(self, batch: Batch) -> int:
        return self.spec.count(batch)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.spec.loss(model, batch)

    def eval_batch(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return self.spec.eval_batch(model, batch)

    def prepare(self, strategy: Any, data: Any, batch_size: int, logger: Any) -> None:
        """Work before the first step (every rank, before any resume); none."""

    def reduce(self, dist: Any) -> torch.Tensor | None:
        """The step's extra sums, all-reduced (every rank, once per step); None: none."""
        return None

    def record(self, sums: torch.Tensor | None, count: int) -> dict[str, float]:
        """The step's extra metrics from reduce()'s sums and the global count."""
        return {}


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labels ([N, T], IGNORE_INDEX: none) under `model`: [N], fp32.
    A model's forward without labels gives its logits (llmtrain's families) or an output holding them
    (transformers')."""
    core = getattr(model, "module", model)  # DDP's wrapped module
    kwargs = {"use_cache": False} if getattr(getattr(core, "config", None), "use_cache", None) is not None else {}
    out = model(input_ids=input_ids, **kwargs)
    logits = getattr(out, "logits", out)  # [N, T, V]
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return -nll.view(labels.shape).sum(-1)


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float, smoothing: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: the loss, the chosen and the rejected rewards β·(π − ref); inputs [2B] = [chosen; rejected]."""
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    z = beta * ((pc - pr) - (rc - rr))
    losses = -(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The model's peft adapter layers pass their base layer's output alone (peft's disable_adapter() for a model
    whose adapters were injected in place: it is no PeftModel); restored on exit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True  # enable_adapters(False) would also flip requires_grad of the adapter weights
    try:
        yield
    finally:
        for m, was in zip(layers, before, strict=True):
            m._disable_adapters = was


class DPOObjective:
    """Direct preference optimisation against a frozen reference (see the module docstring)."""

    def __init__(self, model: nn.Module, beta: float, smoothing: float, frozen: nn.Module | None = None,
                 precomputed: bool = False) -> None:
        """`frozen`: full fine-tuning's reference as the strategy placed it (None: a copy of `model` now);
        `precomputed`: no reference model, the log-probs that `prepare` computes instead."""
        self.beta, self.smoothing = beta, smoothing
        self.lora = _has_lora(model)
        self.model = model  # the plain module: the reference forward passes no wrapper's hooks
        self.frozen: nn.Module | None = None
        self.precomputed = precomputed
        self.table: torch.Tensor | None = None  # precomputed: [pairs, 2] (chosen, rejected) reference log-probs
        if not self.lora and not precomputed:  # full fine-tuning: a copy of the starting weights
            self.frozen = frozen if frozen is not None else copy.deepcopy(model).eval().requires_grad_(False)
        self._sums: torch.Tensor | None = None  # chosen reward, rejected reward, correct: summed over a step

    def count(self, batch: Batch) -> int:
        """Pairs in a host batch (2 rows each)."""
        return int(batch["input_ids"].shape[0]) // 2

    @torch.no_grad()
    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """Summed log-probs of every row under the reference, in eval mode (no dropout): [2B]."""
        ids, labels = batch["input_ids"], batch["labels"]
        if self.precomputed:
            if self.table is None:
                raise RuntimeError("trainer.dpo_reference=precomputed: prepare() has not run")
            both = self.table[batch["pair_index"].to(self.table.device)]  # [B, 2]
            return torch.cat([both[:, 0], both[:, 1]])
        if self.frozen is not None:
            return sequence_logps(self.frozen, ids, labels)
        return self._starting_logps(self.model, batch)

    def _starting_logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """`model`'s log-probs in eval mode, LoRA's adapters off: the starting model's, whatever has trained."""
        was = model.training
        model.eval()
        try:
            with adapters_disabled(self.model):
                return sequence_logps(model, batch["input_ids"], batch["labels"])
        finally:
            model.train(was)

    @torch.no_grad()
    def prepare(self, strategy: Any, data: Any, batch_size: int, logger: Any) -> None:
        """precomputed: the reference log-probs of every train and val pair, from the model as the run built it
        (called before any resume), in the strategy's forward (sharded models gather as in evaluation). Each
        data-parallel rank scores its share; a rank with a shorter share scores an uncounted filler so every rank
        makes the same number of forwards; the table is summed over the ranks."""
        if not self.precomputed:
            return
        t0 = time.perf_counter()
        splits = [data.split("train"), data.split("val")]
        device = strategy.device
        table = torch.zeros(sum(len(ds) for ds in splits), 2, dtype=torch.float64, device=device)
        index, count = strategy.data_shard()
        for ds in splits:
            for take in share_rounds(len(ds), index, count, batch_size):
                batch = {k: v.to(device) for k, v in ds.get(np.array(take or [0])).items()}  # [] : a filler
                with strategy.autocast():
                    logps = self._starting_logps(strategy.model, batch).double()  # [2B]
                if take:
                    table[batch["pair_index"]] = torch.stack(logps.chunk(2), dim=-1)
        copies = strategy.dist.world_size // count  # ranks that share a data shard (tensor parallelism) sum alike
        table = strategy.dist.all_reduce(table) / copies
        self.table = table.float()
        logger.write(f"llmtrain: dpo: the reference's log-probs of {len(table):,} pairs precomputed in "
                     f"{time.perf_counter() - t0:.1f}s")

    def _terms(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ref = self.reference_logps(batch)
        policy = sequence_logps(model, batch["input_ids"], batch["labels"])
        return dpo_terms(policy, ref, self.beta, self.smoothing)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        losses, chosen, rejected = self._terms(model, batch)
        sums = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).sum()]).double()
        self._sums = sums if self._sums is None else self._sums + sums
        return losses.sum(), torch.tensor(losses.shape[0], device=losses.device)

    def eval_batch(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """eval_loss: the mean DPO loss; accuracy: the pairs whose chosen reward beats the rejected one."""
        losses, chosen, rejected = self._terms(model, batch)
        return {"loss": losses.sum(), "count": torch.tensor(float(losses.shape[0]), device=losses.device),
                "correct": (chosen > rejected).sum()}

    def reduce(self, dist: Any) -> torch.Tensor | None:
        sums, self._sums = self._sums, None
        if sums is not None:
            dist.all_reduce(sums)
        return sums

    def record(self, sums: torch.Tensor | None, count: int) -> dict[str, float]:
        if sums is None:
            return {}
        chosen, rejected, correct = (v / count for v in sums.tolist())
        return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                "rewards/accuracy": correct}

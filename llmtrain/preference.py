"""Training objectives: the language-model loss (`trainer.objective=lm`) and DPO (`trainer.objective=dpo`).

The trainer asks its objective for a micro-batch's (loss sum, count), the count of a host batch and the sums of an
evaluation batch; the LM objective hands these to the model spec. DPO (Rafailov et al. 2023; the sigmoid loss of
TRL's DPOTrainer, with conservative label smoothing ε) reads preference batches (llmtrain/data/preference.py:
B chosen rows, then B rejected rows) and per pair takes the summed log-probabilities of the response tokens under
the policy (π) and a frozen reference (ref):

    z = β·((π_c − π_r) − (ref_c − ref_r)),   loss = −(1−ε)·logσ(z) − ε·logσ(−z)

summed over the pairs and divided by the global pair count, as the LM loss is by the global target count. The
reference is the model with its LoRA adapters disabled, or else a frozen copy of the model as the run built it
(before any resume). Both run whole on every rank: strategy single or ddp only.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.datainfo import IGNORE_INDEX, Batch
from llmtrain.errors import require

OBJECTIVES = ("lm", "dpo")
DPO_STRATEGIES = ("single", "ddp")


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
    st = cfg.strategy
    require(st.name.value in DPO_STRATEGIES, "trainer.objective",
            f"dpo runs under strategy single or ddp, not {st.name.value}: its frozen reference model is not sharded "
            "by llmtrain's fsdp/deepspeed setups; use strategy=ddp (LoRA keeps the reference free)")
    require(st.tp == 1, "trainer.objective", "dpo does not run under tensor parallelism; set strategy.tp=1")


def build(cfg: Any, spec: Any, strategy: Any) -> LMObjective | DPOObjective:
    """The objective of trainer config `cfg` for the model `strategy` trains."""
    if cfg.objective == "dpo":
        return DPOObjective(strategy.unwrap(), cfg.dpo_beta, cfg.dpo_label_smoothing)
    return LMObjective(spec)


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

    def __init__(self, model: nn.Module, beta: float, smoothing: float) -> None:
        self.beta, self.smoothing = beta, smoothing
        self.lora = any(".lora_" in n for n, _ in model.named_parameters())
        self.model = model  # the plain module: the reference forward passes no wrapper's hooks
        self.frozen: nn.Module | None = None
        if not self.lora:  # full fine-tuning: a copy of the starting weights
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)
        self._sums: torch.Tensor | None = None  # chosen reward, rejected reward, correct: summed over a step

    def count(self, batch: Batch) -> int:
        """Pairs in a host batch (2 rows each)."""
        return int(batch["input_ids"].shape[0]) // 2

    @torch.no_grad()
    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """Summed log-probs of every row under the reference, in eval mode (no dropout): [2B]."""
        ids, labels = batch["input_ids"], batch["labels"]
        if self.frozen is not None:
            return sequence_logps(self.frozen, ids, labels)
        was = self.model.training
        self.model.eval()
        try:
            with adapters_disabled(self.model):
                return sequence_logps(self.model, ids, labels)
        finally:
            self.model.train(was)

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

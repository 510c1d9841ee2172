"""DPO against TRL: on the same tiny GPT-2, preference pairs and hyperparameters, llmtrain's DPO loss, gradients
and logged rewards equal those of TRL's own `DPOTrainer` for one step.

TRL is driven through its public path, not a copy of its formula: `DPOTrainer` tokenises the text pairs itself
(prompt + response + its EOS), its train dataloader and `DataCollatorForPreference` build the batch, and
`trainer.compute_loss` gives the loss whose `.backward()` fills the transformers model's gradients; the rewards are
the metrics `trainer.log` records. llmtrain reads the same pairs through `PreferenceDataModule` (byte tokenizer) and
runs `DPOObjective` on its native GPT-2 loaded with the same weights. The reference is the starting weights on both
sides; the policy has moved away from it (as after some steps), so the log-ratios, and the loss, are not trivial.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from llmtrain.data.preference import PreferenceDataConfig, PreferenceDataModule
from llmtrain.data.tokenizers import EOS, byte_tokenizer
from llmtrain.datainfo import IGNORE_INDEX
from llmtrain.models.gpt2_native import from_hf, from_hf_state, to_hf_state
from llmtrain.preference import DPOObjective

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.usefixtures("one_thread")
PAIRS = [("2+2=", "4", "5"), ("the sky is ", "blue", "green!"), ("", "no prompt", "none"),
         ("say hi: ", "hi", "hello there")]
BETA = 0.1
LOSS_RTOL = 1e-6  # measured: 0 (bitwise equal here; float32 sums in another order may differ in the last bits)
GRAD_RTOL = 5e-6  # per parameter, of its largest |grad|; measured: ≤ 5.1e-7
REWARD_ATOL = 1e-6  # measured: ≤ 7e-8


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE",
                 "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
                 "TORCHELASTIC_RUN_ID")


@pytest.fixture
def _environ_kept() -> Iterator[None]:
    """transformers' TrainingArguments and accelerate write to os.environ; put it back. Before: one process as
    accelerate sees it (no launcher variables, no accelerate state left by another test in this process), so
    TRL's trainer never starts a process group of its own."""
    from accelerate.state import AcceleratorState, PartialState

    before = dict(os.environ)
    for k in [*LAUNCHER_VARS, *(k for k in os.environ if k.startswith("ACCELERATE_"))]:
        os.environ.pop(k, None)
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    os.environ.clear()
    os.environ.update(before)


def gpt2_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny random transformers GPT-2 on the byte vocabulary (the reference: its starting weights) and a policy
    moved away from it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    start = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=256, eos_token_id=256, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0))
    policy = copy.deepcopy(start)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return start, policy


def trl_step(tmp_path: Path, start: torch.nn.Module, policy: torch.nn.Module, label_smoothing: float
             ) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """TRL's loss, its collated batch, the policy's gradients and the logged metrics of one step on PAIRS."""
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer().backend_tokenizer, eos_token=EOS, pad_token=EOS)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, loss_type="sigmoid",
                         label_smoothing=label_smoothing, learning_rate=0.0, per_device_train_batch_size=len(PAIRS),
                         max_steps=1, max_length=None, train_sampling_strategy="sequential", bf16=False,
                         use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
    data = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    trainer = trl.DPOTrainer(model=policy, ref_model=copy.deepcopy(start), args=args, processing_class=tok,
                             train_dataset=data)
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    trainer.log({})
    grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    return float(loss.detach()), inputs, grads, trainer.state.log_history[-1]


def llmtrain_step(tmp_path: Path, start: torch.nn.Module, policy_state: dict[str, torch.Tensor]
                  ) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """llmtrain's loss, batch, gradients (in transformers' names and layout) and rewards on PAIRS."""
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    ds = PreferenceDataModule(PreferenceDataConfig(source=str(src), val_source=str(src), tokenizer="byte",
                                                   seq_len=64)).split("train")
    batch = ds.get(np.arange(len(ds)))
    model = from_hf(start.config.to_dict(), {k: v.clone() for k, v in start.state_dict().items()})
    objective = DPOObjective(model, BETA, 0.0)  # the reference: a frozen copy of the starting weights
    model.load_state_dict(from_hf_state(policy_state, model.dims))
    model.train()
    loss_sum, count = objective.loss(model, batch)
    loss = loss_sum / count
    loss.backward()
    grads = to_hf_state({n: p.grad for n, p in model.named_parameters()}, model.dims.vocab_size)
    rec = objective.record(objective.reduce(type("D", (), {"all_reduce": staticmethod(lambda t: t)})()),
                           int(count))
    return float(loss.detach()), batch, grads, rec


@pytest.mark.usefixtures("_environ_kept")
@pytest.mark.parametrize("trl_label_smoothing", [0.0, 0.2], ids=["plain", "trl-smoothing-ignored"])
def test_dpo_loss_gradients_and_rewards_equal_trl_dpotrainer(tmp_path: Path, trl_label_smoothing: float) -> None:
    """llmtrain's smoothing=0 DPO is TRL's loss_type=sigmoid. TRL 1.16's sigmoid loss ignores
    DPOConfig.label_smoothing (only robust, exo_pair and aot read it), so label_smoothing=0.2 there changes
    nothing: the second case pins that, since llmtrain's smoothing ε has no TRL sigmoid counterpart to match."""
    start, policy = gpt2_pair()
    policy_state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    trl_loss, inputs, trl_grads, logged = trl_step(tmp_path, start, policy, trl_label_smoothing)
    loss, batch, grads, rec = llmtrain_step(tmp_path, start, policy_state)

    # the same tokens and targets: prompt + response + EOS, scored on the response and EOS
    trl_ids = inputs["input_ids"]
    trl_labels = trl_ids[:, 1:].masked_fill(inputs["completion_mask"][:, 1:] == 0, IGNORE_INDEX)
    assert torch.equal(trl_ids[:, :-1], batch["input_ids"]), "TRL and llmtrain tokenised the pairs differently"
    assert torch.equal(trl_labels, batch["labels"]), "TRL and llmtrain score different tokens"

    rel = abs(loss - trl_loss) / abs(trl_loss)
    assert set(grads) == set(trl_grads)
    worst = max((float((grads[n] - g).abs().max()) / float(g.abs().max()), n) for n, g in trl_grads.items())
    print(f"DPO loss llmtrain {loss:.9f} vs TRL {trl_loss:.9f} (rel {rel:.1e}); worst gradient "
          f"max|diff|/max|grad| {worst[0]:.1e} ({worst[1]})")
    assert abs(trl_loss - 0.6931472) > 1e-3  # the policy is not its reference: log-ratios differ from 0
    assert rel < LOSS_RTOL, f"loss {loss} vs TRL {trl_loss}"
    assert worst[0] < GRAD_RTOL, f"gradient of {worst[1]}: max|diff|/max|grad| {worst[0]:.2e}"
    for ours, theirs in (("rewards/chosen",) * 2, ("rewards/rejected",) * 2, ("rewards/margins",) * 2,
                         ("rewards/accuracy", "rewards/accuracies")):
        assert abs(rec[ours] - logged[theirs]) < REWARD_ATOL, f"{ours}: {rec[ours]} vs TRL {logged[theirs]}"

"""The native GPT-2 against transformers' on the same weights: logits, loss and gradients (fp32, rel 1e-5), the
Hugging Face format both ways, the padded vocabulary kept out of the loss and the logits, the chunked loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmtrain.models import gpt2_native as native
from llmtrain.models.gpt2_native import GPT2, from_hf_state, load_hf, save_hf

VOCAB = 257  # padded to 320


@pytest.fixture(scope="module")
def pair():
    """A random transformers GPT-2 and the native one holding its weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=3, n_head=4,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    d = native.dims_from_hf_config(hf.config.to_dict())
    ours = GPT2(d).eval()
    ours.load_state_dict(from_hf_state(hf.state_dict(), d))
    return hf, ours


def _batch(n: int = 3, t: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, t), generator=g)
    labels = torch.randint(0, VOCAB, (n, t), generator=g)
    labels[0, 10:] = -100  # padding: no target there
    return ids, labels


def test_logits_and_loss_equal_transformers(pair) -> None:
    hf, ours = pair
    ids, labels = _batch()
    with torch.no_grad():
        want = hf(ids).logits  # [B, T, V]
        got = ours(ids)
        loss, count = ours(ids, labels=labels)
    assert got.shape == want.shape == (3, 40, VOCAB)  # the padded vocabulary never reaches the logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ref = F.cross_entropy(want.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    assert int(count) == int((labels != -100).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)


def test_gradients_equal_transformers(pair) -> None:
    hf, ours = pair
    ids, labels = _batch()
    hf.zero_grad()
    ours.zero_grad()
    logits = hf(ids).logits
    F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").backward()
    loss, _ = ours(ids, labels=labels)
    loss.backward()
    hp, op = dict(hf.named_parameters()), dict(ours.named_parameters())
    for name in ("transformer.h.1.attn.c_attn.weight", "transformer.h.2.mlp.c_proj.weight", "transformer.ln_f.weight",
                 "transformer.wpe.weight"):
        want = hp[name].grad.t() if name.endswith(native._CONV1D) else hp[name].grad  # Conv1D stores [in, out]
        torch.testing.assert_close(op[name].grad, want, rtol=1e-4, atol=1e-5, msg=name)
    wte = op["transformer.wte.weight"].grad  # the tied embedding / head, padded rows untouched
    torch.testing.assert_close(wte[:VOCAB], hp["transformer.wte.weight"].grad, rtol=1e-4, atol=1e-5)
    assert not wte[VOCAB:].any()


def test_hugging_face_format_both_ways(pair, tmp_path: Path) -> None:
    """save_hf writes what GPT2LMHeadModel.from_pretrained loads (same logits, tied head); load_hf reads it back."""
    from transformers import GPT2LMHeadModel

    hf, ours = pair
    save_hf(ours, tmp_path / "out")
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()
    ids, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=0)
        again = load_hf(tmp_path / "out").eval()
        torch.testing.assert_close(again(ids), ours(ids), rtol=0, atol=0)
    assert again.lm_head.weight is again.transformer.wte.weight


def test_padded_vocabulary_rows_never_count(pair) -> None:
    """Whatever the padded rows of the tied embedding hold, loss and logits are those of the real vocabulary."""
    _, ours = pair
    ids, labels = _batch()
    model = GPT2(ours.dims)
    model.load_state_dict(ours.state_dict())
    with torch.no_grad():
        before = model(ids, labels=labels)[0]
        model.transformer.wte.weight[VOCAB:] = 50.0  # would win every softmax if it were not masked
        after = model(ids, labels=labels)[0]
        assert model(ids).shape[-1] == VOCAB
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_chunked_loss_equals_one_chunk(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss and gradients computed chunk by chunk (without the whole fp32 logits) equal one chunk's."""
    _, ours = pair
    ids, labels = _batch()
    h = ours.hidden(ids).detach().flatten(0, 1).requires_grad_()
    w = ours.transformer.wte.weight.detach().clone().requires_grad_()
    whole, _ = native.linear_cross_entropy(h, w, labels.flatten(), VOCAB)
    gh, gw = torch.autograd.grad(whole, (h, w))
    monkeypatch.setattr(native, "_chunk_rows", lambda vocab: 7)  # 120 rows in 18 chunks
    part, _ = native.linear_cross_entropy(h, w, labels.flatten(), VOCAB)
    ph, pw = torch.autograd.grad(part, (h, w))
    torch.testing.assert_close(part, whole, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ph, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pw, gw, rtol=1e-5, atol=1e-6)

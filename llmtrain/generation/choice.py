"""Multiple-choice scoring with a causal LM (models/protocol.py), as lm-evaluation-harness scores it.

A task is a local JSONL of HellaSwag-format items, one a line:

    {"context": "A man is sitting on a roof. He", "endings": ["starts pulling up roofing.", "..."], "label": 0}

Each ending is scored as lm-eval scores a choice: the continuation is " " + ending (lm-eval's default
target_delimiter; whitespace that ends the context moves to the continuation), its tokens are those of the
whole text after the context's own tokens, and its log-likelihood is the sum over those tokens given the context
(the context's positions labelled IGNORE_INDEX). `acc`: the ending of highest log-likelihood is the label;
`acc_norm`: the same after dividing each log-likelihood by the ending's length in characters (lm-eval's acc_norm:
`len(choice)`, the ending without the delimiter). All endings of an item go through one batched forward.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtrain.datainfo import IGNORE_INDEX
from llmtrain.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from llmtrain.models.protocol import CausalLM
    from llmtrain.precision import Precision

DELIMITER = " "  # lm-eval's default target_delimiter between the context and a choice


def read_items(path: Path, key: str = "tasks") -> list[dict[str, Any]]:
    """The items of a JSONL task file, each checked: a str context, a non-empty list of str endings, an int label
    indexing them; one-line ConfigError(key) naming the line otherwise."""
    if not path.is_file():
        raise ConfigError(key, f"{path} is not a file")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(key, f"{path}:{n}: not JSON ({e.msg})") from None
        where = f"{path}:{n}"
        if not isinstance(item, dict):
            raise ConfigError(key, f"{where}: an item is an object with context, endings and label")
        missing = [f for f in ("context", "endings", "label") if f not in item]
        if missing:
            raise ConfigError(key, f"{where}: the item has no {', '.join(missing)} (an item is "
                                   '{"context": str, "endings": [str, ...], "label": int})')
        endings, label = item["endings"], item["label"]
        if not isinstance(item["context"], str):
            raise ConfigError(key, f"{where}: context must be a string")
        if not isinstance(endings, list) or not endings or not all(isinstance(e, str) and e for e in endings):
            raise ConfigError(key, f"{where}: endings must be a non-empty list of non-empty strings")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
            raise ConfigError(key, f"{where}: label must be an int in [0, {len(endings)}) (got {label!r})")
        items.append(item)
    if not items:
        raise ConfigError(key, f"{path} holds no items")
    return items


def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's HFLM splits them: trailing whitespace of the context
    moves to the continuation; the continuation's tokens are the whole text's beyond the context's; an empty
    context is the EOS token (lm-eval's prefix token)."""
    eos = tok.eos_token_id
    if context == "":
        return [eos], tok.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


def score_pairs(lm: CausalLM, pairs: Sequence[tuple[list[int], list[int]]], precision: Precision,
                device: torch.device) -> list[tuple[float, bool]]:
    """(log-likelihood of the continuation given the context, whether it is the greedy continuation) for each
    (context tokens, continuation tokens) pair, in ONE forward of the right-padded rows. A row longer than the
    model's context keeps its last max_positions + 1 tokens (lm-eval's left truncation)."""
    import torch

    from llmtrain.precision import autocast

    ids, tgt = padded_rows(pairs, lm.max_positions, device)
    with torch.no_grad(), autocast(precision, device):
        logits = lm.logits(ids)
    return likelihoods(logits, tgt)


def padded_rows(pairs: Sequence[tuple[list[int], list[int]]], max_positions: int, device: torch.device,
                multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids [B, T], targets [B, T]: the continuation's tokens, IGNORE_INDEX elsewhere) of the pairs, right
    padded to a width that is a multiple of `multiple` (a sequence split over tensor-parallel ranks)."""
    import torch

    rows, labels = [], []
    for ctx, cont in pairs:
        if not cont:
            raise ConfigError("tasks", "a choice encodes to no tokens")
        whole = (list(ctx) + list(cont))[-(max_positions + 1):]
        rows.append(whole[:-1])
        n_cont = min(len(cont), len(whole) - 1)
        labels.append([IGNORE_INDEX] * (len(whole) - 1 - n_cont) + whole[-n_cont:])
    width = -(-max(map(len, rows)) // multiple) * multiple
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)  # right padding: never seen
    tgt = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels], device=device)
    return ids, tgt


def likelihoods(logits: torch.Tensor, tgt: torch.Tensor) -> list[tuple[float, bool]]:
    """Per row: (the targets' summed log-likelihood, whether every target is the argmax) from logits [B, T, V]."""
    import torch

    logits = logits.float()
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE_INDEX,
                                               reduction="none").view(tgt.shape)
    keep = tgt != IGNORE_INDEX
    greedy = ((logits.argmax(-1) == tgt) | ~keep).all(-1)
    lls = (-losses.double() * keep).sum(-1)
    return [(float(ll), bool(g)) for ll, g in zip(lls.tolist(), greedy.tolist(), strict=True)]


def choose(item: dict[str, Any], lls: Sequence[float]) -> tuple[bool, bool]:
    """(acc, acc_norm) of one item from its endings' log-likelihoods."""
    norm = [ll / len(e) for ll, e in zip(lls, item["endings"], strict=True)]
    return _argmax(lls) == item["label"], _argmax(norm) == item["label"]


def score_items(lm: CausalLM, tok: Any, items: Sequence[dict[str, Any]], precision: Precision,
                device: torch.device) -> dict[str, Any]:
    """{"acc", "acc_norm", "n"} of `items` (see the module docstring); one forward per item."""
    acc = acc_norm = 0
    for item in items:
        pairs = [encode_pair(tok, item["context"], DELIMITER + e) for e in item["endings"]]
        a, a_norm = choose(item, [ll for ll, _ in score_pairs(lm, pairs, precision, device)])
        acc += a
        acc_norm += a_norm
    n = len(items)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


def _argmax(xs: Sequence[float]) -> int:
    """The first index of the largest value (numpy's argmax, as lm-eval uses)."""
    return max(range(len(xs)), key=lambda i: (xs[i], -i))

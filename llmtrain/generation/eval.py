"""`llmtrain-eval`: mean loss and perplexity of a causal LM (models/protocol.py: its `nll`) on text.

    llmtrain-eval source=runs/gpt2_tiny/final data.source=corpus.txt
    llmtrain-eval source=gpt2 data.source=data/corpus-gpt2 split=val batch_size=16

The data is tokenised with the source's own tokenizer (a prepared dir must have been prepared with it) and
read as `data.seq_len` blocks of its `split`, in order; on the same blocks the loss equals the trainer's
eval loss. One line on stdout: `eval_loss=… perplexity=… tokens=… blocks=…`; the rest goes to stderr.

With `tasks=` it runs benchmarks instead (docs/evaluate.md), comma-separated:

    llmtrain-eval source=runs/x tasks=my_items.jsonl          # built-in multiple-choice scorer (choice.py)
    llmtrain-eval source=runs/x tasks=hellaswag limit=200     # lm-evaluation-harness (lm_eval_adapter.py)

A table on stdout; `eval/<task>.json` in the run dir when the source is one.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from llmtrain.cli import user_errors_exit
from llmtrain.config import check_known_keys, conf_dir, register_configs
from llmtrain.device import check_device, pick_device
from llmtrain.errors import ConfigError, require

if TYPE_CHECKING:
    import torch

    from llmtrain.models.protocol import CausalLM
    from llmtrain.precision import Precision


@dataclass
class EvalConfig:
    """The root of `conf/eval.yaml`: a source model and the text data group."""

    source: str = MISSING  # run dir | exported / Hugging Face GPT-2 dir | hub name
    data: Any = MISSING
    split: str = "val"  # val | train
    batch_size: int = 8
    batches: int = 0  # 0: every block of the split
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast) | auto
    device: str = "auto"
    tasks: str = ""  # comma-separated: a local .jsonl (built-in multiple choice) or an lm-eval task name
    limit: int = 0  # 0: every item; else the first `limit` items of each task
    num_fewshot: int = 0  # lm-eval tasks only


def tokenizer_dir(source: str) -> Path:
    """Where the source's tokenizer lives (a dir data preparation can take as data.tokenizer)."""
    from llmtrain.generation.sources import final_export, is_run

    path = Path(source).expanduser()
    if is_run(path):
        if (final := final_export(path)) is not None:
            return final
        from llmtrain.data.base import build_data
        from llmtrain.models.base import get_model_spec
        from llmtrain.rundir import read_config

        run_cfg = read_config(path, "source")
        info = build_data(run_cfg.data, model_tokenizer=get_model_spec(run_cfg.model.family).tokenizer_source(
            run_cfg.model)).info
        if info.prepared_dir is None:
            raise ConfigError("source", f"{path} trains on {run_cfg.data.kind} data, not on prepared text")
        return Path(info.prepared_dir) / "tokenizer"
    from llmtrain.hub import hf_model_dir

    return hf_model_dir(source, "source")


def score(lm: CausalLM, ds: Any, blocks: int, batch_size: int, precision: Precision, device: torch.device
          ) -> tuple[float, int]:
    """(mean loss per target, number of targets) of the causal LM `lm` over blocks 0 .. blocks - 1 of `ds`
    (its `get(indices)` → input_ids, labels [B, T]), in batches of `batch_size`, sums in fp64."""
    import torch

    from llmtrain.precision import autocast

    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, blocks, batch_size):
            batch = ds.get(np.arange(start, min(start + batch_size, blocks)))
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(precision, device):
                loss_sum, count = lm.nll(batch["input_ids"], batch["labels"])
            total += torch.stack([loss_sum.double(), count.double()])
    return (total[0] / total[1]).item(), int(total[1].item())


@user_errors_exit
def run(cfg: DictConfig) -> dict[str, Any]:
    from llmtrain.data.base import build_data
    from llmtrain.data.tokenizers import tokenizer_hash
    from llmtrain.generation.sources import load_source
    from llmtrain.precision import resolve

    check_known_keys(cfg)  # a misspelt `+key=value`
    if cfg.get("tasks"):
        return run_tasks(cfg)
    require(cfg.data.kind == "text", "data", f"evaluates text data (got data.kind={cfg.data.kind!r})")
    require(cfg.split in ("val", "train"), "split", f"must be val or train (got {cfg.split!r})")
    require(cfg.batch_size > 0, "batch_size", f"must be > 0 (got {cfg.batch_size})")
    require(cfg.batches >= 0, "batches", f"must be >= 0, 0 for all (got {cfg.batches})")
    check_device(cfg.device)
    device = pick_device(cfg.device)
    precision = resolve(cfg.precision, device)  # auto: bf16 on GPUs that have it (else fp16), fp32 on CPU
    lm, tok = load_source(cfg.source)  # a causal LM (models/protocol.py)
    data_cfg = cfg.data.copy()
    data_cfg.tokenizer = str(tokenizer_dir(cfg.source))
    data = build_data(data_cfg)
    if tokenizer_hash(data.info.tokenizer) != tokenizer_hash(tok):
        raise ConfigError("data.source", f"{data_cfg.source} was prepared with another tokenizer than "
                                         f"{cfg.source}'s; give the raw text or re-prepare it with that tokenizer")
    require(data.info.needed_vocab <= lm.vocab_size, "data.source",
            f"token ids reach {data.info.needed_vocab - 1}, beyond the model's vocabulary")
    require(data_cfg.seq_len <= lm.max_positions, "data.seq_len",
            f"{data_cfg.seq_len} exceeds the model's context of {lm.max_positions}")
    lm = lm.to(device).eval()
    ds = data.split(cfg.split)  # every block in order, the last batch as full as the split allows
    blocks = len(ds) if cfg.batches == 0 else min(cfg.batches * cfg.batch_size, len(ds))
    t0 = time.perf_counter()
    mean, tokens = score(lm, ds, blocks, cfg.batch_size, precision, device)
    out = {"eval_loss": mean, "perplexity": math.exp(mean), "tokens": tokens, "blocks": blocks}
    n = -(-blocks // cfg.batch_size)
    print(f"llmtrain: {cfg.split} split of {data.dir}: {blocks} blocks of {data_cfg.seq_len} tokens in {n} "
          f"batch{'es' if n != 1 else ''} of up to {cfg.batch_size} in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()), flush=True)
    return out


def run_tasks(cfg: DictConfig) -> dict[str, Any]:
    """Each of `cfg.tasks`: a local .jsonl through the built-in scorer, any other name through lm-eval; a table
    on stdout, and eval/<task>.json in the run dir when the source is one."""
    import json

    from llmtrain.generation.sources import is_run, load_source
    from llmtrain.precision import resolve

    names = [t.strip() for t in str(cfg.tasks).split(",") if t.strip()]
    require(bool(names), "tasks", "give a .jsonl path or an lm-eval task name")
    require(cfg.limit >= 0, "limit", f"must be >= 0, 0 for all (got {cfg.limit})")
    require(cfg.num_fewshot >= 0, "num_fewshot", f"must be >= 0 (got {cfg.num_fewshot})")
    require(cfg.batch_size > 0, "batch_size", f"must be > 0 (got {cfg.batch_size})")
    local = {n: Path(n).expanduser() for n in names if n.endswith(".jsonl")}
    if cfg.num_fewshot and local:
        raise ConfigError("num_fewshot", "applies to lm-eval tasks only, not to a local .jsonl")
    items = {}
    for n, path in local.items():  # checked before the model loads: a bad file fails at once
        from llmtrain.generation.choice import read_items

        items[n] = read_items(path)[:cfg.limit or None]
    check_device(cfg.device)
    device = pick_device(cfg.device)
    precision = resolve(cfg.precision, device)
    lm, tok = load_source(cfg.source)
    lm = lm.to(device).eval()
    results: dict[str, dict[str, Any]] = {}
    for n in names:
        t0 = time.perf_counter()
        if n in items:
            from llmtrain.generation.choice import score_items

            results[Path(n).stem] = score_items(lm, tok, items[n], precision, device)
        else:
            try:
                from llmtrain.generation import lm_eval_adapter
            except ImportError:
                raise ConfigError("tasks", f"{n!r} is an lm-eval task and lm-eval is not installed; "
                                           "pip install 'llmtrain[eval]' (or give a local .jsonl)") from None
            results.update(lm_eval_adapter.evaluate(lm, tok, n, device, precision, cfg.limit, cfg.num_fewshot,
                                                    cfg.batch_size))
        print(f"llmtrain: {n} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    print(_table(results), flush=True)
    run_dir = Path(cfg.source).expanduser()
    if is_run(run_dir):
        (run_dir / "eval").mkdir(exist_ok=True)
        for task, metrics in results.items():
            (run_dir / "eval" / f"{task}.json").write_text(json.dumps({"task": task, "source": cfg.source,
                                                                        "limit": cfg.limit, **metrics}, indent=1))
    return results


def _table(results: dict[str, dict[str, Any]]) -> str:
    """| task | metric | value | rows, one per metric."""
    rows = [("task", "metric", "value")]
    for task, metrics in results.items():
        rows += [(task, k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def register() -> None:
    register_configs()  # the data schemas
    ConfigStore.instance().store(name="base_eval", node=EvalConfig)


register()


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    from llmtrain.cli import run_app

    run_app(_hydra_main)


if __name__ == "__main__":
    main()

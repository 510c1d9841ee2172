"""lm-evaluation-harness on an llmtrain causal LM (models/protocol.py): `LlmtrainLM`, an `lm_eval.api.model.LM`.

    lm = LlmtrainLM(causal_lm, tokenizer)
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"], task_manager=TaskManager())

`loglikelihood` tokenises as lm-eval's HF model does (choice.encode_pair) and scores batches of requests with
llmtrain's own forward (choice.score_pairs); `loglikelihood_rolling` scores lm-eval's disjoint rolling windows;
`generate_until` decodes greedily (or samples, as gen_kwargs ask) through llmtrain's Generator.
lm-eval is an optional dependency (`pip install llmtrain[eval]`): only this module imports it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm_eval.api.model import LM

from llmtrain.errors import ConfigError
from llmtrain.generation.choice import encode_pair, score_pairs

if TYPE_CHECKING:
    import torch

    from llmtrain.models.protocol import CausalLM
    from llmtrain.precision import Precision


class LlmtrainLM(LM):
    """An llmtrain causal LM and its tokenizer as an lm-eval model (one process, one device)."""

    def __init__(self, lm: CausalLM, tok: Any, device: torch.device | str = "cpu", precision: Precision | None = None,
                 batch_size: int = 16) -> None:
        import torch

        from llmtrain.precision import resolve

        super().__init__()
        self._device = torch.device(device)
        self.lm = lm.to(self._device).eval()
        self.tok, self.batch_size = tok, batch_size
        self.precision = precision or resolve("fp32", self._device)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_token_id

    def _pairs(self, requests: list[Any]) -> list[tuple[list[int], list[int]]]:
        out = []
        for context, continuation in (r.args[:2] for r in requests):
            if context == "":  # lm-eval's TemplateLM: the prefix token as context, unless the text starts with it
                cont = self.tok.encode(continuation)
                out.append(([self.eot_token_id], cont) if cont[:1] != [self.eot_token_id] else (cont[:1], cont[1:]))
            else:
                out.append(encode_pair(self.tok, context, continuation))
        return out

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Batches of `batch_size` pairs, longest first (little padding), answers in the given order."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            for i, res in zip(idx, score_pairs(self.lm, [pairs[i] for i in idx], self.precision, self._device),
                              strict=True):
                out[i] = res
        return out

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), continuation is greedy) per request (args: context, continuation)."""
        return self._score(self._pairs(requests))

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text (args: (text,)) over lm-eval's disjoint windows of the context."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for n, (text,) in enumerate(r.args[:1] for r in requests):
            for w in get_rolling_token_windows(token_list=self.tok.encode(text), prefix_token=self.eot_token_id,
                                               max_seq_len=self.lm.max_positions, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self._score(windows), strict=True):
            totals[n] += ll
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Completions through llmtrain's Generator, cut at gen_kwargs' `until` strings (args: context, gen_kwargs)."""
        from llmtrain.generation.engine import Generator

        gen = Generator(self.lm, self.tok, self._device, self.precision.dtype)
        out = []
        for context, kwargs in (r.args[:2] for r in requests):
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
            max_new = int(kwargs.pop("max_gen_toks", 256))
            done = gen(context, max_new_tokens=max_new, stop=[u for u in until if u], do_sample=do_sample and
                       temperature > 0, temperature=temperature or 1.0, stop_at_eos=True, overflow="slide")
            out.append(done[0].completion)
        return out


def task_manager(name: str, include_path: str | Path | None = None) -> Any:
    """A TaskManager that knows `name`. Indexing all of lm-eval's ~15k task YAMLs takes seconds, so the dirs whose
    YAMLs name it (`task:`, `group:`, `tag:`) are indexed first, and everything only when that finds nothing."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    if include_path is not None:  # a task YAML's dir: its tasks alone (lm-eval's own are not indexed)
        return TaskManager(include_defaults=False, include_path=str(include_path))
    root = Path(lm_eval.tasks.__file__).parent
    pattern = re.compile(rb"^\s*(?:task|group|tag)\s*:\s*['\"]?" + re.escape(name.encode()) + rb"['\"]?\s*$", re.M)
    dirs = sorted({str(p.parent) for p in root.rglob("*.yaml") if pattern.search(p.read_bytes())})
    if dirs:
        tm = TaskManager(include_defaults=False, include_path=dirs)
        if name in tm.all_tasks:
            return tm
    return TaskManager()


def task_ref(spec: str, key: str = "tasks") -> tuple[str, Path | None]:
    """(lm-eval task name, dir to include) of a task given by name (lm-eval's registry) or as the path of a task
    YAML (its `task:`; its dir included). A YAML is read as data: one with `!function` tags (they import Python
    from beside it), `include:` or `trust_remote_code` is refused, as is any file that could run code."""
    if not spec.endswith((".yaml", ".yml")):
        return spec, None
    import yaml

    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(key, f"{spec}: no such task file")
    text = path.read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0]
        why = "it has !function tags, which import Python code" if "!function" in text else f"not YAML ({first})"
        raise ConfigError(key, f"{spec}: {why}; llmtrain reads a task YAML as data only") from None
    name = doc.get("task") if isinstance(doc, dict) else None
    if not isinstance(name, str) or not name:
        raise ConfigError(key, f"{spec}: no 'task:' name (an lm-eval task YAML names its task)")
    if "include" in doc or "trust_remote_code" in text:
        raise ConfigError(key, f"{spec}: 'include' and 'trust_remote_code' are not read (another file, or code from "
                               "the dataset's repo); write the task out in one file")
    return name, path.parent


def load_tasks(spec: str, key: str = "tasks", include_path: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """(the TaskManager, {task name: lm-eval Task}) of `spec` (a name or a task YAML, task_ref), a group
    flattened to its tasks; an unknown task, or one whose data cannot be loaded (its data not cached while
    offline), is a one-line ConfigError(key)."""
    name, found = task_ref(spec, key)
    tm = task_manager(name, include_path or found)
    if name not in tm.all_tasks:
        from difflib import get_close_matches

        close = get_close_matches(name, tm.all_tasks, n=3)
        raise ConfigError(key, f"{name!r} is neither a local .jsonl file nor an lm-eval task"
                               + (f"; did you mean {', '.join(close)}?" if close else ""))
    try:
        loaded = tm.load([name])
    except Exception as e:  # the boundary: datasets' ConnectionError / FileNotFoundError / DatasetNotFoundError
        offline = any(os.environ.get(v, "") not in ("", "0") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        how = ("run once online (without HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) to cache its data, or give a local "
               ".jsonl" if offline else "check the network and the dataset's access terms, or give a local .jsonl")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(key, f"{name}: its data could not be loaded ({type(e).__name__}: {first}); {how}"
                          ) from None
    return tm, loaded["tasks"]


def task_items(spec: str, limit: int = 0, key: str = "trainer.bench_tasks") -> dict[str, list[dict[str, Any]]]:
    """{task name: items} of a multiple-choice lm-eval task (or each task of a group) in the built-in scorer's
    form (generation/choice.py: context, endings, label, and the task's target delimiter), built as lm-eval
    builds its requests: the context its `fewshot_context` (the task's num_fewshot, lm-eval's default seed), the
    endings its `doc_to_choice`, the label its `doc_to_target`; the first `limit` of its evaluation docs."""
    _, tasks = load_tasks(spec, key)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, task in _leaves(tasks):
        kind = task.config.output_type
        if kind != "multiple_choice" or task.multiple_input:
            raise ConfigError(key, f"{name} is a {kind} task; training scores multiple-choice tasks (one context, "
                                   f"several endings): score it after training with llmtrain-eval tasks={spec}")
        shots = task.config.num_fewshot or 0
        if shots:
            task.set_fewshot_seed(seed=1234)  # simple_evaluate's fewshot_random_seed
        items = []
        for doc in list(task.eval_docs)[:limit or None]:
            choices, gold = [str(c) for c in task.doc_to_choice(doc)], task.doc_to_target(doc)
            label = choices.index(gold) if isinstance(gold, str) and gold in choices else gold
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
                raise ConfigError(key, f"{name}: a doc's target {gold!r} is not one of its {len(choices)} choices")
            ctx = task.fewshot_context(doc, shots, gen_prefix=task.doc_to_prefix(doc))
            items.append({"context": ctx, "endings": choices, "label": label,
                          "delimiter": task.config.target_delimiter})
        if not items:
            raise ConfigError(key, f"{name}: no evaluation docs")
        out[name] = items
    return out


def _leaves(tasks: dict[Any, Any]) -> list[tuple[str, Any]]:
    """(name, Task) of every task in get_task_dict's nesting (groups map to dicts of their tasks)."""
    out = []
    for k, v in tasks.items():
        out += _leaves(v) if isinstance(v, dict) else [(str(k), v)]
    return out


def evaluate(lm: CausalLM, tok: Any, name: str, device: torch.device, precision: Precision, limit: int = 0,
             num_fewshot: int = 0, batch_size: int = 16, include_path: str | Path | None = None) -> dict[str, Any]:
    """lm-eval's metrics of task `name` (or a task YAML's path: task_ref) ({metric: value} without lm-eval's
    ",filter" suffixes, plus n); a task that cannot be loaded (unknown, or its data not cached while offline) is a
    one-line ConfigError("tasks")."""
    import lm_eval

    tm, tasks = load_tasks(name, "tasks", include_path)
    model = LlmtrainLM(lm, tok, device, precision, batch_size)
    res = lm_eval.simple_evaluate(model=model, tasks=list(tasks.values()), task_manager=tm,
                                  num_fewshot=num_fewshot or None, limit=limit or None, bootstrap_iters=0,
                                  log_samples=False)
    out: dict[str, Any] = {}
    for task, metrics in res["results"].items():
        row = {k.split(",")[0]: v for k, v in metrics.items() if k not in ("alias", "sample_len") and "_stderr" not in k
               and isinstance(v, (int, float))}
        n = res.get("n-samples", {}).get(task, {}).get("effective")
        out[task] = {**row, **({"n": n} if n is not None else {})}
    return out

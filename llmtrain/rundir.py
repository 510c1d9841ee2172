"""What a run dir holds and which one a run uses.

A run dir belongs to one configuration: its fingerprint is the part of the config a checkpoint is only
valid for (model, data, strategy, batch shape, optimizer). The default run dir (`runs/<name>`) never
collides: when it holds a run of another fingerprint, the run goes to `runs/<name>-2` (or -3, ...),
the first that is free or holds this same configuration, so rerunning a command finds its own run again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmtrain.errors import ConfigError
from llmtrain.jsonl import read_jsonl, warn

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RECORD_FILE = "run.json"  # status (running | complete | stopped | failed), overrides, times
# what must not change between a checkpoint and the run resuming it (max_steps, lr, cadences, the strategy
# and the world size may: single, ddp and fsdp share one checkpoint format)
RESUME_KEYS = ("model", "data", "optim.name")
# what a resume may change, with a note (the global batch: e.g. accumulation doubled on half the processes)
BATCH_KEYS = ("trainer.micro_batch_size", "trainer.grad_accum_steps")
LAYOUT_KEY = "checkpoint layout"  # from strategy.name: deepspeed keeps its own format, the others share dcp
GLOBAL_BATCH_KEY = "global batch"  # micro-batch × accumulation × data-parallel ranks (world size / strategy.tp)
# a default run dir holds the runs of one configuration: what they resume, their global batch, their layout
# (so a run moved to more processes with its global batch kept finds its run dir again)
FINGERPRINT_KEYS = RESUME_KEYS + (GLOBAL_BATCH_KEY, LAYOUT_KEY)
NOT_FINGERPRINTED = ("num_proc", "out_dir", "prefetch")  # how data is read or prepared, not what it is


def fingerprint(cfg: Any, world_size: int = 1) -> dict[str, Any]:
    """The parts of a run's config that a checkpoint is only valid for, and its batch shape on `world_size`
    processes, as plain JSON-able values."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(cfg):  # a typed Config
        cfg = OmegaConf.structured(cfg)
    out = {}
    for key in RESUME_KEYS + BATCH_KEYS:
        node = OmegaConf.select(cfg, key)
        out[key] = OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) \
            else getattr(node, "value", node)
    for k in NOT_FINGERPRINTED:
        out["data"].pop(k, None)
    tp = int(OmegaConf.select(cfg, "strategy.tp", default=1) or 1)  # the ranks of a tp group share batches
    out[GLOBAL_BATCH_KEY] = out[BATCH_KEYS[0]] * out[BATCH_KEYS[1]] * max(1, world_size // tp)
    name = OmegaConf.select(cfg, "strategy.name")
    out[LAYOUT_KEY] = checkpoint_layout(str(getattr(name, "value", name)))
    return out


def checkpoint_layout(strategy: str) -> str:
    """The checkpoint format a strategy writes and reads: deepspeed's own, or the one the others share."""
    return "deepspeed" if strategy == "deepspeed" else "dcp"


def first_difference(saved: dict[str, Any], current: dict[str, Any],
                     keys: tuple[str, ...] = FINGERPRINT_KEYS) -> tuple[str, Any, Any] | None:
    """(key, saved value, current value) of the first of `keys` that differs; None when equal."""
    for key in keys:
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):  # name the first differing sub-key
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if not diff:
                continue
            key, a, b = f"{key}.{diff[0]}", a.get(diff[0]), b.get(diff[0])
        if a != b:
            return key, a, b
    return None


def check_resumable(ckpt: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """One-line error when the checkpoint was written by an incompatible config; a note when the batch
    shape changed (allowed: the data position carries over, the global batch is the new one)."""
    if saved is None:
        return None
    diff = first_difference(saved, current, RESUME_KEYS)
    if diff is not None:
        key, a, b = diff
        raise ConfigError(key, f"is {b!r} but checkpoint {ckpt} was trained with {a!r}; use a new "
                               "hydra.run.dir (or name=...) for a new run")
    changed = [f"{k} {saved[k]} → {current[k]}" for k in BATCH_KEYS if k in saved and saved[k] != current.get(k)]
    return f"llmtrain: resuming with {', '.join(changed)}" if changed else None


CKPT_SUBDIR = "checkpoints"  # <run>/checkpoints/step_N (checkpoint.py)
RUN_FILES = (CONFIG_FILE, METRICS_FILE, RECORD_FILE, CKPT_SUBDIR)  # what marks a dir as a run dir


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds a training run (its config, metrics, run record or checkpoints)."""
    return any((path / name).exists() for name in RUN_FILES)


def read_config(run_dir: Path, key: str) -> Any:
    """A run dir's config.yaml (a received run's too: YAML without tags or code), typed (`config.Config`); one
    line when there is none, or it cannot be read, or it is not a config of this llmtrain."""
    from omegaconf import DictConfig, OmegaConf

    from llmtrain.config import typed

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(key, f"{run_dir} has no {CONFIG_FILE}: not a llmtrain run dir")
    try:
        cfg = OmegaConf.load(path)
        if not isinstance(cfg, DictConfig) or "model" not in cfg or "data" not in cfg:
            raise ValueError("it has no model and data sections")
        return typed(cfg)
    except ConfigError as e:
        raise ConfigError(key, f"{path} is not a run config of this llmtrain ({e})") from None
    except Exception as e:  # a YAML error, a tag the safe loader refuses, a key or type no schema has
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(key, f"{path} cannot be read as a run config ({first})") from None


def dir_fingerprint(run_dir: Path) -> dict[str, Any] | None:
    """The fingerprint of the run a dir holds (its config.yaml, on the world size its run.json records); None
    when it holds none."""
    from omegaconf import OmegaConf

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return fingerprint(OmegaConf.load(path), int(read_run_record(run_dir).get("world_size", 1)))
    except Exception:  # an unreadable or foreign config.yaml: not a run of ours
        return {}


def pick(requested: Path, current: dict[str, Any]) -> tuple[Path, str | None]:
    """The default run dir, or the first sibling `<dir>-N` that is free or holds this configuration.

    Returns the dir and a note saying why it is not the requested one (None when it is)."""
    cand, n = requested, 1
    while True:
        saved = dir_fingerprint(cand)
        if saved is None or first_difference(saved, current) is None:
            break
        n += 1
        cand = requested.with_name(f"{requested.name}-{n}")
    if cand == requested:
        return cand, None
    diff = first_difference(dir_fingerprint(requested) or {}, current)
    why = f" ({diff[0]}: {diff[1]!r} there, {diff[2]!r} here)" if diff else ""
    return cand, (f"llmtrain: {requested} holds a run of another configuration{why}; this run uses {cand} "
                  "(name=... or hydra.run.dir=... picks the dir)")


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last train record of metrics.jsonl, with the last eval record's keys merged in."""
    out: dict[str, Any] = {}
    path = run_dir / METRICS_FILE
    evals: dict[str, Any] = {}
    for rec in read_jsonl(path):
        (evals if "eval_loss" in rec else out).update(rec)
    out.update({k: v for k, v in evals.items() if k != "step"})
    return out


def objective(metrics: dict[str, Any]) -> float | None:
    """What a sweep minimises for a finished run: its last eval loss, else its last train loss."""
    value = metrics.get("eval_loss", metrics.get("loss"))
    return float(value) if value is not None else None


def remove_if_empty(run_dir: Path) -> None:
    """Remove an empty run dir, and its empty parents inside the working dir (e.g. runs/)."""
    cwd = Path.cwd().resolve()
    path = run_dir.resolve()
    while path != cwd:
        try:
            path.rmdir()  # only succeeds when empty
        except OSError:
            return
        if cwd not in path.parents:
            return
        path = path.parent


def plain_config(cfg: Any) -> dict[str, Any]:
    """A typed Config (or a DictConfig) as plain JSON-able containers (enums by name), e.g. for wandb."""
    from omegaconf import OmegaConf

    node = cfg if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def write_config(run_dir: Path, cfg: Any) -> None:
    """The resolved config of the run, written once when a run starts."""
    from omegaconf import OmegaConf

    from llmtrain.safeio import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    node = cfg if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg)  # a typed Config
    atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(node, resolve=True))


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """<run>/run.json ({} without one); one that cannot be read is {} with one warning (the next
    write_run_record replaces it)."""
    path = run_dir / RECORD_FILE
    rec: Any = None
    try:
        data = path.read_bytes()
        rec = json.loads(data)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        why = (str(e).splitlines() or [type(e).__name__])[0][:120]
        if isinstance(e, ValueError) and not data.strip():
            why = "empty"
    else:
        why = "" if isinstance(rec, dict) else "not a JSON object"
    if why:
        warn(path, f"cannot be read ({why}); its fields are dropped (status, overrides, wall time)")
        return {}
    return rec


def write_run_record(run_dir: Path, **fields: Any) -> None:
    """Update <run>/run.json with `fields` (rank 0, holding the run dir's lock; the sweep report reads it)."""
    import contextlib

    from llmtrain.safeio import atomic_write_text

    rec = {**read_run_record(run_dir), **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RECORD_FILE, json.dumps(rec, indent=1) + "\n", point="record")
    for stray in run_dir.glob(f".{RECORD_FILE}.tmp*"):  # a temp file of a writer killed before its rename
        with contextlib.suppress(OSError):
            stray.unlink()


MAX_NAME = 120  # longer trial names end in a hash (file names stop at 255 bytes)


def swept_keys(argv: list[str], sweeper_params: Any = None) -> set[str]:
    """Keys a multirun varies: command-line overrides with sweep syntax (a,b / range / choice / interval),
    and the keys of the sweeper's `params`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = {str(k) for k in (sweeper_params or {})}
    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            o = parser.parse_override(arg)
        except Exception:  # not an override (a flag's value, …)
            continue
        if o.is_sweep_override() and not o.key_or_group.startswith("hydra"):
            keys.add(o.key_or_group)
    return keys


def trial_name() -> str:
    """A sweep trial's dir name: its values of the swept keys (`optim.lr=0.001,trainer.micro_batch_size=8`),
    the same in every rerun of the sweep, so a rerun finds finished and interrupted trials again."""
    import hashlib
    import sys

    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    swept = swept_keys(sys.argv[1:], hc.sweeper.get("params"))
    values = {}  # key → its value in this trial (the last override of a key wins, as in Hydra)
    for o in hc.overrides.task:
        key, _, value = o.lstrip("+~").partition("=")
        if key in swept:
            values[key] = value
    name = ",".join(f"{k}={v}" for k, v in sorted(values.items())).replace("/", "_") or f"trial_{hc.job.num}"
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name

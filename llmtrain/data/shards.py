"""A prepared dir's files: token shards, meta.json (its schema and checks) and reading the dir back.

Shards: the token stream is appended to `train_000.bin, train_001.bin, ...` (uint16, or uint32 for a vocab
over 65536) of at most `data.shard_tokens` tokens each (`ShardWriter`). The val split is the tail
`val_fraction` of the stream: once everything is written, the last round(N * val_fraction) tokens move to
`val_000.bin ...` and the train shards are truncated (`carve_tail`).

meta.json lists the shards with their token counts, sha256 and mtime; every field a reader uses is checked
in one place (`meta_problem`), so a crafted meta.json is one line, never a KeyError, an object dtype or a
read outside the dir. `load_prepared` checks the shard files against it (sizes always, checksums where a
file's mtime changed: `.verified.json` records the ones checked since) and the tokenizer against its hash.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.data import tokenizers as toks
from llmtrain.errors import ConfigError
from llmtrain.safeio import atomic_write_text, file_digest

FORMAT_VERSION = 3  # 3: tokenizer saved by llmtrain's Tokenizer (tokenizer.json + config)
TOKEN_DTYPES = ("uint16", "uint32")  # what shards hold; nothing else is ever memmapped
VERIFIED = ".verified.json"  # shards whose checksum was checked after their mtime changed (a copy, a touch)
VERIFIED_TMP = re.compile(r"\.\.verified\.json\.tmp\d+")  # atomic_write's temp file, left by a crash
# what a prepared dir's tokenizer/ holds: llmtrain's Tokenizer writes the first three, transformers (format 1) more
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                             "merges.txt", "added_tokens.json", "chat_template.jinja"})
_MAX_ID, _BIG = (1 << 32) - 1, (1 << 63) - 1  # token ids fit uint32; counts int64
# meta.json's integers: (key, low, high, required)
_INT_FIELDS = (("train_tokens", 0, _BIG, True), ("val_tokens", 0, _BIG, True), ("vocab_size", 1, _MAX_ID + 1, True),
               ("eos_token_id", 0, _MAX_ID, True), ("max_token_id", -1, _MAX_ID, False), ("documents", 0, _BIG, False),
               ("characters", 0, _BIG, False), ("replaced_bytes", 0, _BIG, False))


class ShardWriter:
    """Appends token arrays to `<split>_000.bin, <split>_001.bin, ...` of at most `shard_tokens`."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.cap = out, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._fh: Any = None
        self.max_id = -1  # largest id written: the model needs rows up to it, not the tokenizer's full size

    def write(self, arr: np.ndarray) -> None:
        arr = np.asarray(arr, dtype=self.dtype)
        if len(arr):
            self.max_id = max(self.max_id, int(arr.max()))
        while len(arr):
            if self._fh is None or self.shards[-1]["tokens"] >= self.cap:
                self._roll()
            room = self.cap - self.shards[-1]["tokens"]
            self._fh.write(arr[:room].tobytes())
            self.shards[-1]["tokens"] += len(arr[:room])
            arr = arr[room:]

    def _roll(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._fh = open(self.out / name, "wb")  # noqa: SIM115  (closed in _roll / close)
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> list[dict[str, Any]]:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        return self.shards

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


def carve_tail(out: Path, train: list[dict[str, Any]], val: ShardWriter, n_val: int, dtype: np.dtype,
               copy_tokens: int = 1 << 24) -> list[dict[str, Any]]:
    """Move the last n_val tokens of the train shards into `val`; returns the truncated train shards."""
    itemsize = np.dtype(dtype).itemsize
    total = sum(s["tokens"] for s in train)
    start, off = total - n_val, 0
    kept: list[dict[str, Any]] = []
    for s in train:
        lo, hi = off, off + s["tokens"]
        off = hi
        if hi <= start:
            kept.append(s)
            continue
        cut = max(start - lo, 0)  # tokens of this shard that stay in train
        mm = np.memmap(out / s["file"], dtype=dtype, mode="r")
        for a in range(cut, s["tokens"], copy_tokens):
            val.write(np.asarray(mm[a : min(a + copy_tokens, s["tokens"])]))
        del mm
        if cut > 0:
            os.truncate(out / s["file"], cut * itemsize)
            kept.append({"file": s["file"], "tokens": cut})
        else:
            (out / s["file"]).unlink()
    return kept


def _count(value: Any, low: int = 0, high: int = _BIG) -> bool:
    """An int (not a bool, not a float) in [low, high]."""
    return type(value) is int and low <= value <= high


def _plain_name(name: Any) -> bool:
    """A file name directly inside a dir: no separator, not hidden, not '.' or '..'."""
    return (isinstance(name, str) and name != "" and not name.startswith(".")
            and not any(c in name for c in "/\\\0") and Path(name).name == name)


def meta_problem(meta: Any) -> str | None:
    """Why a parsed meta.json is not one llmtrain wrote, in a few words; None when it is (format 1's missing
    "shards" filled in by the caller). Every field a reader uses is checked here: counts are ints, the dtype
    is uint16 or uint32, shard files and the tokenizer dir are plain names inside the dir."""
    if not isinstance(meta, dict):
        return "it is not a JSON object"
    if not _count(meta.get("format"), 1) or not isinstance(meta.get("hash"), str):
        return "it has no 'format' and 'hash'"
    if meta.get("dtype") not in TOKEN_DTYPES:
        return f"its dtype {str(meta.get('dtype'))[:40]!r} is not one of {', '.join(TOKEN_DTYPES)}"
    for key, low, high, required in _INT_FIELDS:
        if (required or key in meta) and not _count(meta.get(key), low, high):
            return f"its {key!r} is not a count"
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or not _plain_name(tok.get("dir", "tokenizer")):
        return "its tokenizer 'dir' is not a dir name inside it"
    shards = meta.get("shards")
    if not isinstance(shards, dict) or not all(isinstance(shards.get(s), list) for s in ("train", "val")):
        return "it has no 'shards' with train and val lists"
    seen = {"meta.json", tok.get("dir", "tokenizer")}
    for split in ("train", "val"):
        for shard in shards[split]:
            if not isinstance(shard, dict) or not _count(shard.get("tokens")):
                return f"a {split} shard is not {{file, tokens}}"
            name = shard.get("file")
            if not _plain_name(name) or name in seen:
                return f"its shard file {str(name)[:80]!r} is not a file name of its own inside the dir"
            seen.add(name)
            if not isinstance(shard.get("sha256", ""), str) or type(shard.get("mtime_ns", 0)) is not int:
                return f"shard {name!r} has a malformed sha256 or mtime_ns"
    return None


def parse_meta(prepared: Path) -> dict[str, Any] | str:
    """`prepared`/meta.json, checked (meta_problem); else why not, as words that follow "meta.json"."""
    try:
        meta = json.loads((prepared / "meta.json").read_text())
    except (OSError, ValueError, RecursionError) as e:
        return f"is unreadable ({str(e)[:160]})"
    if isinstance(meta, dict) and "shards" not in meta and meta.get("format") == 1:  # one file per split
        meta["shards"] = {s: [{"file": f"{s}.bin", "tokens": meta.get(f"{s}_tokens")}] for s in ("train", "val")}
    why = meta_problem(meta)
    return f"is not llmtrain's ({why})" if why else meta


def read_meta(prepared: Path) -> dict[str, Any]:
    """The checked meta.json of a prepared dir; one line when it is not one llmtrain wrote."""
    meta = parse_meta(prepared)
    if isinstance(meta, str):
        raise ConfigError("data.source", f"{prepared}/meta.json {meta}; re-prepare the dataset from its source")
    return meta


def shard_problem(out: Path, meta: dict[str, Any]) -> str | None:
    """What is wrong with the shard files (a few words), or None. Sizes are always checked; checksums when a
    file's mtime is not the one recorded at preparation (and not already checked at its current mtime)."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    try:
        verified = json.loads((out / VERIFIED).read_text())
    except (OSError, ValueError, RecursionError):
        verified = {}
    verified = verified if isinstance(verified, dict) else {}
    checked = {}
    root = out.resolve()
    for split in ("train", "val"):
        for shard in meta["shards"][split]:
            path = out / shard["file"]
            try:
                st = path.stat()
            except OSError:
                return f"{shard['file']} is missing"
            if path.resolve().parent != root:  # a link out of the dir: never read
                return f"{shard['file']} is a link to a file outside {out}"
            want = shard["tokens"] * itemsize
            if st.st_size != want:
                return f"{shard['file']} has {st.st_size:,} bytes, meta.json says {want:,} (truncated or edited)"
            stamp = [st.st_size, st.st_mtime_ns]
            if "sha256" not in shard or st.st_mtime_ns == shard.get("mtime_ns") or verified.get(shard["file"]) == stamp:
                continue
            if file_digest(path) != shard["sha256"]:
                return f"{shard['file']} does not match its checksum in meta.json (edited after preparing)"
            checked[shard["file"]] = stamp
    if checked:
        with contextlib.suppress(OSError):  # a read-only dataset is checked again next time
            atomic_write_text(out / VERIFIED, json.dumps({**verified, **checked}))
    return None


def load_prepared(out: Path) -> tuple[dict[str, Any], toks.Tokenizer]:
    """meta.json and the dataset's own tokenizer (checked against the recorded hash); the shard files are
    checked against meta.json (sizes, and checksums where they may have changed)."""
    meta = read_meta(out)
    if (why := shard_problem(out, meta)) is not None:
        raise ConfigError("data.source", f"the prepared data in {out} is damaged: {why}; prepare it again (delete "
                                         "the dir, or give the raw source)")
    tok = toks.Tokenizer.from_dir(out / meta["tokenizer"].get("dir", "tokenizer"))
    recorded = meta["tokenizer"].get("hash")
    if recorded and toks.tokenizer_hash(tok) != recorded:
        raise ConfigError("data.source", f"{out}/tokenizer differs from the one the data was tokenised with "
                                         f"(hash {recorded}); re-prepare the dataset")
    return meta, tok

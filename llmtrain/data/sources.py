"""Sources of a corpus to prepare, read as a stream of (piece, ends_document).

`data.source` names local files (`embedded` | a file | a glob | a dir of text files), a `save_to_disk` dir
of a Hugging Face dataset, or a hub dataset name (`resolve_source`). Documents (a whole text file, a JSONL
record's text field, a HF row) are read in pieces of ~CHUNK_CHARS characters, cut only between a non-space
and a space character: a pre-token boundary of GPT-2-style byte-level BPE, so the ids of the pieces equal
those of the whole document. Files are read incrementally (READ_BYTES at a time); bytes that are not valid
UTF-8 become U+FFFD and are counted (`replaced_bytes`).
"""

from __future__ import annotations

import codecs
import glob as globlib
import json
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtrain.errors import ConfigError

CHUNK_CHARS = 1 << 18  # characters per tokenisation piece (a long document is split into pieces)
READ_BYTES = 1 << 20  # file read size
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl")
_REPLACED = [0]  # undecodable bytes seen by the counting error handler (this process)


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _REPLACED[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("llmtrain.count", _count_and_replace)


def reset_replaced() -> None:
    """Start counting undecodable bytes from zero."""
    _REPLACED[0] = 0


def replaced_bytes() -> int:
    """Undecodable bytes replaced by U+FFFD in this process since `reset_replaced`."""
    return _REPLACED[0]


@dataclass
class Source:
    """What `data.source` names: local files, a saved HF dataset dir, or a HF hub dataset."""

    kind: str  # files | hf_disk | hf_hub
    spec: str
    files: list[Path] = field(default_factory=list)

    @property
    def total_bytes(self) -> int | None:
        return sum(f.stat().st_size for f in self.files) if self.kind == "files" else None

    def fingerprint(self) -> list[Any]:
        """Cheap identity of the inputs: path, size and mtime of every file (like make)."""
        if self.kind == "hf_hub":
            return [self.spec]
        files = self.files if self.kind == "files" else sorted(p for p in Path(self.spec).rglob("*") if p.is_file())
        out: list[Any] = []
        for f in files:
            st = f.stat()
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        return out

    def describe(self) -> list[str]:
        if self.spec == "embedded":
            return ["embedded"]
        return [str(f) for f in self.files] if self.kind == "files" else [f"{self.kind}:{self.spec}"]


def embedded_files(max_bytes: int) -> list[Path]:
    """The embedded corpus: this Python's own standard-library sources, sorted, up to max_bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for p in sorted(stdlib.glob("*.py")):
        size = p.stat().st_size
        if total + size > max_bytes:
            break
        out.append(p)
        total += size
    return out


def _is_hf_saved(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_info.json", "state.json",
                                                                 "dataset_dict.json"))


def resolve_source(source: str, max_bytes: int = 4_000_000) -> Source:
    """Local files (embedded | file | glob | dir), a `save_to_disk` dir, or else a hub dataset name."""
    if source == "embedded":
        return Source("files", "embedded", embedded_files(max_bytes))
    path = Path(source).expanduser()
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(str(path), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            raise ConfigError("data.source", f"no files match {source}")
        return Source("files", source, files)
    if _is_hf_saved(path):
        return Source("hf_disk", str(path))
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise ConfigError("data.source", f"{source} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        return Source("files", source, files)
    if path.is_file():
        return Source("files", source, [path])
    if source.startswith((".", "/", "~")) or path.suffix or not source.strip():
        raise ConfigError("data.source", f"file not found: {source}")
    return Source("hf_hub", source)


def _cut(buf: str, limit: int) -> int:
    """Where to end a piece of `buf`: the last non-space→space boundary (no pre-token spans it)."""
    lo = max(1, len(buf) - limit)
    for i in range(len(buf) - 1, lo - 1, -1):
        if buf[i].isspace() and not buf[i - 1].isspace():
            return i
    return len(buf)  # no boundary in reach (a huge run without spaces): cut anyway


def split_text(text: str, chunk: int | None = None) -> Iterator[str]:
    """`text` in pieces of about `chunk` characters (CHUNK_CHARS), cut at pre-token boundaries."""
    chunk = CHUNK_CHARS if chunk is None else chunk
    while len(text) > 2 * chunk:
        i = _cut(text[: 2 * chunk], chunk)
        yield text[:i]
        text = text[i:]
    yield text


def _iter_text_file(path: Path, chunk: int) -> Iterator[tuple[str, bool]]:
    """(piece, ends_document): the whole file is one document, read incrementally."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="llmtrain.count")
    buf = ""
    with open(path, "rb") as fh:
        while block := fh.read(READ_BYTES):
            *done, buf = split_text(buf + dec.decode(block), chunk)  # keep the tail: the document goes on
            for piece in done:
                yield piece, False
    buf += dec.decode(b"", final=True)
    if buf:
        yield buf, True


def _iter_jsonl(path: Path, text_field: str, chunk: int) -> Iterator[tuple[str, bool]]:
    """One document per non-empty line: its `text_field`."""
    with open(path, encoding="utf-8", errors="llmtrain.count") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError("data.source", f"{path}:{n} is not JSON ({e.msg}); fix or drop the line") from None
            if not isinstance(rec, dict) or text_field not in rec:
                raise ConfigError("data.text_field", f"{path}:{n} has no field {text_field!r}; set "
                                                     "data.text_field to the record's text key")
            yield from _pieces(str(rec[text_field]), chunk)


def _pieces(text: str, chunk: int) -> Iterator[tuple[str, bool]]:
    if not text:
        return
    parts = list(split_text(text, chunk))
    for k, p in enumerate(parts):
        yield p, k == len(parts) - 1


def _open_hf(src: Source, split: str) -> Any:
    import datasets

    try:
        if src.kind == "hf_disk":
            ds = datasets.load_from_disk(src.spec)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ConfigError("data.hf_split", f"{src.spec} has splits {sorted(ds)}, not {split!r}")
                ds = ds[split]
            return ds
        from llmtrain.hub import OFFLINE_HINT, prepare_hub_lookup

        if not prepare_hub_lookup():
            raise ConfigError("data.source", f"{src.spec!r} is not a local path, and {OFFLINE_HINT}")
        return datasets.load_dataset(src.spec, split=split, streaming=True)
    except ConfigError:
        raise
    except Exception as e:  # offline, unknown name, bad split: one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError("data.source", f"{src.spec!r} is neither a local path nor a loadable Hugging Face "
                                         f"dataset ({msg}); check the path, or go online for hub names") from None


def _iter_hf(src: Source, text_field: str, split: str, chunk: int) -> Iterator[tuple[str, bool]]:
    ds = _open_hf(src, split)
    cols = getattr(ds, "column_names", None)
    if cols is not None and text_field not in cols:
        raise ConfigError("data.text_field", f"{src.spec} has columns {cols}, not {text_field!r}")
    for batch in ds.iter(batch_size=256):
        if text_field not in batch:
            raise ConfigError("data.text_field", f"{src.spec} has columns {sorted(batch)}, not {text_field!r}")
        for text in batch[text_field]:
            yield from _pieces(str(text or ""), chunk)


def iter_pieces(src: Source, text_field: str = "text", split: str = "train", chunk: int | None = None,
                on_file: Callable[[Path], None] | None = None) -> Iterator[tuple[str, bool]]:
    """Every document of the source as (piece, ends_document), in a fixed order; pieces of ~`chunk`
    characters (CHUNK_CHARS)."""
    chunk = CHUNK_CHARS if chunk is None else chunk
    if src.kind != "files":
        yield from _iter_hf(src, text_field, split, chunk)
        return
    for f in src.files:
        if f.suffix == ".jsonl":
            yield from _iter_jsonl(f, text_field, chunk)
        else:
            yield from _iter_text_file(f, chunk)
        if on_file is not None:
            on_file(f)

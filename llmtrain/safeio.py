"""Safe file I/O, below both `checkpoint.py` and the strategies: atomic writes, checksums, safe loading.

* Writes go to a hidden temp file in the same directory, are fsynced, renamed over the target, and the
  directory is fsynced: a reader sees the old file or the new one, never half of one.
* `load_torch` unpickles with `torch.load(weights_only=True)`: tensors, containers and plain scalars only.
  A file whose pickle names anything else (a crafted `os.system` payload, say) is refused with
  `UnsafeFile` before any of it runs.
* `check_pickles` vets files that a third-party loader (DeepSpeed, DCP) would unpickle with full
  `pickle`: each must unpickle under `weights_only` with an explicit allow-list of the classes those
  libraries write. `SafeUnpickler` does the same for raw pickles (DCP's `.metadata`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import pickle
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from llmtrain import faults
from llmtrain.errors import ConfigError

CHUNK = 1 << 20


class UnsafeFile(ConfigError):
    """A file that would run code when loaded, or could not be read safely: one line (exit 2) wherever it is
    raised; `key` names what pointed at the file (default: the file itself)."""

    def __init__(self, message: str, key: str = "file", quiet: bool = False) -> None:
        super().__init__(key, message, quiet)

    def __reduce__(self) -> Any:
        return type(self), (self.message, self.key, self.quiet)


# writing ---------------------------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: Path, write: Any, point: str | None = None) -> None:
    """Call `write(f)` on a temp file beside `path`, fsync it and rename it over `path` (then fsync the dir).
    On any error the temp file is removed and `path` is left as it was. point: a fault point (faults.py)
    between the written temp file and the rename."""
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            faults.disk_write(path)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if point is not None:
            faults.point(point)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, point: str | None = None) -> None:
    atomic_write(path, lambda f: f.write(data), point)


def atomic_write_text(path: Path, text: str, point: str | None = None) -> None:
    atomic_write_bytes(path, text.encode(), point)


def save_torch(obj: Any, path: Path) -> None:
    """torch.save, atomically."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished dir `tmp` to `final`; an existing `final` is kept aside until the new one is in place."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


# checksums -------------------------------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def describe_files(root: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{relative name: {"size", "sha256"}} of files under root."""
    return {n: {"size": (root / n).stat().st_size, "sha256": file_digest(root / n)} for n in names}


def verify_files(root: Path, files: dict[str, dict[str, Any]], checksums: bool = True) -> str | None:
    """None when every listed file exists with its size (and checksum); else what is wrong, in a few words."""
    for name, want in sorted(files.items()):
        path = root / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != want["size"]:
            return f"{name} has {size:,} bytes, its manifest says {want['size']:,}"
        if checksums and file_digest(path) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


# safe loading ----------------------------------------------------------------------------------------------
def _numpy_globals() -> list[Any]:
    """What a numpy array or scalar pickles as (RNG states, tokenizer arrays in trainer state)."""
    import numpy as np

    out: list[Any] = [np.ndarray, np.dtype, np.core.multiarray._reconstruct if hasattr(np, "core") else None]
    out += [type(np.dtype(t)) for t in ("uint8", "uint32", "int32", "int64", "float32", "float64", "bool")]
    with contextlib.suppress(Exception):
        out.append(importlib.import_module("numpy._core.multiarray")._reconstruct)
    with contextlib.suppress(Exception):
        out.append(np.core.multiarray.scalar)
    return [g for g in out if g is not None]


def load_torch(path: Path, map_location: Any = "cpu", allow: Iterable[Any] = (), mmap: bool = False) -> Any:
    """torch.load with weights_only=True (plus numpy arrays and `allow`); UnsafeFile if the pickle asks
    for anything else, or the file is not a readable torch file. mmap: tensor data is mapped, not read."""
    import torch

    try:
        with torch.serialization.safe_globals([*_numpy_globals(), *allow]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeFile(f"{path} is refused: its pickle names {culprit(e)}, which could run code when "
                         "loaded (only tensors, containers and numbers are loaded)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UnsafeFile(f"{path} cannot be read: {_first_line(e)}") from None


def culprit(err: Exception) -> str:
    """The global a weights_only unpickler refused, from its message (e.g. 'posix.system')."""
    import re

    text = str(err)
    m = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global: ([\w.]+)", text)
    return repr(m.group(1)) if m else "a non-tensor object"


def find_cause(err: BaseException | None, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of `types` in err's chain of causes, or among the per-rank failures that
    torch.distributed.checkpoint gathers into its CheckpointException."""
    seen = 0
    while err is not None and seen < 16:
        if isinstance(err, types):
            return err
        failures = getattr(err, "failures", None)
        if isinstance(failures, dict):
            for v in failures.values():
                found = find_cause(v[0] if isinstance(v, tuple) else v, types)
                if found is not None:
                    return found
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as a Python 3 pickle of protocol < 3 uses it for bytes: latin-1 text to bytes, nothing else."""
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1":
        raise pickle.UnpicklingError(f"GLOBAL _codecs.encode is allowed for latin-1 text only, not {encoding!r}")
    return text.encode("latin1")


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only allow-listed globals ("module.name"). `_codecs.encode`, when
    allowed, is the latin-1-only `_latin1_bytes`. encoding: how Python 2 strings are read ("bytes" keeps them)."""

    def __init__(self, file: Any, allow: set[str], encoding: str = "ASCII") -> None:
        super().__init__(file, encoding=encoding)
        self.allow = allow

    def find_class(self, module: str, name: str) -> Any:
        if f"{module}.{name}" not in self.allow:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        return super().find_class(module, name)


def safe_pickle_load(source: Path | BinaryIO, allow: set[str], *, encoding: str = "ASCII",
                     name: str | None = None) -> Any:
    """Unpickle a file (a path, or an open binary file that messages call `name`) with SafeUnpickler;
    UnsafeFile, one line, when it names a global outside `allow` or cannot be read."""
    label = name or str(source)
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return SafeUnpickler(io.BufferedReader(f), allow, encoding).load()
        return SafeUnpickler(source, allow, encoding).load()
    except pickle.UnpicklingError as e:
        raise UnsafeFile(f"{label} is refused: its pickle names {culprit(e)}, which could run code when "
                         "loaded") from None
    except Exception as e:  # a truncated or malformed pickle: EOFError, ValueError, ImportError, ...
        raise UnsafeFile(f"{label} cannot be read: {_first_line(e)}") from None


def _resolve(names: Iterable[str]) -> list[Any]:
    """Import "module.name" strings (skipping those this install lacks)."""
    out = []
    for full in names:
        module, _, name = full.rpartition(".")
        with contextlib.suppress(Exception):
            out.append(getattr(importlib.import_module(module), name))
    return out


def is_torch_zip(path: Path) -> bool:
    """Whether torch.load reads `path` as a zip archive: its first bytes are a zip local-file header (torch's
    own test, stricter than zipfile.is_zipfile, which also accepts a file that only ends like a zip)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def check_pickles(paths: Iterable[Path], allow: Iterable[str]) -> None:
    """Vet torch files before a third-party loader unpickles them in full: each must be a torch zip archive
    whose one pickle (`data.pkl`, the only one torch.load reads from it) loads under weights_only with
    `allow` ("module.name" classes). torch's legacy format (several pickles in a row, each read in full by
    torch.load) is refused outright: torch.save has not written it since 1.6. Raises UnsafeFile."""
    allowed = _resolve(set(allow))
    for path in paths:
        if not is_torch_zip(path):
            raise UnsafeFile(f"{path} is refused: it is not a torch zip archive (torch's legacy format, or not a "
                             "torch file at all), and a legacy file would be unpickled in full by the library that "
                             "reads it; only files written by torch.save since torch 1.6 are loaded")
        load_torch(path, map_location="cpu", allow=allowed, mmap=True)  # only the pickle is read

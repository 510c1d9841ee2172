"""32x32 RGB classification data: synthetic by default, CIFAR-10 from its local python archive.

Both give batches {"x": float32 [B, 3, 32, 32], "y": int64 [B]}, normalised per channel with the
train split's mean and std.
"""

from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from llmtrain.data.base import DataModule, register_data
from llmtrain.data.synthetic import ArrayDataset
from llmtrain.datainfo import Batch, DataInfo
from llmtrain.distributed.dist import Dist
from llmtrain.errors import ConfigError, require
from llmtrain.safeio import UnsafeFile, safe_pickle_load

SHAPE = (3, 32, 32)
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_VAL = "test_batch"
CIFAR_CLASSES = 10


@dataclass
class ImageDataConfig:
    """`data.*` for kind images."""

    kind: str = "images"
    path: str | None = None  # CIFAR-10: cifar-10-python.tar.gz or its extracted cifar-10-batches-py dir
    num_classes: int = 10
    n_train: int = 2048  # synthetic only
    n_val: int = 512  # synthetic only
    seed: int = 0
    noise_std: float = 1.0  # synthetic only: pixel noise on top of the unit-scale class templates


class ImageDataset(ArrayDataset):
    """Images [N, 3, 32, 32] (uint8 or float32) and labels [N]; normalised per channel on fetch."""

    def __init__(self, x: np.ndarray, y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__(x, y.astype(np.int64))
        self.mean = torch.from_numpy(mean.astype(np.float32)).view(1, -1, 1, 1)  # [1, 3, 1, 1]
        self.std = torch.from_numpy(std.astype(np.float32)).view(1, -1, 1, 1)

    def get(self, indices: np.ndarray) -> Batch:
        batch = super().get(indices)
        batch["x"] = (batch["x"].float() - self.mean) / self.std  # [B, 3, 32, 32]
        return batch


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of images [N, C, H, W] (float64; uint8 via a 256-bin histogram)."""
    mean, std = np.empty(x.shape[1]), np.empty(x.shape[1])
    for c in range(x.shape[1]):
        if x.dtype == np.uint8:  # exact, without a float copy of 50k images
            hist = np.bincount(x[:, c].ravel(), minlength=256).astype(np.float64)
            v = np.arange(256, dtype=np.float64)
            mean[c] = (hist * v).sum() / hist.sum()
            std[c] = np.sqrt((hist * (v - mean[c]) ** 2).sum() / hist.sum())
        else:
            mean[c], std[c] = x[:, c].mean(dtype=np.float64), x[:, c].std(dtype=np.float64)
    return mean, np.maximum(std, 1e-8)


def synthetic_images(n: int, num_classes: int, templates: np.ndarray, noise_std: float,
                     g: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n images: a class template shifted by up to 2 pixels, plus Gaussian noise. -> x [n,3,32,32], y [n]."""
    y = g.integers(0, num_classes, size=n)
    shifts = g.integers(-2, 3, size=(n, 2))
    x = np.empty((n, *SHAPE), dtype=np.float32)
    for i in range(n):
        x[i] = np.roll(templates[y[i]], tuple(shifts[i]), axis=(1, 2))
    x += noise_std * g.standard_normal(x.shape, dtype=np.float32)
    return x, y


# what the official archive's pickles name: numpy's array reconstruction (numpy 1 and 2 spell its module
# differently); `_codecs.encode` is how a Python 3 re-pickling (protocol 2) spells bytes, latin-1 only
CIFAR_GLOBALS = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
                 "numpy.dtype", "_codecs.encode"}
CIFAR_HINT = "give the official cifar-10-python.tar.gz or its extracted dir"


def _load_batch(source: Path | BinaryIO, where: str) -> Any:
    """One unpickled batch file; nothing but numpy arrays, containers, numbers and bytes can come out of it."""
    try:
        return safe_pickle_load(source, CIFAR_GLOBALS, encoding="bytes", name=where)
    except UnsafeFile as e:
        why = getattr(e, "message", str(e))  # the one line, without a key of its own
        raise ConfigError("data.path", f"{why}; CIFAR-10 batches hold only numpy arrays, lists and bytes") from None


def _field(blob: dict, key: str) -> Any:
    """blob[b"key"] (the official Python 2 pickles), else blob["key"]."""
    return blob.get(key.encode(), blob.get(key))


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype}, shape {value.shape}"
    name = type(value).__name__
    return "missing" if value is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _labels(labels: Any) -> np.ndarray | None:
    """int64 [N] from a list of ints (or an integer array) in [0, CIFAR_CLASSES); None when it is anything else."""
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            return None
        y = labels.astype(np.int64)
    elif isinstance(labels, list) and all(type(v) is int and 0 <= v < CIFAR_CLASSES for v in labels):
        y = np.asarray(labels, dtype=np.int64)
    else:
        return None
    return y if not len(y) or (y.min() >= 0 and y.max() < CIFAR_CLASSES) else None


def _check_batch(blob: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 [N, 3072], labels int64 [N]) of one unpickled batch; ConfigError naming `where` otherwise."""
    def bad(what: str) -> ConfigError:
        return ConfigError("data.path", f"{where} is not a CIFAR-10 batch: {what}; {CIFAR_HINT}")

    if not isinstance(blob, dict):
        raise bad(f"it holds {_describe(blob)}, not a dict")
    data = _field(blob, "data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise bad(f"its data is {_describe(data)}, not a uint8 array of 3072 columns")
    y = _labels(_field(blob, "labels"))
    if y is None:
        raise bad(f"its labels are not a list of ints in [0, {CIFAR_CLASSES})")
    if len(y) != len(data):
        raise bad(f"it has {len(y)} labels for {len(data)} images")
    return data, y


def _class_names(meta: Any, where: str) -> list[str]:
    """batches.meta's label_names (10 strings); the class numbers when there is no batches.meta."""
    if meta is None:
        return [str(i) for i in range(CIFAR_CLASSES)]
    names = _field(meta, "label_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == CIFAR_CLASSES and all(isinstance(c, (bytes, str)) for c in names)):
        raise ConfigError("data.path", f"{where} is not CIFAR-10's batches.meta: it has no list of "
                                       f"{CIFAR_CLASSES} label_names; {CIFAR_HINT}")
    return [c.decode(errors="replace") if isinstance(c, bytes) else c for c in names]


def read_cifar10(path: str | Path) -> dict[str, Any]:
    """CIFAR-10 from `cifar-10-python.tar.gz` or an extracted `cifar-10-batches-py` dir.

    -> {"train": (x uint8 [50000, 3, 32, 32], y int64 [50000]), "val": (x, y) of test_batch, "classes"}.
    The batches are the dataset's own pickles, read with an allow-list (CIFAR_GLOBALS): a crafted archive
    is refused with one line before any of it runs, and what comes out is checked to be uint8 images and
    integer labels.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError("data.path", f"{p} not found; give cifar-10-python.tar.gz or its extracted "
                                       f"{CIFAR_DIR} dir, or unset data.path for synthetic images")
    blobs: dict[str, Any] = {}
    where: dict[str, str] = {}
    wanted = {*CIFAR_TRAIN, CIFAR_VAL, "batches.meta"}
    if p.is_file():
        try:
            with tarfile.open(p, "r:*") as tar:
                for member in tar:
                    name = Path(member.name).name
                    if member.isfile() and name in wanted:
                        f = tar.extractfile(member)
                        assert f is not None
                        where[name] = f"{p} member {member.name}"
                        blobs[name] = _load_batch(f, where[name])
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ConfigError("data.path", f"{p} is not a CIFAR-10 python archive ({e})") from None
    else:
        d = p / CIFAR_DIR if (p / CIFAR_DIR).is_dir() else p
        for name in wanted:
            if (d / name).is_file():
                where[name] = str(d / name)
                blobs[name] = _load_batch(d / name, where[name])
    missing = [n for n in (*CIFAR_TRAIN, CIFAR_VAL) if n not in blobs]
    if missing:
        raise ConfigError("data.path", f"{p} lacks {CIFAR_DIR}/{{{','.join(missing)}}}; {CIFAR_HINT}")
    batches = {n: _check_batch(blobs[n], where[n]) for n in (*CIFAR_TRAIN, CIFAR_VAL)}

    def stack(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([batches[n][0] for n in names])  # [N, 3072]
        y = np.concatenate([batches[n][1] for n in names])  # [N]
        return x.reshape(-1, *SHAPE), y  # channel-major rows: R plane, G plane, B plane

    classes = _class_names(blobs.get("batches.meta"), where.get("batches.meta", ""))
    return {"train": stack(CIFAR_TRAIN), "val": stack((CIFAR_VAL,)), "classes": classes}


@register_data("images", config=ImageDataConfig, task="classification", presets=("images.yaml",))
class ImageDataModule(DataModule):
    """CIFAR-10 when data.path is set, else a deterministic synthetic problem drawn from data.seed.

    Synthetic: each class has a smooth random template (8x8x3 noise upsampled to 32x32); an image is
    its class template shifted by up to 2 pixels plus pixel noise of std `noise_std`.
    """

    def __init__(self, cfg: ImageDataConfig, *, dist: Dist = Dist(), model_tokenizer: str | None = None) -> None:
        self.cfg = cfg
        require(cfg.num_classes >= 2, "data.num_classes", f"must be >= 2 (got {cfg.num_classes})")
        if cfg.path:
            require(cfg.num_classes == CIFAR_CLASSES, "data.num_classes",
                    f"CIFAR-10 has {CIFAR_CLASSES} classes (got {cfg.num_classes})")
            data = read_cifar10(cfg.path)
            (xt, yt), (xv, yv), classes = data["train"], data["val"], data["classes"]
        else:
            for key in ("n_train", "n_val"):
                require(getattr(cfg, key) > 0, f"data.{key}", f"must be > 0 (got {getattr(cfg, key)})")
            require(cfg.noise_std >= 0, "data.noise_std", f"must be >= 0 (got {cfg.noise_std})")
            g = np.random.default_rng(cfg.seed)
            low = g.standard_normal((cfg.num_classes, 3, 8, 8)).astype(np.float32)
            templates = low.repeat(4, axis=2).repeat(4, axis=3)  # [K, 3, 32, 32], smooth blocks
            xt, yt = synthetic_images(cfg.n_train, cfg.num_classes, templates, cfg.noise_std, g)
            xv, yv = synthetic_images(cfg.n_val, cfg.num_classes, templates, cfg.noise_std, g)
            classes = [str(i) for i in range(cfg.num_classes)]
        self.mean, self.std = channel_stats(xt)
        self._splits = {"train": ImageDataset(xt, yt, self.mean, self.std),
                        "val": ImageDataset(xv, yv, self.mean, self.std)}
        self.info = DataInfo(task="classification", num_classes=cfg.num_classes, image_shape=SHAPE,
                             classes=classes)

    def split(self, name: str) -> ImageDataset:
        return self._splits[name]

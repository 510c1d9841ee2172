"""Export / load for plain torch model families: `model.safetensors` + `config.json`.

`config.json` holds the model config and the DataInfo dimensions the model was built with, so a
model can be rebuilt from the directory alone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

from llmtrain.errors import ConfigError
from llmtrain.models.base import Batch, DataInfo, ModelSpec

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_INFO_KEYS = ("task", "in_features", "out_features", "num_classes", "image_shape", "vocab_size", "eos_token_id")


def config_dict(cfg: Any) -> dict[str, Any]:
    """A model config (dataclass, DictConfig or mapping) as a plain JSON-able dict."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)  # type: ignore[arg-type]
    return dict(cfg)


def save_module(model: nn.Module, cfg: Any, info: DataInfo, out_dir: Path) -> None:
    """Write the state dict as safetensors and the config + data dims as JSON."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS))
    dims = {k: getattr(info, k) for k in _INFO_KEYS}
    if dims["image_shape"] is not None:
        dims["image_shape"] = list(dims["image_shape"])
    (out_dir / CONFIG).write_text(json.dumps({"model": config_dict(cfg), "data_info": dims}, indent=2) + "\n")


def load_module(path: Path, config_cls: type, build: Any) -> nn.Module:
    """Inverse of save_module: `build(config_cls(**model), DataInfo(**dims))`, then the weights."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ConfigError("model", f"{path} is not an exported model dir (needs {CONFIG} and {WEIGHTS})")
    try:
        meta = json.loads((path / CONFIG).read_text())
        fields = {f.name for f in dataclasses.fields(config_cls)}
        cfg = config_cls(**{k: v for k, v in meta["model"].items() if k in fields})
        dims = {k: v for k, v in dict(meta["data_info"]).items() if k in _INFO_KEYS}
        if dims.get("image_shape") is not None:
            dims["image_shape"] = tuple(dims["image_shape"])
        info = DataInfo(**dims)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError("model", f"{path / CONFIG} is not an llmtrain export's ({type(e).__name__}: {e})") from None
    model = build(cfg, info)
    try:
        model.load_state_dict(load_file(str(path / WEIGHTS)))
    except Exception as e:  # a garbled safetensors file, or weights of another shape
        raise ConfigError("model", f"{path / WEIGHTS} does not load: {str(e).splitlines()[0][:200]}") from None
    return model


class PlainModuleSpec(ModelSpec):
    """A family of plain torch modules over {"x", "y"} batches, exported with save_module."""

    config_cls: type  # the family's model config dataclass

    def count(self, batch: Batch) -> int:
        return int(batch["y"].shape[0])

    def export(self, model: nn.Module, cfg: Any, info: DataInfo, out_dir: Path) -> None:
        save_module(model, cfg, info, out_dir)

    def load(self, cfg: Any, info: DataInfo, path: Path) -> nn.Module:
        return load_module(path, self.config_cls, self.build)

"""`llmtrain-prepare` / `python -m llmtrain.prepare`: tokenise a corpus once into a prepared dir.

    llmtrain-prepare data.source=corpus/ data.tokenizer=/path/to/gpt2-tokenizer data.out_dir=data/gpt2

Same `data` group as training; the dir it prints can be passed to training as data.source=<dir>.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from llmtrain.cli import user_errors_exit
from llmtrain.config import check_known_keys, conf_dir, register_configs
from llmtrain.errors import ConfigError


@dataclass
class PrepareConfig:
    """The root of `conf/prepare.yaml`: only the data group."""

    data: Any = MISSING
    force: bool = False  # rebuild even when an up-to-date prepared dir exists


@user_errors_exit
def run(cfg: DictConfig) -> dict[str, Any]:
    """Prepare cfg.data; returns its meta.json."""
    from llmtrain.data.prepared import prepare
    from llmtrain.data.shards import read_meta

    check_known_keys(cfg)  # a misspelt `+key=value`
    if cfg.data.kind != "text":
        raise ConfigError("data", f"only text data is prepared (got data.kind={cfg.data.kind!r}); use data=text")
    out = prepare(cfg.data, force=cfg.force)
    meta = read_meta(out)
    if cfg.data.seq_len >= meta["val_tokens"]:
        print(f"llmtrain: warning: data.seq_len={cfg.data.seq_len} is longer than the val split "
              f"({meta['val_tokens']} tokens); training will refuse it: raise data.val_fraction", flush=True)
    print(f"{out}\ntrain_tokens={meta['train_tokens']} val_tokens={meta['val_tokens']} "
          f"vocab_size={meta['vocab_size']} dtype={meta['dtype']} documents={meta.get('documents')} "
          f"replaced_bytes={meta.get('replaced_bytes', 0)}", flush=True)
    return meta


def register_prepare_config() -> None:
    register_configs()  # the data schemas
    ConfigStore.instance().store(name="base_prepare", node=PrepareConfig)


register_prepare_config()


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="prepare")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    from llmtrain.cli import run_app

    run_app(_hydra_main)


if __name__ == "__main__":
    main()

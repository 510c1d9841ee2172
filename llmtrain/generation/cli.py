"""`llmtrain-generate` (also `python -m llmtrain.generate`): complete prompts with a GPT-2.

    llmtrain-generate source=runs/gpt2_tiny prompt="def main(" max_new_tokens=64 do_sample=false
    llmtrain-generate source=runs/chat prompt="What is 2+2?" chat=true system="Answer briefly."

stdout holds only the generated text: each sample's prompt + completion and a newline (output=text), or
one JSON object per sample (output=jsonl: prompt, completion, token counts, finish_reason); every log line
goes to stderr. Prompts come from `prompt=`, `prompts_file=` (one per line) or stdin. `chat=true`: each prompt
is a user message (after `system=`, if given) rendered by the tokenizer's chat template with the assistant's
header (`template=plain`: llmtrain's plain one, as `data.template=plain`), generation ends at the template's
end-of-turn token or EOS, and the output is the assistant's answer.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from llmtrain.cli import hydra_quote, user_errors_exit
from llmtrain.config import check_known_keys, conf_dir
from llmtrain.device import check_device
from llmtrain.errors import ConfigError, require
from llmtrain.generation.engine import GenerationConfig, config_keys
from llmtrain.precision import parse_precision

OUTPUTS = ("text", "jsonl")
TEMPLATES = ("auto", "plain")


@dataclass
class GenerateConfig(GenerationConfig):
    """The root of `conf/generate.yaml`: a source, prompts, and every GenerationConfig key."""

    source: str = MISSING  # run dir | exported / Hugging Face GPT-2 dir | hub name
    prompt: str | None = None
    prompts_file: str | None = None  # one prompt per line
    output: str = "text"  # text | jsonl
    stream: bool = False  # print tokens as they come (output=text)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile the decode step (CUDA graphs on GPU)
    chat: bool = False  # each prompt is a user message, rendered by the chat template; the output is the answer
    system: str | None = None  # chat: a system message before each prompt
    template: str = "auto"  # chat: auto (the tokenizer's chat template) | plain (llmtrain's, as data.template)


def read_prompts(cfg: Any) -> list[str]:
    if cfg.prompt is not None:
        return [cfg.prompt]
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        require(path.is_file(), "prompts_file", f"file not found: {path}")
        prompts = [ln for ln in path.read_text().splitlines() if ln.strip()]
        require(bool(prompts), "prompts_file", f"{path} holds no prompt")
        return prompts
    if sys.stdin is not None and not sys.stdin.isatty():
        prompts = [ln for ln in sys.stdin.read().splitlines() if ln.strip()]
        require(bool(prompts), "prompt", "stdin held no prompt")
        return prompts
    raise ConfigError("prompt", "give prompt=\"...\", prompts_file=<file> or prompts on stdin")


def check(cfg: Any) -> GenerationConfig:
    """The generation options, checked before anything is loaded."""
    gen = GenerationConfig(**{k: v for k, v in cfg.items() if k in config_keys() and k != "stop"},
                           stop=[s.replace("\\n", "\n").replace("\\t", "\t") for s in cfg.stop])  # \n, \t escapes
    gen.check()
    require(cfg.output in OUTPUTS, "output", f"must be one of {list(OUTPUTS)} (got {cfg.output!r})")
    require(not (cfg.stream and cfg.output == "jsonl"), "stream", "streams text only; use output=text")
    require(cfg.template in TEMPLATES, "template", f"must be one of {list(TEMPLATES)} (got {cfg.template!r})")
    require(cfg.chat or cfg.system is None, "system", "a system message needs chat=true")
    parse_precision(cfg.precision)
    check_device(cfg.device)
    if cfg.device.startswith("cuda"):
        import torch

        require(torch.cuda.is_available(), "device", "cuda requested but no GPU is visible; use device=cpu or auto")
    return gen


def chat_prompts(tok: Any, prompts: list[str], cfg: Any) -> tuple[list[str], list[int]]:
    """Each prompt as a user message rendered with the assistant's header, and the template's end-of-turn
    token (empty when it ends turns with EOS alone)."""
    from llmtrain.data.chat import ChatTemplateError, end_of_turn_id, generation_prompt, template_source

    source = template_source(tok, cfg.template)
    if source is None:
        raise ConfigError("chat", f"the tokenizer of {cfg.source} has no chat template; template=plain uses "
                                  "llmtrain's plain one (what data.template=plain trains on)")
    try:
        rendered = [generation_prompt(source, tok, p, cfg.system) for p in prompts]
    except ChatTemplateError as e:
        raise ConfigError("chat", str(e)) from None
    end = end_of_turn_id(tok, source)
    return rendered, [] if end is None else [end]


def log(msg: str) -> None:
    print(f"llmtrain: {msg}", file=sys.stderr, flush=True)


@user_errors_exit
def run(cfg: DictConfig) -> list[Any]:
    check_known_keys(cfg)  # a misspelt `+key=value`
    gen_cfg = check(cfg)
    prompts = read_prompts(cfg)
    from llmtrain.generation.engine import Generator

    t0 = time.perf_counter()
    gen = Generator.from_pretrained(cfg.source, device=cfg.device, precision=cfg.precision, compile=cfg.compile)
    asked, end_ids = prompts, []
    if cfg.chat:
        prompts, end_ids = chat_prompts(gen.tok, asked, cfg)
    gen.check_prompts(prompts, gen_cfg)
    n = sum(p.numel() for p in gen.model.parameters())
    log(f"loaded {cfg.source} ({n / 1e6:.2f}M params, {gen.device}, {str(gen.dtype).removeprefix('torch.')}) "
        f"in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    out = []
    if cfg.stream:  # one row at a time, each printed as prompt, pieces as they come, newline
        def show(i: int, _j: int, piece: str | None) -> None:
            sys.stdout.write(piece if piece is not None else "\n")
            sys.stdout.flush()

        def start(i: int, _j: int) -> None:
            if not cfg.chat:  # a chat shows the answer alone
                sys.stdout.write(prompts[i])
                sys.stdout.flush()

        out = gen(prompts, gen_cfg, on_text=show, on_start=start, batch_size=1, end_ids=end_ids)
    else:
        out = gen(prompts, gen_cfg, end_ids=end_ids)
        for c in out:
            if cfg.output == "jsonl":
                prompt = asked[c.prompt_index] if cfg.chat else c.prompt
                rec = {"prompt": prompt, "completion": c.completion, "prompt_tokens": c.prompt_tokens,
                       "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason,
                       "prompt_index": c.prompt_index, "sample_index": c.sample_index}
                sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
            else:
                sys.stdout.write((c.completion if cfg.chat else c.text) + "\n")
    sys.stdout.flush()
    dt = time.perf_counter() - t0
    tokens = sum(c.completion_tokens for c in out)
    log(f"{len(out)} sample{'s' if len(out) != 1 else ''}, {tokens} new tokens in {dt:.2f}s "
        f"({tokens / max(dt, 1e-9):.0f} tokens/s)")
    return out


def register() -> None:
    ConfigStore.instance().store(name="base_generate", node=GenerateConfig)


register()


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="generate")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


TEXT_KEYS = ("prompt", "source", "prompts_file", "system")  # free text: passed to Hydra quoted, as the user typed it


def quote_text_args(argv: list[str]) -> list[str]:
    """prompt="def main(" reaches Hydra as prompt='def main(' (its grammar would reject the bare text)."""
    out = []
    for a in argv:
        key, eq, value = a.partition("=")
        if eq and key.lstrip("+") in TEXT_KEYS and not (value[:1] in "'\"" and value[-1:] == value[:1] and value):
            a = f"{key}={hydra_quote(value)}"
        out.append(a)
    return out


def main() -> None:
    from llmtrain.cli import run_app

    sys.argv = [sys.argv[0], *quote_text_args(sys.argv[1:])]
    run_app(_hydra_main)


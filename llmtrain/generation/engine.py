"""Generator: a GPT-2 from any source, decoded in batches with a preallocated KV cache.

    gen = Generator.from_pretrained("runs/gpt2_tiny")            # a run, an export, a HF dir or a hub name
    gen(["def main(", "class "], max_new_tokens=64, do_sample=False)   # → list[Completion]
    for piece in gen.stream("import ", max_new_tokens=32): print(piece, end="")

Prompts of different lengths share a batch left-padded: every row's real tokens sit at the end of the
prompt slots, its position ids count its own tokens only, and an attention mask hides the padding. The
cache holds every layer's keys and values for the whole batch ([n_layer, B, n_head, L, head_dim]), written
in place; the next token is chosen on the device, and the host reads tokens only to stream, to find stop
strings, or every few steps to notice that every row has ended.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from llmtrain.device import pick_device
from llmtrain.errors import ConfigError, require
from llmtrain.generation.sampling import SamplingConfig, draw, process
from llmtrain.models.gpt2_native import GPT2, GPT2Dims
from llmtrain.precision import resolve

OVERFLOW = ("error", "slide")


@dataclass
class GenerationConfig(SamplingConfig):
    """What to generate (every key is also a `llmtrain-generate` option)."""

    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)  # the output is cut just before the first stop string
    stop_at_eos: bool = True
    num_samples: int = 1  # completions per prompt
    seed: int = 0  # sample j of prompt i draws from its own generator seeded by (seed, i, j)
    batch_size: int = 8  # rows decoded together
    overflow: str = "error"  # prompt + max_new_tokens beyond the context: error | slide (drop the oldest half)

    def check(self, prefix: str = "") -> None:
        super().check(prefix)
        require(self.max_new_tokens >= 1, f"{prefix}max_new_tokens", f"must be >= 1 (got {self.max_new_tokens})")
        require(self.num_samples >= 1, f"{prefix}num_samples", f"must be >= 1 (got {self.num_samples})")
        require(self.batch_size >= 1, f"{prefix}batch_size", f"must be >= 1 (got {self.batch_size})")
        require(self.overflow in OVERFLOW, f"{prefix}overflow", f"must be one of {list(OVERFLOW)} (got {self.overflow!r})")
        require(all(self.stop), f"{prefix}stop", "stop strings must not be empty")


@dataclass
class Completion:
    """One generated sample: `text` is exactly prompt + completion."""

    prompt: str
    completion: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # length | eos | stop
    prompt_index: int = 0
    sample_index: int = 0

    @property
    def text(self) -> str:
        return self.prompt + self.completion


class KVCache:
    """Keys and values of every layer, [n_layer, 2, B, n_head, L, head_dim], which slots hold a real token
    ([B, L]), and the slot written next.

    `writers` append a chunk at `pos` and return the keys/values up to it (eager decoding: attention spans
    only the filled part). `static_writers` write one token at the tensor `slot` and return the whole cache,
    so every decode step has the same shapes (compiled decoding: one graph, CUDA graphs on GPU)."""

    def __init__(self, d: GPT2Dims, batch: int, length: int, dtype: torch.dtype, device: torch.device,
                 static: bool = False) -> None:
        shape = (d.n_layer, 2, batch, d.n_head, length, d.n_embd // d.n_head)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.length, self.pos = length, 0
        layers = self.kv.unbind(0)
        self.writers = [functools.partial(self._write, layer) for layer in layers]
        self.static_writers = [functools.partial(self._write_at_slot, layer) for layer in layers]
        if static and device.type == "cuda":  # in-place updates inside CUDA graphs
            for t in (self.kv, self.valid, self.slot):
                torch._dynamo.mark_static_address(t)

    def reset(self) -> None:
        self.pos = 0
        self.valid.zero_()

    def _write(self, layer: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.pos, kv.shape[3]  # layer [2, B, nh, L, hd], kv [2, B, nh, T, hd]: one copy for both
        layer.narrow(3, s, t).copy_(kv)
        k, v = layer.narrow(3, 0, s + t).unbind(0)
        return k, v

    def _write_at_slot(self, layer: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer.index_copy_(3, self.slot, kv)  # kv [2, B, nh, 1, hd]
        k, v = layer.unbind(0)
        return k, v


class _Rows:
    """The host-side state of a batch: tokens so far, finish reasons, stop-string search, streaming."""

    def __init__(self, tok: Any, n: int, cfg: GenerationConfig, emit: Callable[[int, str | None], None] | None) -> None:
        self.tok, self.cfg, self.emit = tok, cfg, emit
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.text: list[str] = [""] * n  # decoded completion, cut at a stop string
        self.shown = [0] * n  # characters streamed so far

    def push(self, tokens: list[int], eos: int) -> None:
        for i, t in enumerate(tokens):
            if self.finish[i] is not None:
                continue
            if t == eos and self.cfg.stop_at_eos:
                self.finish[i] = "eos"
                self._flush(i, final=True)
                continue
            self.ids[i].append(t)
            if self.cfg.stop or self.emit is not None:
                self._update_text(i)

    def _update_text(self, i: int) -> None:
        text = self.tok.decode(self.ids[i])
        cut = min((k for k in (text.find(s) for s in self.cfg.stop) if k >= 0), default=-1)
        if cut >= 0:
            self.text[i], self.finish[i] = text[:cut], "stop"
            self._flush(i, final=True)
            return
        self.text[i] = text
        self._flush(i, final=False)

    def _flush(self, i: int, final: bool) -> None:
        """Stream what is settled: hold back a trailing partial character (a multi-byte token half seen)
        and, until the end, as much text as could still turn out to start a stop string."""
        if self.emit is None:
            return
        text = self.text[i] if self.finish[i] == "stop" else self.tok.decode(self.ids[i])
        end = len(text)
        if not final:
            while end > 0 and text[end - 1] == "\ufffd":
                end -= 1
            hold = max((len(s) - 1 for s in self.cfg.stop), default=0)
            end = max(self.shown[i], end - hold)
        if end > self.shown[i]:
            self.emit(i, text[self.shown[i]:end])
            self.shown[i] = end
        if final:
            self.emit(i, None)

    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def results(self) -> list[tuple[str, int, str]]:
        """(completion text, completion tokens, finish reason) per row."""
        out = []
        for i, ids in enumerate(self.ids):
            if self.finish[i] is None:
                self.finish[i] = "length"
                self._flush(i, final=True)
            text = self.text[i] if self.finish[i] == "stop" else self.tok.decode(ids)
            out.append((text, len(ids), self.finish[i]))
        return out


class Generator:
    """Load once, call many times: `gen(prompts, **options)` → list[Completion]."""

    def __init__(self, model: GPT2, tokenizer: Any, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, compile: bool = False) -> None:
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.tok, self.dtype, self.dims = tokenizer, dtype, model.dims
        self.eos = tokenizer.eos_token_id
        self.lean = model.lean_ops()  # None: a block holds adapters or wrappers, run as modules
        self._static: dict[int, KVCache] = {}  # compile: one full-length cache per batch size, reused
        self._compiled = None
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs on GPU
            self._compiled = torch.compile(self._static_step, mode=mode, fullgraph=True, dynamic=False)

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str = "auto", precision: str = "auto",
                        compile: bool = False) -> Generator:
        """`source`: a run dir (its final/, else its newest checkpoint), an exported or Hugging Face GPT-2 dir,
        or a hub name. The tokenizer comes with it."""
        from llmtrain.generation.sources import load_source

        dev = pick_device(device)
        dtype = resolve(precision, dev).dtype  # auto: bf16 on GPUs that have it (else fp16), fp32 on CPU
        model, tok = load_source(str(source))
        return cls(model, tok, dev, dtype, compile=compile)

    # public -----------------------------------------------------------------------------------------------
    def __call__(self, prompts: str | list[str], config: GenerationConfig | None = None,
                 on_text: Callable[[int, int, str | None], None] | None = None,
                 on_start: Callable[[int, int], None] | None = None, **options: Any) -> list[Completion]:
        """Complete every prompt `num_samples` times.

        Streaming: `on_start(prompt_index, sample_index)` when a batch holding that sample starts, then
        `on_text(prompt_index, sample_index, piece)` as text settles, and `piece=None` when it ends."""
        cfg = replace(config or GenerationConfig(), **options)
        cfg.check()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encoded = [self._encode(p, cfg) for p in prompts]
        rows = [(i, j) for i in range(len(prompts)) for j in range(cfg.num_samples)]
        out: list[Completion] = []
        for start in range(0, len(rows), cfg.batch_size):
            batch = rows[start:start + cfg.batch_size]
            if on_start is not None:
                for i, j in batch:
                    on_start(i, j)
            emit = None if on_text is None else (lambda r, piece, batch=batch: on_text(*batch[r], piece))
            gens = None if cfg.greedy else [self._generator(cfg.seed, i, j) for i, j in batch]
            done = self._generate([encoded[i] for i, _ in batch], cfg, gens, emit)
            for (i, j), (text, n, why) in zip(batch, done, strict=True):
                out.append(Completion(prompts[i], text, len(encoded[i]), n, why, i, j))
        return out

    def stream(self, prompt: str, **options: Any) -> Iterator[str]:
        """The completion of one prompt, piece by piece as it is generated (a generator of str)."""
        import queue
        import threading

        q: queue.Queue = queue.Queue()
        err: list[BaseException] = []

        def work() -> None:
            try:
                self(prompt, on_text=lambda _i, _j, piece: piece is not None and q.put(piece),
                     **{**options, "num_samples": 1})
            except BaseException as e:
                err.append(e)
            finally:
                q.put(None)

        threading.Thread(target=work, daemon=True).start()
        while (piece := q.get()) is not None:
            yield piece
        if err:
            raise err[0]

    def check_prompts(self, prompts: list[str], config: GenerationConfig) -> None:
        """Refuse, with one line, prompts that do not fit the context (overflow=error)."""
        for p in prompts:
            self._encode(p, config)

    # decoding ---------------------------------------------------------------------------------------------
    def _encode(self, prompt: str, cfg: GenerationConfig) -> list[int]:
        ids = self.tok.encode(prompt) if prompt else []
        ids = ids or [self.eos]  # an empty prompt starts from end-of-text, as a document would
        ctx = self.dims.n_positions
        if len(ids) + cfg.max_new_tokens > ctx:
            if cfg.overflow == "error" and len(ids) >= ctx:  # no room for one new token: the prompt's fault
                raise ConfigError("prompt", f"the prompt ({len(ids)} tokens) leaves no room in the model's context "
                                            f"of {ctx} tokens; shorten it to fewer than {ctx} tokens, or set "
                                            "overflow=slide")
            if cfg.overflow == "error":
                raise ConfigError("max_new_tokens", f"the prompt ({len(ids)} tokens) + max_new_tokens="
                                                    f"{cfg.max_new_tokens} exceed the model's context of {ctx} "
                                                    "tokens; lower max_new_tokens, shorten the prompt, or set "
                                                    "overflow=slide")
            ids = ids[-(ctx // 2):] if len(ids) > ctx // 2 else ids  # slide: keep the newest half at most
        return ids

    def _generator(self, seed: int, prompt_index: int, sample_index: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed((seed * 1_000_003 + prompt_index) * 1_009 + sample_index)
        return g

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], cfg: GenerationConfig, gens: list[torch.Generator] | None,
                  emit: Callable[[int, str | None], None] | None) -> list[tuple[str, int, str]]:
        B, P, dev = len(prompts), max(map(len, prompts)), self.device
        ctx = self.dims.n_positions
        L = min(ctx, P + cfg.max_new_tokens)
        hist = torch.full((B, P + cfg.max_new_tokens), self.eos, dtype=torch.long, device=dev)  # every slot's token
        valid = torch.zeros(B, hist.shape[1], dtype=torch.bool, device=dev)  # slots that hold a real token
        for b, r in enumerate(prompts):
            hist[b, P - len(r):P] = torch.tensor(r, dtype=torch.long)
            valid[b, P - len(r):P] = True
        padded = not bool(valid[:, :P].all())
        seen = None
        if cfg.repetition_penalty != 1.0:
            seen = torch.zeros(B, self.dims.vocab_size, dtype=torch.bool, device=dev)
            seen.scatter_(1, hist[:, :P], valid[:, :P])
        rows = _Rows(self.tok, B, cfg, emit)
        cache = self._cache(B, L)
        logits, pos = self._prefill(cache, hist, valid, 0, P, padded)  # logits [B, V], pos [B]
        sync_every = 1 if (cfg.stop or emit is not None or dev.type == "cpu") else 8
        pending: list[torch.Tensor] = []
        for t in range(cfg.max_new_tokens):
            nxt = draw(process(logits, cfg, seen), cfg, gens)  # [B]
            slot = P + t
            hist[:, slot], valid[:, slot] = nxt, True
            pending.append(nxt)
            if len(pending) == sync_every or t == cfg.max_new_tokens - 1:
                for col in torch.stack(pending, 1).T.tolist():  # the host reads tokens here only
                    rows.push(col, self.eos)
                pending = []
                if rows.done():
                    break
            if t == cfg.max_new_tokens - 1:
                break
            if seen is not None:
                seen[torch.arange(B, device=dev), nxt] = True
            if cache.pos == min(cache.length, self.dims.n_positions):  # context full (slide): keep the newest half
                keep = self.dims.n_positions // 2
                logits, pos = self._prefill(cache, hist, valid, slot + 1 - keep, slot + 1, True)
                continue
            pos = pos + 1
            cache.valid[:, cache.pos] = True  # the slot this token's keys/values go to
            if self._compiled is not None:
                cache.slot.fill_(cache.pos)
                logits = self._compiled(nxt, pos, cache)
            else:
                mask = cache.valid[:, None, None, :cache.pos + 1] if padded else None  # [B, 1, 1, S]
                logits = self._decode_step(nxt, pos, cache, mask)
            cache.pos += 1
        return rows.results()

    def _cache(self, batch: int, length: int) -> KVCache:
        if self._compiled is None:
            return KVCache(self.dims, batch, length, self.dtype, self.device)
        if batch not in self._static:
            self._static[batch] = KVCache(self.dims, batch, self.dims.n_positions, self.dtype, self.device, static=True)
        return self._static[batch]

    def _prefill(self, cache: KVCache, hist: torch.Tensor, valid: torch.Tensor, lo: int, hi: int,
                 padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Run slots [lo, hi) through the model into the emptied cache: (last logits [B, V], last position [B])."""
        ids, ok = hist[:, lo:hi], valid[:, lo:hi]  # [B, T]
        cache.reset()
        cache.valid[:, :ids.shape[1]] = ok
        pos = (ok.long().cumsum(1) - 1).clamp(min=0)  # each row counts its own tokens
        mask = None
        if padded:
            T = ids.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=ids.device)  # a padding query attends to itself
            mask = (ok[:, None, None, :] & causal) | eye  # [B, 1, T, T]
        h = self.model.hidden(ids, pos, cache.writers, mask, causal=True, lean=self.lean)
        cache.pos = ids.shape[1]
        return self.model.lm_head(h[:, -1:])[:, 0].float(), pos[:, -1]

    def _decode_step(self, nxt: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                     mask: torch.Tensor | None) -> torch.Tensor:
        """One token per row: its keys/values go to the cache's next slot; logits [B, V]."""
        h = self.model.hidden(nxt[:, None], pos[:, None], cache.writers, mask, causal=False, lean=self.lean)
        return self.model.lm_head(h)[:, -1].float()

    def _static_step(self, nxt: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """_decode_step with every shape fixed: the write lands at `cache.slot`, attention spans the whole
        cache with empty slots masked (what torch.compile turns into one graph)."""
        mask = cache.valid[:, None, None, :]  # [B, 1, 1, L]
        h = self.model.hidden(nxt[:, None], pos[:, None], cache.static_writers, mask, causal=False, lean=self.lean)
        return self.model.lm_head(h)[:, -1].float()


def config_keys() -> set[str]:
    return {f.name for f in fields(GenerationConfig)}

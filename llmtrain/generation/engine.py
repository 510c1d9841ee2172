"""Generator: any causal LM (models/protocol.py), decoded in batches with a cache the model allocates.

    gen = Generator.from_pretrained("runs/gpt2_tiny")            # a run, an export, a HF dir or a hub name
    gen(["def main(", "class "], max_new_tokens=64, do_sample=False)   # → list[Completion]
    for piece in gen.stream("import ", max_new_tokens=32): print(piece, end="")
    Generator(model, tokenizer)                                  # any model that meets the protocol

Prompts of different lengths share a batch left-padded: every row's real tokens sit at the end of the
prompt slots, its positions count its own tokens only, and a mask of the slots that hold a real token hides
the padding. The model's cache is preallocated for the whole batch and written in place; the next token is
chosen on the device, and the host reads tokens only to stream, to find stop strings, or every few steps to
notice that every row has ended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from llmtrain.device import pick_device
from llmtrain.errors import ConfigError, require
from llmtrain.generation.sampling import SamplingConfig, draw, process
from llmtrain.models.protocol import Cache, CausalLM
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


class _Rows:
    """The host-side state of a batch: tokens so far, finish reasons, stop-string search, streaming."""

    def __init__(self, tok: Any, n: int, cfg: GenerationConfig, emit: Callable[[int, str | None], None] | None) -> None:
        self.tok, self.cfg, self.emit = tok, cfg, emit
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.text: list[str] = [""] * n  # decoded completion, cut at a stop string
        self.shown = [0] * n  # characters streamed so far

    def push(self, tokens: list[int], ends: int | set[int]) -> None:
        """Take each row's next token; a row ends at one of `ends` (EOS, an end-of-turn) when stop_at_eos."""
        ends = {ends} if isinstance(ends, int) else ends
        for i, t in enumerate(tokens):
            if self.finish[i] is not None:
                continue
            if t in ends and self.cfg.stop_at_eos:
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
    """Load once, call many times: `gen(prompts, **options)` → list[Completion]. `model`: a causal LM
    (models/protocol.py), moved to `device` and `dtype`, in eval mode."""

    def __init__(self, model: CausalLM, tokenizer: Any, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, compile: bool = False) -> None:
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.tok, self.dtype = tokenizer, dtype
        self.eos = tokenizer.eos_token_id
        self.context, self.vocab = model.max_positions, model.vocab_size
        self._static: dict[int, tuple[Cache, torch.Tensor]] = {}  # compile: one full-context cache per batch size
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
                 on_start: Callable[[int, int], None] | None = None, end_ids: Iterable[int] = (),
                 **options: Any) -> list[Completion]:
        """Complete every prompt `num_samples` times. `end_ids`: tokens that end a sample as EOS does (a chat
        template's end-of-turn token).

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
            done = self._generate([encoded[i] for i, _ in batch], cfg, gens, emit, {self.eos, *end_ids})
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
        ctx = self.context
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
                  emit: Callable[[int, str | None], None] | None, ends: set[int]) -> list[tuple[str, int, str]]:
        B, P, dev, ctx = len(prompts), max(map(len, prompts)), self.device, self.context
        L = min(ctx, P + cfg.max_new_tokens)
        hist = torch.full((B, P + cfg.max_new_tokens), self.eos, dtype=torch.long, device=dev)  # every slot's token
        valid = torch.zeros(B, hist.shape[1], dtype=torch.bool, device=dev)  # slots that hold a real token
        for b, r in enumerate(prompts):
            hist[b, P - len(r):P] = torch.tensor(r, dtype=torch.long)
            valid[b, P - len(r):P] = True
        padded = not bool(valid[:, :P].all())
        seen = None
        if cfg.repetition_penalty != 1.0:
            seen = torch.zeros(B, self.vocab, dtype=torch.bool, device=dev)
            seen.scatter_(1, hist[:, :P], valid[:, :P])
        rows = _Rows(self.tok, B, cfg, emit)
        cache, live = self._cache(B, L)  # live [B, cache.length]: the cache slots that hold a real token
        logits, pos = self._prefill(cache, live, hist, valid, 0, P, padded)  # logits [B, V], pos [B]
        sync_every = 1 if (cfg.stop or emit is not None or dev.type == "cpu") else 8
        pending: list[torch.Tensor] = []
        for t in range(cfg.max_new_tokens):
            nxt = draw(process(logits, cfg, seen), cfg, gens)  # [B]
            slot = P + t
            hist[:, slot], valid[:, slot] = nxt, True
            pending.append(nxt)
            if len(pending) == sync_every or t == cfg.max_new_tokens - 1:
                for col in torch.stack(pending, 1).T.tolist():  # the host reads tokens here only
                    rows.push(col, ends)
                pending = []
                if rows.done():
                    break
            if t == cfg.max_new_tokens - 1:
                break
            if seen is not None:
                seen[torch.arange(B, device=dev), nxt] = True
            if cache.pos == min(cache.length, ctx):  # context full (slide): keep the newest half
                logits, pos = self._prefill(cache, live, hist, valid, slot + 1 - ctx // 2, slot + 1, True)
                continue
            pos = pos + 1
            live[:, cache.pos] = True  # the slot this token's keys/values go to
            if self._compiled is not None:
                cache.slot.fill_(cache.pos)
                logits = self._compiled(nxt, pos, cache, live)
                cache.pos += 1  # a static step leaves the count to its caller
            else:
                mask = live[:, :cache.pos + 1] if padded else None  # [B, S]
                logits = self.model.logits(nxt[:, None], pos[:, None], cache, mask)[:, -1].float()
        return rows.results()

    def _cache(self, batch: int, length: int) -> tuple[Cache, torch.Tensor]:
        """An empty cache of `length` slots and its slots' mask; compiled: the full-context one of this batch
        size, reused (every shape fixed)."""
        if self._compiled is None:
            cache = self.model.allocate_cache(batch, length, self.dtype, self.device)
            return cache, torch.zeros(batch, cache.length, dtype=torch.bool, device=self.device)
        if batch not in self._static:
            cache = self.model.allocate_cache(batch, self.context, self.dtype, self.device, static=True)
            live = torch.zeros(batch, cache.length, dtype=torch.bool, device=self.device)
            if self.device.type == "cuda":  # written in place inside CUDA graphs
                torch._dynamo.mark_static_address(live)
            self._static[batch] = cache, live
        return self._static[batch]

    def _prefill(self, cache: Cache, live: torch.Tensor, hist: torch.Tensor, valid: torch.Tensor, lo: int,
                 hi: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Run slots [lo, hi) of the history into the emptied cache: (last logits [B, V], last position [B])."""
        ids, ok = hist[:, lo:hi], valid[:, lo:hi]  # [B, T]
        cache.reset()
        live.zero_()
        live[:, :ids.shape[1]] = ok
        pos = (ok.long().cumsum(1) - 1).clamp(min=0)  # each row counts its own tokens
        logits = self.model.logits(ids, pos, cache, ok if padded else None, last_only=True)  # [B, 1, V]
        return logits[:, -1].float(), pos[:, -1]

    def _static_step(self, nxt: torch.Tensor, pos: torch.Tensor, cache: Cache, live: torch.Tensor) -> torch.Tensor:
        """One token per row with every shape fixed: written at `cache.slot`, attention over the whole cache
        with its empty slots masked (what torch.compile turns into one graph); logits [B, V]."""
        return self.model.logits(nxt[:, None], pos[:, None], cache, live, static=True)[:, -1].float()


def config_keys() -> set[str]:
    return {f.name for f in fields(GenerationConfig)}

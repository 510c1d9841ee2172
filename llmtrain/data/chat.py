"""Chat templates: a conversation rendered by the tokenizer's own `chat_template` (in jinja2's sandbox, with the
variables and helpers transformers gives it), and which of its tokens are the assistant's.

The assistant's tokens are its answers and, after each, the template's end-of-turn token that the model must
learn to emit (`<|im_end|>`, `<|eot_id|>`, `</s>` ...); system and user turns and the template's scaffolding
(role headers, the newlines between turns) are not. A template with `{% generation %}...{% endgeneration %}`
markers says where the assistant's text is. For one without, it is derived by rendering prefixes of the
conversation: an assistant turn starts where the conversation before it, rendered with
`add_generation_prompt=True`, ends, and runs through the first special token after its content (the whole turn,
trailing whitespace dropped, when the template puts no special token there). A token is the assistant's when
its characters overlap that text, as in transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)`.

`PLAIN_TEMPLATE` (`data.template=plain`) is llmtrain's own, for tokenizers without one:
`### {Role}:\\n{content}\\n\\n` per message, the assistant's content followed by EOS.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from contextvars import ContextVar
from typing import Any

Message = dict[str, Any]
Span = tuple[int, int]  # [start, end) characters of the rendered text

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
PLAIN_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '### ' + (m['role'] | string | capitalize) + ':\\n' -}}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- generation -%}{{- m['content'] + eos_token -}}{%- endgeneration -%}{{- '\\n\\n' -}}"
    "{%- else -%}{{- m['content'] + '\\n\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Assistant:\\n' -}}{%- endif -%}"
)
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_TRACK: ContextVar[tuple[list[str], list[Span]] | None] = ContextVar("llmtrain_chat_track", default=None)


class ChatTemplateError(ValueError):
    """A template that fails on a conversation, or whose assistant tokens cannot be told apart."""


def template_source(tok: Any, template: str) -> str | None:
    """The jinja source `data.template` names: the tokenizer's chat template (auto; None when it has none) or
    llmtrain's plain one."""
    if template == "plain":
        return PLAIN_TEMPLATE
    chat = getattr(tok, "chat_template", None)
    return chat if isinstance(chat, str) and chat.strip() else None


def special_value(tok: Any, name: str) -> str:
    """A special token's text: a transformers tokenizer's attribute, or llmtrain's Tokenizer config."""
    value = getattr(tok, name, None) or getattr(tok, "config", {}).get(name)
    return str(value) if value else ""


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> Any:
    """The template compiled in jinja2's immutable sandbox, with transformers' helpers (`raise_exception`,
    `strftime_now`, a `tojson` that keeps non-ASCII text, loop controls, the `generation` tag); nothing it renders
    can reach Python beyond what the sandbox allows."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`: renders its body, noting where it lands when tracking."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller: Any) -> str:
            text = caller()
            if (track := _TRACK.get()) is not None:
                blocks, spans = track
                start = sum(map(len, blocks))
                spans.append((start, start + len(text)))
            return text

    class Namespace(jinja2.utils.Namespace):
        """`namespace(...)` without underscore attributes."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_' ({name!r})")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace)
    return env.from_string(source)


def _variables(tok: Any, messages: list[Message], add_generation_prompt: bool) -> dict[str, Any]:
    specials = {name: special_value(tok, name) for name in SPECIAL_NAMES}
    return {**specials, "messages": messages, "add_generation_prompt": add_generation_prompt, "tools": None,
            "documents": None}


def render(source: str, tok: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as the template renders it (ChatTemplateError when the template fails on it)."""
    try:
        return compile_template(source).render(**_variables(tok, messages, add_generation_prompt))
    except Exception as e:  # the template's own checks (raise_exception), a broken template, the sandbox
        raise ChatTemplateError(f"the chat template fails: {_first_line(e)}") from None


def _render_tracked(source: str, tok: Any, messages: list[Message]) -> tuple[str, list[Span]]:
    blocks: list[str] = []
    spans: list[Span] = []
    token = _TRACK.set((blocks, spans))
    try:
        for block in compile_template(source).generate(**_variables(tok, messages, False)):
            blocks.append(block)
    except Exception as e:
        raise ChatTemplateError(f"the chat template fails: {_first_line(e)}") from None
    finally:
        _TRACK.reset(token)
    return "".join(blocks), spans


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def special_tokens(tok: Any) -> dict[str, int]:
    """The tokenizer's special tokens (text → id): its added tokens marked special, and its EOS."""
    out = {str(t.content): int(i) for i, t in tok.backend_tokenizer.get_added_tokens_decoder().items()
           if getattr(t, "special", True) and str(t.content).strip()}
    eos = special_value(tok, "eos_token")
    if eos and tok.eos_token_id is not None:
        out.setdefault(eos, int(tok.eos_token_id))
    return out


def assistant_spans(source: str, tok: Any, messages: list[Message]) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of the assistant's turns (answer + end-of-turn)."""
    if GENERATION_TAG.search(source):
        return _render_tracked(source, tok, messages)
    full = render(source, tok, messages)
    specials = sorted(special_tokens(tok), key=len, reverse=True)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        head = render(source, tok, messages[:i], add_generation_prompt=True)
        turn = render(source, tok, messages[: i + 1])
        if not (turn.startswith(head) and full.startswith(turn)):
            raise ChatTemplateError("the chat template renders a turn differently once more messages follow, so "
                                    "the assistant's tokens cannot be told apart; mark them in the template with "
                                    "{% generation %}...{% endgeneration %}")
        spans.append((len(head), len(head) + _turn_length(turn[len(head):], str(message.get("content", "")),
                                                          specials)))
    return full, spans


def _turn_length(tail: str, content: str, specials: list[str]) -> int:
    """How much of an assistant turn's text is the assistant's: through the first special token after its
    content, else all of it but trailing whitespace."""
    body = content.strip()
    at = tail.find(body) if body else -1
    after = at + len(body) if at >= 0 else 0
    found = [(k, -len(s)) for s in specials if (k := tail.find(s, after)) >= 0]
    if found:
        k, neg = min(found)
        return k - neg
    return len(tail.rstrip())


def target_mask(offsets: list[tuple[int, int]], spans: list[Span]) -> list[bool]:
    """Which tokens overlap a span (token offsets and spans both in order)."""
    mask = [False] * len(offsets)
    j = 0
    for t, (start, end) in enumerate(offsets):
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        if j == len(spans):
            break
        mask[t] = end > spans[j][0]
    return mask


def encode(tok: Any, texts: list[str]) -> list[Any]:
    """The tokenizer's encodings of rendered conversations (ids and character offsets; the template writes its
    own BOS, so none is added)."""
    backend = tok.backend_tokenizer
    return backend.encode_batch(texts, add_special_tokens=False)


def example(tok: Any, ids: list[int], mask: list[bool]) -> tuple[list[int], list[bool]]:
    """A training example from a rendered conversation: its tokens through the last assistant token, then the
    tokenizer's EOS (a target) unless that token already is the EOS."""
    last = max((i for i, m in enumerate(mask) if m), default=-1)
    if last < 0:
        raise ChatTemplateError("the chat template rendered no assistant tokens")
    ids, mask = list(ids[: last + 1]), list(mask[: last + 1])
    if ids[-1] != tok.eos_token_id:
        ids.append(tok.eos_token_id)
        mask.append(True)
    return ids, mask


def end_of_turn_id(tok: Any, source: str) -> int | None:
    """The special token that ends the assistant's turn in this template (None: none but EOS)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        text, spans = assistant_spans(source, tok, probe)
    except ChatTemplateError:
        return None
    enc = encode(tok, [text])[0]
    mask = target_mask(enc.offsets, spans)
    last = max((i for i, m in enumerate(mask) if m), default=-1)
    special_ids = set(special_tokens(tok).values())
    return enc.ids[last] if last >= 0 and enc.ids[last] in special_ids else None


def generation_prompt(source: str, tok: Any, user: str, system: str | None = None) -> str:
    """A user message (after an optional system one) rendered with `add_generation_prompt=True`."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return render(source, tok, messages, add_generation_prompt=True)

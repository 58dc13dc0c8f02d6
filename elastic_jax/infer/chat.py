"""A checkpoint folder's tokenizer and chat template, without transformers.

`ChatTokenizer.load(directory)` reads `tokenizer.json` with the `tokenizers` library and, when
present, `tokenizer_config.json` (the chat template, the special tokens) and
`chat_template.jinja` (where newer exports keep the template). `render` renders the template the
way transformers' `apply_chat_template` does: a sandboxed Jinja2 environment with
`trim_blocks` / `lstrip_blocks` and loop controls, the `tojson` / `raise_exception` /
`strftime_now` helpers, the special tokens as variables, reasoning fields aliased; the rendered
text is encoded without adding special tokens (the template writes them).

Every file is read through one validating reader (UTF-8, JSON object, field types), so a damaged
folder is one error naming the file (and field); the template is compiled at load (a syntax error
names the file and line). A checkpoint's template is untrusted code: besides the sandbox, a render
stops after `RENDER_STEPS` template lines or `RENDER_SECONDS` (a hostile nested loop cannot stall
`generate`), string / list repetition is capped at `RENDER_MAX_ITEMS`, and the template's own
`raise_exception(msg)` (real templates use it for unsupported roles) is one `ValueError` line.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from datetime import datetime
from functools import lru_cache

from ..errors import JSONFileError, read_json

THINK, END_THINK = "<think>", "</think>"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
RENDER_STEPS = 2_000_000        # template source lines executed per render
RENDER_SECONDS = 10.0
RENDER_MAX_ITEMS = 10_000_000   # longest string / list a `*` in a template may build


class TemplateRaised(ValueError):
    """The chat template called `raise_exception(message)`."""


class _RenderLimit(Exception):
    pass


def _token_text(v):
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def read_text(path: str, what: str) -> str:
    """The UTF-8 text of `path`; errors name the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise JSONFileError(f"{path} ({what}): is a folder, not a file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONFileError(f"{path} ({what}): not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_tokenizer(path: str):
    """`tokenizers.Tokenizer` from `path` (tokenizer.json), errors naming the file."""
    from tokenizers import Tokenizer
    read_json(path, what="tokenizer")             # UTF-8, a JSON object: named errors
    try:
        return Tokenizer.from_str(read_text(path, "tokenizer"))
    except Exception as e:                         # the Rust parser's error: not a tokenizers file
        raise JSONFileError(f"{path} (tokenizer): not a valid `tokenizers` file ({str(e)[:200]})") from None


def read_tokenizer_config(path: str) -> tuple[str | None, dict]:
    """(chat template or None, {special token name: text}) of tokenizer_config.json, validated."""
    config = read_json(path, what="tokenizer config")
    template = config.get("chat_template")
    if isinstance(template, list):   # named templates: [{"name": "default", "template": ...}]
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in template):
            raise JSONFileError(f"{path}: field 'chat_template' must be text or a list of "
                                "{\"name\": ..., \"template\": ...} objects")
        template = {t["name"]: t["template"] for t in template}.get("default")
    elif template is not None and not isinstance(template, str):
        raise JSONFileError(f"{path}: field 'chat_template' must be text, got {type(template).__name__}")
    special = {}
    for k in SPECIAL_NAMES:
        v = config.get(k)
        if v is None:
            continue
        if not isinstance(v, (str, dict)) or (isinstance(v, dict) and not isinstance(v.get("content"), str)):
            raise JSONFileError(f"{path}: field {k!r} must be text or {{\"content\": text}}, got {v!r:.80}")
        special[k] = _token_text(v)
    return template, special


def read_generation_config(path: str) -> dict:
    """generation_config.json, checked: its `eos_token_id` (a token id or a list of them) comes
    back as a list (absent: [])."""
    conf = read_json(path, what="generation config")
    g = conf.get("eos_token_id")
    ids = [] if g is None else [g] if isinstance(g, int) and not isinstance(g, bool) else g
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise JSONFileError(f"{path}: field 'eos_token_id' must be a token id or a list of them, got {g!r:.80}")
    return {**conf, "eos_token_id": ids}


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > RENDER_MAX_ITEMS:
                        raise jinja2.exceptions.SecurityError(f"repetition builds more than {RENDER_MAX_ITEMS} items")
            if operator == "**" and isinstance(right, int) and abs(right) > 1024:
                raise jinja2.exceptions.SecurityError("exponent too large")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise TemplateRaised(str(message))

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def compile_template(template: str, source: str):
    """The compiled template; a syntax error is a ValueError naming `source` and the line."""
    import jinja2
    try:
        return _compile(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"{source}: the chat template has a syntax error at line {e.lineno}: {e.message}") from None


def render_limited(template: str, source: str, **variables) -> str:
    """Render under the step / time limits; every template failure is one ValueError naming `source`."""
    import jinja2
    compiled = compile_template(template, source)
    deadline, steps = time.monotonic() + RENDER_SECONDS, [0]

    def on_line(frame, event, arg):
        if event == "line":
            steps[0] += 1
            if steps[0] > RENDER_STEPS or (steps[0] % 4096 == 0 and time.monotonic() > deadline):
                raise _RenderLimit
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        return compiled.render(**variables)
    except _RenderLimit:
        raise ValueError(f"{source}: rendering the chat template took more than {RENDER_STEPS:,} steps or "
                         f"{RENDER_SECONDS:g} s; refusing it (a template that loops without end?)") from None
    except TemplateRaised as e:
        raise TemplateRaised(f"{source}: the chat template refused these messages: {e}") from None
    except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError,
            ZeroDivisionError, OverflowError, RecursionError, MemoryError) as e:
        raise ValueError(f"{source}: the chat template failed ({type(e).__name__}: {str(e)[:200]})") from None
    finally:
        sys.settrace(previous)


@dataclasses.dataclass(frozen=True)
class ChatTokenizer:
    """`tokenizer`: a `tokenizers.Tokenizer`; `chat_template`: Jinja source or None; `special`:
    {bos_token: "<s>", ...} from tokenizer_config.json; think markers (None if not in the vocab)."""

    tokenizer: object
    chat_template: str | None = None
    special: dict = dataclasses.field(default_factory=dict)
    think_token: str = THINK
    end_think_token: str = END_THINK

    template_source: str = "chat template"

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ChatTokenizer":
        """The folder's tokenizer, template and special tokens; every file validated (errors name
        it) and the template compiled here, before any work."""
        directory = os.fspath(directory)
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory}: no tokenizer.json (generation needs the checkpoint's tokenizer; "
                                    "`elastic-jax export --tokenizer DIR` copies one in)")
        tok = read_tokenizer(path)
        template, special, source = None, {}, None
        cpath = os.path.join(directory, "tokenizer_config.json")
        if os.path.lexists(cpath):
            template, special = read_tokenizer_config(cpath)
            source = f"{cpath} (chat_template)"
        jpath = os.path.join(directory, "chat_template.jinja")
        if os.path.lexists(jpath):
            template, source = read_text(jpath, "chat template"), jpath
        if template is not None:
            compile_template(template, source)
        return cls(tokenizer=tok, chat_template=template, special=special, template_source=source or "chat template")

    # ------------------------------------------------------------------ ids
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def think_id(self) -> int | None:
        return self.token_id(self.think_token)

    @property
    def end_think_id(self) -> int | None:
        return self.token_id(self.end_think_token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def render(self, messages, *, add_generation_prompt: bool = True, **kwargs) -> str:
        """The chat as the model sees it (text), rendered like transformers' apply_chat_template;
        `kwargs` (e.g. enable_thinking=False) reach the template as variables."""
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template (tokenizer_config.json 'chat_template'); "
                             "pass raw prompt text instead (CLI: --raw)")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {messages!r}")
        chat = []
        for m in messages:
            reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
            chat.append(dict(m) if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
        variables = {**self.special, **kwargs}
        return render_limited(self.chat_template, self.template_source, messages=chat, tools=None, documents=None,
                              add_generation_prompt=add_generation_prompt, **variables)

    def encode_chat(self, messages, **kwargs) -> list[int]:
        return self.encode(self.render(messages, **kwargs))

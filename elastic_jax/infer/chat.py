"""A checkpoint folder's tokenizer and chat template, without transformers.

`ChatTokenizer.load(directory)` reads `tokenizer.json` with the `tokenizers` library and, when
present, `tokenizer_config.json` (the chat template, the special tokens) and
`chat_template.jinja` (where newer exports keep the template). `render` renders the template the
way transformers' `apply_chat_template` does: a sandboxed Jinja2 environment with
`trim_blocks` / `lstrip_blocks` and loop controls, the `tojson` / `raise_exception` /
`strftime_now` helpers, the special tokens as variables, reasoning fields aliased; the rendered
text is encoded without adding special tokens (the template writes them).
"""
from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime
from functools import lru_cache

THINK, END_THINK = "<think>", "</think>"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _token_text(v):
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


@dataclasses.dataclass(frozen=True)
class ChatTokenizer:
    """`tokenizer`: a `tokenizers.Tokenizer`; `chat_template`: Jinja source or None; `special`:
    {bos_token: "<s>", ...} from tokenizer_config.json; think markers (None if not in the vocab)."""

    tokenizer: object
    chat_template: str | None = None
    special: dict = dataclasses.field(default_factory=dict)
    think_token: str = THINK
    end_think_token: str = END_THINK

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ChatTokenizer":
        from tokenizers import Tokenizer
        directory = os.fspath(directory)
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory}: no tokenizer.json (generation needs the checkpoint's tokenizer; "
                                    "`elastic-jax export --tokenizer DIR` copies one in)")
        tok = Tokenizer.from_file(path)
        config = {}
        cpath = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(cpath):
            with open(cpath) as f:
                config = json.load(f)
        template = config.get("chat_template")
        if isinstance(template, list):   # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        jpath = os.path.join(directory, "chat_template.jinja")
        if os.path.isfile(jpath):
            with open(jpath) as f:
                template = f.read()
        special = {k: _token_text(config.get(k)) for k in SPECIAL_NAMES if _token_text(config.get(k)) is not None}
        return cls(tokenizer=tok, chat_template=template, special=special)

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
        return _compile(self.chat_template).render(messages=chat, tools=None, documents=None,
                                                   add_generation_prompt=add_generation_prompt, **variables)

    def encode_chat(self, messages, **kwargs) -> list[int]:
        return self.encode(self.render(messages, **kwargs))

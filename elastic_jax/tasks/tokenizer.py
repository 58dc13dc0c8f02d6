"""Word-level tokenizer of the embedded task, built and saved with the `tokenizers` library
(a standard `tokenizer.json`, loadable by `tokenizers.Tokenizer.from_file` or HF
`PreTrainedTokenizerFast(tokenizer_file=...)`). No network, no training: the vocabulary is the
task's closed word set. Ids 0/1/2 are pad/bos/eos, matching `NemotronHConfig` defaults."""
from __future__ import annotations

import dataclasses
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .reasoning import ANSWER, BOS, END_THINK, EOS, PAD, PLUS, QUERY, TAGS, THINK

UNK = "<unk>"
# The task's chat template (tokenizer_config.json): a user message holds the tagged digits
# ("a 3 b 7 c 2"); the generation prompt opens the thinking phase, as `prompt_text` does.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %} {{ m['content'] }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %} " + THINK + "{% endif %}")
SPECIAL_TOKENS = (PAD, BOS, EOS, THINK, END_THINK, ANSWER, UNK)
# ids are stable across versions: the sum levels' words (digits, tags a-h, `!`) keep ids < 26; the
# query levels' extra tags, `?` and the combine levels' `+` follow (a model for the sum levels alone
# needs vocab_size >= 26)
WORDS = tuple(str(d) for d in range(10)) + tuple(TAGS[:8]) + ("!",) + tuple(TAGS[8:]) + (QUERY, PLUS)


def build_tokenizer(levels=None) -> Tokenizer:
    """The task tokenizer: specials first (pad=0, bos=1, eos=2), then digits, tags and `!` (and the
    query levels' words). `levels`: only the words those levels use (a prefix of the ids: the sum
    levels' tokenizer is the original 26-word one); None = every level."""
    words = WORDS
    if levels is not None:
        from .reasoning import SUM_LEVELS, check_levels
        if all(l in SUM_LEVELS for l in check_levels(levels)):
            words = WORDS[:WORDS.index("!") + 1]
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)   # joins words with spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


@dataclasses.dataclass(frozen=True)
class TaskTokenizer:
    """A thin typed view over a `tokenizers.Tokenizer` with the task's special-token ids."""

    tokenizer: Tokenizer

    def __post_init__(self):
        missing = [s for s in SPECIAL_TOKENS if self.tokenizer.token_to_id(s) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")

    # special ids
    def id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def pad_id(self) -> int: return self.id(PAD)
    @property
    def bos_id(self) -> int: return self.id(BOS)
    @property
    def eos_id(self) -> int: return self.id(EOS)
    @property
    def think_id(self) -> int: return self.id(THINK)
    @property
    def end_think_id(self) -> int: return self.id(END_THINK)
    @property
    def answer_id(self) -> int: return self.id(ANSWER)
    @property
    def vocab_size(self) -> int: return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        unk = self.tokenizer.token_to_id(UNK)
        if unk in ids:
            bad = [w for w in text.split() if self.tokenizer.token_to_id(w) is None]
            raise ValueError(f"text has words outside the task vocabulary: {bad[:5]}")
        return ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> str:
        """Write `tokenizer.json` (a file path, or a directory to put it in). Returns the file path."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        self.tokenizer.save(path)
        return path

    def save_config(self, directory: str | os.PathLike) -> str:
        """Write `tokenizer_config.json` (the special tokens and `CHAT_TEMPLATE`, as transformers
        reads it) into `directory`. Returns the file path."""
        import json
        path = os.path.join(os.fspath(directory), "tokenizer_config.json")
        with open(path, "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                       "pad_token": PAD, "unk_token": UNK, "chat_template": CHAT_TEMPLATE}, f, indent=1)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TaskTokenizer":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        return cls(Tokenizer.from_file(path))

    @classmethod
    def default(cls, levels=None) -> "TaskTokenizer":
        """The task tokenizer for `levels` (None = every level); see `build_tokenizer`."""
        return cls(build_tokenizer(levels))

"""Tokenizer for a Hugging Face model directory without transformers: ``tokenizers`` for the vocabulary, jinja2
for the chat template, generation_config.json for eos ids. Used by the gateway (prompts), the worker (streamed
text) and the reference engine, so all of them agree with transformers' ``AutoTokenizer`` on the same files.
"""

from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend

from modelinfo.config import ModelFileError

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: str, required: bool) -> dict:
    if not os.path.isfile(path):
        if required:
            raise ModelFileError(f"{path}: file missing")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from e


def _token_text(value) -> str | None:
    """Special tokens appear as plain strings or as serialized AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _cleanup(text: str) -> str:
    """transformers' ``clean_up_tokenization``: undo spaces before punctuation and contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(a, b)
    return text


class Tokenizer:
    def __init__(self, backend: _Backend, config: dict, eos_token_ids: list[int], chat_template: str | None):
        self.backend = backend
        self.config = config
        self.special = {name: _token_text(config.get(name)) for name in SPECIAL_NAMES}
        self.chat_template = chat_template
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.eos_token_ids = eos_token_ids
        self._template: jinja2.Template | None = None

    @classmethod
    def from_pretrained(cls, path: str) -> Tokenizer:
        path = str(path)
        tok_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_path):
            raise ModelFileError(f"{tok_path}: file missing")
        try:
            backend = _Backend.from_file(tok_path)
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ModelFileError(f"{tok_path}: cannot load tokenizer ({e})") from e
        config = _read_json(os.path.join(path, "tokenizer_config.json"), required=False)
        template = config.get("chat_template")
        jinja_path = os.path.join(path, "chat_template.jinja")  # where transformers >= 4.43 may save it
        if template is None and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        gen = _read_json(os.path.join(path, "generation_config.json"), required=False)
        eos = gen.get("eos_token_id")
        if eos is None:
            eos = _read_json(os.path.join(path, "config.json"), required=False).get("eos_token_id")
        if eos is None and _token_text(config.get("eos_token")):
            eos = backend.token_to_id(_token_text(config["eos_token"]))
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return cls(backend, config, eos_ids, template)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        bos = self.special["bos_token"]
        return None if bos is None else self.backend.token_to_id(bos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _cleanup(text) if self.clean_up_spaces else text

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None, **kwargs
    ) -> str:
        """Render the model's chat template (as transformers does: sandboxed jinja2, trim/lstrip blocks). ``tools``
        are OpenAI tool objects ({"type": "function", "function": {name, description, parameters}}), passed to the
        template as its ``tools`` variable (None when there are none, as templates test it)."""
        if not self.chat_template:
            raise ValueError("this model has no chat_template in tokenizer_config.json; use completions instead")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
                x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
            )
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        variables = {name: value or "" for name, value in self.special.items()}
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools or None,
            **{**variables, **kwargs},
        )


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


class IncrementalDecoder:
    """Streaming detokenizer: ``push`` new ids, get the text they complete. Text is held back while the tail is an
    incomplete UTF-8 sequence (decodes to U+FFFD), so streamed pieces never contain broken characters and their
    concatenation equals ``decode`` of all ids. Decodes a sliding window (prefix + new ids), not the whole text,
    so each push costs O(window). ``prompt_ids`` give the first window context (SentencePiece leading spaces)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-6:]) if prompt_ids else []
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, ids: list[int]) -> str:
        self.ids += ids
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        text = self.tok.decode(self.ids[self.prefix :], self.skip)
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(prefix_text) :]

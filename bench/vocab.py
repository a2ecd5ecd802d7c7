"""A Llama-3-sized (128,256 ids) byte-level BPE tokenizer built locally, for grammar benchmarks.

Grammar-mask cost grows with the vocabulary and the shape of its token trie, so the tiny test model's 384 tokens
say nothing about it, and nothing may be downloaded. This builds a vocabulary of the same size and kind: the 256
byte tokens, then English-like words (with and without a leading space, capitalised), numbers and JSON
punctuation runs, closed under prefixes so every token has a merge that builds it.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

LLAMA3_VOCAB = 128256
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|python_tag|>"]
_SYLLABLES = [a + b for a in "bcdfghjklmnprstvwyz" for b in "aeiouy"] + list("aeiou") + ["th", "ng", "st", "er"]
_PUNCT = ['":', '",', '{"', '"}', '["', '"]', '":"', '":[', "},{", '"},', "  ", "\n", "\n  ", "\n    ", "://"]


def _words(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 5)))
        word = word.capitalize() if rng.random() < 0.2 else word
        out.append((" " + word) if rng.random() < 0.6 else word)
    out += [str(i) for i in range(1000)] + _PUNCT
    return out


def build_tokenizer(vocab_size: int = LLAMA3_VOCAB, seed: int = 0) -> Tokenizer:
    """A byte-level BPE tokenizer with exactly ``vocab_size`` ids, the last few of them special tokens."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    to_level = {b: c for b, c in zip(range(256), _byte_level_chars(), strict=True)}
    vocab: dict[str, int] = {c: i for i, c in enumerate(sorted(byte_chars))}
    merges: list[tuple[str, str]] = []
    rng = random.Random(seed)
    target = vocab_size - len(SPECIAL)
    while len(vocab) < target:
        for word in _words(rng, 4096):
            piece = "".join(to_level[b] for b in word.encode("utf-8"))
            for end in range(2, len(piece) + 1):  # every prefix is a token, so each has a merge
                if len(vocab) >= target:
                    break
                if piece[:end] not in vocab:
                    vocab[piece[:end]] = len(vocab)
                    merges.append((piece[: end - 1], piece[end - 1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    return tok


def _byte_level_chars() -> list[str]:
    """GPT-2's byte -> printable character table (what ByteLevel pre-tokenization writes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]

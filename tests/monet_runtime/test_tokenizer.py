"""Tokenizers: the checkpoint's tokenizer.json / tokenizer.model, or bytes when it has none."""

import shutil

import pytest

from monet_runtime import load_model
from monet_runtime.tokenizer import ByteTokenizer, load_tokenizer

TEXT = "def add(a, b):\n    return a + b  # héllo"


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer(512, bos_id=1, eos_ids=[2])
    ids = tok.encode(TEXT)
    assert ids[0] == 1 and all(3 <= i < 259 for i in ids[1:])
    assert tok.decode(ids) == TEXT
    # a vocabulary smaller than 259 maps the bytes it cannot hold to unk (0)
    small = ByteTokenizer(128)
    assert 0 in small.encode("é") and small.decode(small.encode("abc")) == "abc"
    assert [tok.token_str(i) for i in tok.encode("a é")] == [
        "<s>", "a", " ", "<0xC3>", "<0xA9>"]
    assert tok.token_str(2) == "</s>" and tok.encode("</s>", add_bos=False) != [2]


def test_checkpoint_without_tokenizer_gets_bytes(tiny_fixture):
    model = load_model(tiny_fixture / "model")
    assert isinstance(model.tokenizer, ByteTokenizer)
    assert model.tokenizer.decode(model.tokenizer.encode("hi")) == "hi"


def test_tokenizer_json(tmp_path, tiny_fixture):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    ckpt = shutil.copytree(tiny_fixture / "model", tmp_path / "ckpt")
    tok.save(str(ckpt / "tokenizer.json"))
    (ckpt / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    loaded = load_model(ckpt).tokenizer
    ids = loaded.encode(TEXT)
    assert ids[0] == 1 and loaded.decode(ids) == TEXT
    assert loaded.chat_template == "{{ messages }}"
    assert loaded.token_str(2) == "</s>" and loaded.encode("</s>", add_bos=False) == [2]


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([TEXT, "the quick brown fox jumps over the lazy dog"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=40, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    tok = load_tokenizer(tmp_path, vocab_size=40, bos_id=1, eos_ids=[2])
    ids = tok.encode("the lazy dog")
    assert ids[0] == 1 and tok.decode(ids) == "the lazy dog"
    assert tok.token_str(2) == "</s>"

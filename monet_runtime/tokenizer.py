"""Tokenizers: the checkpoint's own (tokenizer.json through `tokenizers`, or a LLaMA
SentencePiece tokenizer.model through `sentencepiece`) or a byte-level one for small models
that ship none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

__all__ = ["ByteTokenizer", "Tokenizer", "load_tokenizer"]


class Tokenizer(Protocol):
    bos_id: int | None
    eos_ids: list[int]
    chat_template: str | None

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_str(self, token_id: int) -> str:
        """The vocabulary's own string for one id (as Hugging Face's convert_ids_to_tokens)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids offset by 3 (0 unk/pad, 1 bos, 2 eos). Bytes beyond a small vocab
    map to unk, so tiny test models still tokenize any text."""

    OFFSET = 3

    def __init__(self, vocab_size: int, *, bos_id: int | None = 1, eos_ids: list[int] | None = None):
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids if eos_ids is not None else [2])
        self.chat_template = None

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        top = self.vocab_size - self.OFFSET
        ids = [b + self.OFFSET if b < top else 0 for b in text.encode("utf-8")]
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < self.OFFSET + 256)
        return data.decode("utf-8", errors="replace")

    SPECIALS = ("<unk>", "<s>", "</s>")

    def token_str(self, token_id: int) -> str:
        """"<s>" for the specials, the byte's character when printable ASCII, "<0xAB>"
        otherwise (SentencePiece's byte-fallback spelling). The specials' strings are names,
        not text: encoding "<s>" gives its three bytes."""
        if token_id < self.OFFSET:
            return self.SPECIALS[token_id]
        b = token_id - self.OFFSET
        return chr(b) if 0x20 <= b < 0x7f else f"<0x{b:02X}>"


class HFTokenizer:
    """tokenizer.json through the `tokenizers` library."""

    def __init__(self, path: Path, *, bos_id, eos_ids, chat_template):
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self.bos_id, self.eos_ids, self.chat_template = bos_id, eos_ids, chat_template

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_str(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or ""


class SentencePieceTokenizer:
    """LLaMA tokenizer.model through `sentencepiece`."""

    def __init__(self, path: Path, *, bos_id, eos_ids, chat_template):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_ids, self.chat_template = bos_id, eos_ids, chat_template

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = self._sp.encode(text)
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        specials = {self.bos_id, *self.eos_ids}
        return self._sp.decode([i for i in ids if i not in specials])

    def token_str(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)


def load_tokenizer(path: str | Path, *, vocab_size: int, bos_id: int | None,
                   eos_ids: list[int]) -> Tokenizer:
    path = Path(path)
    chat_template = None
    config_file = path / "tokenizer_config.json"
    if config_file.exists():
        chat_template = json.loads(config_file.read_text()).get("chat_template")
    kwargs = dict(bos_id=bos_id, eos_ids=eos_ids, chat_template=chat_template)
    if (path / "tokenizer.json").exists():
        return HFTokenizer(path / "tokenizer.json", **kwargs)
    if (path / "tokenizer.model").exists():
        return SentencePieceTokenizer(path / "tokenizer.model", **kwargs)
    tok = ByteTokenizer(vocab_size, bos_id=bos_id, eos_ids=eos_ids)
    tok.chat_template = chat_template
    return tok

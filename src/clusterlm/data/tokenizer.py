"""Tokenizers: one character per token, byte-level BPE, or any existing ``tokenizer.json``.

All are Hugging Face ``tokenizers`` objects saved as one ``tokenizer.json``. Both tokenizers built
here end their vocabulary with the special token ``<|endoftext|>``, which ``prepare`` puts after
every document so a model sees where one text ends and the next begins.

A BERT exported by ``clusterlm export hf`` ships its tokenizer with the encoder's special tokens
(``[MASK]``, ``[CLS]``, ``[SEP]``, ``[PAD]``) appended; they are not counted in ``vocab_size``,
since the encoder's token table appends them itself, so data prepared with that tokenizer trains
an encoder of the exported shape.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from clusterlm.data.special_tokens import SPECIAL_TOKENS
from clusterlm.data.storage import url_to_fs
from clusterlm.errors import UserError

EOT = "<|endoftext|>"
_BYTE_ALPHABET = 256


class Tokenizer:
    """Text <-> token ids, around a ``tokenizers.Tokenizer`` and the exact JSON it was saved as."""

    def __init__(self, tokenizer_json: str) -> None:
        self._json = tokenizer_json
        self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)

    @classmethod
    def char(cls, texts: Iterable[str]) -> Tokenizer:
        """One token per character seen in ``texts`` (ids in sorted character order), then EOT."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        chars = sorted(seen)
        vocab = {ch: i for i, ch in enumerate(chars)} | {EOT: len(chars)}
        # The unknown token is deliberately absent from the vocabulary: an unseen character is an
        # error, not a silent substitution.
        tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tokenizer.decoder = decoders.Fuse()
        tokenizer.add_special_tokens([EOT])
        return cls(tokenizer.to_str(pretty=True))

    @classmethod
    def bpe(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Byte-level BPE trained on ``texts``: every string encodes, and decodes back exactly."""
        if vocab_size < _BYTE_ALPHABET + 1:
            raise UserError(
                f"vocabulary size {vocab_size} is too small for byte-level BPE; "
                f"use at least {_BYTE_ALPHABET + 1} (256 bytes and the end-of-text token)"
            )
        tokenizer = tokenizers.Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer.to_str(pretty=True))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """A saved ``tokenizer.json`` (local path or URL), or ``hf:DIR`` for the one of a Hugging
        Face model directory; kept byte for byte so its hash is the file's."""
        if os.fspath(path).startswith("hf:"):
            path = f"{os.fspath(path)[3:].rstrip('/')}/tokenizer.json"
        fs, fs_path = url_to_fs(path)
        if not fs.isfile(fs_path):
            raise UserError(
                f"tokenizer {os.fspath(path)} does not exist; "
                "pass `char`, `bpe`, the path of a tokenizer.json "
                "or hf:DIR (a Hugging Face model directory with a tokenizer.json)"
            )
        try:
            return cls(fs.cat_file(fs_path).decode("utf-8"))
        except Exception as err:  # the tokenizers library reports bad files as plain Exception
            raise UserError(
                f"{os.fspath(path)} is not a valid tokenizer.json ({err}); pass `char`, `bpe` or "
                "a file saved by the tokenizers library"
            ) from err

    def save(self, path: str | os.PathLike[str]) -> None:
        fs, fs_path = url_to_fs(path)
        fs.pipe_file(fs_path, self._json.encode("utf-8"))

    def to_json(self) -> str:
        return self._json

    @property
    def sha256(self) -> str:
        """Hash of the saved ``tokenizer.json`` bytes: two tokenizers agree iff their hashes do."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()

    @property
    def vocab_size(self) -> int:
        """Ids of the vocabulary, less the encoder's special tokens when they end it.

        See the module docstring.
        """
        size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        first = size - len(SPECIAL_TOKENS)
        ends_with_specials = first > 0 and all(
            self._tokenizer.id_to_token(first + i) == token
            for i, token in enumerate(SPECIAL_TOKENS)
        )
        return first if ends_with_specials else size

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def with_special_tokens(self, tokens: Iterable[str]) -> Tokenizer:
        """This tokenizer with ``tokens`` added as special tokens after its vocabulary (those it
        already has keep their ids; with all of them, it is returned unchanged, byte for byte)."""
        tokens = list(tokens)
        if all(self.token_id(token) is not None for token in tokens):
            return self
        tokenizer = tokenizers.Tokenizer.from_str(self._json)
        tokenizer.add_special_tokens(
            [tokenizers.AddedToken(token, special=True) for token in tokens]
        )
        return Tokenizer(tokenizer.to_str(pretty=True))

    @property
    def eot_id(self) -> int | None:
        """Id of the end-of-text token, or None for a loaded tokenizer that has none."""
        return self._tokenizer.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        try:
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        except Exception as err:  # e.g. a character the char tokenizer never saw
            raise _unencodable(err) from err

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text, using the library's threads."""
        try:
            return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]
        except Exception as err:
            raise _unencodable(err) from err

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


def _unencodable(err: Exception) -> UserError:
    return UserError(
        f"cannot encode text ({err}); use text the tokenizer's vocabulary covers "
        "(a char tokenizer knows only the characters of its training text)"
    )

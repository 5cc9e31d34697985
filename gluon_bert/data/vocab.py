"""Whitespace tokenization and the vocabulary the book's BERT chapters use.

Token order matters: a vocabulary is saved as the list `idx_to_token`
(`vocab.json`, the format inside the book's `bert.small`/`bert.base` archives),
so a model checkpoint is only usable with the exact order it was trained with.

Two orders are offered:

* ``order='frequency'`` (default): ``'<unk>'`` at index 0, then the reserved
  tokens in the order given, then the remaining tokens by decreasing frequency,
  ties in order of first appearance. This is the vocabulary of the book's text
  (d2l < 1.0) and of its published checkpoints; ``unk`` is always 0.
* ``order='sorted'``: every kept token sorted by code point, as
  ``d2l.Vocab`` of d2l 1.0.x builds it (so ``'<cls>'`` comes before ``'<unk>'``
  and ``unk`` is not 0). Use it to compare arrays with the installed d2l.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Iterable, Sequence

from ..errors import DataError, MissingFileError  # noqa: F401  (re-exported)

__all__ = ['RESERVED_TOKENS', 'tokenize', 'Vocab', 'MissingFileError', 'decode_utf8']

# BERT's special tokens, in the order the book reserves them.
RESERVED_TOKENS = ['<pad>', '<mask>', '<cls>', '<sep>']
UNK = '<unk>'


def read_bytes(path: str, what: str = 'file') -> bytes:
    """The bytes of an input file; a missing or unreadable one is one error naming it."""
    try:
        with open(path, 'rb') as f:
            return f.read()
    except FileNotFoundError:
        raise MissingFileError(f'{path}: no such {what}') from None
    except OSError as err:
        raise DataError(f'{path}: cannot be read ({err.strerror or err})') from None


def decode_utf8(data: bytes, path: str) -> str:
    """`data` (the bytes of `path`) as text; bytes that are not UTF-8 raise a DataError
    naming the file, the line and the column (in bytes) of the first bad byte."""
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as err:
        lineno = data.count(b'\n', 0, err.start) + 1
        column = err.start - (data.rfind(b'\n', 0, err.start) + 1) + 1
        raise DataError(f'{path}, line {lineno}: not UTF-8 text (byte {data[err.start]:#04x} '
                        f'at column {column})') from None


def tokenize(lines: Iterable[str], token: str = 'word') -> list[list[str]]:
    """Split each line into word tokens (on whitespace) or into characters."""
    if token == 'word':
        return [line.split() for line in lines]
    if token == 'char':
        return [list(line) for line in lines]
    raise ValueError(f"unknown token type {token!r}: use 'word' or 'char'")


def _flatten(tokens) -> list[str]:
    tokens = list(tokens) if tokens is not None else []
    if tokens and isinstance(tokens[0], (list, tuple)):
        return [tok for line in tokens for tok in line]
    return tokens


class Vocab:
    """Map tokens to indices and back; unknown tokens map to ``'<unk>'``."""

    def __init__(self, tokens=None, min_freq: int = 0,
                 reserved_tokens: Sequence[str] | None = None, *, order: str = 'frequency'):
        reserved = list(reserved_tokens or [])
        counter = collections.Counter(_flatten(tokens))
        # Counter keeps first-appearance order and sorted() is stable, so equal
        # counts stay in order of first appearance.
        self.token_freqs = sorted(counter.items(), key=lambda kv: kv[1], reverse=True)
        kept = [tok for tok, freq in self.token_freqs if freq >= min_freq]
        if order == 'frequency':
            idx_to_token = [UNK] + [t for t in dict.fromkeys(reserved) if t != UNK]
            seen = set(idx_to_token)
            idx_to_token += [t for t in kept if t not in seen]
        elif order == 'sorted':
            idx_to_token = sorted(set([UNK] + reserved + kept))
        else:
            raise ValueError(f"unknown vocabulary order {order!r}: use 'frequency' or 'sorted'")
        self._set_tokens(idx_to_token)

    def _set_tokens(self, idx_to_token: list[str]) -> None:
        self.idx_to_token = list(idx_to_token)
        self.token_to_idx = {tok: idx for idx, tok in enumerate(self.idx_to_token)}
        if len(self.token_to_idx) != len(self.idx_to_token):
            dup = [t for t, n in collections.Counter(self.idx_to_token).items() if n > 1]
            raise ValueError(f'vocabulary has duplicate tokens: {dup[:5]}')
        if UNK not in self.token_to_idx:
            raise ValueError(f"vocabulary has no {UNK!r} token")

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __getitem__(self, tokens):
        if isinstance(tokens, (list, tuple)):
            get, unk = self.token_to_idx.get, self.unk
            return [get(tok, unk) for tok in tokens]
        return self.token_to_idx.get(tokens, self.unk)

    def __contains__(self, token) -> bool:
        return token in self.token_to_idx

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.idx_to_token == other.idx_to_token

    def __repr__(self) -> str:
        head = ', '.join(self.idx_to_token[:8])
        return f'Vocab(size={len(self)}, tokens=[{head}, ...])'

    def to_tokens(self, indices):
        """Index -> token, or a sequence of indices -> list of tokens."""
        if hasattr(indices, '__len__') and not isinstance(indices, str):
            return [self.idx_to_token[int(i)] for i in indices]
        return self.idx_to_token[int(indices)]

    @property
    def unk(self) -> int:
        return self.token_to_idx[UNK]

    def save(self, path: str) -> str:
        """Write ``idx_to_token`` as a JSON list; `path` may be a folder (-> vocab.json)."""
        if os.path.isdir(path):
            path = os.path.join(path, 'vocab.json')
        tmp = f'{path}.tmp{os.getpid()}'
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(self.idx_to_token, f, ensure_ascii=False)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> 'Vocab':
        """Read a vocabulary saved by `save` or shipped in the book's checkpoints; a
        `WordPieceVocab`'s vocab.json gives that kind back.

        A file that is missing, not UTF-8 or not a JSON list of distinct strings with
        ``'<unk>'`` raises a DataError naming it.
        """
        if os.path.isdir(path):
            path = os.path.join(path, 'vocab.json')
        data = read_bytes(path, 'vocabulary file')
        try:
            tokens = json.loads(decode_utf8(data, path))
        except json.JSONDecodeError as err:
            raise DataError(f'{path}, line {err.lineno}: not a JSON vocabulary '
                            f'({err.msg})') from None
        if isinstance(tokens, dict) and tokens.get('kind') == 'wordpiece':
            # a real BERT's vocabulary, saved with its tokenizer (data/tokenization.py)
            from .tokenization import WordPieceVocab
            return WordPieceVocab.from_dict(tokens, path)
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError(f'{path}: a vocabulary must be a JSON list of strings')
        vocab = cls.__new__(cls)
        vocab.token_freqs = []
        try:
            vocab._set_tokens(tokens)
        except ValueError as err:
            raise DataError(f'{path}: {err}') from None
        return vocab

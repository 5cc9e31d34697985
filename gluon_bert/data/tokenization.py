"""Tokenization as a step of the data pipeline: the book's whitespace tokens or WordPiece.

A model's vocabulary decides how text becomes ids, so the vocabulary object carries its
tokenizer:

* `Vocab` (the book's, `vocab.py`): lower-case, split on whitespace, look each token up;
  specials `<pad>`, `<cls>`, `<sep>`, `<mask>`, `<unk>`.
* `WordPieceVocab` (real BERTs): BERT's basic tokenization (clean, lower-case and strip
  accents for uncased models, split punctuation and CJK characters) then greedy
  longest-match WordPiece, through GluonNLP's `BERTTokenizer` (the `gluonnlp` extra);
  specials `[PAD]`, `[CLS]`, `[SEP]`, `[MASK]`, `[UNK]`.

`sentence_encoder(vocab)` gives the picklable function that `SNLIBERTDataset` runs in its
workers: sentences -> (lengths, flat ids). Both encoders work on all sentences at once:
the whitespace split runs in C over the joined text, and WordPiece runs once per distinct
word (SNLI's 550k pairs have about 40k), which is exact because BERT's basic tokenizer
never joins text across whitespace.

A `WordPieceVocab` saves itself as `vocab.json` (a JSON object with `"kind": "wordpiece"`,
its tokens, specials and casing) beside every checkpoint, and `Vocab.load` reads either
kind, so a fine-tuned checkpoint keeps the tokenizer its BERT came with.
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping, Sequence

import numpy as np

from ..errors import DataError
from .vocab import Vocab, decode_utf8, read_bytes

__all__ = ['WordPieceVocab', 'sentence_encoder', 'special_ids', 'WORDPIECE_SPECIALS',
           'wordpiece_tokenizer']

# role -> token, as BERT's vocab.txt files name them
WORDPIECE_SPECIALS = {'unk': '[UNK]', 'pad': '[PAD]', 'cls': '[CLS]', 'sep': '[SEP]',
                      'mask': '[MASK]'}
_BOOK_SPECIALS = {'unk': '<unk>', 'pad': '<pad>', 'cls': '<cls>', 'sep': '<sep>',
                  'mask': '<mask>'}
KIND = 'wordpiece'

_SENTINEL = '\x00'  # between sentences; not whitespace, so split() keeps it as a token
# Characters where Python's str.split() and BERT's whitespace rule disagree (Python splits
# on them, BERT deletes them as control characters): text with any goes the slow way.
_SPLIT_MISMATCH = re.compile('[\x0b\x0c\x1c-\x1f\x85\u2028\u2029]')


def special_ids(vocab) -> tuple[int, int, int]:
    """The ids of (pad, cls, sep) in either kind of vocabulary."""
    specials = getattr(vocab, 'special', _BOOK_SPECIALS)
    missing = [specials[r] for r in ('pad', 'cls', 'sep') if specials[r] not in vocab]
    if missing:
        raise ValueError(f'vocabulary lacks the special token {missing[0]!r}')
    return tuple(vocab.token_to_idx[specials[r]] for r in ('pad', 'cls', 'sep'))


class _TokenSet:
    """What GluonNLP's WordPiece tokenizer needs of a vocabulary: membership and unk."""

    def __init__(self, tokens, unknown_token):
        self._tokens = frozenset(tokens)
        self.unknown_token = unknown_token

    def __contains__(self, token):
        return token in self._tokens


def wordpiece_tokenizer(tokens: Sequence[str], lower: bool, unk: str = '[UNK]'):
    """GluonNLP's `BERTTokenizer` over `tokens` (no GluonNLP vocabulary object needed)."""
    try:
        from gluonnlp.data import BERTTokenizer
    except ImportError as err:
        raise DataError(f'WordPiece tokenization needs GluonNLP ({err}): '
                        'pip install "gluon-bert[gluonnlp]"') from None
    return BERTTokenizer(_TokenSet(tokens, unk), lower=lower)


class WordPieceVocab(Vocab):
    """A BERT vocabulary (`vocab.txt` or GluonNLP's `.vocab`) and its WordPiece tokenizer.

    Indexing, `len`, `to_tokens`, `unk` and `save` work as the book's `Vocab`;
    `tokenize(text)` gives WordPiece tokens and `encode(text)` their ids.
    """

    def __init__(self, tokens: Sequence[str], lower: bool = True,
                 special: Mapping[str, str] | None = None):
        self.token_freqs = []
        self.lower = bool(lower)
        self.special = dict(WORDPIECE_SPECIALS, **(special or {}))
        self._tokenizer = None
        self._set_tokens(list(tokens))

    def _set_tokens(self, idx_to_token):
        self.idx_to_token = list(idx_to_token)
        self.token_to_idx = {tok: idx for idx, tok in enumerate(self.idx_to_token)}
        if len(self.token_to_idx) != len(self.idx_to_token):
            raise ValueError('vocabulary has duplicate tokens')
        missing = [t for t in self.special.values() if t not in self.token_to_idx]
        if missing:
            raise ValueError(f'vocabulary lacks the special tokens {missing}')

    @property
    def unk(self) -> int:
        return self.token_to_idx[self.special['unk']]

    def __eq__(self, other) -> bool:
        return (isinstance(other, WordPieceVocab) and self.idx_to_token == other.idx_to_token
                and self.lower == other.lower and self.special == other.special)

    def __repr__(self) -> str:
        return (f'WordPieceVocab(size={len(self)}, lower={self.lower}, '
                f'tokens=[{", ".join(self.idx_to_token[:5])}, ...])')

    def __getstate__(self):  # the tokenizer is rebuilt where it is used
        return dict(self.__dict__, _tokenizer=None)

    # -- tokenization ---------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        if self._tokenizer is None:
            self._tokenizer = wordpiece_tokenizer(self.idx_to_token, self.lower,
                                                  self.special['unk'])
        return self._tokenizer(text)

    def encode(self, text: str) -> list[int]:
        return self[self.tokenize(text)]

    # -- files ----------------------------------------------------------------------------
    def to_dict(self):
        return {'kind': KIND, 'lower': self.lower, 'special': self.special,
                'idx_to_token': self.idx_to_token}

    def save(self, path: str) -> str:
        """Write the vocabulary as vocab.json (`path` may be a folder), atomically."""
        if os.path.isdir(path):
            path = os.path.join(path, 'vocab.json')
        tmp = f'{path}.tmp{os.getpid()}'
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, obj, path='vocab.json') -> 'WordPieceVocab':
        try:
            tokens, lower, special = obj['idx_to_token'], obj['lower'], obj['special']
            if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
                raise TypeError('idx_to_token must be a list of strings')
            return cls(tokens, lower=bool(lower), special=special)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f'{path}: not a usable WordPiece vocabulary ({err})') from None

    @classmethod
    def from_vocab_txt(cls, path: str, lower: bool = True) -> 'WordPieceVocab':
        """BERT's vocab.txt (Google's and Hugging Face's): one token per line, id = line."""
        text = decode_utf8(read_bytes(path, 'vocabulary file'), path)
        tokens = text.split('\n')
        if tokens and tokens[-1] == '':
            tokens.pop()
        tokens = [t.rstrip('\r') for t in tokens]
        try:
            return cls(tokens, lower=lower)
        except ValueError as err:
            raise DataError(f'{path}: {err}') from None

    @classmethod
    def from_gluonnlp(cls, path: str, lower: bool = True) -> 'WordPieceVocab':
        """GluonNLP's `.vocab` (a `BERTVocab.to_json()`): its own token order and specials."""
        try:
            obj = json.loads(decode_utf8(read_bytes(path, 'vocabulary file'), path))
            named = obj.get('identifiers_to_tokens') or {}
            special = {'unk': obj.get('unknown_token') or WORDPIECE_SPECIALS['unk']}
            for role in ('pad', 'cls', 'sep', 'mask'):
                key = 'padding_token' if role == 'pad' else f'{role}_token'
                special[role] = named.get(key) or obj.get(key) or WORDPIECE_SPECIALS[role]
            return cls(obj['idx_to_token'], lower=lower, special=special)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DataError(f'{path}: not a GluonNLP BERT vocabulary ({err})') from None


# -- sentence encoders (run in SNLIBERTDataset's workers) ----------------------------------

class _Lookup(dict):
    """token -> id with unknown tokens mapped to `unk` (dict lookup stays in C)."""
    __slots__ = ('unk',)

    def __missing__(self, key):
        return self.unk


def _joined_words(sentences, lower):
    """All sentences' whitespace tokens in one C-level split, with a sentinel after each
    sentence; None when the fast path does not apply."""
    text = f' {_SENTINEL} '.join(sentences)
    if text.count(_SENTINEL) != len(sentences) - 1:  # a sentence contains the sentinel
        return None
    words = (text.lower() if lower else text).split()
    words.append(_SENTINEL)
    return words, text


def _lengths_and_ids(ids):
    """Flat ids with -1 after each sentence -> (lengths int32, ids int32)."""
    ends = np.flatnonzero(ids == -1)
    lens = np.diff(ends, prepend=-1).astype(np.int32) - 1
    return lens, ids[ids != -1]


class BookEncoder:
    """The book's `tokenize([s.lower() for s in sentences])` + vocabulary lookup."""

    def __init__(self, token_to_idx, unk):
        self.token_to_idx, self.unk = token_to_idx, unk
        self._lookup = None

    def __getstate__(self):
        return {'token_to_idx': self.token_to_idx, 'unk': self.unk, '_lookup': None}

    def __call__(self, sentences: Sequence[str]):
        if self._lookup is None:
            self._lookup = _Lookup(self.token_to_idx)
            self._lookup.unk = self.unk
        lookup = self._lookup
        if len(sentences) == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.int32)
        joined = _joined_words(sentences, lower=True)
        if joined is None:
            return self._slow(sentences)
        words = joined[0]
        lookup[_SENTINEL] = -1
        try:
            ids = np.fromiter(map(lookup.__getitem__, words), dtype=np.int32, count=len(words))
        finally:
            del lookup[_SENTINEL]
        return _lengths_and_ids(ids)

    def _slow(self, sentences):
        lens = np.empty(len(sentences), dtype=np.int32)
        flat: list[str] = []
        for i, s in enumerate(sentences):
            toks = s.lower().split()
            lens[i] = len(toks)
            flat.extend(toks)
        ids = np.fromiter(map(self._lookup.__getitem__, flat), dtype=np.int32, count=len(flat))
        return lens, ids


class WordPieceEncoder:
    """WordPiece ids of many sentences; each distinct whitespace word is tokenized once."""

    def __init__(self, vocab: WordPieceVocab):
        self.vocab = vocab

    def __call__(self, sentences: Sequence[str]):
        vocab = self.vocab
        if len(sentences) == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.int32)
        # Lower-casing is the tokenizer's (with accent stripping); split the raw text.
        joined = _joined_words(sentences, lower=False)
        if joined is None or _SPLIT_MISMATCH.search(joined[1]):
            return self._slow(sentences)
        words = joined[0]
        # word -> index among distinct words; the sentinel is word 0 and stands for -1
        index = {_SENTINEL: 0}
        word_idx = np.fromiter((index.setdefault(w, len(index)) for w in words),
                               dtype=np.int64, count=len(words))
        pieces = [[-1]] + [vocab.encode(w) for w in list(index)[1:]]
        piece_lens = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        piece_ids = np.fromiter((i for p in pieces for i in p), dtype=np.int32,
                                count=int(piece_lens.sum()))
        piece_starts = np.cumsum(piece_lens) - piece_lens
        # every word's pieces, in order: start of word w's run + position inside it
        n = piece_lens[word_idx]
        within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        ids = piece_ids[np.repeat(piece_starts[word_idx], n) + within]
        return _lengths_and_ids(ids)

    def _slow(self, sentences):
        encoded = [self.vocab.encode(s) for s in sentences]
        lens = np.fromiter(map(len, encoded), dtype=np.int32, count=len(encoded))
        ids = np.fromiter((i for e in encoded for i in e), dtype=np.int32, count=int(lens.sum()))
        return lens, ids


def sentence_encoder(vocab):
    """The picklable sentences -> (lengths, flat ids) function of `vocab`'s tokenizer."""
    if isinstance(vocab, WordPieceVocab):
        return WordPieceEncoder(vocab)
    return BookEncoder(vocab.token_to_idx, vocab.unk)

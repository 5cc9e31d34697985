"""SNLI: read the official files and build BERT fine-tuning examples fast.

Labels follow the book: entailment 0, contradiction 1, neutral 2; pairs whose
gold label is ``-`` (no annotator majority) are dropped, nothing else is.

`SNLIBERTDataset` packs each pair as ``<cls> premise <sep> hypothesis <sep>``
with segment ids 0 for ``<cls> premise <sep>`` and 1 for ``hypothesis <sep>``,
padded with ``<pad>`` to ``max_len``; its arrays equal those of the book's
``SNLIBERTDataset`` for the same vocabulary. The book maps each pair in a
``multiprocessing.Pool(4)``, which pickles every pair and every padded row
(about 20 s for the 550,152 training pairs on 2 cores). Here each worker takes
a large chunk of pairs, encodes each distinct sentence once into one flat id
array, then truncates, places and pads all its pairs with vectorised numpy,
writing straight into shared output arrays (about 2-3 s on 2 cores).

The tokenizer is the vocabulary's (`tokenization.py`): the book's whitespace split, or
WordPiece for a real BERT's `WordPieceVocab`, which packs ``[CLS] p [SEP] h [SEP]`` and
tokenizes each distinct word of the split once.
"""
from __future__ import annotations

import gzip
import json
import logging
import multiprocessing
import os
import zlib
from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .batching import BatchLoader
from .tokenization import sentence_encoder, special_ids
from .vocab import RESERVED_TOKENS, MissingFileError, Vocab

__all__ = ['LABELS', 'read_snli', 'tokenize_like_snli', 'SNLIFormatError', 'SNLIBERTDataset',
           'load_data_snli', 'truncate_lengths', 'snli_file']

log = logging.getLogger(__name__)

LABELS = {'entailment': 0, 'contradiction': 1, 'neutral': 2}
NO_LABEL = '-'
SPLITS = ('train', 'dev', 'test')
# Text columns by preference: the book reads the binary parses; the d2l_compat
# and the gold_pairs files carry tokenized sentences instead.
_TEXT_COLUMNS = {
    1: ('sentence1_binary_parse', 'sentence1_tokens', 'sentence1_tok', 'sentence1'),
    2: ('sentence2_binary_parse', 'sentence2_tokens', 'sentence2_tok', 'sentence2'),
}
# Candidate file names of one split inside a folder, in order of preference.
_SPLIT_FILES = ('snli_1.0_{}.txt', 'snli_1.0_{}.txt.gz', 'snli_1.0_{}.jsonl',
                'snli_1.0_{}.jsonl.gz', 'snli_1.0_{}.d2l_compat.txt.gz',
                'snli_1.0_{}.d2l_compat.txt', 'snli_1.0_{}.gold_pairs.jsonl.gz',
                'snli_1.0_{}.gold_pairs.jsonl')


class SNLIFormatError(DataError):
    """A malformed or unreadable SNLI file; the message names the file and the line."""


def snli_file(path_or_dir: str, split: str = 'train') -> str:
    """The file of `split` in a folder (official or d2l_compat names), or the file itself."""
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    if os.path.isfile(path_or_dir):
        return path_or_dir
    if not os.path.isdir(path_or_dir):
        raise MissingFileError(f'SNLI data not found: {path_or_dir} is neither a file nor '
                               'a folder')
    names = [pattern.format(split) for pattern in _SPLIT_FILES]
    for name in names:
        path = os.path.join(path_or_dir, name)
        if os.path.isfile(path):
            return path
    raise MissingFileError(f'no {split!r} split of SNLI in {path_or_dir}: looked for '
                           + ', '.join(names))


def _binary_parse_text(s: str) -> str:
    # Book's rule: drop the brackets of the binary parse, squeeze whitespace.
    return ' '.join(s.replace('(', '').replace(')', '').split())


def _column_text(column: str, value: str) -> str:
    return _binary_parse_text(value) if column.endswith('binary_parse') else value.strip()


def _open_lines(path: str):
    """The raw lines of `path` (gunzipped for .gz); an unreadable file raises SNLIFormatError
    naming the line it could not read."""
    opener = gzip.open if path.endswith('.gz') else open
    lineno = 0
    try:
        with opener(path, 'rb') as f:
            for line in f:
                lineno += 1
                yield line
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise SNLIFormatError(f'{path}, line {lineno + 1}: not a readable gzip file, damaged '
                              f'or truncated ({err})') from None
    except OSError as err:
        raise SNLIFormatError(f'{path}, line {lineno + 1}: cannot be read '
                              f'({err.strerror or err})') from None


def read_snli(path_or_dir: str, split: str = 'train', on_error: str = 'raise',
              report: dict | None = None):
    """Read one SNLI split -> (premises, hypotheses, labels).

    `path_or_dir` is a folder holding ``snli_1.0_<split>.{txt,jsonl}[.gz]`` (or
    the ``d2l_compat``/``gold_pairs`` files), or one such file. Formats: the
    official 14-column tab-separated text with header, the official JSON lines,
    and any tab-separated file whose header names ``gold_label`` and the sentence
    columns. Malformed rows raise `SNLIFormatError` naming file and line, or with
    ``on_error='skip'`` are skipped, counted in `report` and logged.
    """
    if on_error not in ('raise', 'skip'):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = snli_file(path_or_dir, split)
    stats = {'file': path, 'rows': 0, 'kept': 0, 'no_gold_label': 0, 'skipped': 0,
             'errors': []}
    premises, hypotheses, labels = [], [], []

    def bad(lineno, msg):
        full = f'{path}, line {lineno}: {msg}'
        if on_error == 'raise':
            raise SNLIFormatError(full)
        stats['skipped'] += 1
        if len(stats['errors']) < 20:
            stats['errors'].append(full)

    is_json = path.endswith('.jsonl') or path.endswith('.jsonl.gz')
    columns = None
    lineno = 0
    for lineno, raw in enumerate(_open_lines(path), start=1):
        try:
            line = raw.decode('utf-8')
        except UnicodeDecodeError as err:
            bad(lineno, f'not UTF-8 text (byte {raw[err.start]:#04x} at column '
                        f'{err.start + 1})')
            continue
        line = line.rstrip('\r\n')
        if not is_json and columns is None:
            columns = line.split('\t')
            if 'gold_label' not in columns:
                raise SNLIFormatError(f'{path}, line 1: header has no gold_label column '
                                      f'(got {line[:80]!r})')
            text_cols = {}
            for side, names in _TEXT_COLUMNS.items():
                found = [c for c in names if c in columns]
                if not found:
                    raise SNLIFormatError(f'{path}, line 1: header has none of the columns '
                                          f'{names}')
                text_cols[side] = (found[0], columns.index(found[0]))
            gold_col = columns.index('gold_label')
            continue
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) carry no pair
        stats['rows'] += 1
        if is_json:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                bad(lineno, f'invalid JSON ({err.msg})')
                continue
            if not isinstance(obj, dict) or 'gold_label' not in obj:
                bad(lineno, 'JSON object without gold_label')
                continue
            label = obj['gold_label']
            texts = []
            for side, names in _TEXT_COLUMNS.items():
                name = next((c for c in names if isinstance(obj.get(c), str)), None)
                if name is None:
                    break
                texts.append(_column_text(name, obj[name]))
            if len(texts) != 2:
                bad(lineno, f'JSON object has none of the keys {_TEXT_COLUMNS[len(texts) + 1]}')
                continue
        else:
            row = line.split('\t')
            if len(row) != len(columns):
                bad(lineno, f'expected {len(columns)} tab-separated columns as in the header, '
                            f'got {len(row)}')
                continue
            label = row[gold_col]
            texts = [_column_text(name, row[i]) for name, i in text_cols.values()]
        if label == NO_LABEL:
            stats['no_gold_label'] += 1
            continue
        if label not in LABELS:
            bad(lineno, f'unknown gold label {label!r} (expected one of '
                        f'{sorted(LABELS)} or {NO_LABEL!r})')
            continue
        premises.append(texts[0])
        hypotheses.append(texts[1])
        labels.append(LABELS[label])
    if lineno == 0:
        expected = 'JSON lines' if is_json else 'a header line and pairs'
        raise SNLIFormatError(f'{path}, line 1: file is empty (expected {expected})')
    stats['kept'] = len(labels)
    if not labels:  # a header alone, or only '-' / skipped rows: nothing to train or test on
        raise SNLIFormatError(f'{path}: no labelled pairs in {lineno} lines '
                              f'({stats["no_gold_label"]} without a gold label, '
                              f'{stats["skipped"]} malformed)')
    if stats['skipped']:
        log.warning('%s: skipped %d malformed rows of %d (first: %s)', path, stats['skipped'],
                    stats['rows'], stats['errors'][0])
    if report is not None:
        report.update(stats)
    return premises, hypotheses, labels


def tokenize_like_snli(sentence: str) -> str:
    """A raw sentence split into tokens as SNLI's parses split them (Penn Treebank rules:
    'walking.' -> 'walking .', "isn't" -> "is n't"), joined by spaces. Text that a model was
    fine-tuned on came from those parses, so typed input must be split the same way."""
    from nltk.tokenize import TreebankWordTokenizer
    return ' '.join(TreebankWordTokenizer().tokenize(sentence))


# ---------------------------------------------------------------------------
# Pair truncation (lengths only, vectorised over all pairs)

def truncate_lengths(p_lens, h_lens, max_len: int, rule: str = 'longest_first'):
    """Kept lengths (a, b) of each (premise, hypothesis) so that a + b + 3 <= max_len.

    ``longest_first`` is the book's rule: while too long, drop the last token
    of the premise if it is strictly longer, else of the hypothesis. Its result
    in closed form: a = min(p, max(ceil(B/2), B - h)), b = B - a, with B = max_len - 3.
    ``ratio`` (the book's exercise) keeps each side in proportion to its length,
    a = round(B * p / (p + h)), and keeps at least one token of each non-empty side.
    """
    if max_len < 3:
        raise ValueError(f'max_len must be at least 3 (<cls> and two <sep>), got {max_len}')
    p = np.asarray(p_lens, dtype=np.int64)
    h = np.asarray(h_lens, dtype=np.int64)
    budget = max_len - 3
    over = p + h > budget
    if rule == 'longest_first':
        a = np.minimum(p, np.maximum(-(-budget // 2), budget - h))
    elif rule == 'ratio':
        total = np.maximum(p + h, 1)
        a = (2 * budget * p + total) // (2 * total)  # round half up, in integers
        if budget >= 2:
            a = np.clip(a, np.minimum(p, 1), budget - np.minimum(h, 1))
        a = np.minimum(a, p)
    else:
        raise ValueError(f"truncation must be 'longest_first' or 'ratio', got {rule!r}")
    a = np.where(over, a, p)
    b = np.where(over, budget - a, h)
    return a, b


# ---------------------------------------------------------------------------
# Token ids, in worker processes

_WORKER_ENCODER = None  # the vocabulary's sentence encoder, in each worker


def _init_worker(encoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _encode_side(sentences: Sequence[str], encoder):
    """-> (lengths, flat ids) of the distinct sentences, and each sentence's index among them.

    SNLI lists every premise with its three or so hypotheses, so encoding each
    distinct sentence once saves most of the premise work. `encoder` is the vocabulary's
    tokenizer (`tokenization.sentence_encoder`): whitespace + lookup, or WordPiece.
    """
    index: dict[str, int] = {}
    inverse = np.fromiter((index.setdefault(s, len(index)) for s in sentences),
                          dtype=np.int32, count=len(sentences))
    lens, ids = encoder(list(index))
    return lens, ids, inverse


# Under the fork start method the workers inherit the sentences and the shared
# output arrays through this global: nothing is pickled but (start, end).
_FORK_INPUT: tuple | None = None


def _encode_chunk(args):
    premises, hypotheses = args
    return _encode_side(premises, _WORKER_ENCODER), _encode_side(hypotheses, _WORKER_ENCODER)


def _merge_sides(parts):
    """Concatenate per-chunk (lens, ids, inverse) -> per-pair (lens, starts) and flat ids."""
    lens = np.concatenate([p[0] for p in parts]).astype(np.int64)
    ids = np.concatenate([p[1] for p in parts])
    offsets = np.cumsum([0] + [len(p[0]) for p in parts[:-1]])
    inverse = np.concatenate([p[2].astype(np.int64) + off for p, off in zip(parts, offsets)])
    starts = np.cumsum(lens) - lens
    return lens[inverse], starts[inverse], ids


def _pack_rows(tokens, segments, valid_lens, premise, hypothesis, max_len, rule, special):
    """Truncate, place and pad pairs into the given rows (all pairs at once, vectorised).

    `premise`/`hypothesis` are (lens, starts, flat ids) per pair; `special` is the
    ids of (<pad>, <cls>, <sep>). `segments` must arrive zeroed.
    """
    (p_lens, p_starts, p_ids), (h_lens, h_starts, h_ids) = premise, hypothesis
    pad, cls, sep = special
    n, L = len(p_lens), max_len
    a, b = truncate_lengths(p_lens, h_lens, L, rule)
    tokens[...] = pad
    flat_tokens, flat_segments = tokens.reshape(-1), segments.reshape(-1)
    row_start = np.arange(n, dtype=np.int64) * L  # flat index of each row's column 0
    flat_tokens[row_start] = cls
    # Copy the kept tokens of each side: token t of pair i goes to column
    # first_col[i] + t and comes from ids[starts[i] + t].
    for keep, starts, ids, first_col, segment in (
            (a, p_starts, p_ids, np.ones(n, np.int64), 0), (b, h_starts, h_ids, a + 2, 1)):
        within = np.arange(int(keep.sum())) - np.repeat(np.cumsum(keep) - keep, keep)
        dest = np.repeat(row_start + first_col, keep) + within
        flat_tokens[dest] = ids[np.repeat(starts, keep) + within]
        if segment:
            flat_segments[dest] = 1
    flat_tokens[row_start + a + 1] = sep
    flat_tokens[row_start + a + b + 2] = sep
    flat_segments[row_start + a + b + 2] = 1  # the last <sep> belongs to segment B
    valid_lens[:] = a + b + 3


def _shared_array(shape, dtype):
    """A zeroed array in anonymous shared memory: forked workers write into it directly."""
    import mmap
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, max(size, 1))
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def _encode_and_pack(bounds):
    """Fork worker: encode pairs [start, end) and pack them into the shared arrays."""
    start, end = bounds
    premises, hypotheses, out, max_len, rule, special = _FORK_INPUT
    parts = _encode_chunk((premises[start:end], hypotheses[start:end]))
    _pack_rows(out[0][start:end], out[1][start:end], out[2][start:end],
               _merge_sides([parts[0]]), _merge_sides([parts[1]]), max_len, rule, special)
    return end - start


def _default_workers() -> int:
    try:
        return max(1, min(4, len(os.sched_getaffinity(0))))
    except AttributeError:  # not Linux
        return max(1, min(4, os.cpu_count() or 1))


def _start_method(requested: str | None) -> str:
    method = requested or os.environ.get('GLUON_BERT_MP_START')
    if method:
        return method
    # fork is cheapest and the workers touch neither MXNet nor a GPU; pass
    # 'forkserver' or 'spawn' where forking this process is unsafe.
    return 'fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn'


class SNLIBERTDataset:
    """BERT inputs for sentence pairs; the book's `SNLIBERTDataset`, fast.

    dataset: (premises, hypotheses, labels) as `read_snli` returns them.
    vocab: the pretrained BERT's vocabulary (built from the pairs with
    min_freq=5 when None); its kind is the tokenizer: the book's `Vocab` splits
    lower-cased text on whitespace, a `WordPieceVocab` (real BERTs) runs WordPiece and
    packs `[CLS] p [SEP] h [SEP]`. truncation: 'longest_first' (book) or 'ratio'.
    num_workers: worker processes (default: usable cores, at most 4; 0 or 1 runs
    in this process). start_method: multiprocessing start method ('fork' by
    default where available; env GLUON_BERT_MP_START).
    """

    # Below this many pairs the pool costs more than it saves.
    MIN_PAIRS_FOR_POOL = 20_000

    def __init__(self, dataset, max_len: int, vocab: Vocab | None = None,
                 truncation: str = 'longest_first', num_workers: int | None = None,
                 start_method: str | None = None, verbose: bool = False):
        premises, hypotheses, labels = dataset[0], dataset[1], dataset[2]
        if not len(premises) == len(hypotheses) == len(labels):
            raise ValueError(f'premises, hypotheses and labels differ in length: '
                             f'{len(premises)}, {len(hypotheses)}, {len(labels)}')
        if vocab is None:
            tokens = [s.lower().split() for s in list(premises) + list(hypotheses)]
            vocab = Vocab(tokens, min_freq=5, reserved_tokens=RESERVED_TOKENS)
        special_ids(vocab)  # a vocabulary without <cls>/[CLS], ... is refused here
        self.vocab = vocab
        self.max_len = max_len
        self.truncation = truncation
        self.all_token_ids, self.all_segments, self.valid_lens = self._build(
            premises, hypotheses, num_workers, start_method)
        self.labels = np.asarray(labels, dtype=np.int32).reshape(-1)
        if verbose:
            print(f'read {len(self)} examples')

    def _build(self, premises, hypotheses, num_workers, start_method):
        n, L = len(premises), self.max_len
        if L < 3:
            raise ConfigError(f'max_len must be at least 3 (<cls> and two <sep>), got {L}')
        workers = _default_workers() if num_workers is None else int(num_workers)
        vocab = self.vocab
        args = (L, self.truncation, special_ids(vocab))
        encoder = sentence_encoder(vocab)
        if workers <= 1 or n < self.MIN_PAIRS_FOR_POOL:
            parts = [(_encode_side(premises, encoder), _encode_side(hypotheses, encoder))]
            return self._pack_parts(parts, n, args)
        # A few chunks per worker balance the load.
        bounds = np.linspace(0, n, workers * 3 + 1).astype(int)
        ranges = [(int(s), int(e)) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        method = _start_method(start_method)
        ctx = multiprocessing.get_context(method)
        init = (_init_worker, (encoder,))
        global _FORK_INPUT
        if method == 'fork':
            # Workers encode and pack their rows straight into shared memory.
            out = (_shared_array((n, L), np.int32), _shared_array((n, L), np.int32),
                   _shared_array((n,), np.float32))
            _FORK_INPUT = (premises, hypotheses, out) + args
            try:
                with ctx.Pool(workers, *init) as pool:
                    pool.map(_encode_and_pack, ranges, chunksize=1)
            finally:
                _FORK_INPUT = None
            return out
        # spawn / forkserver: workers get pickled sentences and return compact ids.
        chunks = [(list(premises[s:e]), list(hypotheses[s:e])) for s, e in ranges]
        with ctx.Pool(workers, *init) as pool:
            parts = pool.map(_encode_chunk, chunks, chunksize=1)
        return self._pack_parts(parts, n, args)

    @staticmethod
    def _pack_parts(parts, n, args):
        L = args[0]
        out = (np.empty((n, L), np.int32), np.zeros((n, L), np.int32), np.empty(n, np.float32))
        _pack_rows(*out, _merge_sides([p[0] for p in parts]),
                   _merge_sides([p[1] for p in parts]), *args)
        return out

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The fine-tuning batch keys of `BatchLoader`."""
        return {'tokens': self.all_token_ids, 'segments': self.all_segments,
                'valid_lens': self.valid_lens, 'labels': self.labels}

    def __getitem__(self, idx):
        return (self.all_token_ids[idx], self.all_segments[idx],
                self.valid_lens[idx]), self.labels[idx]

    def __len__(self) -> int:
        return len(self.all_token_ids)


def load_data_snli(batch_size: int, max_len: int, vocab: Vocab | None = None,
                   data_dir: str | None = None, splits=('train', 'test'), seed: int = 0,
                   truncation: str = 'longest_first', pad_to: str = 'max_len',
                   bucket: bool = False, num_workers: int | None = None):
    """SNLI fine-tuning loaders -> (train_iter, test_iter, vocab), as the book builds them.

    data_dir None reads the sample shipped with the package. The first split
    is shuffled (seeded), the second is read in order. Loaders yield the book's
    `((tokens, segments, valid_lens), labels)`.
    """
    from .synthetic import sample_dir
    data_dir = data_dir or sample_dir('snli')
    train_split, test_split = splits
    train_set = SNLIBERTDataset(read_snli(data_dir, train_split), max_len, vocab,
                                truncation=truncation, num_workers=num_workers)
    test_set = SNLIBERTDataset(read_snli(data_dir, test_split), max_len, train_set.vocab,
                               truncation=truncation, num_workers=num_workers)
    book = (('tokens', 'segments', 'valid_lens'), 'labels')
    train_iter = BatchLoader(train_set.arrays, batch_size, shuffle=True, seed=seed,
                             pad_to=pad_to, bucket=bucket, tuple_keys=book)
    test_iter = BatchLoader(test_set.arrays, batch_size, shuffle=False, pad_to=pad_to,
                            bucket=bucket, tuple_keys=book)
    return train_iter, test_iter, train_set.vocab


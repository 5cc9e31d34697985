"""WikiText-2 pretraining examples: next-sentence pairs and masked-LM targets.

Each step of example generation is a small function, as in the book's
sec. "The Dataset for Pretraining BERT". Randomness comes from an explicit
``rng``: a `random.Random`. It is drawn in exactly the order in which the book
draws from the global `random` module, so ``random.seed(s)`` followed by the
book's code and ``rng = random.Random(s)`` followed by this module give the same
examples (for the same vocabulary).
"""
from __future__ import annotations

import gzip
import io
import logging
import os
import random
import zlib
from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .batching import PRETRAIN_KEYS, BatchLoader
from .vocab import RESERVED_TOKENS, MissingFileError, Vocab, decode_utf8, tokenize

__all__ = ['read_wiki', 'Paragraphs', 'get_tokens_and_segments', 'get_next_sentence',
           'get_nsp_data_from_paragraph', 'replace_mlm_tokens', 'get_mlm_data_from_tokens',
           'pad_bert_inputs', 'WikiTextDataset', 'load_data_wiki']

log = logging.getLogger(__name__)

MLM_FRACTION = 0.15  # BERT predicts 15% of the tokens of each sequence
# With fewer paragraphs, every "random" next sentence of NSP comes from the same paragraph.
MIN_PARAGRAPHS = 2


def _rng(rng, seed=0) -> random.Random:
    if rng is None:
        return random.Random(seed)
    if not isinstance(rng, random.Random):
        raise TypeError(f'rng must be a random.Random, got {type(rng).__name__}')
    return rng


class Paragraphs(list):
    """The paragraphs `read_wiki` returns: a list that remembers its file, for messages."""

    def __init__(self, paragraphs=(), source: str | None = None):
        super().__init__(paragraphs)
        self.source = source


def _read_bytes(path: str) -> bytes:
    """The bytes of `path`, gunzipped for .gz; a file that cannot be read raises DataError."""
    try:
        if path.endswith('.gz'):
            with gzip.open(path, 'rb') as f:
                return f.read()
        with open(path, 'rb') as f:
            return f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f'{path}: not a readable gzip file, damaged or truncated '
                        f'({err})') from None
    except OSError as err:
        raise DataError(f'{path}: cannot be read ({err.strerror or err})') from None


def read_wiki(data_dir: str, rng: random.Random | None = None,
              file_name: str = 'wiki.train.tokens') -> Paragraphs:
    """Paragraphs of `file_name` (plain or .gz) as lists of lower-cased sentences, shuffled.

    A paragraph is a line with at least two ' . ' separated parts (headings and
    one-sentence lines are skipped), as in the book. `rng` defaults to Random(0).
    A file that is missing, damaged, not UTF-8 or without any paragraph raises
    `DataError` naming it (and the line); fewer than `MIN_PARAGRAPHS` logs a warning.
    """
    path = os.path.join(data_dir, file_name)
    if not os.path.exists(path) and os.path.exists(path + '.gz'):
        path += '.gz'
    if not os.path.exists(path):
        raise MissingFileError(f'{file_name} not found in {data_dir} (nor {file_name}.gz); '
                               "get WikiText-2 with gluon_bert.data.download_extract('wikitext-2')")
    # Lines as text-mode open() splits them (universal newlines), as the book reads them.
    lines = io.StringIO(decode_utf8(_read_bytes(path), path), newline=None).readlines()
    paragraphs = [line.strip().lower().split(' . ')
                  for line in lines if len(line.split(' . ')) >= 2]
    if not paragraphs:
        raise DataError(f'{path}: no paragraph in its {len(lines)} lines; a paragraph is a line '
                        "of at least two sentences separated by ' . ' (WikiText's tokenized "
                        'text), headings and one-sentence lines do not count')
    if len(paragraphs) < MIN_PARAGRAPHS:
        log.warning('%s: only %d paragraph(s), a tiny corpus: the random sentences of '
                    'next-sentence prediction all come from that paragraph; pretrain on '
                    'WikiText-2 (--download) or a larger file', path, len(paragraphs))
    _rng(rng).shuffle(paragraphs)
    return Paragraphs(paragraphs, source=path)


def get_tokens_and_segments(tokens_a: list[str], tokens_b: list[str] | None = None):
    """``<cls> a <sep> [b <sep>]`` and its segment ids (0 for a's part, 1 for b's)."""
    tokens = ['<cls>'] + tokens_a + ['<sep>']
    segments = [0] * (len(tokens_a) + 2)
    if tokens_b is not None:
        tokens += tokens_b + ['<sep>']
        segments += [1] * (len(tokens_b) + 1)
    return tokens, segments


def get_next_sentence(sentence, next_sentence, paragraphs, rng: random.Random):
    """Keep the true next sentence half of the time, else draw a random one (NSP)."""
    if rng.random() < 0.5:
        return sentence, next_sentence, True
    # A random sentence of a random paragraph; it may, rarely, be the true one.
    return sentence, rng.choice(rng.choice(paragraphs)), False


def get_nsp_data_from_paragraph(paragraph, paragraphs, vocab, max_len: int,
                                rng: random.Random):
    """(tokens, segments, is_next) for each consecutive sentence pair that fits max_len."""
    examples = []
    for i in range(len(paragraph) - 1):
        tokens_a, tokens_b, is_next = get_next_sentence(paragraph[i], paragraph[i + 1],
                                                        paragraphs, rng)
        # One <cls> and two <sep> must fit as well; longer pairs are skipped.
        if len(tokens_a) + len(tokens_b) + 3 > max_len:
            continue
        tokens, segments = get_tokens_and_segments(tokens_a, tokens_b)
        examples.append((tokens, segments, is_next))
    return examples


def replace_mlm_tokens(tokens, candidate_pred_positions, num_mlm_preds, vocab,
                       rng: random.Random):
    """Corrupt `num_mlm_preds` random candidate positions -> (input tokens, [(pos, label)]).

    BERT's rule: of the chosen positions, 80% become <mask>, 10% a random token
    and 10% stay unchanged, so the model cannot tell which inputs to trust.
    Shuffles `candidate_pred_positions` in place, as the book does.
    """
    mlm_input_tokens = list(tokens)
    pred_positions_and_labels = []
    rng.shuffle(candidate_pred_positions)
    for position in candidate_pred_positions:
        if len(pred_positions_and_labels) >= num_mlm_preds:
            break
        if rng.random() < 0.8:
            masked_token = '<mask>'
        elif rng.random() < 0.5:
            masked_token = tokens[position]
        else:
            # Any vocabulary entry, special tokens included, as in the book.
            masked_token = rng.choice(vocab.idx_to_token)
        mlm_input_tokens[position] = masked_token
        pred_positions_and_labels.append((position, tokens[position]))
    return mlm_input_tokens, pred_positions_and_labels


def get_mlm_data_from_tokens(tokens, vocab, rng: random.Random):
    """-> (input ids, sorted predicted positions, label ids) for one sequence.

    15% of the sequence length (at least one) is predicted; <cls> and <sep>
    are never candidates.
    """
    candidates = [i for i, tok in enumerate(tokens) if tok not in ('<cls>', '<sep>')]
    num_mlm_preds = max(1, round(len(tokens) * MLM_FRACTION))
    mlm_input_tokens, pairs = replace_mlm_tokens(tokens, candidates, num_mlm_preds, vocab, rng)
    pairs.sort(key=lambda pair: pair[0])
    pred_positions = [pos for pos, _ in pairs]
    return vocab[mlm_input_tokens], pred_positions, vocab[[label for _, label in pairs]]


def pad_bert_inputs(examples, max_len: int, vocab):
    """Pad (token_ids, pred_positions, mlm_label_ids, segments, is_next) examples.

    Returns the book's 7 arrays: token_ids (N, max_len) int32, segments (N, max_len)
    int32, valid_lens (N,) float32, pred_positions (N, P) int32, mlm_weights (N, P)
    float32, mlm_labels (N, P) int32, nsp_labels (N,) int32, with
    P = round(0.15 * max_len). Padded predictions get weight 0 (and position 0).
    """
    n, num_preds = len(examples), round(max_len * MLM_FRACTION)
    token_ids = np.full((n, max_len), vocab['<pad>'], dtype=np.int32)
    segments = np.zeros((n, max_len), dtype=np.int32)
    valid_lens = np.zeros(n, dtype=np.float32)
    pred_positions = np.zeros((n, num_preds), dtype=np.int32)
    mlm_weights = np.zeros((n, num_preds), dtype=np.float32)
    mlm_labels = np.zeros((n, num_preds), dtype=np.int32)
    nsp_labels = np.zeros(n, dtype=np.int32)
    for i, (ids, positions, labels, segs, is_next) in enumerate(examples):
        if len(ids) > max_len or len(positions) > num_preds:
            raise ConfigError(f'example {i} has {len(ids)} tokens and {len(positions)} '
                              f'predictions; max_len={max_len} allows {max_len} tokens and '
                              f'{num_preds} predictions')
        token_ids[i, :len(ids)] = ids
        segments[i, :len(segs)] = segs
        valid_lens[i] = len(ids)  # excludes <pad>
        pred_positions[i, :len(positions)] = positions
        mlm_weights[i, :len(labels)] = 1.0
        mlm_labels[i, :len(labels)] = labels
        nsp_labels[i] = int(is_next)
    return (token_ids, segments, valid_lens, pred_positions, mlm_weights, mlm_labels,
            nsp_labels)


class WikiTextDataset:
    """Pretraining examples from paragraphs (lists of sentence strings).

    `__getitem__` returns the book's 7-tuple (token_ids, segments, valid_lens,
    pred_positions, mlm_weights, mlm_Y, nsp_y); `arrays` gives the pretraining
    batch keys of `BatchLoader`. The vocabulary defaults to the book's:
    `min_freq` (the book's 5) with the reserved tokens <pad> <mask> <cls> <sep>.
    Examples are a pure function of (paragraphs, max_len, vocab, seed); pass `rng`
    instead of `seed` to continue a stream (`load_data_wiki` shares one with `read_wiki`).

    `source` names the data in messages (default: the file `read_wiki` read). No
    paragraphs, or a vocabulary of nothing but the special tokens, raise DataError; a
    max_len that no sentence pair fits raises ConfigError with the max_len that would.
    """

    def __init__(self, paragraphs: Sequence[Sequence[str]], max_len: int,
                 vocab: Vocab | None = None, seed: int = 0, rng: random.Random | None = None,
                 *, min_freq: int = 5, source: str | None = None):
        source = source or getattr(paragraphs, 'source', None) or 'the given paragraphs'
        rng = _rng(rng, seed)
        paragraphs = [tokenize(paragraph, token='word') for paragraph in paragraphs]
        if not paragraphs:
            raise DataError(f'{source}: no paragraphs to make pretraining examples from')
        if vocab is None:
            sentences = [sentence for paragraph in paragraphs for sentence in paragraph]
            vocab = Vocab(sentences, min_freq=min_freq, reserved_tokens=RESERVED_TOKENS)
            if len(vocab) <= len(RESERVED_TOKENS) + 1:
                raise DataError(
                    f'{source}: no word occurs {min_freq} times or more in its '
                    f'{len(paragraphs)} paragraph(s), so the vocabulary would hold only <unk> '
                    'and the reserved tokens; use a larger corpus (WikiText-2: --download) or '
                    'a lower min_freq (WikiTextDataset(..., min_freq=1))')
        self.vocab = vocab
        self.max_len = max_len
        nsp = []
        for paragraph in paragraphs:
            nsp.extend(get_nsp_data_from_paragraph(paragraph, paragraphs, vocab, max_len, rng))
        if not nsp:
            # <cls> a <sep> b <sep>: the shortest pair of consecutive sentences, plus 3
            shortest = min((len(p[i]) + len(p[i + 1]) + 3
                            for p in paragraphs for i in range(len(p) - 1)), default=None)
            if shortest is None:
                raise DataError(f'{source}: no paragraph has two sentences, so there is no '
                                'pair for next-sentence prediction')
            raise ConfigError(f'max_len={max_len} is too short for every sentence pair of '
                              f'{source}: the shortest pair needs max_len={shortest} '
                              '(the book uses 64)')
        examples = [get_mlm_data_from_tokens(tokens, vocab, rng) + (segments, is_next)
                    for tokens, segments, is_next in nsp]
        (self.all_token_ids, self.all_segments, self.valid_lens, self.all_pred_positions,
         self.all_mlm_weights, self.all_mlm_labels,
         self.nsp_labels) = pad_bert_inputs(examples, max_len, vocab)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        return {'tokens': self.all_token_ids, 'segments': self.all_segments,
                'valid_lens': self.valid_lens, 'pred_positions': self.all_pred_positions,
                'mlm_weights': self.all_mlm_weights, 'mlm_labels': self.all_mlm_labels,
                'nsp_labels': self.nsp_labels}

    def __getitem__(self, idx):
        return (self.all_token_ids[idx], self.all_segments[idx], self.valid_lens[idx],
                self.all_pred_positions[idx], self.all_mlm_weights[idx],
                self.all_mlm_labels[idx], self.nsp_labels[idx])

    def __len__(self) -> int:
        return len(self.all_token_ids)


def load_data_wiki(batch_size: int, max_len: int, data_dir: str | None = None, seed: int = 0,
                   **loader_kwargs):
    """-> (BatchLoader over pretraining examples, vocab), as the book's load_data_wiki.

    data_dir None reads the sample shipped with the package; pass
    ``download_extract('wikitext-2')`` or a folder with wiki.train.tokens(.gz)
    for the real data. One Random(seed) shuffles the paragraphs and draws the
    examples; the loader shuffles with `seed` too. As in the book, it yields tuples
    `(tokens, segments, valid_lens, pred_positions, mlm_weights, mlm_Y, nsp_y)`
    (`tuple_keys=None` for dicts). `loader_kwargs` go to BatchLoader (pad_to, bucket,
    drop_last, ...).
    """
    from .synthetic import sample_dir
    rng = random.Random(seed)
    paragraphs = read_wiki(data_dir or sample_dir('wikitext-2'), rng)
    train_set = WikiTextDataset(paragraphs, max_len, rng=rng)
    loader_kwargs.setdefault('shuffle', True)
    loader_kwargs.setdefault('tuple_keys', PRETRAIN_KEYS)
    return BatchLoader(train_set.arrays, batch_size, seed=seed, **loader_kwargs), train_set.vocab

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
import os
import random
from typing import Sequence

import numpy as np

from .batching import PRETRAIN_KEYS, BatchLoader
from .vocab import RESERVED_TOKENS, Vocab, tokenize

__all__ = ['read_wiki', 'get_tokens_and_segments', 'get_next_sentence',
           'get_nsp_data_from_paragraph', 'replace_mlm_tokens', 'get_mlm_data_from_tokens',
           'pad_bert_inputs', 'WikiTextDataset', 'load_data_wiki']

MLM_FRACTION = 0.15  # BERT predicts 15% of the tokens of each sequence


def _rng(rng, seed=0) -> random.Random:
    if rng is None:
        return random.Random(seed)
    if not isinstance(rng, random.Random):
        raise TypeError(f'rng must be a random.Random, got {type(rng).__name__}')
    return rng


def read_wiki(data_dir: str, rng: random.Random | None = None,
              file_name: str = 'wiki.train.tokens') -> list[list[str]]:
    """Paragraphs of `file_name` (plain or .gz) as lists of lower-cased sentences, shuffled.

    A paragraph is a line with at least two ' . ' separated parts (headings and
    one-sentence lines are skipped), as in the book. `rng` defaults to Random(0).
    """
    path = os.path.join(data_dir, file_name)
    if not os.path.exists(path) and os.path.exists(path + '.gz'):
        path += '.gz'
    if not os.path.exists(path):
        raise FileNotFoundError(f'{file_name} not found in {data_dir} (nor {file_name}.gz); '
                                "get WikiText-2 with gluon_bert.data.download_extract('wikitext-2')")
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rt', encoding='utf-8') as f:
        lines = f.readlines()
    paragraphs = [line.strip().lower().split(' . ')
                  for line in lines if len(line.split(' . ')) >= 2]
    _rng(rng).shuffle(paragraphs)
    return paragraphs


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
            raise ValueError(f'example {i} has {len(ids)} tokens and {len(positions)} '
                             f'predictions; max_len={max_len} allows {num_preds}')
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
    min_freq=5 with the reserved tokens <pad> <mask> <cls> <sep>. Examples are a
    pure function of (paragraphs, max_len, vocab, seed); pass `rng` instead of
    `seed` to continue a stream (`load_data_wiki` shares one with `read_wiki`).
    """

    def __init__(self, paragraphs: Sequence[Sequence[str]], max_len: int,
                 vocab: Vocab | None = None, seed: int = 0, rng: random.Random | None = None):
        rng = _rng(rng, seed)
        paragraphs = [tokenize(paragraph, token='word') for paragraph in paragraphs]
        if vocab is None:
            sentences = [sentence for paragraph in paragraphs for sentence in paragraph]
            vocab = Vocab(sentences, min_freq=5, reserved_tokens=RESERVED_TOKENS)
        self.vocab = vocab
        self.max_len = max_len
        nsp = []
        for paragraph in paragraphs:
            nsp.extend(get_nsp_data_from_paragraph(paragraph, paragraphs, vocab, max_len, rng))
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

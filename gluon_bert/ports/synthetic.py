"""Synthetic batches in the data pipeline's exact format, for parity tests and benchmarks
that must not depend on a dataset.

Every batch is padded as the real pipeline pads: tokens and segments after `valid_len` are
`pad_id` / 0, prediction slots beyond an example's real predictions have weight 0.
"""
from __future__ import annotations

import numpy as np

from ..config import BERTConfig

__all__ = ['synthetic_batch', 'WIKITEXT2_LENGTHS', 'SNLI_LENGTHS', 'LENGTHS']

# How long the book's pretraining examples are: the number of WikiText-2 examples (train
# split, `load_data_wiki(512, 64)`, 43,639 in all) of each valid length 0 ... 64. They fill
# 72% of the 64 positions on average and predict 6.95 tokens each, where uniform lengths
# would fill about half. Counted with this package's pipeline on the real data set.
WIKITEXT2_LENGTHS = (
    0, 0, 0, 0, 0, 15, 6, 29, 7, 13, 22, 42, 27, 33, 46, 38, 64, 53, 48, 88, 107, 128, 156,
    209, 227, 272, 326, 391, 396, 476, 553, 659, 696, 734, 815, 892, 946, 1011, 1033, 1141,
    1194, 1232, 1314, 1331, 1298, 1365, 1356, 1417, 1417, 1469, 1433, 1452, 1360, 1366, 1376,
    1297, 1285, 1299, 1224, 1117, 1120, 1085, 1109, 1071, 953)

# How long the book's fine-tuning examples are: the number of SNLI pairs (dev split, the
# 9,842 gold-labelled ones; `SNLIBERTDataset(..., max_len=128)`, the book's whitespace
# tokens and truncation) of each valid length 0 ... 128, `<cls> p <sep> h <sep>` included.
# They fill 21% of the 128 positions on average (26.5 tokens). Counted with this package's
# pipeline on the real data set.
SNLI_LENGTHS = (
    0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1, 7, 12, 35, 83, 145, 214, 313, 391, 493, 539, 598, 592,
    600, 572, 504, 478, 441, 460, 419, 375, 348, 305, 278, 249, 218, 180, 151, 132, 115, 78,
    63, 72, 56, 36, 49, 31, 24, 25, 31, 24, 12, 7, 19, 7, 5, 3, 3, 4, 3, 3, 6, 0, 3, 3, 5, 4,
    3, 3, 1, 0, 1, 1, 0, 1, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0)

# `--lengths` names -> counts (for batches of as many positions as the counts go up to)
LENGTHS = {'wikitext-2': WIKITEXT2_LENGTHS, 'snli': SNLI_LENGTHS}


def synthetic_batch(rng: np.random.Generator, config: BERTConfig, task: str = 'pretrain',
                    batch_size: int = 4, seq_len: int = 16, num_preds: int = 3,
                    pad_id: int = 0, full_length: bool = False,
                    length_counts=None) -> dict[str, np.ndarray]:
    """A pretraining or fine-tuning batch of mixed lengths (the first example is full length,
    the others uniformly in [2, seq_len]; all full with `full_length`).

    `length_counts` (e.g. `WIKITEXT2_LENGTHS`, counts of each length 0 ... seq_len) draws the
    other lengths from that distribution instead, and gives each example the book's number
    of predictions, max(1, round(0.15 * length)) (at most num_preds), where by default it
    predicts 1 ... num_preds tokens uniformly."""
    if task not in ('pretrain', 'finetune'):
        raise ValueError(f"task must be 'pretrain' or 'finetune', got {task!r}")
    if not 2 <= seq_len <= config.max_len:
        raise ValueError(f'seq_len must be in [2, max_len={config.max_len}], got {seq_len}')
    B, L, V = batch_size, seq_len, config.vocab_size
    if full_length:
        valid_lens = np.full(B, L)
    elif length_counts is not None:
        counts = np.asarray(length_counts, dtype=np.float64)
        if counts.shape != (L + 1,) or counts[:2].any() or counts.sum() <= 0:
            raise ValueError(f'length_counts must count the lengths 0 ... {L} (none below 2), '
                             f'got {counts.shape[0]} numbers')
        drawn = rng.choice(L + 1, B - 1, p=counts / counts.sum())
        valid_lens = np.concatenate([[L], drawn])[:B]
    else:
        valid_lens = np.concatenate([[L], rng.integers(2, L + 1, B - 1)])[:B]
    tokens = rng.integers(0, V, (B, L))
    # Segment B starts somewhere inside the valid part: (L,) against (B, 1) -> (B, L)
    starts = np.array([rng.integers(1, n) for n in valid_lens])
    segments = (np.arange(L)[None, :] >= starts[:, None]).astype(np.int32)
    padding = np.arange(L)[None, :] >= valid_lens[:, None]  # (B, L)
    tokens[padding], segments[padding] = pad_id, 0
    batch = {'tokens': tokens.astype(np.int32), 'segments': segments,
             'valid_lens': valid_lens.astype(np.float32)}
    if task == 'finetune':
        batch['labels'] = rng.integers(0, config.num_classes, B).astype(np.int32)
        return batch
    P = num_preds
    # Each example predicts between 1 and P of its real positions (15% of them with
    # length_counts, as the book's pipeline does); the rest is padding.
    if length_counts is not None:
        num_real = np.minimum(np.maximum(1, np.round(0.15 * valid_lens)), P).astype(int)
    else:
        num_real = np.minimum(rng.integers(1, P + 1, B), valid_lens)
    positions = np.zeros((B, P), np.int32)
    weights = np.zeros((B, P), np.float32)
    for b in range(B):
        positions[b, :num_real[b]] = rng.choice(int(valid_lens[b]), num_real[b], replace=False)
        weights[b, :num_real[b]] = 1.0
    # The labels are the tokens at the predicted positions, left unmasked: a copy task that
    # a model can learn in a few steps, so that loss curves go somewhere.
    labels = np.take_along_axis(tokens, positions, axis=1) * (weights > 0)  # (B, P)
    batch.update(pred_positions=positions, mlm_weights=weights,
                 mlm_labels=labels.astype(np.int32),
                 nsp_labels=rng.integers(0, 2, B).astype(np.int32))
    return batch

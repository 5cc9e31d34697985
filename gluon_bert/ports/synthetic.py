"""Synthetic batches in the data pipeline's exact format, for parity tests and benchmarks
that must not depend on a dataset.

Every batch is padded as the real pipeline pads: tokens and segments after `valid_len` are
`pad_id` / 0, prediction slots beyond an example's real predictions have weight 0.
"""
from __future__ import annotations

import numpy as np

from ..config import BERTConfig

__all__ = ['synthetic_batch']


def synthetic_batch(rng: np.random.Generator, config: BERTConfig, task: str = 'pretrain',
                    batch_size: int = 4, seq_len: int = 16, num_preds: int = 3,
                    pad_id: int = 0, full_length: bool = False) -> dict[str, np.ndarray]:
    """A pretraining or fine-tuning batch of mixed lengths (the first example is full length,
    the others uniformly in [2, seq_len]; all full with `full_length`)."""
    if task not in ('pretrain', 'finetune'):
        raise ValueError(f"task must be 'pretrain' or 'finetune', got {task!r}")
    if not 2 <= seq_len <= config.max_len:
        raise ValueError(f'seq_len must be in [2, max_len={config.max_len}], got {seq_len}')
    B, L, V = batch_size, seq_len, config.vocab_size
    if full_length:
        valid_lens = np.full(B, L)
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
    # Each example predicts between 1 and P of its real positions; the rest is padding.
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

"""Packed (unpadded) batches: only the real tokens and the real predictions.

A padded pretraining batch spends much of its arithmetic on nothing. At the book's shape
(batch 512, max_len 64, 10 prediction slots) a WikiText-2 pair fills 72% of its 64
positions on average and uses 7 of its 10 slots, the others carrying weight 0; yet the
encoder's dense layers run on every position and the MLM decoder (128 -> 20,256 words) on
every slot.
Nothing reads those results: attention masks padded keys out, no loss reads a padded
query, and a weight-0 slot adds 0 to the loss and to every gradient.

`pack_pretrain_batch` rewrites one shard of a batch (numpy, on the host) so that the model
can run its per-token layers on the T real tokens only and its MLM head on the K real
predictions only (`BERTEncoder.encode_packed`, `step.PackedPretrainObjective`):

* ``tokens``, ``segments``, ``positions`` (T',): the real tokens in row-major order,
  their segment ids and their position in the sequence;
* ``pack`` (T',): the flat index b * L + l of each of them in the padded (B, L) layout;
* ``unpack`` (B, L): the packed row of every padded position (row 0 for padding: any real
  row will do, attention gives it weight 0 and nothing reads its output);
* ``cls_rows`` (B,): the packed row of each example's <cls> (position 0);
* ``mlm_rows``, ``mlm_labels``, ``mlm_weights`` (K',): for each real prediction, the
  packed row of its position, its label and its weight;
* ``valid_lens`` (B,) and ``nsp_labels`` (B,) as they were.

`pack_finetune_batch` packs a fine-tuning shard the same way, without predictions and with
its ``labels`` (`FINETUNE_PACKED_KEYS`): SNLI pairs padded to the book's 128 positions are
79% padding, and the classifier reads the ``cls_rows`` alone (`BERTClassifier.classify_packed`).

T' >= T and K' >= K are the sizes the caller asks for (``num_tokens``, ``num_rows``), so
that a hybridized graph sees the same shapes from batch to batch; the extra entries point
at row 0 and have weight 0, so they change no loss and no gradient. `PackedSizes` picks
them: grow-only, rounded up, so a run settles on one shape after a few batches.
"""
from __future__ import annotations

import numpy as np

__all__ = ['pack_pretrain_batch', 'pack_finetune_batch', 'PackedSizes', 'PACKED_KEYS',
           'FINETUNE_PACKED_KEYS']

PACKED_KEYS = ('tokens', 'segments', 'positions', 'valid_lens', 'unpack', 'pack', 'cls_rows',
               'mlm_rows', 'mlm_weights', 'mlm_labels', 'nsp_labels')
# a fine-tuning shard: the same sequence part, then the labels
FINETUNE_PACKED_KEYS = ('tokens', 'segments', 'positions', 'valid_lens', 'unpack', 'pack',
                        'cls_rows', 'labels')


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


class PackedSizes:
    """Grow-only packed sizes: the largest needed so far, rounded up.

    `update(batch)` returns (num_tokens, num_rows) for a batch (or a list of shards, which
    share one size): at least what the batch needs and never less than before (an epoch's
    short last batch runs at the sizes of the full ones); what a batch adds is never more
    than the padded batch has (B * L tokens, B * P predictions). Sizes are rounded up to a
    `granularity`-th of the padded size (at least 8), so a static graph is planned again
    only when a batch needs more than any before, at most `granularity` times."""

    def __init__(self, granularity: int = 64):
        self.granularity = granularity
        self.num_tokens = self.num_rows = 0

    def _grow(self, have, need, cap):
        step = max(8, -(-cap // self.granularity))
        return max(have, min(_round_up(need, step), cap))

    def update(self, shards):
        if isinstance(shards, dict):
            shards = [shards]
        need_t = max(int(_valid_mask(s).sum()) for s in shards)
        # fine-tuning shards have no predictions: num_rows stays 0
        need_k = max(int((np.asarray(s['mlm_weights']) != 0).sum()) if 'mlm_weights' in s
                     else 0 for s in shards)
        cap_t = max(int(np.asarray(s['tokens']).size) for s in shards)
        cap_k = max(int(np.asarray(s['mlm_weights']).size) if 'mlm_weights' in s else 0
                    for s in shards)
        self.num_tokens = self._grow(self.num_tokens, need_t, cap_t)
        self.num_rows = self._grow(self.num_rows, need_k, cap_k)
        return self.num_tokens, self.num_rows


def _valid_mask(batch) -> np.ndarray:
    """(B, L) bool: position l of example b is a real token."""
    tokens = np.asarray(batch['tokens'])
    lengths = np.asarray(batch['valid_lens']).astype(np.int64)             # (B,)
    return np.arange(tokens.shape[1])[None, :] < lengths[:, None]           # (B, L)


def _pad(values, size, dtype):
    out = np.zeros(size, dtype)
    out[:len(values)] = values
    return out


def _pack_sequences(batch, num_tokens):
    """The sequence part of a packed shard (tokens ... cls_rows), and the packed row of
    every padded position (B*L,)."""
    tokens = np.asarray(batch['tokens'])
    B, L = tokens.shape
    lengths = np.asarray(batch['valid_lens']).astype(np.int64)
    if lengths.shape != (B,):
        raise ValueError(f'valid_lens has shape {lengths.shape}, expected ({B},)')
    if B and (lengths.min() < 1 or lengths.max() > L):
        raise ValueError(f'valid_lens must be in [1, {L}] (the padded length), got '
                         f'{lengths.min()}..{lengths.max()}')
    valid = _valid_mask(batch)                                              # (B, L)
    T = int(valid.sum())
    num_tokens = T if num_tokens is None else num_tokens
    if num_tokens < T:
        raise ValueError(f'num_tokens {num_tokens} is less than the {T} real tokens')
    flat = np.flatnonzero(valid)                                            # (T,) b * L + l
    row_of = np.zeros(B * L, np.int32)                                      # (B*L,)
    row_of[flat] = np.arange(T, dtype=np.int32)
    return dict(
        tokens=_pad(tokens.reshape(-1)[flat], num_tokens, np.int32),
        segments=_pad(np.asarray(batch['segments']).reshape(-1)[flat], num_tokens, np.int32),
        positions=_pad(flat % L, num_tokens, np.int32),
        valid_lens=np.asarray(batch['valid_lens'], np.float32),
        unpack=row_of.reshape(B, L),                                        # (B*L,) -> (B, L)
        pack=_pad(flat, num_tokens, np.int32),
        cls_rows=row_of[np.arange(B) * L]), row_of


def pack_pretrain_batch(batch, num_tokens: int | None = None,
                        num_rows: int | None = None) -> dict[str, np.ndarray]:
    """One shard of a padded pretraining batch (`data.PRETRAIN_KEYS`) -> its packed form
    (`PACKED_KEYS`, see the module docstring), padded to `num_tokens` tokens and `num_rows`
    predictions (default: exactly what it has). An inference batch may leave out
    ``mlm_labels`` and ``nsp_labels`` (packed as zeros)."""
    packed, row_of = _pack_sequences(batch, num_tokens)
    B, L = np.asarray(batch['tokens']).shape
    lengths = np.asarray(batch['valid_lens']).astype(np.int64)
    weights = np.asarray(batch['mlm_weights'])                              # (B, P)
    real = weights != 0
    K = int(real.sum())
    num_rows = K if num_rows is None else num_rows
    if num_rows < K:
        raise ValueError(f'num_rows {num_rows} is less than the {K} real predictions')
    positions = np.asarray(batch['pred_positions']).astype(np.int64)       # (B, P)
    example = np.broadcast_to(np.arange(B)[:, None], positions.shape)      # (B, P)
    if K and (positions[real] >= lengths[example[real]]).any():
        raise ValueError('a prediction with a nonzero weight points at a padding position')
    pred_flat = example[real] * L + positions[real]                        # (K,)
    # inference batches may come without labels: zeros, which nothing reads
    mlm_labels = np.asarray(batch['mlm_labels']) if 'mlm_labels' in batch else \
        np.zeros(weights.shape, np.int32)                                    # (B, P)
    nsp_labels = batch['nsp_labels'] if 'nsp_labels' in batch else np.zeros(B, np.int32)
    return dict(
        packed,
        mlm_rows=_pad(row_of[pred_flat], num_rows, np.int32),
        mlm_weights=_pad(weights[real], num_rows, np.float32),
        mlm_labels=_pad(mlm_labels[real], num_rows, np.int32),
        nsp_labels=np.asarray(nsp_labels, np.int32))


def pack_finetune_batch(batch, num_tokens: int | None = None) -> dict[str, np.ndarray]:
    """One shard of a padded fine-tuning batch (tokens, segments, valid_lens, labels) -> its
    packed form (`FINETUNE_PACKED_KEYS`), padded to `num_tokens` tokens (default: exactly
    what it has). The classifier reads the packed rows `cls_rows`. A batch without
    ``labels`` (inference) packs without them."""
    packed, _ = _pack_sequences(batch, num_tokens)
    if 'labels' in batch:
        packed['labels'] = np.asarray(batch['labels'], np.int32)
    return packed

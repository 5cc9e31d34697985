"""A framework-neutral batch iterator over a dict of equally long numpy arrays.

Batch keys are an API shared by the training loops and the PyTorch/JAX ports:

* pretraining: ``tokens`` (B, L) int32, ``segments`` (B, L) int32,
  ``valid_lens`` (B,) float32, ``pred_positions`` (B, P) int32,
  ``mlm_weights`` (B, P) float32, ``mlm_labels`` (B, P) int32,
  ``nsp_labels`` (B,) int32;
* fine-tuning: ``tokens``, ``segments``, ``valid_lens``, ``labels`` (B,) int32.

The order of an epoch is a pure function of ``(seed, epoch)``, so a run resumed
at epoch ``e`` (``set_epoch(e)``) sees exactly the batches it would have seen.

Iteration yields these dicts, or with ``tuple_keys`` the book's tuples, e.g.
``PRETRAIN_KEYS`` for its pretraining loop or ``(('tokens', 'segments', 'valid_lens'),
'labels')`` for its fine-tuning loop ``for (tokens, segments, valid_lens), y in train_iter``.

``pad_to='longest'`` trims the sequence arrays of each batch to its longest
``valid_len`` rounded up to ``pad_multiple``. Positions past ``valid_len`` are
padding that attention masks out, so trimming them does not change any
example's outputs, while short batches cost far less (most SNLI pairs are under
40 tokens at ``max_len=128``). ``bucket=True`` additionally groups examples of
similar length into the same batch so that little padding remains.
"""
from __future__ import annotations

import math
from typing import Iterator, Mapping, Sequence

import numpy as np

__all__ = ['BatchLoader', 'PRETRAIN_KEYS', 'FINETUNE_KEYS']

PRETRAIN_KEYS = ('tokens', 'segments', 'valid_lens', 'pred_positions', 'mlm_weights',
                 'mlm_labels', 'nsp_labels')
FINETUNE_KEYS = ('tokens', 'segments', 'valid_lens', 'labels')


class BatchLoader:
    """Iterate over dict batches of `arrays`; see the module docstring."""

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, pad_to: str = 'max_len',
                 pad_multiple: int = 8, bucket: bool = False,
                 seq_keys: Sequence[str] = ('tokens', 'segments'),
                 valid_len_key: str = 'valid_lens', bucket_batches: int = 50,
                 tuple_keys=None):
        if not arrays:
            raise ValueError('BatchLoader needs at least one array')
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f'all arrays must have the same first dimension, got {lengths}')
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
        if pad_to not in ('max_len', 'longest'):
            raise ValueError(f"pad_to must be 'max_len' or 'longest', got {pad_to!r}")
        if pad_multiple <= 0:
            raise ValueError(f'pad_multiple must be positive, got {pad_multiple}')
        if (pad_to == 'longest' or bucket) and valid_len_key not in arrays:
            raise ValueError(f"pad_to='longest' and bucket=True need a {valid_len_key!r} array")
        missing = [k for k in seq_keys if k not in arrays] if pad_to == 'longest' else []
        if missing:
            raise ValueError(f'seq_keys {missing} are not among the arrays {sorted(arrays)}')
        unknown = sorted(set(_flat(tuple_keys)) - set(arrays)) if tuple_keys else []
        if unknown:
            raise ValueError(f'tuple_keys {unknown} are not among the arrays {sorted(arrays)}')
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.tuple_keys = tuple_keys
        self.num_examples = next(iter(lengths.values()))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.pad_to = pad_to
        self.pad_multiple = pad_multiple
        self.bucket = bucket
        self.seq_keys = tuple(seq_keys)
        self.valid_len_key = valid_len_key
        self.bucket_batches = bucket_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use the order of `epoch` (each pass then adds 1)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def batch_indices(self, epoch: int) -> list[np.ndarray]:
        """The example indices of every batch of `epoch`, in order."""
        n, bs = self.num_examples, self.batch_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if not self.bucket:
            batches = [order[i:i + bs] for i in range(0, n, bs)]
            if self.drop_last and batches and len(batches[-1]) < bs:
                batches.pop()
            return batches
        # Length buckets: sort each window of `bucket_batches` batches by length,
        # cut it into batches, then shuffle the batches. Every window but the last
        # is a multiple of `bs`, so at most one batch is short.
        lens = self.arrays[self.valid_len_key]
        window = bs * self.bucket_batches
        batches = []
        for start in range(0, n, window):
            chunk = order[start:start + window]
            chunk = chunk[np.argsort(lens[chunk], kind='stable')]
            batches.extend(chunk[i:i + bs] for i in range(0, len(chunk), bs))
        if self.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def make_batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Gather the examples `idx` into a batch dict (trimmed if pad_to='longest')."""
        width = None
        if self.pad_to == 'longest':
            longest = int(np.max(self.arrays[self.valid_len_key][idx]))
            width = -(-max(longest, 1) // self.pad_multiple) * self.pad_multiple
        batch = {}
        for key, arr in self.arrays.items():
            if width is not None and key in self.seq_keys:
                batch[key] = arr[idx, :min(width, arr.shape[1])]
            else:
                batch[key] = arr[idx]
        return batch

    def __iter__(self) -> Iterator:
        epoch = self.epoch
        self.epoch += 1
        for idx in self.batch_indices(epoch):
            batch = self.make_batch(idx)
            yield batch if self.tuple_keys is None else _pick(batch, self.tuple_keys)


def _flat(spec):
    """The key names of a (nested) tuple_keys spec."""
    return [spec] if isinstance(spec, str) else [k for s in spec for k in _flat(s)]


def _pick(batch, spec):
    """batch arranged as spec: a key -> its array; a tuple of specs -> a tuple."""
    return batch[spec] if isinstance(spec, str) else tuple(_pick(batch, s) for s in spec)

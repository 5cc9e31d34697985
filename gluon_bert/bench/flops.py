"""The model's FLOPs, counted from its shape (the matmuls only: embeddings, LayerNorm,
softmax and the optimizer are a few percent at these widths and are left out, as nanoGPT's
MFU and the PaLM paper leave them out).

Per sequence of length L through a block of width H with FFN width F:
    Q, K, V and output projections   4 L H^2   multiply-adds
    scores Q K^T and weighted values 2 L^2 H
    the FFN's two dense layers       2 L H F
MLM head over P predicted positions, vocabulary V: P (H^2 + H V) (its dense layer, then the
decoder); NSP head or classifier with C outputs: H^2 + H C (the pooler `hidden`, then the
output layer). A multiply-add is 2 FLOPs; a training step (forward + backward) is 3 times
the forward pass (the backward computes two products per forward product).

Ours does less where nothing reads the result, and `lean=True` counts what it executes:
* fine-tuning: the classifier reads the last block at <cls> only, so that block computes
  one query row per sequence (keys and values still at every position):
  2 L H^2 + 2 H^2 + 2 L H + 2 H F instead of a whole block;
* a packed step (`gluon_bert.data.packing`, `packed_model_flops`): projections,
  FFN and MLM head on the real tokens and predictions only (padded up to the packed
  sizes), attention over each sequence's own L_b rows (2 L_b^2 H), and in the last block
  keys and values at every token but the rest at the B + K rows the heads read (their
  query projections, 2 L_b H of attention each, output projection and FFN), as
  `gb_attention` computes it on the CPU.
`model_flops` without `lean` counts the padded batch, every position, as the book computes.
"""
from __future__ import annotations

import numpy as np

__all__ = ['model_macs', 'model_flops', 'packed_model_flops']


def model_macs(config, task: str, seq_len: int, num_preds: int = 0,
               lean: bool = False) -> int:
    """Multiply-adds of one sequence's forward pass (`lean`: the classifier's last block at
    <cls> only)."""
    if task not in ('pretrain', 'finetune'):
        raise ValueError(f"task must be 'pretrain' or 'finetune', got {task!r}")
    L, H, F = seq_len, config.num_hiddens, config.ffn_num_hiddens
    block = 4 * L * H * H + 2 * L * L * H + 2 * L * H * F
    macs = config.num_blks * block
    if task == 'pretrain':
        macs += num_preds * (H * H + H * config.vocab_size)  # MLM: dense, then the decoder
        macs += H * H + H * 2                                 # NSP: hidden, then 2 outputs
    else:
        if lean:  # the last block: keys and values everywhere, the rest for <cls> alone
            macs += (2 * L * H * H + 2 * H * H + 2 * L * H + 2 * H * F) - block
        macs += H * H + H * config.num_classes                # classifier: hidden, output
    return macs


def model_flops(config, task: str, batch_size: int, seq_len: int, num_preds: int = 0,
                train: bool = True, lean: bool = False) -> int:
    """FLOPs of one step on a (batch_size, seq_len) batch: forward only, or forward +
    backward (x3) with `train`."""
    forward = 2 * batch_size * model_macs(config, task, seq_len, num_preds, lean)
    return 3 * forward if train else forward


def packed_model_flops(config, batch, train: bool = True, task: str | None = None) -> int:
    """FLOPs of one packed step on `batch` (a padded batch dict: pretraining, or fine-tuning
    without MLM fields), at the packed sizes that `train.step` gives it on its own (one
    shard)."""
    from ..data.packing import PackedSizes, pack_finetune_batch, pack_pretrain_batch
    task = task or ('pretrain' if 'mlm_weights' in batch else 'finetune')
    T, K = PackedSizes().update(batch)
    if task == 'pretrain':
        packed = pack_pretrain_batch(batch, T, K)
        rows = np.concatenate([packed['cls_rows'], packed['mlm_rows']]).astype(np.int64)
    else:
        rows = pack_finetune_batch(batch, T)['cls_rows'].astype(np.int64)
    B = batch['tokens'].shape[0]
    lengths = np.asarray(batch['valid_lens'], dtype=np.int64)
    H, F = config.num_hiddens, config.ffn_num_hiddens
    attention = 2 * H * int((lengths ** 2).sum())  # scores and weighted values, own rows
    full = T * (4 * H * H + 2 * H * F) + attention
    # the last block: keys and values at every token; at each row the heads read, a query
    # over its sequence's L_b keys, the output projection and the FFN
    starts = np.concatenate([[0], np.cumsum(lengths)])
    keys = lengths[np.searchsorted(starts, rows, side='right') - 1]      # L_b of each row
    last = T * 2 * H * H + 2 * H * int(keys.sum()) + len(rows) * (2 * H * H + 2 * H * F)
    macs = (config.num_blks - 1) * full + last
    if task == 'pretrain':
        macs += K * (H * H + H * config.vocab_size)  # MLM head on the real predictions
        macs += B * (H * H + H * 2)                  # NSP head
    else:
        macs += B * (H * H + H * config.num_classes)  # classifier: hidden, output
    return 3 * 2 * macs if train else 2 * macs

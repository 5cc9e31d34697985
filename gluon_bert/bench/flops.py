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

A packed pretraining step (`gluon_bert.data.packing`) does less: its projections, FFN and
MLM head run on the real tokens and predictions only (padded up to its packed sizes), its
attention products on the padded (L, L) blocks. `packed_model_flops` counts that, the
arithmetic the machine executes; `model_flops` counts the padded batch's.
"""
from __future__ import annotations

__all__ = ['model_macs', 'model_flops', 'packed_model_flops']


def model_macs(config, task: str, seq_len: int, num_preds: int = 0) -> int:
    """Multiply-adds of one sequence's forward pass."""
    if task not in ('pretrain', 'finetune'):
        raise ValueError(f"task must be 'pretrain' or 'finetune', got {task!r}")
    L, H, F = seq_len, config.num_hiddens, config.ffn_num_hiddens
    block = 4 * L * H * H + 2 * L * L * H + 2 * L * H * F
    macs = config.num_blks * block
    if task == 'pretrain':
        macs += num_preds * (H * H + H * config.vocab_size)  # MLM: dense, then the decoder
        macs += H * H + H * 2                                 # NSP: hidden, then 2 outputs
    else:
        macs += H * H + H * config.num_classes                # classifier: hidden, output
    return macs


def model_flops(config, task: str, batch_size: int, seq_len: int, num_preds: int = 0,
                train: bool = True) -> int:
    """FLOPs of one step on a (batch_size, seq_len) batch: forward only, or forward +
    backward (x3) with `train`."""
    forward = 2 * batch_size * model_macs(config, task, seq_len, num_preds)
    return 3 * forward if train else forward


def packed_model_flops(config, batch, train: bool = True) -> int:
    """FLOPs of one packed pretraining step on `batch` (a padded batch dict), at the packed
    sizes that `train.step.PretrainStep` gives it on its own (one shard)."""
    from ..data.packing import PackedSizes
    T, K = PackedSizes().update(batch)
    B, L = batch['tokens'].shape
    H, F = config.num_hiddens, config.ffn_num_hiddens
    per_token = 4 * H * H + 2 * H * F           # projections and FFN, per real token
    attention = 2 * L * L * H                   # scores and weighted values, per sequence
    macs = config.num_blks * (T * per_token + B * attention)
    macs += K * (H * H + H * config.vocab_size)  # MLM head on the real predictions
    macs += B * (H * H + H * 2)                  # NSP head
    return 3 * 2 * macs if train else 2 * macs

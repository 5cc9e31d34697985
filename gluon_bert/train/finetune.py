"""Fine-tuning a pretrained BERT on SNLI (natural language inference), as the book does."""
from __future__ import annotations

import mxnet as mx
import numpy as onp
from mxnet import init
from mxnet.util import is_np_array

from ..config import TrainConfig
from ..errors import ConfigError
from .loop import train
from .step import PackedForward, _as_nd, host_shards, split_batch

__all__ = ['finetune', 'evaluate_accuracy', 'count_correct',
           'load_finetuning_data']


# The new output layer starts as the book's: it calls net.output.initialize(), which is
# MXNet's default Uniform(0.07).
OUTPUT_INIT = init.Uniform(0.07)


def load_finetuning_data(cfg: TrainConfig, vocab):
    """(train loader, eval loader) of SNLI pairs encoded as <cls> p <sep> h <sep>."""
    from ..data import BatchLoader, SNLIBERTDataset, read_snli, sample_dir
    data_dir = cfg.data_dir or sample_dir('snli')
    pairs = read_snli(data_dir, cfg.train_split)
    if cfg.holdout:
        # hold out a fixed, seeded subset of the training split as the evaluation set
        n = len(pairs[0])
        if cfg.holdout >= n:
            raise ConfigError(f'--holdout {cfg.holdout} leaves nothing of {n} training pairs')
        order = onp.random.default_rng(cfg.seed).permutation(n)
        pick = lambda idx: tuple([col[i] for i in idx] for col in pairs)  # noqa: E731
        pairs, test = pick(order[cfg.holdout:]), pick(order[:cfg.holdout])
    else:
        test = read_snli(data_dir, cfg.eval_split)
    if cfg.train_limit:
        pairs = tuple(col[:cfg.train_limit] for col in pairs)
    train_set = SNLIBERTDataset(pairs, cfg.max_len, vocab)
    test_set = SNLIBERTDataset(test, cfg.max_len, vocab)
    common = dict(pad_to=cfg.pad_to, bucket=cfg.bucket, seed=cfg.seed)
    return (BatchLoader(train_set.arrays, cfg.batch_size, shuffle=True, **common),
            BatchLoader(test_set.arrays, cfg.batch_size, shuffle=False,
                        pad_to=cfg.pad_to, seed=cfg.seed))


def count_correct(net, loader, contexts, rank=0, num_workers=1, packed=None, forward=None):
    """(correctly classified, examples) of this worker's slice of every batch; one
    read-back at the end.

    `packed` (default: for this package's `BERTClassifier` outside numpy mode) runs each
    shard on its real tokens only (`data.packing`), the same logits as the padded batch;
    `forward`, a `step.PackedForward` of `net` to reuse (a runner keeps one, so that the
    graph is built once for all its evaluations), implies it."""
    from ..model import BERTClassifier
    if packed is None:
        packed = forward is not None or (isinstance(net, BERTClassifier) and not is_np_array())
    keys = ('tokens', 'segments', 'valid_lens', 'labels')
    if packed and forward is None:
        forward = PackedForward(net)
    correct, total = [], 0
    loader.set_epoch(0)
    for batch in loader:
        if not packed:
            for tokens, segments, valid_lens, labels in split_batch(
                    batch, keys, contexts, rank, num_workers, skip_empty=True):
                pred = net(tokens, segments, valid_lens).argmax(axis=-1)
                correct.append((pred == labels.astype('float32')).sum()
                               .as_in_context(contexts[0]))
                total += labels.shape[0]
            continue
        parts = host_shards(batch, keys, contexts, rank, num_workers, skip_empty=True)
        if not parts:
            continue
        sizes = forward.reserve([part for part, _ in parts])  # grow-only: one graph
        for part, ctx in parts:
            logits = forward(part, ctx, sizes)
            hits = logits.argmax(axis=-1) == _as_nd(part['labels'], ctx).astype('float32')
            correct.append(hits.sum().as_in_context(contexts[0]))
            total += len(part['labels'])
    return (float(mx.nd.add_n(*correct).asscalar()) if correct else 0.0), total


def evaluate_accuracy(net, loader, contexts, packed=None):
    """Share of correctly classified examples (`packed`: see `count_correct`)."""
    correct, total = count_correct(net, loader, contexts, packed=packed)
    return correct / max(total, 1)


def finetune(cfg: TrainConfig, resume: bool = False, progress: bool | None = None,
             stop_after: int | None = None, **kwargs):
    """Fine-tune `cfg.init` on SNLI in cfg.framework, or continue such a run; returns a
    summary dict (see `train.loop.train`)."""
    if cfg.task != 'finetune':
        cfg = cfg.replace(task='finetune')
    return train(cfg, resume=resume, progress=progress, stop_after=stop_after, **kwargs)

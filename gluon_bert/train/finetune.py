"""Fine-tuning a pretrained BERT on SNLI (natural language inference), as the book does."""
from __future__ import annotations

import mxnet as mx
import numpy as onp
from mxnet import init

from ..config import TrainConfig
from ..errors import ConfigError
from .loop import train
from .step import split_batch

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


def count_correct(net, loader, contexts, rank=0, num_workers=1):
    """(correctly classified, examples) of this worker's slice of every batch; one
    read-back at the end."""
    correct, total = [], 0
    loader.set_epoch(0)
    for batch in loader:
        for tokens, segments, valid_lens, labels in split_batch(
                batch, ('tokens', 'segments', 'valid_lens', 'labels'), contexts, rank,
                num_workers, skip_empty=True):
            pred = net(tokens, segments, valid_lens).argmax(axis=-1)
            correct.append((pred == labels.astype('float32')).sum().as_in_context(contexts[0]))
            total += labels.shape[0]
    return (float(mx.nd.add_n(*correct).asscalar()) if correct else 0.0), total


def evaluate_accuracy(net, loader, contexts):
    """Share of correctly classified examples."""
    correct, total = count_correct(net, loader, contexts)
    return correct / max(total, 1)


def finetune(cfg: TrainConfig, resume: bool = False, progress: bool | None = None,
             stop_after: int | None = None, **kwargs):
    """Fine-tune `cfg.init` on SNLI in cfg.framework, or continue such a run; returns a
    summary dict (see `train.loop.train`)."""
    if cfg.task != 'finetune':
        cfg = cfg.replace(task='finetune')
    return train(cfg, resume=resume, progress=progress, stop_after=stop_after, **kwargs)

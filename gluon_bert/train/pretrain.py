"""Pretraining BERT on WikiText-2 with masked language modeling + next sentence prediction."""
from __future__ import annotations

import random

from ..config import TrainConfig
from .loop import run_average, train

__all__ = ['pretrain', 'load_pretraining_data', 'run_average']


def load_pretraining_data(cfg: TrainConfig, vocab=None):
    """(BatchLoader, vocab) for WikiText-2 in cfg.data_dir, or the shipped sample."""
    from ..data import BatchLoader, WikiTextDataset, read_wiki, sample_dir
    data_dir = cfg.data_dir or sample_dir('wikitext-2')
    # the paragraph order and the examples both follow the run's seed
    paragraphs = read_wiki(data_dir, random.Random(cfg.seed))
    dataset = WikiTextDataset(paragraphs, cfg.max_len, vocab=vocab, seed=cfg.seed)
    arrays = dataset.arrays
    if cfg.train_limit:
        arrays = {k: v[:cfg.train_limit] for k, v in arrays.items()}
    loader = BatchLoader(arrays, cfg.batch_size, shuffle=True, seed=cfg.seed,
                         pad_to=cfg.pad_to, bucket=cfg.bucket)
    return loader, dataset.vocab


def pretrain(cfg: TrainConfig, resume: bool = False, progress: bool | None = None,
             stop_after: int | None = None, **kwargs):
    """Run (or continue) a pretraining run in cfg.framework; returns a summary dict
    (see `train.loop.train`)."""
    if cfg.task != 'pretrain':
        cfg = cfg.replace(task='pretrain')
    return train(cfg, resume=resume, progress=progress, stop_after=stop_after, **kwargs)

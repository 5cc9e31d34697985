"""Whole training loops with their data pipelines, built inside a worker (`worker.py`).

ours-* and the ports run `train.loop.train` (the one loop of every framework) from the
benchmark's initial weights. The book's variants run the book's code: for pretraining its
own pipeline (`d2l.load_data_wiki`: `_read_wiki`, `_WikiTextDataset`, a DataLoader with the
book's workers) and its step; for fine-tuning its step on batches from this package's SNLI
code padded to max_len (the book pads to 128 too).

Each loop runs 2 x `loop_steps` steps; the rate is that of the second half (the first is
warm-up: graph building, compilation, the allocator reaching its steady state), in
examples per second of wall time, batch building included.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import tempfile
import time

from .variants import (INPUTS, Skip, book_mxnet_finetune_step,
                       book_mxnet_model, book_mxnet_pretrain_step, book_torch_finetune_step,
                       book_torch_model, book_torch_pretrain_step, import_d2l_torch,
                       is_book_shape, load_book_mxnet_params, runner_options, torch_tensors)

__all__ = ['run_loop']

FRAMEWORK = {'ours-hybrid': 'mxnet', 'ours-bucketed': 'mxnet', 'torch-eager': 'torch',
             'jax-jit': 'jax'}


def _data_dir(data_root, name):
    """The real data set's folder under data_root, or None (the shipped sample)."""
    if not data_root:
        return None
    path = os.path.join(data_root, name)
    return path if os.path.isdir(path) else None


def _train_config(w, variant, data_dir, out_dir, devices, seed):
    from ..config import TrainConfig
    framework = FRAMEWORK[variant]
    common = dict(data_dir=data_dir, out_dir=out_dir, preset=w.preset, batch_size=w.batch_size,
                  max_len=w.seq_len, seed=seed, framework=framework,
                  devices=devices if framework == 'mxnet' else None)
    if w.task == 'pretrain':
        return TrainConfig.for_task('pretrain', lr=0.01, num_steps=2 * w.loop_steps,
                                    log_interval=w.loop_steps, **common)
    # ports train on the same bucketed batches as ours-bucketed (their best here)
    bucketed = variant != 'ours-hybrid'
    split = 'dev' if data_dir else 'train'  # the shared data holds SNLI dev only
    return TrainConfig.for_task('finetune', lr=1e-4, num_epochs=2, train_split=split,
                                holdout=w.batch_size, train_limit=w.loop_steps * w.batch_size,
                                pad_to='longest' if bucketed else 'max_len', bucket=bucketed,
                                **common)


def _snli_vocab(cfg):
    """The book's fine-tuning vocabulary rule (min_freq 5) over the whole split."""
    from ..data import RESERVED_TOKENS, Vocab, read_snli, sample_dir
    premises, hypotheses, _ = read_snli(cfg.data_dir or sample_dir('snli'), cfg.train_split)
    tokens = [s.lower().split() for s in list(premises) + list(hypotheses)]
    return Vocab(tokens, min_freq=5, reserved_tokens=RESERVED_TOKENS)


def _fit_vocab(config, params, vocab_len, task, seed, notes):
    """The workload's model, or a larger one where the data's vocabulary outgrows it."""
    if vocab_len <= config.vocab_size:
        return config, params
    notes.append(f'the data has {vocab_len} tokens, more than the workload\'s '
                 f'{config.vocab_size}: fresh weights for that vocabulary')
    from .worker import initial_params
    config = config.replace(vocab_size=vocab_len)
    return config, initial_params(config, task, seed)


def _ours_loop(spec, w, config, params, notes):
    from ..train.loop import train
    variant = spec['variant']
    dtype = spec.get('dtype', 'float32')
    if dtype != 'float32':
        from ..config import TrainConfig
        runner_options(dtype)  # Skip until MXNetRunner takes a dtype
        if 'dtype' not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise Skip('TrainConfig has no dtype option yet')
    data = _data_dir(spec.get('data_root'), w.data)
    out_dir = tempfile.mkdtemp(prefix='bench-loop-')
    try:
        cfg = _train_config(w, variant, data, os.path.join(out_dir, 'run'),
                            spec.get('devices'), spec.get('seed', 0))
        if dtype != 'float32':
            cfg = cfg.replace(dtype=dtype)
        if w.task == 'pretrain':
            from .. train.pretrain import load_pretraining_data
            loader, vocab = load_pretraining_data(cfg)
            loaders = (loader, None)
        else:
            from ..train.finetune import load_finetuning_data
            vocab = _snli_vocab(cfg)
            loaders = load_finetuning_data(cfg, vocab)
        config, params = _fit_vocab(config, params, len(vocab), w.task, cfg.seed, notes)
        summary = train(cfg, progress=False, start=(config, params, vocab, loaders))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    key = 'pairs_per_sec' if w.task == 'pretrain' else 'examples_per_sec'
    rates = [r[key] for r in summary['history'] if r.get(key)]
    if cfg.task == 'finetune' and cfg.bucket:
        notes.append("length-bucketed batches (pad_to='longest')")
        if variant == 'jax-jit':
            notes.append('jax.jit compiles the step once for every new batch shape')
    return dict(rate=rates[-1] if rates else None, first_rate=rates[0] if rates else None,
                intervals=rates, steps=summary['step'], data=_data_name(data, w),
                examples=loaders[0].num_examples)


def _data_name(data, w):
    return f'{w.data} (real: {data})' if data else f'{w.data} (shipped sample)'


def _time_second_half(batches, step, n_steps):
    """Run `step` over the first 2 n_steps batches; examples/s over the second half."""
    seen = 0
    start = None
    count = 0
    for i, (batch, n) in enumerate(batches):
        if i == n_steps:
            start = time.perf_counter()
        step(batch)
        if i >= n_steps:
            count += n
        seen += 1
        if seen == 2 * n_steps:
            break
    if start is None or not count:
        raise Skip(f'the data gives {seen} batches, fewer than the {n_steps + 1} needed')
    return count / (time.perf_counter() - start), seen


def _book_batches(train_iter, epochs=1000):
    """(batch, size) from the book's DataLoader over and over: the book's pretraining
    iterators yield lists of arrays, the first of them the token ids (B, L)."""
    for _ in range(epochs):
        for batch in train_iter:
            yield batch, batch[0].shape[0]


def _epochs(loader, epochs=2):
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch, len(batch['tokens'])


def _book_wiki_dir(data, tmp):
    """A folder with an uncompressed wiki.train.tokens, as the book's `_read_wiki` reads."""
    from ..data import sample_dir
    src = os.path.join(data or sample_dir('wikitext-2'), 'wiki.train.tokens')
    if os.path.exists(src):
        shutil.copy(src, tmp)
    else:
        with gzip.open(src + '.gz', 'rb') as f, \
                open(os.path.join(tmp, 'wiki.train.tokens'), 'wb') as g:
            shutil.copyfileobj(f, g)
    return tmp


def _book_loop(spec, w, config, params, notes):
    if not is_book_shape(config):
        raise Skip("the book's d2l classes have the book's architecture only")
    variant = spec['variant']
    data = _data_dir(spec.get('data_root'), w.data)
    tmp = tempfile.mkdtemp(prefix='bench-book-')
    try:
        if variant == 'd2l-mxnet':
            rate, steps = _book_mxnet_loop(spec, w, config, params, data, tmp, notes)
        else:
            rate, steps = _book_torch_loop(spec, w, config, params, data, tmp, notes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(rate=rate, steps=steps, data=_data_name(data, w))


def _finetune_loader(spec, w, data, tmp):
    """This package's SNLI batches padded to max_len: the book pads every pair to 128."""
    from ..train.finetune import load_finetuning_data
    cfg = _train_config(w, 'ours-hybrid', data, os.path.join(tmp, 'run'), None,
                        spec.get('seed', 0))
    vocab = _snli_vocab(cfg)
    return load_finetuning_data(cfg, vocab)[0], len(vocab)


def _book_wiki_data(d2l, spec, w, data, tmp):
    """The book's own pipeline (d2l.load_data_wiki); its download is the local copy of the
    same file. Its examples are drawn with Python's global `random`: seeded here."""
    import random
    folder = _book_wiki_dir(data, tmp)
    d2l.download_extract = lambda *args, **kwargs: folder
    random.seed(spec.get('seed', 0))
    train_iter, vocab = d2l.load_data_wiki(w.batch_size, w.seq_len)
    dataset = train_iter.dataset if hasattr(train_iter, 'dataset') else train_iter._dataset
    if len(dataset) < w.batch_size:
        raise Skip(f"the book's pipeline keeps {len(dataset)} sentence pairs of at "
                   f'most {w.seq_len} tokens from this data, less than one batch')
    return train_iter, vocab


def _book_mxnet_loop(spec, w, config, params, data, tmp, notes):
    import mxnet as mx
    from mxnet import gluon, init, npx
    from d2l import mxnet as d2l
    from ..train.devices import parse_contexts
    npx.set_np()
    ctxs = parse_contexts(spec.get('devices'))
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    if w.task == 'pretrain':
        # the book's own pipeline; its download is the local copy of the same file
        train_iter, vocab = _book_wiki_data(d2l, spec, w, data, tmp)
        config, params = _fit_vocab(config, params, len(vocab), w.task, 0, notes)
        net = book_mxnet_model(d2l, config, w.task)
        net.initialize(init.Xavier(), ctx=ctxs)
        first = next(iter(train_iter))
        net(*[a[:2].as_in_context(ctxs[0]) for a in first[:4]])
        load_book_mxnet_params(net, params)
        trainer = gluon.Trainer(net.collect_params(), 'adam', {'learning_rate': 0.01})
        notes.append("the book's data pipeline (d2l.load_data_wiki) and step; timed with "
                     'the batch loading, not step-only as the book prints')

        batches = lambda: _book_batches(train_iter)  # noqa: E731

        def step(batch):
            book_mxnet_pretrain_step(d2l, net, loss, trainer, len(vocab), ctxs, list(batch))
    else:
        loader, vocab_len = _finetune_loader(spec, w, data, tmp)
        config, params = _fit_vocab(config, params, vocab_len, w.task, 0, notes)
        net = book_mxnet_model(d2l, config, w.task)
        net.initialize(ctx=ctxs)
        loader.set_epoch(0)
        first = next(iter(loader))  # a forward pass finishes Gluon's deferred initialization
        net([mx.np.array(first[k][:2], ctx=ctxs[0]) for k in INPUTS])
        load_book_mxnet_params(net, params)
        trainer = gluon.Trainer(net.collect_params(), 'adam', {'learning_rate': 1e-4})
        notes.append("the book's fine-tuning step (d2l.train_batch_ch13) on this package's "
                     'SNLI batches, padded to max_len as the book pads')
        batches = lambda: _epochs(loader, 1000)  # noqa: E731

        def step(batch):
            book_mxnet_finetune_step(d2l, net, loss, trainer, ctxs,
                                     [mx.np.array(batch[k]) for k in INPUTS],
                                     mx.np.array(batch['labels']))
    try:
        return _time_second_half(batches(), step, w.loop_steps)
    finally:
        npx.reset_np()


def _book_torch_loop(spec, w, config, params, data, tmp, notes):
    import torch
    from ..ports.convert import to_d2l_torch
    d2l = import_d2l_torch(notes)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if w.task == 'pretrain':
        train_iter, vocab = _book_wiki_data(d2l, spec, w, data, tmp)
        config, params = _fit_vocab(config, params, len(vocab), w.task, 0, notes)
        net = book_torch_model(d2l, config, w.task)
        net.load_state_dict(to_d2l_torch(params, config, w.task))
        net.to(device)
        trainer = torch.optim.Adam(net.parameters(), lr=0.01)
        loss = torch.nn.CrossEntropyLoss()
        notes.append("the book's data pipeline (d2l.load_data_wiki, its DataLoader workers) "
                     'and step; timed with the batch loading')

        batches = lambda: _book_batches(train_iter)  # noqa: E731

        def step(batch):
            net.train()
            book_torch_pretrain_step(d2l, net, loss, trainer, len(vocab),
                                     [x.to(device) for x in batch])
    else:
        loader, vocab_len = _finetune_loader(spec, w, data, tmp)
        config, params = _fit_vocab(config, params, vocab_len, w.task, 0, notes)
        net = book_torch_model(d2l, config, w.task)
        net.load_state_dict(to_d2l_torch(params, config, w.task))
        net.to(device)
        trainer = torch.optim.Adam(net.parameters(), lr=1e-4)
        loss = torch.nn.CrossEntropyLoss(reduction='none')
        notes.append("the book's fine-tuning step (d2l.train_batch_ch13) on this package's "
                     'SNLI batches, padded to max_len')
        batches = lambda: _epochs(loader, 1000)  # noqa: E731

        def step(batch):
            (labels,) = torch_tensors(batch, ('labels',), device)
            book_torch_finetune_step(d2l, net, loss, trainer, device,
                                     torch_tensors(batch, INPUTS, device), labels)
    return _time_second_half(batches(), step, w.loop_steps)


def run_loop(spec, w, config, params, notes):
    """{'rate': examples/s at steady state, ...} of one variant's whole loop."""
    variant = spec['variant']
    if variant in FRAMEWORK:
        return _ours_loop(spec, w, config, params, notes)
    if variant in ('d2l-mxnet', 'd2l-pytorch'):
        return _book_loop(spec, w, config, params, notes)
    raise Skip(f'{variant} has no whole-loop measurement')


"""Pretraining BERT on WikiText-2 with masked language modeling + next sentence prediction."""
from __future__ import annotations

import os
import random

import mxnet as mx
from mxnet import init

from ..config import BERTConfig, TrainConfig
from ..model import BERTModel
from .checkpoint import load_config, read_state, save_checkpoint, CheckpointError
from .common import Throughput, TrainingInterrupted, find_resume, seed_step, setup_devices
from .devices import describe
from .logs import RunLog, plot_history, progress_bar
from .schedule import learning_rate
from .step import PretrainStep, make_trainer

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


def run_average(history, key):
    """Mean of `key` over every update of the run: what the book prints (its MLM 7.292 and
    NSP 0.822 are averages over all 50 steps, not the last step's loss)."""
    total, steps, prev = 0.0, 0, 0
    for row in history:
        n = row['step'] - prev
        total, steps, prev = total + row[key] * n, steps + n, row['step']
    return total / steps if steps else None


def pretrain(cfg: TrainConfig, resume: bool = False, progress: bool | None = None,
             stop_after: int | None = None):
    """Run (or continue) a pretraining run; returns a summary dict.

    `stop_after` ends the run early after that many updates of this call, as an
    interruption would (used to test resuming).
    """
    # setup: devices, data, model, trainer
    contexts, kvstore = setup_devices(cfg)
    ckpt = find_resume(cfg, resume)
    vocab = None
    if ckpt is not None:
        from ..data.vocab import Vocab
        vocab = Vocab.load(os.path.join(ckpt, 'vocab.json'))
    loader, vocab = load_pretraining_data(cfg, vocab)
    config = BERTConfig.from_preset(cfg.preset, vocab_size=len(vocab))
    if ckpt is not None and load_config(ckpt) != config:
        raise CheckpointError(f'{ckpt} was made for another model: {load_config(ckpt)}')
    net = BERTModel(config)
    mx.random.seed(cfg.seed, ctx='all')  # the initial weights are a function of the seed
    net.initialize(init.Xavier(), ctx=contexts)
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = make_trainer(net.collect_params(), cfg.lr, kvstore)
    step_fn = PretrainStep(net, trainer, contexts, cfg.clip_norm)

    start, history = 0, []
    if ckpt is not None:
        net.load_parameters(os.path.join(ckpt, 'model.params'), ctx=contexts)
        trainer.load_states(os.path.join(ckpt, 'trainer.states'))
        state = read_state(ckpt)
        start, history = state['step'], state['history']
    log = RunLog(cfg.out_dir, history)
    log.log.info(f'pretraining {config.preset} (vocab {len(vocab)}) on {describe(contexts, kvstore)}'
                 f', {len(loader)} batches/epoch, steps {start}->{cfg.num_steps}')

    def checkpoint(step):
        return save_checkpoint(cfg.out_dir, step, net, config, vocab,
                               dict(task='pretrain', train_config=cfg.to_dict(),
                                    history=log.history), trainer)

    meter = Throughput()
    sums = None  # device-side sums of (mlm, nsp) since the last log line
    n_in_interval = 0
    bar = progress_bar(cfg.num_steps, start, 'pretrain', progress)
    step = start
    try:
        while step < cfg.num_steps and (stop_after is None or step - start < stop_after):
            # batch: the order of every epoch is a pure function of (seed, epoch)
            epoch, index = divmod(step, len(loader))
            batch = loader.make_batch(loader.batch_indices(epoch)[index])
            # step: forward, loss, backward, reduce, update (no device sync inside)
            trainer.set_learning_rate(learning_rate(step, cfg.lr, cfg.num_steps,
                                                    cfg.warmup_steps, cfg.schedule))
            seed_step(cfg.seed, step)
            mlm_l, nsp_l = step_fn(batch)
            sums = (mlm_l, nsp_l) if sums is None else (sums[0] + mlm_l, sums[1] + nsp_l)
            n_in_interval += 1
            step += 1
            bar.update(1)
            if step == start + 1:
                # warm-up: the first update builds the static graph; time the rest
                mx.nd.waitall()
                meter.start()
            else:
                meter.add(len(batch['tokens']))
            # log: the only read-back of device values, once per interval
            if step % cfg.log_interval == 0 or step == cfg.num_steps:
                mlm, nsp = (s.asscalar() / n_in_interval for s in sums)
                meter.stop()
                log.write(dict(step=step, epoch=epoch, train_mlm=mlm, train_nsp=nsp,
                               lr=trainer.learning_rate, pairs_per_sec=meter.rate))
                bar.set_postfix(mlm=f'{mlm:.3f}', nsp=f'{nsp:.3f}')
                sums, n_in_interval = None, 0
                meter.start()
            # checkpoint
            if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0:
                checkpoint(step)
    except KeyboardInterrupt:
        mx.nd.waitall()
        bar.close()
        raise TrainingInterrupted(checkpoint(step)) from None
    bar.close()
    final = checkpoint(step)
    plot = plot_history(log.history, os.path.join(cfg.out_dir, 'loss.png'), 'step',
                        {'MLM loss': ['train_mlm'], 'NSP loss': ['train_nsp']},
                        title=f'BERT pretraining ({config.preset})')
    last = log.history[-1] if log.history else {}
    return dict(checkpoint=final, step=step, mlm=last.get('train_mlm'),
                nsp=last.get('train_nsp'), mlm_avg=run_average(log.history, 'train_mlm'),
                nsp_avg=run_average(log.history, 'train_nsp'), pairs_per_sec=meter.rate,
                plot=plot,
                vocab_size=len(vocab), devices=[str(c) for c in contexts])

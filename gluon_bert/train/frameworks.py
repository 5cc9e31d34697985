"""One loop over the runner interface, for `--framework torch|jax` and `gluon-bert compare`.

`MXNetRunner` puts this package's model and training step behind the same interface as the
ports' `TorchRunner` and `JaxRunner` (gluon_bert/ports/runners.py): numpy batches in,
parameters under the MXNet names, metrics read back only when asked. Every framework then
runs the same data, in the same order, from the same initial weights.

The full-featured MXNet loops (resume, checkpoints every N steps, Ctrl-C) are
`train.pretrain` and `train.finetune`; this loop keeps to what a comparison needs.
"""
from __future__ import annotations

import os
import time

import mxnet as mx
import numpy as onp
from mxnet import init

from ..config import BERTConfig, TrainConfig
from ..model import BERTClassifier, BERTModel, legacy_scope
from .checkpoint import save_checkpoint
from .devices import parse_contexts
from .logs import RunLog, plot_history, progress_bar
from .schedule import learning_rate
from .step import FinetuneStep, PretrainStep, make_trainer

__all__ = ['MXNetRunner', 'initial_params', 'build_runner', 'check_runner_options',
           'run_training', 'params_of']


def params_of(net):
    return {k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()}


def _load_params(net, params, contexts):
    for name, p in net._collect_params_with_prefix().items():
        if name not in params:
            raise KeyError(f'no value for parameter {name}')
        p.set_data(mx.nd.array(params[name], dtype=p.dtype))
    with legacy_scope():
        net.collect_params().reset_ctx(contexts)


class MXNetRunner:
    """This package's hybridized model and step behind the runner interface."""
    name = 'mxnet'

    def __init__(self, config: BERTConfig, params, task='pretrain', lr=1e-3, seed=0,
                 devices=None, clip_norm=None):
        self.config, self.task = config, task
        self.contexts = parse_contexts(devices)
        self.net = BERTModel(config) if task == 'pretrain' else BERTClassifier(config)
        self.net.initialize(ctx=mx.cpu())
        _load_params(self.net, params, self.contexts)
        self.net.hybridize(static_alloc=True, static_shape=True)
        kvstore = mx.kv.create('device') if len(self.contexts) > 1 else None
        self.trainer = make_trainer(self.net.collect_params(), lr, kvstore)
        step_cls = PretrainStep if task == 'pretrain' else FinetuneStep
        self.step = step_cls(self.net, self.trainer, self.contexts, clip_norm)
        mx.random.seed(seed)

    def set_learning_rate(self, lr: float) -> None:
        """The learning rate of the next steps (schedules call this before every step)."""
        self.trainer.set_learning_rate(lr)

    def train_step_async(self, batch):
        a, b = self.step(batch)
        if self.task == 'pretrain':
            return {'loss': a + b, 'mlm': a, 'nsp': b}
        return {'loss': a / len(batch['labels'])}

    def train_step(self, batch):
        return {k: float(v.asscalar()) for k, v in self.train_step_async(batch).items()}

    def predict(self, batch):
        ctx = self.contexts[0]
        args = [mx.nd.array(batch[k], ctx=ctx, dtype=batch[k].dtype)
                for k in ('tokens', 'segments', 'valid_lens')]
        if self.task == 'finetune':
            return self.net(*args).asnumpy()
        positions = batch.get('pred_positions')
        if positions is not None:
            args.append(mx.nd.array(positions, ctx=ctx, dtype=positions.dtype))
        _, mlm, nsp = self.net(*args)
        return (None if mlm is None else mlm.asnumpy()), nsp.asnumpy()

    def params(self):
        return params_of(self.net)

    def sync(self):
        mx.nd.waitall()


def initial_params(cfg: TrainConfig, vocab_size=None):
    """(BERTConfig, params, vocab, loaders) that every framework starts from."""
    from .finetune import OUTPUT_INIT, load_bert, load_finetuning_data
    from .pretrain import load_pretraining_data
    mx.random.seed(cfg.seed)
    if cfg.task == 'pretrain':
        loader, vocab = load_pretraining_data(cfg)
        config = BERTConfig.from_preset(cfg.preset, vocab_size=len(vocab))
        net = BERTModel(config)
        net.initialize(init.Xavier())
        return config, params_of(net), vocab, (loader, None)
    bert, vocab = load_bert(cfg.init, [mx.cpu()])
    clf = BERTClassifier(bert)
    clf.output.initialize(OUTPUT_INIT)
    return bert.config, params_of(clf), vocab, load_finetuning_data(cfg, vocab)


def check_runner_options(cfg: TrainConfig, framework: str) -> None:
    """Refuse what a framework's runner cannot do, before any training starts."""
    if framework != 'mxnet' and cfg.devices not in (None, '', 'auto'):
        raise ValueError(f'--devices {cfg.devices} is for MXNet; the {framework} port trains '
                         'on one device (the first GPU, else the CPU): leave --devices out')


def build_runner(framework, config, params, cfg: TrainConfig):
    kwargs = dict(task=cfg.task, lr=cfg.lr, seed=cfg.seed, clip_norm=cfg.clip_norm)
    if framework == 'mxnet':
        return MXNetRunner(config, params, devices=cfg.devices, **kwargs)
    from ..ports.runners import make_runner
    return make_runner(framework, config, params, **kwargs)


def _accuracy(runner, loader):
    correct = total = 0
    loader.set_epoch(0)
    for batch in loader:
        correct += int((runner.predict(batch).argmax(-1) == batch['labels']).sum())
        total += len(batch['labels'])
    return correct / max(total, 1)


def run_training(cfg: TrainConfig, resume=False, progress=None, start=None):
    """Train with cfg.framework through its runner; writes metrics, a checkpoint, a plot.

    `start` = (config, params, vocab, loaders) lets `compare` give every framework the
    same start."""
    if resume:
        raise ValueError(f'--resume is supported by the MXNet loops; not with --framework '
                         f'{cfg.framework}')
    check_runner_options(cfg, cfg.framework)  # before any data is read
    config, params, vocab, (train_loader, eval_loader) = start or initial_params(cfg)
    runner = build_runner(cfg.framework, config, params, cfg)
    log = RunLog(cfg.out_dir)
    total = cfg.num_steps if cfg.task == 'pretrain' else len(train_loader) * cfg.num_epochs
    bar = progress_bar(total, 0, f'{cfg.task} [{runner.name}]', progress)
    seconds, examples, pending, t0 = 0.0, 0, [], None
    step = 0
    while step < total:
        epoch, index = divmod(step, len(train_loader))
        batch = train_loader.make_batch(train_loader.batch_indices(epoch)[index])
        # the same schedule as the MXNet loops: a pure function of the step
        runner.set_learning_rate(learning_rate(step, cfg.lr, total, cfg.warmup_steps,
                                               cfg.schedule))
        pending.append(runner.train_step_async(batch))
        step += 1
        bar.update(1)
        if step == 1:
            runner.sync()  # warm-up: graph building / compilation is not timed
            t0 = time.perf_counter()
        else:
            examples += len(batch['tokens'])
        end_of_epoch = cfg.task == 'finetune' and step % len(train_loader) == 0
        if step % cfg.log_interval == 0 or step == total or end_of_epoch:
            runner.sync()
            seconds += time.perf_counter() - t0
            means = {k: float(onp.mean([float(m[k].asscalar() if hasattr(m[k], 'asscalar')
                                               else m[k]) for m in pending]))
                     for k in pending[0]}
            row = dict(step=step, epoch=epoch + 1, framework=runner.name,
                       **{f'train_{k}': v for k, v in means.items()},
                       examples_per_sec=examples / seconds if seconds else None)
            if end_of_epoch and eval_loader is not None:
                row['eval_acc'] = _accuracy(runner, eval_loader)
            log.write(row)
            pending = []
            t0 = time.perf_counter()
    bar.close()
    # checkpoint in this package's format, whatever framework trained it
    net = BERTModel(config) if cfg.task == 'pretrain' else BERTClassifier(config)
    net.initialize()
    _load_params(net, runner.params(), [mx.cpu()])
    final = save_checkpoint(cfg.out_dir, step, net, config, vocab,
                            dict(task=cfg.task, train_config=cfg.to_dict(),
                                 framework=runner.name, history=log.history))
    keys = ['train_mlm', 'train_nsp'] if cfg.task == 'pretrain' else ['train_loss']
    plot = plot_history(log.history, os.path.join(cfg.out_dir, 'loss.png'), 'step',
                        {'loss': keys, 'accuracy': ['eval_acc']}, title=runner.name)
    last = log.history[-1]
    return dict(framework=runner.name, checkpoint=final, step=step, plot=plot,
                examples_per_sec=examples / seconds if seconds else None,
                **{k: v for k, v in last.items() if k.startswith(('train_', 'eval_'))},
                history=log.history)

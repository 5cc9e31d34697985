"""The one training loop: every framework, both tasks, resume, checkpoints, signals.

    train(cfg)                 pretraining by steps (cfg.task 'pretrain') or fine-tuning by
                               epochs with an evaluation after each (cfg.task 'finetune'),
                               in cfg.framework: MXNet (ours) or the PyTorch / JAX port
    train(cfg, resume=True)    continues the run in cfg.out_dir exactly where it stopped

It runs over the runner interface (`train.runners`), so each guarantee is written once:
- the run folder is locked (`RunFolder`): a second run on it is refused, a killed run's
  temporary files are cleaned, a failed start leaves nothing behind;
- checkpoints are atomic and verified; resume takes the newest one that verifies (falling
  back to the one before a corrupt one) and the settings it was trained with;
- parameters and optimizer state are keyed by stable names, dropout masks are a function of
  (seed, step), the data order a function of (seed, epoch): a resumed run repeats the
  uninterrupted one, and the log interval it was cut in is carried in the checkpoint, so
  every logged row is the same too;
- SIGINT and SIGTERM finish the current step (and evaluation), save, and stop; a loss or
  weight that turns NaN or infinite stops the run at the last finite checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from typing import Any, Mapping

from ..config import BERTConfig, TrainConfig
from ..errors import CheckpointError, ConfigError, TrainingDiverged
from .checkpoint import (latest_checkpoint, load_config, load_optimizer_state, load_params,
                         read_state, save_checkpoint)
from .common import StopSignals, Throughput, TrainingInterrupted
from .devices import DISTRIBUTED, Placement, place
from .logs import RunLog, get_logger, plot_history, progress_bar
from .runfolder import RunFolder
from .schedule import learning_rate

__all__ = ['train', 'initial_state', 'check_devices', 'run_average', 'Window']

# how many of an epoch's batches a run shows its runner before the first step
# (`runner.reserve`): all 86 of WikiText-2's at the book's batch, scanned in 0.03 s
RESERVE_BATCHES = 256


def run_average(history, key):
    """Mean of `key` over every update of the run: what the book prints (its MLM 7.292 and
    NSP 0.822 are averages over all 50 steps, not the last step's loss)."""
    total, steps, prev = 0.0, 0, 0
    for row in history:
        n = row['step'] - prev
        total, steps, prev = total + row[key] * n, steps + n, row['step']
    return total / steps if steps else None


class Window:
    """The steps since the last logged row: metrics still on the device (`pending`), then,
    once read back, one dict of floats per step (`rows`, with the batch size 'n'). The rows
    are saved in checkpoints, so a row cut by an interruption is completed exactly.

    In a job of several workers each worker's metrics are its part of the global batch's
    (losses are normalised by the global batch); `reduce` sums them over the workers."""

    def __init__(self, rows=(), reduce=None):
        self.rows = [dict(r) for r in rows]
        self.pending = []
        self.reduce = reduce

    def add(self, metrics, n):
        self.pending.append((metrics, n))

    def read(self, runner):
        """Every step's metrics as floats (one read-back of the pending ones)."""
        if self.pending:
            values = runner.read_metrics([m for m, _ in self.pending])
            if self.reduce is not None:
                keys = list(values[0])
                table = self.reduce([[v[k] for k in keys] for v in values])  # (steps, metrics)
                values = [dict(zip(keys, map(float, row))) for row in table]
            self.rows += [dict(v, n=n) for v, (_, n) in zip(values, self.pending)]
            self.pending = []
        return self.rows

    def clear(self):
        self.rows, self.pending = [], []


def _not_finite(values: Mapping[str, Any]):
    return sorted(k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v))


# -- the two tasks: what closes a log row and what it holds -------------------------------

def _pretrain_row(rows, step, epoch, lr, rate):
    n = len(rows)  # the book's figures are means over steps
    return dict(step=step, epoch=epoch, train_mlm=sum(r['mlm'] for r in rows) / n,
                train_nsp=sum(r['nsp'] for r in rows) / n, lr=lr, pairs_per_sec=rate)


def _finetune_row(rows, step, epoch, lr, rate):
    n = sum(r['n'] for r in rows)  # the book's figures are means over examples
    return dict(epoch=epoch + 1, step=step, train_loss=sum(r['loss'] * r['n'] for r in rows) / n,
                train_acc=sum(r['acc'] * r['n'] for r in rows) / n, examples_per_sec=rate)


# -- setup ------------------------------------------------------------------------------------

def check_devices(cfg: TrainConfig):
    """Device list, KVStore and dtype errors before any data is read (`train`, and
    `compare` before it builds the data every framework shares)."""
    if cfg.framework != 'mxnet':
        return
    from .devices import check_kvstore, parse_contexts
    from .precision import check_dtype
    contexts = parse_contexts(cfg.devices)
    check_kvstore(cfg.kvstore, contexts)
    check_dtype(cfg.dtype, contexts)


def _load_data(cfg: TrainConfig, vocab=None):
    """((train loader, eval loader or None), vocab) of the task; pretraining builds the
    book's vocabulary from the corpus when none is given."""
    if cfg.task == 'pretrain':
        from .pretrain import load_pretraining_data
        loader, vocab = load_pretraining_data(cfg, vocab)
        return (loader, None), vocab
    from .finetune import load_finetuning_data
    return load_finetuning_data(cfg, vocab), vocab


def initial_state(cfg: TrainConfig):
    """(BERTConfig, params, vocab, (train loader, eval loader or None)) that a fresh run,
    in any framework, starts from: the same weights and the same batches."""
    import mxnet as mx
    from mxnet import init
    from ..model import BERTClassifier, BERTModel
    from ..ports.convert import mxnet_params
    if cfg.task == 'pretrain':
        BERTConfig.from_preset(cfg.preset, vocab_size=1).check_max_len(cfg.max_len)
        loaders, vocab = _load_data(cfg)
        config = BERTConfig.from_preset(cfg.preset, vocab_size=len(vocab))
        net = BERTModel(config)
        mx.random.seed(cfg.seed, ctx='all')  # the initial weights are a function of the seed
        net.initialize(init.Xavier())
        return config, mxnet_params(net), vocab, loaders
    from ..pretrained import load_pretrained
    from .finetune import OUTPUT_INIT
    if not cfg.init:
        raise ConfigError('fine-tuning needs --init: a pretraining run folder, bert.small, '
                          'bert.base, or a zip/folder in the book\'s layout')
    bert, vocab = load_pretrained(cfg.init, ctx=mx.cpu())
    bert.config.check_max_len(cfg.max_len)
    clf = BERTClassifier(bert)
    mx.random.seed(cfg.seed, ctx='all')  # the new output layer's weights follow the seed
    clf.output.initialize(OUTPUT_INIT)
    return bert.config, mxnet_params(clf), vocab, _load_data(cfg, vocab)[0]


def _resume_point(cfg: TrainConfig, resume: bool, given):
    """(checkpoint or None, its state, the run's config, the settings changed on resume)."""
    log = get_logger()
    skipped = []
    ckpt = latest_checkpoint(cfg.out_dir, verify=True, skipped=skipped)
    if ckpt is None:
        if skipped and resume:
            raise CheckpointError(f'no usable checkpoint in {cfg.out_dir}: ' +
                                  '; '.join(f'{os.path.basename(f)}: {w}' for f, w in skipped))
        return None, None, cfg, {}
    for folder, why in skipped:
        log.warning(f'skipping checkpoint {folder}: {why}')
    if not resume:
        raise CheckpointError(f'{cfg.out_dir} already holds a run ({os.path.basename(ckpt)}); '
                              'pass --resume to continue it or choose another --out-dir')
    if skipped:
        log.warning(f'resuming from {ckpt}, the newest checkpoint that verifies')
    state = read_state(ckpt)
    if state.get('task') != cfg.task:
        raise CheckpointError(f'{ckpt} is a {state.get("task")} checkpoint, not {cfg.task}')
    try:
        stored = TrainConfig.from_dict(dict(state['train_config'], out_dir=cfg.out_dir))
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f'{ckpt}/state.json: unusable training settings ({err})') from err
    if given is None:  # a TrainConfig from Python: every setting counts as given
        given = {k: v for k, v in cfg.to_dict().items() if k != 'out_dir'}
    run_cfg, changes = stored.resumed_with(given)
    return ckpt, state, run_cfg, changes


def train(cfg: TrainConfig, resume: bool = False, progress: bool | None = None,
          stop_after: int | None = None, given: Mapping[str, Any] | None = None, start=None):
    """Run (or continue) a training run; returns a summary dict.

    `given`: the settings the user named (the CLI's flags), which on resume are checked
    against the checkpoint's; None counts every field of `cfg`. `start`: (config, params,
    vocab, loaders) from `initial_state`, so that `compare` gives each framework the same.
    `stop_after` ends the run after that many updates of this call, as an interruption
    would (tests use it)."""
    check_devices(cfg)  # before the folder is touched or any data read
    placement = None
    if cfg.framework == 'mxnet' and cfg.kvstore in DISTRIBUTED:
        # joins the job (its scheduler) now: the rank decides who writes the run folder
        placement = place(cfg.devices, cfg.kvstore)
    chief = placement is None or placement.is_chief
    # only rank 0 writes the run folder (checkpoints, metrics, plots), so only it locks it
    with RunFolder(cfg.out_dir) if chief else contextlib.nullcontext():
        return _train(cfg, placement, resume, progress, stop_after, given, start)


def _train(cfg, placement, resume, progress, stop_after, given, start):
    from ..data.vocab import Vocab
    from .runners import make_runner

    # setup: the resume point, the model's weights and optimizer state, the data
    ckpt, state, cfg, changes = _resume_point(cfg, resume, given)
    if cfg.framework == 'mxnet':
        if placement is None:  # one process: the run's own devices, known once resumed
            placement = place(cfg.devices, cfg.kvstore)
        elif placement.kind != cfg.kvstore:
            raise ConfigError(f'the run was trained with --kvstore {cfg.kvstore}; resume it '
                              f'with the same')
    else:
        placement = Placement([], kind='none')
    chief, distributed = placement.is_chief, placement.distributed
    log = get_logger()
    if not chief:
        log.setLevel(logging.WARNING)  # one voice: rank 0 logs the job
    if ckpt is not None:
        config, vocab = load_config(ckpt), Vocab.load(os.path.join(ckpt, 'vocab.json'))
        config.check_max_len(cfg.max_len)
        params, optimizer_state = load_params(ckpt), load_optimizer_state(ckpt)
        loaders, _ = _load_data(cfg, vocab)
    else:
        config, params, vocab, loaders = start or initial_state(cfg)
        optimizer_state = None
    train_loader, eval_loader = loaders
    extra = dict(placement=placement) if cfg.framework == 'mxnet' else {}
    if cfg.framework == 'mxnet' and cfg.task == 'finetune' and cfg.bucket:
        # Length buckets come padded to their longest and run as they are: packed sizes
        # only grow, so short buckets would compute at the longest ones' sizes, and packing
        # already leaves out the padding that buckets save.
        extra.update(packed=False, first_only=True)
    if cfg.dtype != 'float32':
        extra['dtype'] = cfg.dtype
    runner = make_runner(cfg.framework, config, params, task=cfg.task, lr=cfg.lr,
                         seed=cfg.seed, clip_norm=cfg.clip_norm, **extra)
    if optimizer_state:
        runner.load_optimizer_state(optimizer_state)

    pretraining = cfg.task == 'pretrain'
    steps_per_epoch = len(train_loader)
    total = cfg.num_steps if pretraining else steps_per_epoch * cfg.num_epochs
    step = state['step'] if state else 0
    # shapes: a step whose shapes follow its batches sees this epoch's batches first (its
    # graph planned once, not again in the middle of the run); a resumed run then takes the
    # checkpoint's, which include everything the run had seen
    epoch = step // steps_per_epoch
    runner.reserve(train_loader.make_batch(idx)
                   for idx in train_loader.batch_indices(epoch)[:RESERVE_BATCHES])
    if state:
        runner.load_step_state(state.get('step_state', {}))
    history = state['history'] if state else []
    resumes = list(state.get('resumes', [])) if state else []
    if ckpt is not None:
        resumes.append(dict(step=step, changes=changes))
        note = f' with {changes}' if changes else ''
        log.info(f'resuming {ckpt} at step {step}{note}')
    window = Window(state.get('window', []) if state else [],
                    reduce=placement.allreduce if distributed else None)
    run_log = RunLog(cfg.out_dir, history, write=chief)
    devices = [str(c) for c in getattr(runner, 'contexts', [])] or [runner.name]
    where = ','.join(devices)
    batch_note = f'batch {cfg.batch_size}'
    if distributed:
        where += f' x {placement.num_workers} workers ({placement.kind})'
        batch_note = (f'global batch {cfg.batch_size} ({cfg.batch_size / placement.num_workers:g} '
                      f'per worker)')
    log.info(f'{cfg.task} {config.preset or "BERT"} [{runner.name}] on {where}: '
             f'{train_loader.num_examples} examples, {batch_note}, lr {cfg.lr}, '
             f'{steps_per_epoch} batches/epoch, steps {step}->{total}')
    if step >= total:
        log.info(f'the run is already complete at step {step}; pass a larger '
                 f'{"--num-steps" if pretraining else "--num-epochs"} to train longer')

    def checkpoint(at_step):
        """Save everything a resume needs; never a non-finite state."""
        rows = window.read(runner)
        params = runner.params()
        bad = [f'{k} loss' for r in rows for k in _not_finite(r)]
        bad += [name for name, a in params.items() if not _finite_array(a)]
        if bad:
            _diverged(cfg, at_step, bad)
        if not chief:
            return None
        return save_checkpoint(cfg.out_dir, at_step, params, config, vocab,
                               dict(task=cfg.task, framework=runner.name,
                                    train_config=cfg.to_dict(), history=run_log.history,
                                    window=rows, resumes=resumes,
                                    step_state=runner.step_state()),
                               runner.optimizer_state())

    meter = Throughput()
    bar = progress_bar(total, step, f'{cfg.task} [{runner.name}]', progress if chief else False)
    first, saved_at = step, step if ckpt is not None else None
    orders = {}  # epoch -> batch order: a pure function of (seed, epoch)
    stop = False  # a signal, once every worker knows of it

    def agree(signals):
        """Whether to stop: at once in one process; in a job, where the workers already
        meet (log rows, checkpoints), so that they all stop after the same step."""
        if not distributed:
            return signals.received is not None
        return bool(placement.allreduce([signals.received is not None])[0])

    with StopSignals() as signals:
        while step < total:
            stop = stop or (not distributed and agree(signals))
            if stop or (stop_after is not None and step - first >= stop_after):
                break
            # batch
            epoch, index = divmod(step, steps_per_epoch)
            if epoch not in orders:
                orders = {epoch: train_loader.batch_indices(epoch)}
            batch = train_loader.make_batch(orders[epoch][index])
            n = len(batch['tokens'])
            # step: forward, loss, backward, reduce, update (no device sync inside)
            lr = learning_rate(step, cfg.lr, total, cfg.warmup_steps, cfg.schedule)
            runner.set_learning_rate(lr)
            window.add(runner.train_step_async(batch, step), n)
            step += 1
            bar.update(1)
            if step == first + 1:
                runner.sync()  # warm-up: graph building / compilation is not timed
                meter.start()
            else:
                meter.add(n)
            end_of_epoch = step % steps_per_epoch == 0
            # log (+ evaluate): the only read-back of device values
            if step == total or (step % cfg.log_interval == 0 if pretraining else end_of_epoch):
                runner.sync()
                meter.stop()
                make_row = _pretrain_row if pretraining else _finetune_row
                row = make_row(window.read(runner), step, epoch, lr, meter.rate)
                if _not_finite(row):
                    _diverged(cfg, step, [f'{k} loss' for k in _not_finite(row)])
                if not pretraining and end_of_epoch:
                    correct, seen = placement.allreduce(runner.evaluate(eval_loader)) \
                        if distributed else runner.evaluate(eval_loader)
                    row['eval_acc'] = correct / max(seen, 1)
                run_log.write(row)
                window.clear()
                bar.set_postfix({k: f'{v:.3f}' for k, v in row.items()
                                 if k.startswith(('train_', 'eval_'))})
                stop = stop or (distributed and agree(signals))
                meter.start()
            # checkpoint
            if ((cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0)
                    or (not pretraining and end_of_epoch)):
                meter.stop()
                checkpoint(step)
                saved_at = step
                stop = stop or (distributed and agree(signals))
                meter.start()
        # the end, a signal or stop_after: save where the run stands
        bar.close()
        final = checkpoint(step) if saved_at != step else latest_checkpoint(cfg.out_dir)
    if stop:
        raise TrainingInterrupted(final, signals.received or signal.SIGINT)

    # report: a plot and a summary of the whole run
    history = run_log.history
    if not chief:
        plot = None
    elif pretraining:
        plot = plot_history(history, os.path.join(cfg.out_dir, 'loss.png'), 'step',
                            {'MLM loss': ['train_mlm'], 'NSP loss': ['train_nsp']},
                            title=f'BERT pretraining ({config.preset}, {runner.name})')
    else:
        plot = plot_history(history, os.path.join(cfg.out_dir, 'curves.png'), 'epoch',
                            {'loss': ['train_loss'], 'accuracy': ['train_acc', 'eval_acc']},
                            title=f'BERT fine-tuning ({config.preset or "BERT"}, {runner.name})')
    last = history[-1] if history else {}
    rate_key = 'pairs_per_sec' if pretraining else 'examples_per_sec'
    rate = meter.rate if meter.seconds else last.get(rate_key)
    summary = dict(framework=runner.name, checkpoint=final if chief else None, step=step,
                   plot=plot, rank=placement.rank, workers=placement.num_workers,
                   examples_per_sec=rate, devices=devices,
                   **{k: v for k, v in last.items() if k.startswith(('train_', 'eval_'))})
    if pretraining:
        summary.update(mlm=last.get('train_mlm'), nsp=last.get('train_nsp'),
                       mlm_avg=run_average(history, 'train_mlm'),
                       nsp_avg=run_average(history, 'train_nsp'), pairs_per_sec=rate,
                       vocab_size=len(vocab))
    else:
        summary.update(loss=last.get('train_loss'), train_acc=last.get('train_acc'),
                       eval_acc=last.get('eval_acc'))
    summary['history'] = history
    return summary


def _finite_array(a) -> bool:
    import numpy as np
    return bool(np.isfinite(a).all())


def _diverged(cfg, step, what):
    good = latest_checkpoint(cfg.out_dir)
    where = (f'the last finite checkpoint is {good}' if good else
             'no checkpoint was written before it')
    raise TrainingDiverged(f'training diverged at step {step}: {", ".join(what[:4])} '
                           f'not finite; stopped ({where}). Lower --lr or set --clip-norm.')

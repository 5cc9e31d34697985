"""Fine-tuning a pretrained BERT on SNLI (natural language inference), as the book does."""
from __future__ import annotations

import os

import mxnet as mx
import numpy as onp
from mxnet import init

from ..config import TrainConfig
from ..model import BERTClassifier, BERTModel
from .checkpoint import (CheckpointError, latest_checkpoint, load_config, read_state,
                         save_checkpoint)
from .common import Throughput, TrainingInterrupted, find_resume, seed_step, setup_devices
from .devices import describe
from .logs import RunLog, plot_history, progress_bar
from .schedule import learning_rate
from .step import FinetuneStep, make_trainer, split_batch

__all__ = ['finetune', 'load_bert', 'load_classifier', 'evaluate_accuracy',
           'load_finetuning_data']


# The new output layer starts as the book's: it calls net.output.initialize(), which is
# MXNet's default Uniform(0.07).
OUTPUT_INIT = init.Uniform(0.07)


def load_bert(source: str, contexts):
    """(BERTModel, vocab) from a pretraining run / checkpoint folder of ours, or anything
    `gluon_bert.load_pretrained` takes (bert.small, bert.base, a zip or folder)."""
    from ..data.vocab import Vocab
    ckpt = latest_checkpoint(source) if source and os.path.isdir(source) else None
    if ckpt is not None:
        state = read_state(ckpt)
        if state.get('task') != 'pretrain':
            raise CheckpointError(f'{ckpt} is a {state.get("task")} checkpoint; fine-tuning '
                                  'starts from a pretraining run')
        bert = BERTModel(load_config(ckpt))
        bert.load_parameters(os.path.join(ckpt, 'model.params'), ctx=contexts)
        return bert, Vocab.load(os.path.join(ckpt, 'vocab.json'))
    from ..pretrained import load_pretrained
    return load_pretrained(source, ctx=contexts)


def load_classifier(source: str, contexts):
    """(BERTClassifier, vocab, config) from a fine-tuning run or checkpoint folder."""
    from ..data.vocab import Vocab
    ckpt = latest_checkpoint(source)
    if ckpt is None:
        raise CheckpointError(f'no complete checkpoint in {source}')
    if read_state(ckpt).get('task') != 'finetune':
        raise CheckpointError(f'{ckpt} is not a fine-tuning checkpoint')
    config = load_config(ckpt)
    net = BERTClassifier(config)
    net.load_parameters(os.path.join(ckpt, 'model.params'), ctx=contexts)
    return net, Vocab.load(os.path.join(ckpt, 'vocab.json')), config


def load_finetuning_data(cfg: TrainConfig, vocab):
    """(train loader, eval loader) of SNLI pairs encoded as <cls> p <sep> h <sep>."""
    from ..data import BatchLoader, SNLIBERTDataset, read_snli, sample_dir
    data_dir = cfg.data_dir or sample_dir('snli')
    train = read_snli(data_dir, cfg.train_split)
    if cfg.holdout:
        # hold out a fixed, seeded subset of the training split as the evaluation set
        n = len(train[0])
        if cfg.holdout >= n:
            raise ValueError(f'--holdout {cfg.holdout} leaves nothing of {n} training pairs')
        order = onp.random.default_rng(cfg.seed).permutation(n)
        pick = lambda idx: tuple([col[i] for i in idx] for col in train)  # noqa: E731
        train, test = pick(order[cfg.holdout:]), pick(order[:cfg.holdout])
    else:
        test = read_snli(data_dir, cfg.eval_split)
    if cfg.train_limit:
        train = tuple(col[:cfg.train_limit] for col in train)
    train_set = SNLIBERTDataset(train, cfg.max_len, vocab)
    test_set = SNLIBERTDataset(test, cfg.max_len, vocab)
    common = dict(pad_to=cfg.pad_to, bucket=cfg.bucket, seed=cfg.seed)
    return (BatchLoader(train_set.arrays, cfg.batch_size, shuffle=True, **common),
            BatchLoader(test_set.arrays, cfg.batch_size, shuffle=False,
                        pad_to=cfg.pad_to, seed=cfg.seed))


def evaluate_accuracy(net, loader, contexts):
    """Share of correctly classified examples; one read-back at the end."""
    correct, total = [], 0
    loader.set_epoch(0)
    for batch in loader:
        for tokens, segments, valid_lens, labels in split_batch(
                batch, ('tokens', 'segments', 'valid_lens', 'labels'), contexts):
            pred = net(tokens, segments, valid_lens).argmax(axis=-1)
            correct.append((pred == labels.astype('float32')).sum().as_in_context(contexts[0]))
        total += len(batch['labels'])
    return float(mx.nd.add_n(*correct).asscalar()) / max(total, 1)


def finetune(cfg: TrainConfig, resume: bool = False, progress: bool | None = None,
             stop_after: int | None = None):
    """Fine-tune `cfg.init` on SNLI; returns a summary dict (and the run's checkpoints)."""
    # setup: devices, pretrained BERT, data, classifier, trainer
    contexts, kvstore = setup_devices(cfg)
    ckpt = find_resume(cfg, resume)
    if ckpt is None and not cfg.init:
        raise ValueError('fine-tuning needs --init: a pretraining run folder, bert.small, '
                         'bert.base, or a zip/folder in the book\'s layout')
    if ckpt is not None:
        net, vocab, config = load_classifier(ckpt, contexts)
        bert = None
    else:
        bert, vocab = load_bert(cfg.init, contexts)
        config = bert.config
        net = BERTClassifier(bert)
        mx.random.seed(cfg.seed, ctx='all')  # the new output layer's weights follow the seed
        net.output.initialize(OUTPUT_INIT, ctx=contexts)
    train_loader, test_loader = load_finetuning_data(cfg, vocab)
    if cfg.max_len > config.max_len:
        raise ValueError(f'max_len {cfg.max_len} exceeds the model\'s {config.max_len}')
    net.hybridize(static_alloc=True, static_shape=True)
    # Only the classifier's parameters (encoder, hidden, output): the pretraining heads are
    # not in the trainer at all, so no update, optimizer state or weight decay reaches them.
    trainer = make_trainer(net.collect_params(), cfg.lr, kvstore)
    step_fn = FinetuneStep(net, trainer, contexts, cfg.clip_norm)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.num_epochs

    step, history = 0, []
    if ckpt is not None:
        trainer.load_states(os.path.join(ckpt, 'trainer.states'))
        state = read_state(ckpt)
        step, history = state['step'], state['history']
    log = RunLog(cfg.out_dir, history)
    log.log.info(f'fine-tuning {config.preset or "BERT"} on {describe(contexts, kvstore)}: '
                 f'{train_loader.num_examples} train / {test_loader.num_examples} eval pairs, '
                 f'{steps_per_epoch} batches/epoch')

    def checkpoint(at_step):
        return save_checkpoint(cfg.out_dir, at_step, net, config, vocab,
                               dict(task='finetune', train_config=cfg.to_dict(),
                                    history=log.history), trainer)

    bar = progress_bar(total_steps, step, 'finetune', progress)
    start = step
    meter = Throughput()
    try:
        while step < total_steps and (stop_after is None or step - start < stop_after):
            epoch, index = divmod(step, steps_per_epoch)
            sums, n_examples = None, 0
            for idx in train_loader.batch_indices(epoch)[index:]:
                # batch
                batch = train_loader.make_batch(idx)
                # step: forward, loss, backward, reduce, update (no device sync inside)
                trainer.set_learning_rate(learning_rate(step, cfg.lr, total_steps,
                                                        cfg.warmup_steps, cfg.schedule))
                seed_step(cfg.seed, step)
                loss_sum, correct = step_fn(batch)
                sums = (loss_sum, correct) if sums is None else (sums[0] + loss_sum,
                                                                 sums[1] + correct)
                step += 1
                bar.update(1)
                if step == start + 1:
                    mx.nd.waitall()  # warm-up: the first update builds the static graph
                    meter.start()
                else:
                    meter.add(len(batch['labels']))
                n_examples += len(batch['labels'])
                if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0:
                    checkpoint(step)
                if stop_after is not None and step - start >= stop_after:
                    break
            # log + evaluate: one read-back per epoch
            if sums is None:
                break
            loss, acc = (s.asscalar() / n_examples for s in sums)
            meter.stop()
            if step % steps_per_epoch == 0:  # a whole epoch: evaluate and checkpoint
                eval_acc = evaluate_accuracy(net, test_loader, contexts)
                log.write(dict(epoch=epoch + 1, step=step, train_loss=loss, train_acc=acc,
                               eval_acc=eval_acc, examples_per_sec=meter.rate))
                bar.set_postfix(loss=f'{loss:.3f}', acc=f'{eval_acc:.3f}')
                checkpoint(step)
            meter.start()
    except KeyboardInterrupt:
        mx.nd.waitall()
        bar.close()
        raise TrainingInterrupted(checkpoint(step)) from None
    bar.close()
    final = checkpoint(step)
    plot = plot_history(log.history, os.path.join(cfg.out_dir, 'curves.png'), 'epoch',
                        {'loss': ['train_loss'], 'accuracy': ['train_acc', 'eval_acc']},
                        title=f'BERT fine-tuning ({config.preset or "BERT"})')
    last = log.history[-1] if log.history else {}
    return dict(checkpoint=final, step=step, loss=last.get('train_loss'),
                train_acc=last.get('train_acc'), eval_acc=last.get('eval_acc'),
                examples_per_sec=meter.rate, plot=plot, bert=bert, net=net,
                devices=[str(c) for c in contexts])

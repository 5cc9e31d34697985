"""One training step per task: the unit that the loops run and a benchmark times.

A step takes a batch of numpy arrays (the data pipeline's dict), splits it across the
contexts, runs forward and backward on each shard, reduces the gradients through the
trainer's KVStore and updates. It never waits for the devices: the losses it returns are
arrays still being computed, which the caller reads back once per log interval.

Losses are normalised by the *global* batch (all shards together), so the summed gradient
does not depend on how many devices share the batch: training on cpu(0),cpu(1) gives the
same parameters as one device.
"""
from __future__ import annotations

import mxnet as mx
import numpy as onp
from mxnet import autograd, gluon

__all__ = ['split_batch', 'mlm_loss', 'nsp_loss', 'PretrainStep', 'FinetuneStep',
           'make_trainer']


def split_batch(batch: dict[str, onp.ndarray], keys, contexts, rank: int = 0,
                num_workers: int = 1, skip_empty: bool = False):
    """{key: (B, ...) numpy} -> one tuple of NDArrays per context of this worker.

    The global batch is cut into num_workers * len(contexts) contiguous, even parts; worker
    `rank` takes parts rank * len(contexts) ... and puts one on each of its contexts.
    `skip_empty` (evaluation) drops the parts of a batch too small for every device."""
    n = len(contexts)
    parts = n * num_workers
    B = len(batch[keys[0]])
    if B < parts and not skip_empty:
        raise ValueError(f'batch of {B} cannot be split across {parts} devices')
    bounds = onp.linspace(0, B, parts + 1).astype(int)
    shards = []
    for i, ctx in enumerate(contexts):
        lo, hi = bounds[rank * n + i], bounds[rank * n + i + 1]
        if hi == lo:
            continue
        shards.append(tuple(mx.nd.array(batch[k][lo:hi], ctx=ctx, dtype=batch[k].dtype)
                            for k in keys))
    return shards


def mlm_loss(mlm_Y_hat, mlm_labels, mlm_weights, total_weight):
    """The book's MLM loss: cross-entropy at predicted positions weighted by mlm_weights
    (0 for padding predictions), divided by the number of real predictions in the whole
    batch. mlm_Y_hat (B, P, V), labels and weights (B, P)."""
    logp = mx.nd.log_softmax(mlm_Y_hat, axis=-1)               # (B, P, V)
    ce = -mx.nd.pick(logp, mlm_labels, axis=-1)                 # (B, P)
    return (ce * mlm_weights).sum() / (total_weight + 1e-8)


def nsp_loss(nsp_Y_hat, nsp_labels, batch_size):
    """Mean cross-entropy of next-sentence prediction over the global batch."""
    ce = -mx.nd.pick(mx.nd.log_softmax(nsp_Y_hat, axis=-1), nsp_labels, axis=-1)  # (B,)
    return ce.sum() / batch_size


def make_trainer(params, lr, kvstore, optimizer='adam', weight_decay=0.0):
    """A Trainer that leaves reduction and update to the step (update_on_kvstore=False), so
    that gradient clipping can sit between them."""
    opt_args = {'learning_rate': lr}
    if weight_decay:
        opt_args['wd'] = weight_decay
    return gluon.Trainer(params, optimizer, opt_args, kvstore=kvstore or 'local',
                         update_on_kvstore=False if kvstore is not None else None)


class _Step:
    keys: tuple = ()

    def __init__(self, net, trainer, contexts, clip_norm=None, rank=0, num_workers=1):
        self.net = net
        self.trainer = trainer
        self.contexts = list(contexts)
        self.clip_norm = clip_norm
        self.rank, self.num_workers = rank, num_workers  # this worker's slice of each batch
        self.params = [p for p in trainer._params if p.grad_req != 'null']

    def _update(self, step_scale):
        # reduce: sum gradients across devices (KVStore), then clip the global norm
        self.trainer.allreduce_grads()
        if self.clip_norm:
            grads = [p.list_grad()[0] for p in self.params]
            # check_isfinite=False: no read-back, so no device synchronisation here.
            gluon.utils.clip_global_norm(grads, self.clip_norm, check_isfinite=False)
            if len(self.contexts) > 1:  # every device applies the same clipped update
                for p in self.params:
                    g = p.list_grad()
                    for other in g[1:]:
                        g[0].copyto(other)
        # update: parameters that got no gradient (unused heads) are skipped, not an error
        self.trainer.update(step_scale, ignore_stale_grad=True)


class PretrainStep(_Step):
    """MLM + NSP loss for BERTModel. Returns (mlm, nsp) loss arrays, not yet computed."""
    keys = ('tokens', 'segments', 'valid_lens', 'pred_positions', 'mlm_weights',
            'mlm_labels', 'nsp_labels')

    def __call__(self, batch):
        # batch: split the numpy batch across devices; global normalisers from the host copy
        total_weight = float(batch['mlm_weights'].sum())
        batch_size = len(batch['tokens'])
        shards = split_batch(batch, self.keys, self.contexts, self.rank, self.num_workers)
        mlm_ls, nsp_ls, totals = [], [], []
        # forward + loss + backward: one graph per device, all launched without waiting
        with autograd.record():
            for (tokens, segments, valid_lens, positions, weights, mlm_y, nsp_y) in shards:
                _, mlm_Y_hat, nsp_Y_hat = self.net(tokens, segments, valid_lens, positions)
                mlm_ls.append(mlm_loss(mlm_Y_hat, mlm_y, weights, total_weight))
                nsp_ls.append(nsp_loss(nsp_Y_hat, nsp_y, batch_size))
                totals.append(mlm_ls[-1] + nsp_ls[-1])
        autograd.backward(totals)
        # step: losses are already global means
        self._update(1)
        ctx0 = self.contexts[0]
        return (mx.nd.add_n(*[m.as_in_context(ctx0) for m in mlm_ls]),
                mx.nd.add_n(*[n.as_in_context(ctx0) for n in nsp_ls]))


class FinetuneStep(_Step):
    """Cross-entropy for BERTClassifier. Returns (loss sum, number correct) arrays."""
    keys = ('tokens', 'segments', 'valid_lens', 'labels')

    def __call__(self, batch):
        batch_size = len(batch['tokens'])
        shards = split_batch(batch, self.keys, self.contexts, self.rank, self.num_workers)
        losses, correct = [], []
        with autograd.record():
            for tokens, segments, valid_lens, labels in shards:
                logits = self.net(tokens, segments, valid_lens)
                ce = -mx.nd.pick(mx.nd.log_softmax(logits, axis=-1), labels, axis=-1)
                losses.append(ce.sum())
                correct.append((logits.argmax(axis=-1) == labels.astype('float32')).sum())
        autograd.backward(losses)
        # step: gradients of the summed loss, divided by the global batch size
        self._update(batch_size)
        ctx0 = self.contexts[0]
        return (mx.nd.add_n(*[l.as_in_context(ctx0) for l in losses]),
                mx.nd.add_n(*[c.as_in_context(ctx0) for c in correct]))

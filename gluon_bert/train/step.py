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

import warnings

import mxnet as mx
import numpy as onp
from mxnet import autograd, gluon

from .. import kernels
from ..data.packing import (FINETUNE_PACKED_KEYS, PACKED_KEYS, PackedSizes,
                            pack_finetune_batch, pack_pretrain_batch)
from ..model.layers import LegacyBoundary

__all__ = ['split_batch', 'host_shards', 'mlm_loss', 'nsp_loss', 'PretrainObjective',
           'PackedPretrainObjective', 'FinetuneObjective', 'PackedFinetuneObjective',
           'PackedLogits', 'PackedPretrainHeads', 'PackedForward', 'PretrainStep',
           'FinetuneStep', 'make_trainer']


def split_batch(batch: dict[str, onp.ndarray], keys, contexts, rank: int = 0,
                num_workers: int = 1, skip_empty: bool = False):
    """{key: (B, ...) numpy} -> one tuple of NDArrays per context of this worker.

    The global batch is cut into num_workers * len(contexts) contiguous, even parts; worker
    `rank` takes parts rank * len(contexts) ... and puts one on each of its contexts.
    `skip_empty` (evaluation) drops the parts of a batch too small for every device."""
    return [tuple(_as_nd(part[k], ctx) for k in keys)
            for part, ctx in host_shards(batch, keys, contexts, rank, num_workers, skip_empty)]


def host_shards(batch: dict[str, onp.ndarray], keys, contexts, rank: int = 0,
                num_workers: int = 1, skip_empty: bool = False):
    """`split_batch`'s parts as numpy views: a list of ({key: (b, ...)}, context)."""
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
        shards.append(({k: batch[k][lo:hi] for k in keys}, ctx))
    return shards


def _as_nd(array: onp.ndarray, ctx) -> mx.nd.NDArray:
    """A host array as an NDArray on `ctx`, without blocking the Python thread.

    `mx.nd.array` copies synchronously: it waits until an engine worker is free, i.e.
    for the previous step's running operator, so host work between steps stalls. On the
    CPU the array is shared instead (DLPack, zero copy; the NDArray keeps the numpy array
    alive, and batches are never written after they are built); elsewhere it is copied
    by the engine, asynchronously."""
    host = mx.nd.from_numpy(onp.ascontiguousarray(array), zero_copy=True)
    return host if ctx == host.context else host.copyto(ctx)


def _token_ce(F, logits, labels):
    """Cross-entropy of softmax(logits) at each label: (..., V), (...) -> (...).

    On the CPU gluon-bert's fused `gb_softmax_ce` (`gluon_bert.kernels`): it reads the
    logits once forward and once backward, where log_softmax, pick and their backwards
    pass over them five times (the MLM head's are 415 MB at the book's batch)."""
    if kernels.use_here(logits):
        return F.gb_softmax_ce(kernels.float32(F, logits), labels)[0]
    return -F.pick(F.log_softmax(logits, axis=-1), labels, axis=-1)


def _mlm_ce(F, mlm_Y_hat, mlm_labels, mlm_weights):
    """Summed cross-entropy at the predicted positions, weighted by mlm_weights (0 for
    padding predictions). mlm_Y_hat (B, P, V), labels and weights (B, P) -> (1,)."""
    ce = _token_ce(F, mlm_Y_hat, mlm_labels)                    # (B, P)
    return F.sum(ce * mlm_weights, axis=None, keepdims=False)


def _ce(F, logits, labels):
    """Summed cross-entropy of a classifier. logits (B, C), labels (B,) -> (1,)."""
    return F.sum(_token_ce(F, logits, labels))


def mlm_loss(mlm_Y_hat, mlm_labels, mlm_weights, total_weight):
    """The book's MLM loss: cross-entropy at predicted positions weighted by mlm_weights,
    divided by the number of real predictions in the whole batch (imperative form; the
    steps compute the same inside their static graph, `PretrainObjective`)."""
    return _mlm_ce(mx.nd, mlm_Y_hat, mlm_labels, mlm_weights) / (total_weight + 1e-8)


def nsp_loss(nsp_Y_hat, nsp_labels, batch_size):
    """Mean cross-entropy of next-sentence prediction over the global batch."""
    return _ce(mx.nd, nsp_Y_hat, nsp_labels) / batch_size


class PretrainObjective(LegacyBoundary, gluon.HybridBlock):
    """BERTModel and the book's MLM + NSP losses as one graph.

    Inside the hybridized graph the losses' large temporaries (log_softmax over the
    vocabulary: 415 MB at the book's batch of 512) live in the static memory plan, instead
    of being allocated (and faulted in) by imperative operators at every step.
    `norms` (2,) holds 1 / (real predictions in the global batch) and 1 / (global batch
    size), so that the losses are global means whatever the shard. A `LegacyBoundary`, like
    the model: as the graph's top block it notes the device (gluon-bert's CPU kernels or
    MXNet's operators, `gluon_bert.kernels`)."""

    def __init__(self, net, **kwargs):
        super().__init__(**kwargs)
        self.net = net

    def hybrid_forward(self, F, tokens, segments, valid_lens, positions, weights, mlm_labels,
                       nsp_labels, norms):
        _, mlm_Y_hat, nsp_Y_hat = self.net(tokens, segments, valid_lens, positions)
        mlm = _mlm_ce(F, mlm_Y_hat, mlm_labels, weights) * F.slice_axis(norms, 0, 0, 1)
        nsp = _ce(F, nsp_Y_hat, nsp_labels) * F.slice_axis(norms, 0, 1, 2)
        return mlm, nsp                                          # (1,), (1,)


class _PackedGraph(LegacyBoundary, gluon.HybridBlock):
    """A graph around `net` whose inputs are packed shards (`gluon_bert.data.packing`)."""

    def __init__(self, net, **kwargs):
        super().__init__(**kwargs)
        self.net = net

    def __call__(self, *args):
        with warnings.catch_warnings():
            # With gluon-bert's CPU kernels (gb_attention) unpack and pack go unused.
            warnings.filterwarnings('ignore', message='.*not used by any computation')
            return super().__call__(*args)


class PackedPretrainObjective(_PackedGraph):
    """`PretrainObjective` on a packed batch (`gluon_bert.data.packing`): the same losses
    and gradients, with the encoder's per-token layers run on the real tokens only and the
    MLM head on the real predictions only (`BERTModel.pretrain_packed`). At the book's shape
    on real WikiText-2, 28% of the positions and 30% of the prediction slots are padding."""

    def hybrid_forward(self, F, tokens, segments, positions, valid_lens, unpack, pack,
                       cls_rows, mlm_rows, weights, mlm_labels, nsp_labels, norms):
        mlm_Y_hat, nsp_Y_hat = self.net.pretrain_packed(
            F, tokens, segments, positions, valid_lens, unpack, pack, cls_rows, mlm_rows)
        mlm = _mlm_ce(F, mlm_Y_hat, mlm_labels, weights) * F.slice_axis(norms, 0, 0, 1)
        nsp = _ce(F, nsp_Y_hat, nsp_labels) * F.slice_axis(norms, 0, 1, 2)
        return mlm, nsp                                          # (1,), (1,)


def _loss_and_hits(F, logits, labels):
    """The summed cross-entropy of logits (B, C) and the number of correct predictions."""
    hits = F.broadcast_equal(F.argmax(logits, axis=-1), F.cast(labels, 'float32'))
    return _ce(F, logits, labels), F.BlockGrad(F.sum(hits))                   # (1,), (1,)


class FinetuneObjective(LegacyBoundary, gluon.HybridBlock):
    """BERTClassifier, its summed cross-entropy and its number of correct predictions as
    one graph (see `PretrainObjective`)."""

    def __init__(self, net, **kwargs):
        super().__init__(**kwargs)
        self.net = net

    def hybrid_forward(self, F, tokens, segments, valid_lens, labels):
        logits = self.net(tokens, segments, valid_lens)                       # (B, C)
        return _loss_and_hits(F, logits, labels)


class PackedLogits(_PackedGraph):
    """BERTClassifier's logits (B, C) on a packed shard (`data.packing.pack_finetune_batch`,
    its keys but the labels): evaluation without the arithmetic on padding."""

    def hybrid_forward(self, F, tokens, segments, positions, valid_lens, unpack, pack,
                       cls_rows):
        return self.net.classify_packed(F, tokens, segments, positions, valid_lens, unpack,
                                        pack, cls_rows)                       # (B, C)


class PackedPretrainHeads(_PackedGraph):
    """BERTModel's heads on a packed shard (`data.packing.pack_pretrain_batch`, its keys up
    to ``mlm_rows``): mlm_Y_hat (K', V) at the real predictions and nsp_Y_hat (B, 2), the
    rows the padded forward gives for them, without its arithmetic on padding (inference)."""

    def hybrid_forward(self, F, tokens, segments, positions, valid_lens, unpack, pack,
                       cls_rows, mlm_rows):
        return self.net.pretrain_packed(F, tokens, segments, positions, valid_lens, unpack,
                                        pack, cls_rows, mlm_rows)   # (K', V), (B, 2)


class PackedForward:
    """Inference on packed shards for this package's `BERTModel` or `BERTClassifier`: one
    graph (hybridized as the net is) and grow-only sizes, kept from call to call so that
    the graph is planned once for a run's batches.

    `forward(part, ctx)` packs one shard (a padded batch dict: tokens, segments, valid_lens,
    and for BERTModel pred_positions and mlm_weights; labels are not needed) and returns
    the graph's outputs on `ctx`, not waited for: the classifier's logits (B, C), or
    (mlm_Y_hat (K', V), nsp_Y_hat (B, 2)), whose first K rows are the predictions with a
    nonzero weight in (example, slot) order and the rest padding."""

    def __init__(self, net):
        from ..model import BERTModel
        self.pretrain = isinstance(net, BERTModel)
        self.graph = _objective(PackedPretrainHeads if self.pretrain else PackedLogits, net)
        last = 'mlm_rows' if self.pretrain else 'cls_rows'
        keys = PACKED_KEYS if self.pretrain else FINETUNE_PACKED_KEYS
        self.keys = keys[:keys.index(last) + 1]
        self.sizes = PackedSizes()

    def reserve(self, parts):
        """Grow the sizes for these shards (a dict or a list of them, which share one size);
        (num_tokens, num_rows)."""
        return self.sizes.update(parts)

    def __call__(self, part, ctx, sizes=None):
        num_tokens, num_rows = sizes or self.sizes.update(part)
        shard = (pack_pretrain_batch(part, num_tokens, num_rows) if self.pretrain
                 else pack_finetune_batch(part, num_tokens))
        return self.graph(*(_as_nd(shard[k], ctx) for k in self.keys))


class PackedFinetuneObjective(_PackedGraph):
    """`FinetuneObjective` on a packed batch (`data.packing.pack_finetune_batch`): the same
    loss and gradients with the encoder on the real tokens only. SNLI pairs padded to the
    book's max_len of 128 are about 80% padding."""

    def hybrid_forward(self, F, tokens, segments, positions, valid_lens, unpack, pack,
                       cls_rows, labels):
        logits = self.net.classify_packed(F, tokens, segments, positions, valid_lens, unpack,
                                          pack, cls_rows)                     # (B, C)
        return _loss_and_hits(F, logits, labels)


def _objective(cls, net):
    """The objective around `net`, hybridized as `net` is (static memory when it is)."""
    objective = cls(net)
    if getattr(net, '_active', False):
        flags = dict(net._flags)
        objective.hybridize(static_alloc=bool(flags.get('static_alloc', True)),
                            static_shape=bool(flags.get('static_shape', True)))
    return objective


def make_trainer(params, lr, kvstore, optimizer='adam', weight_decay=0.0):
    """A Trainer that leaves reduction and update to the step (update_on_kvstore=False), so
    that gradient clipping can sit between them. 'adam' is `train.optimizer.Adam`: MXNet's
    Adam with gluon-bert's faster CPU update, the same bits."""
    opt_args = {'learning_rate': lr}
    if weight_decay:
        opt_args['wd'] = weight_decay
    if optimizer == 'adam':
        from .optimizer import Adam
        optimizer, opt_args = Adam(**opt_args), None
    return gluon.Trainer(params, optimizer, opt_args, kvstore=kvstore or 'local',
                         update_on_kvstore=False if kvstore is not None else None)


class _Step:
    keys: tuple = ()         # the padded batch's fields that the objective reads
    packed_keys: tuple = ()  # the packed objective's input order
    objectives: tuple = ()   # (the padded objective, the packed one)

    def __init__(self, net, trainer, contexts, clip_norm=None, rank=0, num_workers=1,
                 loss_scale=None, packed=True):
        self.net = net
        self.packed = packed
        self.objective = _objective(self.objectives[bool(packed)], net)
        self.sizes = PackedSizes()  # packed shapes: grow-only, so the graph keeps one
        self.loss_scale = loss_scale  # float16: a `precision.LossScale`, else None
        self.trainer = trainer
        self.contexts = list(contexts)
        self.clip_norm = clip_norm
        self.rank, self.num_workers = rank, num_workers  # this worker's slice of each batch
        self.params = [p for p in trainer._params if p.grad_req != 'null']

    def reserve(self, batch):
        """Grow the packed sizes for `batch` without running it (the loop passes the epoch's
        batches before the first step, so that the graph is planned once)."""
        # one size for the shards of every worker (each holds the global batch): workers
        # keep equal shapes, and any of them can save the sizes for all (runner.step_state)
        every = [part for r in range(self.num_workers) for part, _ in
                 host_shards(batch, self.keys, self.contexts, r, self.num_workers)]
        return self.sizes.update(every)

    def _shards(self, batch):
        """One tuple of NDArrays per device: the objective's inputs."""
        if not self.packed:
            return split_batch(batch, self.keys, self.contexts, self.rank, self.num_workers)
        parts = host_shards(batch, self.keys, self.contexts, self.rank, self.num_workers)
        num_tokens, num_rows = self.reserve(batch)
        return [tuple(_as_nd(a[k], ctx) for k in self.packed_keys)
                for a, ctx in ((self._pack(part, num_tokens, num_rows), ctx)
                               for part, ctx in parts)]

    def _backward(self, heads):
        # float16: gradients of the loss times the loss scale (undone in _update)
        if self.loss_scale is None:
            autograd.backward(heads)
        else:
            scale = self.loss_scale.scale
            autograd.backward(heads, head_grads=[mx.nd.full(h.shape, scale, ctx=h.context)
                                                 for h in heads])

    def _update(self, step_scale):
        # reduce: sum gradients across devices (KVStore), then clip the global norm
        self.trainer.allreduce_grads()
        loss_scale = 1.0
        if self.loss_scale is not None:
            loss_scale = self.loss_scale.scale
            if self.loss_scale.overflowed([p.list_grad()[0] for p in self.params]):
                return  # float16 overflow: skip this update (the scale was halved)
        if self.clip_norm:
            grads = [p.list_grad()[0] for p in self.params]
            # check_isfinite=False: no read-back, so no device synchronisation here.
            gluon.utils.clip_global_norm(grads, self.clip_norm * loss_scale,
                                         check_isfinite=False)
            if len(self.contexts) > 1:  # every device applies the same clipped update
                for p in self.params:
                    g = p.list_grad()
                    for other in g[1:]:
                        g[0].copyto(other)
        # update: parameters that got no gradient (unused heads) are skipped, not an error
        self.trainer.update(step_scale * loss_scale, ignore_stale_grad=True)


class PretrainStep(_Step):
    """MLM + NSP loss for BERTModel. Returns (mlm, nsp) loss arrays, not yet computed.

    `packed=True` (the default) runs each shard packed (`data.packing`): the same losses
    and gradients without the arithmetic on padding; `packed=False` runs the padded batch
    through `BERTModel` as the book does."""
    keys = ('tokens', 'segments', 'valid_lens', 'pred_positions', 'mlm_weights',
            'mlm_labels', 'nsp_labels')

    packed_keys = PACKED_KEYS
    objectives = (PretrainObjective, PackedPretrainObjective)

    def _pack(self, part, num_tokens, num_rows):
        return pack_pretrain_batch(part, num_tokens, num_rows)

    def __call__(self, batch):
        # batch: global normalisers from the host copy, then one shard per device
        norms = onp.array([1.0 / (float(batch['mlm_weights'].sum()) + 1e-8),
                           1.0 / len(batch['tokens'])], dtype='float32')
        shards = self._shards(batch)
        mlm_ls, nsp_ls = [], []
        # forward + loss, then backward: one graph per device, launched without waiting
        with autograd.record():
            for shard, ctx in zip(shards, self.contexts):
                mlm, nsp = self.objective(*shard, _as_nd(norms, ctx))
                mlm_ls.append(mlm)
                nsp_ls.append(nsp)
        self._backward(mlm_ls + nsp_ls)
        # step: losses are already global means
        self._update(1)
        ctx0 = self.contexts[0]
        return (mx.nd.add_n(*[m.as_in_context(ctx0) for m in mlm_ls]),
                mx.nd.add_n(*[n.as_in_context(ctx0) for n in nsp_ls]))


class FinetuneStep(_Step):
    """Cross-entropy for BERTClassifier. Returns (loss sum, number correct) arrays.

    `packed=True` (the default) runs each shard packed (`data.packing`): the same loss and
    gradients without the arithmetic on padding; `packed=False` runs the padded batch."""
    keys = ('tokens', 'segments', 'valid_lens', 'labels')
    packed_keys = FINETUNE_PACKED_KEYS
    objectives = (FinetuneObjective, PackedFinetuneObjective)

    def _pack(self, part, num_tokens, num_rows):
        return pack_finetune_batch(part, num_tokens)

    def __call__(self, batch):
        batch_size = len(batch['tokens'])
        shards = self._shards(batch)
        losses, correct = [], []
        with autograd.record():
            for shard in shards:
                loss, hits = self.objective(*shard)
                losses.append(loss)
                correct.append(hits)
        self._backward(losses)
        # step: gradients of the summed loss, divided by the global batch size
        self._update(batch_size)
        ctx0 = self.contexts[0]
        return (mx.nd.add_n(*[l.as_in_context(ctx0) for l in losses]),
                mx.nd.add_n(*[c.as_in_context(ctx0) for c in correct]))

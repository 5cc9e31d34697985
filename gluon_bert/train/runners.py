"""The runners: one training interface over this package's MXNet model and the PyTorch and
JAX ports, so that one loop (`train.loop`) trains, checkpoints and resumes all three.

A runner owns a model, its parameters and its optimizer state in one framework. Everything
crossing the interface is numpy: batches are the data pipeline's dicts, parameters and
optimizer state use the MXNet parameter names (so checkpoints are shared by all frameworks
and never depend on the order of parameters or on Gluon's generated prefixes).

    runner = make_runner('torch', config, params, task='pretrain', lr=0.01, seed=0)
    runner.set_learning_rate(lr)                  # schedules call this before every step
    pending = runner.train_step_async(batch, step)   # metrics still on the device
    rows = runner.read_metrics([pending, ...])    # one read-back -> [{'loss': float, ...}]
    runner.sync()                                 # wait for the device (timers)
    params = runner.params()                      # {MXNet name: numpy array}
    state = runner.optimizer_state()              # {'m/<name>', 'v/<name>', 't/<name>'}
    runner.load_optimizer_state(state)            # exact resume

Metrics. pretrain: 'loss' (= mlm + nsp), 'mlm', 'nsp'; finetune: 'loss' (batch mean) and
'acc' (share of the batch classified correctly).

Batches. pretrain: 'tokens' (B, L) int32, 'segments' (B, L) int32, 'valid_lens' (B,)
float32, 'pred_positions' (B, P) int32, 'mlm_weights' (B, P) float32, 'mlm_labels' (B, P)
int32, 'nsp_labels' (B,) int32. finetune: 'tokens', 'segments', 'valid_lens', 'labels' (B,).

Training is the book's: its losses, and Adam with beta1 0.9, beta2 0.999, eps 1e-8 and no
weight decay, computed as MXNet 1.9.1 does (`MXNetAdam`, `mxnet_adam_update`). Dropout
follows the config: on in training steps, off in `predict` and `gradients`; its masks are a
pure function of (seed, step), so a resumed run draws the ones the uninterrupted run drew.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import numpy as np

from ..config import BERTConfig
from ..errors import CheckpointError, ConfigError
from ..ports import convert

__all__ = ['MXNetRunner', 'TorchRunner', 'JaxRunner', 'RUNNERS', 'make_runner',
           'metrics_to_floats', 'step_seed', 'PRETRAIN_KEYS', 'FINETUNE_KEYS']

PRETRAIN_KEYS = ('tokens', 'segments', 'valid_lens', 'pred_positions', 'mlm_weights',
                 'mlm_labels', 'nsp_labels')
FINETUNE_KEYS = ('tokens', 'segments', 'valid_lens', 'labels')


def step_seed(seed: int, step: int) -> int:
    """The dropout seed of update `step`: a pure function of (seed, step), for every
    framework (MXNet cannot save its generator's state, so every runner re-seeds)."""
    return (seed * 1_000_003 + step) % (2 ** 31)


def _check_task(task):
    if task not in convert.TASKS:
        raise ValueError(f"task must be 'pretrain' or 'finetune', got {task!r}")


def _check_batch(batch: Mapping[str, Any], task: str, train: bool):
    needed = PRETRAIN_KEYS if task == 'pretrain' else FINETUNE_KEYS
    if not train:
        needed = ('tokens', 'segments', 'valid_lens')
    missing = [k for k in needed if k not in batch]
    if missing:
        raise KeyError(f'{task} batch lacks {", ".join(missing)} (has {", ".join(sorted(batch))})')


def metrics_to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device scalars (MXNet, torch, JAX, numpy) -> Python floats (waits for the device)."""
    return {k: float(v.asscalar() if hasattr(v, 'asscalar') else v) for k, v in metrics.items()}


def _uniform_count(state: Mapping[str, Any], framework: str) -> int:
    """The one Adam step count of a port's optimizer state (every parameter is updated at
    every step there)."""
    counts = {int(v) for k, v in state.items() if k.startswith('t/')}
    if len(counts) > 1:
        raise CheckpointError(f'the optimizer state holds several step counts {sorted(counts)}; '
                              f'the {framework} runner updates every parameter at every step')
    return counts.pop() if counts else 0


def _split_state(state: Mapping[str, Any]):
    """{'m/<name>': ..., 'v/<name>': ...} -> ({name: m}, {name: v})."""
    m = {k[2:]: np.asarray(v) for k, v in state.items() if k.startswith('m/')}
    v = {k[2:]: np.asarray(a) for k, a in state.items() if k.startswith('v/')}
    if set(m) != set(v):
        raise CheckpointError('the optimizer state has first and second moments for '
                              'different parameters')
    return m, v


class _Runner:
    """What every runner shares: the step counter, the training-step wrapper, accuracy."""
    name = 'runner'
    task = 'pretrain'

    def train_step(self, batch: Mapping[str, np.ndarray], step: int | None = None):
        """One step, its metrics as floats (waits for the device)."""
        return metrics_to_floats(self.train_step_async(batch, step))

    def _next_step(self, step):
        """The update number of this step: the loop's, or the runner's own count."""
        step = self._steps if step is None else step
        self._steps = step + 1
        return step

    def read_metrics(self, pending: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
        """Metrics of many steps -> floats, in one read-back where the framework allows."""
        return [metrics_to_floats(m) for m in pending]

    def reserve(self, batches) -> None:
        """Before the first step: the batches to come (an iterable of batch dicts), so that a
        step whose shapes follow its batches (MXNet's packed pretraining) plans its graph
        for all of them at once instead of again whenever a larger one comes. Others ignore
        them (and do not read the iterable)."""

    def step_state(self) -> dict[str, Any]:
        """What the step itself carries from batch to batch beside the weights and the
        optimizer (JSON), saved with every checkpoint so that a resumed run repeats the
        uninterrupted one exactly: MXNet's packed sizes (`data.packing.PackedSizes`)."""
        return {}

    def load_step_state(self, state: Mapping[str, Any]) -> None:
        """Take back what `step_state` gave."""

    def evaluate(self, loader) -> tuple[float, int]:
        """(correctly classified, examples) over a loader (fine-tuning)."""
        correct = total = 0
        loader.set_epoch(0)
        for batch in loader:
            correct += int((self.predict(batch).argmax(-1) == batch['labels']).sum())
            total += len(batch['labels'])
        return float(correct), total


# -- MXNet -------------------------------------------------------------------------------------

class MXNetRunner(_Runner):
    """This package's hybridized model and step (`train.step`) behind the runner interface.

    `devices` and `kvstore` are `--devices` and `--kvstore`, or `placement` (a
    `train.devices.Placement`) says where this process trains: its devices, the KVStore that
    reduces gradients across them and across workers, and its slice of every batch.

    `packed=True` (the default) runs every step on the real tokens only (`data.packing`)
    and the classifier's last block at <cls> only; `packed=False` is the book's arithmetic,
    padded batches and every row, for comparisons at equal work (`first_only=True` keeps
    the classifier's <cls>-only last block with padded batches)."""
    name = 'mxnet'

    def __init__(self, config: BERTConfig, params, task='pretrain', lr=1e-3, seed=0,
                 devices=None, clip_norm=None, kvstore='device', placement=None,
                 hybridize=True, dtype='float32', packed=True, first_only=None):
        import mxnet as mx
        from ..model import BERTClassifier, BERTModel
        from .devices import place
        from .step import FinetuneStep, PretrainStep, make_trainer
        _check_task(task)
        self._mx = mx
        self.config, self.task, self.seed = config, task, seed
        self._steps = 0
        self.placement = placement or place(devices, kvstore)
        self.contexts = self.placement.contexts
        # precision: amp rewrites the operators of graphs built from here on
        from .precision import LossScale, check_dtype, use_mixed_precision
        check_dtype(dtype, self.contexts)
        use_mixed_precision(dtype)
        self.dtype = dtype
        # `packed=False`: the book's arithmetic, for comparisons at equal work (padded
        # batches; the classifier's last block on every position unless `first_only`)
        first_only = packed if first_only is None else first_only
        self.net = BERTModel(config) if task == 'pretrain' else \
            BERTClassifier(config, first_only=first_only)
        self.net.initialize(ctx=mx.cpu())
        _load_params(self.net, params, self.contexts)
        if hybridize:  # `hybridize=False` runs imperatively (benchmarks compare the two)
            self.net.hybridize(static_alloc=True, static_shape=True)
        if self.placement.kind == 'horovod':
            self.trainer = _horovod_trainer(self.net, lr)
        else:
            self.trainer = make_trainer(self.net.collect_params(), lr, self.placement.kvstore)
        if self.placement.kind in ('dist_sync', 'dist_device_sync'):
            # Join the KVStore now and wait until every worker holds rank 0's weights. Left
            # to the first step, the Trainer's asynchronous pull of the initial weights can
            # be answered after that step's gradients reached the same server key, and the
            # weights become a gradient sum (seen here: losses of 20 from the first epoch).
            self.trainer._init_kvstore()
            self.trainer._init_params()
            mx.nd.waitall()
        common = dict(loss_scale=LossScale() if dtype == 'float16' else None, packed=packed)
        step_cls = PretrainStep if task == 'pretrain' else FinetuneStep
        self.step = step_cls(self.net, self.trainer, self.contexts, clip_norm,
                             self.placement.rank, self.placement.num_workers, **common)
        # the trainer's parameter index -> the stable name (optimizer state is keyed by it)
        by_id = {id(p): n for n, p in self.net._collect_params_with_prefix().items()}
        self._names = {i: by_id[id(p)] for i, p in enumerate(self.trainer._params)}
        self._forward = None  # packed inference (`_packed_forward`), built on first use

    def set_learning_rate(self, lr: float) -> None:
        self.trainer.set_learning_rate(lr)

    def train_step_async(self, batch, step=None):
        from .common import seed_step
        seed_step(self.seed, self._next_step(step))
        a, b = self.step(batch)
        if self.task == 'pretrain':
            return {'loss': a + b, 'mlm': a, 'nsp': b}
        n = len(batch['labels'])
        return {'loss': a / n, 'acc': b / n}

    def read_metrics(self, pending):
        if not pending:
            return []
        keys = list(pending[0])
        flat = self._mx.nd.concat(*[m[k].reshape((1,)) for m in pending for k in keys], dim=0)
        values = flat.asnumpy().reshape(len(pending), len(keys))  # (steps, metrics)
        return [dict(zip(keys, map(float, row))) for row in values]

    def _packed_forward(self):
        """The runner's `step.PackedForward` (built on first use), or None where the runner
        runs the book's arithmetic (`packed=False`)."""
        if not getattr(self.step, 'packed', False):
            return None
        if self._forward is None:
            from .step import PackedForward
            self._forward = PackedForward(self.net)
        return self._forward

    def infer_async(self, batch):
        """The model's outputs for `batch` on the first device, not waited for (inference,
        dropout off). Packed where the runner is (`step.PackedForward`): the classifier's
        logits (B, C), or for BERTModel and a batch with pred_positions and mlm_weights
        (mlm_Y_hat (K', V) at the real predictions, nsp_Y_hat (B, 2)). Otherwise the padded
        forward: logits, or (encoded_X, mlm_Y_hat, nsp_Y_hat) as the book's model returns."""
        forward = self._packed_forward()
        if forward is not None and (self.task == 'finetune' or
                                    {'pred_positions', 'mlm_weights'} <= set(batch)):
            return forward(batch, self.contexts[0])
        return self._padded_forward(batch)

    def _padded_forward(self, batch):
        """The book's forward on the padded batch, first device: logits, or (encoded_X,
        mlm_Y_hat at every slot, padding too, or None without pred_positions, nsp_Y_hat)."""
        from .step import _as_nd
        keys = ['tokens', 'segments', 'valid_lens']
        if self.task == 'pretrain' and batch.get('pred_positions') is not None:
            keys.append('pred_positions')
        return self.net(*(_as_nd(batch[k], self.contexts[0]) for k in keys))

    def predict(self, batch):
        def host(a):  # float32 numpy whatever the compute dtype (numpy has no bfloat16)
            return a.astype('float32').asnumpy()
        if self.task == 'finetune':  # packed where the runner is: the same logits
            return host(self.infer_async(batch))
        # pretraining: every prediction slot, padding too, as the book's model gives them
        _, mlm, nsp = self._padded_forward(batch)
        return (None if mlm is None else host(mlm)), host(nsp)

    def evaluate(self, loader):
        from .finetune import count_correct  # this worker's devices, one read-back
        return count_correct(self.net, loader, self.contexts, self.placement.rank,
                             self.placement.num_workers, forward=self._packed_forward())

    def params(self):
        return {k: p.data(self.contexts[0]).asnumpy()
                for k, p in self.net._collect_params_with_prefix().items()}

    def reserve(self, batches):
        if getattr(self.step, 'packed', False):
            for batch in batches:
                self.step.reserve(batch)

    def step_state(self):
        # The packed shapes grow with the batches seen; summation orders in the dense layers
        # follow the shapes, so a resumed run must start from the same ones to repeat the
        # uninterrupted run bit for bit.
        sizes = getattr(self.step, 'sizes', None)
        if sizes is None or not getattr(self.step, 'packed', False):
            return {}
        return {'packed_sizes': [sizes.num_tokens, sizes.num_rows]}

    def load_step_state(self, state):
        sizes = getattr(self.step, 'sizes', None)
        if sizes is not None and 'packed_sizes' in state:
            sizes.num_tokens, sizes.num_rows = (int(n) for n in state['packed_sizes'])

    def optimizer_state(self):
        updater = self.trainer._updaters[0]
        counts = self.trainer._optimizer._all_index_update_counts.get(
            self.contexts[0].device_id, {})
        state = {}
        for i, name in self._names.items():
            if i in updater.states:  # parameters that never got a gradient have none
                mean, var = updater.states[i]
                state[f'm/{name}'] = mean.asnumpy()
                state[f'v/{name}'] = var.asnumpy()
                state[f't/{name}'] = np.int64(counts.get(i, 0))
        return state

    def load_optimizer_state(self, state):
        mx = self._mx
        m, v = _split_state(state)
        known = set(self._names.values())
        unknown = sorted(set(m) - known)
        if unknown:
            raise CheckpointError(f'optimizer state for parameters the model does not have: '
                                  f'{unknown[:5]}')
        optimizer = self.trainer._optimizer
        for ctx, updater in zip(self.contexts, self.trainer._updaters):
            counts = optimizer._all_index_update_counts.setdefault(ctx.device_id, {})
            for i, name in self._names.items():
                if name not in m:
                    continue
                param = self.trainer._params[i]
                if m[name].shape != param.shape or v[name].shape != param.shape:
                    raise CheckpointError(f'optimizer state of {name} has shape '
                                          f'{m[name].shape}, the parameter {param.shape}')
                updater.states[i] = (mx.nd.array(m[name], ctx=ctx, dtype=param.dtype),
                                     mx.nd.array(v[name], ctx=ctx, dtype=param.dtype))
                updater.states_synced[i] = True
                counts[i] = int(state[f't/{name}'])
        optimizer.num_update = max([int(state[f't/{n}']) for n in m] + [optimizer.num_update])

    def sync(self):
        self._mx.nd.waitall()


def _horovod_trainer(net, lr):
    """Horovod's allreduce in place of the KVStore: every rank starts from rank 0's weights.
    Horovod averages gradients over ranks (it divides the Trainer's scale by their number);
    this package's losses are already normalised by the global batch, so the scale is put
    back and the reduced gradient is the sum, as with the KVStore."""
    import horovod.mxnet as hvd
    params = net.collect_params()
    hvd.broadcast_parameters(params, root_rank=0)
    trainer = hvd.DistributedTrainer(params, 'adam', {'learning_rate': lr})
    trainer._scale *= hvd.size()
    return trainer


def _load_params(net, params, contexts):
    import mxnet as mx
    from ..model import legacy_scope
    for name, p in net._collect_params_with_prefix().items():
        if name not in params:
            raise KeyError(f'no value for parameter {name}')
        p.set_data(mx.nd.array(params[name], dtype=p.dtype))
    with legacy_scope():
        net.collect_params().reset_ctx(contexts)


# -- PyTorch -----------------------------------------------------------------------------------

class TorchRunner(_Runner):
    """The PyTorch port behind the runner interface.

    `compile=True` wraps forward and loss in `torch.compile` (the first steps of every new
    batch shape then take seconds to compile). `dtype` 'bfloat16' or 'float16' runs forward
    and loss under `torch.autocast` (weights and Adam stay float32); float16 adds a
    `GradScaler`, whose overflow check reads one flag back per step.
    """
    name = 'torch'

    def __init__(self, config: BERTConfig, params: Mapping[str, np.ndarray], task='pretrain',
                 lr=1e-3, seed=0, device=None, compile=False, clip_norm=None,
                 dtype='float32'):
        import torch
        from ..ports import torch_bert
        _check_task(task)
        self.config, self.task, self.lr, self.seed = config, task, lr, seed
        self.clip_norm = clip_norm
        self._steps = 0
        self._torch, self._ports = torch, torch_bert
        if device is None:
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
        self.device = torch.device(device)
        bert = torch_bert.BERTModel(config)
        self.model = bert if task == 'pretrain' else torch_bert.BERTClassifier(bert)
        self.model.load_state_dict(convert.mxnet_to_torch(params, config, task))
        self.model.to(self.device)
        self.optimizer = torch_bert.MXNetAdam(self.model.parameters(), lr=lr)
        self._loss_fn = torch.compile(self._losses) if compile else self._losses
        if dtype not in ('float32', 'bfloat16', 'float16'):
            raise ConfigError(f'dtype must be float32, bfloat16 or float16, got {dtype!r}')
        self.dtype = dtype
        self._autocast = dict(device_type=self.device.type, enabled=dtype != 'float32',
                              dtype=getattr(torch, dtype))
        self._scaler = torch.amp.GradScaler(self.device.type) if dtype == 'float16' else None
        if compile:
            self.name = 'torch.compile'

    def _batch(self, batch):
        torch = self._torch
        out = {}
        for key in set(PRETRAIN_KEYS + FINETUNE_KEYS) & set(batch):  # other keys stay home
            tensor = torch.as_tensor(np.asarray(batch[key]))
            if key in ('tokens', 'segments', 'pred_positions'):
                tensor = tensor.long()  # index dtype of embeddings and gathers
            out[key] = tensor.to(self.device, non_blocking=True)
        return out

    def _losses(self, b):
        """Forward and the book's loss -> (loss, metrics)."""
        if self.task == 'pretrain':
            _, mlm_Y_hat, nsp_Y_hat = self.model(b['tokens'], b['segments'], b['valid_lens'],
                                                 b['pred_positions'])
            loss, mlm, nsp = self._ports.pretrain_loss(mlm_Y_hat, nsp_Y_hat, b['mlm_labels'],
                                                       b['mlm_weights'], b['nsp_labels'])
            return loss, {'loss': loss, 'mlm': mlm, 'nsp': nsp}
        logits = self.model(b['tokens'], b['segments'], b['valid_lens'])
        loss = self._ports.finetune_loss(logits, b['labels'])
        acc = (logits.argmax(-1) == b['labels'].long()).float().mean()
        return loss, {'loss': loss, 'acc': acc}

    def train_step_async(self, batch: Mapping[str, np.ndarray], step: int | None = None):
        """One step (forward, loss, backward, Adam); metrics stay on the device."""
        _check_batch(batch, self.task, train=True)
        # dropout masks come from torch's global generator
        self._torch.manual_seed(step_seed(self.seed, self._next_step(step)))
        self.model.train()
        with self._torch.autocast(**self._autocast):
            loss, metrics = self._loss_fn(self._batch(batch))
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self._scaler
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # clip the true gradients
        if self.clip_norm:
            # no error check: no read-back of the norm, so no device sync
            self._torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm,
                                                 error_if_nonfinite=False)
        if scaler is None:
            self.optimizer.step()
        else:  # skipped when the scaled gradients overflowed; the scale adapts
            scaler.step(self.optimizer)
            scaler.update()
        return {k: v.detach() for k, v in metrics.items()}

    def read_metrics(self, pending):
        if not pending:
            return []
        keys = list(pending[0])
        values = self._torch.stack([m[k].float() for m in pending for k in keys])
        values = values.cpu().numpy().reshape(len(pending), len(keys))  # (steps, metrics)
        return [dict(zip(keys, map(float, row))) for row in values]

    def set_learning_rate(self, lr: float) -> None:
        self.lr = lr
        for group in self.optimizer.param_groups:
            group['lr'] = lr

    def gradients(self, batch: Mapping[str, np.ndarray]):
        """(metrics, {MXNet name: gradient}) of one batch, dropout off; nothing is updated."""
        _check_batch(batch, self.task, train=True)
        self.model.eval()
        self.model.zero_grad(set_to_none=True)
        loss, metrics = self._losses(self._batch(batch))
        loss.backward()
        grads = {name: p.grad for name, p in self.model.named_parameters()}
        self.model.zero_grad(set_to_none=True)
        return (metrics_to_floats({k: v.detach().cpu() for k, v in metrics.items()}),
                convert.torch_to_mxnet(grads, self.config, self.task))

    def predict(self, batch: Mapping[str, np.ndarray]):
        """finetune: logits (B, C); pretrain: (mlm_Y_hat (B, P, V) or None, nsp_Y_hat (B, 2))."""
        _check_batch(batch, self.task, train=False)
        self.model.eval()
        b = self._batch(batch)
        with self._torch.no_grad():
            if self.task == 'finetune':
                return self.model(b['tokens'], b['segments'], b['valid_lens']).cpu().numpy()
            _, mlm_Y_hat, nsp_Y_hat = self.model(b['tokens'], b['segments'], b['valid_lens'],
                                                 b.get('pred_positions'))
        return (None if mlm_Y_hat is None else mlm_Y_hat.cpu().numpy()), nsp_Y_hat.cpu().numpy()

    def params(self) -> dict[str, np.ndarray]:
        return convert.torch_to_mxnet(self.model.state_dict(), self.config, self.task)

    def optimizer_state(self):
        names = {id(p): n for n, p in self.model.named_parameters()}
        states = {names[id(p)]: s for p, s in self.optimizer.state.items() if s}
        if not states:
            return {}
        m = convert.torch_to_mxnet({n: s['m'] for n, s in states.items()}, self.config, self.task)
        v = convert.torch_to_mxnet({n: s['v'] for n, s in states.items()}, self.config, self.task)
        counts = {s['t'] for s in states.values()}
        if len(counts) != 1:
            raise CheckpointError(f'torch parameters were updated unequally: {sorted(counts)}')
        t = counts.pop()
        return {**{f'm/{n}': a for n, a in m.items()}, **{f'v/{n}': a for n, a in v.items()},
                **{f't/{n}': np.int64(t) for n in m}}

    def load_optimizer_state(self, state):
        m, v = _split_state(state)
        if not m:
            return
        t = _uniform_count(state, self.name)
        m_t = convert.mxnet_to_torch(m, self.config, self.task)
        v_t = convert.mxnet_to_torch(v, self.config, self.task)
        for name, p in self.model.named_parameters():
            self.optimizer.state[p] = {'t': t, 'm': m_t[name].to(self.device, p.dtype).clone(),
                                       'v': v_t[name].to(self.device, p.dtype).clone()}

    def sync(self) -> None:
        if self.device.type == 'cuda':
            self._torch.cuda.synchronize(self.device)


# -- JAX ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _jax_functions(config: BERTConfig, task: str):
    """The jitted step, gradient and prediction functions of one model, shared by every
    runner of that (config, task) so that XLA compiles them once per process."""
    import jax
    import jax.numpy as jnp
    from ..ports import jax_bert
    model = jax_bert.BERTModel(config) if task == 'pretrain' else jax_bert.BERTClassifier(config)

    def losses(params, b, rng):
        """Forward and the book's loss -> (loss, metrics)."""
        if task == 'pretrain':
            _, mlm_Y_hat, nsp_Y_hat = model.apply(params, b['tokens'], b['segments'],
                                                  b['valid_lens'], b['pred_positions'], rng)
            loss, mlm, nsp = jax_bert.pretrain_loss(mlm_Y_hat, nsp_Y_hat, b['mlm_labels'],
                                                    b['mlm_weights'], b['nsp_labels'])
            return loss, {'loss': loss, 'mlm': mlm, 'nsp': nsp}
        logits = model.apply(params, b['tokens'], b['segments'], b['valid_lens'], rng)
        loss = jax_bert.finetune_loss(logits, b['labels'])
        acc = jnp.mean((jnp.argmax(logits, -1) == b['labels']).astype(jnp.float32))
        return loss, {'loss': loss, 'acc': acc}

    grad = jax.value_and_grad(losses, has_aux=True)

    def step(params, opt_state, b, rng, lr_t, clip_norm):
        (_, metrics), grads = grad(params, b, rng)
        # clip_norm = inf turns clipping off without another compiled function
        grads = jax_bert.clip_global_norm(grads, clip_norm)
        params, opt_state = jax_bert.mxnet_adam_update(params, grads, opt_state, lr_t)
        return params, opt_state, metrics

    def predict(params, b):
        if task == 'finetune':
            return model.apply(params, b['tokens'], b['segments'], b['valid_lens'])
        _, mlm_Y_hat, nsp_Y_hat = model.apply(params, b['tokens'], b['segments'],
                                              b['valid_lens'], b.get('pred_positions'))
        return mlm_Y_hat, nsp_Y_hat

    return model, jax.jit(step), jax.jit(grad), jax.jit(predict)


class JaxRunner(_Runner):
    """The JAX port behind the runner interface; the whole step is one `jax.jit` function."""
    name = 'jax'

    def __init__(self, config: BERTConfig, params: Mapping[str, np.ndarray], task='pretrain',
                 lr=1e-3, seed=0, device=None, clip_norm=None):
        import jax
        from ..ports import jax_bert
        _check_task(task)
        self.config, self.task, self.lr, self.seed = config, task, lr, seed
        self.clip_norm = clip_norm
        self._steps = 0
        self._jax, self._ports = jax, jax_bert
        self.device = jax.devices()[0] if device is None else device
        self.model, self._step, self._grad, self._predict = _jax_functions(config, task)
        self._params = jax.device_put(convert.mxnet_to_jax(params, config, task), self.device)
        self._opt_state = jax_bert.mxnet_adam_init(self._params)
        self._key = jax.random.PRNGKey(seed)
        self._t = 0  # Adam's step count, on the host: MXNet computes lr_t in double there

    def _batch(self, batch, keys):
        return {k: self._jax.device_put(np.asarray(batch[k]), self.device)
                for k in keys if k in batch}

    def train_step_async(self, batch: Mapping[str, np.ndarray], step: int | None = None):
        """One step (forward, loss, backward, Adam); metrics stay on the device."""
        _check_batch(batch, self.task, train=True)
        keys = PRETRAIN_KEYS if self.task == 'pretrain' else FINETUNE_KEYS
        step_rng = self._jax.random.fold_in(self._key, self._next_step(step))
        self._t += 1
        lr_t = self._ports.mxnet_adam_lr(self.lr, self._t)
        self._params, self._opt_state, metrics = self._step(
            self._params, self._opt_state, self._batch(batch, keys),
            step_rng if self.config.dropout > 0 else None, np.float32(lr_t),
            np.float32(self.clip_norm or np.inf))
        return metrics

    def read_metrics(self, pending):
        return [metrics_to_floats(m) for m in self._jax.device_get(list(pending))]

    def set_learning_rate(self, lr: float) -> None:
        self.lr = lr

    def gradients(self, batch: Mapping[str, np.ndarray]):
        """(metrics, {MXNet name: gradient}) of one batch, dropout off; nothing is updated."""
        _check_batch(batch, self.task, train=True)
        keys = PRETRAIN_KEYS if self.task == 'pretrain' else FINETUNE_KEYS
        (_, metrics), grads = self._grad(self._params, self._batch(batch, keys), None)
        return metrics_to_floats(metrics), convert.jax_to_mxnet(grads, self.config, self.task)

    def predict(self, batch: Mapping[str, np.ndarray]):
        """finetune: logits (B, C); pretrain: (mlm_Y_hat (B, P, V) or None, nsp_Y_hat (B, 2))."""
        _check_batch(batch, self.task, train=False)
        out = self._predict(self._params, self._batch(
            batch, ('tokens', 'segments', 'valid_lens', 'pred_positions')))
        if self.task == 'finetune':
            return np.asarray(out)
        mlm_Y_hat, nsp_Y_hat = out
        return (None if mlm_Y_hat is None else np.asarray(mlm_Y_hat)), np.asarray(nsp_Y_hat)

    def params(self) -> dict[str, np.ndarray]:
        return convert.jax_to_mxnet(self._params, self.config, self.task)

    def optimizer_state(self):
        if self._t == 0:
            return {}
        m = convert.jax_to_mxnet(self._opt_state['m'], self.config, self.task)
        v = convert.jax_to_mxnet(self._opt_state['v'], self.config, self.task)
        return {**{f'm/{n}': a for n, a in m.items()}, **{f'v/{n}': a for n, a in v.items()},
                **{f't/{n}': np.int64(self._t) for n in m}}

    def load_optimizer_state(self, state):
        m, v = _split_state(state)
        if not m:
            return
        self._t = _uniform_count(state, self.name)
        self._opt_state = self._jax.device_put(
            {'m': convert.mxnet_to_jax(m, self.config, self.task),
             'v': convert.mxnet_to_jax(v, self.config, self.task)}, self.device)

    def sync(self) -> None:
        self._jax.block_until_ready((self._params, self._opt_state))


RUNNERS = {'mxnet': MXNetRunner, 'torch': TorchRunner, 'jax': JaxRunner}


def make_runner(framework: str, config: BERTConfig, params: Mapping[str, np.ndarray], **kwargs):
    """`make_runner('mxnet' | 'torch' | 'jax', config, params, task=..., lr=..., seed=...)`."""
    if framework not in RUNNERS:
        raise ConfigError(f'unknown framework {framework!r}; choose from {", ".join(RUNNERS)}')
    return RUNNERS[framework](config, params, **kwargs)

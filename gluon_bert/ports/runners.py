"""One training interface over the PyTorch and JAX ports, for the training loop and
`gluon-bert compare`.

A runner owns a model, its parameters and its optimizer state in one framework. Everything
crossing the interface is numpy: batches are the data pipeline's dicts, parameters use the
MXNet names (so checkpoints are shared by all frameworks), metrics are Python floats.

    runner = TorchRunner(config, params, task='pretrain', lr=0.01)
    metrics = runner.train_step(batch)   # {'loss': ..., 'mlm': ..., 'nsp': ...}
    runner.sync()                        # wait for the device, e.g. before reading a clock
    params = runner.params()             # {MXNet name: numpy array}

Batches. pretrain: 'tokens' (B, L) int32, 'segments' (B, L) int32, 'valid_lens' (B,)
float32, 'pred_positions' (B, P) int32, 'mlm_weights' (B, P) float32, 'mlm_labels' (B, P)
int32, 'nsp_labels' (B,) int32. finetune: 'tokens', 'segments', 'valid_lens', 'labels' (B,).

Training is the book's: its losses, and Adam with beta1 0.9, beta2 0.999, eps 1e-8 and no
weight decay, computed as MXNet 1.9.1 does (`MXNetAdam`, `mxnet_adam_update`). Dropout
follows the config: on in `train_step`, off in `predict` and `gradients`.

`train_step` returns floats and so waits for the step to finish; that is one small copy per
step, and a runner that has to keep the device busy can call `train_step_async` instead and
read the metrics later with `metrics_to_floats`.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np

from ..config import BERTConfig
from . import convert

__all__ = ['TorchRunner', 'JaxRunner', 'RUNNERS', 'make_runner', 'metrics_to_floats',
           'PRETRAIN_KEYS', 'FINETUNE_KEYS']

PRETRAIN_KEYS = ('tokens', 'segments', 'valid_lens', 'pred_positions', 'mlm_weights',
                 'mlm_labels', 'nsp_labels')
FINETUNE_KEYS = ('tokens', 'segments', 'valid_lens', 'labels')


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
    """Device scalars -> Python floats (this waits for the device)."""
    return {k: float(v) for k, v in metrics.items()}


class TorchRunner:
    """The PyTorch port behind the runner interface.

    `compile=True` wraps forward and loss in `torch.compile` (the first steps of every new
    batch shape then take seconds to compile).
    """
    name = 'torch'

    def __init__(self, config: BERTConfig, params: Mapping[str, np.ndarray], task='pretrain',
                 lr=1e-3, seed=0, device=None, compile=False, clip_norm=None):
        import torch
        from . import torch_bert
        _check_task(task)
        self.config, self.task, self.lr, self.seed = config, task, lr, seed
        self.clip_norm = clip_norm
        self._torch, self._ports = torch, torch_bert
        torch.manual_seed(seed)  # dropout masks come from torch's global generator
        if device is None:
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
        self.device = torch.device(device)
        bert = torch_bert.BERTModel(config)
        self.model = bert if task == 'pretrain' else torch_bert.BERTClassifier(bert)
        self.model.load_state_dict(convert.mxnet_to_torch(params, config, task))
        self.model.to(self.device)
        self.optimizer = torch_bert.MXNetAdam(self.model.parameters(), lr=lr)
        self._loss_fn = torch.compile(self._losses) if compile else self._losses
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
        """Forward and the book's loss -> (loss, {'loss', 'mlm', 'nsp'} or {'loss'})."""
        if self.task == 'pretrain':
            _, mlm_Y_hat, nsp_Y_hat = self.model(b['tokens'], b['segments'], b['valid_lens'],
                                                 b['pred_positions'])
            loss, mlm, nsp = self._ports.pretrain_loss(mlm_Y_hat, nsp_Y_hat, b['mlm_labels'],
                                                       b['mlm_weights'], b['nsp_labels'])
            return loss, {'loss': loss, 'mlm': mlm, 'nsp': nsp}
        logits = self.model(b['tokens'], b['segments'], b['valid_lens'])
        loss = self._ports.finetune_loss(logits, b['labels'])
        return loss, {'loss': loss}

    def train_step_async(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """One step (forward, loss, backward, Adam); metrics stay on the device."""
        _check_batch(batch, self.task, train=True)
        self.model.train()
        loss, metrics = self._loss_fn(self._batch(batch))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm:
            # no error check: no read-back of the norm, so no device sync
            self._torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm,
                                                 error_if_nonfinite=False)
        self.optimizer.step()
        return {k: v.detach() for k, v in metrics.items()}

    def set_learning_rate(self, lr: float) -> None:
        """The learning rate of the next steps (schedules call this before every step)."""
        self.lr = lr
        for group in self.optimizer.param_groups:
            group['lr'] = lr

    def train_step(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        return metrics_to_floats(self.train_step_async(batch))

    def gradients(self, batch: Mapping[str, np.ndarray]):
        """(metrics, {MXNet name: gradient}) of one batch, dropout off; nothing is updated."""
        _check_batch(batch, self.task, train=True)
        self.model.eval()
        self.model.zero_grad(set_to_none=True)
        loss, metrics = self._losses(self._batch(batch))
        loss.backward()
        grads = {name: p.grad for name, p in self.model.named_parameters()}
        self.model.zero_grad(set_to_none=True)
        return (metrics_to_floats({k: v.detach() for k, v in metrics.items()}),
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

    def sync(self) -> None:
        if self.device.type == 'cuda':
            self._torch.cuda.synchronize(self.device)


@functools.lru_cache(maxsize=None)
def _jax_functions(config: BERTConfig, task: str):
    """The jitted step, gradient and prediction functions of one model, shared by every
    runner of that (config, task) so that XLA compiles them once per process."""
    import jax
    from . import jax_bert
    model = jax_bert.BERTModel(config) if task == 'pretrain' else jax_bert.BERTClassifier(config)

    def losses(params, b, rng):
        """Forward and the book's loss -> (loss, {'loss', 'mlm', 'nsp'} or {'loss'})."""
        if task == 'pretrain':
            _, mlm_Y_hat, nsp_Y_hat = model.apply(params, b['tokens'], b['segments'],
                                                  b['valid_lens'], b['pred_positions'], rng)
            loss, mlm, nsp = jax_bert.pretrain_loss(mlm_Y_hat, nsp_Y_hat, b['mlm_labels'],
                                                    b['mlm_weights'], b['nsp_labels'])
            return loss, {'loss': loss, 'mlm': mlm, 'nsp': nsp}
        logits = model.apply(params, b['tokens'], b['segments'], b['valid_lens'], rng)
        loss = jax_bert.finetune_loss(logits, b['labels'])
        return loss, {'loss': loss}

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


class JaxRunner:
    """The JAX port behind the runner interface; the whole step is one `jax.jit` function."""
    name = 'jax'

    def __init__(self, config: BERTConfig, params: Mapping[str, np.ndarray], task='pretrain',
                 lr=1e-3, seed=0, device=None, clip_norm=None):
        import jax
        from . import jax_bert
        _check_task(task)
        self.config, self.task, self.lr, self.seed = config, task, lr, seed
        self.clip_norm = clip_norm
        self._jax, self._ports = jax, jax_bert
        self.device = jax.devices()[0] if device is None else device
        self.model, self._step, self._grad, self._predict = _jax_functions(config, task)
        self._params = jax.device_put(convert.mxnet_to_jax(params, config, task), self.device)
        self._opt_state = jax_bert.mxnet_adam_init(self._params)
        self._rng = jax.random.PRNGKey(seed)
        self._t = 0  # Adam's step count, on the host: MXNet computes lr_t in double there

    def _batch(self, batch, keys):
        return {k: self._jax.device_put(np.asarray(batch[k]), self.device)
                for k in keys if k in batch}

    def train_step_async(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """One step (forward, loss, backward, Adam); metrics stay on the device."""
        _check_batch(batch, self.task, train=True)
        keys = PRETRAIN_KEYS if self.task == 'pretrain' else FINETUNE_KEYS
        self._t += 1
        self._rng, step_rng = self._jax.random.split(self._rng)
        lr_t = self._ports.mxnet_adam_lr(self.lr, self._t)
        self._params, self._opt_state, metrics = self._step(
            self._params, self._opt_state, self._batch(batch, keys),
            step_rng if self.config.dropout > 0 else None, np.float32(lr_t),
            np.float32(self.clip_norm or np.inf))
        return metrics

    def set_learning_rate(self, lr: float) -> None:
        """The learning rate of the next steps (schedules call this before every step)."""
        self.lr = lr

    def train_step(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        return metrics_to_floats(self.train_step_async(batch))

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

    def sync(self) -> None:
        self._jax.block_until_ready((self._params, self._opt_state))


RUNNERS = {'torch': TorchRunner, 'jax': JaxRunner}


def make_runner(framework: str, config: BERTConfig, params: Mapping[str, np.ndarray], **kwargs):
    """`make_runner('torch' | 'jax', config, params, task=..., lr=..., seed=...)`."""
    if framework not in RUNNERS:
        raise ValueError(f'unknown framework {framework!r}; ports: {", ".join(RUNNERS)}')
    return RUNNERS[framework](config, params, **kwargs)

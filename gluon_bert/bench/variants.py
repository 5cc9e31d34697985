"""The variants' step and inference functions, built inside a worker process (`worker.py`).

Each builder returns a `Step`: `train()` runs one training step on the fixed batch (the
inputs are copied from numpy every step, as the data pipeline hands them over), `infer()`
one forward pass without gradients (outputs stay on the device), `sync()` waits for the
device. The book's variants read their losses back every step because the book does.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from typing import Callable

import numpy as np

__all__ = ['Skip', 'Step', 'build', 'import_d2l_torch', 'is_book_shape']

PRETRAIN_ORDER = ('tokens', 'segments', 'valid_lens', 'pred_positions', 'mlm_weights',
                  'mlm_labels', 'nsp_labels')
INPUTS = ('tokens', 'segments', 'valid_lens')


class Skip(Exception):
    """This variant cannot run this measurement here; the message says why."""


@dataclasses.dataclass
class Step:
    train: Callable[[], object]
    infer: Callable[[], object]
    sync: Callable[[], object]
    device: str
    notes: list = dataclasses.field(default_factory=list)
    close: Callable[[], object] = lambda: None


def is_book_shape(config) -> bool:
    """Whether the book's own classes build this model (they have no GELU, embedding
    LayerNorm or tied decoder)."""
    return (config.activation == 'relu' and not config.embedding_norm
            and not config.tie_mlm_decoder)


def _require_book_shape(config):
    if not is_book_shape(config):
        raise Skip("the book's d2l classes have the book's architecture only (ReLU, no "
                   'embedding LayerNorm, untied MLM decoder)')


def build(variant, config, params, batch, task, dtype='float32', devices=None,
          lr=1e-4) -> Step:
    if dtype != 'float32' and not variant.startswith('ours-'):
        raise Skip(f'--dtype {dtype} applies to this package (ours-*) only')
    builders = {'ours-hybrid': _ours, 'ours-imperative': _ours, 'ours-padded': _ours,
                'd2l-mxnet': _d2l_mxnet,
                'd2l-pytorch': _d2l_pytorch, 'gluonnlp': _gluonnlp, 'torch-eager': _torch,
                'torch-compile': _torch, 'jax-jit': _jax}
    if variant not in builders:
        raise Skip(f'{variant} has no step measurement (whole loop only)')
    return builders[variant](variant, config, params, batch, task, dtype, devices, lr)


# -- this package ------------------------------------------------------------------------

def runner_options(dtype='float32', hybridize=True):
    """MXNetRunner keyword arguments for these settings, or Skip where MXNetRunner has no
    such option yet (its signature says)."""
    from ..train.runners import MXNetRunner
    accepted = inspect.signature(MXNetRunner).parameters
    kwargs = {}
    if not hybridize:
        if 'hybridize' not in accepted:
            raise Skip('MXNetRunner has no hybridize option yet')
        kwargs['hybridize'] = False
    if dtype != 'float32':
        if 'dtype' not in accepted:
            raise Skip(f'MXNetRunner has no dtype option yet ({dtype} not measured)')
        kwargs['dtype'] = dtype
    return kwargs


def _ours(variant, config, params, batch, task, dtype, devices, lr):
    import mxnet as mx
    from ..train.runners import MXNetRunner
    options = runner_options(dtype, hybridize=variant != 'ours-imperative')
    if variant == 'ours-padded':
        options['packed'] = False
    runner = MXNetRunner(config, params, task=task, lr=lr, devices=devices, **options)
    counter = iter(range(10 ** 9))
    notes = []
    if len(runner.contexts) > 1:
        notes.append('inference runs on the first device only')

    def infer():
        # packed as the step is (the heads' outputs at the real predictions or <cls>);
        # ours-padded runs the book's padded forward
        return runner.infer_async(batch)  # not recorded: no gradients, dropout off

    return Step(lambda: runner.train_step_async(batch, next(counter)), infer, mx.nd.waitall,
                str(runner.contexts), notes)


# -- the book's MXNet code -----------------------------------------------------------------

def _d2l_mxnet(variant, config, params, batch, task, dtype, devices, lr):
    _require_book_shape(config)
    import mxnet as mx
    from mxnet import autograd, gluon, npx
    from d2l import mxnet as d2l
    from ..train.devices import parse_contexts
    npx.set_np()  # the book's mode, for the whole of this worker
    ctxs = parse_contexts(devices)
    net = book_mxnet_model(d2l, config, task)
    net.initialize(ctx=ctxs)
    small = {k: mx.np.array(v[:2], ctx=ctxs[0]) for k, v in batch.items()}
    if task == 'pretrain':  # a forward pass finishes Gluon's deferred initialization
        net(*[small[k] for k in PRETRAIN_ORDER[:4]])
    else:
        net([small[k] for k in INPUTS])
    load_book_mxnet_params(net, params)
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = gluon.Trainer(net.collect_params(), 'adam', {'learning_rate': lr})
    V = config.vocab_size

    def arrays(keys):
        return [mx.np.array(batch[k], ctx=ctxs[0]) for k in keys]

    def train():
        if task == 'pretrain':
            return book_mxnet_pretrain_step(d2l, net, loss, trainer, V, ctxs,
                                            arrays(PRETRAIN_ORDER))
        return book_mxnet_finetune_step(d2l, net, loss, trainer, ctxs, arrays(INPUTS),
                                        arrays(('labels',))[0])

    def infer():
        with autograd.predict_mode():
            if task == 'pretrain':
                return net(*arrays(PRETRAIN_ORDER[:4]))
            return net(arrays(INPUTS))

    return Step(train, infer, npx.waitall, str(ctxs), close=npx.reset_np)


def book_mxnet_model(d2l, config, task):
    """The book's pretraining BERTModel, or its fine-tuning classifier around one."""
    from mxnet.gluon import nn
    bert = d2l.BERTModel(config.vocab_size, config.num_hiddens, config.ffn_num_hiddens,
                         config.num_heads, config.num_blks, config.dropout, config.max_len)
    if task == 'pretrain':
        return bert

    class BERTClassifier(nn.Block):
        """The classifier of the book's "Fine-Tuning BERT for NLI": the pretrained encoder
        and its `hidden` (tanh) layer, then a new 3-way output layer on <cls>."""

        def __init__(self, bert, num_classes):
            super().__init__()
            self.encoder = bert.encoder
            self.hidden = bert.hidden
            self.output = nn.Dense(num_classes)

        def forward(self, inputs):
            tokens, segments, valid_lens = inputs
            encoded = self.encoder(tokens, segments, valid_lens)  # (B, L, H)
            return self.output(self.hidden(encoded[:, 0, :]))

    return BERTClassifier(bert, config.num_classes)


def load_book_mxnet_params(net, params):
    import mxnet as mx
    for name, p in net._collect_params_with_prefix().items():
        p.set_data(mx.np.array(params[name]))


def book_mxnet_pretrain_step(d2l, net, loss, trainer, vocab_size, ctxs, arrays):
    """The book's pretraining step: split_and_load, its batch loss, step(1), the losses
    read back (its Accumulator)."""
    from mxnet import autograd, gluon
    shards = [gluon.utils.split_and_load(a, ctxs, even_split=False) for a in arrays]
    with autograd.record():
        mlm_ls, nsp_ls, ls = d2l._get_batch_loss_bert(net, loss, vocab_size, *shards)
    for l in ls:
        l.backward()
    trainer.step(1)
    return [float(l) for l in mlm_ls + nsp_ls]


def book_mxnet_finetune_step(d2l, net, loss, trainer, ctxs, features, labels):
    """The book's fine-tuning step (`d2l.train_batch_ch13` with its multi-input split):
    it reads the batch's loss and accuracy back."""
    return d2l.train_batch_ch13(net, features, labels, loss, trainer, ctxs,
                                d2l.split_batch_multi_inputs)


# -- the book's PyTorch code ---------------------------------------------------------------

def import_d2l_torch(notes):
    """`from d2l import torch as d2l`. d2l 1.0.3's torch module imports torchvision at the
    top for its vision chapters; where torchvision is not installed, empty placeholder
    modules stand in for it in this process only (BERT uses none of it)."""
    import importlib
    try:
        importlib.import_module('torchvision')
    except ImportError:
        placeholder = types.ModuleType('torchvision')
        placeholder.transforms = types.ModuleType('torchvision.transforms')
        sys.modules.setdefault('torchvision', placeholder)
        sys.modules.setdefault('torchvision.transforms', placeholder.transforms)
        notes.append('torchvision is not installed: an empty placeholder module stood in for '
                     "d2l.torch's unused top-level import")
    from d2l import torch as d2l
    return d2l


def book_torch_model(d2l, config, task):
    from torch import nn
    bert = d2l.BERTModel(config.vocab_size, config.num_hiddens, config.ffn_num_hiddens,
                         config.num_heads, config.num_blks, config.dropout, config.max_len)
    if task == 'pretrain':
        return bert

    class BERTClassifier(nn.Module):
        """The book's PyTorch fine-tuning classifier (encoder, hidden, new output)."""

        def __init__(self, bert, num_classes):
            super().__init__()
            self.encoder = bert.encoder
            self.hidden = bert.hidden
            self.output = nn.LazyLinear(num_classes)

        def forward(self, inputs):
            tokens, segments, valid_lens = inputs
            encoded = self.encoder(tokens, segments, valid_lens)  # (B, L, H)
            return self.output(self.hidden(encoded[:, 0, :]))

    return BERTClassifier(bert, config.num_classes)


_LONG = ('tokens', 'segments', 'pred_positions', 'mlm_labels', 'nsp_labels', 'labels')


def torch_tensors(batch, keys, device):
    """The book's DataLoader dtypes: indices and labels int64, lengths and weights float32."""
    import torch
    return [torch.as_tensor(np.asarray(batch[k], np.int64 if k in _LONG else np.float32))
            .to(device) for k in keys]


def book_torch_pretrain_step(d2l, net, loss, trainer, vocab_size, tensors):
    trainer.zero_grad()
    mlm_l, nsp_l, l = d2l._get_batch_loss_bert(net, loss, vocab_size, *tensors)
    l.backward()
    trainer.step()
    return float(mlm_l), float(nsp_l)  # the book's Accumulator reads them every batch


def book_torch_finetune_step(d2l, net, loss, trainer, device, features, labels):
    l, acc = d2l.train_batch_ch13(net, features, labels, loss, trainer, [device])
    return float(l), float(acc)


def _d2l_pytorch(variant, config, params, batch, task, dtype, devices, lr):
    _require_book_shape(config)
    import torch
    from ..ports.convert import to_d2l_torch
    notes = []
    d2l = import_d2l_torch(notes)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    net = book_torch_model(d2l, config, task)
    net.load_state_dict(to_d2l_torch(params, config, task))
    net.to(device)
    trainer = torch.optim.Adam(net.parameters(), lr=lr)
    V = config.vocab_size
    if task == 'pretrain':
        loss = torch.nn.CrossEntropyLoss()
    else:
        loss = torch.nn.CrossEntropyLoss(reduction='none')

    def train():
        net.train()
        if task == 'pretrain':
            return book_torch_pretrain_step(d2l, net, loss, trainer, V,
                                            torch_tensors(batch, PRETRAIN_ORDER, device))
        (labels,) = torch_tensors(batch, ('labels',), device)
        return book_torch_finetune_step(d2l, net, loss, trainer, device,
                                        torch_tensors(batch, INPUTS, device), labels)

    def infer():
        net.eval()
        with torch.no_grad():
            if task == 'pretrain':
                return net(*torch_tensors(batch, PRETRAIN_ORDER[:4], device))
            return net(torch_tensors(batch, INPUTS, device))

    return Step(train, infer, _torch_sync(device), str(device), notes)


def _torch_sync(device):
    import torch
    if device.type == 'cuda':
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# -- GluonNLP ---------------------------------------------------------------------------------

class _VocabSize:
    """get_bert_model reads only len() of the vocabulary it is given."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def _gluonnlp(variant, config, params, batch, task, dtype, devices, lr):
    try:
        import gluonnlp
    except ImportError as err:
        raise Skip(f'gluonnlp is not installed ({err}); pip install gluonnlp') from None
    import mxnet as mx
    from mxnet import autograd, gluon
    from ..train.devices import parse_contexts
    ctx = parse_contexts(devices)[0]
    pretrain = task == 'pretrain'
    bert, _ = gluonnlp.model.get_model(
        'bert_12_768_12', dataset_name=None, vocab=_VocabSize(config.vocab_size),
        pretrained=False, hparam_allow_override=True, num_layers=config.num_blks,
        units=config.num_hiddens, embed_size=config.num_hiddens,
        hidden_size=config.ffn_num_hiddens, num_heads=config.num_heads,
        max_length=config.max_len, dropout=config.dropout, use_pooler=True,
        use_decoder=pretrain, use_classifier=pretrain)
    net = bert if pretrain else gluonnlp.model.BERTClassifier(
        bert, num_classes=config.num_classes, dropout=config.dropout)
    net.initialize(mx.init.Normal(0.02), ctx=ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), 'adam', {'learning_rate': lr})
    ce = gluon.loss.SoftmaxCELoss()
    V = config.vocab_size

    def arrays(keys):
        return [mx.nd.array(batch[k], ctx=ctx, dtype=batch[k].dtype) for k in keys]

    def train():
        if pretrain:
            tokens, segments, valid_lens, positions, weights, labels, nsp_labels = \
                arrays(PRETRAIN_ORDER)
            with autograd.record():
                _, _, nsp, mlm = net(tokens, segments, valid_lens, positions)
                # the book's loss: MLM averaged over the real predictions, plus NSP
                mlm_l = ce(mlm.reshape((-1, V)), labels.reshape((-1,)),
                           weights.reshape((-1, 1)))
                mlm_l = mlm_l.sum() / (weights.sum() + 1e-8)
                loss = mlm_l + ce(nsp, nsp_labels).mean()
        else:
            tokens, segments, valid_lens, labels = arrays(INPUTS + ('labels',))
            with autograd.record():
                loss = ce(net(tokens, segments, valid_lens), labels).mean()
        loss.backward()
        trainer.step(1)
        return loss

    def infer():
        if pretrain:
            return net(*arrays(PRETRAIN_ORDER[:4]))
        return net(*arrays(INPUTS))

    notes = ["GluonNLP's own architecture and initialisation (GELU, embedding LayerNorm, "
             'tied decoder; Normal(0.02)): same shape, not the same weights']
    return Step(train, infer, mx.nd.waitall, str(ctx), notes)


# -- our ports ------------------------------------------------------------------------------

def _torch(variant, config, params, batch, task, dtype, devices, lr):
    import torch
    from ..train.runners import make_runner
    compiled = variant == 'torch-compile'
    runner = make_runner('torch', config, params, task=task, lr=lr, compile=compiled)
    forward = torch.compile(runner.model) if compiled else runner.model
    counter = iter(range(10 ** 9))

    def infer():
        runner.model.eval()
        b = runner._batch(batch)
        with torch.no_grad():
            if task == 'pretrain':
                return forward(b['tokens'], b['segments'], b['valid_lens'],
                               b['pred_positions'])
            return forward(b['tokens'], b['segments'], b['valid_lens'])

    return Step(lambda: runner.train_step_async(batch, next(counter)), infer, runner.sync,
                str(runner.device))


def _jax(variant, config, params, batch, task, dtype, devices, lr):
    import jax
    from ..train.runners import make_runner
    runner = make_runner('jax', config, params, task=task, lr=lr)
    counter = iter(range(10 ** 9))
    pending = []

    def train():
        pending[:] = [runner.train_step_async(batch, next(counter))]

    def infer():
        pending[:] = [runner._predict(runner._params, runner._batch(batch, PRETRAIN_ORDER[:4]))]

    def sync():
        runner.sync()
        jax.block_until_ready(pending)

    return Step(train, infer, sync, str(runner.device))

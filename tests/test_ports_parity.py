"""The same weights give the same numbers in MXNet (ours), the PyTorch and JAX ports and the
book's `d2l.torch.BERTModel`: outputs within 1e-5 (max abs, float32), gradients of one step
within 1e-4 (max abs error over max abs value, per parameter), dropout off, masked batches
of mixed lengths, for a tiny and a bert.small-shaped model, and a tiny one with the options
of real BERTs (GELU, embedding LayerNorm, epsilon 1e-12, tied MLM decoder)."""
from __future__ import annotations

import importlib
import sys
import types

import numpy as onp
import pytest
import mxnet as mx
from mxnet import autograd, gluon

from gluon_bert.config import BERTConfig
from gluon_bert.model import BERTClassifier, BERTModel, legacy_scope
from gluon_bert.ports import convert
from gluon_bert.ports.synthetic import synthetic_batch
from ports_fixtures import FRAMEWORKS



VOCAB = 97
SHAPES = {  # preset -> (batch, length, predictions per example)
    'tiny': (4, 12, 3),
    'bert.small': (3, 20, 4),
    'tiny.bert': (4, 12, 3),
}
OUTPUT_TOL = 1e-5
GRAD_TOL = 1e-4


def nd(array):
    return mx.nd.array(array, dtype=array.dtype)


def mxnet_pretrain_loss(mlm_Y_hat, nsp_Y_hat, batch):
    """The book's `_get_batch_loss_bert` (sec. "Pretraining BERT")."""
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    weights = nd(batch['mlm_weights']).reshape((-1, 1))
    mlm_l = loss(mlm_Y_hat.reshape((-1, VOCAB)), nd(batch['mlm_labels']).reshape(-1), weights)
    mlm_l = mlm_l.sum() / (weights.sum() + 1e-8)
    nsp_l = loss(nsp_Y_hat, nd(batch['nsp_labels'])).mean()
    return mlm_l + nsp_l


def mxnet_finetune_loss(logits, batch):
    return gluon.loss.SoftmaxCrossEntropyLoss()(logits, nd(batch['labels'])).mean()


def mxnet_inputs(batch, pretrain=True):
    args = [nd(batch['tokens']), nd(batch['segments']), nd(batch['valid_lens'])]
    return args + [nd(batch['pred_positions'])] if pretrain else args


def mxnet_grads(net):
    return {name: p.grad().asnumpy() for name, p in net._collect_params_with_prefix().items()}


@pytest.fixture(scope='module', params=sorted(SHAPES))
def case(request):
    """Our hybridized MXNet BERT and classifier with the book's init, a pretraining and a
    fine-tuning batch, and MXNet's outputs and gradients on them."""
    preset = request.param
    B, L, P = SHAPES[preset]
    config = BERTConfig.from_preset(preset, vocab_size=VOCAB, dropout=0.0)
    rng = onp.random.default_rng(0)
    pre = synthetic_batch(rng, config, 'pretrain', B, L, P)
    fine = synthetic_batch(rng, config, 'finetune', B, L)
    with legacy_scope():
        mx.random.seed(0)
        bert = BERTModel(config)
        bert.initialize(mx.init.Xavier())
        bert.hybridize()
        clf = BERTClassifier(bert)
        clf.output.initialize()
        clf.hybridize()
        with autograd.record():
            encoded_X, mlm_Y_hat, nsp_Y_hat = bert(*mxnet_inputs(pre))
            loss = mxnet_pretrain_loss(mlm_Y_hat, nsp_Y_hat, pre)
        loss.backward()
        pre_grads = mxnet_grads(bert)
        with autograd.record():
            logits = clf(*mxnet_inputs(fine, pretrain=False))
            fine_loss = mxnet_finetune_loss(logits, fine)
        fine_loss.backward()
        fine_grads = mxnet_grads(clf)
    return types.SimpleNamespace(
        preset=preset, config=config, pre=pre, fine=fine,
        bert_params=convert.mxnet_params(bert), clf_params=convert.mxnet_params(clf),
        outputs=(encoded_X.asnumpy(), mlm_Y_hat.asnumpy(), nsp_Y_hat.asnumpy()),
        logits=logits.asnumpy(), loss=float(loss.asscalar()), fine_loss=float(fine_loss.asscalar()),
        pre_grads=pre_grads, fine_grads=fine_grads)


def max_abs(a, b):
    return float(onp.abs(onp.asarray(a) - onp.asarray(b)).max())


def assert_outputs_close(name, got, case):
    diffs = {k: max_abs(g, r) for k, g, r in zip(('encoded_X', 'mlm_Y_hat', 'nsp_Y_hat'),
                                                 got, case.outputs)}
    print(f'\n{case.preset} {name} vs MXNet max abs diff: {diffs}')
    assert max(diffs.values()) < OUTPUT_TOL, diffs


def assert_grads_close(name, grads, ref, case):
    """Max abs error over max abs value, per parameter.

    The gradient of W_k's bias is exactly 0 in exact arithmetic (it adds one constant to a
    whole row of softmax scores, which changes nothing), so every framework returns float
    noise there (~1e-8 of the largest gradient) and noise has no relative error: those
    must only be negligible in both."""
    assert sorted(grads) == sorted(ref)
    largest = max(float(onp.abs(g).max()) for g in ref.values())
    rel = {}
    for key, g in ref.items():
        if key.endswith('attention.W_k.bias'):
            assert max(float(onp.abs(g).max()), float(onp.abs(grads[key]).max())) < 1e-6 * largest
            continue
        rel[key] = max_abs(grads[key], g) / float(onp.abs(g).max())
    worst = max(rel, key=rel.get)
    print(f'\n{case.preset} {name} gradients vs MXNet: worst relative error {rel[worst]:.2e} '
          f'({worst})')
    assert rel[worst] < GRAD_TOL, (worst, rel[worst])


def import_d2l_torch():
    """The book's PyTorch module. It imports torchvision for its image chapters only; where
    torchvision is missing (no build matches this torch here) a stub stands in during import."""
    pytest.importorskip('torch')
    pytest.importorskip('d2l')
    stubbed = []
    try:
        importlib.import_module('torchvision')
    except ImportError:
        stub = types.ModuleType('torchvision')
        stub.transforms = types.ModuleType('torchvision.transforms')
        sys.modules['torchvision'] = stub
        sys.modules['torchvision.transforms'] = stub.transforms
        stubbed = ['torchvision', 'torchvision.transforms']
    try:
        return importlib.import_module('d2l.torch')
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)


# -- outputs ----------------------------------------------------------------------------------

def test_torch_outputs_match_mxnet(case):
    torch = pytest.importorskip('torch')
    from gluon_bert.ports import torch_bert
    model = torch_bert.BERTModel(case.config)
    model.load_state_dict(convert.mxnet_to_torch(case.bert_params, case.config))
    model.eval()
    b = {k: torch.as_tensor(v) for k, v in case.pre.items()}
    with torch.no_grad():
        got = model(b['tokens'], b['segments'], b['valid_lens'], b['pred_positions'])
    assert_outputs_close('torch', [t.numpy() for t in got], case)


def test_jax_outputs_match_mxnet(case):
    pytest.importorskip('jax')
    from gluon_bert.ports import jax_bert
    model = jax_bert.BERTModel(case.config)
    params = convert.mxnet_to_jax(case.bert_params, case.config)
    b = case.pre
    got = model.apply(params, b['tokens'], b['segments'], b['valid_lens'], b['pred_positions'])
    assert_outputs_close('jax', got, case)


def test_d2l_torch_matches_mxnet_and_our_port(case):
    if case.config.embedding_norm:
        pytest.skip("the book's d2l.torch model has none of real BERT's options")
    d2l_torch = import_d2l_torch()
    import torch
    from gluon_bert.ports import torch_bert
    c = case.config
    book = d2l_torch.BERTModel(c.vocab_size, c.num_hiddens, c.ffn_num_hiddens, c.num_heads,
                               c.num_blks, c.dropout, c.max_len)
    book.load_state_dict(convert.to_d2l_torch(case.bert_params, c))  # materialises LazyLinear
    book.eval()
    # built as the book builds it: the same positional arguments
    ours = torch_bert.BERTModel(c.vocab_size, c.num_hiddens, c.ffn_num_hiddens, c.num_heads,
                                c.num_blks, c.dropout, c.max_len)
    assert ours.config == c.replace(preset=None)
    ours.load_state_dict(convert.mxnet_to_torch(case.bert_params, c))
    ours.eval()
    b = {k: torch.as_tensor(v) for k, v in case.pre.items()}
    tokens, segments, positions = b['tokens'].long(), b['segments'].long(), b['pred_positions']
    with torch.no_grad():
        got = book(tokens, segments, b['valid_lens'], positions.long())
        mine = ours(tokens, segments, b['valid_lens'], positions)
    assert_outputs_close('d2l.torch', [t.numpy() for t in got], case)
    for g, m in zip(got, mine):
        assert max_abs(g.numpy(), m.numpy()) < OUTPUT_TOL
    # And the book's state dict comes back to the same MXNet weights.
    back = convert.from_d2l_torch(book.state_dict(), c)
    assert all(onp.array_equal(back[n], a) for n, a in case.bert_params.items())


def test_torch_classifier_takes_the_books_single_tuple(case):
    torch = pytest.importorskip('torch')
    from gluon_bert.ports import torch_bert
    clf = torch_bert.BERTClassifier(case.config).eval()
    b = {k: torch.as_tensor(v) for k, v in case.pre.items()}
    inputs = (b['tokens'], b['segments'], b['valid_lens'])
    with torch.no_grad():
        assert torch.equal(clf(inputs), clf(*inputs))


@pytest.mark.parametrize('framework', FRAMEWORKS)
def test_runner_predictions_match_mxnet(case, framework):
    from gluon_bert.train.runners import make_runner
    clf = make_runner(framework, case.config, case.clf_params, task='finetune')
    logits = clf.predict(case.fine)
    diff = max_abs(logits, case.logits)
    print(f'\n{case.preset} {framework} classifier logits vs MXNet max abs diff: {diff:.2e}')
    assert logits.shape == (SHAPES[case.preset][0], case.config.num_classes)
    assert diff < OUTPUT_TOL
    bert = make_runner(framework, case.config, case.bert_params, task='pretrain')
    mlm_Y_hat, nsp_Y_hat = bert.predict(case.pre)
    assert max_abs(mlm_Y_hat, case.outputs[1]) < OUTPUT_TOL
    assert max_abs(nsp_Y_hat, case.outputs[2]) < OUTPUT_TOL
    no_mlm, nsp_only = bert.predict({k: case.pre[k] for k in ('tokens', 'segments', 'valid_lens')})
    assert no_mlm is None and max_abs(nsp_only, case.outputs[2]) < OUTPUT_TOL


# -- gradients of one step --------------------------------------------------------------------

@pytest.mark.parametrize('framework', FRAMEWORKS)
def test_gradients_match_mxnet(case, framework):
    from gluon_bert.train.runners import make_runner
    runner = make_runner(framework, case.config, case.bert_params, task='pretrain')
    metrics, grads = runner.gradients(case.pre)
    assert abs(metrics['loss'] - case.loss) / case.loss < 1e-5
    assert_grads_close(f'{framework} pretrain', grads, case.pre_grads, case)
    runner = make_runner(framework, case.config, case.clf_params, task='finetune')
    metrics, grads = runner.gradients(case.fine)
    assert abs(metrics['loss'] - case.fine_loss) / case.fine_loss < 1e-5
    assert_grads_close(f'{framework} finetune', grads, case.fine_grads, case)

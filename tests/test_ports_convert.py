"""Weight conversion: the tables cover every parameter, round trips are bit-identical, bad
checkpoints fail with a message that names the problem."""
from __future__ import annotations

import numpy as onp
import pytest
import mxnet as mx

from gluon_bert.config import BERTConfig
from gluon_bert.model import BERTClassifier, BERTModel
from gluon_bert.ports import convert
from gluon_bert.ports.convert import ConversionError

VOCAB = 31


@pytest.fixture(scope='module', params=['tiny', 'tiny.bert'])
def config(request):
    """The book's architecture, and the one of real BERTs (embedding LayerNorm, tied MLM
    decoder: other rows of the tables)."""
    return BERTConfig.from_preset(request.param, vocab_size=VOCAB, num_blks=3, max_len=16)


def _forward(net, config):
    """One forward pass: Gluon creates the weights when it first sees an input."""
    tokens = mx.nd.zeros((2, 4))
    args = (tokens, tokens, mx.nd.array([4, 2]))
    if isinstance(net, BERTModel):
        args += (mx.nd.array([[1], [0]]),)
    net(*args)
    return net


def _mxnet_params(config, task):
    mx.random.seed(7)
    bert = BERTModel(config)
    bert.initialize(mx.init.Xavier())
    if task == 'pretrain':
        return convert.mxnet_params(_forward(bert, config))
    clf = BERTClassifier(bert)
    clf.output.initialize()
    return convert.mxnet_params(_forward(clf, config))


@pytest.fixture(scope='module', params=['pretrain', 'finetune'])
def task_params(request, config):
    return request.param, _mxnet_params(config, request.param)


def assert_bit_identical(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def test_shapes_table_matches_the_mxnet_model(config, task_params):
    task, params = task_params
    assert convert.mxnet_shapes(config, task) == {n: a.shape for n, a in params.items()}


def test_jax_round_trip_is_bit_identical(config, task_params):
    task, params = task_params
    nested = convert.mxnet_to_jax(params, config)  # task inferred from the names
    assert nested['encoder']['blks']['2']['ffn']['dense1']['kernel'].shape == (
        config.num_hiddens, config.ffn_num_hiddens)  # (in, out): transposed
    assert_bit_identical(convert.jax_to_mxnet(nested, config), params)
    # The flat form converts too.
    assert_bit_identical(convert.jax_to_mxnet(convert.flatten_jax(nested)), params)


def test_jax_init_has_the_converted_layout(config, task_params):
    jax = pytest.importorskip('jax')
    from gluon_bert.ports import jax_bert
    task, params = task_params
    model = (jax_bert.BERTModel if task == 'pretrain' else jax_bert.BERTClassifier)(config)
    own = convert.flatten_jax(model.init(jax.random.PRNGKey(0)))
    converted = convert.flatten_jax(convert.mxnet_to_jax(params, config, task))
    assert {n: tuple(a.shape) for n, a in own.items()} == {
        n: a.shape for n, a in converted.items()}


def test_torch_round_trips_are_bit_identical(config, task_params):
    torch = pytest.importorskip('torch')
    from gluon_bert.ports import torch_bert
    task, params = task_params
    state = convert.mxnet_to_torch(params, config, task)
    assert_bit_identical(convert.torch_to_mxnet(state, config, task), params)
    # The port's own state dict has exactly the converted names and shapes, and loads strictly.
    bert = torch_bert.BERTModel(config)
    model = bert if task == 'pretrain' else torch_bert.BERTClassifier(bert)
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == {
        n: tuple(t.shape) for n, t in state.items()}
    model.load_state_dict(state)
    # torch -> MXNet -> torch as well.
    again = convert.mxnet_to_torch(convert.torch_to_mxnet(model.state_dict()), config, task)
    for name, tensor in model.state_dict().items():
        assert torch.equal(again[name], tensor), name


def test_d2l_torch_round_trip_is_bit_identical(config, task_params):
    pytest.importorskip('torch')
    task, params = task_params
    if config.embedding_norm:  # the book's model has neither option
        with pytest.raises(ConversionError, match="book's architecture"):
            convert.to_d2l_torch(params, config, task)
        return
    state = convert.to_d2l_torch(params, config, task)
    assert 'hidden.0.weight' in state
    if task == 'pretrain':  # d2l's MaskLM.mlp: Linear, ReLU, LayerNorm, Linear
        assert state['mlm.mlp.2.weight'].shape == (config.num_hiddens,)
        assert state['mlm.mlp.3.weight'].shape == (VOCAB, config.num_hiddens)
    assert_bit_identical(convert.from_d2l_torch(state, config, task), params)


def test_mxnet_file_and_block_round_trip(config, tmp_path):
    bert = BERTModel(config)
    bert.initialize(mx.init.Xavier())
    _forward(bert, config)
    path = str(tmp_path / 'bert.params')
    bert.save_parameters(path)
    params = convert.load_mxnet_file(path)
    assert_bit_identical(params, convert.mxnet_params(bert))
    legacy = str(tmp_path / 'legacy.params')  # a file written without numpy shape semantics
    mx.nd.save(legacy, {name: mx.nd.array(a) for name, a in params.items()})
    assert_bit_identical(convert.load_mxnet_file(legacy), params)
    other = BERTModel(config)
    other.initialize(mx.init.Xavier())  # deferred: takes the arrays at its first forward
    convert.load_mxnet_params(other, params)
    assert_bit_identical(convert.mxnet_params(_forward(other, config)), params)
    convert.load_mxnet_params(other, params)  # and initialised ones take them at once
    assert_bit_identical(convert.mxnet_params(other), params)


# -- bad input --------------------------------------------------------------------------------

def test_missing_and_unexpected_names_are_listed(config):
    params = _mxnet_params(config, 'pretrain')
    broken = dict(params)
    del broken['encoder.blks.1.attention.W_k.bias']
    broken['encoder.blks.1.attention.W_x.bias'] = onp.zeros(config.num_hiddens, 'float32')
    with pytest.raises(ConversionError) as err:
        convert.mxnet_to_jax(broken, config)
    message = str(err.value)
    assert 'missing 1: encoder.blks.1.attention.W_k.bias' in message
    assert 'unexpected 1: encoder.blks.1.attention.W_x.bias' in message


def test_wrong_shapes_are_reported_with_config(config):
    params = _mxnet_params(config, 'pretrain')
    bigger = config.replace(vocab_size=VOCAB + 1)
    with pytest.raises(ConversionError, match=r'encoder\.token_embedding\.weight is \(31, 32\), '
                                              r'expected \(32, 32\)'):
        convert.mxnet_to_jax(params, bigger)
    # Without a config a transposed array must at least be a matrix.
    broken = dict(params, **{'hidden.weight': onp.zeros((2, 3, 4), 'float32')})
    with pytest.raises(ConversionError, match='hidden.weight is'):
        convert.mxnet_to_jax(broken)


def test_checkpoint_of_the_other_task_or_depth(config):
    clf_params = _mxnet_params(config, 'finetune')
    with pytest.raises(ConversionError, match='missing .*mlm.mlp') as err:
        convert.mxnet_to_jax(clf_params, config, task='pretrain')
    assert 'unexpected 2: output.bias, output.weight' in str(err.value)
    with pytest.raises(ConversionError, match=r'unexpected .*encoder\.blks\.2\.'):
        convert.mxnet_to_jax(clf_params, config.replace(num_blks=2))
    with pytest.raises(ValueError, match='task must be'):
        convert.mxnet_to_jax(clf_params, config, task='pretraining')


def test_bad_torch_and_d2l_state_dicts(config):
    if config.embedding_norm:
        pytest.skip("d2l.torch state dicts are the book's architecture only (tested above)")
    pytest.importorskip('torch')
    params = _mxnet_params(config, 'pretrain')
    ours = convert.mxnet_to_torch(params, config)
    with pytest.raises(ConversionError, match=r'missing 4: hidden\.0\.bias, hidden\.0\.weight, mlm\.mlp\.3'):
        convert.from_d2l_torch(ours, config)  # our layout is not the book's
    book = convert.to_d2l_torch(params, config)
    with pytest.raises(ConversionError, match=r'unexpected 4: hidden\.0\.bias, hidden\.0\.weight, mlm\.mlp\.3'):
        convert.torch_to_mxnet(book, config)


def test_load_mxnet_params_is_strict(config):
    params = _mxnet_params(config, 'pretrain')
    net = BERTModel(config.replace(num_blks=2))
    net.initialize()
    with pytest.raises(ConversionError, match=r'unexpected .*encoder\.blks\.2\.'):
        convert.load_mxnet_params(net, params)

"""Our BERT against the book's own MXNet classes (d2l 1.0.3), hybridized and imperative."""
from __future__ import annotations

import numpy as onp
import pytest
import mxnet as mx
from mxnet import autograd, gluon, init

from gluon_bert.config import BERTConfig
from gluon_bert.model import BERTClassifier, BERTModel, MultiHeadAttention

d2l = pytest.importorskip('d2l.mxnet')

VOCAB = 97
SHAPES = {  # preset -> (batch, length, predictions per example)
    'tiny': (4, 12, 3),
    'bert.small': (3, 20, 4),
}


def make_batch(rs, B, L, P, vocab=VOCAB, valid_lens=None):
    if valid_lens is None:
        valid_lens = onp.concatenate([[L], rs.randint(2, L, B - 1)])  # mixed, one full
    tokens = rs.randint(0, vocab, (B, L))
    segments = (onp.arange(L)[None, :] >= rs.randint(1, L, (B, 1))).astype('int32')
    for b, n in enumerate(valid_lens):  # padding after valid_len, as the data pipeline pads
        tokens[b, int(n):] = 0
        segments[b, int(n):] = 0
    positions = onp.stack([rs.choice(int(n), P) for n in valid_lens])
    return (tokens.astype('int32'), segments, valid_lens.astype('float32'),
            positions.astype('int32'))


def build_pair(preset, dropout=0.0):
    """(ours, book's) with identical weights; dropout off so that outputs can be compared."""
    config = BERTConfig.from_preset(preset, vocab_size=VOCAB, dropout=dropout)
    ours = BERTModel(config)
    ours.initialize(init.Xavier())
    ref = d2l.BERTModel(VOCAB, config.num_hiddens, config.ffn_num_hiddens, config.num_heads,
                        config.num_blks, config.dropout, config.max_len)
    ref.initialize(init.Xavier())
    return config, ours, ref


def to_np(arrays):
    return [mx.np.array(a) for a in arrays]


def copy_weights(src, dst, tmp_path, name='w.params'):
    path = str(tmp_path / name)
    src.save_parameters(path)
    dst.load_parameters(path)  # strict: no missing or extra names allowed
    return path


def max_diff(a, b):
    return float(onp.abs(a.asnumpy() - b.asnumpy()).max())


@pytest.mark.parametrize('preset', sorted(SHAPES))
def test_outputs_and_gradients_match_book(preset, hybridize, np_mode, tmp_path):
    config, ours, ref = build_pair(preset)
    rs = onp.random.RandomState(1)
    B, L, P = SHAPES[preset]
    inputs = to_np(make_batch(rs, B, L, P))
    ref(*inputs)  # finish the book's deferred init before its weights are copied
    copy_weights(ref, ours, tmp_path)
    if hybridize:
        ours.hybridize(static_alloc=True, static_shape=True)

    grads = {}
    for name, net in (('ours', ours), ('ref', ref)):
        with autograd.record(train_mode=False):
            outs = net(*inputs)
            # A scalar that depends on every output, to compare one backward pass.
            loss = sum((o * o).sum() * 1e-3 for o in outs)
        loss.backward()
        grads[name] = ({k: p.grad().asnumpy().copy()
                        for k, p in net._collect_params_with_prefix().items()}, outs)
    (g_ours, o_ours), (g_ref, o_ref) = grads['ours'], grads['ref']
    for a, b in zip(o_ours, o_ref):
        assert type(a) is mx.np.ndarray and a.shape == b.shape
        assert max_diff(a, b) < 1e-5
    assert set(g_ours) == set(g_ref)
    # Relative to each gradient's size; a gradient that is zero in exact arithmetic (the key
    # bias: softmax ignores a shift shared by all keys) is compared to the largest one.
    floor = 1e-3 * max(onp.abs(g).max() for g in g_ref.values())
    for k in g_ref:
        scale = max(onp.abs(g_ref[k]).max(), floor)
        assert onp.abs(g_ours[k] - g_ref[k]).max() / scale < 1e-4, k


def test_padding_does_not_change_valid_positions(hybridize):
    config = BERTConfig.from_preset('tiny', vocab_size=VOCAB, dropout=0.0)
    net = BERTModel(config)
    net.initialize(init.Xavier())
    if hybridize:
        net.hybridize(static_alloc=True, static_shape=True)
    rs = onp.random.RandomState(2)
    tokens, segments, valid_lens, positions = make_batch(rs, 4, 16, 3)
    nd = lambda a: mx.nd.array(a, dtype=a.dtype)  # noqa: E731
    base = net(nd(tokens), nd(segments), nd(valid_lens), nd(positions))
    # Any garbage in the padding must not reach valid positions or any head.
    noisy_tokens, noisy_segments = tokens.copy(), segments.copy()
    for b, n in enumerate(valid_lens.astype(int)):
        noisy_tokens[b, n:] = rs.randint(0, VOCAB, 16 - n)
        noisy_segments[b, n:] = 1
    noisy = net(nd(noisy_tokens), nd(noisy_segments), nd(valid_lens), nd(positions))
    enc_a, enc_b = base[0].asnumpy(), noisy[0].asnumpy()
    for b, n in enumerate(valid_lens.astype(int)):
        onp.testing.assert_allclose(enc_a[b, :n], enc_b[b, :n], atol=1e-5)
    onp.testing.assert_allclose(base[1].asnumpy(), noisy[1].asnumpy(), atol=1e-5)
    onp.testing.assert_allclose(base[2].asnumpy(), noisy[2].asnumpy(), atol=1e-5)
    # Trimming the padding away altogether gives the same numbers too.
    L = int(valid_lens.max())
    trimmed = net(nd(tokens[:, :L]), nd(segments[:, :L]), nd(valid_lens), nd(positions))
    onp.testing.assert_allclose(trimmed[1].asnumpy(), base[1].asnumpy(), atol=1e-5)


def test_shapes_of_every_head(hybridize):
    config = BERTConfig.from_preset('tiny', vocab_size=VOCAB)
    bert = BERTModel(config)
    bert.initialize()
    if hybridize:
        bert.hybridize(static_alloc=True, static_shape=True)
    tokens, segments, valid_lens, positions = (mx.nd.array(a) for a in
                                               make_batch(onp.random.RandomState(3), 2, 8, 5))
    enc, mlm, nsp = bert(tokens, segments, valid_lens, positions)
    assert enc.shape == (2, 8, 32) and mlm.shape == (2, 5, VOCAB) and nsp.shape == (2, 2)
    enc, mlm, nsp = bert(tokens, segments, valid_lens)  # the book's call without positions
    assert mlm is None and enc.shape == (2, 8, 32) and nsp.shape == (2, 2)
    enc, mlm, nsp = bert(tokens, segments)  # and without lengths
    assert enc.shape == (2, 8, 32)
    clf = BERTClassifier(bert)
    clf.output.initialize()
    assert clf(tokens, segments, valid_lens).shape == (2, 3)
    assert clf((tokens, segments, valid_lens)).shape == (2, 3)  # the book's tuple form
    att = MultiHeadAttention(32, 4, 0.0)
    att.initialize()
    x = mx.nd.random.normal(shape=(2, 8, 32))
    assert att(x, x, x, valid_lens).shape == (2, 8, 32)


def test_book_arguments_and_config_agree():
    a = BERTModel(VOCAB, 32, 64, 2, 2, 0.1, max_len=64)
    b = BERTModel(BERTConfig.from_preset('tiny', vocab_size=VOCAB))
    assert a.config.replace(preset='tiny') == b.config
    with pytest.raises(ValueError, match='divisible'):
        BERTModel(VOCAB, 30, 64, 4, 2, 0.1)
    with pytest.raises(TypeError):
        BERTModel(b.config, 32)


def test_checkpoints_load_both_ways_and_round_trip(np_mode, tmp_path):
    config, ours, ref = build_pair('tiny')
    inputs = to_np(make_batch(onp.random.RandomState(4), 2, 10, 2))
    ref(*inputs)
    ours(*inputs)
    # ours -> book: strict load (no missing/extra names) gives the same outputs
    copy_weights(ours, ref, tmp_path, 'ours.params')
    for a, b in zip(ours(*inputs), ref(*inputs)):
        assert max_diff(a, b) < 1e-5
    # book -> ours
    ours2 = BERTModel(config)
    copy_weights(ref, ours2, tmp_path, 'ref.params')
    for a, b in zip(ours2(*inputs), ref(*inputs)):
        assert max_diff(a, b) < 1e-5
    # ours -> ours is exact, also from a legacy-mode program
    path = copy_weights(ours, ours2, tmp_path, 'again.params')
    mx.npx.reset_np()
    ours3 = BERTModel(config)
    ours3.load_parameters(path)
    for name, p in ours._collect_params_with_prefix().items():
        other = ours3._collect_params_with_prefix()[name].data()
        assert onp.array_equal(p.data().asnumpy(), other.asnumpy()), name


def test_hybridized_training_step_with_trainer():
    config = BERTConfig.from_preset('tiny', vocab_size=VOCAB)
    net = BERTModel(config)
    net.initialize(init.Xavier())
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), 'adam', {'learning_rate': 1e-2})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    tokens, segments, valid_lens, positions = (mx.nd.array(a) for a in
                                               make_batch(onp.random.RandomState(5), 8, 12, 3))
    labels = mx.nd.array(onp.random.RandomState(6).randint(0, 2, 8))
    losses = []
    for _ in range(15):
        with autograd.record():
            _, mlm, nsp = net(tokens, segments, valid_lens, positions)
            loss = loss_fn(nsp, labels).mean() + loss_fn(mlm, tokens[:, :3]).mean()
        loss.backward()
        trainer.step(1)
        losses.append(loss.asscalar())
    assert losses[-1] < 0.5 * losses[0]


def test_export_and_symbolblock_import(tmp_path):
    config = BERTConfig.from_preset('tiny', vocab_size=VOCAB, dropout=0.0)
    net = BERTModel(config)
    net.initialize(init.Xavier())
    net.hybridize(static_alloc=True, static_shape=True)
    inputs = [mx.nd.array(a) for a in make_batch(onp.random.RandomState(7), 3, 10, 2)]
    expected = net(*inputs)
    prefix = str(tmp_path / 'bert')
    net.export(prefix)
    imported = gluon.SymbolBlock.imports(f'{prefix}-symbol.json',
                                         ['data0', 'data1', 'data2', 'data3'],
                                         f'{prefix}-0000.params')
    for a, b in zip(imported(*inputs), expected):
        onp.testing.assert_allclose(a.asnumpy(), b.asnumpy(), atol=1e-6)


def _dense_output_types(sym):
    internals = sym.get_internals()
    types = []
    for name in internals.list_outputs():
        if 'dense' in name and name.endswith('fwd_output'):
            s = internals[name]
            _, out, _ = s.infer_type(**{a: 'float32' for a in s.list_arguments()})
            types.append(onp.dtype(out[0]))
    return types


def test_graph_is_convertible_by_amp():
    """MXNet's AMP rewrites legacy operators only: our graph's dense layers go to float16."""
    from mxnet.contrib import amp
    net = BERTModel(BERTConfig.from_preset('tiny', vocab_size=VOCAB))
    net.initialize(init.Xavier())
    net.hybridize()
    net(*[mx.nd.array(a) for a in make_batch(onp.random.RandomState(8), 2, 8, 2)])
    sym = net._cached_graph[1]
    before = _dense_output_types(sym)
    after = _dense_output_types(amp.convert_symbol(sym, target_dtype='float16',
                                                   cast_optional_params=False))
    assert len(before) == len(after) >= 4 * net.config.num_blks  # W_q, W_k, W_v, W_o per block
    assert all(t == onp.float32 for t in before)
    assert sum(t == onp.float16 for t in after) >= len(after) // 2


# -- the options of real BERTs ----------------------------------------------------------------

def test_bert_options_names_heads_and_round_trip(hybridize, tmp_path):
    """GELU, embedding LayerNorm, epsilon and the tied decoder: one parameter more and one
    less than the book's names; the MLM head is gelu -> LayerNorm -> the token embedding."""
    import math
    erf = onp.vectorize(math.erf)
    book = BERTModel(BERTConfig.from_preset('tiny', vocab_size=VOCAB))
    config = BERTConfig.from_preset('tiny.bert', vocab_size=VOCAB, dropout=0.0)
    net = BERTModel(config)
    net.initialize(init.Normal(0.5))
    names = set(net._collect_params_with_prefix())
    book_names = set(book._collect_params_with_prefix())
    assert names - book_names == {'encoder.embedding_ln.gamma', 'encoder.embedding_ln.beta'}
    assert book_names - names == {'mlm.mlp.2.weight'}
    if hybridize:
        net.hybridize(static_alloc=True, static_shape=True)
    rs = onp.random.RandomState(7)
    tokens, segments, valid_lens, positions = (mx.nd.array(a) for a in make_batch(rs, 3, 10, 4))
    enc, mlm, nsp = net(tokens, segments, valid_lens, positions)
    assert enc.shape == (3, 10, 32) and mlm.shape == (3, 4, VOCAB) and nsp.shape == (3, 2)
    # the MLM head by hand, in numpy
    p = {k: v.data().asnumpy() for k, v in net._collect_params_with_prefix().items()}
    X = enc.asnumpy()[onp.arange(3)[:, None], positions.asnumpy().astype(int)]  # (B, P, H)
    h = X @ p['mlm.mlp.0.weight'].T + p['mlm.mlp.0.bias']
    h = 0.5 * h * (1 + erf(h / onp.sqrt(2)))
    h = (h - h.mean(-1, keepdims=True)) / onp.sqrt(h.var(-1, keepdims=True) + 1e-12)
    h = h * p['mlm.mlp.1.gamma'] + p['mlm.mlp.1.beta']
    want = h @ p['encoder.token_embedding.weight'].T + p['mlm.mlp.2.bias']
    onp.testing.assert_allclose(mlm.asnumpy(), want, rtol=1e-4, atol=1e-4)
    # the decoder's gradient reaches the token embedding
    with autograd.record():
        loss = net(tokens, segments, valid_lens, positions)[1].sum()
    loss.backward()
    assert float(net.encoder.token_embedding.weight.grad().abs().sum().asscalar()) > 0
    # save -> load -> the same numbers, and the config survives its JSON
    path = str(tmp_path / 'bert.params')
    net.save_parameters(path)
    again = BERTModel(BERTConfig.from_json(config.to_json()))
    again.load_parameters(path)
    for a, b in zip(again(tokens, segments, valid_lens, positions), (enc, mlm, nsp)):
        assert max_diff(a, b) < 1e-6


def test_old_configs_read_as_the_book_and_bad_options_are_refused():
    from gluon_bert.errors import ConfigError
    old = {k: v for k, v in BERTConfig.from_preset('bert.small', vocab_size=9).to_dict().items()
           if k not in ('activation', 'embedding_norm', 'layer_norm_eps', 'tie_mlm_decoder')}
    c = BERTConfig.from_dict(old)
    assert (c.activation, c.embedding_norm, c.layer_norm_eps, c.tie_mlm_decoder) == (
        'relu', False, 1e-5, False)
    for bad in (dict(activation='gelu_new'), dict(layer_norm_eps=0), dict(embedding_norm=1)):
        with pytest.raises(ConfigError):
            BERTConfig.from_preset('tiny', vocab_size=9, **bad)


@pytest.mark.parametrize('kernels_on', [True, False], ids=['kernels', 'stock-ops'])
@pytest.mark.parametrize('preset', ['tiny', 'tiny.bert'])
def test_classifier_reads_cls_alone_with_the_same_logits_and_gradients(
        preset, kernels_on, hybridize, monkeypatch):
    # first_only (the default) runs the last block at <cls> only; the logits and every
    # gradient are those of the whole last block (first_only=False, the book's arithmetic)
    from gluon_bert import kernels
    if not kernels_on:
        monkeypatch.setattr(kernels, 'use_here', lambda *args: False)
    config = BERTConfig.from_preset(preset, vocab_size=VOCAB, dropout=0.0)
    nets = [BERTClassifier(config, first_only=flag) for flag in (True, False)]
    for net in nets:
        net.initialize(init.Xavier())
    tokens, segments, valid_lens, _ = (mx.nd.array(a, dtype=a.dtype) for a in
                                       make_batch(onp.random.RandomState(5), 5, 14, 1))
    nets[0](tokens, segments, valid_lens)
    nets[1](tokens, segments, valid_lens)
    params = [n._collect_params_with_prefix() for n in nets]
    assert set(params[0]) == set(params[1])  # the same parameters, the same names
    for k, p in params[0].items():
        params[1][k].set_data(p.data())
    results = []
    for net in nets:
        if hybridize:
            net.hybridize(static_alloc=True, static_shape=True)
        with autograd.record():
            logits = net(tokens, segments, valid_lens)                       # (B, C)
            loss = (logits * mx.nd.array(onp.arange(1, 16).reshape(5, 3))).sum()
        loss.backward()
        results.append((logits.asnumpy(), {k: p.grad().asnumpy().copy()
                                           for k, p in net._collect_params_with_prefix().items()}))
    (lean, g_lean), (full, g_full) = results
    assert lean.shape == (5, 3)
    onp.testing.assert_allclose(lean, full, rtol=1e-5, atol=1e-5)
    floor = 1e-3 * max(onp.abs(g).max() for g in g_full.values())
    for k in g_full:
        scale = max(onp.abs(g_full[k]).max(), floor)
        assert onp.abs(g_lean[k] - g_full[k]).max() / scale < 1e-4, k

"""GluonNLP's BERTs in our model: GluonNLP's own `BERTModel` with random weights, saved with
its `save_parameters`, gives the same sequence output (at real positions: GluonNLP zeroes
the padded ones), pooled output, MLM and NSP logits as ours after import (max abs difference
under 1e-4, float32, dropout off), on a padded batch of mixed lengths, hybridized and not;
ours exported back loads into GluonNLP's; `gluonnlp:NAME` downloads the model zoo's zips
through the verified cache from a local server ($MXNET_GLUON_REPO)."""
from __future__ import annotations

import collections
import hashlib
import os
import shutil
import warnings

import numpy as onp
import pytest
import mxnet as mx

from data_fixtures import local_server, zip_bytes

nlp = pytest.importorskip('gluonnlp')

from gluon_bert import load_pretrained  # noqa: E402
from gluon_bert.config import BERTConfig  # noqa: E402
from gluon_bert.data import bert_hub  # noqa: E402
from gluon_bert.data.download import ChecksumError  # noqa: E402
from gluon_bert.model import BERTModel  # noqa: E402
from gluon_bert.ports import convert, gluonnlp_bert  # noqa: E402
from gluon_bert.pretrained import PretrainedError  # noqa: E402

TOL = 1e-4
WORDS = ['a', 'man', 'woman', 'dog', 'runs', '##s', '##ing', '.', 'park'] + [
    f'w{i}' for i in range(30)]
H, HEADS, BLOCKS, FFN, MAX_LEN = 64, 1, 2, 48, 40  # 64-wide heads, as BERT's


def gluonnlp_bert_model(vocab_size, seed=0):
    """GluonNLP's BERTModel as its bert_12_768_12 builds it, at a tiny size."""
    encoder = nlp.model.BERTEncoder(num_layers=BLOCKS, units=H, hidden_size=FFN,
                                    max_length=MAX_LEN, num_heads=HEADS, dropout=0.0)
    net = nlp.model.BERTModel(encoder, vocab_size, token_type_vocab_size=2, units=H,
                              embed_size=H, use_pooler=True, use_decoder=True,
                              use_classifier=True)
    mx.random.seed(seed)
    net.initialize(mx.init.Normal(0.3))
    return net


def folder_with(tmp_path, name='bert_tiny_test'):
    vocab = nlp.vocab.BERTVocab(collections.Counter(WORDS))
    net = gluonnlp_bert_model(len(vocab))
    net(*inputs(padded_batch()))  # GluonNLP defers shapes until the first call
    net.save_parameters(str(tmp_path / f'{name}.params'))
    (tmp_path / f'{name}.vocab').write_text(vocab.to_json())
    return net, vocab


def padded_batch(seed=1, B=4, L=12, P=3):
    rs = onp.random.RandomState(seed)
    valid = onp.array([L] + list(rs.randint(3, L, B - 1)))
    tokens = rs.randint(5, len(WORDS) + 5, (B, L))
    segments = (onp.arange(L)[None] >= rs.randint(1, 3, (B, 1))).astype('int32')
    pad = onp.arange(L)[None] >= valid[:, None]
    tokens[pad], segments[pad] = 1, 0
    positions = onp.stack([rs.choice(int(n), P, replace=False) for n in valid])
    return tokens.astype('int32'), segments, valid.astype('float32'), positions.astype('int32')


def inputs(batch):
    return [mx.nd.array(a, dtype=a.dtype) for a in batch]


def assert_same(ours_net, ref_net, batch):
    seq, pooled, nsp, mlm = ref_net(*inputs(batch))
    enc, our_mlm, our_nsp = ours_net(*inputs(batch))
    our_pooled = ours_net.hidden(enc[:, 0, :])  # the book's hidden is BERT's pooler
    valid = batch[2].astype(int)
    diffs = {
        # GluonNLP sets the sequence output at padded positions to 0 (SequenceMask); we
        # leave them as computed, as the book and Hugging Face do: compare real positions
        'sequence': max(float(onp.abs(enc.asnumpy()[b, :n] - seq.asnumpy()[b, :n]).max())
                        for b, n in enumerate(valid)),
        'pooled': float(onp.abs(our_pooled.asnumpy() - pooled.asnumpy()).max()),
        'mlm': float(onp.abs(our_mlm.asnumpy() - mlm.asnumpy()).max()),
        'nsp': float(onp.abs(our_nsp.asnumpy() - nsp.asnumpy()).max())}
    print('max abs diff vs GluonNLP:', diffs)
    assert max(diffs.values()) < TOL, diffs


def test_import_matches_gluonnlp(tmp_path, hybridize):
    ref, gvocab = folder_with(tmp_path)
    bert, vocab = load_pretrained(str(tmp_path))
    assert vocab.idx_to_token == gvocab.idx_to_token and vocab.lower
    c = bert.config
    assert (c.num_hiddens, c.num_heads, c.num_blks, c.ffn_num_hiddens, c.max_len) == (
        H, HEADS, BLOCKS, FFN, MAX_LEN)
    assert (c.activation, c.embedding_norm, c.layer_norm_eps, c.tie_mlm_decoder) == (
        'gelu', True, 1e-12, True)
    if hybridize:
        bert.hybridize(static_alloc=True, static_shape=True)
        ref.hybridize(static_alloc=True)
    assert_same(bert, ref, padded_batch())


def test_export_loads_into_gluonnlp(tmp_path):
    vocab = nlp.vocab.BERTVocab(collections.Counter(WORDS))
    config = BERTConfig.from_preset('bert_12_768_12', vocab_size=len(vocab), num_hiddens=H,
                                    ffn_num_hiddens=FFN, num_heads=HEADS, num_blks=BLOCKS,
                                    max_len=MAX_LEN, dropout=0.0)
    ours = BERTModel(config)
    ours.initialize(mx.init.Normal(0.3))
    path = gluonnlp_bert.save_gluonnlp_params(str(tmp_path / 'out.params'),
                                              convert.mxnet_params(ours), config)
    ref = gluonnlp_bert_model(len(vocab))
    ref.load_parameters(path)  # strict: every GluonNLP name, nothing else
    assert_same(ours, ref, padded_batch(seed=2))


def test_not_a_gluonnlp_file_is_one_error(tmp_path):
    folder_with(tmp_path)
    mx.nd.save(str(tmp_path / 'bert_tiny_test.params'), {'foo': mx.nd.zeros(2)})
    with pytest.raises(PretrainedError, match='not a GluonNLP BERT'):
        load_pretrained(str(tmp_path))


# -- gluonnlp:NAME through the verified cache --------------------------------------------------

@pytest.fixture
def zoo(tmp_path, monkeypatch):
    """A local server in the model zoo's URL layout, with a tiny BERT registered under a
    zoo name (its real SHA-1s replaced by the served files')."""
    monkeypatch.setenv('GLUON_BERT_HOME', str(tmp_path / 'cache'))
    monkeypatch.delenv('GLUON_BERT_OFFLINE', raising=False)
    (tmp_path / 'src').mkdir()
    ref, _ = folder_with(tmp_path / 'src')
    params = (tmp_path / 'src' / 'bert_tiny_test.params').read_bytes()
    vocab = (tmp_path / 'src' / 'bert_tiny_test.vocab').read_bytes()
    name, dataset = 'bert_12_768_12_test_uncased', 'test_uncased'
    sha_p, sha_v = hashlib.sha1(params).hexdigest(), hashlib.sha1(vocab).hexdigest()
    monkeypatch.setitem(bert_hub.GLUONNLP_MODELS, name, (sha_p, dataset, sha_v))
    with local_server() as server:
        monkeypatch.setenv('MXNET_GLUON_REPO', server.url + '/repo/')
        p, v = f'{name}-{sha_p[:8]}', f'{dataset}-{sha_v[:8]}'
        server.routes[f'/repo/gluon/models/{p}.zip'] = ('bytes', zip_bytes({p + '.params': params}))
        server.routes[f'/repo/gluon/dataset/vocab/{v}.zip'] = ('bytes',
                                                               zip_bytes({v + '.vocab': vocab}))
        yield server, name, ref, p


def test_gluonnlp_name_downloads_once_and_checks_sha1(zoo, tmp_path):
    server, name, ref, stem = zoo
    # the preset of the zoo name says the shape; here it is overridden for the tiny model
    with pytest.raises(PretrainedError, match='not a GluonNLP BERT of this shape'):
        load_pretrained(f'gluonnlp:{name}')
    bert, vocab = load_pretrained(f'gluonnlp:{name}', preset='tiny.bert_test')
    assert len(server.requests) == 2
    assert_same(bert, ref, padded_batch(seed=3))
    load_pretrained(f'gluonnlp:{name}', preset='tiny.bert_test')
    assert len(server.requests) == 2  # from the cache, verified, no request
    # an archive whose .params is not the zoo's SHA-1: refused
    server.routes[f'/repo/gluon/models/{stem}.zip'] = ('bytes', zip_bytes({
        stem + '.params': b'other bytes'}))
    shutil.rmtree(tmp_path / 'cache' / stem)
    os.remove(tmp_path / 'cache' / f'{stem}.zip')
    with pytest.raises(ChecksumError, match='SHA-1 mismatch'):
        load_pretrained(f'gluonnlp:{name}', preset='tiny.bert_test')


def test_unknown_gluonnlp_name(tmp_path, monkeypatch):
    monkeypatch.setenv('GLUON_BERT_HOME', str(tmp_path))
    with pytest.raises(PretrainedError, match='unknown GluonNLP BERT'):
        load_pretrained('gluonnlp:bert_12_768_12_nowhere')


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch):
    """A preset of the tiny GluonNLP model's shape, for the zoo-name test."""
    from gluon_bert import config as config_module
    monkeypatch.setitem(config_module.PRESETS, 'tiny.bert_test', dict(
        config_module.PRESETS['bert_12_768_12'], num_hiddens=H, ffn_num_hiddens=FFN,
        num_heads=HEADS, num_blks=BLOCKS, max_len=MAX_LEN, dropout=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield

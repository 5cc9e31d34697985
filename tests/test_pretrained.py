"""load_pretrained against a zip in the book's layout served from 127.0.0.1."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import zipfile

import mxnet as mx
import numpy as onp
import pytest
from mxnet import init

from data_fixtures import zip_bytes
from gluon_bert import load_pretrained
from gluon_bert.config import BERTConfig
from gluon_bert.model import BERTModel
from gluon_bert.pretrained import PretrainedError

# the module, not the function of the same name that gluon_bert.data re-exports
download = importlib.import_module('gluon_bert.data.download')

TOKENS = ['<unk>', '<pad>', '<mask>', '<cls>', '<sep>'] + [f'w{i}' for i in range(40)]


def book_zip(tmp_path, name='bert.tiny', preset='tiny', vocab=TOKENS, truncate=False):
    """A zip like the book's bert.small.zip: <name>/vocab.json + <name>/pretrained.params."""
    net = BERTModel(BERTConfig.from_preset(preset, vocab_size=len(vocab)))
    net.initialize(init.Xavier())
    params = str(tmp_path / f'{name}-{preset}.params')
    net.save_parameters(params)
    data = zip_bytes({f'{name}/vocab.json': json.dumps(vocab),
                      f'{name}/pretrained.params': open(params, 'rb').read()})
    return (data[:len(data) // 2] if truncate else data), net


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / 'cache'
    monkeypatch.setenv('GLUON_BERT_HOME', str(folder))
    monkeypatch.delenv('GLUON_BERT_OFFLINE', raising=False)
    yield folder
    for name in [n for n in download.DATA_HUB if n.startswith('test.')]:
        del download.DATA_HUB[name]


def _register(server, name, data, sha1=None, path=None):
    path = path or f'/{name}.zip'
    server.routes[path] = ('bytes', data)
    download.register(name, server.url + path, sha1 or hashlib.sha1(data).hexdigest(),
                      filename=f'{name}.zip', folder='bert.tiny')


def test_download_verify_cache_and_reload_without_request(server, cache, tmp_path):
    data, net = book_zip(tmp_path)
    _register(server, 'test.bert', data)
    bert, vocab = load_pretrained('test.bert', preset='tiny')
    assert vocab.idx_to_token == TOKENS and len(server.requests) == 1
    tokens = mx.nd.array(onp.random.RandomState(0).randint(0, len(TOKENS), (2, 7)))
    segments = mx.nd.zeros((2, 7))
    valid = mx.nd.array([7, 4])
    net_out, ours = net(tokens, segments, valid), bert(tokens, segments, valid)
    onp.testing.assert_allclose(ours[0].asnumpy(), net_out[0].asnumpy(), atol=1e-6)
    # second load: from the cache, no request at all
    load_pretrained('test.bert', preset='tiny')
    assert len(server.requests) == 1


def test_local_zip_and_folder(cache, tmp_path):
    data, _ = book_zip(tmp_path, name='bert.tiny')
    path = tmp_path / 'bert.tiny.zip'
    path.write_bytes(data)
    bert, vocab = load_pretrained(str(path), preset='tiny')
    assert len(vocab) == len(TOKENS)
    folder = tmp_path / 'unzipped'
    with zipfile.ZipFile(path) as zf:
        zf.extractall(folder)
    bert2, _ = load_pretrained(str(folder / 'bert.tiny'), preset='tiny')
    for (k, a), b in zip(bert._collect_params_with_prefix().items(),
                         bert2._collect_params_with_prefix().values()):
        assert onp.array_equal(a.data().asnumpy(), b.data().asnumpy()), k
    with pytest.raises(PretrainedError, match='model shape'):
        load_pretrained(str(folder / 'bert.tiny'))  # no preset, no config.json


def _no_valid_file_left(cache):
    for root, _, files in os.walk(cache):
        for f in files:
            assert not f.endswith(('.zip', '.params', 'vocab.json')), os.path.join(root, f)


def test_wrong_checksum_is_clear_and_leaves_nothing(server, cache, tmp_path):
    data, _ = book_zip(tmp_path)
    _register(server, 'test.bad', data, sha1='0' * 40)
    with pytest.raises(download.ChecksumError) as err:
        load_pretrained('test.bad', preset='tiny')
    msg = str(err.value)
    assert 'test.bad.zip' in msg and '0' * 40 in msg and hashlib.sha1(data).hexdigest() in msg
    _no_valid_file_left(cache)


def test_404_and_truncated_zip(server, cache, tmp_path):
    download.register('test.missing', server.url + '/nothing.zip', '1' * 40,
                      filename='test.missing.zip', folder='bert.tiny')
    with pytest.raises(download.DownloadError, match='404'):
        load_pretrained('test.missing', preset='tiny')
    truncated, _ = book_zip(tmp_path, truncate=True)
    # served with its own digest: the checksum passes, the archive itself is broken
    _register(server, 'test.truncated', truncated)
    with pytest.raises(download.ArchiveError, match='not a readable zip archive') as err:
        load_pretrained('test.truncated', preset='tiny')
    assert str(err.value).startswith(str(cache / 'test.truncated.zip'))
    for root, dirs, _ in os.walk(cache):
        assert 'bert.tiny' not in dirs, root  # no half-extracted folder that looks valid


def test_params_that_do_not_fit_the_preset(server, cache, tmp_path):
    data, _ = book_zip(tmp_path, preset='tiny')
    _register(server, 'test.shape', data)
    with pytest.raises(PretrainedError, match='does not fit'):
        load_pretrained('test.shape', preset='bert.small')


def test_local_zip_says_where_it_unpacked_and_is_checked_on_reuse(cache, tmp_path, caplog,
                                                                  monkeypatch):
    import logging
    caplog.set_level(logging.INFO, logger='gluon_bert')
    data, _ = book_zip(tmp_path, name='bert.tiny')
    path = tmp_path / 'bert.tiny.zip'
    path.write_bytes(data)
    load_pretrained(str(path), preset='tiny')
    target = cache / 'local' / f'bert.tiny-{hashlib.sha1(data).hexdigest()[:12]}'
    assert [r.getMessage() for r in caplog.records] == [f'unpacked {path} into {target}']
    assert sorted(os.listdir(cache / 'local')) == [target.name]  # no lock or temporary left
    caplog.clear()
    load_pretrained(str(path), preset='tiny')
    assert caplog.records == []  # the same zip again: its folder is reused, silently
    # a vocabulary changed in the cache is not trusted: the zip is unpacked again
    (target / 'bert.tiny' / 'vocab.json').write_text(json.dumps(TOKENS[:-1]))
    _, vocab = load_pretrained(str(path), preset='tiny')
    assert vocab.idx_to_token == TOKENS and len(caplog.records) == 2  # the warning, the info


def _run_of(tmp_path, task):
    """A run folder of this package with one checkpoint of `task`."""
    from gluon_bert.data import Vocab
    from gluon_bert.model import BERTClassifier
    from gluon_bert.ports.convert import mxnet_params
    from gluon_bert.train import save_checkpoint
    config = BERTConfig.from_preset('tiny', vocab_size=len(TOKENS))
    net = BERTModel(config) if task == 'pretrain' else BERTClassifier(config)
    net.initialize(init.Xavier())
    run = str(tmp_path / f'{task}-run')
    os.makedirs(run)
    (tmp_path / 'vocab.json').write_text(json.dumps(TOKENS))
    vocab = Vocab.load(str(tmp_path / 'vocab.json'))
    ckpt = save_checkpoint(run, 4, mxnet_params(net), config, vocab, dict(task=task, history=[]))
    return run, ckpt, net


def test_one_resolver_for_every_kind_of_name(cache, tmp_path):
    """Run folders, checkpoint folders, book-layout folders and zips, each resolved once."""
    from gluon_bert.pretrained import load_classifier, resolve
    run, ckpt, net = _run_of(tmp_path, 'pretrain')
    for name in (run, ckpt):  # a run folder means its newest checkpoint
        source = resolve(name)
        assert (source.kind, source.task) == ('checkpoint', 'pretrain')
        assert source.params == os.path.join(ckpt, 'model.params')
    bert, vocab = load_pretrained(run)
    assert len(vocab) == len(TOKENS)
    assert onp.array_equal(bert.encoder.pos_embedding.data().asnumpy(),
                           net.encoder.pos_embedding.data().asnumpy())
    data, _ = book_zip(tmp_path)
    path = tmp_path / 'bert.tiny.zip'
    path.write_bytes(data)
    assert resolve(str(path)).kind == 'book'
    # a fine-tuning run is a classifier, not a BERT to fine-tune, and the other way round
    ft_run, _, _ = _run_of(tmp_path, 'finetune')
    with pytest.raises(PretrainedError, match='is a finetune run'):
        load_pretrained(ft_run)
    with pytest.raises(PretrainedError, match='is not a fine-tuning run'):
        load_classifier(run)
    clf, _, config = load_classifier(ft_run)
    assert config.preset == 'tiny' and clf.output.weight.shape == (3, 32)
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(PretrainedError, match='neither a run or checkpoint folder'):
        resolve(str(empty))

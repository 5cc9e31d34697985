"""Hugging Face BERTs in our model: `transformers.BertForPreTraining` with random weights,
saved in its own formats by the test, gives the same sequence output, pooled output, MLM
and NSP logits as our BERTModel after import (max abs difference under 1e-4, float32,
dropout off), on a padded batch of mixed lengths, hybridized and not; our model exported
to that layout loads back into transformers; `hf:NAME` downloads through the verified
cache from a local server."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as onp
import pytest
import mxnet as mx

from data_fixtures import local_server

transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')
pytest.importorskip('safetensors')

from gluon_bert import load_pretrained  # noqa: E402
from gluon_bert.config import BERTConfig  # noqa: E402
from gluon_bert.data import bert_hub  # noqa: E402
from gluon_bert.data.download import ChecksumError  # noqa: E402
from gluon_bert.data.tokenization import WordPieceVocab  # noqa: E402
from gluon_bert.model import BERTModel  # noqa: E402
from gluon_bert.ports import convert, hf_bert  # noqa: E402
from gluon_bert.pretrained import PretrainedError  # noqa: E402

TOL = 1e-4
TOKENS = (['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'man', 'woman', 'is', 'the',
           'dog', 'runs', 'sleep', '##ing', '##s', '.', ',', 'in', 'park', 'outside']
          + [f'w{i}' for i in range(30)])


def hf_config(**overrides):
    # HF's BertModelTester sizes: hidden 32, 2 layers; 4 heads of 8
    settings = dict(vocab_size=len(TOKENS), hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=37, max_position_embeddings=40,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    settings.update(overrides)
    return transformers.BertConfig(**settings)


def make_hf_folder(folder, safetensors=True, seed=0, **overrides):
    """A random BertForPreTraining saved by transformers itself, with a vocab.txt."""
    torch.manual_seed(seed)
    model = transformers.BertForPreTraining(hf_config(**overrides)).eval()
    with torch.no_grad():  # HF zero-initialises biases and LayerNorm: make them count
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder), safe_serialization=safetensors)
    (folder / 'vocab.txt').write_text('\n'.join(TOKENS) + '\n', encoding='utf-8')
    return model


def padded_batch(seed=1, B=4, L=12, P=3):
    rs = onp.random.RandomState(seed)
    valid = onp.array([L] + list(rs.randint(3, L, B - 1)))
    tokens = rs.randint(5, len(TOKENS), (B, L))
    tokens[:, 0] = 2  # [CLS]
    segments = (onp.arange(L)[None] >= rs.randint(1, 3, (B, 1))).astype('int32')
    pad = onp.arange(L)[None] >= valid[:, None]
    tokens[pad], segments[pad] = 0, 0
    positions = onp.stack([rs.choice(int(n), P, replace=False) for n in valid])
    return tokens.astype('int32'), segments, valid.astype('float32'), positions.astype('int32')


def hf_outputs(model, tokens, segments, valid, positions):
    mask = torch.tensor((onp.arange(tokens.shape[1])[None] < valid[:, None]).astype('int64'))
    args = dict(attention_mask=mask, token_type_ids=torch.tensor(segments, dtype=torch.long))
    with torch.no_grad():
        heads = model(torch.tensor(tokens, dtype=torch.long), **args)
        base = model.bert(torch.tensor(tokens, dtype=torch.long), **args)
    mlm = heads.prediction_logits.numpy()[onp.arange(len(tokens))[:, None], positions]
    return (base.last_hidden_state.numpy(), base.pooler_output.numpy(), mlm,
            heads.seq_relationship_logits.numpy())


def our_outputs(bert, tokens, segments, valid, positions):
    args = [mx.nd.array(a, dtype=a.dtype) for a in (tokens, segments, valid, positions)]
    encoded, mlm, nsp = bert(*args)
    pooled = bert.hidden(encoded[:, 0, :])  # the book's hidden layer is BERT's pooler
    return encoded.asnumpy(), pooled.asnumpy(), mlm.asnumpy(), nsp.asnumpy()


def assert_same(ours, ref, valid):
    names = ('sequence', 'pooled', 'mlm', 'nsp')
    diffs = {n: float(onp.abs(a - b).max()) for n, a, b in zip(names, ours, ref)}
    # HF adds a large negative number to the scores of padded keys, we give them weight 0
    # (softmax with lengths): the same weights for every query. The sequence output is
    # compared at the real positions, which is what the contract needs; padded positions
    # come out equal too here, checked separately below.
    diffs['sequence'] = max(float(onp.abs(ours[0][b, :int(n)] - ref[0][b, :int(n)]).max())
                            for b, n in enumerate(valid))
    print('max abs diff vs transformers:', diffs)
    assert max(diffs.values()) < TOL, diffs
    return float(onp.abs(ours[0] - ref[0]).max())


@pytest.mark.parametrize('fmt', ['safetensors', 'pytorch_model.bin'])
def test_import_matches_transformers(tmp_path, hybridize, fmt):
    model = make_hf_folder(tmp_path, safetensors=fmt == 'safetensors')
    bert, vocab = load_pretrained(str(tmp_path))
    assert isinstance(vocab, WordPieceVocab) and vocab.idx_to_token == TOKENS
    c = bert.config
    assert (c.activation, c.embedding_norm, c.layer_norm_eps, c.tie_mlm_decoder) == (
        'gelu', True, 1e-12, True)
    assert (c.num_hiddens, c.num_heads, c.num_blks, c.ffn_num_hiddens, c.max_len) == (
        32, 4, 2, 37, 40)
    if hybridize:
        bert.hybridize(static_alloc=True, static_shape=True)
    batch = padded_batch()
    padded_diff = assert_same(our_outputs(bert, *batch), hf_outputs(model, *batch), batch[2])
    assert padded_diff < TOL  # padded positions agree as well (see assert_same)


def test_untied_decoder_and_relu(tmp_path):
    model = make_hf_folder(tmp_path, tie_word_embeddings=False, hidden_act='relu')
    bert, _ = load_pretrained(str(tmp_path))
    assert not bert.config.tie_mlm_decoder and bert.config.activation == 'relu'
    batch = padded_batch(seed=3)
    assert_same(our_outputs(bert, *batch), hf_outputs(model, *batch), batch[2])


def test_export_loads_into_transformers(tmp_path):
    config = BERTConfig.from_preset('tiny.bert', vocab_size=len(TOKENS), dropout=0.0)
    net = BERTModel(config)
    net.initialize(mx.init.Normal(0.3))
    vocab = WordPieceVocab(TOKENS)
    hf_bert.save_hf_folder(str(tmp_path / 'out'), convert.mxnet_params(net), config, vocab)
    model = transformers.BertForPreTraining.from_pretrained(str(tmp_path / 'out')).eval()
    batch = padded_batch(seed=4, L=10)
    assert_same(our_outputs(net, *batch), hf_outputs(model, *batch), batch[2])
    # and back: the same parameters, bit for bit
    again, vocab2 = load_pretrained(str(tmp_path / 'out'))
    assert vocab2 == vocab
    for name, array in convert.mxnet_params(net).items():
        assert onp.array_equal(array, again._collect_params_with_prefix()[name].data().asnumpy())


def test_a_bertmodel_checkpoint_without_heads_gets_fresh_ones(tmp_path, caplog):
    torch.manual_seed(0)
    base = transformers.BertModel(hf_config(), add_pooling_layer=False).eval()
    base.save_pretrained(str(tmp_path))
    (tmp_path / 'vocab.txt').write_text('\n'.join(TOKENS) + '\n', encoding='utf-8')
    bert, _ = load_pretrained(str(tmp_path))
    assert 'fresh initialisation' in caplog.text and 'hidden' in caplog.text
    tokens, segments, valid, positions = padded_batch(seed=5)
    with torch.no_grad():
        ref = base(torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor((tokens != 0).astype('int64')),
                   token_type_ids=torch.tensor(segments, dtype=torch.long)).last_hidden_state
    ours = our_outputs(bert, tokens, segments, valid, positions)[0]
    assert float(onp.abs(ours - ref.numpy()).max()) < TOL


def test_bad_hf_folders_are_one_error(tmp_path):
    make_hf_folder(tmp_path)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    (tmp_path / 'config.json').write_text(json.dumps(dict(cfg, hidden_act='gelu_new')))
    with pytest.raises(PretrainedError, match="hidden_act 'gelu_new' is not supported"):
        load_pretrained(str(tmp_path))
    (tmp_path / 'config.json').write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(PretrainedError, match=r'missing 16: bert\.encoder\.layer\.2\.'):
        load_pretrained(str(tmp_path))
    (tmp_path / 'config.json').write_text(json.dumps(cfg))
    (tmp_path / 'vocab.txt').write_text('\n'.join(TOKENS[:-1]) + '\n')
    with pytest.raises(PretrainedError, match='has 49 tokens, the model 50'):
        load_pretrained(str(tmp_path))
    (tmp_path / 'vocab.txt').write_text('\n'.join(TOKENS) + '\n')
    (tmp_path / 'model.safetensors').write_bytes(b'not safetensors')
    with pytest.raises(PretrainedError, match='not a readable safetensors file'):
        load_pretrained(str(tmp_path))


# -- hf:NAME through the verified cache --------------------------------------------------------

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local server in the hub's URL layout, HF_ENDPOINT pointing at it, a fresh cache."""
    monkeypatch.setenv('GLUON_BERT_HOME', str(tmp_path / 'cache'))
    monkeypatch.delenv('GLUON_BERT_OFFLINE', raising=False)
    make_hf_folder(tmp_path / 'src')
    with local_server() as server:
        monkeypatch.setenv('HF_ENDPOINT', server.url)
        files = {}
        for name in ('config.json', 'vocab.txt', 'model.safetensors'):
            data = (tmp_path / 'src' / name).read_bytes()
            server.routes[f'/test-org/bert-tiny/resolve/main/{name}'] = ('bytes', data)
            files[name] = hashlib.sha1(data).hexdigest()
        yield server, files
    bert_hub.HF_SHA1.pop('test-org/bert-tiny', None)


def test_hf_name_downloads_once_and_checks_sha1(hub, tmp_path):
    server, sha1s = hub
    bert_hub.register_hf('test-org/bert-tiny', sha1s)
    bert, vocab = load_pretrained('hf:test-org/bert-tiny')
    assert vocab.idx_to_token == TOKENS and bert.config.num_blks == 2
    fetched = {p for p, _ in server.requests}
    assert '/test-org/bert-tiny/resolve/main/model.safetensors' in fetched
    assert '/test-org/bert-tiny/resolve/main/pytorch_model.bin' not in fetched
    count = len(server.requests)
    load_pretrained('hf:test-org/bert-tiny')  # from the cache: every file verified, no request
    assert len(server.requests) == count
    # a server that serves other bytes than the pinned SHA-1: refused, nothing kept
    folder = tmp_path / 'cache' / 'hf' / 'test-org--bert-tiny'
    os.remove(folder / 'model.safetensors')
    server.routes['/test-org/bert-tiny/resolve/main/model.safetensors'] = ('bytes', b'x' * 99)
    with pytest.raises(ChecksumError, match='SHA-1 mismatch'):
        load_pretrained('hf:test-org/bert-tiny')
    assert not (folder / 'model.safetensors').exists()


def test_hf_name_without_pinned_sha1_records_it(hub, tmp_path, caplog):
    server, sha1s = hub
    load_pretrained('hf:test-org/bert-tiny')
    assert 'no SHA-1 pinned' in caplog.text
    folder = tmp_path / 'cache' / 'hf' / 'test-org--bert-tiny'
    recorded = json.loads((folder / '.gluon_bert_sha1.json').read_text())
    assert recorded == dict(sha1s, **{'tokenizer_config.json': None})  # None: not on the hub
    # a cached file that changed later is noticed and fetched again from the hub
    (folder / 'vocab.txt').write_text('[PAD]\n')
    _, vocab = load_pretrained('hf:test-org/bert-tiny')
    assert vocab.idx_to_token == TOKENS

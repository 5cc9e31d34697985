"""BatchLoader: exact epochs, resume, trimming to the longest sequence, length buckets."""
import numpy as np
import pytest

from gluon_bert.data import (BatchLoader, RESERVED_TOKENS, SNLIBERTDataset,
                             Vocab, read_snli, sample_dir)


def _arrays(n=1000, max_len=64, seed=0):
    rng = np.random.default_rng(seed)
    valid = rng.integers(3, max_len + 1, n)
    tokens = np.where(np.arange(max_len) < valid[:, None], rng.integers(5, 50, (n, max_len)), 0)
    return {'tokens': tokens.astype(np.int32), 'segments': np.zeros((n, max_len), np.int32),
            'valid_lens': valid.astype(np.float32), 'labels': np.arange(n, dtype=np.int32)}


@pytest.mark.parametrize('bucket', [False, True])
@pytest.mark.parametrize('drop_last', [False, True])
def test_every_example_once_per_epoch(bucket, drop_last):
    arrays = _arrays(1003)
    loader = BatchLoader(arrays, 32, seed=3, bucket=bucket, drop_last=drop_last,
                         pad_to='longest', bucket_batches=5)
    seen = np.concatenate([b['labels'] for b in loader])
    assert len(list(iter(loader))) == len(loader)
    if drop_last:
        assert len(seen) == 1003 // 32 * 32 and len(set(seen.tolist())) == len(seen)
    else:
        assert sorted(seen.tolist()) == list(range(1003))


def test_order_is_a_function_of_seed_and_epoch():
    arrays = _arrays(200)
    a, b = BatchLoader(arrays, 16, seed=1), BatchLoader(arrays, 16, seed=1)
    first = [x['labels'] for x in a]
    second = [x['labels'] for x in a]  # the next epoch: another order
    assert not all(np.array_equal(x, y) for x, y in zip(first, second))
    b.set_epoch(1)  # resume at epoch 1
    assert all(np.array_equal(x['labels'], y) for x, y in zip(b, second))
    ordered = np.concatenate([x['labels'] for x in BatchLoader(arrays, 16, shuffle=False)])
    assert ordered.tolist() == list(range(200))


def test_pad_to_longest_and_buckets_trim_padding():
    arrays = _arrays(2000)
    full = BatchLoader(arrays, 64, seed=0)
    trimmed = BatchLoader(arrays, 64, seed=0, pad_to='longest')
    bucketed = BatchLoader(arrays, 64, seed=0, pad_to='longest', bucket=True)
    for batch in trimmed:
        width = batch['tokens'].shape[1]
        assert width % 8 == 0 and width >= batch['valid_lens'].max()
        assert width - batch['valid_lens'].max() < 8 and batch['segments'].shape[1] == width
        assert batch['labels'].shape == (len(batch['valid_lens']),)
    cells = lambda loader: sum(b['tokens'].size for b in loader)  # noqa: E731
    assert cells(bucketed) < 0.7 * cells(full)
    for batch in full:
        assert batch['tokens'].shape[1] == 64
    with pytest.raises(ValueError, match='same first dimension'):
        BatchLoader({'tokens': np.zeros((3, 4)), 'valid_lens': np.zeros(2)}, 2)
    with pytest.raises(ValueError, match='pad_to'):
        BatchLoader(arrays, 2, pad_to='shortest')


def test_bucketed_and_max_len_batches_give_the_same_model_outputs():
    import mxnet as mx
    from gluon_bert import model
    from gluon_bert.config import BERTConfig
    pairs = read_snli(sample_dir('snli'), 'dev')
    pairs = tuple(x[:96] for x in pairs)
    vocab = Vocab([s.lower().split() for s in pairs[0] + pairs[1]],
                  reserved_tokens=RESERVED_TOKENS)
    ds = SNLIBERTDataset(pairs, 64, vocab)
    net = model.BERTModel(BERTConfig.from_preset('tiny', vocab_size=len(vocab)))
    net.initialize(mx.init.Normal(0.02))
    nd = mx.nd

    def run(batch):
        positions = np.tile(np.arange(3, dtype=np.int32), (len(batch['labels']), 1))
        enc, mlm, nsp = net(nd.array(batch['tokens']), nd.array(batch['segments']),
                            nd.array(batch['valid_lens']), nd.array(positions))
        return enc.asnumpy(), mlm.asnumpy(), nsp.asnumpy()

    reference = {}
    idx_key = dict(ds.arrays, index=np.arange(len(ds), dtype=np.int32))
    for batch in BatchLoader(idx_key, 32, shuffle=False):
        enc, mlm, nsp = run(batch)
        for j, i in enumerate(batch['index']):
            reference[int(i)] = (enc[j], mlm[j], nsp[j])
    checked = 0
    for batch in BatchLoader(idx_key, 32, seed=5, pad_to='longest', bucket=True,
                             bucket_batches=2):
        assert batch['tokens'].shape[1] < 64
        enc, mlm, nsp = run(batch)
        for j, i in enumerate(batch['index']):
            v = int(batch['valid_lens'][j])
            ref_enc, ref_mlm, ref_nsp = reference[int(i)]
            np.testing.assert_allclose(enc[j, :v], ref_enc[:v], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(mlm[j], ref_mlm, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(nsp[j], ref_nsp, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == len(ds)


def test_tuple_keys_give_the_books_loop_shapes():
    arrays = {'tokens': np.arange(12).reshape(6, 2), 'segments': np.zeros((6, 2)),
              'valid_lens': np.full(6, 2.0), 'labels': np.arange(6)}
    loader = BatchLoader(arrays, 4, shuffle=False,
                         tuple_keys=(('tokens', 'segments', 'valid_lens'), 'labels'))
    (tokens, segments, valid_lens), y = next(iter(loader))
    assert tokens.shape == (4, 2) and valid_lens.shape == (4,)
    np.testing.assert_array_equal(y, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"tuple_keys \['mlm_Y'\] are not among"):
        BatchLoader(arrays, 4, tuple_keys=('tokens', 'mlm_Y'))

"""WikiText pretraining examples: book parity, masking statistics, NSP balance, seeds."""
import collections
import random

import numpy as np
import pytest

from gluon_bert.data import (RESERVED_TOKENS, Vocab, WikiTextDataset, get_mlm_data_from_tokens,
                             load_data_wiki, read_wiki, replace_mlm_tokens, sample_dir)
from gluon_bert.data.wikitext import get_nsp_data_from_paragraph
from gluon_bert.errors import DataError


@pytest.fixture(scope='module')
def paragraphs():
    return read_wiki(sample_dir('wikitext-2'), random.Random(0))[:300]


def test_read_wiki_rules(tmp_path):
    (tmp_path / 'wiki.train.tokens').write_text(
        ' \n = Title = \n \n One sentence only . \n A b . C D e . F \n')
    paragraphs = read_wiki(str(tmp_path), random.Random(0))
    # Lower-cased, split on ' . '; a heading has no ' . '. As in the book, a line
    # ending in ' . ' splits in two, so a one-sentence line counts (and keeps its '.').
    assert sorted(paragraphs) == [['a b', 'c d e', 'f'], ['one sentence only .']]
    with pytest.raises(FileNotFoundError, match='wiki.train.tokens not found') as err:
        read_wiki(str(tmp_path / 'nowhere'))
    assert isinstance(err.value, DataError) and str(tmp_path / 'nowhere') in str(err.value)
    # the paragraphs remember their file, for WikiTextDataset's messages
    assert paragraphs.source == str(tmp_path / 'wiki.train.tokens')


def test_identical_to_book_for_same_seed_and_vocab(paragraphs):
    from d2l import mxnet as d2l
    random.seed(7)
    book = d2l._WikiTextDataset(paragraphs, 64)
    # d2l 1.0.3 sorts its vocabulary; give ours the same order.
    vocab = Vocab([s.split() for p in paragraphs for s in p], min_freq=5,
                  reserved_tokens=RESERVED_TOKENS, order='sorted')
    assert vocab.idx_to_token == book.vocab.idx_to_token
    ours = WikiTextDataset(paragraphs, 64, vocab=vocab, seed=7)
    assert len(ours) == len(book)
    names = ['all_token_ids', 'all_segments', 'valid_lens', 'all_pred_positions',
             'all_mlm_weights', 'all_mlm_labels', 'nsp_labels']
    for name in names:
        expected = np.stack([np.asarray(x.asnumpy() if hasattr(x, 'asnumpy') else x)
                             for x in getattr(book, name)])
        np.testing.assert_array_equal(getattr(ours, name), expected.astype(
            getattr(ours, name).dtype), err_msg=name)


def test_shapes_dtypes_segments_valid_lens(paragraphs):
    ds = WikiTextDataset(paragraphs, 64)
    arrays = ds.arrays
    n = len(ds)
    assert arrays['tokens'].shape == (n, 64) and arrays['pred_positions'].shape == (n, 10)
    assert {k: v.dtype.name for k, v in arrays.items()} == {
        'tokens': 'int32', 'segments': 'int32', 'valid_lens': 'float32',
        'pred_positions': 'int32', 'mlm_weights': 'float32', 'mlm_labels': 'int32',
        'nsp_labels': 'int32'}
    vocab = ds.vocab
    for i in range(0, n, 37):
        tokens, segments, valid_len, positions, weights, labels, _ = ds[i]
        v = int(valid_len)
        seps = np.flatnonzero(tokens[:v] == vocab['<sep>'])
        assert tokens[0] == vocab['<cls>'] and len(seps) == 2 and seps[1] == v - 1
        assert (segments[:seps[0] + 1] == 0).all() and (segments[seps[0] + 1:v] == 1).all()
        assert (segments[v:] == 0).all() and (tokens[v:] == vocab['<pad>']).all()
        k = int(weights.sum())
        assert k == max(1, round(v * 0.15)) and (weights[k:] == 0).all()
        assert (np.diff(positions[:k]) > 0).all() and (positions[:k] < v).all()


def test_masking_statistics():
    rng = random.Random(1)
    vocab = Vocab([[f'w{i}' for i in range(500)]], reserved_tokens=RESERVED_TOKENS)
    tokens = ['<cls>'] + [f'w{i}' for i in range(30)] + ['<sep>'] + \
        [f'w{i}' for i in range(30, 58)] + ['<sep>']
    counts = collections.Counter()
    predicted = 0
    for _ in range(4000):
        inputs, pairs = replace_mlm_tokens(tokens, list(range(1, 31)) + list(range(32, 60)),
                                           round(len(tokens) * 0.15), vocab, rng)
        predicted += len(pairs)
        for pos, label in pairs:
            assert tokens[pos] not in ('<cls>', '<sep>') and label == tokens[pos]
            got = inputs[pos]
            counts['mask' if got == '<mask>' else 'same' if got == label else 'random'] += 1
    total = sum(counts.values())
    assert predicted / (4000 * len(tokens)) == pytest.approx(0.15, abs=0.005)
    assert counts['mask'] / total == pytest.approx(0.8, abs=0.01)
    # A random replacement can draw the token itself (1 in ~560): still ~10% / 10%.
    assert counts['same'] / total == pytest.approx(0.1, abs=0.01)
    assert counts['random'] / total == pytest.approx(0.1, abs=0.01)
    ids, positions, labels = get_mlm_data_from_tokens(tokens, vocab, rng)
    assert 0 not in positions and 31 not in positions and 59 not in positions


def test_nsp_balance_and_pairs(paragraphs):
    rng = random.Random(3)
    tokenized = [[s.split() for s in p] for p in paragraphs]
    examples = [ex for p in tokenized
                for ex in get_nsp_data_from_paragraph(p, tokenized, None, 64, rng)]
    share = np.mean([is_next for _, _, is_next in examples])
    assert len(examples) > 500 and share == pytest.approx(0.5, abs=0.05)
    assert all(len(tokens) <= 64 for tokens, _, _ in examples)


def test_seed_reproduces_and_differs(paragraphs):
    a, b, c = (WikiTextDataset(paragraphs[:100], 32, seed=s) for s in (5, 5, 6))
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
    assert not np.array_equal(a.arrays['tokens'], c.arrays['tokens'])
    it1, v1 = load_data_wiki(16, 32, seed=2)
    it2, v2 = load_data_wiki(16, 32, seed=2)
    assert v1 == v2 and 300 <= len(v1) <= 2000  # min_freq=5 vocabulary of the sample
    batches = 0
    # the book's loop: for tokens_X, segments_X, valid_lens_x, pred_positions_X,
    #                      mlm_weights_X, mlm_Y, nsp_y in train_iter
    for b1, b2 in zip(it1, it2):
        tokens_X, segments_X, valid_lens_x, pred_positions_X, mlm_weights_X, mlm_Y, nsp_y = b1
        B = len(nsp_y)  # 16, the last batch fewer
        assert tokens_X.shape == segments_X.shape == (B, 32) and valid_lens_x.shape == (B,)
        assert pred_positions_X.shape == mlm_weights_X.shape == mlm_Y.shape
        assert all(np.array_equal(x1, x2) for x1, x2 in zip(b1, b2))
        batches += 1
    assert batches == len(it1) > 1


@pytest.mark.integration
def test_real_wikitext2_matches_the_hub_digests_and_the_books_counts():
    import gzip
    import hashlib
    import os
    from gluon_bert.data import DATA_HUB
    folder = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'wikitext-2')
    if not os.path.isdir(folder):
        pytest.skip('../shared/data/wikitext-2 not present')
    # the SHA-1s that downloads are checked against are those of the real files
    for name, digest in DATA_HUB['wikitext-2'].files.items():
        with gzip.open(os.path.join(folder, name + '.gz'), 'rb') as f:
            assert hashlib.sha1(f.read()).hexdigest() == digest, name
    paragraphs = read_wiki(folder, random.Random(0))
    assert len(paragraphs) == 15496  # lines with at least two ' . ' parts, as the book counts

"""SNLI reading (official formats, bad rows) and SNLIBERTDataset (book parity, truncation)."""
import gzip
import itertools
import json
import os

import numpy as np
import pytest

from data_fixtures import book_snli_bert_arrays, snli_row, write_snli_txt
from gluon_bert.data import (RESERVED_TOKENS, SNLIBERTDataset, SNLIFormatError, Vocab,
                             read_snli, sample_dir)
from gluon_bert.data.snli import truncate_lengths

P1 = '( ( Two ( young boys ) ) ( ( are ( playing soccer ) ) . ) )'
H1 = '( ( Kids ) ( ( are playing ) . ) )'


def _rows():
    return [snli_row('entailment', P1, H1, 'a'),
            snli_row('contradiction', P1, '( Nobody ( is ( playing . ) ) )', 'b'),
            snli_row('-', P1, '( ( The boys ) ( ( are friends ) . ) )', 'c'),
            snli_row('neutral', P1, '( ( The boys ) ( ( are brothers ) . ) )', 'd')]


def test_official_txt_text_from_binary_parse(tmp_path):
    write_snli_txt(tmp_path / 'snli_1.0_train.txt', _rows())
    report = {}
    premises, hypotheses, labels = read_snli(str(tmp_path), 'train', report=report)
    assert premises == ['Two young boys are playing soccer .'] * 3
    assert hypotheses[0] == 'Kids are playing .'
    assert labels == [0, 1, 2]  # the '-' row is the only one dropped
    assert report['no_gold_label'] == 1 and report['kept'] == 3 and report['skipped'] == 0


def test_jsonl_and_gz_and_d2l_compat(tmp_path):
    rows = [{'gold_label': 'neutral', 'sentence1_binary_parse': P1,
             'sentence2_binary_parse': H1, 'sentence1': 'x', 'sentence2': 'y'},
            {'gold_label': '-', 'sentence1_binary_parse': P1, 'sentence2_binary_parse': H1}]
    with gzip.open(tmp_path / 'snli_1.0_dev.jsonl.gz', 'wt', encoding='utf-8') as f:
        f.write('\n'.join(json.dumps(r) for r in rows) + '\n')
    assert read_snli(str(tmp_path), 'dev') == (['Two young boys are playing soccer .'],
                                               ['Kids are playing .'], [2])
    compat = tmp_path / 'snli_1.0_test.d2l_compat.txt'
    compat.write_text('gold_label\tsentence1_tokens\tsentence2_tokens\tsentence1\tsentence2\n'
                      'contradiction\tA dog runs .\tA cat sleeps .\tA dog runs.\tA cat sleeps.\n')
    assert read_snli(str(compat)) == (['A dog runs .'], ['A cat sleeps .'], [1])


@pytest.mark.parametrize('case', ['columns', 'label', 'utf8', 'json'])
def test_bad_rows_name_file_and_line(tmp_path, case):
    rows = _rows()
    path = tmp_path / ('snli_1.0_train.jsonl' if case == 'json' else 'snli_1.0_train.txt')
    if case == 'columns':
        rows[1] = rows[1][:9]
    elif case == 'label':
        rows[1][0] = 'entails'
    if case == 'json':
        path.write_text(json.dumps({'gold_label': 'neutral', 'sentence1_binary_parse': P1,
                                    'sentence2_binary_parse': H1}) + '\n{not json\n')
        bad_line = 2
    else:
        write_snli_txt(path, rows)
        bad_line = 3  # header is line 1
        if case == 'utf8':
            data = path.read_bytes().split(b'\n')
            data[2] = data[2].replace(b'Nobody', b'Nob\xffdy')
            path.write_bytes(b'\n'.join(data))
    with pytest.raises(SNLIFormatError) as err:
        read_snli(str(path))
    msg = str(err.value)
    assert str(path) in msg and f'line {bad_line}' in msg
    assert {'columns': 'columns', 'label': "'entails'", 'utf8': 'UTF-8',
            'json': 'JSON'}[case] in msg
    # With on_error='skip' the row is skipped and counted, the rest is kept.
    report = {}
    out = read_snli(str(path), on_error='skip', report=report)
    assert report['skipped'] == 1 and f'line {bad_line}' in report['errors'][0]
    assert len(out[2]) == (1 if case == 'json' else 2)


def test_empty_file_and_missing_split(tmp_path):
    (tmp_path / 'snli_1.0_train.txt').write_text('')
    with pytest.raises(SNLIFormatError, match=r'snli_1.0_train.txt, line 1: file is empty'):
        read_snli(str(tmp_path), 'train')
    with pytest.raises(FileNotFoundError, match=r"no 'dev' split of SNLI in .*snli_1.0_dev.txt"):
        read_snli(str(tmp_path), 'dev')
    with pytest.raises(ValueError, match='split must be one of'):
        read_snli(str(tmp_path), 'validation')
    write_snli_txt(tmp_path / 'snli_1.0_dev.txt', [snli_row('-', '( a b )', '( c d )')])
    with pytest.raises(SNLIFormatError, match=r'snli_1.0_dev.txt: no labelled pairs in 2 '
                                              r'lines \(1 without a gold label'):
        read_snli(str(tmp_path), 'dev')
    (tmp_path / 'snli_1.0_test.txt').write_text('premise\thypothesis\n')
    with pytest.raises(SNLIFormatError, match='no gold_label column'):
        read_snli(str(tmp_path), 'test')


def test_truncation_closed_form_equals_book_loop():
    def book(p, h, max_len):
        while p + h > max_len - 3:
            if p > h:
                p -= 1
            else:
                h -= 1
        return p, h
    grid = list(itertools.product(range(40), range(40)))
    p, h = np.array(grid).T
    for max_len in (3, 4, 5, 8, 17, 32):
        a, b = truncate_lengths(p, h, max_len)
        assert list(zip(a.tolist(), b.tolist())) == [book(x, y, max_len) for x, y in grid]


def test_ratio_truncation_keeps_proportions():
    a, b = truncate_lengths([30, 2, 10, 0, 5], [10, 30, 10, 40, 1], 23, 'ratio')  # B=20
    assert a.tolist() == [15, 1, 10, 0, 5] and b.tolist() == [5, 19, 10, 20, 1]
    p, h = np.array(list(itertools.product(range(50), range(50)))).T
    a, b = truncate_lengths(p, h, 16, 'ratio')
    assert (a + b <= 13).all() and (a <= p).all() and (b <= h).all()
    assert ((a >= 1) | (p == 0)).all() and ((b >= 1) | (h == 0)).all()
    with pytest.raises(ValueError, match='truncation'):
        truncate_lengths([1], [1], 8, 'random')


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ['a', 'dog', 'Runs', 'in', 'the', 'PARK', '.', 'cat', 'unseen-word', 'sleeps']
    sent = lambda k: ' '.join(rng.choice(words, k))  # noqa: E731
    return ([sent(rng.integers(1, 40)) for _ in range(n)],
            [sent(rng.integers(0, 30)) for _ in range(n)], rng.integers(0, 3, n).tolist())


@pytest.mark.parametrize('max_len', [8, 16, 64])
def test_identical_to_book_pipeline(max_len):
    data = _pairs(300)
    vocab = Vocab([s.lower().split() for s in data[0]], reserved_tokens=RESERVED_TOKENS)
    ours = SNLIBERTDataset(data, max_len, vocab, num_workers=0)
    ref = book_snli_bert_arrays(data, max_len, vocab, processes=4 if max_len == 16 else 0)
    np.testing.assert_array_equal(ours.all_token_ids, ref[0])
    np.testing.assert_array_equal(ours.all_segments, ref[1])
    np.testing.assert_array_equal(ours.valid_lens, ref[2])
    np.testing.assert_array_equal(ours.labels, ref[3])
    assert ours.all_token_ids.dtype == np.int32 and ours.valid_lens.dtype == np.float32
    (tokens, segments, valid_len), label = ours[5]
    assert tokens.shape == (max_len,) and int(valid_len) == ref[2][5] and label == ref[3][5]


def test_pool_paths_agree_and_work_after_mxnet(monkeypatch):
    import mxnet as mx
    (mx.nd.ones((2, 2)) * 2).wait_to_read()  # MXNet's engine is running
    data = _pairs(1200, seed=1)
    vocab = Vocab([s.lower().split() for s in data[0]], reserved_tokens=RESERVED_TOKENS)
    monkeypatch.setattr(SNLIBERTDataset, 'MIN_PAIRS_FOR_POOL', 100)
    ref = SNLIBERTDataset(data, 24, vocab, num_workers=0)
    for method in ('fork', 'forkserver'):
        ds = SNLIBERTDataset(data, 24, vocab, num_workers=2, start_method=method)
        np.testing.assert_array_equal(ds.all_token_ids, ref.all_token_ids)
        np.testing.assert_array_equal(ds.all_segments, ref.all_segments)


def test_layout_segments_and_ratio_dataset():
    vocab = Vocab([['a', 'b', 'c', 'd']], reserved_tokens=RESERVED_TOKENS)
    ds = SNLIBERTDataset((['A b c d a b', 'a'], ['c d', 'b c'], [0, 2]), 8, vocab,
                         truncation='ratio')
    tokens = [vocab.to_tokens(row[:int(n)]) for row, n in zip(ds.all_token_ids, ds.valid_lens)]
    assert tokens[0] == ['<cls>', 'a', 'b', 'c', 'd', '<sep>', 'c', '<sep>']
    assert tokens[1] == ['<cls>', 'a', '<sep>', 'b', 'c', '<sep>']
    assert ds.all_segments[0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert ds.all_segments[1].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert ds.all_token_ids[1, 6:].tolist() == [vocab['<pad>']] * 2
    assert set(ds.arrays) == {'tokens', 'segments', 'valid_lens', 'labels'}
    with pytest.raises(ValueError, match='special token'):
        SNLIBERTDataset((['a'], ['b'], [0]), 8, Vocab([['a']]))


def test_shipped_sample_reads():
    premises, hypotheses, labels = read_snli(sample_dir('snli'), 'train')
    assert len(labels) > 2500 and set(labels) == {0, 1, 2}


@pytest.mark.integration
def test_real_snli_dev():
    folder = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'snli')
    if not os.path.isdir(folder):
        pytest.skip('../shared/data/snli not present')
    counts = {}
    for name in ('snli_1.0_dev.d2l_compat.txt.gz', 'snli_1.0_dev.gold_pairs.jsonl.gz'):
        _, _, labels = read_snli(os.path.join(folder, name))
        counts[name] = np.bincount(labels).tolist()
    assert all(c == [3329, 3278, 3235] for c in counts.values()), counts


def test_typed_text_is_split_as_the_parses_are():
    from gluon_bert.data import snli
    assert snli.tokenize_like_snli("A middle-aged man's shaving, which doesn't look odd.") == \
        "A middle-aged man 's shaving , which does n't look odd ."

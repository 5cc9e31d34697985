"""Vocab: the book's order, d2l 1.0.3's sorted order, vocab.json round trip."""
import json

import pytest

from gluon_bert.data import RESERVED_TOKENS, Vocab, tokenize

LINES = ['the cat sat on the mat .', 'The dog sat .', 'a b c a b a']


def test_tokenize():
    assert tokenize(['a  b\tc']) == [['a', 'b', 'c']]
    assert tokenize(['ab'], 'char') == [['a', 'b']]
    with pytest.raises(ValueError, match='unknown token type'):
        tokenize(['a'], 'bpe')


def test_frequency_order_as_the_books_checkpoints():
    vocab = Vocab(tokenize(LINES), min_freq=2, reserved_tokens=RESERVED_TOKENS)
    # '<unk>', reserved, then by count (ties: first appearance): the 2, sat 2, . 2, a 3...
    assert vocab.idx_to_token == ['<unk>', '<pad>', '<mask>', '<cls>', '<sep>', 'a', 'the',
                                  'sat', '.', 'b']
    assert vocab.unk == 0 and vocab['zebra'] == 0 and vocab[['the', 'zebra']] == [6, 0]
    assert vocab.to_tokens([6, 7]) == ['the', 'sat'] and vocab.to_tokens(5) == 'a'


def test_sorted_order_identical_to_d2l():
    from d2l import mxnet as d2l
    tokens = tokenize(LINES)
    for min_freq in (0, 2, 5):
        ours = Vocab(tokens, min_freq, RESERVED_TOKENS, order='sorted')
        book = d2l.Vocab(tokens, min_freq, RESERVED_TOKENS)
        assert ours.idx_to_token == book.idx_to_token
        assert ours.token_to_idx == book.token_to_idx and ours.unk == book.unk
        assert ours[['cat', 'nope', '.']] == book[['cat', 'nope', '.']]


def test_save_load_vocab_json(tmp_path):
    vocab = Vocab(tokenize(LINES), reserved_tokens=RESERVED_TOKENS)
    path = vocab.save(str(tmp_path))
    assert json.load(open(path)) == vocab.idx_to_token  # the checkpoints' format
    assert Vocab.load(str(tmp_path)) == vocab and Vocab.load(path)['cat'] == vocab['cat']
    (tmp_path / 'bad.json').write_text('{"a": 1}')
    with pytest.raises(ValueError, match='bad.json.*JSON list'):
        Vocab.load(str(tmp_path / 'bad.json'))

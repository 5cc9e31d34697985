"""WordPiece as a step of the data pipeline: SNLI pairs packed by SNLIBERTDataset with a
real BERT's vocabulary give the ids of Hugging Face's and GluonNLP's own tokenizers for the
same vocab.txt; the vocabulary travels with checkpoints as vocab.json."""
from __future__ import annotations

import collections
import pickle

import numpy as onp
import pytest

from gluon_bert.data import SNLIBERTDataset, Vocab, read_snli, sample_dir
from gluon_bert.data.tokenization import WordPieceVocab, sentence_encoder, special_ids
from gluon_bert.errors import DataError

pytest.importorskip('gluonnlp')

SPECIALS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
MAX_LEN = 40


@pytest.fixture(scope='module')
def snli():
    return read_snli(sample_dir('snli'), 'train')


@pytest.fixture(scope='module')
def vocab_txt(snli, tmp_path_factory):
    """A WordPiece vocabulary from the sample: its frequent words whole, every other word
    only through pieces (first letters, `##` continuations), so that words split."""
    words = collections.Counter(w for s in snli[0] + snli[1] for w in s.lower().split())
    whole = [w for w, _ in words.most_common(150)]
    chars = sorted({c for w in words for c in w})
    pieces = sorted({w[:3] for w in words} | {'##' + w[3:5] for w in words if len(w) > 3})
    tokens = list(dict.fromkeys(SPECIALS + whole + chars + ['##' + c for c in chars] + pieces))
    path = tmp_path_factory.mktemp('vocab') / 'vocab.txt'
    path.write_text('\n'.join(tokens) + '\n', encoding='utf-8')
    return str(path)


def test_snli_pairs_match_hugging_face_tokenizer(snli, vocab_txt):
    transformers = pytest.importorskip('transformers')
    vocab = WordPieceVocab.from_vocab_txt(vocab_txt)
    n = 300
    pairs = (snli[0][:n], snli[1][:n], snli[2][:n])
    data = SNLIBERTDataset(pairs, MAX_LEN, vocab, num_workers=1)
    for cls in (transformers.BertTokenizer, transformers.BertTokenizerFast):
        tok = cls(vocab_txt, do_lower_case=True)
        ref = tok(pairs[0], pairs[1], truncation='longest_first', max_length=MAX_LEN,
                  padding='max_length')
        assert onp.array_equal(data.all_token_ids, onp.array(ref['input_ids'])), cls.__name__
        assert onp.array_equal(data.all_segments, onp.array(ref['token_type_ids']))
        assert onp.array_equal(data.valid_lens, onp.array(ref['attention_mask']).sum(1))
    # words that the vocabulary only has in pieces were split, not all mapped to [UNK]
    assert (data.all_token_ids == vocab.unk).sum() < 0.01 * data.valid_lens.sum()


def test_tokens_match_gluonnlp_tokenizer_and_raw_text(snli, vocab_txt):
    import gluonnlp as nlp
    vocab = WordPieceVocab.from_vocab_txt(vocab_txt)
    reference = nlp.data.BERTTokenizer(nlp.vocab.BERTVocab(collections.Counter(vocab.idx_to_token)),
                                       lower=True)
    raw = ['A man, in a "blue" shirt; isn\'t   sleeping.', 'Café — naïve ÉLAN\twith tabs',
           'emoji 🙂 and 中文 text', '']
    sentences = snli[0][:100] + snli[1][:100] + raw
    lens, ids = sentence_encoder(vocab)(sentences)
    starts = onp.cumsum(lens) - lens
    for s, a, n in zip(sentences, starts, lens):
        assert vocab.to_tokens(ids[a:a + n]) == [
            t if t in vocab else '[UNK]' for t in reference(s)], s


def test_vocab_json_round_trip_and_pickling(vocab_txt, tmp_path):
    vocab = WordPieceVocab.from_vocab_txt(vocab_txt, lower=True)
    path = vocab.save(str(tmp_path))
    again = Vocab.load(path)  # the loader every checkpoint uses gives the same kind back
    assert isinstance(again, WordPieceVocab) and again == vocab
    assert special_ids(again) == (0, 2, 3)
    assert pickle.loads(pickle.dumps(again)).encode('a man.') == vocab.encode('a man.')
    (tmp_path / 'bad.json').write_text('{"kind": "wordpiece", "idx_to_token": [1]}')
    with pytest.raises(DataError, match='not a usable WordPiece vocabulary'):
        Vocab.load(str(tmp_path / 'bad.json'))
    (tmp_path / 'short.txt').write_text('[PAD]\n[UNK]\n')
    with pytest.raises(DataError, match=r'lacks the special tokens \[.\[CLS\]'):
        WordPieceVocab.from_vocab_txt(str(tmp_path / 'short.txt'))


def test_worker_processes_give_the_same_arrays(snli, vocab_txt, monkeypatch):
    vocab = WordPieceVocab.from_vocab_txt(vocab_txt)
    one = SNLIBERTDataset(snli, MAX_LEN, vocab, num_workers=1)
    monkeypatch.setattr(SNLIBERTDataset, 'MIN_PAIRS_FOR_POOL', 10)
    for method in ('fork', 'spawn'):
        two = SNLIBERTDataset(snli, MAX_LEN, vocab, num_workers=2, start_method=method)
        for a, b in zip((one.all_token_ids, one.all_segments, one.valid_lens),
                        (two.all_token_ids, two.all_segments, two.valid_lens)):
            assert onp.array_equal(a, b), method


def test_gluonnlp_vocab_file_keeps_its_order(tmp_path):
    import gluonnlp as nlp
    counter = collections.Counter(['a', 'man', '##s', 'dog'])
    gvocab = nlp.vocab.BERTVocab(counter)
    path = tmp_path / 'x.vocab'
    path.write_text(gvocab.to_json())
    vocab = WordPieceVocab.from_gluonnlp(str(path))
    assert vocab.idx_to_token == gvocab.idx_to_token
    assert vocab.unk == gvocab[gvocab.unknown_token]
    assert special_ids(vocab) == tuple(gvocab[t] for t in ('[PAD]', '[CLS]', '[SEP]'))
    assert vocab.encode('A man dogs') == gvocab[['a', 'man', 'dog', '##s']]

"""The book's SNLI experiment on a real BERT, through the CLI: `gluon-bert finetune --init`
a small random BERT in the Hugging Face layout (made here with transformers), then resume,
evaluate, predict, compare and bench it, as a user would a downloaded bert-base-uncased."""
from __future__ import annotations

import collections
import json
import os

import pytest

from gluon_bert.cli import main
from gluon_bert.config import BERTConfig
from gluon_bert.data import read_snli, sample_dir
from gluon_bert.data.tokenization import WordPieceVocab
from gluon_bert.data.vocab import Vocab
from gluon_bert.train.checkpoint import latest_checkpoint

transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')
pytest.importorskip('gluonnlp')
pytest.importorskip('safetensors')

COMMON = ['--batch-size', '64', '--max-len', '48', '--train-limit', '256', '--no-progress']


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
    """A random tiny BertForPreTraining with a WordPiece vocabulary of the SNLI sample."""
    folder = tmp_path_factory.mktemp('hf-bert')
    premises, hypotheses, _ = read_snli(sample_dir('snli'), 'train')
    words = collections.Counter(w for s in premises + hypotheses for w in s.lower().split())
    chars = sorted({c for w in words for c in w})
    tokens = list(dict.fromkeys(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
                                + [w for w, _ in words.most_common(300)]
                                + chars + ['##' + c for c in chars]))
    (folder / 'vocab.txt').write_text('\n'.join(tokens) + '\n', encoding='utf-8')
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokens), hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertForPreTraining(config).save_pretrained(str(folder))
    return str(folder)


def test_finetune_an_imported_bert_then_resume_evaluate_predict(hf_folder, tmp_path, capsys):
    out = str(tmp_path / 'ft')
    assert main(['finetune', '--init', hf_folder, '--out-dir', out, '--num-epochs', '1',
                 '--lr', '1e-3', *COMMON]) == 0
    ckpt = latest_checkpoint(out)
    config = BERTConfig.load(os.path.join(ckpt, 'config.json'))
    assert (config.activation, config.embedding_norm, config.layer_norm_eps) == (
        'gelu', True, 1e-12)
    # the checkpoint keeps the BERT's WordPiece tokenizer, in the loop's own vocab.json
    vocab = Vocab.load(os.path.join(ckpt, 'vocab.json'))
    assert isinstance(vocab, WordPieceVocab) and vocab.lower
    with open(os.path.join(ckpt, 'vocab.json'), encoding='utf-8') as f:
        assert json.load(f)['kind'] == 'wordpiece'
    # resume: the loop reads that vocab.json back
    assert main(['finetune', '--init', hf_folder, '--out-dir', out, '--num-epochs', '2',
                 '--resume', '--no-progress']) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, 'metrics.jsonl'))]
    assert [r['epoch'] for r in rows if 'epoch' in r][-1] == 2 and 0 <= rows[-1]['eval_acc'] <= 1
    assert main(['evaluate', out, '--max-len', '48']) == 0
    capsys.readouterr()
    assert main(['predict', out, 'A man is sleeping in the park.', 'A person rests.']) == 0
    assert any(label in capsys.readouterr().out
               for label in ('entailment', 'contradiction', 'neutral'))
    from gluon_bert.predict import predict_pairs
    rows = predict_pairs(out, [('A dog runs outside.', 'An animal is moving.')])
    assert abs(sum(rows[0]['probabilities'].values()) - 1) < 1e-3


def test_compare_finetune_from_an_imported_bert(hf_folder, tmp_path):
    pytest.importorskip('jax')
    out = str(tmp_path / 'cmp')
    assert main(['compare', 'finetune', '--init', hf_folder, '--out-dir', out,
                 '--num-epochs', '1', *COMMON]) == 0
    summary = json.load(open(os.path.join(out, 'compare.json')))
    losses = [r['train_loss'] for r in summary['results'].values()]
    assert set(summary['results']) == {'mxnet', 'torch', 'jax'}
    assert max(losses) - min(losses) < 0.05 * max(losses), losses  # same start, same batches


def test_bench_takes_the_bert_base_shape_of_real_berts(tmp_path):
    from gluon_bert.bench import run_bench
    rows = run_bench(frameworks=('mxnet', 'torch'), task='finetune', preset='tiny.bert',
                     vocab_size=60, batch_size=4, seq_len=16, steps=1, warmup=1, out=None)
    assert all(r.get('examples_per_sec', 0) > 0 for r in rows), rows
    config = BERTConfig.from_preset('bert_12_768_12', vocab_size=30522)
    assert (config.num_hiddens, config.num_blks, config.activation) == (768, 12, 'gelu')

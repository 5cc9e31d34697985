"""Time building SNLIBERTDataset for 550,152 pairs: gluon_bert vs the book's design.

The pairs are synthetic with SNLI train's shape: 150,736 distinct premises of
about 14 tokens, each with 3-4 hypotheses of about 8 tokens, words drawn from a
Zipf-like 20,000-word vocabulary. The book's `SNLIBERTDataset` (d2l 1.0.3 does
not export it, so it is rebuilt here from d2l.mxnet's pieces, as in the book)
maps one pair per task in `multiprocessing.Pool(4)` and returns MXNet arrays.

    python experiments/bench_snli_build.py [--pairs 550152] [--repeats 3] [--skip-book]
                                           [--wordpiece]

`--wordpiece` builds with a WordPiece vocabulary instead (GluonNLP's BERTTokenizer, as for
imported real BERTs): the words w0..w9999 and the pieces ##0..##9, so the rarer half of
the 20,000 words are split into pieces (w12345 -> w1234 ##5); the book's design has no
WordPiece counterpart, so it implies --skip-book.

Appends one JSON line to experiments/results/data_bench.jsonl.
"""
import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gluon_bert.data import RESERVED_TOKENS, SNLIBERTDataset, Vocab  # noqa: E402


def synthetic_snli(num_pairs, seed=0, vocab_size=20000):
    rng = np.random.default_rng(seed)
    words = np.array([f'w{i}' for i in range(vocab_size)])
    weights = 1.0 / np.arange(1, vocab_size + 1)
    weights /= weights.sum()

    def sentences(count, mean):
        lens = np.clip(rng.normal(mean, mean / 3, count).round().astype(int), 2, 80)
        flat = words[rng.choice(vocab_size, lens.sum(), p=weights)]
        ends = np.cumsum(lens)
        return [' '.join(flat[e - n:e]) for n, e in zip(lens, ends)]

    per_premise = rng.choice([3, 4], 150_736, p=[0.65, 0.35])
    premises = np.repeat(np.arange(len(per_premise)), per_premise)[:num_pairs]
    uniq = sentences(int(premises.max()) + 1, 14.1)
    p = [uniq[i] for i in premises]
    p += [uniq[i] for i in rng.integers(0, len(uniq), num_pairs - len(p))]
    h = sentences(num_pairs, 8.3)
    return p, h, rng.integers(0, 3, num_pairs).tolist(), words.tolist()


_BOOK = {}


def _book_worker(pair):
    d2l, vocab, max_len = _BOOK['d2l'], _BOOK['vocab'], _BOOK['max_len']
    p_tokens, h_tokens = pair
    while len(p_tokens) + len(h_tokens) > max_len - 3:
        (p_tokens if len(p_tokens) > len(h_tokens) else h_tokens).pop()
    tokens, segments = d2l.get_tokens_and_segments(p_tokens, h_tokens)
    token_ids = vocab[tokens] + [vocab['<pad>']] * (max_len - len(tokens))
    return token_ids, segments + [0] * (max_len - len(segments)), len(tokens)


def book_build(dataset, max_len, vocab):
    """The book's SNLIBERTDataset.__init__ + _preprocess, timed end to end."""
    from d2l import mxnet as d2l
    from mxnet import np as mnp
    pairs = [[p, h] for p, h in zip(*[d2l.tokenize([s.lower() for s in sentences])
                                      for sentences in dataset[:2]])]
    labels = mnp.array(dataset[2])
    _BOOK.update(d2l=d2l, vocab=vocab, max_len=max_len)
    pool = multiprocessing.Pool(4)
    out = pool.map(_book_worker, pairs)
    pool.close()
    token_ids = mnp.array([o[0] for o in out], dtype='int32')
    segments = mnp.array([o[1] for o in out], dtype='int32')
    valid_lens = mnp.array([o[2] for o in out])
    return token_ids, segments, valid_lens, labels


def versions():
    import mxnet
    out = {'python': platform.python_version(), 'numpy': np.__version__,
           'mxnet': mxnet.__version__}
    try:
        import d2l
        out['d2l'] = d2l.__version__
    except (ImportError, AttributeError):
        pass
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--pairs', type=int, default=550_152)
    parser.add_argument('--max-len', type=int, default=128)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--skip-book', action='store_true')
    parser.add_argument('--wordpiece', action='store_true')
    parser.add_argument('--out', default=os.path.join(ROOT, 'experiments', 'results',
                                                      'data_bench.jsonl'))
    args = parser.parse_args()
    import mxnet as mx
    (mx.nd.ones((2, 2)) + 1).wait_to_read()  # measure with MXNet's engine running
    t = time.perf_counter()
    data = synthetic_snli(args.pairs)
    print(f'made {args.pairs} synthetic pairs in {time.perf_counter() - t:.1f} s', flush=True)
    vocab = Vocab([data[3]], reserved_tokens=RESERVED_TOKENS)
    if args.wordpiece:
        from gluon_bert.data.tokenization import WORDPIECE_SPECIALS, WordPieceVocab
        vocab = WordPieceVocab(list(WORDPIECE_SPECIALS.values()) +
                               [f'w{i}' for i in range(10000)] + [f'##{d}' for d in range(10)])
        args.skip_book = True
    ours = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        ds = SNLIBERTDataset(data[:3], args.max_len, vocab)
        ours.append(time.perf_counter() - t)
        print(f'gluon_bert SNLIBERTDataset: {ours[-1]:.2f} s', flush=True)
    record = {'bench': 'snli_bert_build', 'pairs': args.pairs, 'max_len': args.max_len,
              'tokenizer': 'wordpiece' if args.wordpiece else 'whitespace',
              'gluon_bert_s': [round(x, 3) for x in ours],
              'gluon_bert_median_s': round(statistics.median(ours), 3)}
    if not args.skip_book:
        t = time.perf_counter()
        ref = book_build(data[:3], args.max_len, vocab)
        book_s = time.perf_counter() - t
        print(f"book's SNLIBERTDataset (Pool(4).map per pair): {book_s:.2f} s", flush=True)
        same = all(np.array_equal(a, b.asnumpy()) for a, b in zip(
            (ds.all_token_ids, ds.all_segments, ds.valid_lens), ref[:3]))
        record.update(book_s=round(book_s, 3), speedup=round(book_s / record['gluon_bert_median_s'], 2),
                      identical_arrays=bool(same))
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    record.update(versions=versions(), cpus=len(os.sched_getaffinity(0)),
                  load_avg_1m=round(os.getloadavg()[0], 2), commit=commit,
                  host=platform.node(), time=time.strftime('%Y-%m-%dT%H:%M:%S'))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, 'a') as f:
        f.write(json.dumps(record) + '\n')
    print(json.dumps(record))


if __name__ == '__main__':
    main()

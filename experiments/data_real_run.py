"""One run of the data pipeline on the real files in ../shared/data.

WikiText-2 train -> paragraphs, pretraining examples (max_len 64, seed 0, the
book's settings), vocabulary size (min_freq 5); SNLI dev -> label counts from
both shared files and SNLIBERTDataset arrays (max_len 128, vocabulary built
from the dev pairs). Writes experiments/results/data_real_run.json.

    python experiments/data_real_run.py [--data ../shared/data]
"""
import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gluon_bert.data import (BatchLoader, RESERVED_TOKENS, SNLIBERTDataset, Vocab,  # noqa: E402
                             WikiTextDataset, read_snli, read_wiki)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', default=os.path.join(ROOT, '..', 'shared', 'data'))
    parser.add_argument('--out', default=os.path.join(ROOT, 'experiments', 'results',
                                                      'data_real_run.json'))
    args = parser.parse_args()
    result = {}

    t = time.perf_counter()
    rng = random.Random(0)
    paragraphs = read_wiki(os.path.join(args.data, 'wikitext-2'), rng)
    wiki = WikiTextDataset(paragraphs, 64, rng=rng)
    arrays = wiki.arrays
    result['wikitext2'] = {
        'file': 'wikitext-2/wiki.train.tokens.gz', 'max_len': 64, 'seed': 0,
        'paragraphs': len(paragraphs),
        'sentences': sum(len(p) for p in paragraphs),
        'examples': len(wiki), 'vocab_size': len(wiki.vocab),
        'nsp_is_next_share': round(float(arrays['nsp_labels'].mean()), 4),
        'mean_valid_len': round(float(arrays['valid_lens'].mean()), 2),
        'mlm_predictions': int(arrays['mlm_weights'].sum()),
        'mlm_share_of_tokens': round(float(arrays['mlm_weights'].sum() /
                                           arrays['valid_lens'].sum()), 4),
        'build_s': round(time.perf_counter() - t, 2)}
    print(json.dumps(result['wikitext2']), flush=True)

    snli_dir = os.path.join(args.data, 'snli')
    result['snli_dev'] = {}
    for name in ('snli_1.0_dev.d2l_compat.txt.gz', 'snli_1.0_dev.gold_pairs.jsonl.gz'):
        report = {}
        premises, hypotheses, labels = read_snli(os.path.join(snli_dir, name), report=report)
        counts = np.bincount(labels, minlength=3)
        result['snli_dev'][name] = {
            'pairs': len(labels), 'entailment': int(counts[0]),
            'contradiction': int(counts[1]), 'neutral': int(counts[2]),
            'dropped_no_gold_label': report['no_gold_label'], 'skipped': report['skipped']}
    t = time.perf_counter()
    vocab = Vocab([s.lower().split() for s in premises + hypotheses], min_freq=1,
                  reserved_tokens=RESERVED_TOKENS)
    ds = SNLIBERTDataset((premises, hypotheses, labels), 128, vocab)
    valid = ds.valid_lens
    full = sum(b['tokens'].size for b in BatchLoader(ds.arrays, 512, seed=0))
    bucketed = sum(b['tokens'].size for b in BatchLoader(ds.arrays, 512, seed=0,
                                                         pad_to='longest', bucket=True))
    result['snli_dev_bert'] = {
        'max_len': 128, 'examples': len(ds), 'vocab_size': len(vocab),
        'mean_valid_len': round(float(valid.mean()), 2), 'max_valid_len': int(valid.max()),
        'truncated_pairs': int((valid >= 128).sum()),
        'token_cells_max_len_batches': int(full), 'token_cells_bucketed_batches': int(bucketed),
        'cells_ratio': round(full / bucketed, 2), 'build_s': round(time.perf_counter() - t, 2)}
    print(json.dumps(result['snli_dev_bert']), flush=True)
    result['commit'] = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
                                      capture_output=True, text=True).stdout.strip()
    result['python'], result['numpy'] = platform.python_version(), np.__version__
    result['time'] = time.strftime('%Y-%m-%dT%H:%M:%S')
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
        f.write('\n')


if __name__ == '__main__':
    main()

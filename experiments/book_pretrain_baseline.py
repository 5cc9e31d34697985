"""The book's own MXNet pretraining (d2l 1.0.3's classes and data code, the book's loop and
settings) on real WikiText-2, for comparison with `gluon-bert pretrain` on the same machine.

    python experiments/book_pretrain_baseline.py --data-dir ../shared/data/wikitext-2

Writes experiments/results/book_pretrain_d2l.json. The loop follows the book's
"Pretraining BERT" section: split_and_load per batch, the book's batch loss (which waits on
the device after every shard), `trainer.step(1)`, losses read back after every step, and
MLM / NSP reported as means over all steps with sentence pairs/sec over the timed steps.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--data-dir', default=os.path.join('..', 'shared', 'data', 'wikitext-2'))
    ap.add_argument('--steps', type=int, default=50)
    ap.add_argument('--batch-size', type=int, default=512)
    ap.add_argument('--max-len', type=int, default=64)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results',
                                                  'book_pretrain_d2l.json'))
    args = ap.parse_args()

    import random
    import mxnet as mx
    import numpy as onp
    from mxnet import autograd, gluon, init, npx
    from d2l import mxnet as d2l
    npx.set_np()
    random.seed(args.seed)
    onp.random.seed(args.seed)
    mx.random.seed(args.seed)

    # data: d2l reads an uncompressed wiki.train.tokens from a folder
    tmp = tempfile.mkdtemp()
    src = os.path.join(args.data_dir, 'wiki.train.tokens')
    if os.path.exists(src):
        shutil.copy(src, tmp)
    else:
        with gzip.open(src + '.gz', 'rb') as f, open(os.path.join(tmp, 'wiki.train.tokens'), 'wb') as g:
            shutil.copyfileobj(f, g)
    t0 = time.perf_counter()
    paragraphs = d2l._read_wiki(tmp)
    train_set = d2l._WikiTextDataset(paragraphs, args.max_len)
    build_s = time.perf_counter() - t0
    train_iter = gluon.data.DataLoader(train_set, args.batch_size, shuffle=True)
    vocab = train_set.vocab

    # model: the book's pretraining BERT
    devices = d2l.try_all_gpus() or [mx.cpu()]  # d2l 1.0.3 returns [] without GPUs
    net = d2l.BERTModel(len(vocab), num_hiddens=128, ffn_num_hiddens=256, num_heads=2,
                        num_blks=2, dropout=0.2)
    net.initialize(init.Xavier(), ctx=devices)
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = gluon.Trainer(net.collect_params(), 'adam', {'learning_rate': 0.01})

    # the book's loop
    step, seconds, pairs, mlm_sum, nsp_sum, curve = 0, 0.0, 0, 0.0, 0.0, []
    while step < args.steps:
        for batch in train_iter:
            shards = [gluon.utils.split_and_load(x, devices, even_split=False) for x in batch]
            start = time.perf_counter()
            with autograd.record():
                mlm_ls, nsp_ls, ls = d2l._get_batch_loss_bert(net, loss, len(vocab), *shards)
            for l in ls:
                l.backward()
            trainer.step(1)
            mlm = sum(float(l) for l in mlm_ls) / len(mlm_ls)
            nsp = sum(float(l) for l in nsp_ls) / len(nsp_ls)
            seconds += time.perf_counter() - start
            pairs += batch[0].shape[0]
            mlm_sum, nsp_sum = mlm_sum + mlm, nsp_sum + nsp
            step += 1
            curve.append(dict(step=step, mlm=mlm, nsp=nsp))
            if step == args.steps:
                break
    shutil.rmtree(tmp)
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                            text=True).stdout.strip()
    result = dict(implementation='d2l 1.0.3 (book MXNet code)', steps=step,
                  batch_size=args.batch_size, max_len=args.max_len, seed=args.seed,
                  mlm=mlm_sum / step, nsp=nsp_sum / step, pairs_per_sec=pairs / seconds,
                  vocab_size=len(vocab), examples=len(train_set), data_build_s=build_s,
                  devices=[str(d) for d in devices], machine=platform.platform(),
                  cpus=os.cpu_count(), mxnet=mx.__version__, commit=commit, curve=curve)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    print(f'MLM loss {result["mlm"]:.3f}, NSP loss {result["nsp"]:.3f}')
    print(f'{result["pairs_per_sec"]:.1f} sentence pairs/sec on {devices}')


if __name__ == '__main__':
    main()

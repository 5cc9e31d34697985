"""Time gluon-bert's `gb_attention` alone at the book's pretraining shape.

    python experiments/bench_attention.py                    # this checkout's kernels
    python experiments/bench_attention.py --library OLD.so   # another build, to compare

A packed batch of 512 WikiText-2 lengths (`ports.synthetic.LENGTHS`, as `gluon-bert bench`
draws them), width 128, 2 heads: the first block's self-attention, forward alone and
forward + backward, without and with the weights' dropout (p = 0.1, the book's). Runs in a
bench worker's environment (threads, allocator) and prints one JSON line per setting, the
median of `--repeats` timed calls after two warm-up calls. Compare builds in alternating
processes: the machine's speed drifts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_CHILD = 'GLUON_BERT_BENCH_ATTENTION'


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--library', help='a built kernels library (default: this checkout\'s)')
    ap.add_argument('--repeats', type=int, default=7)
    args = ap.parse_args(argv)
    if os.environ.get(_CHILD) != '1':
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from gluon_bert.bench.harness import worker_env
        env, _ = worker_env()
        env[_CHILD] = '1'
        if args.library:
            env['GLUON_BERT_KERNELS'] = '0'  # only the library given
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)

    import time

    import numpy as np
    import gluon_bert  # noqa: F401: CPU settings before MXNet loads
    import mxnet as mx
    from mxnet import autograd, nd
    from gluon_bert import kernels
    from gluon_bert.config import BERTConfig
    from gluon_bert.ports.synthetic import LENGTHS, synthetic_batch
    if args.library:
        mx.library.load(os.path.abspath(args.library), verbose=False)
        library = os.path.abspath(args.library)
    else:
        if not kernels.load():
            raise SystemExit(f'kernels not loaded: {kernels.status()["reason"]}')
        library = kernels.status()['path']
    config = BERTConfig.from_preset('d2l.pretrain', vocab_size=20256)
    batch = synthetic_batch(np.random.default_rng(0), config, 'pretrain', 512, 64, 10,
                            length_counts=LENGTHS['wikitext-2'])
    lengths = batch['valid_lens'].astype(np.float32)
    T, H = int(lengths.sum()), config.num_hiddens
    rng = np.random.default_rng(1)
    q, k, v = (nd.array(rng.standard_normal((T, H)).astype(np.float32)) for _ in range(3))
    valid_lens = nd.array(lengths)
    for x in (q, k, v):
        x.attach_grad()

    def call(p, backward):
        with autograd.record():
            out = nd.gb_attention(q, k, v, valid_lens, num_heads=config.num_heads,
                                  alpha=(H // config.num_heads) ** -0.5, p=p)[0]
        if backward:
            out.backward(nd.ones_like(out))

    for p in (0.0, 0.1):
        for backward in (False, True):
            times = []
            for i in range(args.repeats + 2):
                nd.waitall()
                start = time.perf_counter()
                call(p, backward)
                nd.waitall()
                if i >= 2:
                    times.append(time.perf_counter() - start)
            print(json.dumps(dict(library=os.path.basename(library), tokens=T, p=p,
                                  backward=backward,
                                  median_ms=round(1000 * float(np.median(times)), 2))),
                  flush=True)


if __name__ == '__main__':
    main()

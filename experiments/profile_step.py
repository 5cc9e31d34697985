"""Where a training step of ours spends its time: MXNet's profiler, operator by operator.

    python experiments/profile_step.py                      # the book's pretraining step
    python experiments/profile_step.py --preset bert.small --task finetune --batch-size 128 \
        --seq-len 128 --vocab-size 20256

The step is `gluon-bert bench`'s own (`bench.variants.build('ours-hybrid', ...)`: the same
initial weights, synthetic batch, optimizer) in the environment of a bench worker
(`bench.harness.worker_env`: threads, OpenMP wait policy, glibc's allocator as `gluon-bert`
sets it), which this script restarts itself in. Bulk execution is off
(`MXNET_EXEC_BULK_EXEC_TRAIN=0` unless you set it; MXNet reads it when it loads) so that
every operator is attributed on its own; that makes a step slower than `gluon-bert bench`
times it, so use the profile for where to look and the bench for how long a step takes.
Prints the step's time, minor page faults and system time, then the operators by total
time and the share of the step each takes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_CHILD = 'GLUON_BERT_PROFILE_STEP'  # set in the restarted process


def _restart_in_worker_env(argv):
    """Start this script again in a bench worker's environment (glibc reads its allocator
    settings, MXNet its bulk execution setting, only at process start)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gluon_bert.bench.harness import worker_env
    env, _ = worker_env()
    env.setdefault('MXNET_EXEC_BULK_EXEC_TRAIN', '0')
    env[_CHILD] = '1'
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--task', default='pretrain', choices=['pretrain', 'finetune'])
    ap.add_argument('--preset', default='d2l.pretrain')
    ap.add_argument('--vocab-size', type=int, default=20256)
    ap.add_argument('--batch-size', type=int, default=512)
    ap.add_argument('--seq-len', type=int, default=64)
    ap.add_argument('--num-preds', type=int, default=10)
    ap.add_argument('--lengths', choices=('wikitext-2', 'snli', 'uniform'), default=None,
                    help="the batch's lengths, as gluon-bert bench --lengths (default: "
                         "wikitext-2 for pretraining, snli for fine-tuning, where the batch "
                         "has their 64 or 128 positions; else uniform)")
    ap.add_argument('--steps', type=int, default=4, help='timed, then profiled, steps')
    ap.add_argument('--top', type=int, default=25)
    ap.add_argument('--out', default=None, help='also write the table as JSON here')
    args = ap.parse_args(argv)
    if os.environ.get(_CHILD) != '1':
        _restart_in_worker_env(argv)

    import resource
    import time

    import numpy as np
    import gluon_bert  # noqa: F401: CPU settings before MXNet loads
    import mxnet as mx
    from gluon_bert import kernels
    from gluon_bert.bench.variants import build
    from gluon_bert.bench.worker import initial_params
    from gluon_bert.config import BERTConfig
    from gluon_bert.ports.synthetic import LENGTHS, synthetic_batch

    config = BERTConfig.from_preset(args.preset, vocab_size=args.vocab_size)
    lengths = args.lengths or ('wikitext-2' if args.task == 'pretrain' else 'snli')
    counts = LENGTHS.get(lengths)  # the real lengths hold at their own padded length only
    if counts is not None and args.seq_len != len(counts) - 1:
        counts = None
    batch = synthetic_batch(np.random.default_rng(0), config, args.task, args.batch_size,
                            args.seq_len, args.num_preds, length_counts=counts)
    step = build('ours-hybrid', config, initial_params(config, args.task, 0), batch,
                 args.task)

    def run(n):
        for _ in range(n):
            step.train()
        step.sync()

    run(2)  # warm-up: graphs built, memory planned
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    run(args.steps)
    wall = (time.perf_counter() - t0) / args.steps
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults = (after.ru_minflt - before.ru_minflt) / args.steps
    system = (after.ru_stime - before.ru_stime) / args.steps
    print(f'step {wall * 1e3:.0f} ms ({args.batch_size / wall:.1f} examples/s), '
          f'{faults:.0f} minor page faults and {system * 1e3:.0f} ms system time a step, '
          f"kernels: {kernels.status()['reason']}, "
          f"bulk exec {os.environ['MXNET_EXEC_BULK_EXEC_TRAIN']}")

    mx.profiler.set_config(profile_all=True, aggregate_stats=True, continuous_dump=False,
                           filename=os.devnull)
    mx.profiler.set_state('run')
    run(args.steps)
    mx.profiler.set_state('stop')
    stats = json.loads(mx.profiler.dumps(reset=True, format='json'))
    rows = []
    for domain, ops in stats.get('Time', {}).items():
        if domain not in ('operator', 'Operator'):
            continue
        for name, s in ops.items():
            rows.append((name, s['Count'] / args.steps, s['Total'] / args.steps))
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    print(f'operators: {total:.0f} ms a step in all (profiled)')
    print(f"{'operator':40s} {'calls':>6s} {'ms/step':>9s} {'share':>6s}")
    for name, calls, ms in rows[:args.top]:
        print(f'{name[:40]:40s} {calls:6.0f} {ms:9.1f} {ms / total:6.1%}')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(args=vars(args), step_ms=wall * 1e3, kernels=kernels.status(),
                           operators=[dict(name=n, calls=c, ms=m) for n, c, m in rows]), f,
                      indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Scaling of the sample fine-tuning over workers on this machine, and an estimate beyond it.

    python experiments/distributed_scaling.py [--epochs 1] [--out experiments/results/distributed_scaling]

Runs the same fine-tuning (the shipped SNLI sample, the reproduce recipe's settings, from a
d2l.pretrain-shaped BERT pretrained for a few steps) as one process, as 2 workers + 1 server
on MXNet's `dist_sync` KVStore, and as 2 Horovod ranks where Horovod is installed, each
through `gluon-bert launch`, back to back. Records examples/s (the loop's own figure,
warm-up step excluded), wall time, and the bytes each worker sends and receives per step;
then estimates 8 and 64 GPUs for bert.small and bert.base from the gradient volume per
step. Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = [sys.executable, '-m', 'gluon_bert.cli']
# the sample recipe of `gluon-bert reproduce` (gluon_bert/report.py)
FT = ['--batch-size', '64', '--max-len', '64', '--lr', '5e-4', '--pad-to', 'longest',
      '--bucket', '--no-progress']


def run(cmd, env=None):
    started = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if r.returncode != 0:
        raise SystemExit(f'{" ".join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}')
    return json.loads(r.stdout[r.stdout.index('{'):]), seconds


def horovod_available():
    import importlib.util  # not an import of horovod.mxnet (it breaks a later torch import)
    return importlib.util.find_spec('horovod') is not None


def parameters_of(init):
    from gluon_bert.ports.convert import load_mxnet_file
    from gluon_bert.train import latest_checkpoint
    params = load_mxnet_file(os.path.join(latest_checkpoint(init), 'model.params'))
    # the classifier: the encoder and `hidden`, without the pretraining heads, + output
    kept = sum(a.size for n, a in params.items() if not n.startswith(('mlm.', 'nsp.')))
    return kept + 3 * params['hidden.weight'].shape[0] + 3


# The book's fine-tuning rate of bert.small on its GPUs: 4652 examples/s on 2, batch 512.
BOOK_SMALL_PER_GPU = 4652 / 2
VOCAB = 30522  # BERT's WordPiece vocabulary (assumed for both shapes)


def _params(preset):
    from gluon_bert.config import BERTConfig
    from gluon_bert.ports.convert import mxnet_shapes
    import numpy as np
    shapes = mxnet_shapes(BERTConfig.from_preset(preset, vocab_size=VOCAB), 'finetune')
    return int(sum(np.prod(s) for s in shapes.values()))


def _flops_per_example(preset, length=128):
    """Forward + backward multiply-adds x 6 of the encoder's dense layers, per example."""
    from gluon_bert.config import PRESETS
    c = PRESETS[preset]
    h, f, blocks = c['num_hiddens'], c['ffn_num_hiddens'], c['num_blks']
    return 6 * length * blocks * (4 * h * h + 2 * h * f)


def estimate(per_gpu_batch=256):
    """Step time on N GPUs (weak scaling: `per_gpu_batch` examples each) = compute + the
    gradient exchange, bandwidth-bound: a ring allreduce sends and receives 2 (N-1)/N of the
    gradients per GPU; a parameter server with as many servers as workers moves each
    worker's gradients up and the sums down once (2x the gradients per link). Compute
    rates: the book's bert.small rate per GPU, scaled by FLOPs for bert.base."""
    rows = []
    small_flops = _flops_per_example('bert.small')
    for preset in ('bert.small', 'bert.base'):
        grad_bytes = 4 * _params(preset)
        rate = BOOK_SMALL_PER_GPU * small_flops / _flops_per_example(preset)
        for gpus, link, bandwidth in ((8, '1 node, NVLink ~150 GB/s per GPU', 150e9),
                                      (64, '8 nodes, 100 Gb/s InfiniBand ~12 GB/s', 12e9)):
            compute = per_gpu_batch / rate
            ring = 2 * (gpus - 1) / gpus * grad_bytes / bandwidth
            ps = 2 * grad_bytes / bandwidth
            rows.append(dict(model=preset, gpus=gpus, link=link, gradient_mb=grad_bytes / 1e6,
                             examples_per_sec_per_gpu=rate, compute_s=compute,
                             ring_allreduce_s=ring, parameter_server_s=ps,
                             ring_efficiency=compute / (compute + ring),
                             ps_efficiency=compute / (compute + ps)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--epochs', type=int, default=1)
    ap.add_argument('--out', default=os.path.join(HERE, 'results', 'distributed_scaling'))
    args = ap.parse_args()
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE')
    work = tempfile.mkdtemp(prefix='scaling-')
    init = os.path.join(work, 'pre')
    run(CLI + ['pretrain', '--out-dir', init, '--num-steps', '2', '--batch-size', '64',
               '--no-progress'], env)
    common = ['--init', init, '--num-epochs', str(args.epochs), *FT]
    cases = [('1 process', 1, CLI + ['finetune', '--out-dir', os.path.join(work, 'one'),
                                     *common])]
    cases.append(('2 workers, dist_sync, 1 server', 2,
                  CLI + ['launch', '-n', '2', '-s', '1', '--', 'gluon-bert', 'finetune',
                         '--kvstore', 'dist_sync', '--out-dir', os.path.join(work, 'kv'),
                         *common]))
    if horovod_available():
        cases.append(('2 ranks, Horovod (Gloo)', 2,
                      CLI + ['launch', '-n', '2', '--launcher', 'horovod', '--', 'gluon-bert',
                             'finetune', '--kvstore', 'horovod', '--out-dir',
                             os.path.join(work, 'hvd'), *common]))
    num_params = parameters_of(init)
    results = []
    for name, workers, cmd in cases:
        summary, seconds = run(cmd, env)
        results.append(dict(case=name, workers=workers, wall_s=round(seconds, 1),
                            examples_per_sec=summary['examples_per_sec'],
                            train_loss=summary['train_loss'], eval_acc=summary['eval_acc'],
                            bytes_per_worker_per_step=0 if workers == 1 else 2 * 4 * num_params))
        print(results[-1], flush=True)
    grad_bytes, paper = 4 * num_params, estimate()
    record = dict(date=datetime.date.today().isoformat(), machine=platform.platform(),
                  cpus=os.cpu_count(), command=' '.join(sys.argv), parameters=num_params,
                  gradient_bytes=grad_bytes, results=results, estimate=paper,
                  skipped=[] if horovod_available() else
                  ['Horovod: not installed (bash scripts/setup.sh horovod)'])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + '.json', 'w', encoding='utf-8') as f:
        json.dump(record, f, indent=2)
    lines = [f"# Sample fine-tuning over workers ({record['date']}, {record['cpus']} CPUs, "
             f"{record['machine']})", '',
             f'`{record["command"]}`; d2l.pretrain-shaped classifier, {num_params:,} '
             f'parameters ({grad_bytes / 1e6:.1f} MB of float32 gradients a step).', '',
             '| case | examples/s | wall s | train loss | eval acc | sent+received per worker per step |',
             '|---|---|---|---|---|---|']
    for r in results:
        lines.append(f"| {r['case']} | {r['examples_per_sec']:.1f} | {r['wall_s']} | "
                     f"{r['train_loss']:.4f} | {r['eval_acc']:.4f} | "
                     f"{r['bytes_per_worker_per_step'] / 1e6:.1f} MB |")
    lines += ['', 'Paper estimate (weak scaling, 256 examples per GPU per step, max_len 128, '
              'no overlap of communication with compute; GPU rates from the book\'s bert.small '
              'figure, bert.base scaled by FLOPs; vocabulary 30,522):', '',
              '| model | GPUs | link | gradients MB | compute s/step | ring allreduce s | '
              'parameter server s | efficiency ring / PS |', '|---|---|---|---|---|---|---|---|']
    for e in paper:
        lines.append(f"| {e['model']} | {e['gpus']} | {e['link']} | {e['gradient_mb']:.0f} | "
                     f"{e['compute_s']:.3f} | {e['ring_allreduce_s']:.4f} | "
                     f"{e['parameter_server_s']:.4f} | "
                     f"{e['ring_efficiency']:.2f} / {e['ps_efficiency']:.2f} |")
    for s in record['skipped']:
        lines.append(f'\nSkipped: {s}')
    with open(args.out + '.md', 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()

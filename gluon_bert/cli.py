"""`gluon-bert <command>`: a thin layer over gluon_bert.train and gluon_bert.data.

    gluon-bert reproduce            pretrain -> fine-tune -> evaluate -> report (the main job)
    gluon-bert pretrain             MLM + NSP pretraining (the book's settings by default)
    gluon-bert finetune --init X    SNLI fine-tuning from a pretraining run or bert.small
    gluon-bert evaluate RUN         accuracy of a fine-tuned classifier on an SNLI split
    gluon-bert predict RUN P H      label + probabilities for a premise/hypothesis pair
    gluon-bert compare TASK         the same experiment in MXNet, PyTorch and JAX
    gluon-bert bench --suite issue10  benchmark ours, the book's code, GluonNLP, PyTorch, JAX
    gluon-bert download NAME...     fetch WikiText-2, SNLI or a book checkpoint into the cache
    gluon-bert launch -n N -- CMD   run CMD as a distributed job (KVStore or Horovod)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

__all__ = ['main', 'build_parser']

# The official data set each command reads, as named in gluon_bert.data.DATA_HUB.
_DATA_SETS = {'pretrain': 'wikitext-2', 'finetune': 'SNLI'}


def _add_data_args(p, what):
    d = p.add_mutually_exclusive_group()
    d.add_argument('--data-dir', help=f'folder with {what} (default: the shipped sample)')
    d.add_argument('--download', action='store_true',
                   help=f'use the official {what}: downloaded once into the cache '
                        '($GLUON_BERT_HOME), SHA-1 checked')


def _add_train_args(p, task):
    g = p.add_argument_group('run')
    _add_data_args(g, _DATA_SETS.get(task, 'the data'))
    g.add_argument('--out-dir', help=f'run folder (default: runs/{task})')
    g.add_argument('--resume', action='store_true',
                   help='continue the run in --out-dir with its own settings (only the '
                        'length, log/checkpoint intervals and devices may change)')
    g.add_argument('--devices', help="'auto' (all GPUs, else CPU) or e.g. 'cpu(0),cpu(1)'")
    g.add_argument('--kvstore', help="gradient reduction: device, local, dist_sync, ...")
    g.add_argument('--seed', type=int)
    if task != 'both':
        g.add_argument('--framework', choices=('mxnet', 'torch', 'jax'),
                       help='mxnet (default), or train with the PyTorch or JAX port')
    g.add_argument('--no-progress', action='store_true', help='no progress bar')
    h = p.add_argument_group('hyper-parameters (the book\'s by default)')
    h.add_argument('--batch-size', type=int)
    h.add_argument('--max-len', type=int)
    h.add_argument('--lr', type=float)
    h.add_argument('--warmup-steps', type=int)
    h.add_argument('--schedule', choices=('constant', 'linear', 'cosine'))
    h.add_argument('--clip-norm', type=float)
    h.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'),
                   help='compute dtype (weights stay float32): bfloat16 on CPUs with '
                        'avx512_bf16/AMX or GPUs, float16 on GPUs (with loss scaling)')
    h.add_argument('--log-interval', type=int)
    h.add_argument('--checkpoint-interval', type=int)
    h.add_argument('--pad-to', choices=('max_len', 'longest'),
                   help="batches padded to --max-len (the book's; steps compute only the "
                        'real tokens either way) or to their longest example')
    h.add_argument('--bucket', action='store_true', default=None,
                   help='length-bucketed batches, run padded (use with --pad-to longest; '
                        'the default packed steps are faster)')
    h.add_argument('--train-limit', type=int, help='use only the first N training examples')
    if task in ('pretrain', 'both'):
        h.add_argument('--preset', help='model shape: d2l.pretrain, bert.small, bert.base, tiny')
        h.add_argument('--num-steps', type=int)
    if task in ('finetune', 'both'):
        h.add_argument('--init', help='pretraining run folder, bert.small, bert.base, a '
                                      'zip/folder in the book\'s layout, a Hugging Face or '
                                      'GluonNLP BERT folder, hf:NAME or gluonnlp:NAME')
        h.add_argument('--num-epochs', type=int)
        h.add_argument('--train-split')
        h.add_argument('--eval-split')
        h.add_argument('--holdout', type=int,
                       help='hold out N training pairs (seeded) as the evaluation set')


def build_parser():
    parser = argparse.ArgumentParser(prog='gluon-bert', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    for task in ('pretrain', 'finetune'):
        _add_train_args(sub.add_parser(task, help=f'{task} BERT'), task)

    p = sub.add_parser('reproduce', help='pretrain, fine-tune, evaluate and report')
    _add_data_args(p, 'wikitext-2/ and snli/')
    p.add_argument('--out-dir', default='runs/reproduce')
    p.add_argument('--recipe', choices=('book', 'sample'),
                   help='settings (default: sample on the shipped sample, book on real data)')
    p.add_argument('--devices')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--pretrain-steps', type=int, help='override the recipe\'s step count')
    p.add_argument('--finetune-epochs', type=int, help='override the recipe\'s epochs')
    p.add_argument('--no-progress', action='store_true')

    p = sub.add_parser('compare', help='one experiment in MXNet, PyTorch and JAX')
    p.add_argument('task', choices=('pretrain', 'finetune'))
    p.add_argument('--frameworks', default='mxnet,torch,jax')
    _add_train_args(p, 'both')
    p.set_defaults(out_dir=None)

    p = sub.add_parser('bench', help='benchmark ours, the book\'s code, GluonNLP, PyTorch, JAX',
                       description='Each variant in its own process on the same weights and '
                                   'batch; `--suite issue10` runs every workload and checks '
                                   'the targets of issue 10 (`--quick`: tiny, for CI).')
    p.add_argument('--suite', choices=('issue10',),
                   help='a whole suite: workloads x variants x train/infer x step/loop, with '
                        'a markdown table, a plot and the targets under --results-dir')
    p.add_argument('--quick', action='store_true',
                   help='the suite shrunk to the tiny preset, 1 warm-up and 2 timed steps, '
                        '1 round (implies --suite issue10)')
    p.add_argument('--frameworks', '--variants', dest='variants',
                   help='d2l-mxnet, d2l-pytorch, ours-imperative, ours-hybrid, ours-bucketed, '
                        'gluonnlp, torch-eager, torch-compile, jax-jit (or mxnet, d2l, torch, '
                        'torch.compile, jax); default: mxnet,d2l,torch,jax, a suite: all')
    p.add_argument('--workloads', help='a suite\'s workloads to run (default: all): '
                                       'pretrain-book, finetune-small-128, '
                                       'finetune-small-512, finetune-base')
    p.add_argument('--repeats', type=int, help='rounds back to back (default 1; a suite 3)')
    p.add_argument('--allocator', choices=('tuned', 'system'),
                   help="workers' allocator: glibc tuned as gluon-bert runs (default) or "
                        "glibc's defaults (GLUON_BERT_MALLOC=system sets the default)")
    p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                   help='for ours-* (other variants are float32 only)')
    p.add_argument('--modes', help='train,infer (default: train; a suite both)')
    p.add_argument('--timeout', type=float, help='seconds per worker (default 1800; a suite '
                                                 '3600, --quick 600)')
    p.add_argument('--task', choices=('pretrain', 'finetune'), default='pretrain')
    p.add_argument('--preset', default='d2l.pretrain')
    p.add_argument('--vocab-size', type=int, default=20256)
    p.add_argument('--batch-size', type=int, default=512)
    p.add_argument('--seq-len', type=int, default=64)
    p.add_argument('--num-preds', type=int, default=10, help='MLM predictions per sequence')
    p.add_argument('--lengths', choices=('wikitext-2', 'snli', 'uniform'),
                   help="the synthetic batch's sequence lengths: those of the book's "
                        'WikiText-2 pretraining examples (at --seq-len 64) or SNLI pairs '
                        '(at --seq-len 128), or uniform in [2, seq-len] (default: the '
                        "task's data set where it applies)")
    p.add_argument('--steps', type=int, help='timed steps (default 10; a suite: per workload)')
    p.add_argument('--warmup', type=int, help='warm-up steps (default 2; a suite: per workload)')
    p.add_argument('--loop-steps', type=int, help='a suite\'s whole loops: timed steps')
    p.add_argument('--base-batch-size', type=int, help='finetune-base batch (default 8)')
    p.add_argument('--data-dir', help='folder with wikitext-2/ and snli/ for the whole loops '
                                      '(default: ../shared/data if present, else the sample)')
    p.add_argument('--devices')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='experiments/results/bench.jsonl',
                   help='JSON lines file to append to ("" for none)')
    p.add_argument('--results-dir', default='experiments/results',
                   help='where a suite writes bench_<suite>.md and .png')

    p = sub.add_parser('evaluate', help='accuracy of a fine-tuned classifier')
    p.add_argument('run', help='fine-tuning run or checkpoint folder')
    _add_data_args(p, 'SNLI')
    p.add_argument('--split', default='test')
    p.add_argument('--max-len', type=int, default=None)
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--devices')

    p = sub.add_parser('predict', help='classify premise/hypothesis pairs')
    p.add_argument('run', help='fine-tuning run or checkpoint folder')
    p.add_argument('premise', nargs='?')
    p.add_argument('hypothesis', nargs='?')
    p.add_argument('--file', help='tab-separated premise<TAB>hypothesis lines ("-": stdin)')
    p.add_argument('--max-len', type=int, default=None)
    p.add_argument('--devices')

    p = sub.add_parser('launch', help='run a training command as a distributed job',
                       description='Start a scheduler, servers and workers (MXNet KVStore) or '
                                   'Horovod ranks; when any process dies, stop them all.')
    p.add_argument('-n', '--workers', type=int, required=True, help='number of workers')
    p.add_argument('-s', '--servers', type=int, default=1, help='parameter servers (KVStore)')
    p.add_argument('--launcher', choices=('local', 'ssh', 'horovod'), default='local',
                   help='local: this machine; ssh: the hosts of --hostfile; horovod: '
                        'horovodrun --gloo')
    p.add_argument('--hostfile', help='one host (or host:N) per line')
    p.add_argument('--timeout', type=float, help='stop the whole job after this many seconds')
    p.add_argument('--port', type=int, help="the scheduler's port (default: a free one)")
    p.add_argument('job', nargs=argparse.REMAINDER, metavar='-- COMMAND',
                   help='gluon-bert pretrain|finetune --kvstore dist_sync ...')

    p = sub.add_parser('download', help='fetch data sets or checkpoints into the cache')
    p.add_argument('names', nargs='+', metavar='NAME',
                   help='wikitext-2, SNLI, bert.small, bert.base, bert.small.torch, hf:NAME, '
                        'gluonnlp:NAME, ...')
    p.add_argument('--cache-dir', help='default: $GLUON_BERT_HOME or ~/.cache/gluon_bert')
    return parser


def _resolve_data(args, task):
    """--download -> the cached official data set's folder (fetched on first use)."""
    if getattr(args, 'download', False):
        from .data.download import download_extract
        args.data_dir = download_extract(_DATA_SETS[task])
    args.__dict__.pop('download', None)


def _given_settings(args):
    """The training settings named on the command line (None: not given)."""
    return {k: v for k, v in vars(args).items()
            if k not in ('command', 'resume', 'no_progress') and v is not None}


def _print_summary(result):
    shown = {k: v for k, v in result.items() if isinstance(v, (int, float, str, list))
             or v is None}
    print(json.dumps(shown, indent=2, default=str))


def cmd_train(args, task):
    from .config import TrainConfig
    from .train.loop import train
    _resolve_data(args, task)
    given = _given_settings(args)
    cfg = TrainConfig.for_task(task, **given)  # every setting checked before anything runs
    result = train(cfg, resume=args.resume, progress=False if args.no_progress else None,
                   given=given)
    if result.get('rank', 0) == 0:  # one summary for a distributed job
        _print_summary({k: v for k, v in result.items() if k != 'history'})


def cmd_reproduce(args):
    from .report import reproduce
    result = reproduce(data_dir=args.data_dir, download=args.download,
                       out_dir=args.out_dir, recipe=args.recipe,
                       devices=args.devices, seed=args.seed, pretrain_steps=args.pretrain_steps,
                       finetune_epochs=args.finetune_epochs,
                       progress=False if args.no_progress else None)
    print(result['report_text'])


def cmd_compare(args):
    from .compare import compare
    _resolve_data(args, args.task)
    fields = {k: v for k, v in vars(args).items()
              if k not in ('command', 'resume', 'no_progress', 'task', 'frameworks')}
    fields['out_dir'] = fields.get('out_dir') or f'runs/compare-{args.task}'
    if args.task == 'pretrain':
        for key in ('init', 'num_epochs', 'train_split', 'eval_split', 'holdout'):
            fields.pop(key, None)
    result = compare(args.task, frameworks=tuple(args.frameworks.split(',')),
                     progress=False if args.no_progress else None, **fields)
    print(result['table'])


def cmd_bench(args):
    from .bench import format_rows, format_targets, run_bench, run_suite
    from .errors import ConfigError
    for flag in ('repeats', 'steps', 'warmup', 'loop_steps', 'base_batch_size'):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == 'warmup' else 1):
            raise ConfigError(f'--{flag.replace("_", "-")} must be a positive integer, got '
                              f'{value}')
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f'--timeout must be positive, got {args.timeout:g}')
    variants = tuple(args.variants.split(',')) if args.variants else None
    modes = tuple(args.modes.split(',')) if args.modes else None
    bad = [m for m in modes or () if m not in ('train', 'infer')]
    if bad:
        raise ConfigError(f'unknown mode(s) {", ".join(bad)}; choose from train, infer')
    if args.suite or args.quick:
        result = run_suite(args.suite or 'issue10', quick=args.quick, variants=variants,
                           workloads=args.workloads.split(',') if args.workloads else None,
                           repeats=args.repeats, allocator=args.allocator, dtype=args.dtype,
                           modes=modes or ('train', 'infer'), out=args.out or None,
                           results_dir=args.results_dir or None, timeout=args.timeout,
                           devices=args.devices, seed=args.seed,
                           data_root=args.data_dir or 'auto',
                           base_batch_size=args.base_batch_size, steps=args.steps,
                           warmup=args.warmup, loop_steps=args.loop_steps)
        print(format_targets(result['targets']))
        for path in (result['markdown'], result['plot']):
            if path:
                print(path)
        return
    if args.workloads:
        raise ConfigError('--workloads chooses within a suite: add --suite issue10')
    rows = run_bench(frameworks=variants or ('mxnet', 'd2l', 'torch', 'jax'), task=args.task,
                     preset=args.preset, vocab_size=args.vocab_size, batch_size=args.batch_size,
                     seq_len=args.seq_len, num_preds=args.num_preds,
                     lengths=args.lengths or ('wikitext-2' if args.task == 'pretrain'
                                              else 'snli'),
                     steps=10 if args.steps is None else args.steps,
                     warmup=2 if args.warmup is None else args.warmup, devices=args.devices,
                     seed=args.seed, out=args.out or None, modes=modes or ('train',),
                     repeats=args.repeats or 1, allocator=args.allocator, dtype=args.dtype,
                     timeout=args.timeout or 1800, progress=True)
    print(format_rows(rows))


def cmd_evaluate(args):
    from .config import TrainConfig
    from .pretrained import load_classifier
    from .train import evaluate_accuracy, parse_contexts
    from .train.finetune import load_finetuning_data
    _resolve_data(args, 'finetune')
    contexts = parse_contexts(args.devices)
    net, vocab, config = load_classifier(args.run, contexts)
    if args.max_len:
        config.check_max_len(args.max_len)
    net.hybridize(static_alloc=True, static_shape=True)
    cfg = TrainConfig.for_task('finetune', data_dir=args.data_dir, train_split=args.split,
                               eval_split=args.split, batch_size=args.batch_size,
                               max_len=args.max_len or min(128, config.max_len))
    _, loader = load_finetuning_data(cfg, vocab)
    acc = evaluate_accuracy(net, loader, contexts)
    print(json.dumps({'split': args.split, 'examples': loader.num_examples, 'accuracy': acc}))


def cmd_predict(args):
    from .predict import predict_pairs, read_pairs
    if args.file:
        pairs = read_pairs(args.file)
    elif args.premise and args.hypothesis:
        pairs = [(args.premise, args.hypothesis)]
    else:
        raise ValueError('give a premise and a hypothesis, or --file')
    for row in predict_pairs(args.run, pairs, max_len=args.max_len, devices=args.devices):
        print(json.dumps(row))


def cmd_download(args):
    from .data import bert_hub
    from .data.download import DATA_HUB, download, download_extract
    real = ('hf:', 'gluonnlp:')
    unknown = [n for n in args.names if n not in DATA_HUB and not n.startswith(real)]
    if unknown:
        raise ValueError(f'unknown name(s) {", ".join(unknown)}; known: '
                         f'{", ".join(sorted(DATA_HUB))}, hf:<hub name>, gluonnlp:<model zoo '
                         f'name> ({", ".join(bert_hub.GLUONNLP_MODELS)})')
    for name in args.names:
        if name.startswith('hf:'):
            where = bert_hub.hf_folder(name[len('hf:'):], cache_dir=args.cache_dir)
        elif name.startswith('gluonnlp:'):
            where = os.path.dirname(bert_hub.gluonnlp_files(name[len('gluonnlp:'):],
                                                            cache_dir=args.cache_dir)[0])
        else:
            entry = DATA_HUB[name]
            fetch = download_extract if entry.filename.endswith('.zip') else download
            where = fetch(name, cache_dir=args.cache_dir)
        print(f'{name}\t{where}')


def cmd_launch(args):
    from .launch import launch
    return launch(args.job, args.workers, args.servers, launcher=args.launcher,
                  hostfile=args.hostfile, timeout=args.timeout, port=args.port)


def _use_every_core():
    """MXNet's CPU operators start one OpenMP thread per physical core (one on a 2-vCPU
    machine) where PyTorch and JAX use every core; measured here, every core makes our
    pretraining step 1.4x faster. Must run before MXNet is imported; OMP_NUM_THREADS set
    by the user wins."""
    os.environ.setdefault('OMP_NUM_THREADS', str(os.cpu_count() or 1))


# glibc's allocator, tuned for MXNet (shared/FINDINGS.md): MXNet 1.9.1 does not pool CPU
# memory, and buffers freed on its worker threads go back to the OS from glibc's per-thread
# arenas, to be faulted in again every step (~400,000 minor page faults a step of the book's
# pretraining). One arena, no mmap and no trimming keeps the memory in the heap: measured
# here 2 faults a step and the step 1.4x faster, for 40-70% more peak memory (a 1 GiB trim
# threshold, as in FINDINGS, still gave back the step's 1.6 GB in some runs).
# glibc reads it only at process start: `entry` sets it and starts the command again.
GLIBC_TUNABLES = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
                  'glibc.malloc.trim_threshold=68719476736')


def _tune_allocator():
    """Restart this process with GLIBC_TUNABLES set, once, unless the user set it (or an
    allocator of their own, or GLUON_BERT_MALLOC=system to keep glibc's defaults)."""
    if (os.environ.get('GLUON_BERT_MALLOC', 'tuned') != 'tuned' or 'GLIBC_TUNABLES' in os.environ
            or 'LD_PRELOAD' in os.environ or not sys.platform.startswith('linux')
            or _libc() != 'glibc'):
        return
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES, GLUON_BERT_MALLOC='tuned')
    os.execve(sys.executable, [sys.executable, '-m', 'gluon_bert.cli', *sys.argv[1:]], env)


def _libc():
    import platform
    return platform.libc_ver()[0]


def entry():
    """The `gluon-bert` console script: the allocator setting, then `main`."""
    _tune_allocator()
    sys.exit(main())


def _in_distributed_job() -> bool:
    return os.environ.get('DMLC_ROLE') == 'worker' or 'HOROVOD_RANK' in os.environ


def main(argv=None):
    """`gluon-bert`; returns the exit code. A worker of a distributed job that fails exits
    at once: a normal exit would wait for the other workers at the KVStore's final barrier,
    and the launcher could not see it fail."""
    if not _in_distributed_job():
        return _main(argv)
    try:
        code = _main(argv)
    except BaseException:  # a bug: its traceback, then out
        import traceback
        traceback.print_exc()
        code = 1
    if code and code not in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        # (a stop on request is agreed by every worker: they leave the KVStore together)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv=None):
    _use_every_core()
    args = build_parser().parse_args(argv)
    from .errors import GluonBertError
    from .train.common import TrainingInterrupted
    expected = (GluonBertError, ValueError, FileNotFoundError, NotADirectoryError, KeyError)
    try:
        if args.command in ('pretrain', 'finetune'):
            cmd_train(args, args.command)
        elif args.command == 'reproduce':
            cmd_reproduce(args)
        elif args.command == 'compare':
            cmd_compare(args)
        elif args.command == 'bench':
            cmd_bench(args)
        elif args.command == 'evaluate':
            cmd_evaluate(args)
        elif args.command == 'predict':
            cmd_predict(args)
        elif args.command == 'download':
            cmd_download(args)
        elif args.command == 'launch':
            return cmd_launch(args)
    except TrainingInterrupted as stop:
        print(f'gluon-bert {args.command}: {signal.Signals(stop.signum).name}: stopped; '
              f'state saved in {stop.checkpoint} (continue with --resume)', file=sys.stderr)
        return 128 + int(stop.signum)
    except KeyboardInterrupt:
        print(f'gluon-bert {args.command}: interrupted before training started; nothing '
              'to save', file=sys.stderr)
        return 130
    except expected as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f'gluon-bert {args.command}: error: {msg}', file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only or missing folder, ...
        where = f' ({err.filename})' if err.filename else ''
        print(f'gluon-bert {args.command}: error: {err.strerror or err}{where}',
              file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    entry()

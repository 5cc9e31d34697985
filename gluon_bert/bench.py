"""One benchmark harness for every framework: the training step on the same batch.

    gluon-bert bench --frameworks mxnet,d2l,torch,jax --task pretrain --preset d2l.pretrain

For each framework: build the model from the same weights, warm up (graph building,
compilation), then time `steps` training steps with an explicit sync after each one
(`mx.nd.waitall()`, `torch.cuda.synchronize()`, `block_until_ready()`), and report the
median step time, examples/s, tokens/s and model FLOP/s (6 x parameters x tokens, the usual
estimate for a forward + backward pass). One JSON line per framework is appended to
experiments/results/bench.jsonl with versions, device, batch shape and commit.

`d2l` is the book's own MXNet code (d2l 1.0.3 classes under npx.set_np(), not hybridized,
its batch loss that waits on the device after every shard, losses read back every step):
the baseline this project sets out to beat.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import numpy as onp

__all__ = ['bench', 'run_bench', 'DEFAULT_OUT']

DEFAULT_OUT = os.path.join('experiments', 'results', 'bench.jsonl')


def _commit():
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                              text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _time_steps(step, sync, steps, warmup):
    """Per-step wall times, and per step the minor page faults and system seconds (from
    getrusage, over the timed steps: allocation churn shows there, not in wall time)."""
    import resource
    for _ in range(warmup):
        step()
    sync()
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    usage = dict(minor_faults_per_step=(after.ru_minflt - before.ru_minflt) / steps,
                 system_s_per_step=(after.ru_stime - before.ru_stime) / steps,
                 peak_rss_mb=after.ru_maxrss / 1024)
    return times, usage


def _mxnet_step(config, params, batch, task, devices):
    import mxnet as mx
    from .train.runners import MXNetRunner
    runner = MXNetRunner(config, params, task=task, lr=1e-4, devices=devices)
    return (lambda: runner.train_step_async(batch)), mx.nd.waitall, str(runner.contexts)


def _d2l_step(config, params, batch, task, devices):
    """The book's pretraining step with the book's own classes."""
    if task != 'pretrain':
        raise ValueError('the d2l baseline covers pretraining (d2l ships no BERTClassifier)')
    import mxnet as mx
    from mxnet import autograd, gluon, npx
    from d2l import mxnet as d2l
    from .train.devices import parse_contexts
    npx.set_np()
    ctxs = parse_contexts(devices)
    net = d2l.BERTModel(config.vocab_size, config.num_hiddens, config.ffn_num_hiddens,
                        config.num_heads, config.num_blks, config.dropout, config.max_len)
    net.initialize(ctx=ctxs)
    keys = ('tokens', 'segments', 'valid_lens', 'pred_positions')
    net(*[mx.np.array(batch[k][:2], ctx=ctxs[0]) for k in keys])  # finish deferred init
    for name, p in net._collect_params_with_prefix().items():
        p.set_data(mx.np.array(params[name]))
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = gluon.Trainer(net.collect_params(), 'adam', {'learning_rate': 1e-4})
    order = ('tokens', 'segments', 'valid_lens', 'pred_positions', 'mlm_weights',
             'mlm_labels', 'nsp_labels')
    arrays = [mx.np.array(batch[k]) for k in order]

    def step():
        shards = [gluon.utils.split_and_load(a, ctxs, even_split=False) for a in arrays]
        with autograd.record():
            mlm_ls, nsp_ls, ls = d2l._get_batch_loss_bert(net, loss, config.vocab_size, *shards)
        for l in ls:
            l.backward()
        trainer.step(1)
        return [float(l) for l in mlm_ls + nsp_ls]  # the book reads the losses every step

    return step, npx.waitall, str(ctxs)


def _port_step(framework, config, params, batch, task):
    from .train.runners import make_runner
    name = 'torch' if framework.startswith('torch') else framework
    kwargs = dict(task=task, lr=1e-4)
    if framework == 'torch.compile':
        kwargs['compile'] = True
    runner = make_runner(name, config, params, **kwargs)
    device = getattr(runner, 'device', None)
    if device is None:
        import jax
        device = jax.devices()[0]
    return (lambda: runner.train_step_async(batch)), runner.sync, str(device)


def bench(framework, config, params, batch, task='pretrain', steps=10, warmup=2, devices=None):
    """Time one framework's training step; returns a result dict."""
    if framework == 'mxnet':
        step, sync, device = _mxnet_step(config, params, batch, task, devices)
    elif framework == 'd2l':
        step, sync, device = _d2l_step(config, params, batch, task, devices)
    elif framework in ('torch', 'torch.compile', 'jax'):
        step, sync, device = _port_step(framework, config, params, batch, task)
    else:
        raise ValueError(f'unknown framework {framework!r}: mxnet, d2l, torch, torch.compile, jax')
    try:
        times, usage = _time_steps(step, sync, steps, warmup)
    finally:
        if framework == 'd2l':  # the book's mode stays with the book's run
            from mxnet import npx
            npx.reset_np()
    median = statistics.median(times)
    B, L = batch['tokens'].shape
    tokens = float(batch['valid_lens'].sum())
    non_embedding = sum(v.size for k, v in params.items() if 'embedding' not in k)
    return dict(framework=framework, task=task, preset=config.preset, batch_size=B,
                seq_len=L, device=device, steps=steps, warmup=warmup,
                median_step_s=median, min_step_s=min(times),
                examples_per_sec=B / median, tokens_per_sec=tokens / median,
                model_tflops_per_sec=6 * non_embedding * tokens / median / 1e12, **usage)


def _environment():
    """The settings that move these numbers: allocator, threads."""
    keys = ('GLIBC_TUNABLES', 'MALLOC_CONF', 'LD_PRELOAD', 'OMP_NUM_THREADS', 'OMP_WAIT_POLICY',
            'GLUON_BERT_MALLOC', 'MXNET_EXEC_BULK_EXEC_TRAIN')
    return {k: os.environ[k] for k in keys if k in os.environ}


def _versions():
    out = {}
    for mod in ('mxnet', 'torch', 'jax', 'numpy'):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def run_bench(frameworks=('mxnet', 'd2l', 'torch', 'jax'), task='pretrain',
              preset='d2l.pretrain', vocab_size=20256, batch_size=512, seq_len=64,
              num_preds=10, steps=10, warmup=2, devices=None, seed=0, out=DEFAULT_OUT):
    """Benchmark `frameworks` on one batch; appends a JSON line each; returns the rows."""
    import mxnet as mx
    from mxnet import init
    from .config import BERTConfig
    from .model import BERTClassifier, BERTModel
    from .ports.synthetic import synthetic_batch
    from .ports.convert import mxnet_params as params_of
    config = BERTConfig.from_preset(preset, vocab_size=vocab_size)
    mx.random.seed(seed)
    net = BERTModel(config) if task == 'pretrain' else BERTClassifier(config)
    net.initialize(init.Xavier())
    params = params_of(net)
    batch = synthetic_batch(onp.random.default_rng(seed), config, task, batch_size, seq_len,
                            num_preds)
    rows = []
    common = dict(date=datetime.datetime.now().isoformat(timespec='seconds'),
                  machine=platform.platform(), cpus=os.cpu_count(), commit=_commit(),
                  versions=_versions(), dtype='float32', environment=_environment())
    for fw in frameworks:
        try:
            row = bench(fw, config, params, batch, task, steps, warmup, devices)
        except ImportError as err:
            row = dict(framework=fw, skipped=f'not installed: {err}')
        row.update(common)
        rows.append(row)
        if out:
            os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
            with open(out, 'a', encoding='utf-8') as f:
                f.write(json.dumps(row, sort_keys=True) + '\n')
    base = next((r['examples_per_sec'] for r in rows if r['framework'] == 'mxnet'
                 and 'examples_per_sec' in r), None)
    for r in rows:
        if base and 'examples_per_sec' in r:
            r['ratio_to_mxnet'] = r['examples_per_sec'] / base
    return rows


def format_rows(rows):
    lines = ['| framework | device | batch x len | median step (s) | examples/s | tokens/s | '
             'ratio to ours |', '|---|---|---|---|---|---|---|']
    for r in rows:
        if 'skipped' in r:
            lines.append(f"| {r['framework']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['framework']} | {r['device']} | {r['batch_size']}x{r['seq_len']} | "
                     f"{r['median_step_s']:.3f} | {r['examples_per_sec']:.1f} | "
                     f"{r['tokens_per_sec']:.0f} | {r.get('ratio_to_mxnet', float('nan')):.2f} |")
    return '\n'.join(lines)

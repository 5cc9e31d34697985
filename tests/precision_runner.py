"""`python tests/precision_runner.py COMMAND JSON`: mixed-precision work in a process of its own.

MXNet's `amp.init` patches operator modules for the whole process and cannot be undone, so
no bfloat16 MXNet code may run inside the pytest process; tests/test_precision.py starts
this script instead and reads the one JSON object it prints on its last line of stdout.

Commands (JSON holds the keyword arguments of the function of the same name below):
    steps    `run_steps`: outputs, then a few training steps, of one dtype (the tests
             import it for the float32 reference, which needs no amp)
    switch   a second, different dtype in a process that already has one
    cli      `gluon-bert ARGV` here, then this process (still in the run's dtype) predicts
             with the run's classifier
    amx      `enable_amx` under several environments
    isa      one bfloat16 step, for DNNL_VERBOSE to report oneDNN's instruction set
"""
from __future__ import annotations

import json
import os
import sys

import numpy as onp

VOCAB = 60          # small vocabulary of the synthetic batches
B, L, P = 16, 16, 3  # batch, sequence length, MLM predictions per sequence


def make_case(task: str, seed: int):
    """(BERTConfig, params, batch) from numpy alone, identical in every process: the tiny
    preset without dropout (a training step is then deterministic), weights drawn with
    a RandomState in sorted name order, one synthetic batch of the task."""
    import mxnet as mx
    from gluon_bert.config import BERTConfig
    from gluon_bert.model import BERTClassifier, BERTModel
    config = BERTConfig.from_preset('tiny', vocab_size=VOCAB, dropout=0.0)
    net = BERTModel(config) if task == 'pretrain' else BERTClassifier(config)
    net.initialize(ctx=mx.cpu())
    shapes = {n: p.shape for n, p in net._collect_params_with_prefix().items()}
    rs = onp.random.RandomState(seed)
    params = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith('gamma'):
            value = 1.0 + 0.1 * rs.randn(*shape)
        elif name.endswith(('beta', 'bias')):
            value = 0.05 * rs.randn(*shape)
        else:  # Glorot-like scale on the last two axes
            fan = shape[-1] + (shape[-2] if len(shape) > 1 else shape[-1])
            value = rs.randn(*shape) * onp.sqrt(2.0 / fan)
        params[name] = value.astype('float32')
    valid = rs.randint(P + 2, L + 1, B)
    tokens = rs.randint(5, VOCAB, (B, L)).astype('int32')
    for b, n in enumerate(valid):
        tokens[b, n:] = 0
    batch = dict(tokens=tokens, segments=(rs.rand(B, L) > .5).astype('int32'),
                 valid_lens=valid.astype('float32'))
    if task == 'pretrain':
        batch.update(
            pred_positions=onp.stack([rs.choice(n, P, replace=False)
                                      for n in valid]).astype('int32'),
            mlm_weights=(rs.rand(B, P) > .2).astype('float32'),
            mlm_labels=rs.randint(0, VOCAB, (B, P)).astype('int32'),
            nsp_labels=rs.randint(0, 2, B).astype('int32'))
    else:
        batch['labels'] = rs.randint(0, 3, B).astype('int32')
    return config, params, batch


def as_float32(a):
    """A numpy array as float32; MXNet hands bfloat16 out as a structured dtype
    [('bfloat16', '<u2')] (the upper half of a float32's bits), numpy has no bfloat16."""
    a = onp.asarray(a)
    if a.dtype.names == ('bfloat16',):
        return (a.view('<u2').astype(onp.uint32) << 16).view(onp.float32)
    return a.astype(onp.float32)


def _outputs(runner, batch, task):
    """(outputs of the model on the batch (dropout off) as float32 lists, {name: the dtype
    `predict` returned})."""
    out = runner.predict(batch)
    out = dict(mlm=out[0], nsp=out[1]) if task == 'pretrain' else dict(logits=out)
    return ({k: as_float32(v).tolist() for k, v in out.items()},
            {k: str(v.dtype) for k, v in out.items()})


def _name(dtype):
    return onp.dtype(dtype).name


def run_steps(task='pretrain', dtype='float32', steps=10, seed=0, lr=5e-3, devices='cpu'):
    """Outputs of the initial weights, then `steps` training steps on one repeated batch:
    {'outputs', 'losses' (one row of metrics a step), 'dtypes' of parameters, gradients
    and Adam's state, 'active' (the process's compute dtype)}."""
    import mxnet as mx
    from gluon_bert.train import precision
    from gluon_bert.train.runners import MXNetRunner
    config, params, batch = make_case(task, seed)
    runner = MXNetRunner(config, params, task=task, lr=lr, seed=seed, devices=devices,
                         dtype=dtype)
    outputs, predict_dtypes = _outputs(runner, batch, task)
    rows = runner.read_metrics([runner.train_step_async(batch, s) for s in range(steps)])
    net_params = runner.net._collect_params_with_prefix()
    grads = {_name(p.grad().dtype) for p in net_params.values() if p.grad_req != 'null'}
    states = {_name(a.dtype) for s in runner.trainer._updaters[0].states.values() for a in s}
    mx.nd.waitall()
    scale = runner.step.loss_scale
    return dict(outputs=outputs, predict_dtypes=predict_dtypes, losses=rows,
                active=precision.active_dtype(), loss_scale=scale and scale.scale,
                dtypes=dict(params=sorted({_name(p.dtype) for p in net_params.values()}),
                            data=sorted({_name(p.data().dtype) for p in net_params.values()}),
                            numpy=sorted({_name(a.dtype) for a in runner.params().values()}),
                            grads=sorted(grads), adam=sorted(states)))


def switch(first, second):
    """use_mixed_precision(first) (twice: the same again is allowed), then each dtype of
    `second` and a float32 MXNetRunner -> {what was tried: the error or None}."""
    from gluon_bert.errors import ConfigError
    from gluon_bert.train import precision
    from gluon_bert.train.runners import MXNetRunner
    precision.use_mixed_precision(first)
    precision.use_mixed_precision(first)
    errors = {}

    def attempt(label, fn):
        try:
            fn()
            errors[label] = None
        except ConfigError as err:
            errors[label] = str(err)
    for dtype in second:
        attempt(dtype, lambda: precision.use_mixed_precision(dtype))
    config, params, _ = make_case('finetune', 0)
    attempt('runner-float32', lambda: MXNetRunner(config, params, task='finetune',
                                                  devices='cpu', dtype='float32'))
    return dict(errors=errors, active=precision.active_dtype())


def cli(argv, batch, out):
    from gluon_bert.cli import main
    from gluon_bert.pretrained import load_classifier
    from gluon_bert.train import precision
    import mxnet as mx
    code = main(argv)
    result = dict(code=code, active=precision.active_dtype())
    if code == 0 and batch:
        run = argv[argv.index('--out-dir') + 1]
        net, _, _ = load_classifier(run, [mx.cpu()])
        data = onp.load(batch)
        args = [mx.nd.array(data[k], dtype=data[k].dtype)
                for k in ('tokens', 'segments', 'valid_lens')]
        onp.savez(out, logits=net(*args).asnumpy())
    return result


def amx(cases):
    """enable_amx() once per case, in order, each with the environment variables of the
    case set (a value of null: unset) -> [{'enabled', the ISA variables afterwards}]."""
    from gluon_bert import cpu
    names = ('GLUON_BERT_AMX', 'DNNL_MAX_CPU_ISA', 'ONEDNN_MAX_CPU_ISA')
    out = []
    for case in cases:
        for name in names:
            os.environ.pop(name, None)
        os.environ.update({k: v for k, v in case.items() if v is not None})
        enabled = cpu.enable_amx()
        out.append(dict(enabled=enabled, **{n: os.environ.get(n) for n in names[1:]}))
    return out


def isa():
    """One bfloat16 step as a run makes it (weights initialised first, then the runner);
    under DNNL_VERBOSE=1 oneDNN prints the instruction set it chose on stdout."""
    from gluon_bert.train.runners import MXNetRunner
    config, params, batch = make_case('pretrain', 0)
    runner = MXNetRunner(config, params, task='pretrain', devices='cpu', dtype='bfloat16')
    runner.train_step(batch, 0)
    return {}


COMMANDS = dict(steps=run_steps, switch=switch, cli=cli, amx=amx, isa=isa)

if __name__ == '__main__':
    command, args = sys.argv[1], json.loads(sys.argv[2] if len(sys.argv) > 2 else '{}')
    result = COMMANDS[command](**args)
    sys.stdout.flush()
    print(json.dumps(result))

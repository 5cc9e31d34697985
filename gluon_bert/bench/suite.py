"""What the benchmark measures: the variants (implementations, each at its best practice) and
the workloads (model shape, batch, steps), by stable names that the results keep.

A measurement is one (workload, variant, mode, scope, dtype, allocator):
    mode   'train' (forward, loss, backward, Adam) or 'infer' (forward only, no gradients)
    scope  'step' (one fixed batch, repeated) or 'loop' (`train.loop.train`, or the book's
           own loop, with its data pipeline on real data where there is some)
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ConfigError

__all__ = ['Workload', 'VARIANTS', 'ALIASES', 'WORKLOADS', 'SUITES', 'workloads_for',
           'resolve_variants', 'plan', 'Measurement']


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    task: str                 # 'pretrain' or 'finetune'
    preset: str
    vocab_size: int
    batch_size: int
    seq_len: int
    num_preds: int = 0        # MLM predictions per sequence (pretraining)
    steps: int = 6            # timed steps of a step measurement
    warmup: int = 2
    loop_steps: int = 0       # >0: also the whole loop, timed over this many steps
    data: str = ''            # the real data set of the loop: 'wikitext-2' or 'snli'
    lengths: str = ''         # the step's batch: uniform lengths, 'wikitext-2''s or 'snli''s

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data) -> 'Workload':
        return cls(**data)


# name -> (what it is, modules it needs, scopes it has, tasks it covers)
VARIANTS: dict[str, dict[str, Any]] = {
    'd2l-mxnet': dict(about="the book's d2l 1.0.3 MXNet code (npx.set_np, not hybridized, "
                            'its batch loss and per-batch read-backs)',
                      needs=('mxnet', 'd2l'), scopes=('step', 'loop')),
    'd2l-pytorch': dict(about="the book's d2l 1.0.3 PyTorch code (its batch loss, Adam, "
                              'per-batch read-backs)',
                        needs=('torch', 'd2l'), scopes=('step', 'loop')),
    'ours-imperative': dict(about='this package, MXNetRunner(hybridize=False)',
                            needs=('mxnet',), scopes=('step',)),
    'ours-hybrid': dict(about='this package, MXNetRunner (hybridized, static memory; '
                              'no arithmetic on what nothing reads: steps and inference '
                              'packed, the last block only at the rows the heads read)',
                        needs=('mxnet',), scopes=('step', 'loop')),
    'ours-padded': dict(about='ours-hybrid with the book\'s arithmetic (packed=False): '
                              'padded batches, the last block on every position',
                        needs=('mxnet',), scopes=('step',)),
    'ours-bucketed': dict(about='this package, whole loop with length-bucketed batches '
                                "(pad_to='longest', bucket=True)",
                          needs=('mxnet',), scopes=('loop',), tasks=('finetune',)),
    'gluonnlp': dict(about="GluonNLP 0.10's BERTModel of the same shape (hybridized, static "
                           'memory, Adam, the same losses)',
                     needs=('mxnet', 'gluonnlp'), scopes=('step',)),
    'torch-eager': dict(about='our PyTorch port, eager', needs=('torch',),
                        scopes=('step', 'loop')),
    'torch-compile': dict(about='our PyTorch port, torch.compile', needs=('torch',),
                          scopes=('step',)),
    'jax-jit': dict(about='our JAX port, the whole step in jax.jit', needs=('jax',),
                    scopes=('step', 'loop')),
}
# `--frameworks` names of the first harness
ALIASES = {'mxnet': 'ours-hybrid', 'd2l': 'd2l-mxnet', 'torch': 'torch-eager',
           'torch.compile': 'torch-compile', 'jax': 'jax-jit'}
# Why a variant has no whole-loop measurement (a row says so once per run)
NO_LOOP = {
    'ours-imperative': 'train.loop builds the hybridized runner; it has no imperative option',
    'torch-compile': 'train.loop has no torch.compile option (TrainConfig.framework only)',
    'gluonnlp': 'GluonNLP 0.10 ships no BERT training loop of its own (step only)',
}

WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    # the book's pretraining shape (sec. "Pretraining BERT")
    Workload('pretrain-book', 'pretrain', 'd2l.pretrain', 20256, 512, 64, num_preds=10,
             steps=6, warmup=2, loop_steps=10, data='wikitext-2', lengths='wikitext-2'),
    # the book's fine-tuning shape (sec. "Fine-Tuning BERT"), at two batch sizes
    # (padded to 128 as the book pads, at the lengths of real SNLI pairs)
    Workload('finetune-small-128', 'finetune', 'bert.small', 20256, 128, 128, steps=6,
             warmup=2, lengths='snli'),
    Workload('finetune-small-512', 'finetune', 'bert.small', 20256, 512, 128, steps=4,
             warmup=1, loop_steps=4, data='snli', lengths='snli'),
    # bert.base at a batch this 2-core machine steps in seconds (--base-batch-size)
    Workload('finetune-base', 'finetune', 'bert.base', 20256, 8, 128, steps=3, warmup=1,
             lengths='snli'),
)}
SUITES = {'issue10': tuple(WORKLOADS)}


def workloads_for(suite: str, quick: bool = False, base_batch_size: int | None = None,
                  steps: int | None = None, warmup: int | None = None,
                  loop_steps: int | None = None, only=None) -> list[Workload]:
    """The workloads of a suite; `quick` shrinks each to the `tiny` preset, a tiny batch,
    1 warm-up and 2 timed steps (the smoke test)."""
    if suite not in SUITES:
        raise ConfigError(f'unknown suite {suite!r}; known: {", ".join(SUITES)}')
    names = list(SUITES[suite])
    if only:
        unknown = [n for n in only if n not in WORKLOADS]
        if unknown:
            raise ConfigError(f'unknown workload(s) {", ".join(unknown)}; known: '
                              f'{", ".join(WORKLOADS)}')
        names = [n for n in names if n in only]
    out = []
    for name in names:
        w = WORKLOADS[name]
        if name == 'finetune-base' and base_batch_size:
            w = dataclasses.replace(w, batch_size=base_batch_size)
        if quick:
            w = dataclasses.replace(w, preset='tiny', vocab_size=100, batch_size=4,
                                    seq_len=32,
                                    num_preds=3 if w.task == 'pretrain' else 0, steps=2,
                                    warmup=1, loop_steps=2 if w.loop_steps else 0)
        changes = {k: v for k, v in dict(steps=steps, warmup=warmup).items() if v is not None}
        if loop_steps is not None and w.loop_steps:
            changes['loop_steps'] = loop_steps
        out.append(dataclasses.replace(w, **changes))
    return out


def resolve_variants(names) -> list[str]:
    """Variant names (or the first harness's framework names) -> variant names."""
    out, unknown = [], []
    for name in names:
        name = ALIASES.get(name, name)
        if name not in VARIANTS:
            unknown.append(name)
        elif name not in out:
            out.append(name)
    if unknown:
        raise ConfigError(f'unknown variant(s) {", ".join(unknown)}; known: '
                          f'{", ".join(VARIANTS)} (or {", ".join(ALIASES)})')
    return out


@dataclasses.dataclass(frozen=True)
class Measurement:
    workload: Workload
    variant: str
    mode: str = 'train'
    scope: str = 'step'
    dtype: str = 'float32'
    allocator: str = 'tuned'
    skipped: str | None = None  # planned as a row that says why it is not measured

    @property
    def key(self):
        return (self.workload.name, self.variant, self.mode, self.scope, self.dtype,
                self.allocator)


def plan(workloads, variants, modes=('train', 'infer'), scopes=('step', 'loop'),
         dtype='float32') -> list[Measurement]:
    """The measurements of one round, in order: workload by workload, then variant; a
    variant without a whole loop gets a row that says why, once."""
    out = []
    for w in workloads:
        for v in variants:
            info = VARIANTS[v]
            if w.task not in info.get('tasks', ('pretrain', 'finetune')):
                continue
            for scope in scopes:
                if scope == 'loop':
                    if not w.loop_steps or 'train' not in modes:  # a loop trains
                        continue
                    if scope not in info['scopes']:
                        if v in NO_LOOP:
                            out.append(Measurement(w, v, 'train', 'loop', dtype,
                                                   skipped=NO_LOOP[v]))
                        continue
                    out.append(Measurement(w, v, 'train', 'loop', dtype))
                    continue
                if scope not in info['scopes']:
                    continue
                out.extend(Measurement(w, v, mode, 'step', dtype) for mode in modes)
    return out

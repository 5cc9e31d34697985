"""Frozen model configuration, named presets and JSON round-trip.

One `BERTConfig` describes a BERT's shape; it is saved beside every checkpoint
(`config.json`) so that a checkpoint can always be rebuilt and checked against
the model that loads it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ['BERTConfig', 'TrainConfig', 'PRESETS', 'preset_names']


# What the BERT paper's models add to the book's architecture (see BERTConfig).
_BERT = dict(activation='gelu', embedding_norm=True, layer_norm_eps=1e-12, tie_mlm_decoder=True)

# Shapes of the BERTs that users know by name. The vocabulary size is not part of
# a preset: it comes from the vocabulary the model is built for.
PRESETS: dict[str, dict[str, Any]] = {
    # The BERT that the book pretrains on WikiText-2 (sec. "Pretraining BERT").
    'd2l.pretrain': dict(num_hiddens=128, ffn_num_hiddens=256, num_heads=2,
                         num_blks=2, dropout=0.2, max_len=1000),
    # The book's downloadable MXNet checkpoints (sec. "Fine-Tuning BERT").
    'bert.small': dict(num_hiddens=256, ffn_num_hiddens=512, num_heads=4,
                       num_blks=2, dropout=0.1, max_len=512),
    'bert.base': dict(num_hiddens=768, ffn_num_hiddens=3072, num_heads=12,
                      num_blks=12, dropout=0.1, max_len=512),
    # Small enough for unit tests (HF's BertModelTester uses hidden 32, 2 layers).
    'tiny': dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2,
                 num_blks=2, dropout=0.1, max_len=64),
    # The BERTs of the paper, as GluonNLP's model zoo and Hugging Face publish them: GELU,
    # a LayerNorm after the embeddings, epsilon 1e-12, the MLM decoder tied to the token
    # embedding (names as gluon-nlp's `bert_12_768_12`; HF's bert-base-* / bert-large-*).
    'bert_12_768_12': dict(num_hiddens=768, ffn_num_hiddens=3072, num_heads=12,
                           num_blks=12, dropout=0.1, max_len=512, **_BERT),
    'bert_24_1024_16': dict(num_hiddens=1024, ffn_num_hiddens=4096, num_heads=16,
                            num_blks=24, dropout=0.1, max_len=512, **_BERT),
    # `tiny` with the real BERT's options, for unit tests of the import paths.
    'tiny.bert': dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2,
                      num_blks=2, dropout=0.1, max_len=64, **_BERT),
}
ACTIVATIONS = ('relu', 'gelu')


def preset_names() -> list[str]:
    return sorted(PRESETS)


@dataclasses.dataclass(frozen=True)
class BERTConfig:
    """Hyper-parameters of a BERT, with the book's argument names."""
    vocab_size: int
    num_hiddens: int = 128
    ffn_num_hiddens: int = 256
    num_heads: int = 2
    num_blks: int = 2
    dropout: float = 0.2
    max_len: int = 1000
    num_classes: int = 3  # outputs of BERTClassifier (SNLI: 3)
    preset: str | None = None  # the preset this config was made from, if any
    # What real BERTs add to the book's architecture; the defaults are the book's.
    activation: str = 'relu'        # of the FFN and the MLM hidden layer; 'gelu' (erf form)
    embedding_norm: bool = False    # LayerNorm, then dropout, after the summed embeddings
    layer_norm_eps: float = 1e-5    # MXNet's default (the book's); BERT uses 1e-12
    tie_mlm_decoder: bool = False   # MLM output = hidden @ token_embedding.T + its own bias

    def __post_init__(self):
        for field in ('vocab_size', 'num_hiddens', 'ffn_num_hiddens', 'num_heads',
                      'num_blks', 'max_len', 'num_classes'):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f'BERTConfig.{field} must be a positive integer, got {value!r}')
        if self.num_hiddens % self.num_heads:
            raise ConfigError(f'num_hiddens ({self.num_hiddens}) must be divisible by '
                             f'num_heads ({self.num_heads})')
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f'dropout must be in [0, 1), got {self.dropout!r}')
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f'activation must be one of {", ".join(ACTIVATIONS)}, got '
                              f'{self.activation!r}')
        for field in ('embedding_norm', 'tie_mlm_decoder'):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f'BERTConfig.{field} must be true or false, got '
                                  f'{getattr(self, field)!r}')
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError(f'layer_norm_eps must be a number in (0, 1), got {eps!r}')

    # -- construction ---------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, vocab_size: int, **overrides) -> 'BERTConfig':
        if name not in PRESETS:
            raise ConfigError(f'unknown BERT preset {name!r}; known presets: '
                             f'{", ".join(preset_names())}')
        fields = dict(PRESETS[name], **overrides)
        return cls(vocab_size=vocab_size, preset=name, **fields)

    @classmethod
    def from_args(cls, config, *args, **kwargs) -> 'BERTConfig':
        """A BERTConfig as is, or one from the book's constructor arguments
        `(vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_blks, dropout,
        max_len=1000)`, positional or by keyword: every framework's BERTModel takes both."""
        if isinstance(config, cls):
            if args or kwargs:
                raise TypeError("pass either a BERTConfig or the book's arguments, not both")
            return config
        names = ('vocab_size', 'num_hiddens', 'ffn_num_hiddens', 'num_heads', 'num_blks',
                 'dropout', 'max_len')
        if len(args) >= len(names):
            raise TypeError(f'BERTModel takes at most {len(names)} arguments: '
                            f'{", ".join(names)}')
        fields = dict(zip(names, (config,) + tuple(args)))
        for key, value in kwargs.items():
            if key in fields:
                raise TypeError(f'argument {key!r} given twice')
            fields[key] = value
        return cls(**fields)

    def replace(self, **changes) -> 'BERTConfig':
        return dataclasses.replace(self, **changes)

    def check_max_len(self, max_len: int) -> None:
        """Refuse sequences longer than the model has positions for."""
        if max_len > self.max_len:
            raise ConfigError(f'--max-len {max_len} exceeds the model\'s {self.max_len} '
                              'positions: choose at most that')

    # -- JSON round-trip ------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'BERTConfig':
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f'unknown BERTConfig fields: {", ".join(unknown)}')
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> 'BERTConfig':
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON, atomically (a crash never leaves half a file)."""
        path = os.fspath(path)
        tmp = f'{path}.tmp{os.getpid()}'
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(self.to_json() + '\n')
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> 'BERTConfig':
        with open(path, encoding='utf-8') as f:
            return cls.from_json(f.read())


TASKS = ('pretrain', 'finetune')
FRAMEWORKS = ('mxnet', 'torch', 'jax')
SCHEDULES = ('constant', 'linear', 'cosine')
# 'device' reduces gradients on the GPUs, 'local' on the CPU, 'none' not at all (one
# device); the dist_* ones are MXNet's parameter server across processes and machines,
# 'horovod' is Horovod's allreduce (both under `gluon-bert launch`).
KVSTORES = ('device', 'local', 'none', 'dist_sync', 'dist_device_sync', 'dist_async', 'horovod')
# What a resumed run may change: its length, how often it logs and checkpoints, and where
# it runs (losses are normalised by the global batch, so the devices do not change the
# result). Everything else is the checkpoint's.
RESUME_CHANGEABLE = ('num_steps', 'num_epochs', 'log_interval', 'checkpoint_interval',
                     'devices', 'kvstore', 'dtype')
DTYPES = ('float32', 'bfloat16', 'float16')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved in every checkpoint's state.json.

    Defaults are the book's: pretraining 50 steps of batch 512 at max_len 64 with Adam lr
    0.01 on `d2l.pretrain`; fine-tuning 5 epochs of batch 512 at max_len 128, lr 1e-4.
    """
    task: str = 'pretrain'
    data_dir: str | None = None     # None: the sample shipped in the package
    out_dir: str = 'runs/pretrain'
    preset: str = 'd2l.pretrain'    # pretraining: the model shape
    init: str | None = None         # fine-tuning: a pretraining run/checkpoint, or bert.small
    batch_size: int = 512
    max_len: int = 64
    lr: float = 0.01
    num_steps: int = 50             # pretraining length, in updates
    num_epochs: int = 5             # fine-tuning length
    seed: int = 0
    devices: str = 'auto'           # 'auto' = every GPU, else CPU; or 'cpu(0),cpu(1)'
    kvstore: str = 'device'
    warmup_steps: int = 0
    schedule: str = 'constant'
    clip_norm: float | None = None
    log_interval: int = 10          # updates between metric read-backs
    checkpoint_interval: int = 0    # updates between checkpoints (0: end of run/epoch only)
    pad_to: str = 'max_len'         # or 'longest': each batch padded to its longest example
    bucket: bool = False            # length-bucketed sampling (with pad_to='longest')
    train_split: str = 'train'
    eval_split: str = 'test'
    holdout: int = 0                # >0: hold out this many train pairs as the eval set
    train_limit: int = 0            # >0: use only this many training examples
    framework: str = 'mxnet'
    dtype: str = 'float32'          # compute dtype; weights and optimizer stay float32

    def __post_init__(self):
        """Every setting is checked here, before a run reads data or writes anything."""
        def bad(field, why):
            flag = '--' + field.replace('_', '-')
            return ConfigError(f'{field} must be {why}, got {getattr(self, field)!r} ({flag})')

        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        if self.task not in TASKS:
            raise ConfigError(f'task must be one of {TASKS}, got {self.task!r}')
        for field in ('batch_size', 'max_len', 'num_steps', 'num_epochs', 'log_interval'):
            if not is_int(getattr(self, field)) or getattr(self, field) <= 0:
                raise bad(field, 'a positive integer')
        for field in ('warmup_steps', 'checkpoint_interval', 'train_limit', 'holdout', 'seed'):
            if not is_int(getattr(self, field)) or getattr(self, field) < 0:
                raise bad(field, 'a non-negative integer')
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise bad('lr', 'a positive finite number')
        if self.clip_norm is not None and (not isinstance(self.clip_norm, (int, float)) or
                                           not math.isfinite(self.clip_norm) or
                                           self.clip_norm <= 0):
            raise bad('clip_norm', 'a positive finite number (leave it out for no clipping)')
        if self.pad_to not in ('max_len', 'longest'):
            raise bad('pad_to', "'max_len' or 'longest'")
        if self.max_len < 8:
            raise bad('max_len', 'at least 8')
        if self.schedule not in SCHEDULES:
            raise bad('schedule', 'one of ' + ', '.join(SCHEDULES))
        if self.kvstore not in KVSTORES:
            raise bad('kvstore', 'one of ' + ', '.join(KVSTORES))
        if self.framework not in FRAMEWORKS:
            raise bad('framework', 'one of ' + ', '.join(FRAMEWORKS))
        if self.dtype not in DTYPES:
            raise bad('dtype', 'one of ' + ', '.join(DTYPES))
        if self.dtype != 'float32' and self.framework == 'jax':
            raise ConfigError(f'--dtype {self.dtype} is for the MXNet model and the torch '
                              'port; the JAX port trains in float32')
        if self.kvstore == 'dist_async':
            raise ConfigError('--kvstore dist_async applies updates on the servers, where '
                              'this package cannot clip gradients or save the optimizer state '
                              'by parameter name for an exact resume: use dist_sync')
        if self.framework != 'mxnet' and self.kvstore in ('dist_sync', 'dist_device_sync',
                                                          'horovod'):
            raise ConfigError(f'--kvstore {self.kvstore} trains MXNet across processes; the '
                              f'{self.framework} port trains in one process')
        if self.framework != 'mxnet' and self.devices not in (None, '', 'auto'):
            raise ConfigError(f'--devices {self.devices} is for MXNet; the {self.framework} '
                              'port trains on one device (the first GPU, else the CPU): '
                              'leave --devices out')
        if not self.out_dir:
            raise bad('out_dir', 'a folder')

    @classmethod
    def for_task(cls, task: str, **overrides) -> 'TrainConfig':
        """The book's defaults for `task`, then `overrides` (None values are ignored)."""
        base = dict(task=task)
        if task == 'finetune':
            base.update(out_dir='runs/finetune', lr=1e-4, max_len=128, preset='bert.small')
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def replace(self, **changes) -> 'TrainConfig':
        return dataclasses.replace(self, **changes)

    def resumed_with(self, given: Mapping[str, Any]) -> tuple['TrainConfig', dict[str, Any]]:
        """This config (a checkpoint's) with the settings that a resumed run was given ->
        (config, {setting: new value}). Settings that would change what was already
        trained are refused; those in RESUME_CHANGEABLE are taken (and returned, for the
        record). Settings not given (None) keep the checkpoint's value."""
        known = {f.name for f in dataclasses.fields(self)}
        changes = {}
        for key, value in given.items():
            if value is None or key not in known or value == getattr(self, key):
                continue
            if key not in RESUME_CHANGEABLE:
                flag = '--' + key.replace('_', '-')
                raise ConfigError(
                    f'{flag} {value} conflicts with the run being resumed ({key} '
                    f'{getattr(self, key)!r}); leave it out to continue with the run\'s own '
                    f'settings, or start a new run in another --out-dir')
            changes[key] = value
        return self.replace(**changes), changes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'TrainConfig':
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

"""Checkpoints that survive a crash: written into a temporary folder, then renamed.

Layout of one checkpoint folder:
    config.json     the BERTConfig of the model
    vocab.json      the vocabulary (idx_to_token list, the book's format)
    model.params    the network's parameters (BERTModel or BERTClassifier)
    trainer.states  optimizer state (Adam moments, update counts)
    state.json      task, step, epoch, training config and metric history
A run folder keeps `ckpt-<step>/` folders and a `latest` file naming the newest complete one.
A folder only gets its final name once every file in it is written and flushed, so a run
killed at any moment resumes from the last good checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

from ..config import BERTConfig

__all__ = ['save_checkpoint', 'latest_checkpoint', 'read_state', 'CheckpointError',
           'load_config', 'REQUIRED_FILES']

REQUIRED_FILES = ('config.json', 'vocab.json', 'model.params', 'state.json')


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path, data):
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write('\n')
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str, step: int, net, config: BERTConfig, vocab, state: dict,
                    trainer=None, keep: int = 2) -> str:
    """Write checkpoint `ckpt-<step>` atomically and point `latest` at it."""
    os.makedirs(run_dir, exist_ok=True)
    final = os.path.join(run_dir, f'ckpt-{step:07d}')
    tmp = os.path.join(run_dir, f'.tmp-ckpt-{step:07d}-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # write: every file into the temporary folder, flushed to disk
    config.save(os.path.join(tmp, 'config.json'))
    vocab.save(os.path.join(tmp, 'vocab.json'))
    net.save_parameters(os.path.join(tmp, 'model.params'))
    if trainer is not None:
        trainer.save_states(os.path.join(tmp, 'trainer.states'))
    _write_json(os.path.join(tmp, 'state.json'), dict(state, step=step))
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), 'rb') as f:
            os.fsync(f.fileno())
    # publish: rename the folder, then the pointer (each rename is atomic)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    pointer_tmp = os.path.join(run_dir, f'.latest.tmp{os.getpid()}')
    with open(pointer_tmp, 'w', encoding='utf-8') as f:
        f.write(os.path.basename(final) + '\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(run_dir, 'latest'))
    _fsync_dir(run_dir)
    # prune: keep the newest `keep` checkpoints
    ckpts = sorted(d for d in os.listdir(run_dir) if d.startswith('ckpt-'))
    for old in ckpts[:-keep] if keep else []:
        shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)
    return final


def _is_complete(path):
    return all(os.path.isfile(os.path.join(path, f)) for f in REQUIRED_FILES)


def latest_checkpoint(path: str) -> str | None:
    """The newest complete checkpoint folder under a run folder (or `path` itself if it is
    a checkpoint folder); None when there is none."""
    if not os.path.isdir(path):
        return None
    if _is_complete(path):
        return path
    pointer = os.path.join(path, 'latest')
    if os.path.isfile(pointer):
        with open(pointer, encoding='utf-8') as f:
            candidate = os.path.join(path, f.read().strip())
        if _is_complete(candidate):
            return candidate
    ckpts = sorted((d for d in os.listdir(path) if d.startswith('ckpt-')), reverse=True)
    for d in ckpts:
        if _is_complete(os.path.join(path, d)):
            return os.path.join(path, d)
    return None


def read_state(ckpt: str) -> dict[str, Any]:
    with open(os.path.join(ckpt, 'state.json'), encoding='utf-8') as f:
        return json.load(f)


def load_config(ckpt: str) -> BERTConfig:
    try:
        return BERTConfig.load(os.path.join(ckpt, 'config.json'))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f'{ckpt}: cannot read config.json ({err})') from err

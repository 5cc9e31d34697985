"""Checkpoints that survive a crash: written into a temporary folder, then renamed.

Layout of one checkpoint folder:
    config.json     the BERTConfig of the model
    vocab.json      the vocabulary (idx_to_token list, the book's format)
    model.params    the network's parameters (BERTModel or BERTClassifier), MXNet format,
                    whatever framework trained them
    optimizer.npz   Adam's state keyed by parameter name: m/<name>, v/<name>, t/<name>
    state.json      task, step, framework, training config, metric history, and the
                    current log interval's per-step metrics (so a resumed run logs the
                    same rows)
    manifest.json   size and SHA-1 of every other file
A run folder keeps `ckpt-<step>/` folders and a `latest` file naming the newest complete one.
A folder only gets its final name once every file in it is written and flushed, so a run
killed at any moment resumes from the last good checkpoint; a folder whose files do not
match its manifest is skipped (with `verify=True`, by SHA-1), so a corrupt newest
checkpoint falls back to the one before it.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import numpy as np

from ..config import BERTConfig
from ..data.download import sha1_file
from ..errors import CheckpointError, RunFolderError

__all__ = ['save_checkpoint', 'latest_checkpoint', 'read_state', 'CheckpointError',
           'load_config', 'load_params', 'load_optimizer_state', 'save_params',
           'checkpoint_problem', 'REQUIRED_FILES', 'TMP_PREFIX']

REQUIRED_FILES = ('config.json', 'vocab.json', 'model.params', 'state.json')
MANIFEST = 'manifest.json'
TMP_PREFIX = '.tmp-ckpt-'


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
        # allow_nan=False: NaN is not JSON; the loop never checkpoints a non-finite loss
        json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
        f.write('\n')


def save_params(path: str, params: Mapping[str, np.ndarray]) -> None:
    """{MXNet name: array} -> a `.params` file that `Block.load_parameters` reads, with
    numpy shape semantics as `save_parameters` writes it (and as the book's files are)."""
    import mxnet as mx
    from mxnet.util import np_array, np_shape
    with np_array(False), np_shape(True):
        mx.nd.save(path, {k: mx.nd.array(v, dtype=v.dtype) for k, v in params.items()})


def save_checkpoint(run_dir: str, step: int, params: Mapping[str, np.ndarray],
                    config: BERTConfig, vocab, state: dict,
                    optimizer_state: Mapping[str, np.ndarray] | None = None,
                    keep: int = 2) -> str:
    """Write checkpoint `ckpt-<step>` atomically, point `latest` at it, prune old ones.

    A failure (a full disk, a read-only folder) leaves no temporary folder behind and the
    previous checkpoints untouched; it is reported as a RunFolderError."""
    final = os.path.join(run_dir, f'ckpt-{step:07d}')
    tmp = os.path.join(run_dir, f'{TMP_PREFIX}{step:07d}-{os.getpid()}')
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        # write: every file into the temporary folder
        config.save(os.path.join(tmp, 'config.json'))
        vocab.save(os.path.join(tmp, 'vocab.json'))
        save_params(os.path.join(tmp, 'model.params'), params)
        if optimizer_state is not None:
            with open(os.path.join(tmp, 'optimizer.npz'), 'wb') as f:
                np.savez(f, **optimizer_state)
        _write_json(os.path.join(tmp, 'state.json'), dict(state, step=step))
        files = sorted(os.listdir(tmp))
        _write_json(os.path.join(tmp, MANIFEST), {
            name: {'bytes': os.path.getsize(os.path.join(tmp, name)),
                   'sha1': sha1_file(os.path.join(tmp, name))} for name in files})
        # flush: every file, then the folder, is on disk before it gets its name
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), 'rb') as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        # publish: rename the folder, then the pointer (each rename is atomic)
        if os.path.isdir(final):  # a checkpoint of this step from a run that was cut short
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
        pointer_tmp = os.path.join(run_dir, f'.latest.tmp{os.getpid()}')
        with open(pointer_tmp, 'w', encoding='utf-8') as f:
            f.write(os.path.basename(final) + '\n')
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, os.path.join(run_dir, 'latest'))
        _fsync_dir(run_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunFolderError(f'cannot write checkpoint {os.path.basename(final)} in {run_dir}: '
                             f'{err.strerror or err}') from err
    # prune: keep the newest `keep` checkpoints
    ckpts = sorted(d for d in os.listdir(run_dir) if d.startswith('ckpt-'))
    for old in ckpts[:-keep] if keep else []:
        shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)
    return final


def checkpoint_problem(path: str, verify: bool = False) -> str | None:
    """Why `path` is not a usable checkpoint, or None. Checks that the required files
    exist and match the manifest's sizes; `verify` checks their SHA-1 too."""
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        return f'missing {", ".join(missing)}'
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        return None  # written before manifests existed: trusted as it is
    try:
        with open(manifest, encoding='utf-8') as f:
            entries = json.load(f)
    except (OSError, ValueError) as err:
        return f'unreadable {MANIFEST} ({err})'
    for name, entry in entries.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f'missing {name}'
        if os.path.getsize(file) != entry['bytes']:
            return f'{name} has {os.path.getsize(file)} bytes, the manifest {entry["bytes"]}'
        if verify and sha1_file(file) != entry['sha1']:
            return f'{name} does not match its SHA-1 (corrupt)'
    return None


def latest_checkpoint(path: str, verify: bool = False, skipped: list | None = None) -> str | None:
    """The newest usable checkpoint folder under a run folder (or `path` itself if it is a
    checkpoint folder); None when there is none. Checkpoints passed over as unusable are
    appended to `skipped` as (folder, reason)."""
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, 'state.json')):
        problem = checkpoint_problem(path, verify)
        if problem is None:
            return path
        if skipped is not None:
            skipped.append((path, problem))
        return None
    candidates = sorted((d for d in os.listdir(path) if d.startswith('ckpt-')), reverse=True)
    pointer = os.path.join(path, 'latest')
    if os.path.isfile(pointer):
        with open(pointer, encoding='utf-8', errors='replace') as f:
            named = f.read().strip()
        if named in candidates:  # the pointer's checkpoint first, then the others
            candidates.remove(named)
            candidates.insert(0, named)
    for d in candidates:
        problem = checkpoint_problem(os.path.join(path, d), verify)
        if problem is None:
            return os.path.join(path, d)
        if skipped is not None:
            skipped.append((os.path.join(path, d), problem))
    return None


def read_state(ckpt: str) -> dict[str, Any]:
    path = os.path.join(ckpt, 'state.json')
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f'{path}: cannot read the checkpoint state ({err})') from err


def load_config(ckpt: str) -> BERTConfig:
    try:
        return BERTConfig.load(os.path.join(ckpt, 'config.json'))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f'{ckpt}: cannot read config.json ({err})') from err


def load_params(ckpt: str) -> dict[str, np.ndarray]:
    from ..ports.convert import load_mxnet_file
    path = os.path.join(ckpt, 'model.params')
    try:
        return load_mxnet_file(path)
    except Exception as err:  # MXNetError for a corrupt file
        raise CheckpointError(f'{path}: cannot read the parameters ({err})') from err


def load_optimizer_state(ckpt: str) -> dict[str, np.ndarray]:
    path = os.path.join(ckpt, 'optimizer.npz')
    if not os.path.isfile(path):
        raise CheckpointError(f'{ckpt} has no optimizer.npz (written by an older gluon-bert '
                              'or by a run that saved none): it cannot be resumed, only '
                              'fine-tuned from or evaluated')
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise CheckpointError(f'{path}: cannot read the optimizer state ({err})') from err

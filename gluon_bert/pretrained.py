"""`load_pretrained`: the book's `load_pretrained_model` for this package's BERT.

Takes a name from the download hub (`bert.small`, `bert.base`: the book's MXNet zips, checked
against their SHA-1), a local zip in the same layout, or a folder holding `vocab.json` (the
idx_to_token list) and `pretrained.params`.
"""
from __future__ import annotations

import logging
import os

import mxnet as mx

from .config import PRESETS, BERTConfig
from .errors import GluonBertError
from .model import BERTModel

__all__ = ['load_pretrained', 'PretrainedError']

log = logging.getLogger(__name__)


class PretrainedError(GluonBertError, ValueError):
    """A checkpoint (zip, folder or parameter file) that cannot be used; names the file."""


def _preset_for(name_or_path, preset):
    if preset:
        return preset
    base = os.path.basename(os.path.normpath(str(name_or_path)))
    for suffix in ('.zip',):
        base = base[:-len(suffix)] if base.endswith(suffix) else base
    if base in PRESETS:
        return base
    raise PretrainedError(f'cannot tell the model shape of {name_or_path}: name it '
                          f'bert.small / bert.base or pass preset= ({", ".join(PRESETS)})')


def _extract_local_zip(path, cache_dir):
    """Unzip a local archive once into <cache>/local/, keyed by its SHA-1, atomically; the
    folder is checked against its manifest on every use, as hub downloads are."""
    from .data.download import ArchiveError, cache_dir as default_cache, extract_once, sha1_file
    digest = sha1_file(path)
    stem = os.path.basename(path)[:-len('.zip')]
    target = os.path.join(cache_dir or default_cache(), 'local', f'{stem}-{digest[:12]}')
    try:
        unpacked = extract_once(path, target, digest)
    except ArchiveError as err:
        raise PretrainedError(f'{err}; expected a zip in the book\'s layout '
                              '(<name>/vocab.json + <name>/pretrained.params)') from None
    if unpacked:
        log.info('unpacked %s into %s', path, target)
    return target


def _folder(name_or_path, cache_dir):
    from .data.download import DATA_HUB, download_extract
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.isfile(name_or_path):
        if not name_or_path.endswith('.zip'):
            raise PretrainedError(f'{name_or_path}: expected a .zip or a folder')
        return _extract_local_zip(name_or_path, cache_dir)
    if name_or_path in DATA_HUB:
        return download_extract(name_or_path, cache_dir=cache_dir)
    raise PretrainedError(f'{name_or_path!r} is neither a file, a folder nor a hub name '
                          f'({", ".join(n for n in DATA_HUB if n.startswith("bert"))})')


def _find(folder, filename):
    """The file in `folder` or in its single sub-folder (zips often wrap one folder)."""
    direct = os.path.join(folder, filename)
    if os.path.isfile(direct):
        return direct
    subs = [d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))]
    for d in subs:
        candidate = os.path.join(folder, d, filename)
        if os.path.isfile(candidate):
            return candidate
    raise PretrainedError(f'{folder}: no {filename} (expected vocab.json + pretrained.params)')


def _check_shapes(bert, params_path):
    """Compare the file's shapes with the model's before loading, for a readable error."""
    try:
        with mx.util.np_array(False), mx.util.np_shape(True):
            saved = mx.nd.load(params_path)
    except mx.base.MXNetError:
        try:
            with mx.util.np_array(False), mx.util.np_shape(False):
                saved = mx.nd.load(params_path)
        except mx.base.MXNetError as err:
            # MXNet's message is a C++ traceback; its last line says what was wrong
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            reason = lines[-1][:200] if lines else 'unreadable'
            raise PretrainedError(f'{params_path}: not an MXNet parameter file '
                                  f'({reason})') from None
    ours = {k: p.shape for k, p in bert._collect_params_with_prefix().items()}
    bad = [f'{k}: file {tuple(v.shape)} vs model {ours[k]}' for k, v in saved.items()
           if k in ours and tuple(v.shape) != tuple(ours[k])]
    missing = sorted(set(ours) - set(saved))
    unexpected = sorted(set(saved) - set(ours))
    if bad or missing or unexpected:
        parts = []
        if bad:
            parts.append('shape mismatch ' + '; '.join(bad[:5]) + (' ...' if len(bad) > 5 else ''))
        if missing:
            parts.append(f'missing {missing[:5]}')
        if unexpected:
            parts.append(f'unexpected {unexpected[:5]}')
        raise PretrainedError(f'{params_path} does not fit {bert.config.preset}: '
                              + ', '.join(parts))


def load_pretrained(name_or_path, ctx=None, preset=None, dropout=None, cache_dir=None):
    """(BERTModel, Vocab) as the book's `load_pretrained_model` returns them."""
    from .data.vocab import Vocab
    folder = _folder(os.fspath(name_or_path), cache_dir)
    vocab = Vocab.load(_find(folder, 'vocab.json'))
    config_file = os.path.join(os.path.dirname(_find(folder, 'vocab.json')), 'config.json')
    if os.path.isfile(config_file):
        config = BERTConfig.load(config_file)
    else:
        config = BERTConfig.from_preset(_preset_for(name_or_path, preset), vocab_size=len(vocab))
    if dropout is not None:
        config = config.replace(dropout=dropout)
    if config.vocab_size != len(vocab):
        raise PretrainedError(f'{folder}: vocab.json has {len(vocab)} tokens, the config '
                              f'{config.vocab_size}')
    bert = BERTModel(config)
    params_path = _find(folder, 'pretrained.params')
    _check_shapes(bert, params_path)
    bert.load_parameters(params_path, ctx=ctx or mx.cpu())
    return bert, vocab

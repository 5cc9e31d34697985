"""What a model name means, worked out in one place (`resolve`) for every command, and the
loaders built on it: `load_pretrained` (the book's `load_pretrained_model`) and
`load_classifier`.

A name is, in this order:
    a folder      a run or checkpoint folder of this package (the newest complete
                  `ckpt-*/`); a Hugging Face BERT folder (`config.json`, `vocab.txt`,
                  `model.safetensors` or `pytorch_model.bin`); a GluonNLP BERT folder (one
                  `.params` and one `.vocab`); or a folder in the book's layout:
                  `vocab.json` (the idx_to_token list) + `pretrained.params`, directly or
                  in one sub-folder
    a file        a `.zip` in the book's layout, unpacked once into the cache
    a hub name    `bert.small`, `bert.base`: the book's MXNet zips, SHA-1 checked, cached;
                  `gluonnlp:bert_12_768_12_book_corpus_wiki_en_uncased` (GluonNLP's
                  model zoo) and `hf:bert-base-uncased` (the Hugging Face hub), fetched
                  by `data/bert_hub.py` through the same verified cache
`pretrain`, `finetune --init`, `evaluate`, `predict` and `load_pretrained` all call it, so a
name means the same thing everywhere.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import mxnet as mx

from .config import PRESETS, BERTConfig
from .errors import GluonBertError
from .model import BERTModel

__all__ = ['resolve', 'ModelSource', 'load_pretrained', 'load_classifier', 'PretrainedError']

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


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the files of a named model are."""
    name: str                 # as given
    kind: str                 # 'checkpoint' (a run of this package), 'book' (its layout),
                              # 'hf' (a Hugging Face folder) or 'gluonnlp' (its model zoo)
    params: str               # the .params file (hf: model.safetensors / pytorch_model.bin)
    vocab: str                # vocab.json (hf: vocab.txt; gluonnlp: the .vocab)
    config: str | None        # config.json, where there is one
    task: str                 # 'pretrain' (a BERTModel) or 'finetune' (a BERTClassifier)
    lower: bool = True        # hf, gluonnlp: whether the WordPiece tokenizer lower-cases


def _book_layout(name, folder):
    vocab = _find(folder, 'vocab.json')
    config = os.path.join(os.path.dirname(vocab), 'config.json')
    return ModelSource(name, 'book', _find(folder, 'pretrained.params'), vocab,
                       config if os.path.isfile(config) else None, 'pretrain')


def _hf_lower(folder, name):
    """do_lower_case of tokenizer_config.json; else what the name says (`*cased` but not
    `*uncased` keeps case); else lower-case, as BERT's tokenizer does by default."""
    try:
        with open(os.path.join(folder, 'tokenizer_config.json'), encoding='utf-8') as f:
            value = json.load(f).get('do_lower_case')
        if isinstance(value, bool):
            return value
    except (OSError, ValueError, AttributeError):
        pass
    base = os.path.basename(os.path.normpath(name)).lower()
    return not (base.endswith('cased') and not base.endswith('uncased'))


def _hf_layout(name, folder):
    from .ports.hf_bert import WEIGHT_FILES
    weights = next(os.path.join(folder, f) for f in WEIGHT_FILES
                   if os.path.isfile(os.path.join(folder, f)))
    return ModelSource(name, 'hf', weights, os.path.join(folder, 'vocab.txt'),
                       os.path.join(folder, 'config.json'), 'pretrain', _hf_lower(folder, name))


def _gluonnlp_layout(name, folder):
    """A folder with exactly one .params and one .vocab (GluonNLP's cache holds such)."""
    files = os.listdir(folder)
    params = [f for f in files if f.endswith('.params')]
    vocabs = [f for f in files if f.endswith('.vocab')]
    if len(params) != 1 or len(vocabs) != 1:
        return None
    from .data.bert_hub import gluonnlp_lower
    stem = vocabs[0][:-len('.vocab')].rsplit('-', 1)[0]
    return ModelSource(name, 'gluonnlp', os.path.join(folder, params[0]),
                       os.path.join(folder, vocabs[0]), None, 'pretrain', gluonnlp_lower(stem))


def resolve(name_or_path, cache_dir=None) -> ModelSource:
    """The files a model name stands for (see the module's docstring for the order)."""
    from .data import bert_hub
    from .data.download import DATA_HUB, download_extract
    from .ports.hf_bert import is_hf_folder
    from .train.checkpoint import latest_checkpoint, read_state
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        ckpt = latest_checkpoint(name)
        if ckpt is not None:
            return ModelSource(name, 'checkpoint', os.path.join(ckpt, 'model.params'),
                               os.path.join(ckpt, 'vocab.json'),
                               os.path.join(ckpt, 'config.json'),
                               read_state(ckpt).get('task', 'pretrain'))
        if is_hf_folder(name):
            return _hf_layout(name, name)
        return _gluonnlp_layout(name, name) or _book_layout(name, name)
    if name.startswith(bert_hub.HF_PREFIX):
        model = name[len(bert_hub.HF_PREFIX):]
        try:
            return _hf_layout(name, bert_hub.hf_folder(model, cache_dir))
        except KeyError as err:
            raise PretrainedError(str(err.args[0])) from None
    if name.startswith(bert_hub.GLUONNLP_PREFIX):
        model = name[len(bert_hub.GLUONNLP_PREFIX):]
        try:
            params, vocab = bert_hub.gluonnlp_files(model, cache_dir)
        except KeyError as err:
            raise PretrainedError(str(err.args[0])) from None
        return ModelSource(name, 'gluonnlp', params, vocab, None, 'pretrain',
                           bert_hub.gluonnlp_lower(bert_hub.GLUONNLP_MODELS[model][1]))
    if os.path.isfile(name):
        if not name.endswith('.zip'):
            raise PretrainedError(f'{name}: expected a .zip, a run folder or a folder in the '
                                  'book\'s layout')
        return _book_layout(name, _extract_local_zip(name, cache_dir))
    if name in DATA_HUB:
        return _book_layout(name, download_extract(name, cache_dir=cache_dir))
    raise PretrainedError(f'{name!r} is neither a run or model folder, a zip, nor a hub name '
                          f'({", ".join(n for n in DATA_HUB if n.startswith("bert"))}, '
                          'gluonnlp:<model zoo name>, hf:<hub name>)')


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
    raise PretrainedError(f'{folder}: no {filename}: neither a run or checkpoint folder of '
                          'gluon-bert nor the book\'s layout (vocab.json + pretrained.params)')


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


def _config_of(source: ModelSource, vocab, preset):
    if source.config:
        try:
            return BERTConfig.load(source.config)
        except (OSError, ValueError, TypeError) as err:
            raise PretrainedError(f'{source.config}: cannot read the model config ({err})') from err
    return BERTConfig.from_preset(_preset_for(source.name, preset), vocab_size=len(vocab))


def _load_real_bert(source: ModelSource, ctx, preset=None, dropout=None):
    """(BERTModel, WordPieceVocab) of a Hugging Face or GluonNLP checkpoint."""
    from .data.tokenization import WordPieceVocab
    from .errors import ConfigError, DataError
    from .ports import gluonnlp_bert, hf_bert
    from .ports.convert import ConversionError, load_mxnet_file, load_mxnet_params, mxnet_params
    try:
        if source.kind == 'hf':
            vocab = WordPieceVocab.from_vocab_txt(source.vocab, lower=source.lower)
            config = hf_bert.read_config(source.config)
            arrays = hf_bert.load_state_dict(source.params)
        else:
            vocab = WordPieceVocab.from_gluonnlp(source.vocab, lower=source.lower)
            try:
                arrays = load_mxnet_file(source.params)
            except mx.base.MXNetError:
                raise PretrainedError(f'{source.params}: not an MXNet parameter file') from None
            if not gluonnlp_bert.is_gluonnlp_params(arrays):
                raise PretrainedError(f'{source.params}: not a GluonNLP BERT (no '
                                      'word_embed.0.weight / encoder.position_weight)')
            stem = os.path.basename(source.params)
            config = (BERTConfig.from_preset(preset, vocab_size=len(vocab)) if preset else
                      gluonnlp_bert.infer_config(arrays, len(vocab), stem))
        config = _with_dropout_for(config, vocab, dropout, source)
        net = BERTModel(config)
        net.initialize(mx.init.Normal(0.02))  # BERT's initialiser, for heads a file lacks
        fresh = mxnet_params(net)
        convert = hf_bert.hf_to_mxnet if source.kind == 'hf' else gluonnlp_bert.gluonnlp_to_mxnet
        load_mxnet_params(net, convert(arrays, config, source.params, fresh))
    except (ConversionError, ConfigError, DataError) as err:
        raise PretrainedError(str(err)) from None
    if ctx is not None:
        from .model import legacy_scope
        with legacy_scope():
            net.collect_params().reset_ctx(ctx)
    return net, vocab


def _with_dropout_for(config, vocab, dropout, source):
    """The config with the dropout asked for, checked against the vocabulary it reads."""
    if dropout is not None:
        config = config.replace(dropout=dropout)
    if config.vocab_size != len(vocab):
        raise PretrainedError(f'{source.vocab} has {len(vocab)} tokens, the model '
                              f'{config.vocab_size}')
    return config


def _load(source: ModelSource, net_cls, ctx, preset=None, dropout=None):
    from .data.vocab import Vocab
    if source.kind in ('hf', 'gluonnlp'):
        if net_cls is not BERTModel:
            raise PretrainedError(f'{source.name} is a pretrained BERT, not a fine-tuning run '
                                  'of gluon-bert (`gluon-bert finetune --init ...` makes one)')
        return _load_real_bert(source, ctx, preset, dropout)
    vocab = Vocab.load(source.vocab)
    config = _with_dropout_for(_config_of(source, vocab, preset), vocab, dropout, source)
    net = net_cls(config)
    _check_shapes(net, source.params)
    net.load_parameters(source.params, ctx=ctx or mx.cpu())
    return net, vocab


def load_pretrained(name_or_path, ctx=None, preset=None, dropout=None, cache_dir=None):
    """(BERTModel, Vocab) as the book's `load_pretrained_model` returns them, from any name
    `resolve` takes (a pretraining run of this package too)."""
    source = resolve(name_or_path, cache_dir)
    if source.task != 'pretrain':
        raise PretrainedError(f'{source.name} is a {source.task} run; a BERT to fine-tune '
                              'comes from a pretraining run, bert.small, bert.base or a '
                              'zip/folder in the book\'s layout')
    return _load(source, BERTModel, ctx, preset, dropout)


def load_classifier(name_or_path, ctx=None):
    """(BERTClassifier, Vocab, BERTConfig) of a fine-tuning run or checkpoint folder."""
    from .model import BERTClassifier
    source = resolve(name_or_path)
    if source.kind != 'checkpoint' or source.task != 'finetune':
        raise PretrainedError(f'{source.name} is not a fine-tuning run of gluon-bert '
                              '(`gluon-bert finetune --out-dir ...` makes one)')
    net, vocab = _load(source, BERTClassifier, ctx)
    return net, vocab, net.config

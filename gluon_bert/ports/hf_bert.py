"""Hugging Face BERT checkpoints <-> our BERTModel, both ways.

A Hugging Face BERT folder holds `config.json` (BertConfig), `model.safetensors` or
`pytorch_model.bin` (a `BertForPreTraining`, `BertModel` or fine-tuning state dict) and
`vocab.txt`. `read_config` makes our `BERTConfig` from the first, `hf_to_mxnet` our
parameters from the second (`HF_TABLE`, one row per parameter), `WordPieceVocab` reads
the third. `save_hf_folder` writes ours in that layout, so that `transformers` loads it.

What maps to what: BERT's pooler (dense + tanh at [CLS]) is the book's `hidden`, its
`seq_relationship` the book's `nsp.output`; `cls.predictions.transform` is `mlm.mlp.0`
(dense, gelu) and `mlm.mlp.1` (LayerNorm), the decoder (tied to the word embeddings) with
`cls.predictions.bias` is `mlm.mlp.2`. HF's positional table is (max_len, H), ours
(1, max_len, H).

Reading safetensors needs the `safetensors` package (no PyTorch); `pytorch_model.bin`
needs PyTorch. Neither needs `transformers`.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Mapping

import numpy as np

from ..config import BERTConfig
from ..errors import ConfigError
from .convert import ConversionError, check_import

__all__ = ['HF_TABLE', 'read_config', 'config_to_hf', 'load_state_dict', 'hf_to_mxnet',
           'mxnet_to_hf', 'save_hf_folder', 'is_hf_folder', 'WEIGHT_FILES']

log = logging.getLogger(__name__)

WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')

# (MXNet name, HF BertForPreTraining name); {i}: encoder block. Dense weights are (out, in)
# in both, so nothing is transposed; only the positional table changes shape.
_LAYER = 'bert.encoder.layer.{i}.'
HF_TABLE: tuple[tuple[str, str], ...] = (
    ('encoder.token_embedding.weight', 'bert.embeddings.word_embeddings.weight'),
    ('encoder.segment_embedding.weight', 'bert.embeddings.token_type_embeddings.weight'),
    ('encoder.pos_embedding', 'bert.embeddings.position_embeddings.weight'),
    ('encoder.embedding_ln.gamma', 'bert.embeddings.LayerNorm.weight'),
    ('encoder.embedding_ln.beta', 'bert.embeddings.LayerNorm.bias'),
    *[(f'encoder.blks.{{i}}.attention.W_{x}.{leaf}', f'{_LAYER}attention.self.{hf}.{leaf}')
      for x, hf in (('q', 'query'), ('k', 'key'), ('v', 'value')) for leaf in ('weight', 'bias')],
    *[(f'encoder.blks.{{i}}.attention.W_o.{leaf}', f'{_LAYER}attention.output.dense.{leaf}')
      for leaf in ('weight', 'bias')],
    ('encoder.blks.{i}.addnorm1.ln.gamma', f'{_LAYER}attention.output.LayerNorm.weight'),
    ('encoder.blks.{i}.addnorm1.ln.beta', f'{_LAYER}attention.output.LayerNorm.bias'),
    ('encoder.blks.{i}.ffn.dense1.weight', f'{_LAYER}intermediate.dense.weight'),
    ('encoder.blks.{i}.ffn.dense1.bias', f'{_LAYER}intermediate.dense.bias'),
    ('encoder.blks.{i}.ffn.dense2.weight', f'{_LAYER}output.dense.weight'),
    ('encoder.blks.{i}.ffn.dense2.bias', f'{_LAYER}output.dense.bias'),
    ('encoder.blks.{i}.addnorm2.ln.gamma', f'{_LAYER}output.LayerNorm.weight'),
    ('encoder.blks.{i}.addnorm2.ln.beta', f'{_LAYER}output.LayerNorm.bias'),
    ('hidden.weight', 'bert.pooler.dense.weight'),
    ('hidden.bias', 'bert.pooler.dense.bias'),
    ('mlm.mlp.0.weight', 'cls.predictions.transform.dense.weight'),
    ('mlm.mlp.0.bias', 'cls.predictions.transform.dense.bias'),
    ('mlm.mlp.1.gamma', 'cls.predictions.transform.LayerNorm.weight'),
    ('mlm.mlp.1.beta', 'cls.predictions.transform.LayerNorm.bias'),
    ('mlm.mlp.2.weight', 'cls.predictions.decoder.weight'),  # untied decoders only
    ('mlm.mlp.2.bias', 'cls.predictions.bias'),
    ('nsp.output.weight', 'cls.seq_relationship.weight'),
    ('nsp.output.bias', 'cls.seq_relationship.bias'),
)
# HF entries that are not parameters, or copies of others.
_IGNORED = re.compile(r'(position_ids|cls\.predictions\.decoder\.bias)$')


def is_hf_folder(folder: str) -> bool:
    """config.json of a BERT + vocab.txt + one of WEIGHT_FILES."""
    config = os.path.join(folder, 'config.json')
    if not (os.path.isfile(config) and os.path.isfile(os.path.join(folder, 'vocab.txt'))
            and any(os.path.isfile(os.path.join(folder, f)) for f in WEIGHT_FILES)):
        return False
    try:
        with open(config, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and 'hidden_size' in data


def read_config(path: str, num_classes: int = 3) -> BERTConfig:
    """A Hugging Face BertConfig (config.json) -> our BERTConfig, refusing what our model
    does not compute (another position embedding, activation or number of segments)."""
    try:
        with open(path, encoding='utf-8') as f:
            hf = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f'{path}: not a readable config.json ({err})') from None
    if not isinstance(hf, dict):
        raise ConfigError(f'{path}: not a BERT config (a JSON object)')
    model_type = hf.get('model_type', 'bert')
    if model_type != 'bert':
        raise ConfigError(f'{path}: model_type {model_type!r}; only BERT checkpoints import')
    checks = {'type_vocab_size': 2, 'position_embedding_type': 'absolute'}
    for key, want in checks.items():
        if hf.get(key, want) != want:
            raise ConfigError(f'{path}: {key} {hf[key]!r} is not supported (our BERT has '
                              f'{want!r})')
    act = hf.get('hidden_act', 'gelu')
    if act not in ('gelu', 'relu'):
        raise ConfigError(f'{path}: hidden_act {act!r} is not supported: gelu (erf) or relu')
    dropout = hf.get('hidden_dropout_prob', 0.1)
    if hf.get('attention_probs_dropout_prob', dropout) != dropout:
        log.warning('%s: attention dropout %s differs from hidden dropout %s; our BERT uses '
                    'one rate, %s', path, hf['attention_probs_dropout_prob'], dropout, dropout)
    try:
        return BERTConfig(
            vocab_size=hf['vocab_size'], num_hiddens=hf['hidden_size'],
            ffn_num_hiddens=hf['intermediate_size'], num_heads=hf['num_attention_heads'],
            num_blks=hf['num_hidden_layers'], dropout=float(dropout),
            max_len=hf.get('max_position_embeddings', 512), num_classes=num_classes,
            activation=act, embedding_norm=True,
            layer_norm_eps=float(hf.get('layer_norm_eps', 1e-12)),
            tie_mlm_decoder=bool(hf.get('tie_word_embeddings', True)))
    except KeyError as err:
        raise ConfigError(f'{path}: no {err.args[0]!r}') from None


def config_to_hf(config: BERTConfig) -> dict[str, Any]:
    """Our BERTConfig as a Hugging Face config.json (a BertForPreTraining)."""
    if not config.embedding_norm:
        raise ConfigError("the book's architecture (no embedding LayerNorm) has no Hugging "
                          'Face equivalent: only models with embedding_norm=True export')
    return {'architectures': ['BertForPreTraining'], 'model_type': 'bert',
            'vocab_size': config.vocab_size, 'hidden_size': config.num_hiddens,
            'intermediate_size': config.ffn_num_hiddens,
            'num_attention_heads': config.num_heads, 'num_hidden_layers': config.num_blks,
            'hidden_act': config.activation, 'hidden_dropout_prob': config.dropout,
            'attention_probs_dropout_prob': config.dropout,
            'max_position_embeddings': config.max_len, 'type_vocab_size': 2,
            'layer_norm_eps': config.layer_norm_eps, 'initializer_range': 0.02,
            'pad_token_id': 0, 'position_embedding_type': 'absolute',
            'tie_word_embeddings': config.tie_mlm_decoder}


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """model.safetensors or pytorch_model.bin -> {HF name: float32 numpy array}."""
    if path.endswith('.safetensors'):
        try:
            from safetensors.numpy import load_file
        except ImportError as err:
            raise ConversionError(f'reading {path} needs safetensors ({err}): '
                                  'pip install "gluon-bert[hf]"') from None
        try:
            state = load_file(path)
        except Exception as err:  # safetensors raises its own error types
            raise ConversionError(f'{path}: not a readable safetensors file ({err})') from None
    else:
        try:
            import torch
        except ImportError as err:
            raise ConversionError(f'reading {path} needs PyTorch ({err}); or convert it to '
                                  'model.safetensors') from None
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as err:  # pickle, zip and torch errors alike
            raise ConversionError(f'{path}: not a readable PyTorch state dict ({err})') from None
        state = {k: v.float().numpy() for k, v in state.items() if hasattr(v, 'numpy')}
    return {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}


def _normalise(state: Mapping[str, Any]) -> dict[str, Any]:
    """Names of every HF BERT variant -> BertForPreTraining's: a `BertModel`'s lack the
    `bert.` prefix, TF-converted ones call LayerNorm's parameters gamma/beta."""
    out = {}
    for name, value in state.items():
        if name.startswith(('embeddings.', 'encoder.', 'pooler.')):
            name = 'bert.' + name
        name = re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight', name)
        name = re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', name)
        out[name] = value
    return out


def _rows(config: BERTConfig):
    rows = []
    for mx_pat, hf_pat in HF_TABLE:
        if mx_pat == 'mlm.mlp.2.weight' and config.tie_mlm_decoder:
            continue
        if mx_pat.startswith('encoder.embedding_ln') and not config.embedding_norm:
            continue
        for i in (range(config.num_blks) if '{i}' in mx_pat else [None]):
            rows.append((mx_pat.format(i=i), hf_pat.format(i=i)))
    return rows


def hf_to_mxnet(state: Mapping[str, Any], config: BERTConfig, source: str = 'checkpoint',
                fresh: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """An HF state dict -> our BERTModel's parameters (MXNet names, numpy arrays).

    Heads and pooler the checkpoint lacks are taken from `fresh` (a freshly initialised
    model's parameters) with a warning; anything else missing, left over or mis-shaped is
    one ConversionError naming `source`.
    """
    from .convert import import_by_rows, mxnet_shapes
    state = {k: v for k, v in _normalise(state).items() if not _IGNORED.search(k)}
    out, missing, misshaped, filled, used = import_by_rows(
        state, _rows(config), mxnet_shapes(config, 'pretrain'), fresh)
    unexpected = sorted(set(state) - used)
    if config.tie_mlm_decoder and 'cls.predictions.decoder.weight' in unexpected:
        unexpected.remove('cls.predictions.decoder.weight')  # a stored copy of the embedding
    # a fine-tuning checkpoint's task head (classifier.*) is not part of a BERTModel
    unexpected = [n for n in unexpected if not n.startswith('classifier.')]
    check_import(source, 'not the Hugging Face BERT that its config.json describes', missing,
                 unexpected, misshaped, filled, log)
    return out


def mxnet_to_hf(params: Mapping[str, Any], config: BERTConfig) -> dict[str, np.ndarray]:
    """Our BERTModel's parameters -> a BertForPreTraining state dict (numpy arrays)."""
    from .convert import _to_numpy
    out = {}
    for mx_name, hf_name in _rows(config):
        array = _to_numpy(params[mx_name])
        out[hf_name] = array[0] if mx_name == 'encoder.pos_embedding' else array
    if config.tie_mlm_decoder:  # HF keeps the tied decoder under its own names too
        out['cls.predictions.decoder.weight'] = out['bert.embeddings.word_embeddings.weight']
    out['cls.predictions.decoder.bias'] = out['cls.predictions.bias']
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def save_hf_folder(folder: str, params: Mapping[str, Any], config: BERTConfig, vocab) -> str:
    """Write config.json, model.safetensors and vocab.txt that `transformers` loads as a
    BertForPreTraining. `vocab` is a WordPieceVocab (its token order is the ids)."""
    from safetensors.numpy import save_file
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'config.json'), 'w', encoding='utf-8') as f:
        json.dump(config_to_hf(config), f, indent=2)
    state = mxnet_to_hf(params, config)
    if config.tie_mlm_decoder:  # safetensors refuses shared tensors; HF re-ties on load
        state.pop('cls.predictions.decoder.weight')
    state.pop('cls.predictions.decoder.bias')
    save_file(state, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(folder, 'vocab.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(vocab.idx_to_token) + '\n')
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
        json.dump({'do_lower_case': bool(getattr(vocab, 'lower', True)),
                   'tokenizer_class': 'BertTokenizer'}, f)
    return folder

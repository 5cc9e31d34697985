"""GluonNLP (0.x model zoo) BERT parameters <-> our BERTModel, both ways.

GluonNLP's `BERTModel` (`bert_12_768_12`, `bert_24_1024_16`) is the same network as ours
with the options of real BERTs (`BERTConfig.from_preset('bert_12_768_12', ...)`): its
`.params` files use its own names (`GLUONNLP_TABLE`) and arrays in the same (out, in)
layout, so conversion only renames (and reshapes the positional table, (max_len, H)
there, (1, max_len, H) here). Its vocabulary (`.vocab`, a `BERTVocab` in JSON) has its own
token order, which `WordPieceVocab.from_gluonnlp` keeps.

Reading and writing `.params` needs only MXNet; GluonNLP itself is needed for WordPiece
tokenization and for the parity tests.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import numpy as np

from ..config import PRESETS, BERTConfig
from .convert import ConversionError, check_import

__all__ = ['GLUONNLP_TABLE', 'gluonnlp_to_mxnet', 'mxnet_to_gluonnlp', 'is_gluonnlp_params',
           'infer_config', 'save_gluonnlp_params']

log = logging.getLogger(__name__)

_CELL = 'encoder.transformer_cells.{i}.'
GLUONNLP_TABLE: tuple[tuple[str, str], ...] = (
    ('encoder.token_embedding.weight', 'word_embed.0.weight'),
    ('encoder.segment_embedding.weight', 'token_type_embed.0.weight'),
    ('encoder.pos_embedding', 'encoder.position_weight'),
    ('encoder.embedding_ln.gamma', 'encoder.layer_norm.gamma'),
    ('encoder.embedding_ln.beta', 'encoder.layer_norm.beta'),
    *[(f'encoder.blks.{{i}}.attention.W_{x}.{leaf}', f'{_CELL}attention_cell.proj_{g}.{leaf}')
      for x, g in (('q', 'query'), ('k', 'key'), ('v', 'value')) for leaf in ('weight', 'bias')],
    ('encoder.blks.{i}.attention.W_o.weight', f'{_CELL}proj.weight'),
    ('encoder.blks.{i}.attention.W_o.bias', f'{_CELL}proj.bias'),
    ('encoder.blks.{i}.addnorm1.ln.gamma', f'{_CELL}layer_norm.gamma'),
    ('encoder.blks.{i}.addnorm1.ln.beta', f'{_CELL}layer_norm.beta'),
    ('encoder.blks.{i}.ffn.dense1.weight', f'{_CELL}ffn.ffn_1.weight'),
    ('encoder.blks.{i}.ffn.dense1.bias', f'{_CELL}ffn.ffn_1.bias'),
    ('encoder.blks.{i}.ffn.dense2.weight', f'{_CELL}ffn.ffn_2.weight'),
    ('encoder.blks.{i}.ffn.dense2.bias', f'{_CELL}ffn.ffn_2.bias'),
    ('encoder.blks.{i}.addnorm2.ln.gamma', f'{_CELL}ffn.layer_norm.gamma'),
    ('encoder.blks.{i}.addnorm2.ln.beta', f'{_CELL}ffn.layer_norm.beta'),
    ('hidden.weight', 'pooler.weight'),        # GluonNLP's pooler is the book's hidden
    ('hidden.bias', 'pooler.bias'),
    ('mlm.mlp.0.weight', 'decoder.0.weight'),  # decoder.1 is GELU, no parameters
    ('mlm.mlp.0.bias', 'decoder.0.bias'),
    ('mlm.mlp.1.gamma', 'decoder.2.gamma'),
    ('mlm.mlp.1.beta', 'decoder.2.beta'),
    ('mlm.mlp.2.bias', 'decoder.3.bias'),      # decoder.3.weight is word_embed.0.weight
    ('nsp.output.weight', 'classifier.weight'),
    ('nsp.output.bias', 'classifier.bias'),
)


def _rows(num_blks):
    return [(m.format(i=i), g.format(i=i)) for m, g in GLUONNLP_TABLE
            for i in (range(num_blks) if '{i}' in m else [None])]


def is_gluonnlp_params(names) -> bool:
    return 'word_embed.0.weight' in names and 'encoder.position_weight' in names


def infer_config(params: Mapping[str, Any], vocab_size: int, name: str = '',
                 dropout: float = 0.1) -> BERTConfig:
    """Our BERTConfig for a GluonNLP BERT: the preset its name starts with
    (`bert_12_768_12_...`), else the shapes of its arrays with 64-wide heads (BERT's)."""
    for preset in ('bert_12_768_12', 'bert_24_1024_16'):
        if name.startswith(preset):
            return BERTConfig.from_preset(preset, vocab_size=vocab_size)
    blocks = {int(m.group(1)) for n in params
              for m in [re.match(r'encoder\.transformer_cells\.(\d+)\.', n)] if m}
    max_len, H = np.shape(params['encoder.position_weight'])
    F = np.shape(params['encoder.transformer_cells.0.ffn.ffn_1.weight'])[0]
    base = dict(PRESETS['bert_12_768_12'])
    base.update(num_hiddens=H, ffn_num_hiddens=F, num_heads=max(1, H // 64),
                num_blks=max(blocks) + 1, max_len=max_len, dropout=dropout)
    log.info('GluonNLP BERT %s: shape from its parameters (%d blocks, %d hidden, %d heads)',
             name or '(unnamed)', base['num_blks'], H, base['num_heads'])
    return BERTConfig(vocab_size=vocab_size, **base)


def gluonnlp_to_mxnet(params: Mapping[str, Any], config: BERTConfig, source: str = 'params',
                      fresh: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """GluonNLP BERTModel parameters -> ours; heads the file lacks come from `fresh`."""
    from .convert import import_by_rows, mxnet_shapes
    out, missing, misshaped, filled, used = import_by_rows(
        params, _rows(config.num_blks), mxnet_shapes(config, 'pretrain'), fresh)
    unexpected = sorted(set(params) - used - {'decoder.3.weight'})
    check_import(source, f'not a GluonNLP BERT of this shape ({config.num_blks} blocks, '
                 f'{config.num_hiddens} hidden)', missing, unexpected, misshaped, filled, log)
    return out


def mxnet_to_gluonnlp(params: Mapping[str, Any], config: BERTConfig) -> dict[str, np.ndarray]:
    """Our BERTModel's parameters -> GluonNLP BERTModel names (with the tied decoder.3.weight,
    which GluonNLP's own files carry too)."""
    from .convert import _to_numpy
    if not (config.embedding_norm and config.tie_mlm_decoder and config.activation == 'gelu'):
        raise ConversionError("GluonNLP's BERTModel has GELU, the embedding LayerNorm and a "
                              'tied decoder: only such models export to it')
    out = {}
    for mx_name, g_name in _rows(config.num_blks):
        array = _to_numpy(params[mx_name])
        out[g_name] = array[0] if mx_name == 'encoder.pos_embedding' else array
    out['decoder.3.weight'] = out['word_embed.0.weight']
    return out


def save_gluonnlp_params(path: str, params: Mapping[str, Any], config: BERTConfig) -> str:
    """Write a `.params` file that GluonNLP's `BERTModel.load_parameters` reads."""
    import mxnet as mx
    mx.nd.save(path, {k: mx.nd.array(v) for k, v in mxnet_to_gluonnlp(params, config).items()})
    return path

"""Weight conversion between MXNet (the source of truth), the PyTorch and JAX ports, and the
book's own `d2l.torch.BERTModel`.

One table per port maps MXNet parameter names to that port's names. A row is a name
pattern (`{i}`: encoder block index) and whether the array is transposed on the way:

* PyTorch port: the MXNet paths; LayerNorm `gamma`/`beta` become `weight`/`bias`. Dense
  weights are (out, in) in both frameworks, so nothing is transposed.
* d2l.torch (the book's `bert.small.torch` layout): as the PyTorch port, but `hidden` is a
  `Sequential(LazyLinear, Tanh)` (-> `hidden.0.*`) and `MaskLM.mlp` has a `ReLU` module at
  index 1 (-> `mlm.mlp.{0,2,3}` for MXNet's `mlm.mlp.{0,1,2}`).
* JAX port: nested dicts with Flax's leaf names; dense `kernel`s are (in, out), i.e. the
  MXNet weight transposed.

BERTConfig's options for real BERTs change which rows apply: `embedding_norm` adds the
`encoder.embedding_ln` rows, `tie_mlm_decoder` drops `mlm.mlp.2.weight` (the decoder reads
`encoder.token_embedding.weight`, which has that one name in every framework). Without a
config both are read off the names.

The conversions only move and transpose arrays, so a round trip is bit-identical. Each
checks its input: missing, unexpected and mis-shaped names are all reported in one error.
Parameter dicts on the MXNet side are `{name: numpy array}` with the names of
`block._collect_params_with_prefix()` / `save_parameters` (see `mxnet_params`).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from ..config import BERTConfig

__all__ = ['TORCH_TABLE', 'D2L_TORCH_TABLE', 'JAX_TABLE', 'ConversionError', 'mxnet_shapes',
           'mxnet_to_torch', 'torch_to_mxnet', 'to_d2l_torch', 'from_d2l_torch', 'mxnet_to_jax',
           'jax_to_mxnet', 'flatten_jax', 'unflatten_jax', 'mxnet_params', 'load_mxnet_params',
           'load_mxnet_file', 'infer_task']

TASKS = ('pretrain', 'finetune')
_ATTENTION = [f'W_{x}.{leaf}' for x in 'qkvo' for leaf in ('weight', 'bias')]

# -- the tables: (MXNet name, port name[, transposed]) -------------------------------------
# Rows whose MXNet name starts with mlm./nsp. belong to the pretraining model only, output.
# to the classifier only; the others to both.

TORCH_TABLE: tuple[tuple[str, str], ...] = (
    ('encoder.token_embedding.weight', 'encoder.token_embedding.weight'),
    ('encoder.segment_embedding.weight', 'encoder.segment_embedding.weight'),
    ('encoder.pos_embedding', 'encoder.pos_embedding'),
    ('encoder.embedding_ln.gamma', 'encoder.embedding_ln.weight'),
    ('encoder.embedding_ln.beta', 'encoder.embedding_ln.bias'),
    *[(f'encoder.blks.{{i}}.attention.{p}', f'encoder.blks.{{i}}.attention.{p}')
      for p in _ATTENTION],
    ('encoder.blks.{i}.addnorm1.ln.gamma', 'encoder.blks.{i}.addnorm1.ln.weight'),
    ('encoder.blks.{i}.addnorm1.ln.beta', 'encoder.blks.{i}.addnorm1.ln.bias'),
    ('encoder.blks.{i}.ffn.dense1.weight', 'encoder.blks.{i}.ffn.dense1.weight'),
    ('encoder.blks.{i}.ffn.dense1.bias', 'encoder.blks.{i}.ffn.dense1.bias'),
    ('encoder.blks.{i}.ffn.dense2.weight', 'encoder.blks.{i}.ffn.dense2.weight'),
    ('encoder.blks.{i}.ffn.dense2.bias', 'encoder.blks.{i}.ffn.dense2.bias'),
    ('encoder.blks.{i}.addnorm2.ln.gamma', 'encoder.blks.{i}.addnorm2.ln.weight'),
    ('encoder.blks.{i}.addnorm2.ln.beta', 'encoder.blks.{i}.addnorm2.ln.bias'),
    ('hidden.weight', 'hidden.weight'),
    ('hidden.bias', 'hidden.bias'),
    ('mlm.mlp.0.weight', 'mlm.mlp.0.weight'),
    ('mlm.mlp.0.bias', 'mlm.mlp.0.bias'),
    ('mlm.mlp.1.gamma', 'mlm.mlp.1.weight'),
    ('mlm.mlp.1.beta', 'mlm.mlp.1.bias'),
    ('mlm.mlp.2.weight', 'mlm.mlp.2.weight'),
    ('mlm.mlp.2.bias', 'mlm.mlp.2.bias'),
    ('nsp.output.weight', 'nsp.output.weight'),
    ('nsp.output.bias', 'nsp.output.bias'),
    ('output.weight', 'output.weight'),
    ('output.bias', 'output.bias'),
)

_D2L_RENAMES = {
    'hidden.weight': 'hidden.0.weight', 'hidden.bias': 'hidden.0.bias',
    'mlm.mlp.1.gamma': 'mlm.mlp.2.weight', 'mlm.mlp.1.beta': 'mlm.mlp.2.bias',
    'mlm.mlp.2.weight': 'mlm.mlp.3.weight', 'mlm.mlp.2.bias': 'mlm.mlp.3.bias',
}
D2L_TORCH_TABLE: tuple[tuple[str, str], ...] = tuple(
    (mx_name, _D2L_RENAMES.get(mx_name, torch_name)) for mx_name, torch_name in TORCH_TABLE)

JAX_TABLE: tuple[tuple[str, str, bool], ...] = (
    ('encoder.token_embedding.weight', 'encoder/token_embedding/embedding', False),
    ('encoder.segment_embedding.weight', 'encoder/segment_embedding/embedding', False),
    ('encoder.pos_embedding', 'encoder/pos_embedding', False),
    ('encoder.embedding_ln.gamma', 'encoder/embedding_ln/scale', False),
    ('encoder.embedding_ln.beta', 'encoder/embedding_ln/bias', False),
    *[(f'encoder.blks.{{i}}.attention.W_{x}.weight', f'encoder/blks/{{i}}/attention/W_{x}/kernel',
       True) for x in 'qkvo'],
    *[(f'encoder.blks.{{i}}.attention.W_{x}.bias', f'encoder/blks/{{i}}/attention/W_{x}/bias',
       False) for x in 'qkvo'],
    ('encoder.blks.{i}.addnorm1.ln.gamma', 'encoder/blks/{i}/addnorm1/ln/scale', False),
    ('encoder.blks.{i}.addnorm1.ln.beta', 'encoder/blks/{i}/addnorm1/ln/bias', False),
    ('encoder.blks.{i}.ffn.dense1.weight', 'encoder/blks/{i}/ffn/dense1/kernel', True),
    ('encoder.blks.{i}.ffn.dense1.bias', 'encoder/blks/{i}/ffn/dense1/bias', False),
    ('encoder.blks.{i}.ffn.dense2.weight', 'encoder/blks/{i}/ffn/dense2/kernel', True),
    ('encoder.blks.{i}.ffn.dense2.bias', 'encoder/blks/{i}/ffn/dense2/bias', False),
    ('encoder.blks.{i}.addnorm2.ln.gamma', 'encoder/blks/{i}/addnorm2/ln/scale', False),
    ('encoder.blks.{i}.addnorm2.ln.beta', 'encoder/blks/{i}/addnorm2/ln/bias', False),
    ('hidden.weight', 'hidden/kernel', True),
    ('hidden.bias', 'hidden/bias', False),
    ('mlm.mlp.0.weight', 'mlm/mlp/0/kernel', True),
    ('mlm.mlp.0.bias', 'mlm/mlp/0/bias', False),
    ('mlm.mlp.1.gamma', 'mlm/mlp/1/scale', False),
    ('mlm.mlp.1.beta', 'mlm/mlp/1/bias', False),
    ('mlm.mlp.2.weight', 'mlm/mlp/2/kernel', True),
    ('mlm.mlp.2.bias', 'mlm/mlp/2/bias', False),
    ('nsp.output.weight', 'nsp/output/kernel', True),
    ('nsp.output.bias', 'nsp/output/bias', False),
    ('output.weight', 'output/kernel', True),
    ('output.bias', 'output/bias', False),
)


class ConversionError(ValueError):
    """Parameters that do not fit the layout being converted (names or shapes)."""


def _in_task(mx_name: str, task: str) -> bool:
    if mx_name.startswith(('mlm.', 'nsp.')):
        return task == 'pretrain'
    if mx_name.startswith('output.'):
        return task == 'finetune'
    return True


# The rows that exist only with one of BERTConfig's options.
_EMBEDDING_NORM_ROWS = ('encoder.embedding_ln.gamma', 'encoder.embedding_ln.beta')
_UNTIED_ROWS = ('mlm.mlp.2.weight',)


def _rows(table, num_blks: int, task: str, embedding_norm: bool = False, tied: bool = False):
    """Concrete (mxnet, port, transposed) rows for a model with `num_blks` blocks."""
    if task not in TASKS:
        raise ValueError(f'task must be one of {TASKS}, got {task!r}')
    rows = []
    for row in table:
        mx_pat, port_pat, transposed = (row + (False,))[:3]
        if not _in_task(mx_pat, task):
            continue
        if (mx_pat in _EMBEDDING_NORM_ROWS and not embedding_norm) or (
                mx_pat in _UNTIED_ROWS and tied):
            continue
        for i in (range(num_blks) if '{i}' in mx_pat else [None]):
            rows.append((mx_pat.format(i=i), port_pat.format(i=i), transposed))
    return rows


def mxnet_shapes(config: BERTConfig, task: str = 'pretrain') -> dict[str, tuple[int, ...]]:
    """The shape of every MXNet parameter of `BERTModel(config)` (task='pretrain') or
    `BERTClassifier` (task='finetune')."""
    c = config
    H, F, V = c.num_hiddens, c.ffn_num_hiddens, c.vocab_size
    top = {
        'encoder.token_embedding.weight': (V, H), 'encoder.segment_embedding.weight': (2, H),
        'encoder.pos_embedding': (1, c.max_len, H),
        'mlm.mlp.2.weight': (V, H), 'mlm.mlp.2.bias': (V,),
        'nsp.output.weight': (2, H), 'nsp.output.bias': (2,),
        'output.weight': (c.num_classes, H), 'output.bias': (c.num_classes,),
    }
    in_block = {'ffn.dense1.weight': (F, H), 'ffn.dense1.bias': (F,),
                'ffn.dense2.weight': (H, F), 'ffn.dense2.bias': (H,)}
    shapes = {}
    for name, _, _ in _rows(TORCH_TABLE, c.num_blks, task, c.embedding_norm, c.tie_mlm_decoder):
        block_leaf = re.sub(r'^encoder\.blks\.\d+\.', '', name)
        if name in top:
            shapes[name] = top[name]
        elif block_leaf in in_block:
            shapes[name] = in_block[block_leaf]
        else:  # every other weight is (H, H); biases, gammas and betas are (H,)
            shapes[name] = (H, H) if name.endswith('.weight') else (H,)
    return shapes


def _num_blks(names, block_re) -> int:
    indices = {int(m.group(1)) for n in names for m in [re.search(block_re, n)] if m}
    return max(indices) + 1 if indices else 0


def infer_task(names, classifier_prefix='output') -> str:
    """'finetune' when there is a classifier output layer among `names`, else 'pretrain'."""
    return 'finetune' if any(n.split('.')[0].split('/')[0] == classifier_prefix
                             for n in names) else 'pretrain'


def _report(direction, missing, unexpected, misshaped, task):
    def show(names, limit=8):
        names = sorted(names)
        more = f', ... ({len(names) - limit} more)' if len(names) > limit else ''
        return ', '.join(names[:limit]) + more
    lines = [f'cannot convert {direction} ({task} layout):']
    if missing:
        lines.append(f'  missing {len(missing)}: {show(missing)}')
    if unexpected:
        lines.append(f'  unexpected {len(unexpected)}: {show(unexpected)}')
    if misshaped:
        lines.append('  wrong shape: ' + '; '.join(
            f'{n} is {got}, expected {want}' for n, got, want in misshaped[:8]))
    if missing and unexpected:
        lines.append('  (a checkpoint of the other layout, or of another number of blocks? '
                     'pass task= / config=)')
    raise ConversionError('\n'.join(lines))


# Parameters that a file of another library may lack (a BertModel without heads, a model
# zoo file without the pooler): they start from a fresh initialisation.
OPTIONAL_ON_IMPORT = ('hidden.', 'mlm.', 'nsp.')


def import_by_rows(arrays: Mapping[str, Any], rows, shapes, fresh=None):
    """Another library's arrays -> ours along `rows` of (our name, its name) ->
    (out, missing, misshaped, filled, used). float32; its (max_len, H) position embedding
    becomes our (1, max_len, H); our optional parameters it lacks come from `fresh`."""
    out, missing, misshaped, filled, used = {}, [], [], [], set()
    for mx_name, name in rows:
        if name not in arrays:
            if fresh is not None and mx_name.startswith(OPTIONAL_ON_IMPORT):
                out[mx_name] = np.asarray(fresh[mx_name])
                filled.append(mx_name)
            else:
                missing.append(name)
            continue
        used.add(name)
        array = _to_numpy(arrays[name]).astype(np.float32)
        if mx_name == 'encoder.pos_embedding':
            array = array[None]  # (max_len, H) -> (1, max_len, H)
        if array.shape != tuple(shapes[mx_name]):
            misshaped.append(f'{name} is {array.shape}, expected {tuple(shapes[mx_name])}')
            continue
        out[mx_name] = array
    return out, missing, misshaped, filled, used


def check_import(source: str, header: str, missing, unexpected, misshaped, filled, log):
    """The end of an import from another library's names (Hugging Face, GluonNLP): every
    name problem in one ConversionError headed `source: header`; parameters the file lacks
    (`filled`, e.g. pretraining heads) start fresh, with one warning."""
    if missing or unexpected or misshaped:
        lines = [f'{source}: {header}:']
        if missing:
            lines.append(f'  missing {len(missing)}: {", ".join(missing[:6])}')
        if unexpected:
            lines.append(f'  unexpected {len(unexpected)}: {", ".join(unexpected[:6])}')
        if misshaped:
            lines.append('  wrong shape: ' + '; '.join(misshaped[:4]))
        raise ConversionError('\n'.join(lines))
    if filled:
        log.warning('%s has no %s: they start from a fresh initialisation', source,
                    ', '.join(sorted({n.split('.')[0] for n in filled})))


def _convert(params: Mapping[str, Any], rows, *, forward: bool, direction: str, task: str,
             expected_shapes: dict[str, tuple] | None):
    """Move arrays from one naming to the other. forward: MXNet -> port, else port -> MXNet.

    `expected_shapes` are in MXNet names and layout; a transposed row swaps them.
    """
    src_col, dst_col = (0, 1) if forward else (1, 0)
    by_src = {row[src_col]: row for row in rows}
    missing = set(by_src) - set(params)
    unexpected = set(params) - set(by_src)
    out, misshaped = {}, []
    for src, row in by_src.items():
        if src not in params:
            continue
        array = _to_numpy(params[src])
        transposed = row[2]
        if expected_shapes is not None:
            want = tuple(expected_shapes[row[0]])
            if transposed and not forward:
                want = want[::-1]
            if array.shape != want:
                misshaped.append((src, array.shape, want))
                continue
        if transposed:
            if array.ndim != 2:
                misshaped.append((src, array.shape, 'a matrix'))
                continue
            array = np.ascontiguousarray(array.T)
        out[row[dst_col]] = array
    if missing or unexpected or misshaped:
        _report(direction, missing, unexpected, misshaped, task)
    return out


def _to_numpy(array) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array.copy()
    if hasattr(array, 'detach'):  # torch.Tensor
        return array.detach().cpu().numpy().copy()
    if hasattr(array, 'asnumpy'):  # mxnet NDArray
        return array.asnumpy()
    return np.array(array)  # jax.Array and anything array-like: a host copy


def _layout(names, config, task, block_re, classifier_prefix='output', decoder='mlm.mlp.2.'):
    """(task, rows' options, expected shapes) from the config, or read off the names."""
    task = task or infer_task(names, classifier_prefix)
    if config is not None:
        options = dict(num_blks=config.num_blks, embedding_norm=config.embedding_norm,
                       tied=config.tie_mlm_decoder)
        return task, options, mxnet_shapes(config, task)
    sep = decoder[-1]
    # an untied decoder has a weight; the tied one has only its bias
    tied = (task == 'pretrain' and any(n.startswith(decoder) for n in names)
            and not any(n.startswith(decoder) and not n.endswith(sep + 'bias') for n in names))
    options = dict(num_blks=_num_blks(names, block_re), tied=tied,
                   embedding_norm=any('embedding_ln' in n for n in names))
    return task, options, None


def _table_rows(table, task, options):
    return _rows(table, options['num_blks'], task, options['embedding_norm'], options['tied'])


def _book_only(options, port):
    if options['embedding_norm'] or options['tied']:
        raise ConversionError(f'{port} has the book\'s architecture only: no embedding '
                              'LayerNorm and no tied MLM decoder')


# -- PyTorch ports ----------------------------------------------------------------------------

def _torch_state_dict(arrays):
    import torch
    return {name: torch.from_numpy(array) for name, array in arrays.items()}


def mxnet_to_torch(params: Mapping[str, Any], config: BERTConfig | None = None,
                   task: str | None = None) -> dict[str, Any]:
    """MXNet names -> a state dict for `ports.torch_bert.BERTModel` / `BERTClassifier`.

    `task` ('pretrain' or 'finetune') is inferred from the names unless given; with
    `config`, every shape is checked too.
    """
    task, options, shapes = _layout(params, config, task, r'^encoder\.blks\.(\d+)\.')
    return _torch_state_dict(_convert(params, _table_rows(TORCH_TABLE, task, options), forward=True,
                                      direction='MXNet -> torch', task=task,
                                      expected_shapes=shapes))


def torch_to_mxnet(state_dict: Mapping[str, Any], config: BERTConfig | None = None,
                   task: str | None = None) -> dict[str, np.ndarray]:
    """A `ports.torch_bert` state dict -> MXNet names (numpy arrays)."""
    task, options, shapes = _layout(state_dict, config, task, r'^encoder\.blks\.(\d+)\.')
    return _convert(state_dict, _table_rows(TORCH_TABLE, task, options), forward=False,
                    direction='torch -> MXNet', task=task, expected_shapes=shapes)


def to_d2l_torch(params: Mapping[str, Any], config: BERTConfig | None = None,
                 task: str | None = None) -> dict[str, Any]:
    """MXNet names -> a state dict for the book's `d2l.torch.BERTModel` (or, for task=
    'finetune', the book's PyTorch BERTClassifier: encoder, hidden, output).

    d2l.torch builds its layers lazily; `load_state_dict` materialises them from the shapes.
    """
    task, options, shapes = _layout(params, config, task, r'^encoder\.blks\.(\d+)\.')
    _book_only(options, 'd2l.torch')
    return _torch_state_dict(_convert(params, _table_rows(D2L_TORCH_TABLE, task, options),
                                      forward=True, direction='MXNet -> d2l.torch', task=task,
                                      expected_shapes=shapes))


def from_d2l_torch(state_dict: Mapping[str, Any], config: BERTConfig | None = None,
                   task: str | None = None) -> dict[str, np.ndarray]:
    """A `d2l.torch.BERTModel` state dict (e.g. the book's bert.small.torch) -> MXNet names."""
    task, options, shapes = _layout(state_dict, config, task, r'^encoder\.blks\.(\d+)\.',
                                    decoder='mlm.mlp.3.')
    _book_only(options, 'd2l.torch')
    return _convert(state_dict, _table_rows(D2L_TORCH_TABLE, task, options), forward=False,
                    direction='d2l.torch -> MXNet', task=task, expected_shapes=shapes)


# -- JAX port ---------------------------------------------------------------------------------

def flatten_jax(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    """Nested JAX params -> {'encoder/blks/0/attention/W_q/kernel': array, ...}."""
    flat = {}
    for key, value in tree.items():
        name = f'{prefix}{key}'
        if isinstance(value, Mapping):
            flat.update(flatten_jax(value, name + '/'))
        else:
            flat[name] = value
    return flat


def unflatten_jax(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten_jax`."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *path, leaf = name.split('/')
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def mxnet_to_jax(params: Mapping[str, Any], config: BERTConfig | None = None,
                 task: str | None = None) -> dict[str, Any]:
    """MXNet names -> nested params (numpy arrays) for `ports.jax_bert.BERTModel` /
    `BERTClassifier`; dense weights are transposed to (in, out)."""
    task, options, shapes = _layout(params, config, task, r'^encoder\.blks\.(\d+)\.')
    return unflatten_jax(_convert(params, _table_rows(JAX_TABLE, task, options), forward=True,
                                  direction='MXNet -> JAX', task=task, expected_shapes=shapes))


def jax_to_mxnet(params: Mapping[str, Any], config: BERTConfig | None = None,
                 task: str | None = None) -> dict[str, np.ndarray]:
    """JAX params (nested, or flat with '/'-joined names) -> MXNet names (numpy arrays)."""
    flat = flatten_jax(params)
    task, options, shapes = _layout(flat, config, task, r'^encoder/blks/(\d+)/',
                                    decoder='mlm/mlp/2/')
    return _convert(flat, _table_rows(JAX_TABLE, task, options), forward=False,
                    direction='JAX -> MXNet', task=task, expected_shapes=shapes)


# -- MXNet side -------------------------------------------------------------------------------

def mxnet_params(block) -> dict[str, np.ndarray]:
    """A Gluon block's parameters as {name: numpy array}, with `save_parameters`' names.

    Run one forward pass first: Gluon defers the creation of weights until it sees the input.
    """
    return {name: p.data().asnumpy() for name, p in block._collect_params_with_prefix().items()}


def load_mxnet_params(block, params: Mapping[str, Any]) -> None:
    """Set a Gluon block's initialised parameters from {name: array}; strict on names and
    shapes. Parameters whose initialisation is still deferred take the arrays when it runs."""
    import mxnet as mx
    own = block._collect_params_with_prefix()
    missing, unexpected = set(own) - set(params), set(params) - set(own)
    def fits(shape, want):  # 0 in a shape that Gluon has not inferred yet matches anything
        return len(shape) == len(want) and all(w in (0, s) for s, w in zip(shape, want))
    misshaped = [(n, tuple(np.shape(params[n])), own[n].shape) for n in own
                 if n in params and not fits(tuple(np.shape(params[n])), tuple(own[n].shape))]
    if missing or unexpected or misshaped:
        _report('into the MXNet block', missing, unexpected, misshaped, type(block).__name__)
    for name, p in own.items():
        p.set_data(mx.nd.array(_to_numpy(params[name]), dtype=p.dtype))


def load_mxnet_file(path) -> dict[str, np.ndarray]:
    """A `save_parameters` file (e.g. the book's bert.small pretrained.params) -> dict."""
    import mxnet as mx
    from mxnet.util import np_shape
    # A .params file records whether it was written with numpy shape semantics (the book's
    # and ours are) and MXNet reads it only in the same mode: try one, then the other.
    try:
        with np_shape(True):
            loaded = mx.nd.load(str(path))
    except mx.base.MXNetError as err:
        if 'np shape semantics' not in str(err):
            raise
        with np_shape(False):
            loaded = mx.nd.load(str(path))
    return {name: array.asnumpy() for name, array in loaded.items()}

"""The BERT of `gluon_bert.model` in plain JAX: same class names, structure and call signatures.

Each block is a small immutable object holding its hyper-parameters, with two pure methods
in the style of Flax: `init(rng) -> params` and `apply(params, ..., rng=None) -> output`.
Parameters are nested dicts keyed by the MXNet attribute names (`params['encoder']['blks']
['0']['attention']['W_q']`); the leaves use Flax's names and layouts (`kernel` (in, out),
`bias`, `scale`, `embedding`), which `convert.py` maps to and from MXNet's.

Dropout is on when `apply` gets an `rng` and off when it gets `rng=None`.

Why plain JAX and no Flax/Optax: Flax's dependencies (orbax, tensorstore) and every chex
release that works with jax 0.4.30 need numpy >= 1.25, while mxnet 1.9.1 needs numpy < 1.24.

Shape legend
    B: batch size   L: sequence length (<= max_len)   H: num_hiddens   F: ffn_num_hiddens
    h: num_heads    d = H / h: size of one head        P: predictions per example
    V: vocabulary size   C: number of classes
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ..config import BERTConfig

__all__ = ['masked_softmax', 'Dense', 'LayerNorm', 'Embedding', 'Dropout', 'MultiHeadAttention',
           'PositionWiseFFN', 'AddNorm', 'TransformerEncoderBlock', 'BERTEncoder', 'MaskLM',
           'NextSentencePred', 'BERTModel', 'BERTClassifier', 'pretrain_loss', 'finetune_loss',
           'mxnet_adam_lr', 'mxnet_adam_init', 'mxnet_adam_update']


def _split(rng, n):
    """n independent keys from `rng`, or n Nones when dropout is off."""
    return [None] * n if rng is None else list(jax.random.split(rng, n))


def _xavier(rng, shape):
    """MXNet's `init.Xavier()` (uniform, average fan, magnitude 3) for an MXNet-shaped weight:
    fan_in = shape[1] * prod(shape[2:]), fan_out = shape[0] * prod(shape[2:]).
    """
    receptive = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    bound = math.sqrt(3.0 / ((fan_in + fan_out) / 2.0))
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def masked_softmax(scores, valid_lens):
    """Softmax over the last axis that ignores keys at positions >= valid_len.

    scores: (B*h, L, L); valid_lens: (B*h,) or None. As in the book, masked scores are
    replaced by -1e6 (not -inf), so their weights are exactly 0 in float32.
    """
    if valid_lens is None:
        return jax.nn.softmax(scores, axis=-1)
    positions = jnp.arange(scores.shape[-1], dtype=jnp.float32)
    # (L,) against (B*h, 1, 1) -> (B*h, 1, L): the same key mask for every query row
    keep = positions < jnp.asarray(valid_lens, jnp.float32).reshape(-1, 1, 1)
    return jax.nn.softmax(jnp.where(keep, scores, -1e6), axis=-1)


@dataclasses.dataclass(frozen=True)
class Dense:
    """MXNet's `Dense(units, activation=...)`; params {'kernel': (in, out), 'bias': (out,)}."""
    units: int
    in_units: int
    activation: str | None = None
    use_bias: bool = True

    def init(self, rng):
        # Drawn in MXNet's (out, in) layout so that a seed means the same numbers as there.
        params = {'kernel': _xavier(rng, (self.units, self.in_units)).T}
        if self.use_bias:
            params['bias'] = jnp.zeros((self.units,), jnp.float32)
        return params

    def apply(self, params, X):
        Y = X @ params['kernel']  # (..., in) @ (in, out) -> (..., out)
        if self.use_bias:
            Y = Y + params['bias']
        if self.activation == 'relu':
            return jax.nn.relu(Y)
        if self.activation == 'gelu':
            return jax.nn.gelu(Y, approximate=False)  # the erf form, as MXNet and BERT
        if self.activation == 'tanh':
            return jnp.tanh(Y)
        return Y


@dataclasses.dataclass(frozen=True)
class LayerNorm:
    """Layer normalization over the last axis, MXNet's epsilon; params {'scale', 'bias'}."""
    num_features: int
    eps: float = 1e-5

    def init(self, rng):
        return {'scale': jnp.ones((self.num_features,), jnp.float32),
                'bias': jnp.zeros((self.num_features,), jnp.float32)}

    def apply(self, params, X):
        mean = X.mean(axis=-1, keepdims=True)
        var = jnp.square(X - mean).mean(axis=-1, keepdims=True)
        return (X - mean) / jnp.sqrt(var + self.eps) * params['scale'] + params['bias']


@dataclasses.dataclass(frozen=True)
class Embedding:
    """A lookup table; params {'embedding': (num_embeddings, features)}."""
    num_embeddings: int
    features: int

    def init(self, rng):
        return {'embedding': _xavier(rng, (self.num_embeddings, self.features))}

    def apply(self, params, ids):
        return jnp.take(params['embedding'], ids, axis=0)  # (...) -> (..., features)


@dataclasses.dataclass(frozen=True)
class Dropout:
    rate: float

    def apply(self, X, rng=None):
        if rng is None or self.rate == 0.0:
            return X
        keep = jax.random.bernoulli(rng, 1.0 - self.rate, X.shape)
        return jnp.where(keep, X / (1.0 - self.rate), 0.0)


@dataclasses.dataclass(frozen=True)
class MultiHeadAttention:
    """Self-attention with `num_heads` heads; parameters W_q, W_k, W_v, W_o as in the book."""
    num_hiddens: int
    num_heads: int
    dropout: float
    use_bias: bool = False

    def __post_init__(self):
        if self.num_hiddens % self.num_heads:
            raise ValueError(f'num_hiddens {self.num_hiddens} is not divisible by '
                             f'num_heads {self.num_heads}')

    def _dense(self):
        return Dense(self.num_hiddens, self.num_hiddens, use_bias=self.use_bias)

    def init(self, rng):
        keys = jax.random.split(rng, 4)
        return {name: self._dense().init(k) for name, k in zip(('W_q', 'W_k', 'W_v', 'W_o'), keys)}

    def _split_heads(self, X):
        B, L, _ = X.shape
        X = X.reshape(B, L, self.num_heads, -1)      # (B, L, H) -> (B, L, h, d)
        X = X.transpose(0, 2, 1, 3)                  # (B, L, h, d) -> (B, h, L, d)
        return X.reshape(B * self.num_heads, L, -1)  # (B, h, L, d) -> (B*h, L, d)

    def _merge_heads(self, X):
        _, L, d = X.shape
        X = X.reshape(-1, self.num_heads, L, d)  # (B*h, L, d) -> (B, h, L, d)
        X = X.transpose(0, 2, 1, 3)              # (B, h, L, d) -> (B, L, h, d)
        return X.reshape(X.shape[0], L, -1)      # (B, L, h, d) -> (B, L, H)

    def apply(self, params, queries, keys, values, valid_lens=None, rng=None):
        dense = self._dense()
        q = self._split_heads(dense.apply(params['W_q'], queries))  # (B*h, L, d)
        k = self._split_heads(dense.apply(params['W_k'], keys))     # (B*h, L, d)
        v = self._split_heads(dense.apply(params['W_v'], values))   # (B*h, L, d)
        if valid_lens is not None:
            # Each example's length once per head, in the (B, h) order of _split_heads.
            valid_lens = jnp.repeat(valid_lens, self.num_heads, axis=0)  # (B*h,)
        # Scaled after the product, as the book does (the same rounding as MXNet).
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])  # (B*h, L, L)
        weights = masked_softmax(scores, valid_lens)                 # (B*h, L, L)
        output = Dropout(self.dropout).apply(weights, rng) @ v       # (B*h, L, d)
        return dense.apply(params['W_o'], self._merge_heads(output))  # (B, L, H)


@dataclasses.dataclass(frozen=True)
class PositionWiseFFN:
    """Two dense layers applied to every position: (B, L, H) -> (B, L, F) -> (B, L, H)."""
    ffn_num_hiddens: int
    ffn_num_outputs: int
    activation: str = 'relu'

    def _layers(self):
        return (Dense(self.ffn_num_hiddens, self.ffn_num_outputs, activation=self.activation),
                Dense(self.ffn_num_outputs, self.ffn_num_hiddens))

    def init(self, rng):
        k1, k2 = jax.random.split(rng)
        dense1, dense2 = self._layers()
        return {'dense1': dense1.init(k1), 'dense2': dense2.init(k2)}

    def apply(self, params, X):
        dense1, dense2 = self._layers()
        return dense2.apply(params['dense2'], dense1.apply(params['dense1'], X))


@dataclasses.dataclass(frozen=True)
class AddNorm:
    """Residual connection followed by layer normalization: ln(dropout(Y) + X)."""
    norm_shape: int
    dropout: float
    eps: float = 1e-5

    def init(self, rng):
        return {'ln': LayerNorm(self.norm_shape, self.eps).init(rng)}

    def apply(self, params, X, Y, rng=None):
        return LayerNorm(self.norm_shape, self.eps).apply(
            params['ln'], Dropout(self.dropout).apply(Y, rng) + X)


@dataclasses.dataclass(frozen=True)
class TransformerEncoderBlock:
    """Post-LN Transformer encoder block, as in the book and the BERT paper."""
    num_hiddens: int
    ffn_num_hiddens: int
    num_heads: int
    dropout: float
    use_bias: bool = False
    activation: str = 'relu'
    eps: float = 1e-5

    def _parts(self):
        return (MultiHeadAttention(self.num_hiddens, self.num_heads, self.dropout, self.use_bias),
                AddNorm(self.num_hiddens, self.dropout, self.eps),
                PositionWiseFFN(self.ffn_num_hiddens, self.num_hiddens, self.activation),
                AddNorm(self.num_hiddens, self.dropout, self.eps))

    def init(self, rng):
        keys = jax.random.split(rng, 4)
        names = ('attention', 'addnorm1', 'ffn', 'addnorm2')
        return {name: part.init(k) for name, part, k in zip(names, self._parts(), keys)}

    def apply(self, params, X, valid_lens=None, rng=None):
        attention, addnorm1, ffn, addnorm2 = self._parts()
        r_att, r_add1, r_add2 = _split(rng, 3)
        Y = attention.apply(params['attention'], X, X, X, valid_lens, r_att)  # (B, L, H)
        Y = addnorm1.apply(params['addnorm1'], X, Y, r_add1)                  # (B, L, H)
        return addnorm2.apply(params['addnorm2'], Y, ffn.apply(params['ffn'], Y), r_add2)


@dataclasses.dataclass(frozen=True)
class BERTEncoder:
    """Token + segment + learnable positional embeddings, then `num_blks` encoder blocks;
    with `embedding_norm` (BERT), LayerNorm and dropout after the summed embeddings."""
    vocab_size: int
    num_hiddens: int
    ffn_num_hiddens: int
    num_heads: int
    num_blks: int
    dropout: float
    max_len: int = 1000
    activation: str = 'relu'
    embedding_norm: bool = False
    eps: float = 1e-5

    def _blk(self):
        # BERT's attention projections have biases (use_bias=True), as in the book.
        return TransformerEncoderBlock(self.num_hiddens, self.ffn_num_hiddens, self.num_heads,
                                       self.dropout, True, self.activation, self.eps)

    def init(self, rng):
        k_tok, k_seg, k_pos, *k_blks = jax.random.split(rng, 3 + self.num_blks)
        extra = ({'embedding_ln': LayerNorm(self.num_hiddens, self.eps).init(None)}
                 if self.embedding_norm else {})
        return {**extra,
            'token_embedding': Embedding(self.vocab_size, self.num_hiddens).init(k_tok),
            'segment_embedding': Embedding(2, self.num_hiddens).init(k_seg),
            # Positional embeddings are learned in BERT; long enough for any allowed input.
            'pos_embedding': _xavier(k_pos, (1, self.max_len, self.num_hiddens)),
            'blks': {str(i): self._blk().init(k) for i, k in enumerate(k_blks)},
        }

    def apply(self, params, tokens, segments, valid_lens=None, rng=None):
        X = (Embedding(self.vocab_size, self.num_hiddens).apply(params['token_embedding'], tokens)
             + Embedding(2, self.num_hiddens).apply(params['segment_embedding'], segments))
        # The first L rows of the positional table: (1, max_len, H) -> (1, L, H)
        X = X + params['pos_embedding'][:, :X.shape[1], :]  # (B, L, H)
        if self.embedding_norm:
            # a key of its own; the blocks' keys are split as the book's model splits them
            r_emb = None if rng is None else jax.random.fold_in(rng, self.num_blks)
            X = LayerNorm(self.num_hiddens, self.eps).apply(params['embedding_ln'], X)
            X = Dropout(self.dropout).apply(X, r_emb)  # (B, L, H)
        for i, r in enumerate(_split(rng, self.num_blks)):
            X = self._blk().apply(params['blks'][str(i)], X, valid_lens, r)
        return X


@dataclasses.dataclass(frozen=True)
class MaskLM:
    """Predicts the original tokens at `pred_positions` from the encoded sequence; with
    `tied` (BERT) the last layer is the token embedding (passed to `apply`) and a bias."""
    vocab_size: int
    num_hiddens: int
    activation: str = 'relu'
    eps: float = 1e-5
    tied: bool = False

    def _layers(self):
        return (Dense(self.num_hiddens, self.num_hiddens, activation=self.activation),
                LayerNorm(self.num_hiddens, self.eps),
                Dense(self.vocab_size, self.num_hiddens))

    def init(self, rng):
        keys = jax.random.split(rng, 3)
        mlp = {str(i): layer.init(k) for i, (layer, k) in enumerate(zip(self._layers(), keys))}
        if self.tied:
            mlp['2'] = {'bias': jnp.zeros((self.vocab_size,), jnp.float32)}
        return {'mlp': mlp}

    def apply(self, params, X, pred_positions, embedding=None):
        # The example index of every prediction: (B,) -> (B, 1), broadcast against (B, P)
        batch_idx = jnp.arange(X.shape[0])[:, None]
        Y = X[batch_idx, jnp.asarray(pred_positions, jnp.int32)]  # (B, P, H)
        dense, ln, output = self._layers()
        Y = ln.apply(params['mlp']['1'], dense.apply(params['mlp']['0'], Y))  # (B, P, H)
        if self.tied:
            # (B, P, H) @ (H, V) with the (V, H) embedding table transposed -> (B, P, V)
            return Y @ embedding.T + params['mlp']['2']['bias']
        return output.apply(params['mlp']['2'], Y)  # (B, P, V)


@dataclasses.dataclass(frozen=True)
class NextSentencePred:
    """Two-way classifier of whether the second sentence follows the first."""
    num_inputs: int

    def init(self, rng):
        return {'output': Dense(2, self.num_inputs).init(rng)}

    def apply(self, params, X):
        return Dense(2, self.num_inputs).apply(params['output'], X)  # (B, H) -> (B, 2)


def _encoder(c: BERTConfig):
    return BERTEncoder(c.vocab_size, c.num_hiddens, c.ffn_num_hiddens, c.num_heads, c.num_blks,
                       c.dropout, c.max_len, c.activation, c.embedding_norm, c.layer_norm_eps)


def _mask_lm(c: BERTConfig):
    return MaskLM(c.vocab_size, c.num_hiddens, c.activation, c.layer_norm_eps, c.tie_mlm_decoder)


def _cls_hidden(c: BERTConfig, params, encoded_X):
    """The book's pooled representation: hidden(encoded_X[:, 0, :]); BERT's pooler."""
    hidden = Dense(c.num_hiddens, c.num_hiddens, activation='tanh')
    return hidden.apply(params, encoded_X[:, 0, :])  # (B, L, H) -> (B, H) -> (B, H)


@dataclasses.dataclass(frozen=True)
class BERTModel:
    """BERT with its pretraining heads.

    `apply(params, tokens, segments, valid_lens=None, pred_positions=None, rng=None)` ->
    `(encoded_X (B, L, H), mlm_Y_hat (B, P, V) or None, nsp_Y_hat (B, 2))`.
    """
    config: BERTConfig

    def init(self, rng):
        c = self.config
        k_enc, k_hid, k_mlm, k_nsp = jax.random.split(rng, 4)
        return {'encoder': _encoder(c).init(k_enc),
                'hidden': Dense(c.num_hiddens, c.num_hiddens).init(k_hid),
                'mlm': _mask_lm(c).init(k_mlm),
                'nsp': NextSentencePred(c.num_hiddens).init(k_nsp)}

    def apply(self, params, tokens, segments, valid_lens=None, pred_positions=None, rng=None):
        c = self.config
        encoded_X = _encoder(c).apply(params['encoder'], tokens, segments, valid_lens, rng)
        embedding = params['encoder']['token_embedding']['embedding']
        mlm_Y_hat = (None if pred_positions is None else
                     _mask_lm(c).apply(params['mlm'], encoded_X, pred_positions, embedding))
        # The NSP classifier reads the hidden layer's output at <cls> (position 0).
        pooled = _cls_hidden(c, params['hidden'], encoded_X)
        nsp_Y_hat = NextSentencePred(c.num_hiddens).apply(params['nsp'], pooled)  # (B, 2)
        return encoded_X, mlm_Y_hat, nsp_Y_hat


@dataclasses.dataclass(frozen=True)
class BERTClassifier:
    """The fine-tuning model: encoder and `hidden` (from a pretrained BERT) + a new output.

    `init(rng, bert_params=None)`: with `bert_params` (a `BERTModel`'s), their encoder and
    hidden layer are taken over and only `output` is drawn. `apply(params, tokens, segments,
    valid_lens=None, rng=None)` -> logits (B, C).
    """
    config: BERTConfig

    def init(self, rng, bert_params=None):
        c = self.config
        k_bert, k_out = jax.random.split(rng)
        if bert_params is None:
            bert_params = BERTModel(c).init(k_bert)
        # The book initialises the new layer with MXNet's default, Uniform(-0.07, 0.07).
        kernel = jax.random.uniform(k_out, (c.num_hiddens, c.num_classes), jnp.float32,
                                    -0.07, 0.07)
        return {'encoder': bert_params['encoder'], 'hidden': bert_params['hidden'],
                'output': {'kernel': kernel, 'bias': jnp.zeros((c.num_classes,), jnp.float32)}}

    def apply(self, params, tokens, segments, valid_lens=None, rng=None):
        c = self.config
        encoded_X = _encoder(c).apply(params['encoder'], tokens, segments, valid_lens, rng)
        pooled = _cls_hidden(c, params['hidden'], encoded_X)                  # (B, H)
        return Dense(c.num_classes, c.num_hiddens).apply(params['output'], pooled)  # (B, C)


# -- the book's losses ---------------------------------------------------------------------

def _cross_entropy(logits, labels):
    """Softmax cross-entropy per row: (N, K), (N,) -> (N,)."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_p, jnp.asarray(labels, jnp.int32)[:, None], axis=-1)[:, 0]


def pretrain_loss(mlm_Y_hat, nsp_Y_hat, mlm_labels, mlm_weights, nsp_labels):
    """The book's `_get_batch_loss_bert`: returns (mlm + nsp, mlm, nsp).

    MLM: cross-entropy per predicted position, weighted by `mlm_weights` (0 for padding
    predictions), summed and divided by the number of real predictions.
    """
    vocab_size = mlm_Y_hat.shape[-1]
    mlm_l = _cross_entropy(mlm_Y_hat.reshape(-1, vocab_size),  # (B, P, V) -> (B*P, V)
                           mlm_labels.reshape(-1))
    mlm_weights = mlm_weights.reshape(-1)  # (B, P) -> (B*P,)
    mlm_l = (mlm_l * mlm_weights).sum() / (mlm_weights.sum() + 1e-8)
    nsp_l = _cross_entropy(nsp_Y_hat, nsp_labels).mean()
    return mlm_l + nsp_l, mlm_l, nsp_l


def finetune_loss(logits, labels):
    """Mean cross-entropy over the classes (the book's SoftmaxCrossEntropyLoss, then mean)."""
    return _cross_entropy(logits, labels).mean()


# -- Adam as MXNet computes it ------------------------------------------------------------

def mxnet_adam_lr(lr, t, beta1=0.9, beta2=0.999):
    """MXNet's bias-corrected step size for step t (1-based), in double precision on the host
    as MXNet computes it: lr * sqrt(1 - beta2^t) / (1 - beta1^t).
    """
    return lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)


def clip_global_norm(grads, max_norm):
    """Scale every gradient by max_norm / global norm where that is below 1, as MXNet's
    `gluon.utils.clip_global_norm` does; max_norm = inf leaves them unchanged."""
    leaves = jax.tree_util.tree_leaves(grads)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves))
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-8))
    return jax.tree_util.tree_map(lambda g: g * scale, grads)


def mxnet_adam_init(params):
    """Optimizer state: the first and second moments, zeros like params."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return {'m': zeros, 'v': zeros}


def mxnet_adam_update(params, grads, state, lr_t, beta1=0.9, beta2=0.999, eps=1e-8):
    """One step of MXNet 1.9.1's Adam -> (params, state). Pure, so it can be jitted.

    MXNet folds the bias corrections into the step size (`lr_t`, see `mxnet_adam_lr`) and
    adds epsilon to sqrt(v) without correcting it: w -= lr_t * m / (sqrt(v) + eps).
    (optax.adam corrects v before adding eps, which moves the curves apart when gradients
    are small.)
    """
    m = jax.tree_util.tree_map(lambda m, g: beta1 * m + (1.0 - beta1) * g, state['m'], grads)
    v = jax.tree_util.tree_map(lambda v, g: beta2 * v + (1.0 - beta2) * g * g, state['v'], grads)
    params = jax.tree_util.tree_map(lambda w, m, v: w - lr_t * m / (jnp.sqrt(v) + eps),
                                    params, m, v)
    return params, {'m': m, 'v': v}

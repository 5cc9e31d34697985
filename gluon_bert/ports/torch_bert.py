"""The BERT of `gluon_bert.model` in PyTorch: same class names, structure and call signatures.

Put this file beside `gluon_bert/model/*.py` and the blocks line up one to one. Parameter
paths are the MXNet ones (`encoder.blks.0.attention.W_q.weight`, `mlm.mlp.2.bias`, ...);
only LayerNorm's leaves carry PyTorch's names (`weight`/`bias` for MXNet's `gamma`/`beta`).
`convert.py` holds the mapping, and the one to the book's own `d2l.torch.BERTModel`.

Shape legend
    B: batch size   L: sequence length (<= max_len)   H: num_hiddens   F: ffn_num_hiddens
    h: num_heads    d = H / h: size of one head        P: predictions per example
    V: vocabulary size   C: number of classes
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config import BERTConfig

__all__ = ['masked_softmax', 'Dense', 'MultiHeadAttention', 'PositionWiseFFN', 'AddNorm',
           'TransformerEncoderBlock', 'BERTEncoder', 'TiedOutput', 'MaskLM', 'NextSentencePred',
           'BERTModel', 'BERTClassifier', 'pretrain_loss', 'finetune_loss', 'MXNetAdam']

# gelu: the erf form (F.gelu's default), as MXNet's LeakyReLU(act_type='gelu') and BERT
_ACTIVATIONS = {None: lambda x: x, 'relu': F.relu, 'tanh': torch.tanh, 'gelu': F.gelu}


def masked_softmax(scores, valid_lens):
    """Softmax over the last axis that ignores keys at positions >= valid_len.

    scores: (B*h, L, L); valid_lens: (B*h,) or None. As in the book, masked scores are
    replaced by -1e6 (not -inf), so their weights are exactly 0 in float32.
    """
    if valid_lens is None:
        return F.softmax(scores, dim=-1)
    positions = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.float32)
    # (L,) against (B*h, 1, 1) -> (B*h, 1, L): the same key mask for every query row
    keep = positions < valid_lens.to(torch.float32).reshape(-1, 1, 1)
    # -1e6 where the dtype holds it (float32, bfloat16), else its most negative value
    # (float16 under autocast: -65504, whose exp is 0 all the same)
    fill = max(-1e6, torch.finfo(scores.dtype).min)
    return F.softmax(scores.masked_fill(~keep, fill), dim=-1)


class Dense(nn.Linear):
    """MXNet's `Dense(units, activation=...)`: a linear layer with its activation fused in,
    so that `hidden` and `mlm.mlp` keep the MXNet parameter paths (no extra Sequential slot).
    """

    def __init__(self, units, in_units, activation=None, use_bias=True):
        super().__init__(in_units, units, bias=use_bias)
        if activation not in _ACTIVATIONS:
            raise ValueError(f'unsupported activation {activation!r}')
        self.activation = activation

    def forward(self, X):
        return _ACTIVATIONS[self.activation](super().forward(X))

    def extra_repr(self):
        return f'{super().extra_repr()}, activation={self.activation}'


class MultiHeadAttention(nn.Module):
    """Self-attention with `num_heads` heads; parameters W_q, W_k, W_v, W_o as in the book."""

    def __init__(self, num_hiddens, num_heads, dropout, use_bias=False):
        super().__init__()
        if num_hiddens % num_heads:
            raise ValueError(f'num_hiddens {num_hiddens} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.W_q = Dense(num_hiddens, num_hiddens, use_bias=use_bias)
        self.W_k = Dense(num_hiddens, num_hiddens, use_bias=use_bias)
        self.W_v = Dense(num_hiddens, num_hiddens, use_bias=use_bias)
        self.W_o = Dense(num_hiddens, num_hiddens, use_bias=use_bias)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, X):
        B, L, _ = X.shape
        X = X.reshape(B, L, self.num_heads, -1)  # (B, L, H) -> (B, L, h, d)
        X = X.permute(0, 2, 1, 3)                # (B, L, h, d) -> (B, h, L, d)
        return X.reshape(B * self.num_heads, L, -1)  # (B, h, L, d) -> (B*h, L, d)

    def _merge_heads(self, X):
        _, L, d = X.shape
        X = X.reshape(-1, self.num_heads, L, d)  # (B*h, L, d) -> (B, h, L, d)
        X = X.permute(0, 2, 1, 3)                # (B, h, L, d) -> (B, L, h, d)
        return X.reshape(X.shape[0], L, -1)      # (B, L, h, d) -> (B, L, H)

    def forward(self, queries, keys, values, valid_lens=None):
        q = self._split_heads(self.W_q(queries))  # (B*h, L, d)
        k = self._split_heads(self.W_k(keys))     # (B*h, L, d)
        v = self._split_heads(self.W_v(values))   # (B*h, L, d)
        if valid_lens is not None:
            # Each example's length once per head, in the (B, h) order of _split_heads.
            valid_lens = torch.repeat_interleave(valid_lens, self.num_heads, dim=0)  # (B*h,)
        # Scaled after the product, as the book does (the same rounding as MXNet).
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1])  # (B*h, L, L)
        weights = masked_softmax(scores, valid_lens)                        # (B*h, L, L)
        output = torch.bmm(self.dropout(weights), v)                        # (B*h, L, d)
        return self.W_o(self._merge_heads(output))                          # (B, L, H)


class PositionWiseFFN(nn.Module):
    """Two dense layers applied to every position: (B, L, H) -> (B, L, F) -> (B, L, H)."""

    def __init__(self, ffn_num_hiddens, ffn_num_outputs, num_inputs=None, activation='relu'):
        super().__init__()
        num_inputs = ffn_num_outputs if num_inputs is None else num_inputs
        self.dense1 = Dense(ffn_num_hiddens, num_inputs, activation=activation)
        self.dense2 = Dense(ffn_num_outputs, ffn_num_hiddens)

    def forward(self, X):
        return self.dense2(self.dense1(X))


class AddNorm(nn.Module):
    """Residual connection followed by layer normalization: ln(dropout(Y) + X)."""

    def __init__(self, norm_shape, dropout, eps=1e-5):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(norm_shape, eps=eps)  # MXNet's LayerNorm epsilon by default

    def forward(self, X, Y):
        return self.ln(self.dropout(Y) + X)


class TransformerEncoderBlock(nn.Module):
    """Post-LN Transformer encoder block, as in the book and the BERT paper."""

    def __init__(self, num_hiddens, ffn_num_hiddens, num_heads, dropout, use_bias=False,
                 activation='relu', eps=1e-5):
        super().__init__()
        self.attention = MultiHeadAttention(num_hiddens, num_heads, dropout, use_bias)
        self.addnorm1 = AddNorm(num_hiddens, dropout, eps)
        self.ffn = PositionWiseFFN(ffn_num_hiddens, num_hiddens, activation=activation)
        self.addnorm2 = AddNorm(num_hiddens, dropout, eps)

    def forward(self, X, valid_lens=None):
        Y = self.addnorm1(X, self.attention(X, X, X, valid_lens))  # (B, L, H)
        return self.addnorm2(Y, self.ffn(Y))                       # (B, L, H)


class BERTEncoder(nn.Module):
    """Token + segment + learnable positional embeddings, then `num_blks` encoder blocks;
    with `embedding_norm` (BERT), LayerNorm and dropout after the summed embeddings."""

    def __init__(self, vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_blks, dropout,
                 max_len=1000, activation='relu', embedding_norm=False, eps=1e-5):
        super().__init__()
        self.max_len = max_len
        self.token_embedding = nn.Embedding(vocab_size, num_hiddens)
        self.segment_embedding = nn.Embedding(2, num_hiddens)
        self.embedding_norm = embedding_norm
        if embedding_norm:
            self.embedding_ln = nn.LayerNorm(num_hiddens, eps=eps)
            self.embedding_dropout = nn.Dropout(dropout)
        self.blks = nn.Sequential(*[
            # BERT's attention projections have biases (use_bias=True), as in the book.
            TransformerEncoderBlock(num_hiddens, ffn_num_hiddens, num_heads, dropout, True,
                                    activation, eps)
            for _ in range(num_blks)])
        # Positional embeddings are learned in BERT; long enough for any allowed input.
        self.pos_embedding = nn.Parameter(torch.empty(1, max_len, num_hiddens))

    def forward(self, tokens, segments, valid_lens=None):
        X = self.token_embedding(tokens) + self.segment_embedding(segments)  # (B, L, H)
        # The first L rows of the positional table: (1, max_len, H) -> (1, L, H)
        X = X + self.pos_embedding[:, :X.shape[1], :]                         # (B, L, H)
        if self.embedding_norm:
            X = self.embedding_dropout(self.embedding_ln(X))                  # (B, L, H)
        for blk in self.blks:
            X = blk(X, valid_lens)
        return X


class TiedOutput(nn.Module):
    """BERT's MLM decoder: the token embedding as weights (passed in) and its own bias."""

    def __init__(self, vocab_size):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, X, weight):
        return F.linear(X, weight, self.bias)  # (B, P, H) x (V, H) -> (B, P, V)


class MaskLM(nn.Module):
    """Predicts the original tokens at `pred_positions` from the encoded sequence; with
    `tied` (BERT) the last layer reads the token embedding (`embedding_weight`)."""

    def __init__(self, vocab_size, num_hiddens, activation='relu', eps=1e-5, tied=False):
        super().__init__()
        self.tied = tied
        self.mlp = nn.Sequential(Dense(num_hiddens, num_hiddens, activation=activation),
                                 nn.LayerNorm(num_hiddens, eps=eps),
                                 TiedOutput(vocab_size) if tied else Dense(vocab_size, num_hiddens))

    def forward(self, X, pred_positions, embedding_weight=None):
        # The example index of every prediction: (B,) -> (B, 1), broadcast against (B, P)
        batch_idx = torch.arange(X.shape[0], device=X.device).unsqueeze(-1)
        masked_X = X[batch_idx, pred_positions.long()]  # (B, P, H)
        Y = self.mlp[1](self.mlp[0](masked_X))          # (B, P, H)
        if self.tied:
            return self.mlp[2](Y, embedding_weight)     # (B, P, V)
        return self.mlp[2](Y)                           # (B, P, V)


class NextSentencePred(nn.Module):
    """Two-way classifier of whether the second sentence follows the first."""

    def __init__(self, num_inputs):
        super().__init__()
        self.output = Dense(2, num_inputs)

    def forward(self, X):
        return self.output(X)  # (B, H) -> (B, 2)


def cls_hidden(hidden, encoded_X):
    """The book's pooled representation: hidden(encoded_X[:, 0, :]); BERT's pooler."""
    return hidden(encoded_X[:, 0, :])  # (B, L, H) -> (B, H) -> (B, H)


def _encoder(c: BERTConfig) -> BERTEncoder:
    return BERTEncoder(c.vocab_size, c.num_hiddens, c.ffn_num_hiddens, c.num_heads, c.num_blks,
                       c.dropout, c.max_len, c.activation, c.embedding_norm, c.layer_norm_eps)


def _xavier_(module):
    """The book's `init.Xavier()` (uniform, average fan, magnitude 3) on every weight of
    two or more axes; biases 0, LayerNorm scale 1. PyTorch's `xavier_uniform_` counts fans
    as MXNet does, including the (1, max_len, H) positional table.
    """
    for name, param in module.named_parameters():
        if param.dim() >= 2:
            nn.init.xavier_uniform_(param)
        elif name.endswith('bias'):
            nn.init.zeros_(param)
        else:
            nn.init.ones_(param)  # LayerNorm weight (MXNet's gamma)


class BERTModel(nn.Module):
    """BERT with its pretraining heads.

    `BERTModel(config)` or the book's `BERTModel(vocab_size, num_hiddens, ffn_num_hiddens,
    num_heads, num_blks, dropout, max_len=1000)`.

    Call: `(tokens, segments, valid_lens=None, pred_positions=None)` ->
    `(encoded_X (B, L, H), mlm_Y_hat (B, P, V) or None, nsp_Y_hat (B, 2))`.
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__()
        self.config = c = BERTConfig.from_args(config, *args, **kwargs)
        self.encoder = _encoder(c)
        # The book's `hidden` layer is BERT's pooler, its NSP head BERT's seq_relationship.
        self.hidden = Dense(c.num_hiddens, c.num_hiddens, activation='tanh')
        self.mlm = MaskLM(c.vocab_size, c.num_hiddens, c.activation, c.layer_norm_eps,
                          c.tie_mlm_decoder)
        self.nsp = NextSentencePred(c.num_hiddens)
        _xavier_(self)

    def forward(self, tokens, segments, valid_lens=None, pred_positions=None):
        encoded_X = self.encoder(tokens, segments, valid_lens)  # (B, L, H)
        mlm_Y_hat = None if pred_positions is None else self.mlm(
            encoded_X, pred_positions, self.encoder.token_embedding.weight)
        # The NSP classifier reads the hidden layer's output at <cls> (position 0).
        nsp_Y_hat = self.nsp(cls_hidden(self.hidden, encoded_X))  # (B, 2)
        return encoded_X, mlm_Y_hat, nsp_Y_hat


class BERTClassifier(nn.Module):
    """The fine-tuning model: a (pretrained) encoder and `hidden` layer + a new output layer.

    `BERTClassifier(bert)` shares `bert.encoder` and `bert.hidden`; `BERTClassifier(config)`
    builds fresh ones. Call: `(tokens, segments, valid_lens)` -> logits (B, C); the book's
    single-tuple form `net((tokens, segments, valid_lens))` works too.
    """

    def __init__(self, bert_or_config, num_classes=None):
        super().__init__()
        if isinstance(bert_or_config, BERTModel):
            bert, config = bert_or_config, bert_or_config.config
        elif isinstance(bert_or_config, BERTConfig):
            bert, config = BERTModel(bert_or_config), bert_or_config
        else:
            raise TypeError('BERTClassifier takes a torch_bert.BERTModel or a BERTConfig, got '
                            f'{type(bert_or_config).__name__}')
        if num_classes is not None:
            config = config.replace(num_classes=num_classes)
        self.config = config
        self.encoder = bert.encoder
        self.hidden = bert.hidden
        self.output = Dense(config.num_classes, config.num_hiddens)
        # The book initialises the new layer with MXNet's default, Uniform(-0.07, 0.07).
        nn.init.uniform_(self.output.weight, -0.07, 0.07)
        nn.init.zeros_(self.output.bias)

    def forward(self, tokens, segments=None, valid_lens=None):
        if segments is None and isinstance(tokens, (list, tuple)):
            tokens, segments, valid_lens = tokens  # the book's net((tokens, segments, lens))
        encoded_X = self.encoder(tokens, segments, valid_lens)       # (B, L, H)
        return self.output(cls_hidden(self.hidden, encoded_X))       # (B, C)


# -- the book's losses ---------------------------------------------------------------------

def pretrain_loss(mlm_Y_hat, nsp_Y_hat, mlm_labels, mlm_weights, nsp_labels):
    """The book's `_get_batch_loss_bert`: returns (mlm + nsp, mlm, nsp).

    MLM: cross-entropy per predicted position, weighted by `mlm_weights` (0 for padding
    predictions), summed and divided by the number of real predictions.
    """
    vocab_size = mlm_Y_hat.shape[-1]
    mlm_l = F.cross_entropy(mlm_Y_hat.reshape(-1, vocab_size),  # (B, P, V) -> (B*P, V)
                            mlm_labels.reshape(-1).long(), reduction='none')
    mlm_weights = mlm_weights.reshape(-1)  # (B, P) -> (B*P,)
    mlm_l = (mlm_l * mlm_weights).sum() / (mlm_weights.sum() + 1e-8)
    nsp_l = F.cross_entropy(nsp_Y_hat, nsp_labels.long())
    return mlm_l + nsp_l, mlm_l, nsp_l


def finetune_loss(logits, labels):
    """Mean cross-entropy over the classes (the book's SoftmaxCrossEntropyLoss, then mean)."""
    return F.cross_entropy(logits, labels.long())


class MXNetAdam(torch.optim.Optimizer):
    """Adam exactly as MXNet 1.9.1 computes it, so that loss curves match MXNet's.

    MXNet folds the bias corrections into the step size and adds epsilon to sqrt(v)
    without correcting it: lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t),
    w -= lr_t * m / (sqrt(v) + eps). (`torch.optim.Adam` corrects v before adding eps,
    which moves the curves apart when gradients are small.)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group['betas']
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state['t'] = 0
                    state['m'] = torch.zeros_like(p)
                    state['v'] = torch.zeros_like(p)
                state['t'] += 1
                t, m, v, g = state['t'], state['m'], state['v'], p.grad
                lr_t = group['lr'] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                p.sub_(lr_t * m / (v.sqrt() + group['eps']))
        return loss

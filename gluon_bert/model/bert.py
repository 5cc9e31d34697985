"""The BERT pretraining model and the BERT classifier used for fine-tuning.

Shape legend
    B: batch size   L: sequence length   H: num_hiddens   P: predictions per example
    V: vocabulary size   C: number of classes
"""
from __future__ import annotations

import warnings

import mxnet as mx
from mxnet.gluon import nn

from ..config import BERTConfig
from .encoder import BERTEncoder
from .heads import MaskLM, NextSentencePred
from .layers import Dense, LegacyBoundary

__all__ = ['BERTModel', 'BERTClassifier', 'cls_hidden']


def cls_hidden(F, hidden, encoded_X):
    """The book's pooled representation: hidden(encoded_X[:, 0, :]); BERT's pooler."""
    cls = F.slice_axis(encoded_X, axis=1, begin=0, end=1)  # (B, L, H) -> (B, 1, H)
    return hidden(F.reshape(cls, shape=(0, -1)))          # (B, 1, H) -> (B, H) -> (B, H)


class BERTModel(LegacyBoundary, nn.HybridBlock):
    """BERT with its pretraining heads, as the book's `BERTModel`.

    `BERTModel(config)` or `BERTModel(vocab_size, num_hiddens, ffn_num_hiddens, num_heads,
    num_blks, dropout, max_len=1000)`.

    Call: `(tokens, segments, valid_lens=None, pred_positions=None)` ->
    `(encoded_X (B, L, H), mlm_Y_hat (B, P, V) or None, nsp_Y_hat (B, 2))`.
    """

    def __init__(self, config, *args, **kwargs):
        prefix = kwargs.pop('prefix', None)
        params = kwargs.pop('params', None)
        super().__init__(prefix=prefix, params=params)
        self.config = BERTConfig.from_args(config, *args, **kwargs)
        c = self.config
        with self.name_scope():
            self.encoder = BERTEncoder.from_config(c)
            # The book's `hidden` layer is BERT's pooler (dense + tanh at <cls>), its NSP
            # head BERT's `seq_relationship`: the same blocks under the book's names.
            self.hidden = Dense(c.num_hiddens, activation='tanh', in_units=c.num_hiddens)
            self.mlm = MaskLM(c.vocab_size, c.num_hiddens, c.activation, c.layer_norm_eps,
                              c.tie_mlm_decoder)
            self.nsp = NextSentencePred(c.num_hiddens)

    def __call__(self, tokens, segments, valid_lens=None, pred_positions=None):
        if pred_positions is None:
            with warnings.catch_warnings():
                # Without positions the MLM head is unused, which Gluon warns about.
                warnings.filterwarnings('ignore', message='.*not used by any computation')
                out = super().__call__(tokens, segments, valid_lens, pred_positions)
            # A static graph cannot output None: put it back here.
            encoded_X, nsp_Y_hat = out
            return encoded_X, None, nsp_Y_hat
        return super().__call__(tokens, segments, valid_lens, pred_positions)

    def hybrid_forward(self, F, tokens, segments, valid_lens=None, pred_positions=None):
        encoded_X = self.encoder(tokens, segments, valid_lens)  # (B, L, H)
        # The NSP classifier reads the hidden layer's output at <cls> (position 0).
        nsp_Y_hat = self.nsp(cls_hidden(F, self.hidden, encoded_X))  # (B, 2)
        if pred_positions is None:
            return encoded_X, nsp_Y_hat
        weight = self._decoder_weight(F, tokens)
        mlm_Y_hat = self.mlm(encoded_X, pred_positions) if weight is None else \
            self.mlm(encoded_X, pred_positions, weight)                # (B, P, V)
        return encoded_X, mlm_Y_hat, nsp_Y_hat

    def _decoder_weight(self, F, tokens):
        """The tied decoder reads the token embedding: its variable in a graph, its value
        on the input's device when imperative (None when the decoder has its own)."""
        if not self.config.tie_mlm_decoder:
            return None
        weight = self.encoder.token_embedding.weight
        return weight.var() if F is mx.sym else weight.data(tokens.context)

    def pretrain_packed(self, F, tokens, segments, positions, valid_lens, unpack, pack,
                        cls_rows, mlm_rows):
        """The model on a packed batch (`gluon_bert.data.packing`): the encoder on the T real
        tokens, the MLM head on the K real predictions only. -> (mlm_Y_hat (K, V),
        nsp_Y_hat (B, 2)), the rows that `forward` gives for them. Called inside a parent
        block's hybrid_forward (`step.PretrainObjective`) with its F.

        The heads read B + K rows of the last block's output, so that block computes those
        rows only (its keys and values still come from every token): at the book's shape
        about a sixth of the tokens."""
        rows = F.concat(cls_rows, mlm_rows, dim=0)                           # (B + K,)
        X = self.encoder.encode_packed(F, tokens, segments, positions, valid_lens, unpack,
                                       pack, rows)                            # (B + K, H)
        # The pooled <cls> of every example: the first B rows, (B + K, H) -> (B, H) -> (B, 2)
        nsp_Y_hat = self.nsp(self.hidden(F.slice_like(X, cls_rows, axes=(0,))))
        # The hidden states at the predicted positions, rows B .. B + K: (K, H) -> (K, V)
        num_cls = F.cast(F.sum(F.ones_like(cls_rows)), 'float32')           # (1,): B
        ks = F.cast(F.contrib.arange_like(mlm_rows), 'float32')             # (K,): k
        after = F.broadcast_add(ks, num_cls)                                 # (K,): B + k
        mlm_Y_hat = self.mlm.decode(F, F.take(X, after), self._decoder_weight(F, tokens))
        return mlm_Y_hat, nsp_Y_hat


class BERTClassifier(LegacyBoundary, nn.HybridBlock):
    """The book's fine-tuning model: a pretrained encoder and `hidden` layer + a new output.

    `BERTClassifier(bert)` shares `bert.encoder` and `bert.hidden` (the pretraining heads
    are not part of it, so fine-tuning cannot touch them); `BERTClassifier(config)` builds
    a fresh encoder. Call: `(tokens, segments, valid_lens)` -> logits (B, C). The book's
    single-tuple form `net((tokens, segments, valid_lens))` works too.

    The classifier reads the encoder's output at <cls> only, so by default its last block
    computes that row alone (`BERTEncoder.encode_first`): the same logits, and at the
    `bert.small` shape (2 blocks) about 35% less arithmetic. `first_only=False` runs the
    last block on every position, as the book does.
    """

    def __init__(self, bert_or_config, num_classes=None, first_only=True, **kwargs):
        super().__init__(**kwargs)
        self.first_only = first_only
        if isinstance(bert_or_config, BERTModel):
            bert, config = bert_or_config, bert_or_config.config
        elif isinstance(bert_or_config, BERTConfig):
            bert, config = None, bert_or_config
        else:
            raise TypeError('BERTClassifier takes a gluon_bert BERTModel or a BERTConfig, got '
                            f'{type(bert_or_config).__name__}')
        if num_classes is not None:
            config = config.replace(num_classes=num_classes)
        self.config = config
        with self.name_scope():
            if bert is None:
                c = config
                self.encoder = BERTEncoder.from_config(c)
                self.hidden = Dense(c.num_hiddens, activation='tanh', in_units=c.num_hiddens)
            else:
                self.encoder = bert.encoder
                self.hidden = bert.hidden
            self.output = Dense(config.num_classes, in_units=config.num_hiddens)

    def __call__(self, *args):
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            args = tuple(args[0])  # the book passes (tokens, segments, valid_lens) as one tuple
        return super().__call__(*args)

    def hybrid_forward(self, F, tokens, segments, valid_lens=None):
        if self.first_only:
            # the encoder's output at <cls> only, the one row the classifier reads
            cls = self.encoder.encode_first(F, tokens, segments, valid_lens)  # (B, H)
            return self.output(self.hidden(cls))                               # (B, C)
        encoded_X = self.encoder(tokens, segments, valid_lens)        # (B, L, H)
        return self.output(cls_hidden(F, self.hidden, encoded_X))      # (B, C)

    def classify_packed(self, F, tokens, segments, positions, valid_lens, unpack, pack,
                        cls_rows):
        """The classifier on a packed batch (`data.packing.pack_finetune_batch`): the
        encoder on the T real tokens only, its last block at the <cls> rows alone (unless
        first_only=False). -> logits (B, C), those of `forward`. Called inside a parent
        block's hybrid_forward (`step.PackedFinetuneObjective`) with its F."""
        if self.first_only:
            cls = self.encoder.encode_packed(F, tokens, segments, positions, valid_lens,
                                             unpack, pack, cls_rows)          # (B, H)
        else:
            X = self.encoder.encode_packed(F, tokens, segments, positions, valid_lens,
                                           unpack, pack)                      # (T, H)
            cls = F.take(X, cls_rows)                                         # (T, H) -> (B, H)
        return self.output(self.hidden(cls))                                  # (B, C)

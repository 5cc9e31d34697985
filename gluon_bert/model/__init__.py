"""BERT as Gluon HybridBlocks that mirror the book's MXNet classes."""
from .. import kernels as _kernels

# Before any graph is built and before amp.init (see gluon_bert.kernels): builds once.
_kernels.load()

from .attention import MultiHeadAttention, masked_softmax
from .bert import BERTClassifier, BERTModel
from .encoder import AddNorm, BERTEncoder, PositionWiseFFN, TransformerEncoderBlock
from .heads import MaskLM, NextSentencePred
from .layers import legacy_scope

__all__ = ['MultiHeadAttention', 'masked_softmax', 'PositionWiseFFN', 'AddNorm',
           'TransformerEncoderBlock', 'BERTEncoder', 'MaskLM', 'NextSentencePred', 'BERTModel',
           'BERTClassifier', 'legacy_scope']

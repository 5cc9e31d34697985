"""Data for the book's BERT experiments: vocabulary, downloads, WikiText-2, SNLI, batching.

Framework-neutral: nothing here imports MXNet; every array is numpy. Shared by
the MXNet package and the PyTorch and JAX ports.
"""
from .batching import FINETUNE_KEYS, PRETRAIN_KEYS, BatchLoader
from .download import (DATA_HUB, ArchiveError, ChecksumError, DownloadError, HubEntry, cache_dir,
                       download, download_extract, register, sha1_file)
from .snli import LABELS, SNLIBERTDataset, SNLIFormatError, load_data_snli, read_snli
from .synthetic import sample_dir
from .tokenization import WordPieceVocab
from .vocab import RESERVED_TOKENS, MissingFileError, Vocab, tokenize
from .wikitext import (Paragraphs, WikiTextDataset, get_mlm_data_from_tokens, get_next_sentence,
                       get_nsp_data_from_paragraph, get_tokens_and_segments, load_data_wiki,
                       pad_bert_inputs, read_wiki, replace_mlm_tokens)

__all__ = ['BatchLoader', 'PRETRAIN_KEYS', 'FINETUNE_KEYS', 'DATA_HUB', 'HubEntry',
           'DownloadError', 'ChecksumError', 'ArchiveError', 'cache_dir', 'download',
           'download_extract', 'register', 'sha1_file', 'LABELS', 'read_snli', 'SNLIFormatError',
           'SNLIBERTDataset', 'load_data_snli', 'sample_dir', 'RESERVED_TOKENS', 'Vocab',
           'WordPieceVocab', 'tokenize', 'MissingFileError', 'read_wiki', 'Paragraphs', 'get_tokens_and_segments',
           'get_next_sentence', 'get_nsp_data_from_paragraph', 'replace_mlm_tokens',
           'get_mlm_data_from_tokens', 'pad_bert_inputs', 'WikiTextDataset', 'load_data_wiki']

"""Where the real BERTs come from: GluonNLP's model zoo and the Hugging Face hub, fetched
through `download.py` (SHA-1 checked, cached, resumable, offline mode).

* `gluonnlp:<model>_<dataset>` (e.g. `gluonnlp:bert_12_768_12_book_corpus_wiki_en_uncased`):
  the model zoo's `<name>-<sha1[:8]>.zip` holding `<name>-<sha1[:8]>.params`, and the
  vocabulary's `<dataset>-<sha1[:8]>.zip` holding the `.vocab`, at GluonNLP's own URLs
  (`$MXNET_GLUON_REPO`, default Apache MXNet's S3 bucket). The SHA-1s are GluonNLP's,
  of the unpacked files; they are checked after every extraction.
* `hf:<name>[@<revision>]` (e.g. `hf:bert-base-uncased`): config.json, vocab.txt and
  model.safetensors (else pytorch_model.bin) from `$HF_ENDPOINT/<name>/resolve/<revision>/`
  (default https://huggingface.co, revision main) into `<cache>/hf/<name>/`. The hub
  publishes SHA-256s, not SHA-1s: files with a SHA-1 in `HF_SHA1` (or given to
  `register_hf`) are checked against it; the others are checked against the SHA-1
  recorded when they were first downloaded (`.gluon_bert_sha1.json` in the folder), so a
  cached file that changes later is noticed. Pin a revision for a reproducible download.
"""
from __future__ import annotations

import json
import logging
import os

from .download import (ChecksumError, DownloadError, _write_json, download, download_extract,
                       register, sha1_file)
from .download import cache_dir as _cache_home

__all__ = ['GLUONNLP_MODELS', 'gluonnlp_files', 'hf_folder', 'register_hf', 'HF_SHA1',
           'gluonnlp_lower', 'GLUONNLP_PREFIX', 'HF_PREFIX']

log = logging.getLogger(__name__)

GLUONNLP_PREFIX, HF_PREFIX = 'gluonnlp:', 'hf:'
GLUONNLP_REPO = 'https://apache-mxnet.s3-accelerate.dualstack.amazonaws.com/'
HF_ENDPOINT = 'https://huggingface.co'

# model zoo name -> (SHA-1 of its .params, vocabulary data set, SHA-1 of its .vocab), as
# GluonNLP 0.10 registers them
GLUONNLP_MODELS: dict[str, tuple[str, str, str]] = {}
_VOCABS = {'book_corpus_wiki_en_uncased': 'a66073971aa0b1a262453fe51342e57166a8abcf',
           'book_corpus_wiki_en_cased': '2d62af22535ed51f35cc8e2abb607723c89c2636',
           'openwebtext_book_corpus_wiki_en_uncased': 'a66073971aa0b1a262453fe51342e57166a8abcf',
           'wiki_multilingual_uncased': '2b2514cc539047b9179e9d98a4e68c36db05c97a',
           'wiki_multilingual_cased': '0247cb442074237c38c62021f36b7a4dbd2e55f7',
           'wiki_cn_cased': 'ddebd8f3867bca5a61023f73326fb125cf12b4f5'}
for _model, _dataset, _sha1 in (
        ('bert_12_768_12', 'book_corpus_wiki_en_uncased',
         '75cc780f085e8007b3bf6769c6348bb1ff9a3074'),
        ('bert_12_768_12', 'book_corpus_wiki_en_cased',
         '5656dac6965b5054147b0375337d5a6a7a2ff832'),
        ('bert_12_768_12', 'openwebtext_book_corpus_wiki_en_uncased',
         'a56e24015a777329c795eed4ed21c698af03c9ff'),
        ('bert_12_768_12', 'wiki_multilingual_uncased',
         '237f39851b24f0b56d70aa20efd50095e3926e26'),
        ('bert_12_768_12', 'wiki_multilingual_cased',
         'b0f57a207f85a7d361bb79de80756a8c9a4276f7'),
        ('bert_12_768_12', 'wiki_cn_cased', '885ebb9adc249a170c5576e90e88cfd1bbd98da6'),
        ('bert_24_1024_16', 'book_corpus_wiki_en_uncased',
         '24551e1446180e045019a87fc4ffbf714d99c0b5'),
        ('bert_24_1024_16', 'book_corpus_wiki_en_cased',
         '4e685a966f8bf07d533bd6b0e06c04136f23f620')):
    GLUONNLP_MODELS[f'{_model}_{_dataset}'] = (_sha1, _dataset, _VOCABS[_dataset])

# Hugging Face name -> {file: SHA-1}; empty where none is pinned (see the module docstring)
HF_SHA1: dict[str, dict[str, str]] = {
    'bert-base-uncased': {}, 'bert-base-cased': {}, 'bert-large-uncased': {},
    'bert-large-cased': {}, 'google-bert/bert-base-uncased': {},
}
HF_FILES = ('config.json', 'vocab.txt')
HF_WEIGHTS = ('model.safetensors', 'pytorch_model.bin')
_RECORD = '.gluon_bert_sha1.json'


def gluonnlp_lower(dataset_or_name: str) -> bool:
    """GluonNLP's rule: a vocabulary is lower-cased unless its data set is `*_cased`."""
    return not dataset_or_name.endswith('_cased')


def _repo() -> str:
    repo = os.environ.get('MXNET_GLUON_REPO', GLUONNLP_REPO)
    return repo if repo.endswith('/') else repo + '/'


def gluonnlp_files(name: str, cache_dir: str | None = None) -> tuple[str, str]:
    """(path of the .params, path of the .vocab) of a model zoo BERT, downloaded and
    unpacked once into the cache; both SHA-1 checked against GluonNLP's."""
    if name not in GLUONNLP_MODELS:
        raise KeyError(f'unknown GluonNLP BERT {name!r}; known: {", ".join(GLUONNLP_MODELS)}')
    params_sha1, dataset, vocab_sha1 = GLUONNLP_MODELS[name]
    paths = []
    for stem, sha1, kind, ext in ((name, params_sha1, 'models', '.params'),
                                  (dataset, vocab_sha1, 'dataset/vocab', '.vocab')):
        base = f'{stem}-{sha1[:8]}'
        entry = f'gluonnlp:{base}'
        # the archive has no published SHA-1; the file inside it has, checked on unpacking
        register(entry, f'{_repo()}gluon/{kind}/{base}.zip', None, filename=f'{base}.zip',
                    files={base + ext: sha1}, description=f"GluonNLP's {stem}")
        paths.append(os.path.join(download_extract(entry, cache_dir=cache_dir), base + ext))
    return paths[0], paths[1]


def register_hf(name: str, sha1s: dict[str, str]) -> None:
    """Pin the SHA-1s of a Hugging Face model's files ({'config.json': sha1, ...})."""
    HF_SHA1[name] = dict(sha1s)


def _hf_url(name, revision, filename):
    endpoint = os.environ.get('HF_ENDPOINT', HF_ENDPOINT).rstrip('/')
    return f'{endpoint}/{name}/resolve/{revision}/{filename}'


def hf_folder(spec: str, cache_dir: str | None = None) -> str:
    """The cache folder of `name[@revision]` from the Hugging Face hub, with config.json,
    vocab.txt and model.safetensors or pytorch_model.bin (downloaded where missing)."""
    name, _, revision = spec.partition('@')
    revision = revision or 'main'
    if not name or name.startswith('/') or '..' in name.split('/'):
        raise KeyError(f'not a Hugging Face model name: {spec!r}')
    safe = name.replace('/', '--') + ('' if revision == 'main' else f'@{revision}')
    folder = os.path.join(cache_dir or _cache_home(), 'hf', safe)
    record_path = os.path.join(folder, _RECORD)
    try:
        with open(record_path, encoding='utf-8') as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        recorded = {}
    pinned = HF_SHA1.get(name, {})

    def fetch(filename):
        sha1 = pinned.get(filename) or recorded.get(filename) or None
        path = download(_hf_url(name, revision, filename), cache_dir=folder, sha1=sha1)
        if filename not in pinned and filename not in recorded:
            recorded[filename] = sha1_file(path)
            log.warning('%s: no SHA-1 pinned for %s; recorded %s for later checks', spec,
                        filename, recorded[filename])
        return path

    for filename in HF_FILES:
        fetch(filename)
    errors = []
    for filename in HF_WEIGHTS:  # the first one the hub has
        try:
            fetch(filename)
            break
        except ChecksumError:
            raise
        except DownloadError as err:
            errors.append(str(err))
    else:
        raise DownloadError(f'{spec}: no weights on the hub: ' + '; '.join(errors))
    optional = 'tokenizer_config.json'  # whether the tokenizer lower-cases
    if recorded.get(optional, '') is not None:  # None: the hub had none, do not ask again
        try:
            fetch(optional)
        except ChecksumError:
            raise
        except DownloadError:
            recorded[optional] = None
    _write_json(record_path, recorded)
    return folder

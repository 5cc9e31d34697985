"""Bad input files, a bad cache and bad archives: one clear error that names the file.

Each case asserts the exception type and that the message names the file (and the line,
where there is one); a few go through `gluon-bert` and check for its single line.
"""
import gzip
import hashlib
import importlib
import io
import json
import logging
import os
import sys

import pytest

from data_fixtures import zip_bytes
from gluon_bert.cli import main
from gluon_bert.data import (SNLIFormatError, Vocab, WikiTextDataset, pad_bert_inputs,
                             read_snli, read_wiki)
from gluon_bert.errors import ConfigError, DataError, GluonBertError
from gluon_bert.predict import read_pairs

dl = importlib.import_module('gluon_bert.data.download')

# Ten paragraphs of three 4-token sentences over 8 words: every word occurs 5+ times,
# and every sentence pair (true or random) is 8 tokens, so needs max_len 11.
WORDS = ['w0', 'w1', 'w2', 'w3', 'w4', 'w5', 'w6', 'w7']
CORPUS = ''.join(
    ' = heading = \n' + ' . '.join(' '.join(WORDS[(i + j + k) % 8] for k in range(4))
                                  for j in range(3)) + ' \n'
    for i in range(10))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    monkeypatch.setattr(dl, 'DATA_HUB', dict(dl.DATA_HUB))
    monkeypatch.setenv('GLUON_BERT_HOME', str(tmp_path / 'cache'))
    monkeypatch.delenv('GLUON_BERT_OFFLINE', raising=False)
    return dl.DATA_HUB


@pytest.fixture
def logs(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger='gluon_bert')
    return caplog


def one_error_line(capsys, command):
    """The CLI's stderr: exactly one line, `gluon-bert <command>: error: ...`."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'gluon-bert {command}: error: '), err
    assert 'Traceback' not in err
    return lines[0]


def test_error_types_share_the_cli_base():
    from gluon_bert.pretrained import PretrainedError
    for cls in (dl.DownloadError, dl.ChecksumError, dl.ArchiveError):
        assert issubclass(cls, GluonBertError) and issubclass(cls, RuntimeError)
    assert issubclass(SNLIFormatError, DataError)
    assert issubclass(PretrainedError, GluonBertError) and issubclass(PretrainedError, ValueError)


# ---------------------------------------------------------------------------
# WikiText

def _wiki(tmp_path, data: bytes, name='wiki.train.tokens'):
    folder = tmp_path / 'wiki'
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(data)
    return str(folder), str(folder / name)


@pytest.mark.parametrize('damage', ['not gzip', 'truncated'])
def test_damaged_gz_wikitext(tmp_path, damage):
    blob = gzip.compress(CORPUS.encode())
    folder, path = _wiki(tmp_path, b'plain text, not gzip' if damage == 'not gzip'
                         else blob[:len(blob) // 2], 'wiki.train.tokens.gz')
    with pytest.raises(DataError, match='not a readable gzip file') as err:
        read_wiki(folder)
    assert path in str(err.value)


def test_wikitext_that_is_not_utf8_names_file_and_line(tmp_path):
    folder, path = _wiki(tmp_path, CORPUS.encode().replace(b'w3', b'w\xe93', 1))
    line = CORPUS[:CORPUS.index('w3')].count('\n') + 1
    with pytest.raises(DataError) as err:
        read_wiki(folder)
    assert str(err.value).startswith(f'{path}, line {line}: not UTF-8 text (byte 0xe9 at column ')


def test_wikitext_without_a_paragraph(tmp_path):
    folder, path = _wiki(tmp_path, b' = Title = \n \n One sentence \n')
    with pytest.raises(DataError, match='no paragraph in its 3 lines') as err:
        read_wiki(folder)
    assert path in str(err.value)


def test_one_paragraph_warns_and_a_vocabulary_of_special_tokens_is_refused(tmp_path, logs):
    folder, path = _wiki(tmp_path, b' = Title = \n a b c . d e f . g h \n')
    paragraphs = read_wiki(folder)
    warnings = [r for r in logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and path in warnings[0].getMessage()
    assert 'only 1 paragraph' in warnings[0].getMessage()
    with pytest.raises(DataError, match='min_freq') as err:
        WikiTextDataset(paragraphs, 64)  # the book's min_freq=5: no word is kept
    assert str(err.value).startswith(f'{path}: no word occurs 5 times')
    # the lower min_freq that the message suggests works
    assert len(WikiTextDataset(paragraphs, 64, min_freq=1).vocab) == 5 + 8


def test_a_max_len_too_short_for_every_pair_says_which_works(tmp_path):
    folder, path = _wiki(tmp_path, CORPUS.encode())
    paragraphs = read_wiki(folder)
    with pytest.raises(ConfigError, match='max_len=10 is too short') as err:
        WikiTextDataset(paragraphs, 10)
    assert path in str(err.value) and 'needs max_len=11' in str(err.value)
    assert len(WikiTextDataset(paragraphs, 11)) > 0


def test_pad_bert_inputs_refuses_an_example_longer_than_max_len():
    vocab = Vocab([['a']], reserved_tokens=['<pad>'])
    with pytest.raises(ConfigError, match='example 1 has 6 tokens.*max_len=5'):
        pad_bert_inputs([([1] * 5, [1], [1], [0] * 5, True), ([1] * 6, [1], [1], [0] * 6, True)],
                        5, vocab)


PRE = ['--preset', 'tiny', '--batch-size', '4', '--num-steps', '1', '--no-progress']


@pytest.mark.parametrize('case', ['gz', 'utf8', 'max_len'])
def test_pretrain_on_bad_wikitext_is_one_line(tmp_path, capsys, case):
    if case == 'gz':
        folder, path = _wiki(tmp_path, b'not gzip', 'wiki.train.tokens.gz')
        args, want = [], path
    elif case == 'utf8':
        folder, path = _wiki(tmp_path, CORPUS.encode() + b'\xff . x \n')
        args, want = [], f'{path}, line 21: not UTF-8 text'
    else:
        folder, path = _wiki(tmp_path, CORPUS.encode())
        args, want = ['--max-len', '8'], 'needs max_len=11'
    assert main(['pretrain', '--data-dir', folder, '--out-dir', str(tmp_path / 'run'),
                 *PRE, *args]) == 2
    assert want in one_error_line(capsys, 'pretrain')


# ---------------------------------------------------------------------------
# SNLI, vocabularies, predict --file

def test_damaged_gz_snli_names_file_and_line(tmp_path):
    rows = [json.dumps({'gold_label': 'neutral', 'sentence1': f'a {i} .',
                        'sentence2': f'b {i} .'}) for i in range(20000)]
    blob = gzip.compress(('\n'.join(rows) + '\n').encode())
    path = tmp_path / 'snli_1.0_train.jsonl.gz'
    path.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(SNLIFormatError, match='not a readable gzip file') as err:
        read_snli(str(tmp_path), 'train')
    msg = str(err.value)
    assert msg.startswith(f'{path}, line ') and isinstance(err.value, DataError)
    assert 1 < int(msg.split(', line ')[1].split(':')[0]) < 20000  # where the data stops


def test_a_missing_snli_split_is_a_data_error_and_still_file_not_found(tmp_path):
    with pytest.raises(DataError, match=f"no 'dev' split of SNLI in {tmp_path}") as err:
        read_snli(str(tmp_path), 'dev')
    assert isinstance(err.value, FileNotFoundError)  # report.py tests for this


@pytest.mark.parametrize('content, message', [
    (b'["<unk>", "a"', 'line 1: not a JSON vocabulary'),
    (b'["<unk>",\n "\xff"]', 'line 2: not UTF-8 text (byte 0xff at column 3)'),
    (b'{"<unk>": 0}', 'must be a JSON list of strings'),
    (b'["<unk>", "a", "a"]', 'duplicate tokens'),
    (None, 'no such vocabulary file')])
def test_bad_vocabulary_files(tmp_path, content, message):
    path = tmp_path / 'vocab.json'
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match='vocab') as err:
        Vocab.load(str(path))
    assert str(err.value).startswith(f'{path}') and message in str(err.value)


def test_predict_file_errors_name_file_and_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / 'pairs.tsv'
    bad.write_bytes('a b .\tc d .\n'.encode() + b'caf\xe9 .\te .\n')
    with pytest.raises(DataError) as err:
        read_pairs(str(bad))
    assert str(err.value) == f'{bad}, line 2: not UTF-8 text (byte 0xe9 at column 4)'
    bad.write_text('a b .\tc d .\nno tab here\n')  # the format malformed lines always had
    with pytest.raises(DataError, match=f'^{bad}:2: expected premise<TAB>hypothesis, got 1 '):
        read_pairs(str(bad))
    with pytest.raises(FileNotFoundError, match='no such file'):
        read_pairs(str(tmp_path / 'missing.tsv'))
    monkeypatch.setattr(sys, 'stdin', io.TextIOWrapper(io.BytesIO(b'p .\th .\r\n\xff\n')))
    with pytest.raises(DataError, match=r'^<stdin>, line 2: not UTF-8 text'):
        read_pairs('-')
    bad.write_bytes(b'caf\xe9 .\te .\n')
    assert main(['predict', str(tmp_path / 'no-run'), '--file', str(bad)]) == 2
    assert f'{bad}, line 1: not UTF-8 text' in one_error_line(capsys, 'predict')


def test_read_pairs_reads_good_input_from_stdin(monkeypatch):
    monkeypatch.setattr(sys, 'stdin', io.TextIOWrapper(io.BytesIO(b'p .\th .\r\n\nq .\ti .')))
    assert read_pairs('-') == [('p .', 'h .'), ('q .', 'i .')]


# ---------------------------------------------------------------------------
# The cache folder and cached archives

@pytest.mark.parametrize('where', ['a file', 'under a file'])
def test_a_cache_folder_that_cannot_be_used(hub, tmp_path, monkeypatch, capsys, where):
    blocker = tmp_path / 'blocker'
    blocker.write_text('not a folder')
    home = blocker if where == 'a file' else blocker / 'cache'
    monkeypatch.setenv('GLUON_BERT_HOME', str(home))
    dl.register('bert.small', 'http://127.0.0.1:9/bert.small.zip', '0' * 40, folder='bert.small')
    with pytest.raises(dl.DownloadError) as err:
        dl.download_extract('bert.small')
    msg = str(err.value)
    assert msg.startswith(f'cache folder {home} (from $GLUON_BERT_HOME) is not usable: ')
    assert f'{blocker} is a file' in msg or 'it is a file' in msg
    assert main(['download', 'bert.small']) == 2
    assert 'GLUON_BERT_HOME' in one_error_line(capsys, 'download')
    monkeypatch.delenv('GLUON_BERT_HOME')
    assert main(['download', 'bert.small', '--cache-dir', str(home)]) == 2
    assert f'cache folder {home} (given as cache_dir or --cache-dir)' in one_error_line(
        capsys, 'download')


@pytest.mark.skipif(os.name != 'posix' or os.geteuid() == 0,
                    reason='needs POSIX permissions that apply (not root)')
def test_a_cache_folder_that_is_not_writable(hub, tmp_path, monkeypatch):
    home = tmp_path / 'readonly'
    home.mkdir()
    home.chmod(0o500)
    monkeypatch.setenv('GLUON_BERT_HOME', str(home))
    dl.register('thing', 'http://127.0.0.1:9/f.bin', '0' * 40)
    try:
        with pytest.raises(dl.DownloadError, match=f'cache folder {home} .*GLUON_BERT_HOME'):
            dl.download('thing')
    finally:
        home.chmod(0o700)


def _corrupt_cached_archive(server, tmp_path, route):
    """bert.small registered at the local server, with a damaged copy already cached."""
    blob = zip_bytes({'bert.small/vocab.json': '["<unk>"]', 'bert.small/pretrained.params': 'p'})
    server.routes['/bert.small.zip'] = route(blob)
    digest = hashlib.sha1(blob).hexdigest()
    dl.register('bert.small', server.url + '/bert.small.zip', digest, folder='bert.small')
    cache = tmp_path / 'cache'
    cache.mkdir()
    cached = cache / 'bert.small.zip'
    cached.write_bytes(blob[:-10] + b'0123456789')
    return str(cached), digest, hashlib.sha1(cached.read_bytes()).hexdigest(), blob


def test_a_damaged_cached_archive_offline_is_a_checksum_error(server, hub, tmp_path, monkeypatch):
    cached, digest, actual, _ = _corrupt_cached_archive(server, tmp_path,
                                                        lambda blob: ('bytes', blob))
    monkeypatch.setenv('GLUON_BERT_OFFLINE', '1')
    with pytest.raises(dl.ChecksumError) as err:
        dl.download_extract('bert.small')
    msg = str(err.value)
    assert msg.startswith(f'SHA-1 mismatch for the cached {cached}: expected {digest}, '
                          f'got {actual}')
    assert 'not in the cache' not in msg and server.requests == []


def test_a_damaged_cached_archive_is_not_reported_as_a_network_failure(server, hub, tmp_path,
                                                                       capsys):
    cached, digest, actual, _ = _corrupt_cached_archive(server, tmp_path,
                                                        lambda blob: ('status', 503))
    with pytest.raises(dl.ChecksumError) as err:
        dl.download('bert.small')
    msg = str(err.value)
    assert msg.startswith(f'SHA-1 mismatch for the cached {cached}: expected {digest}')
    assert 'downloading it again failed: HTTP 503' in msg and len(server.requests) == 1
    assert main(['download', 'bert.small']) == 2
    assert 'SHA-1 mismatch for the cached' in one_error_line(capsys, 'download')


def test_a_damaged_cached_archive_is_downloaded_again(server, hub, tmp_path, logs):
    cached, digest, actual, blob = _corrupt_cached_archive(server, tmp_path,
                                                           lambda blob: ('bytes', blob))
    folder = dl.download_extract('bert.small')
    assert open(cached, 'rb').read() == blob and os.listdir(folder) != []
    assert any(cached in r.getMessage() and actual in r.getMessage() for r in logs.records
               if r.levelno == logging.WARNING)


def test_archive_and_fallback_both_failing_names_both_and_what_to_place(server, hub, tmp_path,
                                                                         monkeypatch):
    server.routes['/wikitext-2-v1.zip'] = ('status', 403)  # and no parquet routes: 404
    monkeypatch.setattr(dl, '_HF_WIKITEXT', server.url + '/hf/{split}.parquet')
    dl.register('wikitext-2', server.url + '/wikitext-2-v1.zip', '1' * 40, folder='wikitext-2',
                files={'wiki.train.tokens': '2' * 40}, alternative='wikitext-2-parquet')
    with pytest.raises(dl.DownloadError) as err:
        dl.download_extract('wikitext-2')
    msg = str(err.value)
    assert server.url + '/wikitext-2-v1.zip' in msg and 'HTTP 403' in msg
    assert server.url + '/hf/{train,validation,test}.parquet' in msg and 'HTTP 404' in msg
    where = os.path.join(tmp_path, 'cache', 'wikitext-2-v1.zip')
    assert msg.endswith(f'Download wikitext-2-v1.zip (SHA-1 {"1" * 40}) by hand from '
                        f'{server.url}/wikitext-2-v1.zip and place it at {where}')


# ---------------------------------------------------------------------------
# Pretrained checkpoints: a local zip that is not one, parameters that are not MXNet's

def test_a_zip_that_is_not_a_zip(hub, tmp_path, capsys):
    from gluon_bert import load_pretrained
    from gluon_bert.pretrained import PretrainedError
    fake = tmp_path / 'bert.small.zip'
    fake.write_text('this is not a zip archive')
    with pytest.raises(PretrainedError, match='not a readable zip archive') as err:
        load_pretrained(str(fake))
    assert str(err.value).startswith(f'{fake}: ')
    local = tmp_path / 'cache' / 'local'
    assert os.listdir(local) == []  # nothing half-extracted, no lock file
    assert main(['finetune', '--init', str(fake), '--out-dir', str(tmp_path / 'run'),
                 '--no-progress']) == 2
    assert str(fake) in one_error_line(capsys, 'finetune')


def test_parameters_that_are_not_mxnet_params(hub, tmp_path):
    from gluon_bert import load_pretrained
    from gluon_bert.pretrained import PretrainedError
    folder = tmp_path / 'bert.tiny'
    folder.mkdir()
    (folder / 'vocab.json').write_text(json.dumps(['<unk>', '<pad>', '<mask>', '<cls>', '<sep>']))
    (folder / 'pretrained.params').write_bytes(b'junk' * 100)
    with pytest.raises(PretrainedError, match='not an MXNet parameter file') as err:
        load_pretrained(str(folder), preset='tiny')
    msg = str(err.value)
    assert msg.startswith(f'{folder / "pretrained.params"}: ') and 'Traceback' not in msg

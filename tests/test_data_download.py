"""The download module against a local HTTP server on 127.0.0.1."""
import hashlib
import importlib
import json
import os

import pytest

from data_fixtures import zip_bytes
# `gluon_bert.data.download` is also the name of the function re-exported by the package.
dl = importlib.import_module("gluon_bert.data.download")

DATA = os.urandom(3_000_000)
SHA1 = hashlib.sha1(DATA).hexdigest()


@pytest.fixture
def hub(monkeypatch):
    """Isolate DATA_HUB changes and the environment."""
    monkeypatch.setattr(dl, 'DATA_HUB', dict(dl.DATA_HUB))
    monkeypatch.delenv('GLUON_BERT_OFFLINE', raising=False)
    return dl.DATA_HUB


def test_hub_matches_the_book():
    assert dl.DATA_HUB['SNLI'].sha1 == '9fcde07509c7e87ec61c640c1b2753d9041758e4'
    assert dl.DATA_HUB['bert.small'].urls == (
        'http://d2l-data.s3-accelerate.amazonaws.com/bert.small.zip',)
    assert dl.DATA_HUB['bert.small'].sha1 == 'a4e718a47137ccd1809c9107ab4f5edd317bae2c'
    assert dl.DATA_HUB['bert.base.torch'].sha1 == '225d66f04cae318b841a13d32af3acc165f253ac'
    assert dl.DATA_HUB['wikitext-2'].sha1 == '3c914d17d80b1459be871a5039ac23e752a53cbe'
    assert len(dl.DATA_HUB['wikitext-2'].urls) >= 2


def test_download_then_cache_reuse_without_requests(server, hub, tmp_path):
    server.routes['/f.bin'] = ('bytes', DATA)
    dl.register('thing', server.url + '/f.bin', SHA1)
    path = dl.download('thing', str(tmp_path))
    assert open(path, 'rb').read() == DATA and len(server.requests) == 1
    assert dl.download('thing', str(tmp_path)) == path
    assert len(server.requests) == 1  # cached file with the right SHA-1: no request
    assert sorted(os.listdir(tmp_path)) == ['f.bin']  # no lock file left behind


def test_redirect_and_mirror_order(server, hub, tmp_path):
    server.routes['/old'] = ('status', 403)
    server.routes['/moved'] = ('redirect', server.url + '/f.bin')
    server.routes['/f.bin'] = ('bytes', DATA)
    dl.register('thing', [server.url + '/old', server.url + '/moved'], SHA1, filename='f.bin')
    path = dl.download('thing', str(tmp_path))
    assert dl.sha1_file(path) == SHA1
    assert [p for p, _ in server.requests] == ['/old', '/moved', '/f.bin']


@pytest.mark.parametrize('code', [403, 404])
def test_http_errors_are_never_saved(server, hub, tmp_path, code):
    if code == 403:
        server.routes['/f.bin'] = ('status', 403)
    dl.register('thing', server.url + '/f.bin', SHA1)
    with pytest.raises(dl.DownloadError, match=f'HTTP {code}.*/f.bin'):
        dl.download('thing', str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_wrong_sha1_is_not_kept(server, hub, tmp_path):
    server.routes['/f.bin'] = ('bytes', DATA)
    dl.register('thing', server.url + '/f.bin', '0' * 40)
    with pytest.raises(dl.ChecksumError) as err:
        dl.download('thing', str(tmp_path))
    e = err.value
    assert e.expected == '0' * 40 and e.actual == SHA1 and e.path.endswith('f.bin')
    assert 'f.bin' in str(e) and SHA1 in str(e) and '0' * 40 in str(e)
    assert not os.path.exists(os.path.join(tmp_path, 'f.bin'))
    assert not os.path.exists(os.path.join(tmp_path, 'f.bin.part'))


def test_truncated_body_then_resume_with_range(server, hub, tmp_path):
    server.routes['/f.bin'] = ('truncate', DATA, 1_000_000)
    dl.register('thing', server.url + '/f.bin', SHA1)
    with pytest.raises(dl.DownloadError, match='truncated|interrupted'):
        dl.download('thing', str(tmp_path))
    part = os.path.join(tmp_path, 'f.bin.part')
    assert not os.path.exists(os.path.join(tmp_path, 'f.bin'))
    assert 0 < os.path.getsize(part) <= 1_000_000
    have = os.path.getsize(part)
    server.routes['/f.bin'] = ('bytes', DATA)  # the server is back
    path = dl.download('thing', str(tmp_path))
    assert open(path, 'rb').read() == DATA and not os.path.exists(part)
    assert server.requests[-1] == ('/f.bin', f'bytes={have}-')


def test_interrupted_download_restarts_when_range_is_ignored(server, hub, tmp_path):
    part = os.path.join(tmp_path, 'f.bin.part')
    with open(part, 'wb') as f:
        f.write(b'garbage from an older, different file')
    server.routes['/f.bin'] = ('bytes', DATA, False)  # answers 200 with the whole body
    dl.register('thing', server.url + '/f.bin', SHA1)
    assert dl.sha1_file(dl.download('thing', str(tmp_path))) == SHA1


def test_stale_partial_file_restarts_cleanly(server, hub, tmp_path):
    part = os.path.join(tmp_path, 'f.bin.part')
    with open(part, 'wb') as f:
        f.write(b'x' * 1000)  # wrong bytes; a resume cannot match the SHA-1
    server.routes['/f.bin'] = ('bytes', DATA)
    dl.register('thing', server.url + '/f.bin', SHA1)
    assert dl.sha1_file(dl.download('thing', str(tmp_path))) == SHA1
    assert [r for _, r in server.requests] == ['bytes=1000-', None]


def test_a_resume_the_server_gets_wrong_restarts_cleanly(server, hub, tmp_path):
    part = os.path.join(tmp_path, 'f.bin.part')
    with open(part, 'wb') as f:
        f.write(DATA[:1000])
    server.routes['/f.bin'] = ('bad206', DATA)  # answers a Range with the file from byte 0
    dl.register('thing', server.url + '/f.bin', SHA1)
    assert dl.sha1_file(dl.download('thing', str(tmp_path))) == SHA1
    assert [r for _, r in server.requests] == ['bytes=1000-', None]
    assert not os.path.exists(part)


def test_offline_mode_says_what_to_place_where(hub, tmp_path, monkeypatch):
    monkeypatch.setenv('GLUON_BERT_OFFLINE', '1')
    with pytest.raises(dl.DownloadError) as err:
        dl.download('bert.small', str(tmp_path))
    msg = str(err.value)
    assert 'bert.small.zip' in msg and str(tmp_path) in msg and dl.DATA_HUB['bert.small'].sha1 in msg


def test_download_extract_returns_the_checkpoint_folder(server, hub, tmp_path, monkeypatch):
    blob = zip_bytes({'bert.small/vocab.json': '["<unk>"]', 'bert.small/pretrained.params': 'p'})
    server.routes['/bert.small.zip'] = ('bytes', blob)
    dl.register('bert.small', server.url + '/bert.small.zip', hashlib.sha1(blob).hexdigest(),
                folder='bert.small')
    monkeypatch.setenv('GLUON_BERT_HOME', str(tmp_path))
    folder = dl.download_extract('bert.small')
    assert folder == os.path.join(tmp_path, 'bert.small', 'bert.small')
    assert sorted(os.listdir(folder)) == ['pretrained.params', 'vocab.json']
    n = len(server.requests)
    assert dl.download_extract('bert.small') == folder and len(server.requests) == n
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.')]  # no temp folders left


@pytest.mark.parametrize('name', ['../evil.txt', '/abs.txt', 'a/../../evil.txt'])
def test_unsafe_archive_paths_are_refused(server, hub, tmp_path, name):
    blob = zip_bytes({'ok/a.txt': 'a', name: 'x'})
    server.routes['/x.zip'] = ('bytes', blob)
    dl.register('x', server.url + '/x.zip', hashlib.sha1(blob).hexdigest())
    with pytest.raises(dl.DownloadError, match='unsafe path|outside'):
        dl.download_extract('x', str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, 'x'))
    assert not os.path.exists(os.path.join(os.path.dirname(tmp_path), 'evil.txt'))


def test_unknown_names():
    with pytest.raises(KeyError, match='unknown hub entry'):
        dl.download('no-such-thing')


def _hf_parquet(lines):
    """A parquet file as the Hugging Face copy of wikitext-2-v1 has it: one row per line
    of the original file, with its newline; blank lines (' \\n') as ''."""
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({'text': [l if l.strip() else '' for l in lines]}), buf)
    return buf.getvalue().to_pybytes()


@pytest.mark.parametrize('tampered', [False, True])
def test_wikitext_from_parquet_mirror_when_the_zips_fail(server, hub, tmp_path, monkeypatch,
                                                         tampered):
    splits = {'train': 'wiki.train.tokens', 'validation': 'wiki.valid.tokens',
              'test': 'wiki.test.tokens'}
    originals = {fname: [' \n', f' = {split} = \n', ' \n', f' a {split} line . b . \n']
                 for split, fname in splits.items()}
    for split, fname in splits.items():
        lines = originals[fname] + (['extra\n'] if tampered and split == 'test' else [])
        server.routes[f'/{split}.parquet'] = ('bytes', _hf_parquet(lines))
    server.routes['/wikitext-2-v1.zip'] = ('status', 403)
    monkeypatch.setattr(dl, '_HF_WIKITEXT', server.url + '/{split}.parquet')
    digests = {f: hashlib.sha1(''.join(l).encode()).hexdigest() for f, l in originals.items()}
    dl.register('wikitext-2', server.url + '/wikitext-2-v1.zip', '0' * 40, folder='wikitext-2',
                files=digests, alternative='wikitext-2-parquet')
    target = os.path.join(tmp_path, 'wikitext-2-v1')
    if tampered:
        with pytest.raises(dl.ChecksumError, match='wiki.test.tokens'):
            dl.download_extract('wikitext-2', str(tmp_path))
        assert not os.path.exists(target)
        assert not [f for f in os.listdir(tmp_path) if f.startswith('.wikitext')]
        # the unverifiable parquet files are not kept either: a retry fetches them again
        assert not os.path.exists(os.path.join(tmp_path, 'hf-wikitext-2-v1'))
        return
    folder = dl.download_extract('wikitext-2', str(tmp_path))
    assert folder == os.path.join(target, 'wikitext-2')
    for fname, lines in originals.items():  # byte-identical to the original files
        assert open(os.path.join(folder, fname), 'rb').read() == ''.join(lines).encode()
    manifest = json.load(open(os.path.join(target, dl.MANIFEST)))
    assert {f'wikitext-2/{f}': d for f, d in digests.items()} == {
        rel: record['sha1'] for rel, record in manifest['files'].items()}
    n = len(server.requests)
    assert dl.download_extract('wikitext-2', str(tmp_path)) == folder
    assert len(server.requests) == n
    # a file changed in place is rebuilt (from the parquet files, which stay cached)
    open(os.path.join(folder, 'wiki.train.tokens'), 'a').write(' planted . text . \n')
    assert dl.download_extract('wikitext-2', str(tmp_path)) == folder
    assert open(os.path.join(folder, 'wiki.train.tokens'), 'rb').read() == ''.join(
        originals['wiki.train.tokens']).encode()


# ---------------------------------------------------------------------------
# Extracted folders are used only while they match their manifest

def _checkpoint_entry(server, hub, tag='v1'):
    """bert.small as a zip of two small files, served from 127.0.0.1."""
    blob = zip_bytes({'bert.small/vocab.json': f'["<unk>", "{tag}"]',
                      'bert.small/pretrained.params': f'params {tag}'})
    server.routes['/bert.small.zip'] = ('bytes', blob)
    dl.register('bert.small', server.url + '/bert.small.zip', hashlib.sha1(blob).hexdigest(),
                folder='bert.small')
    return blob


def _vocab_of(folder):
    return open(os.path.join(folder, 'vocab.json')).read()


def test_manifest_lists_every_extracted_file(server, hub, tmp_path):
    _checkpoint_entry(server, hub)
    folder = dl.download_extract('bert.small', str(tmp_path))
    target = os.path.dirname(folder)
    manifest = json.load(open(os.path.join(target, dl.MANIFEST)))
    assert manifest['archive_sha1'] == dl.DATA_HUB['bert.small'].sha1
    assert sorted(manifest['files']) == ['bert.small/pretrained.params', 'bert.small/vocab.json']
    record = manifest['files']['bert.small/vocab.json']
    path = os.path.join(folder, 'vocab.json')
    assert record['sha1'] == dl.sha1_file(path) and record['size'] == os.path.getsize(path)
    assert sorted(os.listdir(tmp_path)) == ['bert.small', 'bert.small.zip']  # no lock, no temp


@pytest.mark.parametrize('damage', ['planted', 'no manifest', 'resized', 'same size',
                                    'extra file', 'missing file', 'bad manifest'])
def test_a_folder_that_does_not_match_is_extracted_again(server, hub, tmp_path, damage, caplog,
                                                         monkeypatch):
    import logging
    _checkpoint_entry(server, hub)
    target = os.path.join(tmp_path, 'bert.small')
    folder = os.path.join(target, 'bert.small')
    if damage == 'planted':  # a junk folder where the checkpoint would go; no archive yet
        os.makedirs(folder)
        open(os.path.join(folder, 'vocab.json'), 'w').write('["<unk>", "junk"]')
    else:
        dl.download_extract('bert.small', str(tmp_path))
        vocab = os.path.join(folder, 'vocab.json')
        if damage == 'no manifest':  # as an older version of the package left it
            os.remove(os.path.join(target, dl.MANIFEST))
        elif damage == 'resized':
            open(vocab, 'w').write('["<unk>", "a longer junk list"]')
        elif damage == 'same size':  # only the mtime tells, then the SHA-1
            mtime = os.stat(vocab).st_mtime_ns
            open(vocab, 'w').write('["<unk>", "XX"]')
            # an edit a clock tick later (here the clock may not have ticked yet)
            os.utime(vocab, ns=(mtime + 10**9, mtime + 10**9))
        elif damage == 'extra file':  # would be read as the model's config
            open(os.path.join(folder, 'config.json'), 'w').write('{}')
        elif damage == 'missing file':
            os.remove(os.path.join(folder, 'pretrained.params'))
        elif damage == 'bad manifest':
            open(os.path.join(target, dl.MANIFEST), 'w').write('{not json')
    requests = len(server.requests)
    caplog.clear()
    assert dl.download_extract('bert.small', str(tmp_path)) == folder
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f'{target} did not match its manifest')
    assert _vocab_of(folder) == '["<unk>", "v1"]'
    assert sorted(os.listdir(folder)) == ['pretrained.params', 'vocab.json']
    # the archive was verified and kept: extracting again needs no request after the first
    assert len(server.requests) == requests + (damage == 'planted')
    assert os.path.isfile(os.path.join(target, dl.MANIFEST))


def test_a_touched_file_is_hashed_once_and_kept(server, hub, tmp_path, monkeypatch):
    _checkpoint_entry(server, hub)
    folder = dl.download_extract('bert.small', str(tmp_path))
    vocab = os.path.join(folder, 'vocab.json')
    inode = os.stat(vocab).st_ino
    os.utime(vocab, ns=(1_000_000_000, 1_000_000_000))  # same bytes, another mtime (a copy)
    hashed = []
    real = dl.sha1_file
    monkeypatch.setattr(dl, 'sha1_file', lambda p: hashed.append(p) or real(p))
    assert dl.download_extract('bert.small', str(tmp_path)) == folder
    assert hashed == [vocab] and os.stat(vocab).st_ino == inode  # not extracted again
    assert dl.download_extract('bert.small', str(tmp_path)) == folder
    assert hashed == [vocab]  # the new mtime was recorded: no hashing on later calls


def test_a_folder_from_another_archive_version_is_replaced(server, hub, tmp_path):
    _checkpoint_entry(server, hub, 'v1')
    folder = dl.download_extract('bert.small', str(tmp_path))
    os.remove(os.path.join(tmp_path, 'bert.small.zip'))
    _checkpoint_entry(server, hub, 'v2')  # the hub now lists another archive
    assert dl.download_extract('bert.small', str(tmp_path)) == folder
    assert _vocab_of(folder) == '["<unk>", "v2"]'


def test_the_lock_file_is_removed_and_excludes_every_waiter(tmp_path):
    """Threads hold flock()s on separate open files, as processes do: at most one is ever
    inside, although each holder deletes the lock file as it leaves."""
    import threading
    import time
    path = str(tmp_path / 'thing')
    inside, overlaps, done = [], [], []

    def work():
        for _ in range(100):
            with dl._file_lock(path):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(1)
                time.sleep(0.0002)
                inside.pop()
        done.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(done) == 4 and not overlaps
    assert os.listdir(tmp_path) == []

"""One download module for data sets and checkpoints: hub, SHA-1, cache, offline mode.

Every file is written to ``<name>.part`` next to its final path, checked
against its SHA-1, fsync'ed, and only then moved into place with `os.replace`,
so the cache never holds a partial file or an HTTP error page. An interrupted
download resumes with an HTTP Range request where the server allows it and
restarts cleanly otherwise. A cached file whose SHA-1 matches is used without
any request. With ``GLUON_BERT_OFFLINE=1`` nothing is fetched and a missing
file is an error that says which file to place where.

The cache folder is ``$GLUON_BERT_HOME`` or ``~/.cache/gluon_bert``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from typing import Iterable, Mapping

__all__ = ['HubEntry', 'DATA_HUB', 'DownloadError', 'ChecksumError', 'cache_dir', 'register',
           'download', 'download_extract', 'extract_zip', 'sha1_file', 'offline']

D2L_DATA_URL = 'http://d2l-data.s3-accelerate.amazonaws.com/'
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be fetched (HTTP error, truncated body, offline mode, ...)."""


class _BadResume(DownloadError):
    """The server answered a Range request with a part that does not continue ours."""


class ChecksumError(DownloadError):
    """A downloaded or cached file does not have the expected SHA-1."""

    def __init__(self, path: str, expected: str, actual: str, url: str | None = None):
        self.path, self.expected, self.actual, self.url = path, expected, actual, url
        source = f' (from {url})' if url else ''
        super().__init__(f'SHA-1 mismatch for {path}{source}: expected {expected}, got {actual}. '
                         'The file was not kept; a mirror may serve a different version, '
                         'or the transfer was corrupted: try again or place the right file '
                         'there by hand.')


@dataclasses.dataclass(frozen=True)
class HubEntry:
    """A file the project can fetch.

    urls: tried in order, each must serve the same bytes (sha1). filename: name
    in the cache. folder: the folder inside the extracted archive that
    `download_extract` returns. files: expected SHA-1 of files inside that
    folder, checked after extraction. alternative: name of a converter that
    builds the same folder from a mirror in another format (see `_ALTERNATIVES`).
    """
    urls: tuple[str, ...]
    sha1: str | None
    filename: str
    folder: str | None = None
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    alternative: str | None = None
    description: str = ''


DATA_HUB: dict[str, HubEntry] = {}


def register(name: str, urls: str | Iterable[str], sha1: str | None, filename: str | None = None,
             folder: str | None = None, files: Mapping[str, str] | None = None,
             alternative: str | None = None, description: str = '') -> HubEntry:
    """Add (or replace) a hub entry; tests point entries at a local server."""
    urls = (urls,) if isinstance(urls, str) else tuple(urls)
    if not urls:
        raise ValueError(f'hub entry {name!r} needs at least one URL')
    entry = HubEntry(urls, sha1.lower() if sha1 else None,
                     filename or urls[0].rstrip('/').rsplit('/', 1)[-1], folder,
                     dict(files or {}), alternative, description)
    DATA_HUB[name] = entry
    return entry


# The book's files. SHA-1s as in d2l's DATA_HUB (d2l 1.0.3 and the book's
# fine-tuning section); WikiText-2 files as listed in ../shared/data/README.md.
register('SNLI', 'https://nlp.stanford.edu/projects/snli/snli_1.0.zip',
         '9fcde07509c7e87ec61c640c1b2753d9041758e4', folder='snli_1.0',
         description='Stanford Natural Language Inference 1.0 (CC BY-SA 4.0)')
register('wikitext-2',
         # The book's URL now answers 403; the Hugging Face parquet copy of
         # wikitext-2-v1 is converted back to the same files (checked by SHA-1).
         ['https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip',
          'https://wikitext.smerity.com/wikitext-2-v1.zip'],
         '3c914d17d80b1459be871a5039ac23e752a53cbe', folder='wikitext-2',
         files={'wiki.train.tokens': '863f29c46ef9d167fff4940ec821195882fe29d1',
                'wiki.valid.tokens': '0418625c8b4da6e4b5c7a0b9e78d4ae8f7ee5422',
                'wiki.test.tokens': 'c7b8ce0aa086fb34dab808c5c49224211eb2b172'},
         alternative='wikitext-2-parquet',
         description='WikiText-2 v1 (CC BY-SA 3.0)')
for _name, _sha1 in (('bert.small', 'a4e718a47137ccd1809c9107ab4f5edd317bae2c'),
                     ('bert.base', '7b3820b35da691042e5d34c0971ac3edbd80d3f4'),
                     ('bert.small.torch', 'c72329e68a732bef0452e4b96a1c341c8910f81f'),
                     ('bert.base.torch', '225d66f04cae318b841a13d32af3acc165f253ac')):
    # Each archive holds <folder>/vocab.json and <folder>/pretrained.params.
    register(_name, D2L_DATA_URL + _name + '.zip', _sha1,
             folder=_name.replace('.torch', ''),
             description="the book's pretrained BERT checkpoint")

# Hugging Face parquet copies of wikitext-2-v1 (one file per split, a `text` column).
_HF_WIKITEXT = ('https://huggingface.co/datasets/Salesforce/wikitext/resolve/main/'
                'wikitext-2-v1/{split}-00000-of-00001.parquet')
_WIKITEXT_SPLITS = {'train': 'wiki.train.tokens', 'validation': 'wiki.valid.tokens',
                    'test': 'wiki.test.tokens'}


def cache_dir() -> str:
    """$GLUON_BERT_HOME, or ~/.cache/gluon_bert."""
    return _home()


def _home() -> str:
    return os.environ.get('GLUON_BERT_HOME') or os.path.join(
        os.path.expanduser('~'), '.cache', 'gluon_bert')


def offline() -> bool:
    return os.environ.get('GLUON_BERT_OFFLINE', '').strip().lower() in ('1', 'true', 'yes', 'on')


def sha1_file(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(CHUNK), b''):
            digest.update(block)
    return digest.hexdigest()


def _progress(total: int | None, desc: str, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return contextlib.nullcontext(None)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit='B', unit_scale=True, leave=False)


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _file_lock(path: str):
    """Serialise downloads of one file between processes (POSIX; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    with open(path + '.lock', 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fetch(url: str, part: str, timeout: float, progress: bool | None) -> None:
    """Append the body of `url` to `part`, resuming from its size with a Range request."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={'User-Agent': 'gluon-bert'})
    if have:
        request.add_header('Range', f'bytes={have}-')
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the .part may be complete
            return
        raise DownloadError(f'HTTP {err.code} {err.reason} for {url}') from None
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f'cannot reach {url}: {getattr(err, "reason", err)}') from None
    with response:
        status = response.status
        resumed = status == 206 and response.headers.get('Content-Range', '').startswith(
            f'bytes {have}-')
        if status == 206 and not resumed:
            raise _BadResume(f'HTTP 206 for {url} does not continue at byte {have} '
                             f'(Content-Range: {response.headers.get("Content-Range")})')
        if status not in (200, 206):
            raise DownloadError(f'unexpected HTTP {status} for {url}')
        length = response.headers.get('Content-Length')
        expected = int(length) if length and length.isdigit() else None
        mode = 'ab' if resumed else 'wb'
        received = 0
        with open(part, mode) as f, _progress(expected, os.path.basename(part), progress) as bar:
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, ValueError) as err:  # connection reset, http.client errors
                    raise DownloadError(f'download of {url} interrupted after '
                                        f'{received} bytes: {err}') from None
                if not block:
                    break
                f.write(block)
                received += len(block)
                if bar is not None:
                    bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
        if expected is not None and received < expected:
            raise DownloadError(f'download of {url} truncated: got {received} of {expected} '
                                'bytes (the partial file is kept and will be resumed)')


def _resolve(name_or_url: str, sha1: str | None, urls) -> tuple[str, HubEntry]:
    if name_or_url in DATA_HUB:
        entry = DATA_HUB[name_or_url]
        if urls:
            entry = dataclasses.replace(entry, urls=tuple(urls) + entry.urls)
        if sha1:
            entry = dataclasses.replace(entry, sha1=sha1.lower())
        return name_or_url, entry
    if '://' not in name_or_url:
        raise KeyError(f'unknown hub entry {name_or_url!r}; known: {sorted(DATA_HUB)} '
                       '(or pass a URL)')
    all_urls = (name_or_url,) + tuple(urls or ())
    filename = name_or_url.split('?')[0].rstrip('/').rsplit('/', 1)[-1]
    return name_or_url, HubEntry(all_urls, sha1.lower() if sha1 else None, filename)


def download(name_or_url: str, cache_dir: str | None = None, sha1: str | None = None,
             urls: Iterable[str] | None = None, timeout: float = 60.0,
             progress: bool | None = None) -> str:
    """Fetch a hub entry (or a URL) into the cache and return its path.

    `urls` are extra mirrors tried first; `sha1` overrides the entry's. Raises
    `DownloadError` when no URL serves the file (message lists every attempt)
    and `ChecksumError` when the bytes that arrived have another SHA-1.
    """
    name, entry = _resolve(name_or_url, sha1, urls)
    folder = cache_dir or _home()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, entry.filename)
    if os.path.exists(path) and (entry.sha1 is None or sha1_file(path) == entry.sha1):
        return path
    if offline():
        digest = f' (SHA-1 {entry.sha1})' if entry.sha1 else ''
        raise DownloadError(f'offline mode (GLUON_BERT_OFFLINE=1): {name} is not in the cache. '
                            f'Place {entry.filename}{digest} at {path}; it can be downloaded '
                            f'from {" or ".join(entry.urls)}')
    part = path + '.part'
    errors = []
    with _file_lock(path):
        if os.path.exists(path) and (entry.sha1 is None or sha1_file(path) == entry.sha1):
            return path  # another process finished it while we waited
        for url in entry.urls:
            for attempt in ('resume', 'fresh'):
                if attempt == 'fresh':
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(part)
                resumed = attempt == 'resume' and os.path.exists(part)
                try:
                    _fetch(url, part, timeout, progress)
                except _BadResume as err:
                    errors.append(str(err))
                    continue  # the server cannot resume our .part: start this URL afresh
                except DownloadError as err:
                    errors.append(str(err))
                    break  # this URL failed; a truncated .part stays for a later resume
                actual = sha1_file(part)
                if entry.sha1 is None or actual == entry.sha1:
                    os.replace(part, path)
                    _fsync_dir(folder)
                    return path
                os.remove(part)
                if resumed:
                    continue  # the old partial file may be stale: start this URL afresh
                error = ChecksumError(path, entry.sha1, actual, url)
                errors.append(str(error))
                break
    if errors and all(e.startswith('SHA-1 mismatch') for e in errors):
        raise error
    raise DownloadError(f'could not download {name}: ' + '; '.join(errors))


def extract_zip(archive: str, dest: str) -> None:
    """Extract `archive` into `dest`, refusing absolute paths, '..' and links."""
    root = os.path.realpath(dest)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = info.filename
            mode = info.external_attr >> 16
            if (name.startswith(('/', '\\')) or ':' in name.split('/')[0]
                    or '..' in name.replace('\\', '/').split('/')):
                raise DownloadError(f'{archive}: unsafe path {name!r} in archive')
            if (mode & 0o170000) == 0o120000:
                raise DownloadError(f'{archive}: symbolic link {name!r} in archive')
            target = os.path.realpath(os.path.join(root, name))
            if os.path.commonpath([root, target]) != root:
                raise DownloadError(f'{archive}: {name!r} would extract outside {dest}')
        zf.extractall(root)


def download_extract(name: str, cache_dir: str | None = None, progress: bool | None = None) -> str:
    """Download and unzip a hub entry once; return its folder (e.g. with vocab.json).

    Archives are extracted into a temporary folder and moved into
    ``<cache>/<archive stem>/`` in one rename, so a half-extracted folder is never
    used. Returns ``<cache>/<archive stem>/<entry.folder>``.
    """
    if name not in DATA_HUB:
        raise KeyError(f'unknown hub entry {name!r}; known: {sorted(DATA_HUB)}')
    entry = DATA_HUB[name]
    folder = cache_dir or _home()
    stem = entry.filename[:-4] if entry.filename.endswith('.zip') else entry.filename
    target = os.path.join(folder, stem)
    result = os.path.join(target, entry.folder) if entry.folder else target
    if os.path.isdir(result) and _files_ok(result, entry.files, check=False):
        return result
    try:
        archive = download(name, folder, progress=progress)
    except DownloadError:
        if entry.alternative and not offline():
            return _ALTERNATIVES[entry.alternative](entry, target, result, progress)
        raise
    tmp = tempfile.mkdtemp(prefix=f'.{stem}.', dir=folder)
    try:
        extract_zip(archive, tmp)
        inner = os.path.join(tmp, entry.folder) if entry.folder else tmp
        if not os.path.isdir(inner):
            raise DownloadError(f'{archive} has no folder {entry.folder!r}')
        _files_ok(inner, entry.files, check=True)
        _install_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _files_ok(folder: str, files: Mapping[str, str], check: bool) -> bool:
    for fname, digest in files.items():
        path = os.path.join(folder, fname)
        if not os.path.exists(path):
            if check:
                raise DownloadError(f'{path} missing after extraction')
            return False
        if check and sha1_file(path) != digest:
            raise ChecksumError(path, digest, sha1_file(path))
    return True


def _install_dir(tmp: str, target: str) -> None:
    """Move a finished folder into place; an older copy is replaced."""
    if os.path.exists(target):
        old = target + f'.old{os.getpid()}'
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, target)
    _fsync_dir(os.path.dirname(target))


def _wikitext_from_parquet(entry: HubEntry, target: str, result: str,
                           progress: bool | None) -> str:
    """Rebuild wikitext-2/ from the Hugging Face parquet copy, checked by SHA-1."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        where = os.path.join(os.path.dirname(target), entry.filename)
        raise DownloadError(
            'The WikiText-2 zip could not be downloaded and its Hugging Face mirror is '
            "parquet, which needs pyarrow (pip install 'gluon-bert[data]'), or download "
            f'wikitext-2-v1.zip by hand and place it at {where}') from None
    folder = os.path.dirname(target)
    mirror = os.path.join(folder, 'hf-wikitext-2-v1')  # the parquet files, cached
    tmp = tempfile.mkdtemp(prefix='.wikitext-2.', dir=folder)
    try:
        inner = os.path.join(tmp, entry.folder)
        os.makedirs(inner)
        for split, fname in _WIKITEXT_SPLITS.items():
            url = _HF_WIKITEXT.format(split=split)
            parquet = download(url, mirror, progress=progress)
            rows = pq.read_table(parquet, columns=['text']).column('text').to_pylist()
            # The parquet rows are the lines of the original file, blank lines as ''.
            with open(os.path.join(inner, fname), 'w', encoding='utf-8', newline='') as f:
                f.write(''.join(row if row else ' \n' for row in rows))
        try:
            _files_ok(inner, entry.files, check=True)
        except DownloadError:
            # the parquet files have no SHA-1 of their own: drop them so a retry refetches
            shutil.rmtree(mirror, ignore_errors=True)
            raise
        _install_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


_ALTERNATIVES = {'wikitext-2-parquet': _wikitext_from_parquet}

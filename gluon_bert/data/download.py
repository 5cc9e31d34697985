"""One download module for data sets and checkpoints: hub, SHA-1, cache, offline mode.

Every file is written to ``<name>.part`` next to its final path, checked
against its SHA-1, fsync'ed, and only then moved into place with `os.replace`,
so the cache never holds a partial file or an HTTP error page. An interrupted
download resumes with an HTTP Range request where the server allows it and
restarts cleanly otherwise. A cached file whose SHA-1 matches is used without
any request; one whose SHA-1 does not match is fetched again, and reported
as a SHA-1 failure (`ChecksumError`) where that is not possible. With
``GLUON_BERT_OFFLINE=1`` nothing is fetched and a missing file is an error that
says which file to place where.

`download_extract` unpacks an archive once and writes a manifest beside what it
unpacked (every file's size, mtime and SHA-1); a folder is used later only if it
still matches its manifest, and is unpacked again from the verified archive
otherwise (see `_folder_matches` for what each call checks).

The cache folder is ``$GLUON_BERT_HOME`` or ``~/.cache/gluon_bert``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from typing import Iterable, Mapping

from ..errors import GluonBertError

__all__ = ['HubEntry', 'DATA_HUB', 'DownloadError', 'ChecksumError', 'ArchiveError', 'cache_dir',
           'register', 'download', 'download_extract', 'extract_zip', 'extract_once', 'sha1_file',
           'offline']

log = logging.getLogger(__name__)

D2L_DATA_URL = 'http://d2l-data.s3-accelerate.amazonaws.com/'
CHUNK = 1 << 20
# Written into every folder `download_extract` unpacks; hidden, so listings ignore it.
MANIFEST = '.gluon_bert_manifest.json'


class DownloadError(GluonBertError, RuntimeError):
    """A file could not be fetched (HTTP error, truncated body, offline mode, ...)."""


class _BadResume(DownloadError):
    """The server answered a Range request with a part that does not continue ours."""


class ArchiveError(DownloadError):
    """An archive that cannot be unpacked safely: not a zip, damaged, or with unsafe paths."""


class ChecksumError(DownloadError):
    """A downloaded or cached file does not have the expected SHA-1."""

    def __init__(self, path: str, expected: str, actual: str, url: str | None = None,
                 message: str | None = None):
        self.path, self.expected, self.actual, self.url = path, expected, actual, url
        source = f' (from {url})' if url else ''
        super().__init__(message or (
            f'SHA-1 mismatch for {path}{source}: expected {expected}, got {actual}. '
            'The file was not kept; a mirror may serve a different version, or the transfer '
            'was corrupted: try again or place the right file there by hand.'))


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


def _writable_cache(folder: str, given: bool) -> None:
    """Create the cache folder if needed and check that files can be written there.

    `given`: the folder came from a `cache_dir` argument, not from the environment.
    Raises one `DownloadError` naming the folder and where its name came from.
    """
    if given:
        origin = 'given as cache_dir or --cache-dir'
    elif os.environ.get('GLUON_BERT_HOME'):
        origin = 'from $GLUON_BERT_HOME'
    else:
        origin = 'the default, as $GLUON_BERT_HOME is not set'
    existing = folder
    while existing and not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if os.path.exists(existing) and not os.path.isdir(existing):
        reason = ('it is a file, not a folder' if existing == folder
                  else f'{existing} is a file, not a folder')
    else:
        try:
            os.makedirs(folder, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix='.write-test.', dir=folder)
            os.close(fd)
            os.remove(probe)
            return
        except OSError as err:
            reason = err.strerror or str(err)
    raise DownloadError(f'cache folder {folder} ({origin}) is not usable: {reason}. '
                        'Set GLUON_BERT_HOME (or --cache-dir) to a folder you can write to.')


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
    """Serialise work on `path` between processes (POSIX flock; a no-op elsewhere).

    The lock file ``<path>.lock`` is removed when the work is done, so the cache keeps
    no empty lock files. Removing a file that others may be waiting on is safe here
    because the holder removes it *before* it releases the lock, and every process that
    is granted a lock checks that its file is still the one named ``<path>.lock``: a
    waiter granted the lock on a removed file starts again on the current one, instead
    of working alongside the process that holds that. So at any time at most one
    process holds the lock on the file the name points to. (One shared, never-removed
    lock file per path would also be race-free, but leaves a file behind per download.)
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    lock_path = path + '.lock'
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None  # its holder removed it while we waited
        except BaseException:
            os.close(fd)
            raise
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock_path)
        os.close(fd)  # releases the lock


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


def _check_cached(path: str, sha1: str | None) -> tuple[bool, str | None]:
    """(True, None): `path` is there with the right SHA-1; (False, its SHA-1): it is there
    with another one; (False, None): it is not there."""
    if not os.path.isfile(path):
        return False, None
    if sha1 is None:
        return True, None
    actual = sha1_file(path)
    return (True, None) if actual == sha1 else (False, actual)


def download(name_or_url: str, cache_dir: str | None = None, sha1: str | None = None,
             urls: Iterable[str] | None = None, timeout: float = 60.0,
             progress: bool | None = None) -> str:
    """Fetch a hub entry (or a URL) into the cache and return its path.

    `urls` are extra mirrors tried first; `sha1` overrides the entry's. Raises
    `DownloadError` when no URL serves the file (message lists every attempt)
    and `ChecksumError` when the bytes that arrived have another SHA-1. A cached
    file with the wrong SHA-1 (damaged, or another version) is downloaded again;
    where that is not possible (offline, or every URL fails) the error is a
    `ChecksumError` naming the cached file, not a network error.
    """
    name, entry = _resolve(name_or_url, sha1, urls)
    folder = cache_dir or _home()
    path = os.path.join(folder, entry.filename)
    ok, stale = _check_cached(path, entry.sha1)
    if ok:
        return path
    sources = ' or '.join(entry.urls)
    if offline():
        if stale:
            raise ChecksumError(path, entry.sha1, stale, message=(
                f'SHA-1 mismatch for the cached {path}: expected {entry.sha1}, got {stale} '
                '(a damaged file, or another version). Offline mode (GLUON_BERT_OFFLINE=1) '
                f'does not fetch it again: replace it with {entry.filename} from {sources}'))
        digest = f' (SHA-1 {entry.sha1})' if entry.sha1 else ''
        raise DownloadError(f'offline mode (GLUON_BERT_OFFLINE=1): {name} is not in the cache. '
                            f'Place {entry.filename}{digest} at {path}; it can be downloaded '
                            f'from {sources}')
    _writable_cache(folder, given=cache_dir is not None)
    part = path + '.part'
    errors = []
    with _file_lock(path):
        ok, stale = _check_cached(path, entry.sha1)
        if ok:
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
                    if stale:
                        log.warning('%s had SHA-1 %s, expected %s (a damaged file, or another '
                                    'version); downloaded it again', path, stale, entry.sha1)
                    return path
                os.remove(part)
                if resumed:
                    continue  # the old partial file may be stale: start this URL afresh
                error = ChecksumError(path, entry.sha1, actual, url)
                errors.append(str(error))
                break
    if stale:
        # The cached file stays, so that the next attempt reports the same cause.
        raise ChecksumError(path, entry.sha1, stale, message=(
            f'SHA-1 mismatch for the cached {path}: expected {entry.sha1}, got {stale} '
            '(a damaged file, or another version), and downloading it again failed: '
            + '; '.join(errors) + f'. Replace it by hand with {entry.filename} from {sources}'))
    if errors and all(e.startswith('SHA-1 mismatch') for e in errors):
        raise error
    raise DownloadError(f'could not download {name}: ' + '; '.join(errors))


def extract_zip(archive: str, dest: str) -> None:
    """Extract `archive` into `dest`, refusing absolute paths, '..' and links.

    A file that is not a readable zip (truncated, damaged, another format) raises
    `ArchiveError` naming it.
    """
    root = os.path.realpath(dest)
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                name = info.filename
                mode = info.external_attr >> 16
                if (name.startswith(('/', '\\')) or ':' in name.split('/')[0]
                        or '..' in name.replace('\\', '/').split('/')):
                    raise ArchiveError(f'{archive}: unsafe path {name!r} in archive')
                if (mode & 0o170000) == 0o120000:
                    raise ArchiveError(f'{archive}: symbolic link {name!r} in archive')
                target = os.path.realpath(os.path.join(root, name))
                if os.path.commonpath([root, target]) != root:
                    raise ArchiveError(f'{archive}: {name!r} would extract outside {dest}')
            zf.extractall(root)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
        raise ArchiveError(f'{archive}: not a readable zip archive ({err})') from None


def download_extract(name: str, cache_dir: str | None = None, progress: bool | None = None) -> str:
    """Download and unzip a hub entry once; return its folder (e.g. with vocab.json).

    The archive (SHA-1 checked by `download`) is extracted into a temporary folder,
    which gets a manifest (`MANIFEST`: size, mtime and SHA-1 of every file) and is
    then moved into ``<cache>/<archive stem>/`` in one rename, so a half-extracted
    folder is never used. A later call uses that folder only while it matches its
    manifest (`_folder_matches`); a folder without one (placed by hand, or left by an
    older version of this package), with missing, changed or extra files, or made
    from another version of the archive is extracted again from the verified
    archive, downloaded again where needed. Returns ``<cache>/<archive stem>/<entry.folder>``.
    """
    if name not in DATA_HUB:
        raise KeyError(f'unknown hub entry {name!r}; known: {sorted(DATA_HUB)}')
    entry = DATA_HUB[name]
    folder = cache_dir or _home()
    stem = entry.filename[:-4] if entry.filename.endswith('.zip') else entry.filename
    target = os.path.join(folder, stem)
    result = os.path.join(target, entry.folder) if entry.folder else target
    if _folder_matches(target, entry):
        return result
    _writable_cache(folder, given=cache_dir is not None)
    with _file_lock(target):
        if _folder_matches(target, entry):
            return result  # another process extracted it while we waited
        try:
            archive = download(name, cache_dir, progress=progress)
        except DownloadError as err:
            if entry.alternative and not offline():
                try:
                    return _ALTERNATIVES[entry.alternative](entry, target, result, progress)
                except DownloadError as fallback_err:
                    raise _both_failed(name, entry, folder, err, fallback_err) from None
            raise
        _unpack(archive, target, entry)
    return result


def extract_once(archive: str, target: str, sha1: str | None = None) -> bool:
    """Unpack a local zip into the folder `target`, unless an earlier call did and the
    folder still matches its manifest (as `download_extract` does for hub entries).

    `sha1`: the archive's, when the caller has it. Returns whether it unpacked.
    """
    entry = HubEntry((archive,), sha1 or sha1_file(archive), os.path.basename(archive))
    if _folder_matches(target, entry):
        return False
    home = os.path.abspath(_home())
    under_home = os.path.commonpath([home, os.path.abspath(target)]) == home
    _writable_cache(os.path.dirname(target), given=not under_home)
    with _file_lock(target):
        if _folder_matches(target, entry):
            return False  # another process unpacked it while we waited
        _unpack(archive, target, entry)
    return True


def _unpack(archive: str, target: str, entry: HubEntry) -> None:
    """Extract `archive` (SHA-1 `entry.sha1`, already checked) next to `target`, check it
    and move it into place with its manifest; the caller holds the lock on `target`."""
    name = os.path.basename(target)
    tmp = tempfile.mkdtemp(prefix=f'.{name}.', dir=os.path.dirname(target))
    try:
        extract_zip(archive, tmp)
        if entry.folder and not os.path.isdir(os.path.join(tmp, entry.folder)):
            raise ArchiveError(f'{archive} has no folder {entry.folder!r}')
        _install_verified(tmp, target, entry, source=archive, archive_sha1=entry.sha1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tree_files(root: str) -> dict[str, str]:
    """{path relative to root, with '/': path} of every file under `root` but the manifest
    (and its temporary copies, which a concurrent `_folder_matches` may be writing)."""
    found = {}
    for dirpath, _, filenames in os.walk(root):
        for fname in filenames:
            path = os.path.join(dirpath, fname)
            rel = os.path.relpath(path, root).replace(os.sep, '/')
            if not rel.startswith(MANIFEST):
                found[rel] = path
    return found


def _write_json(path: str, obj) -> None:
    """Write JSON atomically: a reader sees the old file or the whole new one."""
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _install_verified(tmp: str, target: str, entry: HubEntry, source: str,
                      archive_sha1: str | None) -> None:
    """Check an unpacked folder against the hub's SHA-1s, write its manifest, move it into
    place. `source`: what it was unpacked from, for messages and the manifest."""
    files = {}
    for rel, path in sorted(_tree_files(tmp).items()):
        st = os.stat(path)
        files[rel] = {'size': st.st_size, 'mtime_ns': st.st_mtime_ns, 'sha1': sha1_file(path)}
    for fname, digest in entry.files.items():
        rel = f'{entry.folder}/{fname}' if entry.folder else fname
        where = os.path.join(target, *rel.split('/'))
        if rel not in files:
            raise DownloadError(f'{source} has no {rel} (expected at {where})')
        if files[rel]['sha1'] != digest:
            raise ChecksumError(where, digest, files[rel]['sha1'], source)
    _write_json(os.path.join(tmp, MANIFEST),
                {'format': 1, 'source': source, 'archive_sha1': archive_sha1, 'files': files})
    if os.path.lexists(target):  # only reached when it did not match its manifest
        log.warning('%s did not match its manifest %s (or had none): replaced it with a fresh '
                    'copy from %s', target, MANIFEST, source)
    _install_dir(tmp, target)


def _folder_matches(target: str, entry: HubEntry) -> bool:
    """Whether `target` is a folder unpacked here for `entry` and unchanged since.

    Each call checks, without hashing, that the folder holds exactly the files of its
    manifest, each with its recorded size and mtime, and that the manifest is for this
    entry's archive (or, for a folder rebuilt from a mirror, lists the hub's SHA-1 of
    each of the entry's files). A file whose mtime changed (touched, copied, edited)
    is hashed again; the folder is used if its SHA-1 is unchanged, and the new mtime
    is recorded. Hashing every file on every call would add seconds to each run (SNLI
    unpacks to about 1 GB, bert.base holds 400 MB); every byte was hashed once, right
    after the verified archive was unpacked, and size + mtime catch replaced, truncated,
    edited and planted files. A deliberate change that keeps both is not caught.
    """
    try:
        with open(os.path.join(target, MANIFEST), encoding='utf-8') as f:
            manifest = json.load(f)
        files = dict(manifest['files'])
        archive_sha1 = manifest.get('archive_sha1')
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # no manifest (planted, or an older version), or not ours
    if entry.folder and not os.path.isdir(os.path.join(target, entry.folder)):
        return False
    for fname, digest in entry.files.items():
        record = files.get(f'{entry.folder}/{fname}' if entry.folder else fname)
        if not isinstance(record, dict) or record.get('sha1') != digest:
            return False
    if archive_sha1 != entry.sha1 and not entry.files:
        return False  # unpacked from another version of the archive
    found = _tree_files(target)
    if set(found) != set(files):
        return False
    touched = {}
    for rel, path in found.items():
        record = files[rel]
        try:
            st = os.stat(path)
        except OSError:
            return False
        if not isinstance(record, dict) or st.st_size != record.get('size'):
            return False
        if st.st_mtime_ns != record.get('mtime_ns'):
            if sha1_file(path) != record.get('sha1'):
                return False
            touched[rel] = st.st_mtime_ns
    if touched:
        for rel, mtime_ns in touched.items():
            files[rel] = dict(files[rel], mtime_ns=mtime_ns)
        with contextlib.suppress(OSError):  # a read-only cache is checked again next time
            _write_json(os.path.join(target, MANIFEST), dict(manifest, files=files))
    return True


def _install_dir(tmp: str, target: str) -> None:
    """Move a finished folder into place; an older copy (or a file of that name) is replaced."""
    if os.path.lexists(target):
        old = target + f'.old{os.getpid()}'
        os.replace(target, old)
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)
    os.replace(tmp, target)
    _fsync_dir(os.path.dirname(target))


def _alternative_source(alternative: str) -> str:
    if alternative == 'wikitext-2-parquet':
        return ('its Hugging Face parquet copy '
                + _HF_WIKITEXT.format(split='{train,validation,test}'))
    return alternative


def _both_failed(name: str, entry: HubEntry, folder: str, primary: DownloadError,
                 fallback: DownloadError) -> DownloadError:
    """One error for an entry whose archive and whose fallback mirror both failed: it names
    both sources and what to place where by hand (a ChecksumError if either was one)."""
    where = os.path.join(folder, entry.filename)
    digest = f' (SHA-1 {entry.sha1})' if entry.sha1 else ''
    text = (f'could not get {name} from {" or ".join(entry.urls)} ({primary}), nor from '
            f'{_alternative_source(entry.alternative)} ({fallback}). Download '
            f'{entry.filename}{digest} by hand from {entry.urls[-1]} and place it at {where}')
    for err in (primary, fallback):
        if isinstance(err, ChecksumError):
            return ChecksumError(err.path, err.expected, err.actual, err.url, message=text)
    return DownloadError(text)


def _wikitext_from_parquet(entry: HubEntry, target: str, result: str,
                           progress: bool | None) -> str:
    """Rebuild wikitext-2/ from the Hugging Face parquet copy, checked by SHA-1."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DownloadError("it is parquet, which needs pyarrow "
                            "(pip install 'gluon-bert[data]')") from None
    folder = os.path.dirname(target)
    mirror = os.path.join(folder, 'hf-wikitext-2-v1')  # the parquet files, cached
    tmp = tempfile.mkdtemp(prefix='.wikitext-2.', dir=folder)
    try:
        inner = os.path.join(tmp, entry.folder)
        os.makedirs(inner)
        for split, fname in _WIKITEXT_SPLITS.items():
            url = _HF_WIKITEXT.format(split=split)
            parquet = download(url, mirror, progress=progress)
            try:
                rows = pq.read_table(parquet, columns=['text']).column('text').to_pylist()
            except (ValueError, OSError, KeyError) as err:  # pyarrow's ArrowInvalid, ArrowIOError
                os.remove(parquet)  # no SHA-1 to check it by: fetch it again next time
                raise DownloadError(f'{parquet} (from {url}): not a readable parquet file '
                                    f'with a text column ({err})') from None
            # The parquet rows are the lines of the original file, blank lines as ''.
            with open(os.path.join(inner, fname), 'w', encoding='utf-8', newline='') as f:
                f.write(''.join(row if row else ' \n' for row in rows))
        try:
            _install_verified(tmp, target, entry, source=_HF_WIKITEXT.format(split='*'),
                              archive_sha1=None)
        except DownloadError:
            # the parquet files have no SHA-1 of their own: drop them so a retry refetches
            shutil.rmtree(mirror, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


_ALTERNATIVES = {'wikitext-2-parquet': _wikitext_from_parquet}

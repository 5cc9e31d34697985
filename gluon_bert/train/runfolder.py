"""A run folder held by one run at a time, cleaned of what killed runs left behind.

`RunFolder(path)` creates the folder if needed and takes an exclusive `flock` on
`<path>/.lock`. The kernel drops the lock when the process dies, however it dies, so a run
killed with SIGKILL never blocks the next one; a second run on a held folder is refused at
once with the holder's pid. Once the lock is held, temporary files of interrupted
checkpoint writes are removed. A run that fails before writing anything removes the folder
it created, so a failed start leaves nothing behind.
"""
from __future__ import annotations

import errno
import os
import shutil

from ..errors import RunFolderError
from .checkpoint import TMP_PREFIX

__all__ = ['RunFolder']

LOCK = '.lock'


class RunFolder:
    def __init__(self, path: str):
        self.path = path
        self._fd = None
        self._created = False

    def __enter__(self):
        import fcntl
        path = self.path
        if os.path.exists(path) and not os.path.isdir(path):
            raise RunFolderError(f'--out-dir {path} is a file, not a folder')
        try:
            self._created = not os.path.isdir(path)
            os.makedirs(path, exist_ok=True)
            lock = os.path.join(path, LOCK)
            while True:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 64).decode('ascii', 'replace').strip() or '?'
                    os.close(fd)
                    raise RunFolderError(f'{path} is in use by another run (pid {holder}); '
                                         'wait for it to finish or choose another --out-dir')
                # The holder before us may have removed the file after we opened it: then
                # our lock is on a file nobody else sees, so take the new one instead.
                if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f'{os.getpid()}\n'.encode())
            self._fd = fd
        except OSError as err:
            if isinstance(err, RunFolderError):
                raise
            raise RunFolderError(f'cannot use --out-dir {path}: {err.strerror or err}') from err
        self._clean()
        return self

    def _clean(self):
        """Remove what an interrupted checkpoint write or pointer update left behind."""
        for name in os.listdir(self.path):
            if name.startswith((TMP_PREFIX, '.latest.tmp')):
                target = os.path.join(self.path, name)
                if os.path.isdir(target):
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    try:
                        os.remove(target)
                    except OSError:
                        pass

    def __exit__(self, *exc):
        lock = os.path.join(self.path, LOCK)
        # remove the lock file while still holding the lock (see the inode check above)
        try:
            os.remove(lock)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if self._created:
            try:
                os.rmdir(self.path)  # only if the run wrote nothing into the folder it made
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise
        return False

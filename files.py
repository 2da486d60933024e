"""Atomic file writes: a file is written under a temporary name beside its place and renamed over
it only once complete, so a full disk, a missing permission or a crash leaves the previous file or
the new one, never a truncated one."""
import glob
import os
from contextlib import contextmanager, suppress

from errors import first_line


class WriteError(OSError):
    """A file could not be written (full disk, no permission, I/O error); the previous one is intact."""


@contextmanager
def atomic_path(path, what="file", errors=(OSError,)):
    """Yield a temporary path (with `path`'s extension, which image writers read) to write to;
    rename it over `path` when the block succeeds. `errors` raised by the block or the rename
    become one WriteError line; the temporary file never stays behind."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}{os.path.splitext(name)[1]}")
    try:
        yield tmp
        os.replace(tmp, path)
        for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(f".{name}.tmp") + "*")):
            with suppress(OSError):  # left by an earlier writer killed mid-write (SIGKILL, power loss)
                os.remove(stale)
    except errors as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        previous = f"the previous {what} is intact" if os.path.exists(path) else f"no {what} was written"
        raise WriteError(f"could not write {path} ({reason}); {previous}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

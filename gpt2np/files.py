"""Writing a file so that a failure never destroys an earlier one: the new bytes go to a temporary file
beside the target (same folder, so the same file system), which replaces the target only once it is
complete (``os.replace``, atomic). If anything fails, the temporary file is removed and the target is
left as it was, byte for byte.

    with replacing("lens.npz") as tmp:        # tmp: a new, empty file beside lens.npz
        with open(tmp, "wb") as f:
            np.savez_compressed(f, ...)       # an exception here leaves lens.npz untouched
"""
from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path):
    """Yield the path of a new empty file beside ``path``; when the block ends without an exception it
    replaces ``path`` (written to disk first), otherwise it is removed and ``path`` is unchanged.

    A symbolic link is followed (its target is replaced, as ``open(path, "w")`` would write there); an
    existing file's permission bits are kept, a new file gets the usual ones (0o666 less the umask).
    """
    target = Path(os.path.realpath(path))
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename: a crash never leaves an empty target
            os.fsync(f.fileno())
        if target.exists():
            shutil.copymode(target, tmp)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``Path(path).write_bytes(data)``, but through ``replacing``: a failure leaves the old file."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """``Path(path).write_text(text, encoding="utf-8")`` through ``replacing``."""
    return write_bytes(path, text.encode("utf-8"))

"""The one way edgefleet writes a file that holds a secret or state that must survive a crash.

`write_private` writes a temporary file beside the target, created with mode 0600 from its first
byte (never readable by others for a moment, whatever the umask), fsyncs it, renames it over the
target and fsyncs the directory: after a crash the path holds the old content or the new one,
never half of either. Keys, broker passwords, the dynamic-security file, pid files, tunnel
configs and the agent's deploy state all go through it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path


def write_private(path: Path, data: bytes | str) -> Path:
    """Replace `path` with `data` (text is UTF-8), mode 0600; the directory must exist."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by a crash: O_EXCL below makes sure the file is our own, 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path

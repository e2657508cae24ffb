"""The gateway's data directory is its own: 0700, and everything in it 0600.

It holds the CA and signing keys, the broker's credentials and, on the embedded defaults, the
SQLite registry (with its ``-wal`` and ``-shm`` files, which SQLite creates with the process's
umask). `secure_data_dir` sets the umask to 077 for the process (so every file the gateway, SQLite
or the Mosquitto it starts makes from then on is private) and tightens what is already there, such
as a directory made by an older version.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)
PRIVATE_UMASK = 0o077


def secure_data_dir(data_dir: Path) -> None:
    os.umask(PRIVATE_UMASK)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    loosened = 0
    for path in [data_dir, *data_dir.rglob("*")]:
        try:
            info = path.lstat()
        except FileNotFoundError:  # gone meanwhile (a -shm file)
            continue
        if stat.S_ISLNK(info.st_mode):
            continue
        wanted = 0o700 if stat.S_ISDIR(info.st_mode) else stat.S_IMODE(info.st_mode) & 0o700
        if stat.S_IMODE(info.st_mode) & 0o077:
            path.chmod(wanted)
            loosened += 1
    if loosened:
        log.info("made %d files and directories in %s private to this user", loosened, data_dir)

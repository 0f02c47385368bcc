"""The two things every layer may need: the user-error type and an atomic file write."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


class InputError(Exception):
    """Bad input from the user: the CLI prints it as one line and exits 2."""


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename over `path`: never a partial file, never a stray temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)                  # mkstemp makes 0600; a written model is a normal file
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

"""What every layer may need: the user-error type, atomic writes, and naming what a file is."""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path


class InputError(Exception):
    """Bad input from the user: the CLI prints it as one line and exits 2."""


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename over `path`: never a partial file, never a stray temp file.

    A path that cannot be written (its parent is a file, no permission, no space left) is an
    InputError naming the path and the reason.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    except OSError as e:
        raise InputError(f"cannot write {path}: {_reason(e, path)}") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)                  # mkstemp makes 0600; a written model is a normal file
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise InputError(f"cannot write {path}: {_reason(e, path)}") from None
        raise


def _nearest_existing(path: Path) -> Path | None:
    """The closest ancestor of `path` that exists (where a new file would have to be made)."""
    return next((parent for parent in Path(path).parents if parent.exists()), None)


def _reason(e: OSError, path: Path) -> str:
    parent = _nearest_existing(path)
    if parent is not None and not parent.is_dir():
        return f"{parent} is a file, not a folder"
    return e.strerror or str(e)


def check_writable(path: Path) -> None:
    """Fail early (before any work) when `path` cannot be created: a parent that is a file."""
    parent = _nearest_existing(path)
    if parent is None:
        return
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {path}: no permission to write in {parent}")


def what_is(path: Path) -> str:
    """What a file holds, in words, judged from its bytes (nothing is parsed or executed)."""
    path = Path(path)
    if path.is_dir():
        return "a folder"
    size = path.stat().st_size
    if size == 0:
        return "an empty file"
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return "a damaged zip archive (truncated or corrupted)"
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):          # UnicodeDecodeError is a ValueError
            return "a damaged zip archive (truncated or corrupted)"
        if any("serialized_exported_program" in n or n.endswith("models/model.json") for n in names):
            return "a torch.export archive"
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "a TorchScript archive"
        if any(n.endswith("data.pkl") for n in names):
            return "a torch.save archive (a pickle)"
        return "a zip archive of another kind"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "a pickle"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"a text file (starting {text[:24]!r})"
    return "a file of unrecognised bytes (not a zip archive, a pickle or text)"

"""What every layer may need: the user-error type, atomic writes, and naming what a file is."""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import zipfile
from pathlib import Path


class InputError(Exception):
    """Bad input from the user: the CLI prints it as one line and exits 2."""


# What the tool may write over. The library replaces files as torch.save does; the CLI runs
# inside write_rules(overwrite=--overwrite, protected=its inputs).
_RULES = {"overwrite": True, "protected": frozenset()}


@contextlib.contextmanager
def write_rules(*, overwrite: bool, protected=()):
    """Within: atomic_write never writes a `protected` path (an input, its weights), and
    replaces an existing file only when `overwrite` — checked at the moment of the write."""
    saved = dict(_RULES)
    _RULES.update(overwrite=overwrite, protected=frozenset(Path(p).resolve() for p in protected))
    try:
        yield
    finally:
        _RULES.update(saved)


def check_target(path: Path) -> None:
    """Fail early (before any work) for a path atomic_write would refuse: an input of this run,
    an existing file without --overwrite, a folder, a parent that is a file or not writable."""
    path = Path(path)
    try:
        if path.resolve() in _RULES["protected"]:
            raise InputError(f"{path} would overwrite the input model, its weights or its inputs: "
                             "choose another path")
        if path.is_dir():
            raise InputError(f"cannot write {path}: it is a folder")
        if (path.exists() or path.is_symlink()) and not _RULES["overwrite"]:
            raise InputError(f"{path} exists (pass --overwrite to replace it)")
    except OSError as e:                           # a name too long, a loop of links
        raise InputError(f"cannot write {path}: {_reason(e, path)}") from None
    check_writable(path)


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then move it to `path`: never a partial file, never a stray temp file.

    Without overwrite the move is a hard link, which fails if `path` appeared meanwhile (another
    run), so an existing file is never replaced. A path that cannot be written (its parent is a
    file, no permission, no space left, a name too long) is an InputError naming the path and
    the reason; an interruption (SIGINT, SIGTERM) removes the temporary file and propagates.
    """
    path = Path(path)
    check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=path.suffix[:16], dir=path.parent)
    except OSError as e:
        raise InputError(f"cannot write {path}: {_reason(e, path)}") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)                  # mkstemp makes 0600; a written model is a normal file
    try:
        write(tmp)
        _publish(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise InputError(f"cannot write {path}: {_reason(e, path)}") from None
        raise


def _publish(tmp: str, path: Path) -> None:
    """Move the written `tmp` to `path`; without overwrite, atomically refuse an existing `path`."""
    if path.resolve() in _RULES["protected"]:                  # a symlink made meanwhile
        raise InputError(f"{path} would overwrite the input model, its weights or its inputs: choose another path")
    if _RULES["overwrite"]:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)                                     # fails if `path` exists, whatever made it
    except FileExistsError:
        raise InputError(f"{path} exists (pass --overwrite to replace it)") from None
    except OSError as e:                                       # a file system without hard links
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists() or path.is_symlink():
            raise InputError(f"{path} exists (pass --overwrite to replace it)") from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


class FileSink:
    """A file for a C++ writer that cannot fail cleanly (torch's archive writer aborts the
    process when a write fails twice, the second time in its destructor): the first error
    (OSError, or an interruption) is kept and raised by `close()`, later writes are dropped,
    so the writer always finishes."""

    def __init__(self, path):
        self._f = open(path, "wb", buffering=0)
        self.error: BaseException | None = None

    def flush(self) -> None:
        pass

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        if self.error is None:
            try:
                while view:
                    view = view[self._f.write(view):]
            except BaseException as e:  # noqa: BLE001 - kept, raised by close()
                self.error = e
        return n

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _nearest_existing(path: Path) -> Path | None:
    """The closest ancestor of `path` that exists (where a new file would have to be made)."""
    return next((parent for parent in Path(path).parents if parent.exists()), None)


def _reason(e: OSError, path: Path) -> str:
    parent = _nearest_existing(path)
    if parent is not None and not parent.is_dir():
        return f"{parent} is a file, not a folder"
    if e.errno == errno.ENAMETOOLONG:
        return "the name is longer than the file system allows"
    if e.errno in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT):
        return f"{e.strerror} (the disk or the file size limit is full)"
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
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    too_long = [part for part in Path(path).parts if len(os.fsencode(part)) > name_max]
    if too_long:
        raise InputError(f"cannot write {str(path)[:60]}…: a name of {len(os.fsencode(too_long[0]))} bytes is "
                         f"longer than the file system allows ({name_max})")


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

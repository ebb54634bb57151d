"""Atomic outputs: write to a temporary name beside the target, rename when complete.

A failure (an exception, Ctrl-C, a full disk) removes the temporary file, so a user finds either
the complete previous output or none. An existing output is never replaced unless ``overwrite``.
A temporary's name holds its host and process id, so that the next write of the same name
removes what a killed process (SIGKILL, a power cut) left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from targan_cli.errors import TarganError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # the same name, a hard link or a symbolic link
    except OSError:  # one does not exist
        return False


def check_writable(path: str | Path, overwrite: bool, inputs: Iterable[str | Path] = (),
                   is_dir: bool = False) -> Path:
    """Refuse, before any work, an output that is one of the command's ``inputs`` (``overwrite``
    replaces outputs, never what is being read), an existing output without ``overwrite``, a
    folder where a file is to be written (unless ``is_dir``) and an output that cannot be written
    (the nearest existing folder above it is a file or not writable). Creates nothing:
    ``atomic_output`` creates the missing folders when it writes, so a command that fails before
    then leaves no empty folder behind."""
    path = Path(path)
    if path.exists():  # an input exists: an output that does not cannot be one
        for source in inputs:
            if _same_file(path, Path(source)):
                raise TarganError(f"is also an input ({source}): write the output under another name", path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise TarganError("already exists; pass --overwrite to replace it", path)
    if not is_dir and path.is_dir():
        raise TarganError("is a folder: name a file to write", path)
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise TarganError("is a file: cannot create the output folder under it", existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TarganError("cannot write here: permission denied", existing)
    return path


def check_replaceable_folder(path: str | Path, overwrite: bool, marker: str) -> Path:
    """Refuse, before any work, an output folder that may not be replaced: a file; a non-empty
    folder without ``overwrite``; and, even with it, a non-empty folder without ``marker`` (the
    file by which a folder this tool wrote is known, e.g. dataset.json): someone else's folder."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return path
    if not path.is_dir():
        raise TarganError("exists and is not a folder", path)
    if not any(path.iterdir()):
        return path
    if not (path / marker).is_file():
        raise TarganError(f"is not empty and holds no {marker}; refusing to replace it, "
                          "choose a new or empty folder", path)
    if not overwrite:
        raise TarganError(f"already holds a {marker.split('.')[0]}; pass --overwrite to replace it", path)
    return path


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TarganError(f"cannot create the output folder: {error.strerror or error}", path.parent) from None


def _host() -> str:
    """This machine's name as part of a temporary's name: letters and digits only."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40] or "host"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        pass
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path``'s name left by a killed process of this host (its id
    is in their name, and no process of that id runs): a SIGKILL leaves no one else to do it.
    Temporaries of running processes and of other hosts (a shared file system) are left alone."""
    pattern = re.compile(rf"^\.{re.escape(path.name.split('.')[0])}\.tmp-(?P<host>[A-Za-z0-9]+)_(?P<pid>\d+)-")
    with contextlib.suppress(OSError):
        for sibling in path.parent.iterdir():
            match = pattern.match(sibling.name)
            if match and match["host"] == _host() and not _running(int(match["pid"])):
                _remove(sibling)


def _temporary_name(path: Path, is_dir: bool) -> Path:
    # Keep the full suffix (".nii.gz") so that writers which infer the format from it still work.
    prefix = f".{path.name.split('.')[0]}.tmp-{_host()}_{os.getpid()}-"
    suffix = "".join(path.suffixes)
    try:
        if is_dir:
            return Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        handle, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    except OSError as error:
        raise TarganError(f"cannot write here: {error.strerror or error}", path.parent) from None
    os.close(handle)
    return Path(name)


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    With ``is_dir`` the temporary is a folder, moved into place as a whole.
    """
    path = check_writable(path, overwrite, is_dir=is_dir)
    _make_parent(path)
    _remove_stale_temporaries(path)
    temporary = _temporary_name(path, is_dir)
    try:
        yield temporary
        _public(temporary)
        if is_dir and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(temporary, path)
    except OSError as error:
        _remove(temporary)
        raise TarganError(f"cannot write: {error.strerror or error}", path) from None
    except BaseException:
        _remove(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: Path) -> None:
    """Give a finished output the permissions a plain open() would have (mkstemp makes it 0600)."""
    mask = _umask()
    if path.is_dir() and not path.is_symlink():
        for folder, _, files in os.walk(path):
            os.chmod(folder, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~mask)
    elif path.exists():
        os.chmod(path, 0o666 & ~mask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

"""Safe outputs: every file and folder a command writes goes through this module.

The rules (docs/guarantees.md lists each with the test that proves it):

- An output never is, contains, or lies inside one of the command's inputs (real paths compared:
  symbolic links and ``..`` resolved, hard links found by ``samefile``): ``check_apart``.
- ``overwrite`` replaces only what this tool made: a folder it made holds ``MARKER`` (the
  command and version that wrote it), and a non-empty folder without one is never deleted or
  emptied; a file is replaced only by a file of its kind (a report over a report, a volume over a
  volume): ``check_writable``.
- Written to a temporary name beside the target and moved into place when complete, under a lock
  beside the target, so that two writers of one output do not both win, and without
  ``overwrite`` the final move cannot replace a file that appeared meanwhile: ``atomic_output``.
  A failure (an exception, Ctrl-C, a full disk) removes the temporary; a full disk is named as
  such, with the disk. A temporary's name holds its host and process id, so that the next write
  of the same name removes what a killed process (SIGKILL, a power cut) left behind.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from targan_cli.errors import DiskFullError, TarganError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# The file by which a folder this tool made is known; with the command and version that made it.
MARKER = ".targan.json"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # the same name, a hard link or a symbolic link
    except OSError:  # one does not exist
        return False


def _real(path: Path) -> Path:
    """``path`` with every symbolic link and ``..`` resolved, also where its end does not exist."""
    return Path(os.path.realpath(path))  # not abspath first: it drops "x/.." before x is resolved


def local_paths(*sources: str | Path | None) -> list[Path]:
    """The ``sources`` that name an existing file or folder (a Hub repo id or None names none)."""
    return [Path(source) for source in sources if source is not None and os.path.lexists(source)]


def _real_entry(path: Path) -> Path:
    """Where writing ``path`` puts its entry: its folder resolved, its own name kept (a rename
    replaces a symbolic link itself, not what it points to)."""
    name = os.path.basename(path)
    return _real(path) if name in ("", ".", "..") else _real(Path(os.path.dirname(path) or ".")) / name


def check_apart(output: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an ``output`` that is, contains or lies inside one of ``inputs`` (a file or folder
    the command reads): writing it, or replacing it with --overwrite, would destroy what is read.
    Inputs are compared by what they point to, the output by the entry that writing it replaces;
    an output that is the input's file under another name (a hard or symbolic link) is refused too."""
    output = Path(output)
    real_output = _real_entry(output)
    for source in inputs:
        source = Path(source)
        real_source = _real(source)
        # the same file, or the same entry (a link given as input, named again through a folder
        # that does not exist yet: b/../link)
        if real_output in (real_source, _real_entry(source)) or _same_file(output, source):
            raise TarganError(f"is also an input ({source}): write the output under another name", output)
        if real_output in real_source.parents:
            raise TarganError(f"holds the input {source}: the output must lie outside every input", output)
        if real_source in real_output.parents:
            raise TarganError(f"lies inside the input {source}: the output must lie outside every input", output)


def mark_folder(folder: str | Path, command: str, kind: str) -> None:
    """Write ``MARKER`` into ``folder``: ``command`` made it, a folder of ``kind`` (weights, dataset,
    run, ...), so --overwrite may replace it by another of its kind."""
    from targan_cli import __version__

    text = json.dumps({"made_by": "targan-cli", "command": command, "kind": kind, "version": __version__}) + "\n"
    try:
        (Path(folder) / MARKER).write_text(text, encoding="utf-8")
    except OSError as error:
        raise write_error(error, Path(folder) / MARKER) from None


def made_by_targan(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def _folder_kind(folder: Path) -> str | None:
    """The kind ``MARKER`` records, or None (an unreadable or older marker)."""
    try:
        kind = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


# The kinds of file a command writes, by the names and first bytes of such files: --overwrite
# replaces an existing file only by one of its kind.
def _nifti_header(head: bytes) -> bool:
    """sizeof_hdr, the first field of a NIfTI-1 (348) or NIfTI-2 (540) header, in either byte order."""
    return len(head) >= 4 and any(int.from_bytes(head[:4], order) in (348, 540) for order in ("little", "big"))


def _first_bytes(path: Path, count: int) -> bytes:
    with path.open("rb") as handle:
        head = handle.read(count)
    if head[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError), gzip.open(path, "rb") as handle:
            return handle.read(count)
    return head


KINDS = {
    "volume": ((".nii", ".nii.gz"), _nifti_header),
    "json": ((".json",), lambda head: head.lstrip()[:1] in (b"{", b"[")),
    "csv": ((".csv",), lambda head: b"\0" not in head),
    "png": ((".png",), lambda head: head.startswith(b"\x89PNG\r\n\x1a\n")),
    "markdown": ((".md",), lambda head: b"\0" not in head),
}


def _check_kind(path: Path, kind: str) -> None:
    """Refuse to replace ``path`` unless it is a file of ``kind`` or empty (an empty file holds
    nothing to lose, like an empty folder; a writer's own temporary starts empty)."""
    suffixes, looks_right = KINDS[kind]
    try:
        right = path.stat().st_size == 0 or (path.name.lower().endswith(suffixes)
                                             and looks_right(_first_bytes(path, 4096)))
    except OSError as error:
        raise TarganError(f"cannot read: {error.strerror or error}", path) from None
    if not right:
        raise TarganError(f"exists and is not a {kind} file; --overwrite replaces only a file of the kind "
                          "this command writes: choose another name", path)


def check_writable(path: str | Path, overwrite: bool, inputs: Iterable[str | Path] = (),
                   is_dir: bool = False, kind: str | None = None, ours: Recognizer | None = None) -> Path:
    """Refuse, before any work, an output that may not be written: one that overlaps an input
    (``check_apart``); an existing output without ``overwrite``; a folder where a file is to be
    written (unless ``is_dir``) and a file where a folder is; a non-empty folder that this tool did
    not make (no ``MARKER``), even with ``overwrite``; an existing file that is not of ``kind``
    (a key of ``KINDS``), or folder of another kind (as its marker says); and an output that cannot be written (the nearest existing folder above
    it is a file or not writable). An empty folder counts as absent. ``ours`` recognises a folder
    of ``kind`` that this tool wrote without a marker (a DICOM series, which holds only DICOM
    files). Creates nothing:
    ``atomic_output`` creates the missing folders when it writes, so a command that fails before
    then leaves no empty folder behind."""
    path = Path(path)
    check_apart(path, inputs)
    if is_dir:
        _check_folder(path, overwrite, kind, ours)
    else:
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise TarganError("already exists; pass --overwrite to replace it", path)
        if path.is_dir():
            raise TarganError("is a folder: name a file to write", path)
        if kind is not None and path.exists():
            _check_kind(path, kind)
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise TarganError("is a file: cannot create the output folder under it", existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TarganError("cannot write here: permission denied", existing)
    return path


# Tells whether a folder without ``MARKER`` is one this tool wrote (see ``check_writable``).
Recognizer = Callable[[Path], bool]


def _check_folder(path: Path, overwrite: bool, kind: str | None, ours: Recognizer | None = None) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir():
        raise TarganError("exists and is not a folder", path)
    try:
        empty = not any(path.iterdir())
    except OSError as error:
        raise TarganError(f"cannot read: {error.strerror or error}", path) from None
    if empty:
        return
    if ours is not None and ours(path):
        if not overwrite:
            raise TarganError("already exists; pass --overwrite to replace it", path)
        return
    if not made_by_targan(path):
        raise TarganError(f"already exists, is not empty and holds no {MARKER} (targan did not make it); "
                          "refusing to replace it, --overwrite or not: choose a new or empty folder", path)
    if not overwrite:
        raise TarganError("already exists; pass --overwrite to replace it", path)
    if kind is not None and _folder_kind(path) != kind:
        raise TarganError(f"is a {_folder_kind(path) or 'folder of unknown kind'} that targan made, not a {kind}: "
                          f"--overwrite replaces only a {kind}; choose another folder", path)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(error, path.parent, "cannot create the output folder") from None


# Failures that mean a full disk, in the words of the OS, safetensors (Rust) and quota errors.
_FULL_DISK_WORDS = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded", "os error 122")
# torch.save's writer fails without saying why ("unexpected pos 576 vs 534", "file write failed").
_TORCH_WRITER_WORDS = ("inline_container", "pytorchstreamwriter", "file write failed")


def _mount_point(path: Path) -> Path:
    folder = _real(path)
    while not folder.exists() or not os.path.ismount(folder):
        folder = folder.parent
    return folder


def _disk_nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(_mount_point(path)).free < 1 << 20
    except OSError:
        return False


def write_error(error: BaseException, path: Path, what: str = "cannot write") -> TarganError | None:
    """The one-line error for a failure while writing ``path``: a full disk names the disk (the OS,
    torch and safetensors each report it their own way), another OS error its reason. None for an
    exception that is not a write failure."""
    text = str(error).lower()
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
            or any(words in text for words in _FULL_DISK_WORDS)
            or any(words in text for words in _TORCH_WRITER_WORDS) and _disk_nearly_full(path))
    if full:
        return DiskFullError(f"{what}: No space left on device (the disk mounted at {_mount_point(path)}); "
                             "free some space or write elsewhere", path)
    if isinstance(error, OSError):
        return TarganError(f"{what}: {error.strerror or error}", path)
    if any(words in text for words in _TORCH_WRITER_WORDS):
        return TarganError(f"{what}: {str(error).splitlines()[0][:160]}", path)
    return None


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
        raise write_error(error, path.parent, "cannot write here") from None
    os.close(handle)
    return Path(name)


def lock_name(path: Path) -> Path:
    """The lock file beside ``path`` that its writer holds: ``.<name>.tmp-lock`` (empty)."""
    return path.parent / f".{path.name}.tmp-lock"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file beside ``path`` during the block, so that two writers of
    one output do not run at once: the second is refused. An advisory lock (flock), released by
    the system when its process dies; the file is removed afterwards. Where there is no flock
    (Windows, some network file systems) the block runs unlocked."""
    lock = lock_name(path)
    while True:
        try:
            handle = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as error:
            raise write_error(error, path.parent, "cannot write here") from None
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(handle)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise TarganError(f"is being written by another process (it holds {lock.name}); wait for it "
                                  "to finish, or write elsewhere", path) from None
            handle = None  # a file system without locks
            break
        try:
            current = os.path.samestat(os.fstat(handle), os.stat(lock))
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(handle)  # its previous holder removed it meanwhile: lock the file now there
    try:
        yield
    finally:
        _remove(lock)
        if handle is not None:
            os.close(handle)


def _place(temporary: Path, path: Path, overwrite: bool, is_dir: bool, kind: str | None,
           ours: Recognizer | None) -> None:
    """Move the finished ``temporary`` onto ``path``. Without ``overwrite`` a file is linked into
    place, which fails if a file appeared there meanwhile (then nothing is replaced); a folder
    replaces only an absent or empty folder, or, with ``overwrite``, one this tool made."""
    if not is_dir:
        if overwrite:
            os.replace(temporary, path)
            return
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise TarganError("appeared while this command ran; it was left as it is: pass --overwrite "
                              "to replace it", path) from None
        except OSError:  # a file system without hard links
            if os.path.lexists(path):
                raise TarganError("appeared while this command ran; it was left as it is: pass --overwrite "
                                  "to replace it", path) from None
            os.rename(temporary, path)
            return
        os.unlink(temporary)
        return
    _check_folder(path, overwrite, kind, ours)  # still absent, empty or ours (it may have changed meanwhile)
    if path.is_dir() and not path.is_symlink() and any(path.iterdir()):
        previous = Path(f"{temporary}-previous")
        os.rename(path, previous)
        os.rename(temporary, path)
        _remove(previous)
        return
    if path.is_symlink():
        path.unlink()
    os.replace(temporary, path)


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = False, is_dir: bool = False, kind: str | None = None,
                  command: str | None = None, ours: Recognizer | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` when the block succeeds.

    With ``is_dir`` the temporary is a folder, moved into place as a whole, and marked as made by
    ``command``, a folder of ``kind`` (``MARKER``), when a command is given. ``kind``: see
    ``check_writable``, as ``ours``.
    """
    path = check_writable(path, overwrite, is_dir=is_dir, kind=kind, ours=ours)
    _make_parent(path)
    with _locked(path):
        _remove_stale_temporaries(path)
        temporary = _temporary_name(path, is_dir)
        try:
            yield temporary
            if is_dir and command is not None:
                mark_folder(temporary, command, kind or "folder")
            _public(temporary)
            _place(temporary, path, overwrite, is_dir, kind, ours)
        except Exception as error:
            mapped = None if isinstance(error, TarganError) else write_error(error, path)
            _remove(temporary)
            if mapped is None:
                raise
            raise mapped from None
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

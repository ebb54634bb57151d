"""What a synthetic volume is and how it was made: the JSON sidecar beside it and the NIfTI descrip.

An output ``NAME.nii.gz`` (or a DICOM series folder ``NAME``) gets ``NAME.json`` beside it, with
BIDS-style keys where BIDS has them (``Description``, ``Sources``, ``ImageType``, ``Modality``,
``ConversionSoftware``...) and targan's own for the rest. The sidecar is written first and the
volume second, each atomically, so that a volume never exists without its sidecar; the sidecar
records the SHA-256 of the volume it belongs to, so that a sidecar whose volume was never
renamed into place (a killed run) or was replaced is told apart from a complete pair.

The same record makes folder runs resumable: ``output_state`` says whether an output exists,
is complete and was made by the same run settings (``TarganRun``), which translate and enrich
both use to skip, redo or refuse.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from targan_cli.errors import TarganError
from targan_cli.io.atomic import Recognizer, atomic_output, check_writable

SIDECAR_SUFFIX = ".json"
RUN_KEY = "TarganRun"
OUTPUT_SHA256 = "OutputSHA256"
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_DESCRIP_BYTES = 80  # NIfTI-1 descrip
_INTENT_NAME_BYTES = 16  # NIfTI-1 intent_name


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, or of a folder's files (relative names and contents, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file())
    try:
        for file in files:
            if file != path:
                digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    except OSError as error:
        raise TarganError(f"cannot read: {error.strerror or error}", path) from None
    return digest.hexdigest()


def sidecar_path(output: str | Path) -> Path:
    """``NAME.json`` beside ``NAME.nii.gz``, ``NAME.nii`` or a DICOM series folder ``NAME``."""
    output = Path(output)
    name = output.name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output.with_name(name + SIDECAR_SUFFIX)


def synthetic_descrip(target: str, version: str, detail: str = "") -> str:
    """The NIfTI descrip of a synthetic volume: ``synthetic <target> (targan <version>)`` first,
    then ``detail``, cut to the field's 80 bytes."""
    text = f"synthetic {target} (targan {version})" + (f" {detail}" if detail else "")
    return text.encode("ascii", "replace")[:_DESCRIP_BYTES].decode("ascii")


def synthetic_intent_name(target: str) -> str:
    """The NIfTI intent_name of a synthetic volume (16 bytes)."""
    return f"synthetic {target}".encode("ascii", "replace")[:_INTENT_NAME_BYTES].decode("ascii")


def write_with_sidecar(path: str | Path, write: Callable[[Path], None], record: Mapping[str, Any], *,
                       overwrite: bool = False, is_dir: bool = False, kind: str | None = None,
                       ours: Recognizer | None = None) -> Path:
    """Write an output and its sidecar: ``write(temporary)`` fills a temporary beside ``path``, the
    sidecar (``record`` plus the output's SHA-256) is renamed into place, then the output. ``kind``
    and ``ours``: what the output is (``io.atomic.atomic_output``)."""
    path = Path(path)
    with atomic_output(path, overwrite=overwrite, is_dir=is_dir, kind=kind, ours=ours) as temporary:
        try:
            write(temporary)
        except TarganError as error:  # a writer's error names the output, not its temporary name
            if error.path is None or Path(error.path) != temporary:
                raise
            raise TarganError(error.message, path, error.exit_code) from None
        text = json.dumps({**record, OUTPUT_SHA256: sha256_file(temporary)}, indent=2) + "\n"
        # Under the output's lock: an output that appeared meanwhile keeps the sidecar it has.
        check_writable(path, overwrite, is_dir=is_dir, kind=kind, ours=ours)
        with atomic_output(sidecar_path(path), overwrite=True, kind="json") as sidecar:
            sidecar.write_text(text, encoding="utf-8")
    return path


def read_sidecar(output: str | Path) -> dict[str, Any] | None:
    """The sidecar of ``output`` as a dict; None when there is none or it is not a JSON object."""
    try:
        data = json.loads(sidecar_path(output).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class OutputState:
    """An output's state for a resumable run: ``missing``, ``complete`` (same run settings, the
    sidecar's hash matches the output), ``changed`` (made by this tool otherwise, or incomplete:
    redo it, ``reason`` says why) or ``foreign`` (not made by this tool: replace only with
    --overwrite)."""

    kind: str
    reason: str = ""


def _differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    return [key for key in sorted(set(recorded) | set(wanted)) if recorded.get(key) != wanted.get(key)]


def output_state(path: str | Path, run: Mapping[str, Any]) -> OutputState:
    """Whether ``path`` is missing, complete for the run settings ``run``, to be redone, or foreign."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return OutputState("missing")
    record = read_sidecar(path)
    if record is None or not isinstance(record.get(RUN_KEY), dict):
        return OutputState("foreign", f"has no {sidecar_path(path).name} written by targan")
    changed = _differences(record[RUN_KEY], run)
    if changed:
        return OutputState("changed", f"made with other {', '.join(changed)}")
    if record.get(OUTPUT_SHA256) != sha256_file(path):
        return OutputState("changed", "incomplete or changed since it was written (its SHA-256 differs "
                                      "from its sidecar's)")
    return OutputState("complete")


def describe_provenance(path: str | Path) -> dict[str, str] | None:
    """The rows `targan info` shows for a volume's sidecar, flattened (``Weights.SHA256``); None
    when it has no sidecar."""
    record = read_sidecar(path)
    if record is None:
        return None
    rows: dict[str, str] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                add(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, list) and len(value) > 8:
            rows[prefix] = f"{len(value)} values (see {sidecar_path(path).name})"
        else:
            rows[prefix] = json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)

    add("", record)
    return rows

"""Result files of the experiments: atomic writes, output checks before a run, sealed JSON.

One mechanism for every experiment that writes results (the UCI benchmark, the sparse VD run,
the digits demo):

* :func:`write_atomic` writes through a unique temporary file in the target's directory, flushed
  and fsync'ed, then renamed over the target with :func:`os.replace` (and the directory fsync'ed
  where the platform allows), so a reader sees the old file or the new one, never half a file,
  and two runs writing the same path never share a temporary file;
* :func:`prepare_output_dir` / :func:`prepare_output_file` create the output location and prove
  it writable with a probe file *before* a run spends time training;
* :func:`seal` / :func:`unseal` add and check a SHA-256 checksum of a JSON payload, so a file
  that was edited by hand, truncated or damaged is recognised instead of being used.

Example:
    >>> sealed = seal({"split": 2, "rmse": 2.9})
    >>> sealed["sha256"][:12]
    'd045903d5015'
    >>> unseal(sealed)
    {'split': 2, 'rmse': 2.9}
    >>> unseal({**sealed, "rmse": 2.8})
    Traceback (most recent call last):
    ...
    ValueError: checksum mismatch (the content was changed after it was written)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKSUM_KEY",
    "checksum",
    "prepare_output_dir",
    "prepare_output_file",
    "read_sealed_json",
    "seal",
    "unseal",
    "write_atomic",
]

#: The key of the checksum in a sealed payload.
CHECKSUM_KEY = "sha256"
_TEMP_ATTEMPTS = 100


def _create_unique(directory: Path, name: str) -> tuple[int, Path]:
    """Create a new file ``directory/.name.<random>.tmp`` exclusively; its descriptor and path.

    Not :func:`tempfile.mkstemp`: that creates mode 0600, and a result file should get the
    same permissions as any other file the user writes (0666 minus the umask).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(_TEMP_ATTEMPTS):
        tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: no free temporary name for {name} after {_TEMP_ATTEMPTS} tries")


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.  Windows cannot open a
    # directory and some file systems refuse fsync on one: the rename has happened either way.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write ``content`` (text as UTF-8, or bytes as they are) to ``path`` atomically and durably.

    The content goes to a new, uniquely named temporary file in ``path``'s directory, is flushed and
    fsync'ed, then :func:`os.replace` puts it in place and the directory is fsync'ed where that
    is supported.  An interruption leaves the previous file (or none), never half a file; the
    temporary file is removed on failure.

    Args:
        path: the file to write; missing parent directories are created.
        content: the text or bytes to write.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: the directory or the file cannot be written.
    """
    path = Path(path)
    payload = content.encode("utf-8") if isinstance(content, str) else bytes(content)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_unique(path.parent, path.name)
    try:
        with open(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(path.parent)
    return path


def _reason(path: Path, exc: OSError) -> str:
    # "File exists" / "Not a directory" do not say which file is in the way: name it.
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"{blocker} is not a directory"
    return exc.strerror or str(exc)


def _prepare_dir(path: Path, label: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{label}: cannot create the directory {path} ({_reason(path, exc)})") from None
    if not path.is_dir():  # mkdir(exist_ok=True) accepts a symlink to a file on some platforms
        raise ValueError(f"{label}: {path} is not a directory")
    # os.access answers for the real uid and ignores ACLs and read-only mounts: only a file
    # that is really created proves the directory writable.
    try:
        fd, probe = _create_unique(path, "dropkit-probe")
    except OSError as exc:
        raise ValueError(f"{label}: the directory {path} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        probe.unlink()


def prepare_output_dir(path: str | Path, what: str = "output directory") -> Path:
    """Create ``path`` (with its parents) and prove it writable by creating and removing a probe.

    Args:
        path: the directory.
        what: how messages name it (``"--output"``, ...).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: the directory cannot be created or is not writable; the message names
            ``what``, the path and the reason, on one line.
    """
    path = Path(path)
    _prepare_dir(path, f"{what} {path}")
    return path


def prepare_output_file(path: str | Path, what: str = "output file") -> Path:
    """Check that ``path`` can be written later: its directory is created and writable, and
    ``path`` itself is not a directory.

    Args:
        path: the file.
        what: how messages name it (``"--output"``, ...).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: the file cannot be written there; the message names ``what``, the path and
            the reason, on one line.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path}: is a directory, expected a file path")
    _prepare_dir(path.parent, f"{what} {path}")
    return path


def checksum(payload: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``payload`` as canonical JSON (sorted keys, no spaces, ASCII).

    The canonical text, not the file's bytes, is hashed, so re-indenting a file keeps its
    checksum while any change of a key or a value breaks it.  Floats round-trip exactly through
    JSON, so a payload hashes the same before it is written and after it is read back.
    """
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal(payload: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` plus its :func:`checksum` under :data:`CHECKSUM_KEY`.

    Raises:
        ValueError: ``payload`` already has a :data:`CHECKSUM_KEY` entry.
    """
    if CHECKSUM_KEY in payload:
        raise ValueError(f"payload must not have a {CHECKSUM_KEY!r} key, got one")
    return {**payload, CHECKSUM_KEY: checksum(payload)}


def unseal(payload: object) -> dict[str, Any]:
    """Check a :func:`seal`-ed payload; returns it without the checksum.

    Raises:
        ValueError: ``payload`` is not a JSON object, has no checksum, or its checksum does not
            match its content; the message says which.
    """
    if not isinstance(payload, dict):
        raise ValueError(f"not a JSON object (got {type(payload).__name__})")
    if CHECKSUM_KEY not in payload:
        raise ValueError(f"no {CHECKSUM_KEY!r} checksum (written by an older dropkit, or by hand)")
    body = {k: v for k, v in payload.items() if k != CHECKSUM_KEY}
    if payload[CHECKSUM_KEY] != checksum(body):
        raise ValueError("checksum mismatch (the content was changed after it was written)")
    return body


def read_sealed_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON file written from a :func:`seal`-ed payload and check it.

    Args:
        path: the file.

    Returns:
        The payload, without its checksum.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not UTF-8 JSON (a truncated file is not), or :func:`unseal` refuses it.
    """
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    return unseal(payload)

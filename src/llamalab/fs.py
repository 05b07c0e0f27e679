"""Writing to the user's disk without losing anything: atomic folders and files, fsync, ownership, full disks.

Every output llamalab writes (a checkpoint, a prepared data folder, a tokenizer, a run folder, a converted
model) goes through here, so the same rules hold everywhere:

- an output appears whole or not at all: it is written beside its final place and renamed into it;
- a folder is replaced only when everything in it is of the kind being written (``owned`` patterns); a folder
  holding anything else is an error, and ``force`` writes beside those files without deleting any of them;
- written folders get the permissions the user's umask gives, not ``mkdtemp``'s 0700;
- temporary folders left by a killed writer are removed by the next write to the same place;
- a full disk is one ``DiskFullError`` naming the folder and the space needed, and the previous output stays.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError, disk_full_error, is_disk_full

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class OutputFolderError(UserError):
    """An output folder holds files that are not of the kind being written there."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID`` folders beside ``final`` whose writer process is gone
    (or that name no process: older versions wrote them without one)."""
    removed = []
    parent = final.parent
    if not parent.is_dir():
        return removed
    for marker in (_temp_prefix(final), f".{final.name}.old-"):
        for path in parent.glob(f"{marker}*"):
            pid = path.name[len(marker):].split("-")[0]
            if not pid.isdigit() or (int(pid) != os.getpid() and not _pid_alive(int(pid))):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def foreign_entries(folder: Path, owned: Iterable[str]) -> list[str]:
    """Names in ``folder`` that match none of the ``owned`` glob patterns (hidden temp names are ours too)."""
    patterns = list(owned)
    return sorted(p.name for p in folder.iterdir()
                  if not any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns))


def check_output_folder(folder: Path, owned: Iterable[str], what: str, *, force: bool = False,
                        hint: str = "choose a new or empty folder, or pass --force to write beside those files "
                                    "(none of them is deleted)") -> None:
    """Refuse to write a ``what`` into ``folder`` when it holds anything that is not of that kind."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"{folder}: exists and is not a folder; a {what} is a folder")
    if not folder.is_dir() or force:
        return
    foreign = foreign_entries(folder, owned)
    if foreign:
        shown = ", ".join(foreign[:6]) + (" ..." if len(foreign) > 6 else "")
        raise OutputFolderError(f"{folder}: not empty and not a llamalab {what} (it holds {shown}); {hint}")


def atomic_write_dir(final: Path, write: Callable[[Path], None], *, owned: Iterable[str], what: str,
                     force: bool = False, size_hint: int | None = None) -> Path:
    """Call ``write(tmpdir)``, then put the finished folder at ``final``.

    ``final`` is replaced whole when it holds only ``owned`` names; with ``force`` and foreign files present,
    the new files are moved in one by one beside them and nothing foreign is deleted.
    """
    final = Path(final)
    owned = list(owned)
    check_output_folder(final, owned, what, force=force)
    tmp = staging_dir(final)
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        if final.is_dir() and foreign_entries(final, owned):  # --force: merge, deleting nothing foreign
            merge_into(tmp, final)
        else:
            old = None
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        fsync_dir(final.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full_error(final.parent, size_hint, exc) from exc
        raise
    return final


def merge_into(src: Path, dst: Path) -> None:
    """Move every entry of the folder ``src`` into ``dst`` (replacing same-named ones), then remove ``src``;
    whatever else ``dst`` holds stays."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        _replace(entry, dst / entry.name)
    shutil.rmtree(src)
    fsync_dir(dst)


def staging_dir(final: Path) -> Path:
    """A new empty folder beside ``final`` (same file system, so ``merge_into`` renames), named as a temp
    folder of ``final`` so that a killed writer's copy is removed by the next write."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    return Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(final)}{os.getpid()}-", dir=final.parent))


def _replace(src: Path, dst: Path) -> None:
    if dst.is_dir() and not src.is_dir():
        raise OutputFolderError(f"{dst}: is a folder; cannot put the file {src.name} there")
    if src.is_dir() and dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextmanager
def atomic_file(path: str | Path, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if is_disk_full(exc):
            raise disk_full_error(path.parent, size_hint, exc) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_file(path, size_hint=len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def read_json_object(path: Path, layout: str) -> dict:
    """The JSON object in ``path``; errors name the file, the line and, for a missing file, ``layout``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; {layout}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); expected a JSON object") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got a JSON {type(data).__name__}")
    return data


def read_toml(path: Path, what: str, error: type[Exception] = UserError) -> dict:
    """The table in the TOML file ``path`` (a ``what``: "config file", "sweep file"); ``error`` names the file."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: invalid TOML: {exc}") from None

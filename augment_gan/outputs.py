"""Output folders of synth, vary and merge: the one rule for "may I write here?", and the helpers that
keep every write inside the folder.

Each command records its settings in a JSON file in the folder (`synth.json`, `vary.json`, `merge.json`).
That file is what makes a folder the command's own: only then is it resumed or, with `--overwrite`,
replaced, and replacing deletes only file names the command writes itself.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from augment_gan.atomic import write_bytes_atomic
from augment_gan.errors import UserError


def missing_folders(folder: Path) -> list[Path]:
    """The folders `folder.mkdir(parents=True)` would create, deepest first."""
    missing = []
    for path in [folder, *folder.parents]:
        if path.exists() or path.is_symlink():
            break
        missing.append(path)
    return missing


@contextlib.contextmanager
def removed_on_failure(folder: Path) -> Iterator[None]:
    """Run the block; when it raises, remove `folder` and the parents it created again, if they are still
    empty, so that a command that fails leaves the file system as it was."""
    created = missing_folders(Path(folder))
    try:
        yield
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only an empty folder: nothing written there is ever deleted here
        raise


def check_class_name(name: Any) -> str:
    """A class name is used as a folder name: reject anything that could leave the output folder."""
    if not isinstance(name, str) or not name or name in (".", "..") or "\x00" in name:
        raise UserError(f"the checkpoint's class name {name!r} is not usable as a folder name")
    if "/" in name or "\\" in name or (os.sep in name) or (os.altsep and os.altsep in name):
        raise UserError(f"the checkpoint's class name {name!r} contains a path separator")
    return name


def reserve_room(folder: Path, sizes: Iterable[int]) -> list[Path]:
    """Take disk space for files of these sizes now, in hidden `.room-<k>.tmp-<pid>` files of `folder`
    (created with its parents); deleting them gives the space back. Raises the `OSError` a real write would
    (read-only folder, full disk, file size limit), leaving nothing behind.

    The space is allocated with `posix_fallocate` (written as zeros where that does not exist), so it is
    really the file system's, not a sparse promise.
    """
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    try:
        for k, size in enumerate(sizes):
            files.append(folder / f".room-{k}.tmp-{os.getpid()}")
            fd = os.open(files[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if size and hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, size)
                else:
                    zeros = bytes(min(size, 1 << 20))
                    for start in range(0, size, len(zeros) or 1):
                        os.write(fd, zeros[:size - start])
            finally:
                os.close(fd)
    except BaseException:
        for path in files:
            path.unlink(missing_ok=True)
        raise
    return files


def check_room(folder: Path, sizes: Iterable[int] = (0,)) -> None:
    """Fail now, not after the work, when `folder` cannot take files of these sizes at once (see
    `reserve_room`; the space is given back at once)."""
    for path in reserve_room(folder, sizes):
        path.unlink(missing_ok=True)


def read_json(path: Path) -> dict[str, Any] | None:
    """A settings file's object, or None when it is missing, unreadable or not a JSON object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a settings file (indented JSON), atomically and durably."""
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def inside(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies below it (both resolved)."""
    return path == folder or folder in path.parents


def _visible_entries(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if not p.name.startswith(".") and ".tmp-" not in p.name]


def check_out_folder(out: Path, settings_name: str, *, overwrite: bool, settings: dict[str, Any] | None = None,
                     identity: Callable[[dict[str, Any]], dict[str, Any]] | None = None
                     ) -> tuple[dict[str, Any] | None, bool]:
    """May a command write into `out`? Returns (the previous settings there or None, whether to replace).

    The rule, for every command:
    - `out` is missing, or a real folder (not a symbolic link, not a file);
    - missing or empty (hidden files and temporaries aside): write;
    - holding `settings_name`, a previous output of this command: with the same `identity(settings)`
      resume it (commands that cannot resume give no `identity`); else only with `overwrite`, and then
      "replace" is True: the caller deletes the files the previous output wrote (`clear_outputs`);
    - holding anything else: never, not even with `overwrite`: nothing there is ours to replace.
    """
    what = Path(settings_name).stem
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link; give the real folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if not out.is_dir() or not _visible_entries(out):
        return None, False
    old = read_json(out / settings_name)
    if old is None:
        raise UserError(f"{out} is not empty and holds no {settings_name}, so it is not a previous {what} output; "
                        "refusing to delete or overwrite anything there (choose another --out)")
    if identity is None or settings is None:
        if not overwrite:
            raise UserError(f"{out} is not empty; pass --overwrite to replace a previous {what} output there")
        return old, True
    before, after = identity(old), identity(settings)
    if before == after:
        return old, False
    if not overwrite:
        diffs = [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in after if before.get(k) != after.get(k)]
        shown = "; ".join(d if len(d) < 120 else d[:117] + "..." for d in diffs[:3])
        raise UserError(f"{out} holds images made with other settings ({shown}); "
                        "pass --overwrite to replace them or choose another --out")
    return old, True


def clear_outputs(out: Path, owned: Callable[[str], bool], folders: Iterable[str] | None = None) -> None:
    """Delete a previous output: the files in `out` and its subfolders whose '/'-separated relative path
    `owned` accepts. Subfolders it empties go too; anything else stays.

    `folders`: the subfolders to look in (default: every one); names that are not plain folder names are
    skipped, and symbolic links are never followed.
    """
    names = [p.name for p in out.iterdir()] if folders is None else list(folders)
    for folder in [out, *(out / name for name in names if _plain_name(name))]:
        if not folder.is_dir() or folder.is_symlink():
            continue
        prefix = "" if folder == out else folder.name + "/"
        for p in folder.iterdir():
            if owned(prefix + p.name) and not (p.is_dir() and not p.is_symlink()):
                p.unlink(missing_ok=True)
        if folder != out:
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty: the user keeps what else is in there


def _plain_name(name: Any) -> bool:
    try:
        check_class_name(name)
    except UserError:
        return False
    return True


def class_folder(out: Path, name: str) -> Path:
    """Create (or reuse) the subfolder `out/name` for one class, refusing anything but a plain folder."""
    folder = out / check_class_name(name)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UserError(f"{folder} exists and is not a plain folder; refusing to write through it")
    folder.mkdir(exist_ok=True)
    return folder

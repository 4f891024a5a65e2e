"""Writes that never destroy a previous good file or folder.

The writer writes a temporary sibling of the target (same folder, so the
same filesystem), and it is swapped in only once it is complete. Any
failure (an exception, Ctrl-C) deletes the temporary and leaves what was at
the target as it was. A file is swapped with one atomic `os.replace`; a
folder with two renames (the old one away, the new one in), then the old
one is deleted.
"""

import contextlib
import json
import os
import shutil
import uuid


def _target(path):
    """The absolute path to replace (a symlink's target, not the link)."""
    return os.path.realpath(os.fspath(path))


def _sibling(target, tag, suffix=""):
    folder, base = os.path.split(target)
    return os.path.join(folder, f".{base}.{tag}-{uuid.uuid4().hex[:12]}{suffix}")


def _remove(path):
    """Delete a file or folder; a missing one is fine, other errors are not
    raised (cleanup must not hide the error that caused it)."""
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _fsync(path):
    """Flush a file, or a folder's entries, to disk where the OS allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


@contextlib.contextmanager
def replacing_file(path, suffix=""):
    """Yield a temporary path next to `path` for the caller to write.

    When the block ends without error, the written file replaces `path` in
    one `os.replace` (keeping the mode of the file it replaces); on any
    error the temporary is deleted and `path` is untouched. `suffix` ends
    the temporary name (for writers that check it, e.g. `.keras`).
    """
    target = _target(path)
    temp = _sibling(target, "tmp", suffix)
    try:
        yield temp
        _fsync(temp)
        with contextlib.suppress(OSError):
            if os.path.isfile(target):
                shutil.copymode(target, temp)
        os.replace(temp, target)
    except BaseException:
        _remove(temp)
        raise
    _fsync(os.path.dirname(target))


@contextlib.contextmanager
def replacing_folder(path, replaceable=()):
    """Yield a temporary folder path next to `path` for the caller to write
    (it does not exist yet).

    When the block ends without error, the written folder takes the place of
    `path`: a folder already there is renamed away, the new one renamed in,
    then the old one deleted. On any error the temporary is deleted and
    `path` is untouched (if renaming the new folder in fails, the old one is
    renamed back).

    A folder already at `path` is replaced as a whole, so it must be empty
    or hold only entries named in `replaceable`; anything else (or a file at
    `path`) raises a `ValueError` before the block runs.
    """
    target = _target(path)
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise ValueError(f"{str(path)!r} exists and is not a folder; nothing was written.")
        extra = sorted(set(os.listdir(target)) - set(replaceable))
        if extra:
            raise ValueError(
                f"Folder {str(path)!r} holds {', '.join(repr(e) for e in extra[:5])}"
                f"{' ...' if len(extra) > 5 else ''}, which this writer did not "
                "write; it replaces the folder as a whole and would delete them. "
                "Write to a new or empty folder, or move them away; nothing was "
                "written."
            )
    temp = _sibling(target, "tmp")
    old = None
    try:
        yield temp
        _fsync_tree(temp)
        if os.path.lexists(target):
            old = _sibling(target, "old")
            os.rename(target, old)
        try:
            os.rename(temp, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)
                old = None
            raise
    except BaseException:
        _remove(temp)
        raise
    _fsync(os.path.dirname(target))
    if old is not None:
        _remove(old)


def write_json(path, record):
    """Write `record` as indented JSON to `path` through a temporary file, so a
    failed write leaves the previous file (if any) as it was."""
    with replacing_file(path, ".json") as temp:
        with open(temp, "w") as f:
            json.dump(record, f, indent=2)

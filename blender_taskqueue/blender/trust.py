"""Whether Blender trusts a .blend to run its own scripts, decided from its path.

This is the rule a saved queue's jobs follow when the file is opened: a trusted
file's unfinished jobs may resume by themselves (with the auto-resume
preference), any other file's come back held. It mirrors Blender's own
(``WM_file_autoexec_init`` and ``BKE_autoexec_match`` in Blender 4.x/5.0):

* Auto Run Python Scripts off (``filepaths.use_scripts_auto_execute``): nothing
  is trusted.
* On: a file is trusted unless its FOLDER matches an entry of Excluded Paths
  (``preferences.autoexec_paths``, each ``(path, use_glob)``). Blender matches the
  folder part of the file path, up to and including its last separator
  (``/a/b/x.blend`` -> ``/a/b/``), and skips empty entries:

  - a glob entry is an ``fnmatch`` pattern (without FNM_PATHNAME, so ``*``
    also matches separators), case-folded on Windows;
  - any other entry is a plain string prefix of that folder (``strncmp`` with
    the entry's length; case-insensitive on Windows). It is NOT a path-component
    match: the entry ``/a/b`` excludes ``/a/bc/`` too, the entry ``/a/b/`` does not.

Where this module is unsure it is stricter than Blender, never looser: it also
matches the normalised folder (``..`` and doubled separators resolved), the
normalised entry (``~`` expanded, the trailing separator kept), both kinds of
separator on Windows, and globs against the whole file path as well as its
folder. An empty, relative or otherwise odd path (a NUL byte, say) is not
trusted: a .blend never saved has no path and cannot hold a saved queue, and
when in doubt a job is held.

No ``bpy`` here: the Blender layer gathers the preferences and calls
:func:`is_trusted`.
"""

from __future__ import annotations

import fnmatch
import ntpath
import posixpath
from collections.abc import Iterable, Sequence
from typing import Any


def is_trusted(filepath: str, auto_execute: bool, excluded: Sequence[tuple[str, bool]], windows: bool) -> bool:
    """Whether Blender's auto-run rule trusts the .blend at ``filepath``.

    Args:
        filepath: the file's absolute path (``bpy.data.filepath``); "" for a file
            never saved.
        auto_execute: Preferences > Save & Load > Auto Run Python Scripts.
        excluded: Excluded Paths, as ``(path, use_glob)`` pairs.
        windows: match as Blender on Windows does (case-insensitive, either separator).

    Returns:
        True only when auto-run is on, the path is a plain absolute one and no
        exclusion matches it. Never raises: anything unexpected means False.
    """
    try:
        return _is_trusted(filepath, auto_execute, excluded, windows)
    except Exception:  # an odd preference value or path: held
        return False


def _is_trusted(filepath: Any, auto_execute: Any, excluded: Any, windows: bool) -> bool:
    if auto_execute is not True and not (isinstance(auto_execute, int) and auto_execute == 1):
        return False
    if not isinstance(filepath, str) or not filepath or "\0" in filepath:
        return False
    paths = ntpath if windows else posixpath
    if not paths.isabs(filepath) or filepath.startswith("//"):  # "//" is Blender's relative prefix
        return False
    folders = set(_folders(filepath, windows))
    for entry in excluded:
        path, use_glob = entry
        if not isinstance(path, str):
            return False
        if not path:
            continue  # Blender skips empty entries
        if "\0" in path:
            return False
        if use_glob:
            if any(_glob(pattern, target, windows)
                   for pattern in _entry_forms(path, windows, glob=True)
                   for target in (*folders, filepath)):
                return False
        elif any(_prefix(prefix, folder, windows)
                 for prefix in _entry_forms(path, windows, glob=False) for folder in folders):
            return False
    return True


def folder_of(filepath: str, windows: bool = False) -> str:
    """The folder part of ``filepath`` as Blender matches it: everything up to and
    including the last separator (either kind, as Blender's path code looks for both)."""
    cut = max(filepath.rfind("/"), filepath.rfind("\\"))
    return filepath[: cut + 1]


def _folders(filepath: str, windows: bool) -> Iterable[str]:
    """The folder as Blender sees it, and its normalised forms."""
    paths = ntpath if windows else posixpath
    sep = "\\" if windows else "/"
    raw = folder_of(filepath, windows)
    yield raw
    posix_cut = filepath[: filepath.rfind("/") + 1]  # a "\" in a POSIX file name is a character
    if posix_cut:
        yield posix_cut
    for folder in (raw, posix_cut, paths.dirname(filepath)):
        if folder:
            normal = paths.normpath(folder)
            yield normal if normal.endswith(("/", "\\")) else normal + sep
            if windows:
                yield normal.replace("\\", "/") + "/"


def _entry_forms(path: str, windows: bool, glob: bool) -> Iterable[str]:
    """The entry as written, and normalised (``~`` expanded, ``..`` resolved) with
    its trailing separator kept, so that normalising never widens a folder entry
    to its siblings (``/a/b/`` must not come to match ``/a/bc/``)."""
    paths = ntpath if windows else posixpath
    yield path
    if glob:
        return  # a pattern is matched as written (normalising could change its meaning)
    expanded = paths.expanduser(path)
    normal = paths.normpath(expanded)
    if path.endswith(("/", "\\")) and not normal.endswith(("/", "\\")):
        normal += "\\" if windows else "/"
    yield normal
    if windows:
        yield normal.replace("\\", "/")


def _fold(text: str, windows: bool) -> str:
    return text.lower() if windows else text


def _prefix(prefix: str, folder: str, windows: bool) -> bool:
    if windows:
        # Either separator: a stricter reading than Blender's plain strncasecmp.
        return _fold(folder, True).replace("\\", "/").startswith(_fold(prefix, True).replace("\\", "/"))
    return folder.startswith(prefix)


def _glob(pattern: str, target: str, windows: bool) -> bool:
    # fnmatchcase: no os.path.normcase (the platform is a parameter here); like C's
    # fnmatch without FNM_PATHNAME, "*" matches separators too. Python's fnmatch has
    # no backslash escapes, so a Windows pattern's "\" is a literal separator.
    if windows:
        return fnmatch.fnmatchcase(_fold(target, True), _fold(pattern, True)) or fnmatch.fnmatchcase(
            _fold(target, True).replace("\\", "/"), _fold(pattern, True).replace("\\", "/"))
    return fnmatch.fnmatchcase(target, pattern)


def reset_trusted(document: Any, kind: str = "blender.render") -> int:
    """In an ``export_state()`` document from a file that is not trusted: set every
    ``trusted: true`` param of a ``kind`` job back to false, in place, so that a
    render restored from another file's queue opens its .blend with scripts off.
    Returns how many were reset. Anything that is not the expected shape is left
    for the engine's own validation."""
    jobs = document.get("jobs") if isinstance(document, dict) else None
    if not isinstance(jobs, list):
        return 0
    reset = 0
    for job in jobs:
        params = job.get("params") if isinstance(job, dict) else None
        if isinstance(params, dict) and job.get("kind") == kind and params.get("trusted") is not False \
                and "trusted" in params:
            params["trusted"] = False
            reset += 1
    return reset

"""Trust by path (blender/trust.py): the rule that decides whether a .blend's saved
queue may resume by itself, against Blender's own (WM_file_autoexec_init and
BKE_autoexec_match in Blender 5.0).

What Blender does, and these tests pin:
* Auto Run Python Scripts off: no file is trusted.
* On: Blender takes the file's FOLDER, up to and including the last separator
  (``/a/b/x.blend`` -> ``/a/b/``), and excludes the file when a non-empty entry
  of Excluded Paths matches that folder: a glob entry by fnmatch (no
  FNM_PATHNAME: ``*`` crosses separators; FNM_CASEFOLD on Windows), any other
  entry as a plain string prefix (strncmp over the entry's length; strncasecmp
  on Windows).
* So the entry ``/a/b`` excludes ``/a/bc/x.blend`` as well (``/a/bc/`` starts
  with ``/a/b``): Blender compares strings, not path components. The entry
  ``/a/b/`` (what the folder picker writes) does not.

Where unsure, the module is stricter than Blender (never looser): a property
test checks that whatever it trusts, the plain Blender rule (modelled here) trusts.

trust.py imports no bpy, but it lives in the Blender layer, whose package
imports bpy: it is loaded here by path.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(60)

_PATH = Path(__file__).resolve().parents[2] / "blender_taskqueue" / "blender" / "trust.py"
_spec = importlib.util.spec_from_file_location("taskqueue_trust_under_test", _PATH)
assert _spec is not None and _spec.loader is not None
trust = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = trust
_spec.loader.exec_module(trust)

is_trusted = trust.is_trusted


def blender_rule(filepath: str, auto: bool, excluded: list[tuple[str, bool]], windows: bool) -> bool:
    """Blender 5.0's rule as its source has it, without any of trust.py's extra care."""
    if not auto:
        return False
    cut = max(filepath.rfind("/"), filepath.rfind("\\"))
    folder = filepath[: cut + 1]
    fold = (lambda s: s.lower()) if windows else (lambda s: s)
    for path, use_glob in excluded:
        if not path:
            continue
        if use_glob:
            if fnmatch.fnmatchcase(fold(folder), fold(path)):
                return False
        elif fold(folder).startswith(fold(path)):
            return False
    return True


name = st.text(alphabet="abcxyzAB019_-. ", min_size=1, max_size=8).filter(lambda s: s.strip(". ") == s and s)
parts = st.lists(name, min_size=1, max_size=5)


def posix(comps: list[str]) -> str:
    return "/" + "/".join(comps)


# ---------------------------------------------------------------- the plain cases


def test_auto_run_on_and_no_exclusions_trusts_a_saved_file():
    assert is_trusted("/home/me/film/shot.blend", True, [], windows=False)
    assert is_trusted(r"C:\Users\me\shot.blend", True, [], windows=True)


def test_auto_run_off_trusts_nothing():
    assert not is_trusted("/home/me/film/shot.blend", False, [], windows=False)


@pytest.mark.parametrize("path", ["", "shot.blend", "film/shot.blend", "//shot.blend", "/a/b\0/x.blend"])
def test_a_file_never_saved_or_an_odd_path_is_not_trusted(path):
    assert not is_trusted(path, True, [], windows=False)


def test_a_file_in_an_excluded_folder_is_not_trusted():
    excluded = [("/home/me/Downloads/", False)]
    assert not is_trusted("/home/me/Downloads/shot.blend", True, excluded, windows=False)
    assert not is_trusted("/home/me/Downloads/deep/er/shot.blend", True, excluded, windows=False)
    assert is_trusted("/home/me/film/shot.blend", True, excluded, windows=False)


def test_empty_entries_are_skipped_as_blender_does():
    assert is_trusted("/home/me/shot.blend", True, [("", False), ("", True)], windows=False)


# ---------------------------------------------------------------- /a/b against /a/bc


def test_an_entry_without_a_trailing_slash_excludes_sibling_folders_that_share_its_prefix():
    # Blender: strncmp("/a/b", "/a/bc/", 4) == 0, so /a/bc/ is excluded by /a/b.
    assert not is_trusted("/a/bc/x.blend", True, [("/a/b", False)], windows=False)
    assert not blender_rule("/a/bc/x.blend", True, [("/a/b", False)], windows=False)
    assert not is_trusted("/a/b/x.blend", True, [("/a/b", False)], windows=False)


def test_an_entry_with_a_trailing_slash_excludes_only_that_folder_and_below():
    # Blender: "/a/bc/" does not start with "/a/b/": trusted.
    assert is_trusted("/a/bc/x.blend", True, [("/a/b/", False)], windows=False)
    assert blender_rule("/a/bc/x.blend", True, [("/a/b/", False)], windows=False)
    assert not is_trusted("/a/b/c/x.blend", True, [("/a/b/", False)], windows=False)


def test_an_entry_naming_the_file_itself_does_not_match_it_as_in_blender():
    # Blender matches the file's folder ("/a/b/"), which "/a/b/x.blend" is no prefix of.
    assert is_trusted("/a/b/x.blend", True, [("/a/b/x.blend", False)], windows=False)
    assert blender_rule("/a/b/x.blend", True, [("/a/b/x.blend", False)], windows=False)


# ---------------------------------------------------------------- globs


def test_glob_entries_match_the_folder_and_cross_separators():
    assert not is_trusted("/tmp/untrusted-1/x.blend", True, [("/tmp/untrusted*", True)], windows=False)
    assert not is_trusted("/mnt/share/dl/a/b/x.blend", True, [("*/dl/*", True)], windows=False)
    assert not is_trusted("/any/where/x.blend", True, [("*", True)], windows=False)
    assert is_trusted("/tmp/trusted/x.blend", True, [("/tmp/untrusted*", True)], windows=False)


def test_a_glob_on_file_names_is_honoured_although_blender_only_matches_folders():
    # Stricter than Blender: "*.blend" never matches a folder there, here it excludes.
    assert blender_rule("/a/x.blend", True, [("*.blend", True)], windows=False)
    assert not is_trusted("/a/x.blend", True, [("*.blend", True)], windows=False)


def test_a_glob_is_case_folded_on_windows_only():
    assert not is_trusted(r"C:\Users\Me\Downloads\x.blend", True, [(r"c:\users\*\downloads\*", True)],
                          windows=True)
    assert is_trusted("/Users/Me/Downloads/x.blend", True, [("/users/*/downloads/*", True)], windows=False)


# ---------------------------------------------------------------- Windows, normalising


def test_windows_prefixes_are_case_insensitive_and_take_either_separator():
    excluded = [(r"C:\Users\Me\Downloads" "\\", False)]
    assert not is_trusted(r"c:\users\me\downloads\x.blend", True, excluded, windows=True)
    assert not is_trusted("C:/Users/Me/Downloads/x.blend", True, excluded, windows=True)
    assert is_trusted(r"C:\Users\Me\Film\x.blend", True, excluded, windows=True)
    assert is_trusted("/home/Me/x.blend", True, [("/home/me/", False)], windows=False), "case counts on POSIX"


def test_dot_segments_and_doubled_separators_do_not_hide_a_file_from_an_exclusion():
    assert not is_trusted("/a/c/../b/x.blend", True, [("/a/b/", False)], windows=False)
    assert not is_trusted("/a//b/x.blend", True, [("/a/b/", False)], windows=False)
    assert not is_trusted("/a/b/x.blend", True, [("/a/./b/", False)], windows=False)
    # Normalising an entry keeps its trailing separator: /a/b/ never widens to /a/bc/.
    assert is_trusted("/a/bc/x.blend", True, [("/a/./b/", False)], windows=False)


def test_a_home_relative_entry_is_expanded():
    home = os.path.expanduser("~")
    if home == "~":
        pytest.skip("no home folder")
    assert not is_trusted(os.path.join(home, "dl", "x.blend"), True, [("~/dl/", False)], windows=False)


# ---------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(parts, parts, name, st.lists(st.tuples(st.text(max_size=12), st.booleans()), max_size=4), st.booleans())
def test_a_path_inside_an_excluded_folder_is_never_trusted(folder, below, filename, others, slash):
    excluded_folder = posix(folder) + ("/" if slash else "")
    filepath = posix(folder + below[:-1] + [filename + ".blend"])
    excluded = [*others, (excluded_folder, False), *others]
    assert not is_trusted(filepath, True, excluded, windows=False)
    assert not is_trusted(filepath.upper(), True, [(excluded_folder.lower(), False)], windows=True)


@settings(max_examples=300, deadline=None)
@given(parts, name, st.integers(min_value=0, max_value=4))
def test_a_glob_that_matches_the_folder_is_never_trusted(folder, filename, wild):
    filepath = posix(folder + [filename + ".blend"])
    comps = list(folder)
    comps[wild % len(comps)] = "*"
    assert not is_trusted(filepath, True, [(posix(comps) + "/*", True)], windows=False)
    assert not is_trusted(filepath, True, [(posix(comps) + "*", True)], windows=False)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.lists(st.tuples(st.text(max_size=12), st.booleans()), max_size=4), st.booleans())
def test_auto_run_off_is_never_trusted(filepath, excluded, windows):
    assert not is_trusted(filepath, False, excluded, windows=windows)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(parts.map(posix), st.text(alphabet="/\\abC.:*?[]~ ", max_size=24)),
    st.lists(st.tuples(st.one_of(parts.map(posix), st.text(alphabet="/\\abC.*?[]~ ", max_size=12)),
                       st.booleans()), max_size=4),
    st.booleans(), st.booleans(),
)
def test_never_trusts_what_blender_would_not(filepath, excluded, auto, windows):
    if is_trusted(filepath, auto, excluded, windows=windows):
        assert blender_rule(filepath, auto, excluded, windows=windows)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.integers(), st.text(), st.binary(), st.lists(st.integers())),
       st.one_of(st.none(), st.integers(), st.booleans(), st.text()),
       st.one_of(st.none(), st.integers(), st.lists(st.one_of(st.none(), st.text(), st.tuples(st.text())))))
def test_junk_never_raises_and_is_never_trusted_unless_it_is_a_plain_absolute_path(filepath, auto, excluded):
    result = is_trusted(filepath, auto, excluded, windows=False)  # type: ignore[arg-type]
    assert result in (True, False)
    if result:
        assert isinstance(filepath, str) and filepath.startswith("/") and auto in (True, 1)


# ---------------------------------------------------------------- restored renders


def test_reset_trusted_turns_off_scripts_for_restored_renders_only():
    document = {"jobs": [
        {"id": "a", "kind": "blender.render", "params": {"blend_file": "/x.blend", "trusted": True}},
        {"id": "b", "kind": "blender.render", "params": {"blend_file": "/x.blend", "trusted": "yes"}},
        {"id": "c", "kind": "blender.render", "params": {"blend_file": "/x.blend", "trusted": False}},
        {"id": "d", "kind": "blender.render", "params": {"blend_file": "/x.blend"}},
        {"id": "e", "kind": "demo.render", "params": {"trusted": True}},
        {"id": "f", "kind": "blender.render", "params": "not a dict"},
        "not a job",
    ]}
    assert trust.reset_trusted(document, "blender.render") == 2
    params = {j["id"]: j["params"] for j in document["jobs"] if isinstance(j, dict)}
    assert params["a"]["trusted"] is False and params["b"]["trusted"] is False
    assert params["c"]["trusted"] is False and "trusted" not in params["d"]
    assert params["e"]["trusted"] is True, "other kinds' params are theirs"


@pytest.mark.parametrize("document", [None, [], {}, {"jobs": None}, {"jobs": "x"}])
def test_reset_trusted_leaves_a_malformed_document_to_the_engine(document):
    assert trust.reset_trusted(document) == 0

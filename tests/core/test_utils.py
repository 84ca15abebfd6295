"""The helpers of aigc_ext.utils: one-time warnings and atomic text writes."""

from __future__ import annotations

import os
import stat
import warnings

import pytest

from aigc_ext.utils import atomic_write_text, warn_once


def _warn_here(message, **kwargs):
    return warn_once(message, **kwargs)


def test_warn_once_warns_once_per_key_in_its_own_set():
    seen: set = set()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert warn_once("first", seen=seen)
        assert not warn_once("first", seen=seen)
        assert warn_once("second text", key="k", seen=seen)
        assert not warn_once("other text, same key", key="k", seen=seen)
        other: set = set()
        assert warn_once("first", seen=other)  # another set: shown again
    assert [str(w.message) for w in record] == ["first", "second text", "first"]
    assert seen == {"first", "k"}


def test_warn_once_category_and_caller_frame():
    with pytest.warns(DeprecationWarning, match="from the caller") as record:
        warn_once("from the caller", seen=set(), category=DeprecationWarning, stacklevel=1)
    assert record[0].filename == __file__
    with pytest.warns(UserWarning) as record:
        _warn_here("one frame up", seen=set(), stacklevel=2)  # the caller of _warn_here
    assert record[0].filename == __file__


def test_atomic_write_text_replaces_and_keeps_text_as_given(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("old\n")
    assert atomic_write_text(path, "a,b\r\nc\n") == path
    assert path.read_bytes() == b"a,b\r\nc\n"  # no newline translation
    atomic_write_text(str(path), "é\n")
    assert path.read_text(encoding="utf-8") == "é\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_atomic_write_text_gives_default_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "f.json", "{}")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0o600


def test_atomic_write_text_failure_leaves_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "latest"
    path.write_text("step-1\n")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "step-\udc802\n")  # a lone surrogate cannot be encoded
    assert path.read_text() == "step-1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "f", "x")


def test_atomic_write_text_temporary_is_named_after_the_file(tmp_path, monkeypatch):
    # A crashed write leaves ".<name>-*": the checkpoint directory cleanup removes
    # ".latest-*" leftovers by that prefix.
    names = []
    real = os.replace

    def spy(src, dst):
        names.append(os.path.basename(src))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write_text(tmp_path / "latest", "step-2\n")
    assert len(names) == 1 and names[0].startswith(".latest-")

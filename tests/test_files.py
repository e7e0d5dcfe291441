"""Files the project writes for the user: atomic, so a failed write leaves the previous file intact."""

from __future__ import annotations

import os
import stat

import pytest

from utils.files import atomic_write_text, read_json, save_json


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "scores.csv"
    atomic_write_text(path, "a,b\n1,2\n")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "a,b\n\ud800,2\n")  # a lone surrogate cannot be encoded
    assert path.read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"], "a temporary file was left behind"


def test_json_round_trip_and_plain_permissions(tmp_path):
    path = save_json({"número": 1.5}, tmp_path / "sub" / "r.json")
    assert read_json(path) == {"número": 1.5}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask

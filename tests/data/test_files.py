"""Reading users' text files (UTF-8, byte-order mark, errors with file and line) and writing outputs atomically."""
from __future__ import annotations

import os

import pytest

from nnunet_contrastive.data.files import (TextFileError, atomic_copy, atomic_write_text, read_json, read_text,
                                           replaced_folder)


def test_read_text_accepts_a_byte_order_mark(tmp_path):
    path = tmp_path / "Info.cfg"
    path.write_bytes(b"\xef\xbb\xbfED: 1\r\nES: 12\r\n")
    assert read_text(str(path)).splitlines() == ["ED: 1", "ES: 12"]


@pytest.mark.parametrize("data, line, column", [(b"a\nb\nc\xe9t\n", 3, 2), (b"\xef\xbb\xbf\xff", 1, 1),
                                                (b"ok\n\x81", 2, 1)])
def test_read_text_names_file_line_and_column_of_a_non_utf8_byte(tmp_path, data, line, column):
    path = tmp_path / "metadata.csv"
    path.write_bytes(data)
    with pytest.raises(TextFileError) as e:
        read_text(str(path))
    assert f"{path}, line {line}: byte" in str(e.value) and f"column {column} " in str(e.value)
    assert "UTF-8" in str(e.value)


def test_read_json_names_line_and_column_and_uses_the_callers_error(tmp_path):
    class MyError(TextFileError):
        pass

    path = tmp_path / "override.json"
    path.write_text('{\n  "a": 1,\n  "b": }\n')
    with pytest.raises(MyError, match=r"override\.json, line 3, column 8: not valid JSON.*Fix me"):
        read_json(str(path), MyError, fix="Fix me.")
    with pytest.raises(MyError, match="cannot be read"):
        read_json(str(tmp_path / "missing.json"), MyError)


def test_atomic_writes_keep_the_old_file_when_they_fail(tmp_path):
    path = tmp_path / "splits_final.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_text(str(path), 123)  # fails while writing
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["splits_final.json"]
    with pytest.raises(FileNotFoundError):
        atomic_copy(str(tmp_path / "missing.csv"), str(path))
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["splits_final.json"]
    atomic_write_text(str(path), "new")
    assert path.read_text() == "new"


def test_replaced_folder_swaps_only_on_success(tmp_path):
    target = tmp_path / "nnUNetPlans_2d_unlabeled"
    target.mkdir()
    (target / "old.pkl").write_text("old")
    with pytest.raises(RuntimeError):
        with replaced_folder(str(target)) as tmp:
            (open(os.path.join(tmp, "new.pkl"), "w")).close()
            raise RuntimeError("case 3 failed")
    assert os.listdir(tmp_path) == ["nnUNetPlans_2d_unlabeled"] and os.listdir(target) == ["old.pkl"]
    with replaced_folder(str(target)) as tmp:
        (open(os.path.join(tmp, "new.pkl"), "w")).close()
    assert os.listdir(tmp_path) == ["nnUNetPlans_2d_unlabeled"] and os.listdir(target) == ["new.pkl"]

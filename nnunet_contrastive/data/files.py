"""Reading users' text files and writing our outputs so that a failure never destroys an earlier output.

Reading: `read_text` decodes UTF-8 and accepts a byte-order mark (editors on Windows write one, e.g. into ACDC's
`Info.cfg` or an exported `metadata.csv`); a byte that is not UTF-8 raises an error naming the file, line and
column. `read_json` adds JSON parsing with the line and column of a syntax error.

Writing: every output is written to a temporary sibling and renamed over the old one at the end (`os.replace` is
atomic on one file system): a command that fails half-way leaves the previous output byte-identical.
`replaced_file` and `replaced_folder` do this for files and folders; `atomic_write_text`, `atomic_write_json`
and `atomic_copy` use the first.
"""
from __future__ import annotations

import codecs
import json
import os
import shutil
import uuid
from contextlib import contextmanager

from nnunet_contrastive.errors import UserInputError


class TextFileError(UserInputError):
    """A text file that cannot be read or decoded; the message names the file and line."""


def _decode_error_position(data: bytes, offset: int) -> tuple[int, int]:
    """1-based (line, column) of byte `offset`."""
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return line, column


def read_text(path: str, error: type[UserInputError] = TextFileError) -> str:
    """The file's text (UTF-8, a leading byte-order mark is dropped); `error` names the file and line if it
    cannot be read or decoded."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise error(f"cannot be read ({e.strerror or e}).", where=path) from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, column = _decode_error_position(data, e.start)
        raise error(f"byte 0x{data[e.start]:02x} at column {column} is not UTF-8 text.", where=f"{path}, line {line}",
                    fix="Save the file as UTF-8 (e.g. 'iconv -f latin1 -t utf-8 OLD > NEW', or 'Save as UTF-8' in "
                        "an editor or spreadsheet program).") from None


def read_json(path: str, error: type[UserInputError] = TextFileError, fix: str | None = None):
    """Parsed JSON of a UTF-8 file (BOM accepted); `error` names the file, line and column of a syntax error."""
    text = read_text(path, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"not valid JSON ({e.msg}).", where=f"{path}, line {e.lineno}, column {e.colno}",
                    fix=fix) from None


def _temporary_sibling(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.partial-{uuid.uuid4().hex[:8]}")


@contextmanager
def replaced_file(path: str):
    """Yield a temporary sibling of `path` to write; when the block succeeds it replaces `path`, when it fails it
    is deleted and `path` is untouched."""
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> str:
    """Write `text` (UTF-8) to `path` through a temporary sibling; the old file stays intact on any failure."""
    with replaced_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return path


def atomic_write_json(path: str, obj, indent: int = 1) -> str:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_copy(src: str, dst: str) -> str:
    """Copy `src` to `dst` through a temporary sibling of `dst`."""
    with replaced_file(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


@contextmanager
def replaced_folder(target: str):
    """Yield an empty temporary sibling of `target`; when the block succeeds it replaces `target`, when it fails
    it is deleted and `target` is untouched."""
    tmp = _temporary_sibling(target)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.lexists(target):
            old = tmp + ".old"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

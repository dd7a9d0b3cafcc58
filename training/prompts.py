"""Prompt lists on disk: what the Wan world's prompt store is encoded from.

Formats, chosen by the file's extension (or ``fmt``):

- text (``.txt``, ``.text``, ``.prompts``): one prompt a line (the official ``vidprom_filtered_extended.txt``);
- CSV / TSV (``.csv``, ``.tsv``): the first row is a header; the prompt is the column named ``column`` when
  given, else the first of ``prompt``, ``text``, ``caption`` (case-insensitive), else the first column;
- JSON Lines (``.jsonl``, ``.ndjson``): one object a line with a ``prompt``, ``text`` or ``caption`` key (or
  ``column``), or one JSON string a line.

Surrounding whitespace is stripped and empty prompts (blank lines, empty cells) are skipped. Bad input raises
``PromptFileError`` naming the file and the line.
"""

from __future__ import annotations

import csv
import json
import os

PROMPT_KEYS = ("prompt", "text", "caption")
FORMATS = {".txt": "text", ".text": "text", ".prompts": "text", ".csv": "csv", ".tsv": "tsv",
           ".jsonl": "jsonl", ".ndjson": "jsonl"}


class PromptFileError(ValueError):
    """A prompt list that cannot be read: ``path`` and (when known) the 1-based ``line``."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line = path, line
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


def prompt_format(path: str, fmt: str | None = None) -> str:
    if fmt is not None:
        if fmt not in ("text", "csv", "tsv", "jsonl"):
            raise ValueError(f"unknown prompt-list format {fmt!r}; use text, csv, tsv or jsonl")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise PromptFileError(path, None, f"unknown prompt-list extension {ext or '(none)'!r}; use "
                              f"{', '.join(sorted(FORMATS))} or name the format (text, csv, tsv, jsonl)")
    return FORMATS[ext]


def _lines(path: str):
    """(1-based line number, text) of a UTF-8 file (a leading BOM is dropped), decoding errors with the line."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError as e:
        raise PromptFileError(path, None, "no such file") from e
    except IsADirectoryError as e:
        raise PromptFileError(path, None, "is a folder, not a prompt list") from e
    with fh:
        for number, raw in enumerate(fh, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PromptFileError(path, number, f"not UTF-8 text ({e.reason} at byte {e.start}); "
                                      "save the prompt list as UTF-8") from e


def _read_text(path: str) -> list[str]:
    out = []
    for number, line in _lines(path):
        if "\x00" in line:
            raise PromptFileError(path, number, "holds a NUL byte: a binary file, not a text prompt list")
        line = line.strip()
        if line:
            out.append(line)
    return out


def _read_table(path: str, delimiter: str, column: str | None) -> list[str]:
    lines = _lines(path)
    state = {"line": 0}

    def numbered():
        for number, text in lines:
            state["line"] = number
            yield text

    reader = csv.reader(numbered(), delimiter=delimiter)
    out: list[str] = []
    try:
        header = next(reader, None)
        if header is None:
            return out
        names = [h.strip().lower() for h in header]
        if column is not None:
            if column.lower() not in names:
                raise PromptFileError(path, 1, f"no column named {column!r}; the header is {header}")
            col = names.index(column.lower())
        else:
            col = next((names.index(k) for k in PROMPT_KEYS if k in names), 0)
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if col >= len(row):
                raise PromptFileError(path, state["line"], f"row has {len(row)} column(s); the prompt is column "
                                      f"{col + 1} ({header[col]!r})")
            text = row[col].strip()
            if text:
                out.append(text)
    except csv.Error as e:
        raise PromptFileError(path, state["line"], f"malformed {'TSV' if delimiter == chr(9) else 'CSV'}: {e}") from e
    return out


def _read_jsonl(path: str, column: str | None) -> list[str]:
    keys = (column,) if column is not None else PROMPT_KEYS
    out = []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(path, number, f"not valid JSON ({e.msg} at column {e.colno})") from e
        if isinstance(item, dict):
            key = next((k for k in keys if k in item), None)
            if key is None:
                raise PromptFileError(path, number, f"the object has no {' / '.join(repr(k) for k in keys)} key "
                                      f"(keys: {sorted(item)[:8]})")
            item = item[key]
        if not isinstance(item, str):
            raise PromptFileError(path, number, f"the prompt must be a string, got {type(item).__name__}")
        text = item.strip()
        if text:
            out.append(text)
    return out


def read_prompts(path: str, fmt: str | None = None, column: str | None = None) -> list[str]:
    """The prompts of a text, CSV/TSV or JSON Lines file, in file order (see the module docstring)."""
    kind = prompt_format(path, fmt)
    if kind == "text":
        if column is not None:
            raise ValueError("column applies to CSV, TSV and JSON Lines prompt lists, not to plain text")
        prompts = _read_text(path)
    elif kind in ("csv", "tsv"):
        prompts = _read_table(path, "," if kind == "csv" else "\t", column)
    else:
        prompts = _read_jsonl(path, column)
    if not prompts:
        raise PromptFileError(path, None, "holds no prompts")
    return prompts

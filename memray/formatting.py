"""How numbers and query results are written for people: tables, CSV, JSON, the CLI and the report."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re

# What a terminal acts on instead of showing: C0 controls (ESC starts an escape sequence, BEL rings),
# DEL, C1 controls (0x9b is a one-byte CSI), and the bidirectional overrides that reorder what is shown.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """`text` safe to write to a terminal: control characters shown escaped (`\\x1b`, `\\n`, `\\u202e`)."""
    pattern = _CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL
    return pattern.sub(lambda found: _escape(found.group()), text)


def _escape(char: str) -> str:
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    return f"\\x{ord(char):02x}" if ord(char) <= 0xFF else f"\\u{ord(char):04x}"


class PrintableFormatter(logging.Formatter):
    """A log formatter whose lines never carry a control character to the terminal (ids and paths are data)."""

    def format(self, record: logging.LogRecord) -> str:
        """The formatted record, control characters escaped (newlines of tracebacks kept)."""
        return printable(super().format(record), keep_newlines=True)


def log_to_stderr(level: int = logging.WARNING, fmt: str = "%(message)s") -> None:
    """Send log records to stderr through PrintableFormatter, unless logging is configured already."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(PrintableFormatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)


def format_value(value) -> str:
    """A catalog value in a line of text: 4 significant digits, lists by their length, - for NULL."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return f"[{len(value)} values]"
    return str(value)


def format_number(value) -> str:
    """A number in the HTML report: thousands grouped, 4 significant digits, yes/no for booleans, – for NULL."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def _text_value(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes):  # replicas_png: a size, not a screenful of binary
        return f"<{len(value)} bytes>"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_table(table, fmt: str = "table", *, escape: bool = False) -> str:
    """A query result as text: `table` (aligned columns), `csv` (with header) or `json` (records).

    A table shows control characters escaped (it is for people); JSON escapes them anyway; CSV keeps
    them unless `escape` (CSV bound for a terminal rather than a file).
    """
    names = table.column_names
    records = table.to_pylist()
    if fmt == "json":
        return json.dumps([_json_value(r) for r in records], default=str, allow_nan=False)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        shown = printable if escape else str
        writer.writerow([shown(n) for n in names])
        for r in records:
            writer.writerow(["" if r[n] is None else shown(str(r[n])) for n in names])
        return out.getvalue()
    if fmt == "table":
        import pyarrow as pa  # only here: `memray --help` and the formatting of a number need no Arrow

        cells = [[printable(_text_value(r[n])) for n in names] for r in records]
        names = [printable(n) for n in names]
        numeric = [
            pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) for t in table.schema.types
        ]
        widths = [max([len(n)] + [len(row[i]) for row in cells]) for i, n in enumerate(names)]

        def line(values):
            return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

        lines = [line(names), "  ".join("-" * w for w in widths)]
        lines += [line(row) for row in cells]
        lines.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
        return "\n".join(lines)
    raise ValueError(f"unknown format {fmt!r}; expected table, csv or json")

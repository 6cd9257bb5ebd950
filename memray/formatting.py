"""How numbers and query results are written for people: tables, CSV, JSON, the CLI and the report."""

from __future__ import annotations

import csv
import io
import json
import math

import pyarrow as pa


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


def format_table(table: pa.Table, fmt: str = "table") -> str:
    """A query result as text: `table` (aligned columns), `csv` (with header) or `json` (records)."""
    names = table.column_names
    records = table.to_pylist()
    if fmt == "json":
        return json.dumps([_json_value(r) for r in records], default=str, allow_nan=False)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        for r in records:
            writer.writerow(["" if r[n] is None else r[n] for n in names])
        return out.getvalue()
    if fmt == "table":
        cells = [[_text_value(r[n]).replace("\n", "\\n") for n in names] for r in records]
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

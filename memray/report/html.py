"""The HTML report of a catalog: one self-contained file (inline CSS, images as data: URIs, no script).

Sections: summary (models, verdicts, runs, errors, UNet cost), score distributions per checkpoint,
the most memorized images of one model with their replicas, the figure-14 error distributions of
its top image, and the changes since the previous checkpoint. Captions, ids, prompts and error
messages come from scraped data or users: every one goes through `html.escape`, and the page's
Content-Security-Policy forbids scripts and every request, so a missed escape still runs nothing.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import os
import re

from memray.catalog.cascade import cascade_summary
from memray.catalog.compare import Comparison, compare_models
from memray.catalog.files import write_bytes
from memray.catalog.policy import ComparePolicy
from memray.catalog.reader import Catalog
from memray.catalog.report_queries import ReportData, report_data
from memray.errors import CatalogQueryError
from memray.formatting import format_number
from memray.report.plots import error_cdfs_png, score_distributions_png

MAX_DISTRIBUTIONS = 12  # checkpoints drawn, newest first
MAX_LISTED = 20  # runs, errors and image ids listed before "... more"
MAX_CHANGES = 50

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1d2330; background: #f4f5f7; margin: 0; }
main { max-width: 1160px; margin: 0 auto; padding: 16px 24px 48px; }
header { background: #1d2330; color: #fff; padding: 18px 24px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: #c9cfdb; overflow-wrap: anywhere; }
nav { margin: 12px 0 0; }
nav a { color: #9ec3ff; margin-right: 16px; text-decoration: none; }
section { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: 4px 20px 16px; margin: 16px 0; }
h2 { font-size: 18px; border-bottom: 1px solid #e6e9ef; padding-bottom: 6px; }
h3 { font-size: 15px; margin: 18px 0 4px; }
table { border-collapse: collapse; width: 100%; margin: 8px 0; font-size: 13px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eceef3; vertical-align: top; }
th { background: #f0f2f6; font-weight: 600; }
td.text { overflow-wrap: anywhere; min-width: 7em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.strip td { border-bottom: 2px solid #dde1e8; padding-bottom: 10px; }
img { max-width: 100%; height: auto; }
img.strip { image-rendering: pixelated; border: 1px solid #dde1e8; }
.muted { color: #667085; }
.caption { color: #475467; font-size: 13px; }
.verdict { border-radius: 3px; padding: 1px 6px; font-size: 12px; white-space: nowrap; }
.memorized { background: #fde2e1; color: #a4161a; }
.not_memorized { background: #dff3e4; color: #1e6b35; }
.inconclusive { background: #fff1c2; color: #7a5a00; }
.violation { color: #a4161a; font-weight: 600; }
.passed { color: #1e6b35; font-weight: 600; }
code { font-size: 12px; background: #f0f2f6; padding: 0 3px; border-radius: 3px; }
"""
# No script, no request of any kind: inline styles and data: images only.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class _Html(str):
    """A fragment built here from escaped parts: inserted as is, where any other value is escaped."""


def _e(value) -> _Html:
    if isinstance(value, _Html):
        return value
    # NUL and other control characters in scraped text would reach the page raw: replace them.
    text = "–" if value is None else _CONTROL.sub("\ufffd", str(value))
    return _Html(html.escape(text))


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _when(iso: str | None) -> str | None:
    """An ISO timestamp of the catalog (UTC) without its T and offset, for tables."""
    return iso.replace("T", " ").removesuffix("+00:00") if iso else iso


def _cell(value) -> str:
    """A table cell: numbers right-aligned, text escaped and free to wrap, fragments as they are."""
    if isinstance(value, (int, float)):
        return f'<td class="num">{format_number(value)}</td>'
    if isinstance(value, _Html):
        return f"<td>{value}</td>"
    return f'<td class="text">{_e(value)}</td>'


def _table(headers: list[str], rows: list) -> _Html:
    """A table; each row a list of cell values, or a fragment holding a whole <tr>."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(r if isinstance(r, _Html) else "<tr>" + "".join(map(_cell, r)) + "</tr>" for r in rows)
    return _Html(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _img(png: bytes, alt: str, css: str = "") -> _Html:
    data = base64.b64encode(png).decode("ascii")
    return _Html(f'<img class="{css}" alt="{_e(alt)}" src="data:image/png;base64,{data}">')


def _verdict(verdict: str | None) -> _Html:
    return _Html(f'<span class="verdict {_e(verdict)}">{_e(verdict)}</span>')


def _p(text, css: str = "") -> _Html:
    return _Html(f'<p class="{css}">{_e(text)}</p>')


def _more(shown: int, total: int, what: str) -> _Html:
    return _p(f"(the first {shown} of {total} {what})", "muted") if total > shown else _Html("")


def _section(anchor: str, title: str, *parts: _Html) -> _Html:
    return _Html(f'<section id="{anchor}"><h2>{_e(title)}</h2>{"".join(parts)}</section>')


# -- sections -----------------------------------------------------------------------------------


def _summary(data: ReportData, models: list[dict]) -> _Html:
    total = {k: sum(m[k] or 0 for m in models) for k in ("rows", "images", "error_rows", "unet_forwards", "seconds")}
    backwards = sum(m["unet_backwards"] or 0 for m in models)
    overview = _p(
        f"{len(models)} models, {format_number(total['images'])} images audited ok, {format_number(total['rows'])} rows, "
        f"{format_number(total['error_rows'])} of them errors; UNet evaluations: {format_number(total['unet_forwards'])} forward, "
        f"{format_number(backwards)} backward, {format_number(total['seconds'])} s."
    )
    model_table = _table(
        ["model", "images", "memorized", "not memorized", "inconclusive", "error rows", "runs", "last audited (UTC)"]
        + ["UNet forwards", "UNet backwards", "seconds"],
        [
            [m["model"], m["images"], m["memorized"], m["not_memorized"], m["inconclusive"], m["error_rows"]]
            + [m["runs"], _when(m["last_audited"]), m["unet_forwards"], m["unet_backwards"], m["seconds"]]
            for m in models
        ],
    )
    names = {m["model"] for m in models}
    runs = [r for r in data.runs if r["model"] in names]
    run_table = _table(
        ["run", "model", "started (UTC)", "finished (UTC)", "rows", "errors", "UNet evaluations"],
        [
            [r["run_id"], r["model"], _when(r["started"]), _when(r["finished"]), r["rows"], r["errors"]]
            + [r["unet_evaluations"]]
            for r in runs[:MAX_LISTED]
        ],
    )
    errors = [r for r in data.errors if r["model"] in names]
    error_part = (
        _p(f"Images with no ok row under their model: {len(errors)}. The newest error of each:")
        + _table(
            ["model", "image", "audited at (UTC)", "error"],
            [[r["model"], r["image_id"], _when(r["audited_at"]), r["error"]] for r in errors[:MAX_LISTED]],
        )
        + _more(MAX_LISTED, len(errors), "images")
        if errors
        else _p("Every audited image has an ok row.", "muted")
    )
    return _section(
        "summary",
        "Summary",
        overview,
        model_table,
        _Html("<h3>Runs</h3>"),
        run_table,
        _more(MAX_LISTED, len(runs), "runs"),
        _Html("<h3>Errors</h3>"),
        _Html(error_part),
    )


def _cascade(summaries: list) -> _Html:
    """Per model with a cascade run: what the screen flagged, what stage 2 confirmed, and the recall."""
    if not summaries:
        return _section(
            "cascade", "Cascade", _p("No cascade ran on these models (every image got the full chain).", "muted")
        )
    table = _table(
        ["model", "run", "screened", "flagged", "confirmed", "calibration sample", "memorized (screen / calibration / request)"],
        [
            [c.model, c.run_id, c.screened, c.flagged, c.flagged_confirmed,
             f"{c.calibration_confirmed} of {c.cleared} cleared",
             f"{c.memorized_by_screen} / {c.memorized_in_calibration} / {c.memorized_on_request}"]
            for c in summaries
        ],
    )  # fmt: skip
    statements = "".join(_p(f"{c.model}: screen {c.recall.statement()}") for c in summaries)
    return _section("cascade", "Cascade", table, _Html(statements))


def _value_range(values: list[float]) -> tuple[float, float] | None:
    return (min(values), max(values)) if values else None


def _distributions(data: ReportData, models: list[dict]) -> _Html:
    shown = [m["model"] for m in models[:MAX_DISTRIBUTIONS]]
    scores = [data.scores[name] for name in shown]
    # One x range for every checkpoint, so their histograms compare at a glance.
    kl_range = _value_range([v for s in scores for v in s.invmm_kl])
    shift_range = _value_range([v for s in scores for v in s.shift_sd])
    parts = [
        _p(
            "Per checkpoint (newest first), over its latest ok row per image: the InvMM KL of the images "
            "InvMM replicated (lower = more memorized), the images it never replicated (censored: no KL) "
            "as a separate bar, and the Wasserstein error shift in standard deviations where it was measured. "
            "All checkpoints share the x axes.",
            "caption",
        )
    ]
    for name, s in zip(shown, scores):
        png = score_distributions_png(s.invmm_kl, s.censored, s.shift_sd, kl_range=kl_range, shift_range=shift_range)
        parts += [
            _Html(f"<h3>{_e(name)}</h3>"),
            _p(f"{len(s.invmm_kl)} replicated, {s.censored} never replicated, {len(s.shift_sd)} with a shift", "muted"),
            _img(png, f"score distributions of {name}"),
        ]
    if len(models) > len(shown):
        parts.append(_p(f"({len(models) - len(shown)} older checkpoints not drawn)", "muted"))
    if not models:
        parts.append(_p("The catalog has no rows.", "muted"))
    return _section("distributions", "Score distributions per checkpoint", *parts)


def _memorized(data: ReportData) -> _Html:
    title = f"Most memorized images: {data.model}" if data.model else "Most memorized images"
    if not data.top:
        return _section("memorized", title, _p(f"No ok rows for model {data.model}.", "muted"))
    headers = [
        "#",
        "image",
        "caption",
        "verdict",
        "unprompted",
        "InvMM KL",
        "similarity / bar",
        "guidance",
        "readable prompt",
        "M4 shift",
    ]
    rows = []
    for rank, r in enumerate(data.top, 1):
        censored = r["invmm_kl"] is None and r["invmm_replicated"] is False
        similarity, bar = r["invmm_similarity"], r["replication_threshold"]
        rate = r["uncond_replication_rate"]
        cells = [rank, r["image_id"], r["caption"], _verdict(r["verdict"]), None if rate is None else f"{rate:.1%}"]
        cells += ["censored" if censored else r["invmm_kl"]]
        cells += [
            f"{format_number(similarity)} / {format_number(bar)} ({r['similarity_kind']})"
            if similarity is not None
            else None
        ]
        prompt = r["invmm_prompt"]
        if prompt is not None and r["invmm_prompt_replicated"] is not None:
            prompt += " (replicates)" if r["invmm_prompt_replicated"] else " (does not replicate alone)"
        shift = r["err_shift_relative"]
        if rate:  # the model replicates it unprompted: M4's safe-model premise fails for this image
            shift_text = "void (replicated unprompted)"
        else:
            shift_text = None if shift is None else f"{shift:+.0%} ({format_number(r['wasserstein_shift_sd'])} sd)"
        cells += [r["invmm_guidance"], prompt, shift_text]
        strip = (
            _img(r["replicas_png"], f"target and replicas of {r['image_id']}", "strip")
            if r["replicas_png"]
            else _p("no replicas: InvMM did not replicate this image, or its row predates replicas", "muted")
        )
        rows += [cells, _Html(f'<tr class="strip"><td></td><td colspan="{len(headers) - 1}">{strip}</td></tr>')]
    caption = _p(
        "Ranked by the share of the model's empty-prompt samples that replicate the image (unprompted), "
        "then by InvMM KL among the images InvMM replicated (lowest first), then by the M4 shift. "
        "Similarity / bar: the replica's similarity and the bar this image sets (its nulls). "
        "Readable prompt: the argmax tokens of InvMM's prompt distribution, and whether that prompt "
        "replicates on its own. M4 shift: the share of the unconditional error the inverted prompt removes. "
        "Under each image: the target as the model sees it (its encoded and decoded pixels), then "
        "replicas generated from its inverted noise distribution and prompt at the guidance shown.",
        "caption",
    )
    return _section("memorized", title, caption, _table(headers, rows))


def _error_distributions(data: ReportData) -> _Html:
    title = "Unconditional vs inverted-prompt error distributions (paper figure 14)"
    q = data.error_quantiles
    if q is None:
        return _section(
            "error-distributions",
            title,
            _p(
                f"No ok row of {data.model} has the error quantiles (no Wasserstein measure, or rows older than them).",
                "muted",
            ),
        )
    label = f"{q['image_id']}: W1 = {format_number(q['wasserstein'])}, shift = {format_number(q['wasserstein_shift_sd'])} sd"
    png = error_cdfs_png(q["err_uncond_quantiles"], q["err_cond_quantiles"], title=label)
    return _section(
        "error-distributions",
        title,
        _p(f"Image {q['image_id']} ({q['caption'] or 'no caption'}), the most memorized one that has them."),
        _img(png, f"error distributions of {q['image_id']}"),
        _p(
            "Empirical CDFs drawn as steps through the 101 stored quantiles (0%, 1%, ..., 100%) of the "
            "z0-prediction error L(x0, eps, e) over noises eps ~ N(0, I), the same noises for both: "
            'the unconditional model (e = "") against the inverted prompt e*. The further the inverted '
            "prompt's curve lies to the left, the more the prompt alone explains the image.",
            "caption",
        ),
    )


def _changes(comparison: Comparison | None, new: str | None, why_not: str) -> _Html:
    if comparison is None:
        return _section("changes", "Changes since the previous checkpoint", _p(why_not, "muted"))
    c = comparison.counts
    counts = _table(
        ["compared", f"only in {comparison.base}", f"only in {new}", "newly memorized", "no longer memorized"]
        + ["newly replicated", "KL regressions", "shift regressions", "config differs"],
        [
            [c["compared"], c["only_in_base"], c["only_in_new"], c["newly_memorized"], c["no_longer_memorized"]]
            + [c["newly_replicated"], c["kl_regression"], c["shift_regression"], c["config_differs"]]
        ],
    )
    verdict = (
        "".join(_p(f"VIOLATION: {v}", "violation") for v in comparison.violations)
        if comparison.violations
        else _p("policy: passed", "passed")
    )
    warnings = "".join(_p(f"warning: {w}", "muted") for w in comparison.warnings)
    regressions = [r for r in comparison.changes.to_pylist() if r["regressions"]]
    listing = (
        _table(
            ["image", "regressions", "verdict", "InvMM KL", "KL change", "shift (sd)"],
            [
                [r["image_id"], ", ".join(r["regressions"]), f"{r['base_verdict']} → {r['new_verdict']}"]
                + [f"{format_number(r['base_invmm_kl'])} → {format_number(r['new_invmm_kl'])}", r["invmm_kl_change"]]
                + [f"{format_number(r['base_shift_sd'])} → {format_number(r['new_shift_sd'])}"]
                for r in regressions[:MAX_CHANGES]
            ],
        )
        + _more(MAX_CHANGES, len(regressions), "regressions")
        if regressions
        else _p("No image regressed.", "muted")
    )
    only = comparison.only_in_base
    missing = (
        _p(
            f"Audited ok under {comparison.base} only ({len(only)}): {', '.join(only[:MAX_LISTED])}"
            + (", ..." if len(only) > MAX_LISTED else ""),
            "muted",
        )
        if only
        else ""
    )
    return _section(
        "changes",
        f"Changes since the previous checkpoint: {comparison.base} → {new}",
        counts,
        _Html(verdict + warnings),
        _Html("<h3>Regressions</h3>"),
        _Html(listing),
        _Html(missing),
    )


# -- the page -----------------------------------------------------------------------------------


def _comparison(catalog: Catalog, data: ReportData, base: str | None, policy) -> tuple[Comparison | None, str]:
    """The comparison of `base` (default: the model audited before) with the ranked model, or why there is none."""
    new = data.model
    if new is None:
        return None, "The catalog has no rows."
    if not any(m["model"] == new and m["images"] for m in data.models):
        return None, f"{new} has no ok rows: nothing to compare."
    base = base or data.previous
    if base is None:
        return None, f"No model with ok rows was audited before {new}: nothing to compare it with."
    return compare_models(catalog, base, new, policy), ""


def render_report(
    catalog_url,
    *,
    models=None,
    base=None,
    new=None,
    top: int = 10,
    policy: ComparePolicy | None = None,
    comparison: Comparison | None = None,
) -> str:
    """The report as one HTML page: `new` (default: the newest model) ranked and compared; `models` limits the tables.

    A caller that has compared base and new already (the nightly job) passes its `comparison`.
    """
    catalog = Catalog(catalog_url)
    data = report_data(catalog, model=new, top=top)
    known = [m["model"] for m in data.models]
    unknown = [name for name in [*(models or []), new, base] if name is not None and name not in known]
    if unknown:
        raise CatalogQueryError(
            f"model(s) {', '.join(map(repr, unknown))} not in catalog {catalog.url}; models: {', '.join(known) or 'none'}"
        )
    shown = [m for m in data.models if models is None or m["model"] in models]
    why_not = ""
    if comparison is None:
        comparison, why_not = _comparison(catalog, data, base, policy or ComparePolicy())
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    nav = "".join(
        f'<a href="#{anchor}">{label}</a>'
        for anchor, label in [
            ("summary", "Summary"),
            ("cascade", "Cascade"),
            ("distributions", "Distributions"),
            ("memorized", "Most memorized"),
            ("error-distributions", "Error distributions"),
            ("changes", "Changes"),
        ]
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>memray report: {_e(catalog.url)}</title><style>{_CSS}</style></head>\n<body>"
        f"<header><h1>memray report</h1><p>catalog {_e(catalog.url)} · generated {stamp}</p><nav>{nav}</nav></header>"
        "<main>"
        + _summary(data, shown)
        + _cascade([c for c in (cascade_summary(catalog, model=m["model"]) for m in shown) if c is not None])
        + _distributions(data, shown)
        + _memorized(data)
        + _error_distributions(data)
        + _changes(comparison, data.model, why_not)
        + "</main></body></html>\n"
    )


def write_report(
    catalog_url,
    out_path,
    *,
    models=None,
    base=None,
    new=None,
    top: int = 10,
    policy: ComparePolicy | None = None,
    comparison: Comparison | None = None,
) -> str:
    """Write the HTML report of the catalog to a local path or fsspec URL; returns it as given."""
    page = render_report(catalog_url, models=models, base=base, new=new, top=top, policy=policy, comparison=comparison)
    write_bytes(out_path, page.encode("utf-8"))
    return os.fspath(out_path)

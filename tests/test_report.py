"""The HTML report: sections, escaping of scraped text, self-containment, object storage, a real browser."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from memray import nightly
from memray.catalog.schema import AuditRow
from memray.catalog.writer import CatalogWriter
from memray.cli import main
from memray.data.images import image_row_png
from memray.errors import CatalogQueryError
from memray.report.html import write_report

pytest_plugins = ["s3server"]
OLD, NEW = "ckpt-001", "ckpt-002"
SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
SECTIONS = ("summary", "cascade", "distributions", "memorized", "error-distributions", "changes")
CHROMIUM = "/usr/bin/chromium"


def strip_png(seed: int, replicas: int = 4) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return image_row_png([torch.rand(3, 32, 32, generator=gen) * 2 - 1 for _ in range(replicas + 1)], height=64)


def quantiles(center: float) -> list[float]:
    return np.quantile(np.random.default_rng(int(center * 10)).normal(center, 1, 200), np.linspace(0, 1, 101)).tolist()


def row(image_id: str, model: str, kl: float | None, **extra) -> AuditRow:
    """An ok row: `kl` None means InvMM never replicated the image (censored)."""
    day = "2026-11-01" if model == OLD else "2026-11-02"
    values = dict(
        image_id=image_id,
        model=model,
        model_fingerprint=f"fp-{model}",
        config_hash="cfg",
        run_id=f"run-{model}",
        audited_at=f"{day}T00:00:00+00:00",
        caption=f"a photo of {image_id}",
        invmm_kl=kl,
        invmm_replicated=kl is not None,
        invmm_similarity=0.9 if kl is not None else 0.1,
        invmm_guidance=3.0 if kl is not None else None,
        invmm_prompt="tiny words" if kl is not None else None,
        replicas_png=strip_png(len(image_id)) if kl is not None else None,
        wasserstein_shift_sd=2.5,
        verdict="memorized" if kl is not None and kl <= 0.5 else "not_memorized",
        similarity_kind="sscd",
        unet_forwards=1000,
        unet_backwards=100,
        seconds=2.0,
    )
    return AuditRow(**{**values, **extra})


def catalog_rows() -> list[AuditRow]:
    evil = dict(
        caption=SCRIPT, invmm_prompt=SCRIPT, err_uncond_quantiles=quantiles(20), err_cond_quantiles=quantiles(17)
    )
    return [
        row("cat", OLD, 2.0),
        row("dog", OLD, None),
        row(IMG, OLD, None, caption=SCRIPT),
        row("cat", NEW, 1.5),
        row("dog", NEW, None),
        row(IMG, NEW, 0.05, **evil),  # newly replicated and memorized: the regression
        row("bird", NEW, 0.3, err_uncond_quantiles=quantiles(21), err_cond_quantiles=quantiles(20)),
        AuditRow(image_id="broken", model=NEW, run_id=f"run-{NEW}", status="error", error=f"decode failed {SCRIPT}"),
    ]


class Page(HTMLParser):
    """Every start tag with its attributes, and the text, of an HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.tags if name == tag]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "catalog"
    with CatalogWriter(root) as writer:
        writer.add(catalog_rows())
    return root


@pytest.fixture(scope="module")
def report(catalog):
    path = catalog.parent / "report.html"
    assert write_report(catalog, path) == str(path)
    return path


def test_report_has_every_section_and_nothing_outside_the_file(report):
    text = report.read_text()
    page = Page(text)
    assert [a["id"] for a in page.all("section")] == list(SECTIONS)
    assert not page.all("script") and not page.all("link") and not page.all("iframe")
    sources = [a["src"] for a in page.all("img")]
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    assert "http://" not in text and "https://" not in text and "url(" not in text
    csp = [a for a in page.all("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]


def test_scraped_text_is_escaped_and_injects_no_tag(report):
    text = report.read_text()
    page = Page(text)
    assert SCRIPT not in text and IMG not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in text
    assert not any("onerror" in attrs for _, attrs in page.tags)
    assert all(a["src"] != "x" for a in page.all("img"))
    words = "".join(page.text)
    assert SCRIPT in words and IMG in words  # shown to the reader, as text


def test_images_are_the_stored_strips_distributions_and_figure_14(report):
    images = Page(report.read_text()).all("img")
    alts = [a["alt"] for a in images]
    assert alts[:2] == [f"score distributions of {NEW}", f"score distributions of {OLD}"]  # newest first
    strips = [a for a in images if a.get("class") == "strip"]
    # the new model's replicated images, most memorized first: the malicious id (KL 0.05), bird, cat
    assert [a["alt"] for a in strips] == [f"target and replicas of {i}" for i in (IMG, "bird", "cat")]
    assert base64.b64decode(strips[1]["src"].split(",", 1)[1]) == strip_png(len("bird"))
    assert alts[-1] == f"error distributions of {IMG}"  # the top image that has quantiles
    for attrs in images:
        with Image.open(io.BytesIO(base64.b64decode(attrs["src"].split(",", 1)[1]))) as image:
            assert image.format == "PNG" and image.width > 100


def test_summary_and_changes_say_what_happened(report):
    words = " ".join(" ".join(Page(report.read_text()).text).split())
    assert (
        "2 models, 7 images audited ok, 8 rows, 1 of them errors; UNet evaluations: 7,000 forward, 700 backward"
        in words
    )
    assert "Images with no ok row under their model: 1." in words and f"decode failed {SCRIPT}" in words
    assert f"Changes since the previous checkpoint: {OLD} → {NEW}" in words
    assert "VIOLATION: 1 images newly memorized" in words
    assert "newly_memorized, newly_replicated not_memorized → memorized – → 0.05" in words
    assert "1 replicated, 2 never replicated, 3 with a shift" in words  # the old model's distributions


def test_a_chosen_model_and_top(catalog, tmp_path):
    out = tmp_path / "old.html"
    assert main(["report", str(catalog), "--out", str(out), "--model", OLD, "--top", "1"]) == 0
    page = Page(out.read_text())
    words = " ".join(" ".join(page.text).split())
    assert f"Most memorized images: {OLD}" in words
    assert [a["alt"] for a in page.all("img") if a.get("class") == "strip"] == ["target and replicas of cat"]
    assert "No ok row of ckpt-001 has the error quantiles" in words
    assert f"No model with ok rows was audited before {OLD}: nothing to compare it with." in words
    out = tmp_path / "pair.html"
    assert main(["report", str(catalog), "--out", str(out), "--model", OLD, "--base", NEW]) == 0
    assert f"Changes since the previous checkpoint: {NEW} → {OLD}" in " ".join(Page(out.read_text()).text)


def test_an_unknown_model_is_a_usage_error(catalog, tmp_path, capsys):
    with pytest.raises(CatalogQueryError, match="ckpt-999"):
        write_report(catalog, tmp_path / "r.html", new="ckpt-999")
    assert main(["report", str(catalog), "--out", str(tmp_path / "r.html"), "--base", "nope"]) == 2
    assert "'nope' not in catalog" in capsys.readouterr().err


def test_an_empty_catalog_gives_a_page_that_says_so(tmp_path):
    words = " ".join(Page(write_report_text(tmp_path / "none", tmp_path / "r.html")).text)
    assert "The catalog has no rows." in words


def write_report_text(catalog, out) -> str:
    write_report(catalog, out)
    return out.read_text()


def test_report_and_nightly_summary_go_to_object_storage(catalog, s3_bucket):
    url = f"s3://{s3_bucket}/reports/nightly.html"
    assert write_report(catalog, url) == url
    nightly.write_summary(f"s3://{s3_bucket}/reports/nightly.json", {"passed": True})
    fs = fsspec.filesystem("s3")
    assert fs.cat_file(f"{s3_bucket}/reports/nightly.html").startswith(b"<!DOCTYPE html>")
    assert json.loads(fs.cat_file(f"{s3_bucket}/reports/nightly.json")) == {"passed": True}


# -- a real headless browser ----------------------------------------------------------------------


def chromium(*args: str, profile) -> subprocess.CompletedProcess:
    """Headless Chromium that requests nothing from the network (every host fails to resolve)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    flags += ["--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason=f"{CHROMIUM} is absent (apt-get install chromium)")
def test_the_page_renders_in_a_real_browser(report, tmp_path):
    shot = report.parent / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,2000", report.as_uri(), profile=tmp_path / "p1")
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200) and shot.stat().st_size > 10_000
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # text, tables and plots, not a blank page
    dom = Page(chromium("--dump-dom", report.as_uri(), profile=tmp_path / "p2").stdout)
    assert [a["id"] for a in dom.all("section")] == list(SECTIONS)
    assert not dom.all("script") and not any("onerror" in attrs for _, attrs in dom.tags)
    assert len(dom.all("img")) == len(Page(report.read_text()).all("img"))  # no injected image
    assert SCRIPT in "".join(dom.text) and IMG in "".join(dom.text)  # rendered as text

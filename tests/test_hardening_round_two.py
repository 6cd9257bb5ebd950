"""Regression tests of the second hostile probe (issue #19): one or more per finding, each failing before its fix.

Real parts throughout: web servers on loopback (http.server in threads), an S3-compatible server on
loopback (moto), real files, catalogs, DuckDB, the real CLI and real Ray. Tests that need Ray are slow.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import posixpath
import pty
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
from dataclasses import dataclass

import fsspec
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes, tiny_budgets, tiny_flags

from memray.catalog.reader import Catalog
from memray.catalog.schema import ARROW_SCHEMA, AuditRow
from memray.catalog.writer import CatalogWriter
from memray.cli import main
from memray.config import ConfigError, apply_overrides, preset_config
from memray.data.sources import list_units, read_unit
from memray.distributed.bookkeeping import RunLease
from memray.distributed.pipeline import PipelineOptions, run_audit
from memray.errors import CatalogLeaseError, SourceError

pytest_plugins = ["s3server"]

SECRET = png_bytes(666)
PUBLIC = png_bytes(1)


class _Site(http.server.BaseHTTPRequestHandler):
    """A web server as web servers are: the path is percent-decoded and its dot segments resolved
    before the lookup (so `/pub/%2e%2e/private/x` is `/private/x`), and a redirect is a 302."""

    files: dict[str, bytes] = {}
    redirects: dict[str, str] = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        path = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(self.path).path))
        if path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[path])
            self.end_headers()
        elif path in self.files:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.files[path])))
            self.end_headers()
            self.wfile.write(self.files[path])
        else:
            self.send_error(404)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serve(files: dict[str, bytes], redirects: dict[str, str] | None = None):
    handler = type("Site", (_Site,), {"files": files, "redirects": redirects or {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Web:
    """A public site whose `/pub/` holds a manifest and its images (and `/private/` what it must not
    reach), and an internal site on another port, reachable only by a redirect or a forged URL."""

    public: str
    internal: str
    files: dict[str, bytes]  # the public site's, by path: tests add their manifest here

    def manifest(self, rows: list[dict]) -> str:
        """Serve `rows` as the public site's /pub/m.jsonl; returns its URL."""
        self.files["/pub/m.jsonl"] = "".join(json.dumps(row) + "\n" for row in rows).encode()
        return f"{self.public}/pub/m.jsonl"


@pytest.fixture
def web():
    with _serve({"/secret.png": SECRET}) as internal:
        files = {"/pub/ok.png": PUBLIC, "/private/secret.png": SECRET}
        redirects = {"/pub/redir.png": f"{internal}/secret.png", "/pub/moved.png": "/pub/ok.png"}
        with _serve(files, redirects) as public:
            yield Web(public, internal, files)


def _records(source: str, **kwargs) -> dict[str, dict]:
    """Every record of a source, by image id."""
    return {r["image_id"]: r for unit in list_units(source, **kwargs) for r in read_unit(unit)}


def _refused(record: dict) -> bool:
    return record["data"] is None and record["error"] is not None


# -- 1. a redirect is checked hop by hop --------------------------------------------------------------


def test_a_redirect_to_another_host_is_refused_and_one_within_the_manifest_root_followed(web):
    manifest = web.manifest([{"id": "redir", "uri": "redir.png"}, {"id": "moved", "uri": "moved.png"}])
    records = _records(manifest)
    assert _refused(records["redir"]) and "redirects to" in records["redir"]["error"]
    assert web.internal in records["redir"]["error"] and "--allow-uri-prefix" in records["redir"]["error"]
    assert records["moved"]["data"] == PUBLIC  # a hop that stays under /pub/ is followed
    # allowed explicitly, the same hop is followed
    allowed = _records(manifest, allow_uri_prefixes=(web.internal + "/",))
    assert allowed["redir"]["data"] == SECRET


# -- 2. the URL is normalised (percent-decoding, dot segments) before the check ----------------------


@pytest.mark.parametrize(
    "path", ["%2e%2e/private/secret.png", "..%2fprivate/secret.png", "%2E%2E%2Fprivate/secret.png"]
)
def test_percent_encoded_dot_segments_cannot_climb_out_of_the_manifest_folder(web, path):
    records = _records(web.manifest([{"id": "x", "uri": f"{web.public}/pub/{path}"}]))
    assert _refused(records["x"]) and "--allow-uri-prefix" in records["x"]["error"]
    assert f"{web.public}/private/secret.png" in records["x"]["error"]  # the normal form is what was checked


# -- 3. one resolution of a local path, the same for the check and the read ------------------------


def test_a_tilde_in_a_manifest_is_never_the_home_folder(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.png").write_bytes(SECRET)
    monkeypatch.setenv("HOME", str(home))
    folder = tmp_path / "m"
    (folder / "~").mkdir(parents=True)
    (folder / "~" / "secret.png").write_bytes(PUBLIC)  # a folder named ~ inside the manifest's: allowed
    rows = [{"id": "url", "uri": "file://~/secret.png"}, {"id": "path", "uri": "~/secret.png"}]
    (folder / "list.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.chdir(folder)  # where the old check resolved `~` (and fsspec's read then expanded it to $HOME)
    records = _records(str(folder / "list.jsonl"))
    assert _refused(records["url"]) and "names a host" in records["url"]["error"]
    assert records["path"]["data"] == PUBLIC and records["path"]["uri"] == str(folder / "~" / "secret.png")


# -- 4. prefixes compared on parsed components; userinfo refused -----------------------------------


def test_userinfo_cannot_smuggle_another_port_past_an_allowed_prefix(web):
    port = web.public.rsplit(":", 1)[1]
    forged = f"http://127.0.0.1:{port}@{web.internal.removeprefix('http://')}/secret.png"
    manifest = web.manifest([{"id": "forged", "uri": forged}])
    records = _records(manifest, allow_uri_prefixes=(web.public,))
    assert _refused(records["forged"]) and "user information" in records["forged"]["error"]


def test_a_bucket_prefix_does_not_allow_a_bucket_whose_name_begins_with_it(tmp_path, s3_endpoint):
    from s3server import create_bucket

    bucket = create_bucket(s3_endpoint, f"memray-{os.urandom(4).hex()}")
    secrets = create_bucket(s3_endpoint, f"{bucket}-secrets")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.pipe_file(f"{bucket}/a.png", PUBLIC)
    fs.pipe_file(f"{secrets}/secret.png", SECRET)
    (tmp_path / "list.jsonl").write_text(
        json.dumps({"id": "a", "uri": f"s3://{bucket}/a.png"}) + "\n"
        + json.dumps({"id": "s", "uri": f"s3://{secrets}/secret.png"})
    )  # fmt: skip
    records = _records(str(tmp_path / "list.jsonl"), allow_uri_prefixes=(f"s3://{bucket}",))
    assert records["a"]["data"] == PUBLIC
    assert _refused(records["s"]) and "--allow-uri-prefix" in records["s"]["error"]


@pytest.mark.parametrize("prefix", ["http://user:pw@127.0.0.1:9/", "http://127.0.0.1:99999/", "file://host/x"])
def test_an_allowed_prefix_that_cannot_be_compared_safely_stops_the_audit_in_one_line(tmp_path, capsys, prefix):
    (tmp_path / "list.jsonl").write_text(json.dumps({"uri": "a.png"}) + "\n")
    code = main(["audit", str(tmp_path / "list.jsonl"), "--model", "demo", "--catalog", str(tmp_path / "c"),
                 "--allow-uri-prefix", prefix])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"memray: --allow-uri-prefix {prefix}: ") and "Traceback" not in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("uri", "normal"),
    [
        ("HTTP://Example.COM:80/pub/./a/../b%20c.png?size=2#top", "http://example.com/pub/b%20c.png?size=2"),
        ("https://h/pub/%2e%2e/%2E%2e%2fx", "https://h/x"),
        ("http://[::1]:8080/a/", "http://[::1]:8080/a/"),
        ("s3://bucket/a/../../b%2e", "s3://bucket/b%2e"),  # keys are literal, and cannot climb above the bucket
        ("file:///tmp/../tmp/./x", "/tmp/x"),
    ],
)
def test_the_normal_form_of_a_uri(uri, normal):
    from memray.data.uris import locate

    assert locate(uri).uri == normal and locate(normal) == locate(uri)  # normalising twice changes nothing


# -- 13. links in a shard, pipes in a folder: error rows naming them --------------------------------


def test_link_members_of_a_shard_are_error_rows_naming_them(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("k0.png")
        info.size = len(PUBLIC)
        tar.addfile(info, io.BytesIO(PUBLIC))
        for name, kind, target in [("k1.png", tarfile.SYMTYPE, "/etc/passwd"), ("k2.png", tarfile.LNKTYPE, "k0.png")]:
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, target
            tar.addfile(link)
    records = _records(str(shard))
    assert sorted(records) == ["00000.tar/k0", "00000.tar/k1", "00000.tar/k2"]
    assert records["00000.tar/k0"]["data"] == PUBLIC
    assert (
        _refused(records["00000.tar/k1"])
        and "k1.png is a symbolic link to '/etc/passwd'" in records["00000.tar/k1"]["error"]
    )
    assert _refused(records["00000.tar/k2"]) and "k2.png is a hard link to 'k0.png'" in records["00000.tar/k2"]["error"]


def test_a_pipe_in_a_source_folder_is_an_error_row_and_never_waited_on(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(PUBLIC)
    pipes = ("pipe.png", "pipe.tar", "pipe.csv")
    for name in pipes:
        os.mkfifo(folder / name)
    listed, globbed = {}, {}

    def read_both():
        listed.update(_records(str(folder)))  # a manifest inside a folder is no unit: pipe.csv is never opened
        globbed.update(_records(str(folder / "*")))  # named by the glob: a manifest would be opened to look at it

    reader = threading.Thread(target=read_both, daemon=True)
    reader.start()
    reader.join(timeout=30)
    if reader.is_alive():  # blocked opening a pipe: release it, then fail
        for name in pipes:
            with contextlib.suppress(OSError):
                os.close(os.open(folder / name, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("listing or reading the folder waited on a pipe")
    assert sorted(listed) == ["a.png", "pipe.png", "pipe.tar"]
    assert sorted(globbed) == ["a.png", "pipe.csv", "pipe.png", "pipe.tar"]
    for name in pipes:
        record = globbed[name]
        assert _refused(record) and "not a regular file (a pipe)" in record["error"]
    with pytest.raises(SourceError, match="not a regular file"):
        list_units(str(folder / "pipe.tar"))  # named on its own: refused before any work


# -- 5. a catalog file with memray's metadata but columns of the wrong type -------------------------


def _catalog_with_rows(path, rows: list[dict]) -> None:
    with CatalogWriter(path) as writer:
        writer.add([AuditRow(**{"model": "m", "status": "ok", "audited_at": "2026-11-01", **row}) for row in rows])


def test_a_memray_file_with_columns_of_the_wrong_type_is_left_out_of_every_command(tmp_path, capsys, caplog):
    catalog = tmp_path / "catalog"
    _catalog_with_rows(catalog, [{"image_id": "good", "seconds": 1.5}])
    fields = [
        pa.field(f.name, {"image_id": pa.int64(), "seconds": pa.string()}.get(f.name, f.type)) for f in ARROW_SCHEMA
    ]
    schema = pa.schema(fields, metadata=ARROW_SCHEMA.metadata)  # memray's metadata, other types
    bad = catalog / "model=m" / "part-forged.parquet"
    row = {"image_id": 7, "model": "m", "status": "ok", "audited_at": "2026-11-02", "seconds": "a while"}
    pq.write_table(pa.Table.from_pylist([row], schema=schema), bad)
    assert main(["query", str(catalog), "SELECT image_id, seconds + 1 AS later FROM audits"]) == 0
    assert "good" in capsys.readouterr().out and str(bad) in caplog.text and "image_id is int64" in caplog.text
    assert main(["status", str(catalog)]) == 0
    assert f"ignored: {bad}: columns of the wrong type" in capsys.readouterr().out
    assert main(["report", str(catalog), "--out", str(tmp_path / "r.html")]) == 0
    assert main(["migrate", str(catalog)]) == 0
    assert Catalog(catalog).query("SELECT count(*) AS n FROM audits").to_pylist() == [{"n": 1}]


# -- 7. control characters never reach a terminal raw; NUL refused in ids --------------------------

HOSTILE_ID, HOSTILE_CAPTION = "\x1b]0;PWNED\x07", "\x1b[2J\x9b31m\u202e"


def _on_a_terminal(argv: list[str], env: dict | None = None) -> bytes:
    """What `memray ARGV` writes to a terminal (a pseudo-terminal: stdout and stderr both)."""
    controller, terminal = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "memray.cli", *argv], stdout=terminal, stderr=terminal, env=env or os.environ.copy()
    ) as process:
        os.close(terminal)
        output = b""
        with contextlib.suppress(OSError):  # EIO once the process has exited and the terminal is drained
            while chunk := os.read(controller, 65536):
                output += chunk
    os.close(controller)
    assert process.returncode == 0, output
    return output


def test_ids_and_captions_with_control_characters_are_shown_escaped_on_a_terminal(tmp_path):
    catalog = tmp_path / "catalog"
    _catalog_with_rows(catalog, [{"image_id": HOSTILE_ID, "caption": HOSTILE_CAPTION}])
    (catalog / "model=m" / "x\x1b[2J.parquet").write_bytes(b"not parquet")  # its name reaches a warning
    for argv in (
        ["query", str(catalog), "SELECT image_id, caption FROM audits"],
        ["query", str(catalog), "SELECT image_id, caption FROM audits", "--format", "csv"],
        ["status", str(catalog)],
    ):
        shown = _on_a_terminal(argv)
        for raw in (b"\x1b", b"\x07", "\x9b".encode(), "\u202e".encode()):
            assert raw not in shown, (argv, raw, shown)
        assert b"x\\x1b[2J.parquet" in shown, argv  # the warning (or status line) names the file, escaped
    assert b"\\x1b]0;PWNED\\x07" in _on_a_terminal(["query", str(catalog), "SELECT image_id FROM audits"])


def test_a_nul_in_an_image_id_is_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(PUBLIC)
    (tmp_path / "list.jsonl").write_text(json.dumps({"id": "a\x00b", "uri": "a.png"}) + "\n")
    (record,) = _records(str(tmp_path / "list.jsonl")).values()
    assert record["image_id"] == "a\\x00b" and _refused(record) and "NUL" in record["error"]


# -- 10. settings in range; measures in one order, without repeats ----------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("invmm.steps=1000000000000", "invmm.steps: must be at most 1,000,000"),
        ("z0_error.noises=100000000", "z0_error.noises: must be at most 100,000"),
        ("similarity.threshold=-3", "similarity.threshold: must be in (0, 1] for tiled_l2"),
    ],
)
def test_settings_beyond_any_sensible_range_are_refused(setting, message):
    with pytest.raises(ConfigError) as refused:
        apply_overrides(preset_config("quick"), [setting])
    assert message in str(refused.value)


def test_measures_are_deduplicated_and_the_hash_does_not_depend_on_their_order():
    once = apply_overrides(preset_config("quick"), ['measures=["invmm", "z0_error"]'])
    twice = apply_overrides(preset_config("quick"), ['measures=["invmm", "invmm", "z0_error"]'])
    swapped = apply_overrides(preset_config("quick"), ['measures=["z0_error", "invmm"]'])
    assert once.measures == twice.measures == swapped.measures == ("invmm", "z0_error")
    assert once.hash() == twice.hash() == swapped.hash()
    # the default order is kept, so the hash moves only when a setting does (the screen's flag at 0.8)
    assert preset_config("default").hash() == "7a88ffde7e8b0d3a"


# -- 11. a time limit that is no time limit --------------------------------------------------------


@pytest.mark.parametrize("timeout", ["inf", "nan", "-1"])
def test_a_query_time_limit_must_be_a_finite_positive_number(tmp_path, capsys, timeout):
    _catalog_with_rows(tmp_path, [{"image_id": "a"}])
    assert main(["query", str(tmp_path), "SELECT 1", "--timeout", timeout]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memray: the query time limit must be a finite number") and err.count("\n") == 1


# -- 12. DuckDB's private temporary folder ---------------------------------------------------------


def test_the_private_duckdb_folder_is_removed_when_the_command_exits(tmp_path):
    _catalog_with_rows(tmp_path / "catalog", [{"image_id": "a"}])
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    for _ in range(2):
        _on_a_terminal(["query", str(tmp_path / "catalog"), "SELECT count(*) FROM audits"], env)
    assert list(temp.iterdir()) == []


# -- 16. an unknown section is named as one --------------------------------------------------------


def test_an_unknown_section_is_named_in_the_message(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(PUBLIC)
    code = main(["audit", str(tmp_path / "a.png"), "--model", "demo", "--catalog", str(tmp_path / "c"),
                 "--set", "foo.bar=1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("memray: unknown section 'foo'; sections: [") and "invmm" in err
    with pytest.raises(ConfigError, match=r"^invmm: unknown setting\(s\) \['bar'\]"):
        apply_overrides(preset_config("quick"), ["invmm.bar=1"])


# -- 6. a torn lease, and a lease from a clock far ahead --------------------------------------------


def _plant_lease(catalog, holder) -> None:
    path = catalog / "_runs" / "lease-fp-cfg.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(holder if isinstance(holder, bytes) else json.dumps(holder).encode())


@pytest.mark.parametrize(
    "holder", [b"garbage{", {"run_id": "r", "host": "elsewhere", "pid": 1, "beat": "yesterday"}, [1, 2], b"\xff"]
)
def test_a_torn_lease_is_taken_over_with_a_warning(tmp_path, caplog, holder):
    _plant_lease(tmp_path, holder)
    lease = RunLease(str(tmp_path), "fp", "cfg", "run-new")
    lease.acquire()
    lease.release()
    assert "torn or not a lease" in caplog.text


def test_a_lease_beating_far_in_the_future_is_stale_and_one_slightly_ahead_holds(tmp_path, caplog):
    _plant_lease(tmp_path, {"run_id": "ahead", "host": "elsewhere", "pid": 1, "beat": time.time() + 30})
    with pytest.raises(CatalogLeaseError, match="run ahead"):  # clocks 30 s apart: still the holder's
        RunLease(str(tmp_path), "fp", "cfg", "run-new").acquire()
    _plant_lease(tmp_path, {"run_id": "skewed", "host": "elsewhere", "pid": 1, "beat": time.time() + 365 * 86400})
    lease = RunLease(str(tmp_path), "fp", "cfg", "run-new")
    lease.acquire()  # a year ahead: past the skew limit, stale
    lease.release()
    assert "in the future" in caplog.text and "skewed" in caplog.text


# -- 9. object storage without credentials ---------------------------------------------------------


def test_object_storage_without_credentials_is_one_line_and_exit_2(tmp_path, s3_server, monkeypatch, capsys):
    import s3fs

    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # nothing leaves the machine
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("MEMRAY_CACHE", str(tmp_path / "cache"))
    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem that found credentials earlier
    (tmp_path / "a.png").write_bytes(PUBLIC)
    local = ["--catalog", str(tmp_path / "c")]
    for argv in (
        ["audit", str(tmp_path / "a.png"), "--model", "s3://missing-bucket/ckpt", *local],
        ["audit", "s3://missing-bucket/images", "--model", "demo", *local],
        ["query", "s3://missing-bucket/catalog", "SELECT 1"],
        ["status", "s3://missing-bucket/catalog"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("memray: cannot access object storage: NoCredentialsError") and err.count("\n") == 1
    s3fs.S3FileSystem.clear_instance_cache()


# -- 8, 14. one row per image in a run; `skipped` counts this run's input only ----------------------


@pytest.mark.slow
def test_an_image_listed_twice_gets_one_row_and_skipped_counts_only_this_runs_images(local_ray, tiny_sd_dir, tmp_path):
    from memray.models.loading import model_fingerprint, model_slug

    catalog, options = str(tmp_path / "catalog"), PipelineOptions(slots=2, cpus_per_actor=0.5)
    config = tiny_budgets().replace(measures=["z0_error"])
    fingerprint = model_fingerprint(tiny_sd_dir)
    slug = model_slug(str(tiny_sd_dir), fingerprint)
    others = [{"image_id": f"other{i}", "image_sha256": f"{i:064x}", "model": slug} for i in range(13)]
    _catalog_with_rows(
        catalog, [{**row, "model_fingerprint": fingerprint, "config_hash": config.hash()} for row in others]
    )
    new = tmp_path / "new"
    new.mkdir()
    for seed in (710, 711):
        (new / f"{seed}.png").write_bytes(png_bytes(seed))
    row = json.dumps({"id": "twice", "uri": "710.png"}) + "\n"
    (new / "list.jsonl").write_text(row + row)
    sources = [str(new / "list.jsonl"), str(new), str(new)]  # a manifest row twice, a folder named twice: 3 images
    first = run_audit(sources, str(tiny_sd_dir), catalog, config, options)
    assert (first.rows, first.skipped, first.unfinished) == (3, 0, [])  # the 13 rows of other images: not skipped
    counts = Catalog(catalog).query("SELECT image_id, count(*) AS n FROM audits WHERE image_id NOT LIKE 'other%' "
                                    "GROUP BY ALL ORDER BY 1").to_pylist()  # fmt: skip
    assert counts == [{"image_id": "710.png", "n": 1}, {"image_id": "711.png", "n": 1}, {"image_id": "twice", "n": 1}]
    again = run_audit(sources, str(tiny_sd_dir), catalog, config, options)
    assert (again.rows, again.skipped) == (0, 3)


# -- 15. SIGTERM stops an audit as Ctrl-C does; the bookkeeping of killed runs is swept -------------


def test_the_bookkeeping_of_runs_that_are_over_is_swept_and_that_of_live_runs_kept(tmp_path, capsys):
    _catalog_with_rows(tmp_path, [{"image_id": "a"}])
    live = RunLease(str(tmp_path), "fp", "live", "live-run")
    live.acquire()
    folders = ["_runs/live-run", "_runs/killed-run", "_inflight/fp-live", "_inflight/fp-killed"]
    for folder in folders:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "x.json").write_text("{}")
    try:
        assert main(["status", str(tmp_path), "--gc"]) == 0
    finally:
        live.release()
    out = capsys.readouterr().out
    assert [folder for folder in folders if (tmp_path / folder).exists()] == ["_runs/live-run", "_inflight/fp-live"]
    assert f"removed: {tmp_path}/_runs/killed-run" in out and f"removed: {tmp_path}/_inflight/fp-killed" in out


def _session_processes(leader: int) -> list[psutil.Process]:
    """The processes of the session a job leads (its own local Ray's among them)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(process.pid) == leader:
                found.append(process)
    return found


@pytest.mark.slow
def test_sigterm_stops_an_audit_as_ctrl_c_does(tiny_sd_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        (folder / f"img{i}.png").write_bytes(png_bytes(600 + i))
    catalog = tmp_path / "catalog"
    (catalog / "_runs" / "0123456789ab").mkdir(parents=True)  # the ledger of a run killed with SIGKILL
    (catalog / "_runs" / "0123456789ab" / "unit.json").write_text("{}")
    command = [sys.executable, "-m", "memray.cli", "audit", str(folder), "--model", str(tiny_sd_dir),
               "--catalog", str(catalog), "--cpus-per-actor", "0.5", "--slots", "1", "--queue", "1",
               "--rows-per-file", "100", *tiny_flags(measures=["invmm", "z0_error"]),
               "--set", "invmm.steps=40"]  # fmt: skip
    controller, terminal = pty.openpty()  # on a terminal the progress bar is redrawn every second
    job = subprocess.Popen(command, stdout=terminal, stderr=terminal, start_new_session=True)
    os.close(terminal)
    shown, received = b"", 0
    try:
        deadline = time.monotonic() + 300
        while not received and time.monotonic() < deadline and job.poll() is None:
            with contextlib.suppress(OSError):
                shown += os.read(controller, 65536)
            received = max([int(n) for n in re.findall(rb"audited (\d+)/6", shown)], default=0)
        assert 0 < received < 6, shown[-2000:]  # the driver holds rows in its buffer (100 rows a file)
        processes = _session_processes(job.pid)
        job.send_signal(signal.SIGTERM)  # the driver alone, as `kill` or `ray job stop` does
        with contextlib.suppress(OSError):
            while chunk := os.read(controller, 65536):
                shown += chunk
        job.wait(timeout=120)
    finally:
        os.close(controller)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 143, shown[-3000:]
    assert b"memray: stopped by SIGTERM" in shown and b"SIGTERM received" not in shown
    rows = Catalog(str(catalog)).query("SELECT count(*) AS n FROM audits").to_pylist()[0]["n"]
    assert rows >= received  # every row the driver had received was written
    assert not list((catalog / "_runs").iterdir())  # no lease, no ledger: neither this run's nor the killed one's
    deadline = time.monotonic() + 30
    while _running(processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _running(processes)  # its local Ray (the actor with it) is gone too


def _running(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive

"""Where a URI points, in one normal form: the policy is checked on it, and exactly it is read.

A manifest is data (a web scrape): its entries must not make a worker read /etc/shadow, a cloud
metadata endpoint or an internal server. So a URI is normalised once (`locate`):

- a local path (plain, or ``file:///path``) becomes its real path: ``..`` and symbolic links
  resolved; ``~`` is a name like any other (a file URL naming a host, ``file://~/x``, is refused);
- an HTTP(S) URL gets its scheme and host lowercased, its port made explicit, its path
  percent-decoded (``%2e%2e`` is ``..``) and freed of dot segments; userinfo
  (``http://a:1@b:2/``), backslashes and control characters are refused;
- an object-store URL (``s3://bucket/key``) gets its key freed of dot segments (keys are literal:
  no percent-decoding); userinfo in the bucket is refused.

A location lies within a prefix when scheme, host and port are equal and the prefix's path
segments begin its own (`Location.within`): ``s3://bucket`` does not allow ``s3://bucket-secrets``,
nor ``http://h/pub`` ``http://h/public``. `read_location` reads the location itself, never the
string it came from (no second resolution, no fsspec URL chaining), and over HTTP(S) checks every
redirect hop against the same prefixes before following it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import fsspec

from memray.errors import SourceError

LOCAL_SCHEMES = ("file", "local")  # fsspec's names of the local disk
WEB_PORTS = {"http": 80, "https": 443}
HTTP_TIMEOUT_SECONDS = 60.0
MAX_REDIRECTS = 5

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SEGMENT_SAFE = "!$&'()*+,;=:@~"  # RFC 3986 pchar without '%' and '/': kept as they are when re-encoding


class UriError(SourceError):
    """A URI memray will not read: malformed, with userinfo, or pointing outside what is allowed."""


@dataclass(frozen=True)
class Location:
    """A URI in normal form: what the policy checks and what the reader reads."""

    scheme: str  # "file" for the local disk
    host: str = ""  # web schemes: the host, lowercase; "" otherwise
    port: int | None = None  # web schemes: the port, explicit
    segments: tuple[str, ...] = ()  # the path's segments (an object store's bucket first), dot segments removed
    query: str = ""  # web schemes: the query as written

    @property
    def uri(self) -> str:
        """The normal form as a string: a local path, or a URL."""
        if self.scheme == "file":
            return "/" + "/".join(self.segments)
        if self.scheme in WEB_PORTS:
            host = f"[{self.host}]" if ":" in self.host else self.host
            port = "" if self.port == WEB_PORTS[self.scheme] else f":{self.port}"
            path = "/".join(urllib.parse.quote(s, safe=_SEGMENT_SAFE, errors="surrogateescape") for s in self.segments)
            return f"{self.scheme}://{host}{port}/{path}" + (f"?{self.query}" if self.query else "")
        return f"{self.scheme}://" + "/".join(self.segments)

    def within(self, prefix: Location) -> bool:
        """Whether this location lies under `prefix`: same scheme, host and port, and whole path segments."""
        folder = prefix.segments[:-1] if prefix.segments[-1:] == ("",) else prefix.segments
        same_place = (self.scheme, self.host, self.port) == (prefix.scheme, prefix.host, prefix.port)
        return same_place and self.segments[: len(folder)] == folder

    def root(self) -> Location:
        """Where a manifest at this location may point by default: its folder (local disk, web server),
        or its bucket (object store)."""
        if self.scheme == "file" or self.scheme in WEB_PORTS:
            return dataclasses.replace(self, segments=(*self.segments[:-1], ""), query="")
        return dataclasses.replace(self, segments=(*self.segments[:1], ""))


def _without_dot_segments(segments: list[str]) -> tuple[str, ...]:
    """RFC 3986's remove_dot_segments on a split path: `..` drops the segment before it, never above the root."""
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    if segments and segments[-1] in (".", ".."):
        kept.append("")  # /a/b/.. is the folder /a/
    return tuple(kept)


def locate(uri: str) -> Location:
    """The normal form of a local path or URL (see the module's docstring), or UriError saying why there is none."""
    if not isinstance(uri, str) or not uri:
        raise UriError(f"not a uri: {uri!r}")
    if "\x00" in uri:
        raise UriError(f"a NUL character in the uri {uri!r}")
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match else "file"
    if scheme in LOCAL_SCHEMES:
        return _local(uri, match.end() if match else None)
    if scheme in WEB_PORTS:
        return _web(uri, scheme)
    return _store(uri, scheme, match.end())


def _local(uri: str, after_scheme: int | None) -> Location:
    path = uri
    if after_scheme is not None:
        host, _, rest = uri[after_scheme:].partition("/")
        if host not in ("", "localhost"):
            raise UriError(f"{uri}: a file URL that names a host ({host!r}); a local file is file:///path")
        path = "/" + rest
    real = os.path.realpath(path)
    return Location("file", segments=tuple(real.split("/")[1:]))


def _web(uri: str, scheme: str) -> Location:
    parts = urllib.parse.urlsplit(uri)
    if "@" in parts.netloc:
        raise UriError(f"{uri}: user information in a URL is refused")
    if not parts.hostname:
        raise UriError(f"{uri}: no host")
    try:
        port = parts.port or WEB_PORTS[scheme]
    except ValueError as error:
        raise UriError(f"{uri}: {error}") from error
    path = urllib.parse.unquote(parts.path, errors="surrogateescape")
    if _CONTROL.search(path) or "\\" in path:
        raise UriError(f"{uri}: a control character or backslash in the path")
    segments = _without_dot_segments(path.split("/")[1:])
    return Location(scheme, parts.hostname, port, segments, parts.query)


def _store(uri: str, scheme: str, after_scheme: int) -> Location:
    bucket, _, key = uri[after_scheme:].lstrip("/").partition("/")
    if not bucket or bucket in (".", ".."):
        raise UriError(f"{uri}: no bucket")
    if "@" in bucket:
        raise UriError(f"{uri}: user information in a URL is refused")
    if _CONTROL.search(uri):
        raise UriError(f"{uri}: a control character in the uri")
    return Location(scheme, segments=(bucket, *_without_dot_segments(key.split("/"))))  # the key cannot climb out


def normal_prefix(prefix: str) -> str:
    """An --allow-uri-prefix in normal form, or UriError naming it: checked before any work starts."""
    try:
        return locate(prefix).uri
    except UriError as error:
        raise UriError(f"--allow-uri-prefix {prefix}: {error}") from error


def allows(prefixes: tuple[Location, ...] | None, location: Location) -> bool:
    """Whether `location` lies within one of `prefixes` (None: no policy, the user named it)."""
    return prefixes is None or any(location.within(prefix) for prefix in prefixes)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a location that the same prefixes allow, checked on its normal form."""

    max_redirections = MAX_REDIRECTS

    def __init__(self, prefixes: tuple[Location, ...] | None):
        super().__init__()
        self.prefixes = prefixes

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = locate(urllib.parse.urljoin(req.full_url, newurl))
        if not allows(self.prefixes, target):
            raise UriError(
                f"{req.full_url} redirects to {target.uri}, outside where it may point "
                f"({', '.join(p.uri for p in self.prefixes)}); allow it with --allow-uri-prefix"
            )
        return super().redirect_request(req, fp, code, msg, headers, target.uri)


def read_location(location: Location, *, max_bytes: int, prefixes: tuple[Location, ...] | None = None) -> bytes:
    """Up to `max_bytes + 1` bytes of the file at `location`, read there and nowhere else.

    A local file must be a regular one (a FIFO or device is refused without blocking on it); an
    HTTP(S) redirect is followed only within `prefixes` (None: any). Raises FileNotFoundError for a
    missing file (HTTP 404 and 410 too), UriError for a refused redirect, OSError for the rest.
    """
    if location.scheme == "file":
        return _read_local(location.uri, max_bytes)
    if location.scheme in WEB_PORTS:
        return _read_web(location, max_bytes, prefixes)
    fs = fsspec.filesystem(location.scheme)
    with fs.open("/".join(location.segments), "rb") as handle:
        return handle.read(max_bytes + 1)


def _read_local(path: str, max_bytes: int) -> bytes:
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file ({_file_kind(mode)})")
        return handle.read(max_bytes + 1)


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "a device")


def _read_web(location: Location, max_bytes: int, prefixes: tuple[Location, ...] | None) -> bytes:
    opener = urllib.request.build_opener(_CheckedRedirects(prefixes))
    request = urllib.request.Request(location.uri, headers={"User-Agent": "memray"})
    try:
        with opener.open(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
            return response.read(max_bytes + 1)
    except urllib.error.HTTPError as error:
        if error.code in (404, 410):
            raise FileNotFoundError(f"HTTP {error.code}") from error
        raise OSError(f"HTTP {error.code} {error.reason}") from error
    except urllib.error.URLError as error:
        raise OSError(str(error.reason)) from error

"""Where shards live: a local path, an `http(s)://` URL or a `pipe:COMMAND`, and how to read one.

The one owner of "a shard location" (`bcc.shards` opens every shard through `open_location`):
- `kind(location)`: "local", "http" or "pipe". A `pipe:` location runs COMMAND in a shell and reads its
  standard output (object stores through their own client: `pipe:aws s3 cp s3://bucket/x.tar -`).
- A dataset location (`data.shards`) is a local folder, the URL of a folder (its `manifest.json` is
  fetched first), the URL of the manifest itself, or a `pipe:` template holding `{name}` where the file
  name goes (`pipe:aws s3 cp s3://bucket/ds/{name} -`). The manifest's relative shard entries resolve
  against it (`join`); an entry may also be a brace list (`train-{000000..000127}.tar`, `expand`).
- Credentials come from the environment only: an `Authorization` header from `BCC_HTTP_TOKEN` (a bare
  token is sent as `Bearer TOKEN`; only to the hosts `BCC_HTTP_TOKEN_HOSTS` lists when that is set, and
  a manifest whose absolute URL entries would carry it to another host is refused otherwise), a `~/.netrc` (or `$NETRC`) entry for the host, or `${VAR}` in a
  location, replaced by the variable's value only when it is opened (`https://${BCC_DATA_USERINFO}@host/ds`,
  or `${BCC_DATA_URL}` for a whole URL naming a folder): shards, configs and messages keep `${VAR}`. A
  location that spells a secret out (`user:password@`, a signed query such as `X-Amz-Signature=`) is
  refused by `check_no_secrets` (the forms: `bcc.remote_secrets`), so no secret reaches `config.yaml`, a manifest or a log. `redact`
  masks what is left (userinfo, signed query values, tokens, the values of `${VAR}`s read) in every
  message this module and `bcc.shards` build.
- Errors: `RemoteError` (a BccError) names the location (redacted); `is_transient` marks the ones a
  re-open may cure (a dropped connection, a timeout, HTTP 5xx/429, a `pipe:` command that failed),
  which `bcc.shards.read_range` retries `data.retries` times.

Security: a `pipe:` location runs a shell command. Only the user's own `data.shards` (config file or
command line) may be one; a manifest's `pipe:` entries are refused (`bcc.manifest`) unless the user set
`data.allow_pipe_in_manifest: true`, and a name from a manifest put into the user's `{name}` template
must be a plain relative file name (`is_plain_name`), so a manifest cannot smuggle shell syntax in.
"""

from __future__ import annotations

import base64
import http.client
import netrc
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from bcc import activity, remote_secrets
from bcc.errors import BccError
from bcc.remote_braces import count_bound, expand
from bcc.remote_secrets import TOKEN_ENV, quote_bytes, redact

__all__ = ["DEFAULT_RETRIES", "HTTP_TIMEOUT_S", "TOKEN_ENV", "RemoteError", "check_no_secrets", "check_scheme", "count_bound",
           "display", "expand", "expand_env", "is_local", "is_plain_name", "is_transient", "join", "kind",
           "manifest_location", "open_location", "pause", "probe", "probe_all", "read_bytes", "redact", "retry_delay",
           "sends_token_elsewhere", "token_for"]

TOKEN_HOSTS_ENV = "BCC_HTTP_TOKEN_HOSTS"  # optional: the only hosts BCC_HTTP_TOKEN is sent to
DEFAULT_RETRIES = 3  # data.retries
RETRY_BACKOFF_S = 0.5  # first wait before a re-open; doubles per attempt, at most RETRY_BACKOFF_MAX_S
RETRY_BACKOFF_MAX_S = 8.0
HTTP_TIMEOUT_S = 60.0  # data.read_timeout_s: per blocking socket operation or silent pipe, not per shard
PROBE_THREADS = 16
STDERR_TAIL = 400  # characters of a failed pipe command's stderr put into its error

Kind = Literal["local", "http", "pipe"]
# after a termination request, a remote read silent this long ends (a `pipe:` command's, bcc.remote_pipe;
# an http(s) body's, bcc.remote_http): long enough that a slow but live download (a storage hiccup while a
# whole cluster is preempted) still lets the run reach its preemption checkpoint and exit 75; short
# enough to end well within Slurm's KillWait (30 s by default)
STOP_SILENCE_S = 5.0
_STOPPING: list[float | None] = [None]  # when a termination request (SIGTERM) reached this process: `request_stop`


def request_stop() -> None:
    """Called from a SIGTERM handler (the trainer's, a loader worker's): from now on no remote read is
    re-opened, and a `pipe:` read waiting on a silent command ends at once (the command's group ended)
    instead of waiting out data.read_timeout_s and data.retries. A flag, not an Event: safe in a handler."""
    if _STOPPING[0] is None:
        _STOPPING[0] = time.monotonic()


def is_stopping() -> bool:
    return _STOPPING[0] is not None


def stop_time() -> float | None:
    """`time.monotonic()` of the first termination request, or None."""
    return _STOPPING[0]


class RemoteError(BccError):
    """A location that cannot be reached or read; `transient` when a re-open may succeed, `missing` when
    the server says there is nothing there (HTTP 404, 410); `status`: the HTTP status, where one came."""

    def __init__(self, message: str, *, transient: bool = False, missing: bool = False, status: int | None = None):
        # one line: a server's or library's text may hold line breaks (urllib's redirect-loop message)
        super().__init__(redact(" ".join(message.split())))
        self.transient, self.missing, self.status = transient, missing, status


def kind(location: str | os.PathLike) -> Kind:
    """"pipe" for `pipe:COMMAND`, "http" for http:// and https:// URLs, else "local"."""
    text = str(location) if not isinstance(location, Path) else ""
    if text.startswith("${"):  # `${VAR}`: classified by the variable's value, which is read only when opened
        text = _ENV_REF.sub(lambda m: os.environ.get(m.group(1), ""), text, count=1)
    if text.startswith("pipe:"):
        return "pipe"
    if text[:8].lower().startswith(("http://", "https://")):
        return "http"
    return "local"


def is_local(location: str | os.PathLike) -> bool:
    return kind(location) == "local"


_OTHER_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")


def check_scheme(location: str | os.PathLike, key: str = "data.shards") -> None:
    """Refuse a location written as a URL of a scheme bcc does not read (`s3://`, `gs://`, a typo such as
    `htps://`): taken for a local path it would be mangled (`s3:/bucket`) and reported as a missing
    folder, credentials and all. RemoteError naming `key`, redacted, with the pipe: way to object storage."""
    text = str(location) if not isinstance(location, Path) else ""
    if kind(text) == "local" and _OTHER_SCHEME.match(text):
        raise RemoteError(f"{key}: {redact(text)} is a {text.split('://', 1)[0]}:// URL; bcc reads local paths, "
                          "http(s):// URLs and pipe: commands: reach object storage through its own client, e.g. "
                          "pipe:aws s3 cp s3://bucket/dataset/{name} - (docs/data.md)")


def is_transient(e: BaseException) -> bool:
    """Whether a read error of a remote shard may be cured by opening it again."""
    if isinstance(e, RemoteError):
        return e.transient
    return isinstance(e, (ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException))


def retry_delay(attempt: int) -> float:
    """Seconds to wait before re-open number `attempt` (1, 2, ...): 0.5, 1, 2, ... up to 8."""
    return min(RETRY_BACKOFF_S * 2 ** (attempt - 1), RETRY_BACKOFF_MAX_S)


PAUSE_SLICE_S = 0.05


def pause(seconds: float) -> None:
    """A retry's back-off: `seconds` of sleep, cut short by a termination request (`request_stop`), after
    which nothing is re-opened anyway. (Ctrl-C raises KeyboardInterrupt in the main thread's sleep; the
    probe threads of `probe_all` are not waited for.) A bounded wait for `bcc.activity`."""
    deadline = time.monotonic() + seconds
    with activity.waiting(seconds + 1.0, "a retry's back-off"):
        while not is_stopping() and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, PAUSE_SLICE_S))


# a request's bound for `bcc.activity`: the socket time-out applies to each blocking operation (connect, TLS
# handshake, the headers), and a name lookup has none of its own (resolv.conf: 5 s x 2 tries x 3 servers)
RESOLVE_S = 30.0


def request_bound(timeout_s: float) -> float:
    return 2 * timeout_s + RESOLVE_S


# --------------------------------------------------------------------------- names, braces, env


_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=,@-]*")


def is_plain_name(name: str) -> bool:
    """A relative file name (`/`-separated parts of letters, digits and `._+=,@-`, none `.` or `..`):
    what a manifest may put into a user's `pipe:` template without becoming shell syntax."""
    return bool(name) and all(_PLAIN.fullmatch(part) and part not in (".", "..") for part in name.split("/"))


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(location: str, remember: bool = True) -> str:
    """`location` with each `${NAME}` replaced by the environment variable's value, as it is opened (a
    location keeps its `${NAME}`s everywhere else). The value is remembered (`remember`) so that
    `redact` shows `${NAME}` again. Raises RemoteError naming an unset variable."""
    def value(m: re.Match) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise RemoteError(f"{location}: the environment variable {name} is not set")
        v = os.environ[name]
        if remember and len(v) >= 4:
            remote_secrets.remember(v, m.group(0))
        return v

    return _ENV_REF.sub(value, location) if "${" in location else location


# --------------------------------------------------------------------------- secrets (the forms: bcc.remote_secrets)


def display(location: str | os.PathLike) -> str:
    """A location as messages, logs and samples' `__url__` show it (redacted)."""
    return str(location) if isinstance(location, Path) else redact(str(location))


def check_no_secrets(location: str, key: str = "data.shards") -> None:
    """Refuse a location that spells a credential out (URL userinfo with a password, or a query
    parameter that looks like a signature or token): it would be written to config.yaml and logs.
    `${VAR}` references are fine: only the reference is written. A URL of another scheme: `check_scheme`."""
    check_scheme(location, key)
    if kind(location) == "local":
        return
    if redact(location) != location and kind(location) == "pipe":
        raise RemoteError(
            f"{key}: the pipe: command {redact(location)} spells a secret out (a NAME=value, a password, token, "
            "key or cookie option, a user:password, an Authorization header), which would be written to "
            "config.yaml, checkpoints and the logs; leave it in the environment (the command inherits it) or "
            "write ${VAR} in its place")
    if redact(location) != location:
        raise RemoteError(
            f"{key}: {redact(location)} holds a credential, which would be written to config.yaml and the "
            f"logs; put it in the environment instead: {TOKEN_ENV} (Authorization header), ~/.netrc, or "
            "${VAR} in the location (e.g. https://${BCC_DATA_USERINFO}@host/dataset)")


# --------------------------------------------------------------------------- dataset locations


def join(root: str | Path, name: str) -> str | Path:
    """The location of `name` (a manifest's shard entry or `manifest.json`) in the dataset at `root`.

    Local root: a normalised path (lexical, no stat). URL root: resolved like a link on the folder's
    page. `pipe:` root: the template with `{name}` replaced, `name` a plain relative name. An entry that
    is itself a URL or `pipe:` location is returned as it is (the manifest reader decides whether a
    `pipe:` entry may run). Raises RemoteError for a name a `pipe:` template cannot take."""
    if kind(name) != "local":
        return name
    root_kind = kind(root)
    if root_kind == "local":
        return Path(os.path.normpath(os.path.join(str(root), name)))
    if root_kind == "http":  # on the path: the root's query goes to every entry without its own; no fragment
        parts = urllib.parse.urlsplit(str(root))
        base = urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/", query="", fragment=""))
        if urllib.parse.urlsplit(name).scheme:  # urljoin takes "PIPE:x" or " pipe:x" for a URL of its own
            raise RemoteError(f"shard entry {redact(name)!r} is neither a relative name nor an http(s) URL")
        joined = urllib.parse.urlsplit(urllib.parse.urljoin(base, name))
        return urllib.parse.urlunsplit(joined._replace(query=joined.query or parts.query, fragment=""))
    if not is_plain_name(name):
        raise RemoteError(f"shard entry {name!r} is not a plain relative file name, so it cannot go into "
                          f"the pipe: template {root}")
    return str(root).replace("{name}", name)


def _names_several(pattern: str) -> bool:
    """Whether a brace pattern stands for more than one name (found without expanding it all)."""
    try:
        return len(expand(pattern, limit=1)) != 1
    except RemoteError:
        return True


def manifest_location(dataset: str | Path, key: str = "data.shards") -> tuple[str | Path, str | Path]:
    """(root, manifest location) of a dataset location: a folder holds `manifest.json`; a location
    ending in `.json` is the manifest itself (its folder is the root). Raises RemoteError, naming `key`
    (where the user wrote the location: a config key or a command-line option), for a `pipe:` dataset
    without `{name}` and for a brace list (which names shards, not a dataset)."""
    text = str(dataset)
    k = kind(text)
    if k == "pipe":
        if "{name}" not in text:
            raise RemoteError(f"{key}: the pipe: dataset {text} needs {{name}} where the file name goes "
                              "(e.g. pipe:aws s3 cp s3://bucket/dataset/{name} -): bcc reads the dataset's "
                              "manifest.json first, then its shards, through that command")
        return text, join(text, "manifest.json")
    if "{" in text and _names_several(text):
        raise RemoteError(f"{key}: {redact(text)} is a brace list of shards; bcc needs the dataset's "
                          f"manifest.json (sample counts, taxonomy): point {key} at the folder that holds it "
                          "and put the brace list in the manifest's shard entries")
    if k == "http":  # `?query` kept for the manifest and the shards (see `join`), `#fragment` dropped
        parts = urllib.parse.urlsplit(text)._replace(fragment="")
        if parts.path.endswith(".json"):
            return urllib.parse.urlunsplit(parts._replace(path=parts.path.rsplit("/", 1)[0])), parts.geturl()
        root = urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/")))
        return root, join(root, "manifest.json")
    return dataset, dataset


# --------------------------------------------------------------------------- opening


def _auth_headers(url: str) -> tuple[str, dict[str, str]]:
    """(url without userinfo, headers) with the credentials the environment gives for `url`."""
    parts = urllib.parse.urlsplit(url)
    headers = {"User-Agent": "bcc"}
    if parts.username is not None or parts.password is not None:
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        return url, headers
    token = token_for(parts.hostname or "")
    if token:
        headers["Authorization"] = token if " " in token else f"Bearer {token}"
        return url, headers
    try:
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(parts.hostname or "")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        found = None
    if found:
        login, _, password = found
        headers["Authorization"] = "Basic " + base64.b64encode(f"{login}:{password or ''}".encode()).decode()
    return url, headers


def token_for(host: str) -> str | None:
    """`$BCC_HTTP_TOKEN` when it may go to `host`: every host, or only those `$BCC_HTTP_TOKEN_HOSTS`
    lists (comma-separated host names) when that is set."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    hosts = os.environ.get(TOKEN_HOSTS_ENV, "").strip()
    if not token or hosts and host.lower() not in {h.strip().lower() for h in hosts.split(",")}:
        return None
    return token


def sends_token_elsewhere(entry: str, root: str | Path) -> bool:
    """Whether reading the absolute URL `entry` of the manifest at `root` would send `$BCC_HTTP_TOKEN`
    to a host other than the dataset's own, unasked (no `$BCC_HTTP_TOKEN_HOSTS`)."""
    if kind(entry) != "http" or not os.environ.get(TOKEN_ENV, "").strip() or os.environ.get(TOKEN_HOSTS_ENV):
        return False
    host = urllib.parse.urlsplit(expand_env(entry, remember=False)).hostname
    own = urllib.parse.urlsplit(expand_env(str(root), remember=False)).hostname if kind(root) == "http" else None
    return host != own


def _origin(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())


class _Redirect(urllib.request.HTTPRedirectHandler):
    """Follows a redirect; the credentials go along only to the same scheme, host and port. (urllib copies
    the headers added with `add_header` to any host; bcc adds `Authorization` unredirected and puts it
    back here.) A redirect to another host gets no credentials, as a link to it in a manifest would not."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.get_header("Authorization")
        if new is not None and auth and _origin(newurl) == _origin(req.full_url):
            new.add_unredirected_header("Authorization", auth)
        return new


_OPENER = urllib.request.build_opener(_Redirect)


def _http_error(where: str, e: BaseException) -> RemoteError:
    if isinstance(e, urllib.error.HTTPError):
        transient = e.code >= 500 or e.code == 429
        denied = (" (a signed URL: expired, or signed for another request?)" if remote_secrets.is_signed(e.url or "")
                  else " (credentials: set BCC_HTTP_TOKEN or a ~/.netrc entry)")
        hint = {401: denied, 403: denied, 404: " (not found)"}.get(e.code, "")
        return RemoteError(f"{where}: HTTP {e.code} {e.reason}{hint}", transient=transient, missing=e.code in (404, 410),
                           status=e.code)
    reason = getattr(e, "reason", e)
    if isinstance(reason, http.client.InvalidURL):  # control characters, a bad port: no retry cures it
        if "found at least ' '" in str(reason):  # http.client calls a blank a control character
            return RemoteError(f"{where}: not a valid URL: it holds a blank (write a blank in a URL as %20)")
        shown = "" if "${" in where else f" ({reason})"  # the reason may quote a piece of a ${VAR}'s value
        return RemoteError(f"{where}: not a valid URL{shown}")
    if isinstance(reason, socket.gaierror):
        return RemoteError(f"{where}: unknown host ({reason})")
    return RemoteError(f"{where}: cannot reach the host: {reason}", transient=True)


def open_location(location: str | Path, *, method: str = "GET", timeout_s: float = HTTP_TIMEOUT_S) -> Any:
    """A readable binary stream (`read(n)`, `close()`) of the bytes at `location`; a remote read silent for
    `timeout_s` seconds (`data.read_timeout_s`) raises a transient RemoteError.

    Local: the file. http(s): a GET with the environment's credentials (`method="HEAD"` returns the
    response of a HEAD instead). `pipe:`: the command's standard output. Raises RemoteError (transient
    for errors a retry may cure); FileNotFoundError/OSError for a local path."""
    k = kind(location)
    if k == "local":
        return open(location, "rb")
    where = display(location)
    text = expand_env(str(location))
    if k == "pipe":
        from bcc.remote_pipe import PipeOutput  # here: bcc.remote_pipe imports this module

        return PipeOutput(text[len("pipe:"):], where, timeout_s)
    try:
        url, headers = _auth_headers(text)
    except ValueError:  # urlsplit's port: its message would quote a piece of a ${VAR}'s value
        raise RemoteError(f"{where}: not a valid URL once its ${{VAR}}s are filled in (a port that is no number? "
                          "a user:password holding / # ? or @ must be percent-encoded)") from None
    auth = headers.pop("Authorization", None)
    request = urllib.request.Request(url, headers=headers, method=method)
    if auth:
        request.add_unredirected_header("Authorization", auth)  # not to another host (`_Redirect`)
    try:
        with activity.waiting(request_bound(timeout_s), where):
            response = _OPENER.open(request, timeout=timeout_s)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _http_error(where, e) from None
    if method == "HEAD":
        return response
    from bcc.remote_http import HttpBody  # here: bcc.remote_http imports this module

    return HttpBody(response, where, timeout_s)


def _with_retries(action: Callable[[], Any], retries: int) -> Any:
    attempt = 0
    while True:
        try:
            return action()
        except RemoteError as e:
            attempt += 1
            if not e.transient or attempt > retries or is_stopping():
                if attempt > 1:
                    raise type(e)(f"{e} (after {attempt - 1} retr{'y' if attempt == 2 else 'ies'})") from None
                raise
            pause(retry_delay(attempt))


MAX_MANIFEST_BYTES = 1 << 30  # a fetched manifest (side files hold the long per-file lists)


def read_bytes(location: str | Path, retries: int = DEFAULT_RETRIES, limit: int = MAX_MANIFEST_BYTES,
               timeout_s: float = HTTP_TIMEOUT_S, what: str = "a manifest") -> bytes:
    """All bytes at `location` (`what`: a manifest, a side file), re-read up to `retries` times after a
    transient error; RemoteError beyond `limit` bytes (a response that never ends would fill the memory)."""
    def once() -> bytes:
        stream = open_location(location, timeout_s=timeout_s)
        try:
            data = stream.read(limit + 1)
        finally:
            stream.close()
        if len(data) > limit:
            raise RemoteError(f"{display(location)}: more than {limit:,} bytes: not {what}")
        return data

    return _with_retries(once, retries)


HEAD_REFUSED = (400, 401, 403, 405, 501)  # a HEAD answered so may still be a shard a GET reads


def probe(location: str | Path, retries: int = DEFAULT_RETRIES, timeout_s: float = HTTP_TIMEOUT_S) -> int | None:
    """Check that a remote shard can be opened, cheaply: a HEAD request (its size in bytes, or None when
    the server does not say), or for `pipe:` start the command, read its first tar block and stop it
    (None). Raises RemoteError naming the location (404, unreachable host, a failing command)."""
    if kind(location) == "pipe":
        def once() -> None:
            from bcc.shards import tar_header_ok

            stream = open_location(location, timeout_s=timeout_s)
            try:
                block = stream.read(512)
                if len(block) < 512:
                    stream.read()  # the command's exit status decides the error
                    what = f"{len(block)} bytes, less than one tar block: not a shard ({quote_bytes(block)})"
                    raise RemoteError(f"{display(location)}: the command printed {what if block else 'nothing'}")
                if not tar_header_ok(block):
                    raise RemoteError(f"{display(location)}: the command's output does not start with a tar "
                                      f"header (it begins {quote_bytes(block)}): not a shard")
            finally:
                stream.close()

        return _with_retries(once, retries)

    def head() -> int | None:
        try:
            response = open_location(location, method="HEAD", timeout_s=timeout_s)
        except RemoteError as e:
            if e.status not in HEAD_REFUSED:
                raise
            # no HEAD here, or a URL signed for GET only (S3/GCS presigned: 403): the GET decides, opened unread
            response = open_location(location, timeout_s=timeout_s).response
        with response:
            length = response.headers.get("Content-Length")
            return int(length) if length and length.isdigit() else None

    return _with_retries(head, retries)


def probe_all(locations: Iterable[str | Path], retries: int = DEFAULT_RETRIES,
              timeout_s: float = HTTP_TIMEOUT_S) -> dict[str, Any]:
    """`probe` of every location, PROBE_THREADS at a time: {location: size, or the RemoteError}.

    The probes run in daemon threads that an exception of the caller's thread (Ctrl-C, a SIGTERM during
    start-up, `bcc.train.heartbeat`'s stall) leaves behind: a pool would hold the process until every
    probe had waited out its time-outs and retries. Those threads start no new probe once the caller left."""
    locations = list(locations)
    results: dict[str, Any] = {}
    todo = iter(locations)  # shared: each thread takes the next location (next() holds the GIL)
    left = [False]

    def run() -> None:
        for loc in todo:
            if left[0]:
                return
            try:
                results[str(loc)] = probe(loc, retries, timeout_s)
            except Exception as e:  # a RemoteError is the answer; anything else a bug, raised below
                results[str(loc)] = e

    threads = [threading.Thread(target=run, name="bcc-probe", daemon=True)
               for _ in range(min(PROBE_THREADS, len(locations)))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        left[0] = True
    bug = next((e for e in results.values() if isinstance(e, Exception) and not isinstance(e, RemoteError)), None)
    if bug is not None:
        raise bug
    return {str(loc): results[str(loc)] for loc in locations}

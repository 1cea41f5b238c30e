"""Shards where large data lives (bcc.remote): http(s) URLs served by a real HTTP server started here on
127.0.0.1, `pipe:` commands standing in for an object-store client, brace lists, credentials from the
environment only (redacted everywhere), bounded retries that never change the sample order, and the
security rule that a manifest cannot run commands."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import itertools
import json
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from bcc import remote
from bcc.config import load_config
from bcc.manifest import Manifest, ManifestError
from bcc.shards import ShardError, read_range
from bcc.train.preflight import MIN_BYTES_PER_SAMPLE, check_shards
from bcc.train.setup import TrainError

from conftest import launch, launched, trainer_ranks, wait_until, write_config

TOKEN = "s3cr3t-t0ken-value"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; `server.drops[name] = k` cuts the next k GETs of `name` off half-way (the
    headers promise the whole file); `server.trickle[name] = (gap_s, stall_s)` sends `name` in four
    pieces `gap_s` apart, or its first half and then nothing for `stall_s`; `server.slow_head[name] = s` answers
a HEAD of `name` after `s` seconds (its arrival noted in `server.heads`); `server.head_status = code` answers
every HEAD with that error; `server.token` requires `Authorization: Bearer TOKEN` (or Basic
    auth when it is `user:password`)."""

    def log_message(self, *args):  # quiet
        pass

    def _authorised(self) -> bool:
        token = self.server.token
        wanted = ("Basic " + base64.b64encode(token.encode()).decode()) if token and ":" in token else f"Bearer {token}"
        if token and self.headers.get("Authorization") != wanted:
            self.send_error(401, "Unauthorized")
            return False
        return True

    def _redirected(self) -> bool:
        self.server.auths.append(self.headers.get("Authorization"))
        target = self.server.redirects.get(self.path.lstrip("/").split("?")[0])
        if target:
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
        return bool(target)

    def do_HEAD(self):
        name = self.path.lstrip("/").split("?")[0]
        self.server.heads.append(name)
        time.sleep(self.server.slow_head.get(name, 0))
        if self.server.head_status:  # a server without HEAD (405), a URL signed for GET only (403)
            self.send_error(self.server.head_status)
            return
        if not self._redirected() and self._authorised():
            super().do_HEAD()

    def do_GET(self):
        if self._redirected() or not self._authorised():
            return
        name = self.path.lstrip("/").split("?")[0]
        self.server.gets.append(name)
        self.server.paths.append(self.path)
        if self.server.drops.get(name, 0):
            self.server.drops[name] -= 1
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True  # the connection drops mid-shard
            return
        if name in self.server.trickle:
            gap_s, stall_s = self.server.trickle[name]
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            cuts = [0, len(data) // 2] if stall_s else [len(data) * i // 4 for i in range(5)]
            pieces = [data[a:b] for a, b in itertools.pairwise(cuts)]
            for piece in pieces:
                self.wfile.write(piece)
                self.wfile.flush()
                time.sleep(stall_s or gap_s)
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def serve(root: Path, token: str | None = None):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    server.drops, server.gets, server.token, server.trickle = {}, [], token, {}
    server.auths, server.paths, server.redirects = [], [], {}  # Authorization headers seen; raw paths; name -> URL
    server.slow_head, server.heads, server.head_status = {}, [], None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(remote, "RETRY_BACKOFF_S", 0.0)


def assert_gone(signal_0, failure: str, within: float = 10) -> None:
    """Poll `signal_0()` (`os.kill(pid, 0)`, `os.killpg(pgid, 0)`) until the process is gone
    (ProcessLookupError); fail with `failure` after `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            signal_0()
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(failure)


def keys(samples) -> list[tuple[str, bytes]]:
    return [(s["__key__"], s["json"]) for s in samples]


def copy_pack(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("location, expected", [
    ("shards/all", "local"), ("/data/x.tar", "local"), (Path("http://x"), "local"), ("C:/data", "local"),
    ("http://host/ds", "http"), ("HTTPS://host/ds/train-000000.tar", "http"), ("pipe:cat x.tar", "pipe"),
    ("s3://bucket/x.tar", "local"),  # no scheme but http(s) and pipe: is read; s3 goes through pipe:
])
def test_kind(location, expected):
    assert remote.kind(location) == expected


@pytest.mark.parametrize("pattern, expected", [
    ("train-{000000..000002}.tar", ["train-000000.tar", "train-000001.tar", "train-000002.tar"]),
    ("{train,val}-0.tar", ["train-0.tar", "val-0.tar"]),
    ("http://h/a-{0..1}.tar", ["http://h/a-0.tar", "http://h/a-1.tar"]),
    ("pipe:aws s3 cp s3://b/x-{8..10}.tar -", [f"pipe:aws s3 cp s3://b/x-{i}.tar -" for i in (8, 9, 10)]),
    ("pipe:cat /d/{name}", ["pipe:cat /d/{name}"]),  # a template placeholder is not a brace list
    ("plain.tar", ["plain.tar"]),
])
def test_brace_lists_expand_in_order(pattern, expected):
    assert remote.expand(pattern) == expected


@pytest.mark.parametrize("text, hidden, shown", [
    ("https://alice:pw123456@host/ds/x.tar", "pw123456", "https://***@host/ds/x.tar"),
    ("https://b.s3.amazonaws.com/x.tar?X-Amz-Credential=AKIA1234&X-Amz-Signature=abcdef0123&n=1", "abcdef0123",
     "https://b.s3.amazonaws.com/x.tar?X-Amz-Credential=***&X-Amz-Signature=***&n=1"),
    ("https://h/x.tar?sig=zzzzzzzz&token=yyyyyyyy", "yyyyyyyy", "https://h/x.tar?sig=***&token=***"),
    ("pipe:curl -H 'Authorization: Bearer abcdefghijkl' https://h/x.tar", "abcdefghijkl",
     "pipe:curl -H 'Authorization: Bearer ***' https://h/x.tar"),
    ("cannot read shard https://h/x.tar?page=2", None, "cannot read shard https://h/x.tar?page=2"),
    ("https://${BCC_DATA_USERINFO}@h/ds", None, "https://${BCC_DATA_USERINFO}@h/ds"),
])
def test_redact_masks_credentials_only(text, hidden, shown):
    assert remote.redact(text) == shown
    if hidden:
        assert hidden not in remote.redact(text)


def test_env_values_and_the_token_are_redacted(monkeypatch):
    monkeypatch.setenv("BCC_TEST_URL", "https://bob:hunter2hunter2@h.example/ds")
    monkeypatch.setenv(remote.TOKEN_ENV, TOKEN)
    url = remote.expand_env("${BCC_TEST_URL}/x.tar")
    assert url == "https://bob:hunter2hunter2@h.example/ds/x.tar"
    assert remote.redact(f"error at {url} with {TOKEN}") == "error at ${BCC_TEST_URL}/x.tar with ***"
    with pytest.raises(remote.RemoteError, match="BCC_NOT_SET_ANYWHERE is not set"):
        remote.expand_env("https://${BCC_NOT_SET_ANYWHERE}@h/ds")


@pytest.mark.parametrize("location, refused", [
    ("https://alice:pw@host/ds", True), ("https://host/ds/manifest.json?X-Amz-Signature=abc", True),
    ("https://${BCC_DATA_USERINFO}@host/ds", False), ("https://host/ds", False), ("shards/x", False),
    ("pipe:aws s3 cp s3://b/ds/{name} -", False),
    # names the secret-name pattern missed (breaker b12z F8), and a JWT under any name
    ("https://fn.azurewebsites.net/api/ds?code=abc", True), ("https://host/ds?jwt=abc", True),
    ("https://host/ds?sas=abc", True), ("https://host/ds?t=eyJhbGciOiJI.eyJzdWIiOiIx.abcsig", True),
    ("https://host/ds?c%6Fde=abc", True), ("https://host/ds?t=eyJhbGciOiJI%2EeyJzdWIiOiIx%2Eabcsig", True),  # b12r R3
    ("https://host/ds?encoding=gzip&versionId=3HL4kqtJlcpXroDTDmjVBH40Nrjfkd&v=2", False),
])
def test_a_location_that_spells_a_secret_out_is_refused(location, refused):
    if refused:
        with pytest.raises(remote.RemoteError, match=r"environment.*BCC_HTTP_TOKEN") as e:
            remote.check_no_secrets(location)
        assert "pw@" not in str(e.value) and "=abc" not in str(e.value) and "eyJ" not in str(e.value)
    else:
        remote.check_no_secrets(location)


@pytest.mark.parametrize("root, name, expected", [
    (Path("/d/pack"), "train-0.tar", Path("/d/pack/train-0.tar")),
    ("http://h/ds", "train-0.tar", "http://h/ds/train-0.tar"),
    ("http://h/ds/", "sub/train-0.tar", "http://h/ds/sub/train-0.tar"),
    ("http://h/ds", "https://cdn/x.tar", "https://cdn/x.tar"),
    ("pipe:aws s3 cp s3://b/ds/{name} -", "train-0.tar", "pipe:aws s3 cp s3://b/ds/train-0.tar -"),
])
def test_entries_resolve_against_the_dataset(root, name, expected):
    assert remote.join(root, name) == expected


@pytest.mark.parametrize("name", ["x.tar; touch pwned", "$(id).tar", "../x.tar", "a b.tar", "`id`", "x'.tar", ""])
def test_a_pipe_template_takes_plain_names_only(name):
    assert not remote.is_plain_name(name)
    with pytest.raises(remote.RemoteError, match="not a plain relative file name"):
        remote.join("pipe:cat /d/{name}", name)


@pytest.mark.parametrize("location, match", [
    ("pipe:aws s3 cp s3://b/ds/manifest.json -", r"needs \{name\}"),
    ("http://h/ds/train-{000..003}.tar", "brace list of shards"),
])
def test_dataset_locations_that_name_no_dataset(location, match):
    with pytest.raises(remote.RemoteError, match=match):
        remote.manifest_location(location)


def test_config_keys():
    cfg = load_config(overrides=["data.shards=http://h/ds", "data.retries=0"])
    assert cfg.data.retries == 0 and cfg.data.allow_pipe_in_manifest is False
    assert cfg.data.read_timeout_s == remote.HTTP_TIMEOUT_S == 60
    assert load_config(overrides=["data.read_timeout_s=2.5"]).data.read_timeout_s == 2.5
    with pytest.raises(Exception, match="data.retries"):
        load_config(overrides=["data.retries=-1"])
    for bad in ("0", "-1", "1e9", "nan", "soon"):
        with pytest.raises(Exception, match=r"data.read_timeout_s: (must be|expected)"):
            load_config(overrides=[f"data.read_timeout_s={bad}"])


def test_the_read_timeout_is_the_configured_one_for_http_and_pipe():
    """data.read_timeout_s bounds a silent server and a silent pipe: command (the manifest's fetch here,
    as `bcc train` does it through load_data); the default would wait 60 s."""
    import time

    from bcc.config import DataConfig
    from bcc.sources import load_data

    with socket.socket() as s:  # a server that takes the connection and never answers
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        for shards, match in [(f"http://127.0.0.1:{s.getsockname()[1]}/ds", "timed out"),
                              ("pipe:sleep 30; cat /d/{name}", r"printed nothing for 0.5 s")]:
            t0 = time.monotonic()
            with pytest.raises(ManifestError, match=match):
                load_data(DataConfig(shards=shards, retries=0, read_timeout_s=0.5))
            assert time.monotonic() - t0 < 10


# --------------------------------------------------------------------------- reading over HTTP and pipe:


def test_a_pack_read_over_http_and_pipe_is_the_local_pack(synth_shards, monkeypatch):
    """Manifest fetched from the URL (folder, folder/, manifest.json) and through a pipe: command
    standing in for an object-store client; every shard and a grid of ranges read as from the disk."""
    local = Manifest.load(synth_shards)
    monkeypatch.setenv(remote.TOKEN_ENV, TOKEN)
    with serve(synth_shards, token=TOKEN) as (_, url):
        for form in (url, url + "/", url + "/manifest.json"):
            assert Manifest.load(form).split("train").shards[0].path == url + "/train-000000.tar"
        over_http = Manifest.load(url)
        over_pipe = Manifest.load(f"pipe:cat {synth_shards}/{{name}}")
        assert over_http.is_remote and over_http.shown == url + "/manifest.json"
        for name in local.splits:
            want = local.split(name)
            for got in (over_http.split(name), over_pipe.split(name)):
                assert (got.count, got.class_counts) == (want.count, want.class_counts)
                for a, b in zip(want.shards, got.shards, strict=True):
                    assert keys(read_range(b)) == keys(read_range(a))
        shard_l, shard_h = local.split("train").shards[0], over_http.split("train").shards[0]
        for lo, hi in [(0, 1), (3, 9), (shard_l.count - 1, shard_l.count)]:
            assert keys(read_range(shard_h, lo, hi, frozenset({lo + 1}))) == \
                keys(read_range(shard_l, lo, hi, frozenset({lo + 1})))
        assert shard_h.path in [f"{url}/{sh.path.name}" for sh in local.split("train").shards]
        check_shards(over_http.split("train"))  # HEADs pass, sizes fit
        check_shards(over_pipe.split("val"))


def test_the_start_up_check_probes_every_split_s_remote_shards_in_one_pool(synth_shards, monkeypatch):
    """train, val and test shards over http go to one `probe_all` (PROBE_THREADS at a time), not one
    split after another: a slow server costs the slowest probe, not the sum over splits."""
    from bcc.train.preflight import check_run

    calls = []
    real = remote.probe_all
    monkeypatch.setattr(remote, "probe_all", lambda locs, *a, **k: calls.append(list(locs)) or real(locs, *a, **k))
    local = Manifest.load(synth_shards)
    with serve(synth_shards) as (_, url):
        cfg = load_config(None, [f"data.shards={url}", "model.backbone=test_resnet"])
        check_run(cfg, Manifest.load(url))
    want = sorted(f"{url}/{s.path.name}" for n in ("train", "val", "test") for s in local.split(n).shards)
    assert len(calls) == 1 and sorted(calls[0]) == want


def test_credentials_from_env_vars_never_show(synth_shards, monkeypatch, capsys):
    """`${VAR}` in data.shards: userinfo from the environment becomes Basic auth; messages show `${VAR}`."""
    with serve(synth_shards, token="alice:wonderland-pw") as (_, url):
        monkeypatch.setenv("BCC_TEST_DATA_URL", url.replace("http://", "http://alice:wonderland-pw@"))
        manifest = Manifest.load("${BCC_TEST_DATA_URL}")
        assert manifest.shown == "${BCC_TEST_DATA_URL}/manifest.json"
        shard = manifest.split("val").shards[0]
        assert len(keys(read_range(shard))) == shard.count
        assert shard.path == "${BCC_TEST_DATA_URL}/" + Path(shard.path).name  # expanded only as it is opened
        monkeypatch.setenv("BCC_TEST_DATA_URL", url.replace("http://", "http://alice:wrong-pw@"))
        with pytest.raises(ManifestError, match=r"^data.shards: cannot fetch the manifest \$\{BCC_TEST_DATA_URL\}/manifest.json: "
                                                r"HTTP 401 .*credentials") as e:
            Manifest.load("${BCC_TEST_DATA_URL}", retries=0)
        assert "wrong-pw" not in str(e.value)
    with pytest.raises(ManifestError, match=r"https://\*\*\*@h/ds holds a credential"):
        Manifest.load("https://alice:wonderland-pw@h/ds")


def test_a_dropped_connection_resumes_at_the_failed_sample(synth_shards, no_backoff):
    local = Manifest.load(synth_shards).split("train").shards[1]
    with serve(synth_shards) as (server, url):
        shard = Manifest.load(url).split("train").shards[1]
        name = Path(shard.path).name
        server.drops[name] = 1
        assert keys(read_range(shard, retries=1)) == keys(read_range(local))  # same samples, same order
        assert server.gets.count(name) == 2 and server.drops[name] == 0
        server.drops[name] = 99  # a server that always fails: a named error within the bound
        with pytest.raises(ShardError, match=rf"^cannot read shard {url}/{name} at sample \d+ \(after 2 "
                                             r"retries\): .*connection closed after \d+ of \d+ bytes") as e:
            list(read_range(shard, retries=2))
        assert int(str(e.value).split(" at sample ")[1].split()[0]) > 0  # it failed half-way, not at 0
        assert server.gets.count(name) == 2 + 3  # one read and two re-opens


def test_bad_remote_inputs_are_named(synth_shards, tmp_path, no_backoff):
    pack = copy_pack(synth_shards, tmp_path / "pack")
    shards = Manifest.load(pack).split("train").shards
    gone, short = shards[1].path, shards[2].path
    gone.unlink()
    short.write_bytes(short.read_bytes()[: shards[2].count * MIN_BYTES_PER_SAMPLE - 512])  # below the bound
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/ds"
    with pytest.raises(ManifestError, match=rf"{dead}/manifest.json: cannot reach the host.*\(after 1 retry\)"):
        Manifest.load(dead, retries=1)
    with serve(pack) as (_, url):
        with pytest.raises(ManifestError, match=rf"{url}/nowhere/manifest.json: HTTP 404"):
            Manifest.load(url + "/nowhere")
        split = Manifest.load(url).split("train")
        with pytest.raises(TrainError, match=rf"split 'train': cannot open remote shard {url}/{gone.name}: HTTP 404"):
            check_shards(split)
        only_short = type(split)(split.name, sum(s.count for s in split.shards[2:3]), {}, split.shards[2:3])
        with pytest.raises(TrainError, match=rf"truncated or not a shard: {url}/{short.name} \(\d+ bytes.*; copy \(or "
                                             r"upload\) it again from the packed output, or repack it"):
            check_shards(only_short)
        # a truncated remote shard at read time: named with the sample where it ends
        with pytest.raises(ShardError, match=rf"{url}/{short.name}.*(at sample|ends before sample) \d+"):
            list(read_range(split.shards[2], retries=0))
    # a pipe: command that fails: exit code and the tail of its stderr, after the retries
    script = tmp_path / "fake-s3"
    script.write_text("#!/bin/sh\necho 'fetching s3://bucket/ds/'\"$1\" >&2\necho 'AccessDenied: no such bucket' >&2\n"
                      "exit 3\n")
    script.chmod(0o755)
    failing = Manifest.load(f"pipe:cat {synth_shards}/{{name}}").split("train").shards[0]
    failing = type(failing)(failing.path.replace("cat ", f"{script} "), failing.count, "")
    with pytest.raises(ShardError, match=r"exited with code 3; its stderr ends: fetching s3://bucket/ds/.* \| "
                                         r"AccessDenied: no such bucket") as e:
        list(read_range(failing, retries=1))
    assert "(after 1 retry)" in str(e.value)
    with pytest.raises(TrainError, match="cannot open remote shard pipe:.*exited with code 3"):
        check_shards(type(split)("train", failing.count, {}, [failing]), retries=0)


@pytest.mark.parametrize("status", [403, 405])
def test_a_shard_whose_head_is_refused_is_probed_with_a_get(synth_shards, tmp_path, status, no_backoff):
    """S3 and GCS presigned URLs are signed for GET: a HEAD answers 403, and the start-up check refused
    every shard of such a manifest although the stream could read them (breaker b12z F1). A HEAD answered
    400/401/403/405/501 is now followed by the GET the stream sends, which decides; a signed URL refused
    is not told to set BCC_HTTP_TOKEN (a token would go to the store as well)."""
    pack = copy_pack(synth_shards, tmp_path / "pack")
    shards = Manifest.load(pack).split("train").shards
    shards[1].path.unlink()
    signed = "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA1%2Fs3&X-Amz-Signature=0123abcd"
    with serve(pack) as (server, url):
        server.head_status = status
        first = f"{url}/{shards[0].path.name}{signed}"
        assert remote.probe(first, retries=0) == shards[0].path.stat().st_size
        assert server.gets == [shards[0].path.name]
        with pytest.raises(remote.RemoteError, match=rf"{shards[1].path.name}.*: HTTP 404 .*\(not found\)"):
            remote.probe(f"{url}/{shards[1].path.name}{signed}", retries=0)
        server.token = TOKEN  # the GET refused too: the error is the GET's, with the hint for a signed URL
        with pytest.raises(remote.RemoteError, match=r"HTTP 401 .*\(a signed URL: expired, or signed for another "
                                                     r"request\?\)") as e:
            remote.probe(first, retries=0)
        assert "0123abcd" not in str(e.value) and "BCC_HTTP_TOKEN" not in str(e.value)
        with pytest.raises(remote.RemoteError, match=r"HTTP 401 .*\(credentials: set BCC_HTTP_TOKEN"):
            remote.probe(f"{url}/{shards[0].path.name}", retries=0)


def test_a_corrupt_remote_shard_is_not_called_truncated(synth_shards, tmp_path, no_backoff):
    """A shard whose first sample is fine but is followed by garbage is corrupt (not a valid tar past byte
    N), over http and pipe:, as a local one is; a short one is still a truncated copy."""
    from bcc.shards import sample_offset

    pack = copy_pack(synth_shards, tmp_path / "pack")
    shards = Manifest.load(pack).split("train").shards
    bad, short = shards[0].path, shards[1].path
    cut, _ = sample_offset(str(bad), 1)  # where the second sample's header starts
    data = bad.read_bytes()
    bad.write_bytes(data[:cut] + bytes((i * 7 + 13) % 256 for i in range(len(data) - cut)))
    short.write_bytes(short.read_bytes()[:cut])  # whole samples, then the end: a truncated copy
    with serve(pack) as (_, url):
        for where in (pack, url, f"pipe:cat {pack}/{{name}}"):
            split = Manifest.load(where).split("train")
            shown = remote.display(split.shards[0].path)
            with pytest.raises(ShardError, match=rf"^cannot read shard {re.escape(shown)} at sample \d+: corrupt: not "
                                                 rf"a valid tar past byte {cut} ") as e:
                list(read_range(split.shards[0], retries=0))
            assert "truncated" not in str(e.value)
            with pytest.raises(ShardError, match=r"ends before sample \d+: a truncated copy"):
                list(read_range(split.shards[1], retries=0))


# --------------------------------------------------------------------------- security


def _manifest_with_entry(src: Path, dst: Path, entry, **extra) -> Path:
    pack = copy_pack(src, dst)
    data = json.loads((pack / "manifest.json").read_text())
    data["splits"]["train"]["shards"][0] = {**data["splits"]["train"]["shards"][0], "path": entry, **extra}
    (pack / "manifest.json").write_text(json.dumps(data))
    return pack


def test_a_manifest_cannot_run_commands(synth_shards, tmp_path):
    marker = tmp_path / "pwned"
    entry = f"pipe:touch {marker}; cat {synth_shards}/train-000000.tar"
    pack = _manifest_with_entry(synth_shards, tmp_path / "evil", entry)
    with pytest.raises(ManifestError, match=r"split 'train': the shard entry 'pipe:touch .*pwned; cat .*' is a "
                                            r"pipe: command; a manifest may not run commands.*allow_pipe_in_manifest"):
        Manifest.load(pack)
    with serve(pack) as (_, url):  # fetched from a URL: the same
        with pytest.raises(ManifestError, match="may not run commands"):
            Manifest.load(url)
        with pytest.raises(ManifestError, match="may not run commands"):  # even with the user's pipe: template
            Manifest.load(f"pipe:cat {pack}/{{name}}")
    assert not marker.exists()
    # the user allows it for a manifest they wrote: honoured
    shard = Manifest.load(pack, allow_pipe=True).split("train").shards[0]
    assert keys(read_range(shard)) == keys(read_range(Manifest.load(synth_shards).split("train").shards[0]))
    assert marker.exists()
    # a name smuggling shell syntax into the user's pipe: template is refused before anything runs
    evil = _manifest_with_entry(synth_shards, tmp_path / "evil2", f"x.tar;touch {tmp_path}/pwned2")
    with pytest.raises(ManifestError, match="not a plain relative file name"):
        Manifest.load(f"pipe:cat {evil}/{{name}}")
    assert not (tmp_path / "pwned2").exists()
    # the third breaker's: a fetched manifest's `PIPE:` or ` pipe:` entry passed the check and then ran,
    # because joining it to the dataset URL (urljoin) made it a lower-case `pipe:` location
    for k, entry in enumerate([f"PIPE:touch {marker}3", f" pipe:touch {marker}3", f"Pipe:touch {marker}3\n"]):
        shifty = _manifest_with_entry(synth_shards, tmp_path / f"shifty{k}", entry)
        with serve(shifty) as (_, url):
            for where, allow in ((url, False), (url, True), (shifty, True)):
                with pytest.raises(ManifestError, match=r"spells pipe: in another case|leading or trailing blanks"):
                    Manifest.load(where, allow_pipe=allow)
    with pytest.raises(remote.RemoteError, match="neither a relative name nor an http"):
        remote.join("http://127.0.0.1:9/ds", f"PIPE:touch {marker}3")
    assert not Path(f"{marker}3").exists()


def test_a_manifest_cannot_read_environment_variables(synth_shards, tmp_path, monkeypatch):
    """`${VAR}` is the user's way to name a credential; in a manifest entry it would send any variable
    (AWS_SECRET_ACCESS_KEY, HF_TOKEN, ...) to the host the entry names, so it is refused by name. So is a
    fetched manifest's entry that resolves to a local path (another scheme: `PIPE:`, `file:`)."""
    monkeypatch.setenv("MY_SECRET", "hunter2-secret")
    for i, entry in enumerate(["http://127.0.0.1:9/leak/${MY_SECRET}.tar", "leak/${MY_SECRET}.tar", "${MY_SECRET}"]):
        pack = _manifest_with_entry(synth_shards, tmp_path / f"env{i}", entry)
        with serve(pack) as (server, url):
            for where in (pack, url):
                with pytest.raises(ManifestError, match=r"split 'train': the shard entry .*\$\{MY_SECRET\}.* names "
                                                        r"an environment variable"):
                    Manifest.load(where)
            assert not any("hunter2" in g for g in server.gets)
    pack = _manifest_with_entry(synth_shards, tmp_path / "scheme", f"file://{synth_shards}/train-000000.tar")
    with serve(pack) as (_, url):
        with pytest.raises(ManifestError, match=r"split 'train': shard entry 'file://.*' is neither a relative name "
                                                r"nor an http\(s\) URL"):
            Manifest.load(url)


def test_the_token_goes_only_where_the_user_sends_it(synth_shards, tmp_path, monkeypatch):
    pack = _manifest_with_entry(synth_shards, tmp_path / "p", "https://elsewhere.example/train-000000.tar")
    assert Manifest.load(pack).split("train").shards[0].path == "https://elsewhere.example/train-000000.tar"
    monkeypatch.setenv(remote.TOKEN_ENV, TOKEN)
    with pytest.raises(ManifestError, match=r"'https://elsewhere.example/train-000000.tar' is on another host than "
                                            r"the dataset, which would receive \$BCC_HTTP_TOKEN; set BCC_HTTP_TOKEN_HOSTS"):
        Manifest.load(pack)
    monkeypatch.setenv(remote.TOKEN_HOSTS_ENV, "data.example, cdn.example")
    Manifest.load(pack)
    assert remote.token_for("DATA.example") == TOKEN and remote.token_for("elsewhere.example") is None


def test_data_sources_take_urls_and_refuse_pipe_entries_too(synth_shards, tmp_path):
    from bcc.config import DataConfig, SourceConfig
    from bcc.sources import load_data

    evil = _manifest_with_entry(synth_shards, tmp_path / "evil", f"pipe:cat {synth_shards}/train-000000.tar")
    with serve(synth_shards) as (_, url):
        mixed = load_data(DataConfig(sources=(SourceConfig(shards=url, name="web"),
                                              SourceConfig(shards=f"pipe:cat {synth_shards}/{{name}}", name="s3"))))
        local = Manifest.load(synth_shards).split("train")
        assert mixed.split("train").count == 2 * local.count
        with pytest.raises(ManifestError, match="may not run commands"):
            load_data(DataConfig(sources=(SourceConfig(shards=url), SourceConfig(shards=str(evil)))))
    assert load_data(DataConfig(shards=str(evil), allow_pipe_in_manifest=True)).split("train").count == local.count


def test_pipe_in_a_manifest_fails_training_with_one_line(synth_shards, tmp_path, capsys):
    from bcc.cli import main

    pack = _manifest_with_entry(synth_shards, tmp_path / "evil", f"pipe:cat {synth_shards}/train-000000.tar")
    cfg = write_config(tmp_path / "cfg.yaml", pack, tmp_path / "run")
    assert main(["train", "--config", str(cfg)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "pipe:cat" in lines[0] and "train-000000.tar" in lines[0] and "allow_pipe_in_manifest" in lines[0]
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_brace_entries_in_a_manifest(synth_shards, tmp_path):
    pack = copy_pack(synth_shards, tmp_path / "pack")
    data = json.loads((pack / "manifest.json").read_text())
    shards = data["splits"]["train"]["shards"]
    n = len(shards)
    assert [s["path"] for s in shards] == [f"train-{i:06d}.tar" for i in range(n)]
    data["splits"]["train"]["shards"] = [{"path": f"train-{{000000..{n - 1:06d}}}.tar",
                                          "count": [s["count"] for s in shards],
                                          "sha256": [s["sha256"] for s in shards]}]
    (pack / "manifest.json").write_text(json.dumps(data))
    want = Manifest.load(synth_shards).split("train").shards
    assert [(s.path.name, s.count, s.sha256) for s in Manifest.load(pack).split("train").shards] == \
        [(s.path.name, s.count, s.sha256) for s in want]
    data["splits"]["train"]["shards"][0]["count"] = [1, 2]
    (pack / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=rf"names {n} shards but its count lists 2"):
        Manifest.load(pack)


def test_a_redirect_to_another_host_gets_no_credentials(synth_shards, tmp_path, monkeypatch):
    """The token (and a ~/.netrc login) follow a redirect on the same scheme, host and port only: a
    trusted server answering 302 to another host must not hand it the credentials."""
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine 127.0.0.1 login alice password pw-of-alice\n")
    netrc_file.chmod(0o600)
    raw = (synth_shards / "manifest.json").read_bytes()
    with serve(synth_shards) as (a, url_a), serve(synth_shards) as (b, url_b):
        other = url_b.replace("127.0.0.1", "localhost")
        a.redirects = {"moved.json": f"{url_a}/manifest.json", "away.json": f"{other}/manifest.json"}
        for env in ({remote.TOKEN_ENV: TOKEN, remote.TOKEN_HOSTS_ENV: "127.0.0.1"}, {"NETRC": str(netrc_file)}):
            for name in (remote.TOKEN_ENV, remote.TOKEN_HOSTS_ENV, "NETRC"):
                monkeypatch.delenv(name, raising=False)
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            a.auths.clear(), b.auths.clear()
            assert remote.read_bytes(f"{url_a}/moved.json") == raw  # same host: the credentials go along
            assert len(a.auths) == 2 and a.auths[0] and a.auths[1] == a.auths[0]
            assert remote.read_bytes(f"{url_a}/away.json") == raw
            assert b.auths == [None], f"{env}: {b.auths}"


def test_a_url_query_is_kept_and_a_fragment_dropped(synth_shards):
    local = Manifest.load(synth_shards).split("train").shards[0]
    with serve(synth_shards) as (server, url):
        for dataset in (f"{url}?v=1", f"{url}/?v=1#top", f"{url}/manifest.json?v=1"):
            shard = Manifest.load(dataset).split("train").shards[0]
            assert shard.path == f"{url}/{local.path.name}?v=1"
            assert remote.read_bytes(shard.path) == local.path.read_bytes()
        assert set(server.paths) == {"/manifest.json?v=1", f"/{local.path.name}?v=1"}


@pytest.mark.parametrize("command", [
    "pipe:env AWS_SECRET_ACCESS_KEY=wJalrSEKRIT cat /d/{name}", "pipe:GITHUB_TOKEN=wJalrSEKRIT gh get {name}",
    "pipe:curl --password wJalrSEKRIT h/{name}", "pipe:tool --api-key=wJalrSEKRIT {name}",
    "pipe:curl -H 'Authorization: wJalrSEKRIT' h/{name}", "pipe:curl -H 'X-Api-Key: wJalrSEKRIT' h/{name}",
    "pipe:sh -c 'DB_PASSWORD=wJalrSEKRIT cat /d/{name}'", "pipe:curl -s -u user:wJalrSEKRIT h/{name}",
    "pipe:curl --user=user:wJalrSEKRIT h/{name}", "pipe:curl --proxy-user me:wJalrSEKRIT h/{name}",
    "pipe:curl --user 'me:wJalrSEKRIT' h/{name}", 'pipe:curl -u "me:wJalrSEKRIT" h/{name}',
    "pipe:curl -ume:wJalrSEKRIT h/{name}", "pipe:curl -su me:wJalrSEKRIT h/{name}", "pipe:curl -E c.pem:wJalrSEKRIT h/{name}",
    "pipe:s3cmd --secret_key=wJalrSEKRIT get {name}", "pipe:rclone --s3-secret-access-key wJalrSEKRIT cat r:{name}",
    "pipe:az --account-key wJalrSEKRIT get {name}", "pipe:lftp -u me,wJalrSEKRIT h/{name}",
    "pipe:smbclient -U me%wJalrSEKRIT //h/{name}", "pipe:curl -H 'Cookie: sid=wJalrSEKRIT' h/{name}",
    "pipe:curl --cookie sid=wJalrSEKRIT h/{name}", "pipe:sshpass -p wJalrSEKRIT ssh h cat /d/{name}",
    "pipe:sshpass -pwJalrSEKRIT ssh h cat /d/{name}", "pipe:sshpass -v -p 'wJalrSEKRIT' scp h:/d/{name} /dev/stdout",
    "pipe:sshpass -P assword -p wJalrSEKRIT ssh h cat /d/{name}",
    # the third breaker's: any header named like a credential, SSHPASS=, rclone's backend passwords and
    # keys, a literal password after a ${USER}
    "pipe:curl -s -H 'X-Secret: wJalrSEKRIT' h/{name}", "pipe:curl --header='X-Auth-Token: wJalrSEKRIT' h/{name}",
    "pipe:SSHPASS=wJalrSEKRIT sshpass -e ssh h cat /d/{name}", "pipe:rclone cat --webdav-pass wJalrSEKRIT r:{name}",
    "pipe:rclone cat --azureblob-key=wJalrSEKRIT r:{name}", "pipe:rclone cat --sftp-pass wJalrSEKRIT r:{name}",
    'pipe:curl -u "${USER}:wJalrSEKRIT" h/{name}',
    # short forms whose meaning depends on the tool (fourth breaker)
    "pipe:curl -s -b 'sid=wJalrSEKRIT' h/{name}", "pipe:curl -s -bsid=wJalrSEKRIT h/{name}",
    "pipe:swift download -K wJalrSEKRIT c {name} -o -", "pipe:ossutil cat oss://b/{name} -k wJalrSEKRIT -i LTAIid",
    "pipe:swift --key wJalrSEKRIT download c {name} -o -", "pipe:swift --key=wJalrSEKRIT download c {name} -o -",
    "pipe:curl --oauth2-bearer wJalrSEKRIT h/{name}", "pipe:curl --oauth2-bearer 'wJalrSEKRIT' h/{name}",
    "pipe:rclone cat :s3,access_key_id=AKIA1,secret_access_key=wJalrSEKRIT:b/{name}",  # rclone connection strings
    "pipe:rclone cat :sftp,host=h,user=u,pass=wJalrSEKRIT:/d/{name}",
    # MinIO's client: the secret key is a positional (mc alias set ALIAS URL ACCESS SECRET; older mc config host add)
    "pipe:mc alias set m https://minio:9000 AKIA1 wJalrSEKRIT >/dev/null && mc cat m/b/{name}",
    "pipe:mc config host add m https://minio:9000 AKIA1 'wJalrSEKRIT' && mc cat m/b/{name}",
])
def test_a_pipe_command_that_spells_a_secret_out_is_refused(command):
    with pytest.raises(remote.RemoteError, match=r"spells a secret out.*\$\{VAR\}") as e:
        remote.check_no_secrets(command)
    assert "wJalrSEKRIT" not in str(e.value)
    # the message's own text is not masked as if it held a secret (it said 'sshpass -p *** Authorization')
    assert "a password, token, key or cookie option, a user:password, an Authorization header)" in str(e.value)


def test_a_pipe_command_with_secrets_from_the_environment_is_accepted(synth_shards, tmp_path, monkeypatch):
    from bcc.config import load_config

    monkeypatch.setenv("BCC_TEST_SECRET", "wJalrSEKRIT")
    for ok in ("pipe:env AWS_SECRET_ACCESS_KEY=${BCC_TEST_SECRET} AWS_ACCESS_KEY_ID=AKIA1 cat /d/{name}",
               "pipe:curl -H 'Authorization: Bearer ${BCC_TEST_SECRET}' h/{name}", "pipe:aws s3 cp s3://b/{name} -",
               "pipe:curl -u '${BCC_TEST_SECRET}' h/{name}", "pipe:curl -u me h/{name}", "pipe:curl -sf http://h:80/{name}",
               "pipe:tool --access-key-id AKIA1 get {name}", "pipe:sshpass -e ssh h cat /d/{name}",
               "pipe:sshpass -p \"${BCC_TEST_SECRET}\" ssh h cat /d/{name}", "pipe:sshpass -f ~/.pw ssh h cat /d/{name}",
               "pipe:curl -H 'Accept: application/x-tar' h/{name}", 'pipe:curl -u "${USER}:${BCC_TEST_SECRET}" h/{name}',
               "pipe:mc alias set m https://minio:9000 AKIA1 ${BCC_TEST_SECRET} >/dev/null && mc cat m/b/{name}",
               "pipe:rclone cat --sftp-key-file ~/.ssh/id r:{name}", "pipe:curl --key ~/k.pem h/{name}",
               "pipe:curl -k https://h/{name}", "pipe:curl -sk -K ~/.curlrc https://h/{name}",
               "pipe:curl -b ~/cookies.txt h/{name}", "pipe:swift download -K ${BCC_TEST_SECRET} c {name} -o -",
               "pipe:env FOO=a,b cat /d/{name}", "pipe:rclone cat :s3,env_auth=true,region=x:b/{name}"):
        remote.check_no_secrets(ok)
    env = f"pipe:env AWS_SECRET_ACCESS_KEY=${{BCC_TEST_SECRET}} cat {synth_shards}/{{name}}"
    assert Manifest.load(env).split("train").count == Manifest.load(synth_shards).split("train").count
    with pytest.raises(ManifestError, match="spells a secret out") as e:
        Manifest.load(f"pipe:env AWS_SECRET_ACCESS_KEY=wJalrSEKRIT cat {synth_shards}/{{name}}")
    assert "wJalrSEKRIT" not in str(e.value)
    # a command holding ': ' on the command line stays one string (not a YAML map)
    cmd = "pipe:sh -c 'echo note: x >&2; cat /d/{name}'"
    assert load_config(overrides=[f"data.shards={cmd}"]).data.shards == cmd


def test_a_stalled_pipe_times_out_and_ends_its_process_group(monkeypatch):
    """A command that stops printing is ended (with what it started) and raises a transient PipeError,
    which the shard reader retries, instead of hanging the run; a command printing garbage is refused by
    the probe (its first block is not a tar header) before training starts."""
    import os
    import time

    from bcc import remote_pipe

    stream = remote.open_location("pipe:printf abc; sleep 30", timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(remote_pipe.PipeError, match=r"went silent for 0.5 s after 3 bytes \(stalled; "
                                                    r"data.read_timeout_s\)") as e:
        stream.read(100)
    assert e.value.transient and time.monotonic() - t0 < 10
    pgid = stream.proc.pid
    stream.close()
    # `sleep 30`, started by the shell, is gone too (once init reaps it)
    assert_gone(lambda: os.killpg(pgid, 0), "the pipe command's process group outlived close()")
    with pytest.raises(remote.RemoteError, match="does not start with a tar header"):
        remote.probe("pipe:head -c 2048 /dev/urandom", retries=0)
    with pytest.raises(remote.RemoteError, match="more than 1,000 bytes: not a manifest"):
        remote.read_bytes("pipe:yes", retries=0, limit=1000)  # an endless manifest filled 24 GB before


def test_sigterm_ends_a_run_stalled_on_a_pipe_promptly(synth_shards, tmp_path):
    """A SIGTERM to a `bcc train` whose loader worker is waiting on a silent pipe: command: the run ends in
    seconds (not after data.read_timeout_s x (1 + data.retries)) with one error line, and the command's
    process group is gone; sent to the trainer process alone, it is passed on to its loader workers."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "stalled-pids"
    script = tmp_path / "fetch"  # train shards: a few blocks, then silence; the rest whole
    script.write_text(f'#!/bin/sh\ncase "$1" in train-*) head -c 3000 "{synth_shards}/$1"; echo $$ >> {pids}; '
                      f'exec sleep 300;; *) exec cat "{synth_shards}/$1";; esac\n')
    script.chmod(0o755)
    cfg = write_config(tmp_path / "cfg.yaml", f"pipe:{script} {{name}}", tmp_path / "run",
                       train={"epochs": 1}, eval={"test_at_end": False})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "bcc", "train", "--config", str(cfg)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    try:
        stalled, seen, deadline = None, set(), time.monotonic() + 120
        while stalled is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)  # the probe's commands end at once; the training read's stays: alive twice running
            live = {int(p) for p in pids.read_text().split()} if pids.exists() else set()
            live = {p for p in live if alive(p)}
            stalled, seen = next(iter(live & seen), None), live
        assert stalled is not None, "no read stalled on the pipe command"
        # to the trainer alone (a launcher passing it on, `kill PID`): it must reach the loader worker that
        # reads the pipe (Slurm's SIGTERM to the whole step reaches it directly, through the same handler)
        os.kill(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=50)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert took < 20, (took, err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "asked to terminate" in lines[0], err[-3000:]
    assert "retr" not in lines[0]  # nothing re-opened after the termination request
    time.sleep(1)
    assert not alive(stalled), "the pipe command outlived the run"


def test_brace_bounds_are_read_from_the_pattern():
    for pattern, names in [("a-{000..127}.tar", 128), ("{a,b}-{0..9}", 20), ("{0..10..2}", 6), ("{a..z}", 26),
                           ("x.tar", 1), ("{name}", 1), ("{a,{b,c}}", 3)]:
        assert len(remote.expand(pattern)) == names <= remote.count_bound(pattern)
    assert remote.count_bound("{{0..99999999},x}.tar") > 10**8
    # nested lists count exactly (a 16-shard entry was refused as naming more than its 16 sha256s)
    for pattern, names in [("train-0000{0{0..9},1{0..5}}.tar", 16), ("{a..c}{x,{1..3}y}", 12), ("{a,}{1..3}", 6),
                           (r"\{a,b\}x{1,2}", 2), ("p{1..3}{a}", 3)]:
        assert remote.count_bound(pattern) == len(remote.expand(pattern)) == names, pattern
    assert len(remote.expand("train-0000{0{0..9},1{0..5}}.tar", limit=16)) == 16
    with pytest.raises(remote.RemoteError, match="names more than 5 shards"):
        remote.expand("a-{0..99999999}.tar", limit=5)  # refused before braceexpand builds the range


def test_pack_verify_reads_a_remote_pack(synth_shards, tmp_path, capsys):
    from bcc.cli import main

    pack = copy_pack(synth_shards, tmp_path / "pack")
    with serve(pack) as (_, url):
        for where in (url, f"pipe:cat {pack}/{{name}}"):
            assert main(["pack", "--verify", where]) == 0, capsys.readouterr()
            out = capsys.readouterr().out
            assert "all" in out and "shards match the manifest" in out and "OK" in out
        shard = Manifest.load(pack).split("train").shards[1].path
        data = bytearray(shard.read_bytes())
        data[700] ^= 1
        shard.write_bytes(bytes(data))
        assert main(["pack", "--verify", url]) == 1
        out = capsys.readouterr().out
        assert f"{url}/{shard.name}: sha256" in " ".join(out.split()), out
        (pack / "val-000000.tar").unlink()
        assert main(["pack", "--verify", url]) == 1
        assert "HTTP 404" in capsys.readouterr().out


def test_a_bad_dataset_location_is_named_by_what_the_user_wrote(synth_shards, bcc_main):
    """`bcc pack --verify LOC` names --verify, a data.sources entry its own key (they said data.shards)."""
    from bcc.config import DataConfig, SourceConfig
    from bcc.sources import load_data

    for location, match in [(f"pipe:cat {synth_shards}/manifest.json", "the pipe: dataset .* needs {name}"),
                            ("https://alice:wonderland-pw@h/ds", r"https://\*\*\*@h/ds holds a credential"),
                            (f"{synth_shards}/train-{{000000..000003}}.tar", "is a brace list of shards; .* point "
                                                                              "--verify at the folder")]:
        proc = bcc_main("pack", "--verify", location)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert re.match(rf"error: --verify: .*{match}", lines[0]) and "data.shards" not in lines[0], lines[0]
    with pytest.raises(ManifestError, match=r"^data.sources\[1\].shards: the pipe: dataset"):
        load_data(DataConfig(sources=(SourceConfig(shards=str(synth_shards)), SourceConfig(shards="pipe:cat x"))))
    # an unreachable source is named by its key too (the URL alone does not say which of several it is)
    with pytest.raises(ManifestError, match=r"^data.sources\[1\].shards: cannot fetch the manifest http://127.0.0.1:9/"):
        load_data(DataConfig(sources=(SourceConfig(shards=str(synth_shards)),
                                      SourceConfig(shards="http://127.0.0.1:9/ds")), retries=0))


def test_quoted_bytes_mask_an_echoed_basic_credential():
    """A server's error page that echoes the request showed the base64 of `alice:Pw0rdZZZ` (fifth breaker)."""
    from bcc.remote_secrets import quote_bytes

    shown = quote_bytes(b"<p>invalid credentials YWxpY2U6UHcwcmRaWlo= for /ds</p> sha 69a6fb87c0dcABCD")
    assert "YWxpY2U6" not in shown and "invalid credentials *** for /ds" in shown and "69a6fb87c0dcABCD" in shown


def test_a_remote_error_is_one_line():
    """urllib's redirect-loop message holds line breaks: its error took three lines (fifth breaker)."""
    e = remote.RemoteError("h/x: HTTP 302 The HTTP server returned a redirect error that would lead to an infinite "
                           "loop.\nThe last 30x error message was:\nFound")
    assert str(e) == ("h/x: HTTP 302 The HTTP server returned a redirect error that would lead to an infinite loop. "
                      "The last 30x error message was: Found")


def test_malformed_manifest_entries_are_named(synth_shards, tmp_path):
    local = Manifest.load(synth_shards).split("train").shards
    n = len(local)
    brace = f"train-{{000000..{n - 1:06d}}}.tar"
    cases = [
        ({"path": "train-{}.tar", "count": [], "sha256": "ab"}, r"'train-\{\}.tar': count must be a whole number"),
        # a count or size bcc never writes: named at load, not mid-epoch as another shard's truncation
        ({"path": "train-000000.tar", "count": -8, "sha256": "ab"}, "'train-000000.tar': count must be a whole "
                                                                     "number from 0 to 2..53 .* got -8"),
        ({"path": "train-000000.tar", "count": 10**30, "sha256": "ab"}, "'train-000000.tar': count must .* got 10{30}"),
        ({"path": "train-000000.tar", "count": 8}, "'train-000000.tar' has no sha256"),
        ({"path": "train-000000.tar", "count": "8", "sha256": "ab"}, "'train-000000.tar': count must .* got '8'"),
        ({"path": "train-000000.tar", "count": 8, "sha256": "ab", "bytes": -5}, "'train-000000.tar': bytes must "
                                                                                 ".* got -5"),
        ({"path": brace, "count": 3, "sha256": local[0].sha256}, rf"'.*' names {n} shards but gives one "
                                                                  "sha256"),
        ({"path": "train-000000.tar", "count": 3, "sha256": 7}, "'train-000000.tar': sha256 must be a hex string"),
        # a fetched manifest's brace list is not expanded past its own sha256 list (it filled 11 GB before)
        ({"path": "train-{0..99999999}.tar", "count": 1, "sha256": ["ab"]},
         r"'train-\{0..99999999\}.tar' names more shards than its sha256 list \(1\)"),
        ({"path": "train-{0..99999999}.tar", "count": 1, "sha256": "ab"}, "'.*' names more shards than 10,000 and "
                                                                         "gives one sha256"),
        ({"path": "{{0..99999999},x}.tar", "count": 1, "sha256": ["ab"]}, "'.*' names more shards"),  # nested too
        # a name of a brace list is checked as an entry is: no command smuggled in as an alternative
        ({"path": f"{{pipe:touch {tmp_path}/PWNED #,train-000000.tar}}", "count": [1, 1], "sha256": ["ab", "cd"]},
         r"'.*\(its name pipe:touch .*\)' is a pipe: command"),
        ({"path": "{${HOME}/x,train-000000.tar}", "count": [1, 1], "sha256": ["ab", "cd"]},
         "'.*' names an environment variable"),
    ]
    for i, (entry, match) in enumerate(cases):
        pack = copy_pack(synth_shards, tmp_path / f"p{i}")
        data = json.loads((pack / "manifest.json").read_text())
        data["splits"]["train"]["shards"] = [entry]
        (pack / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(ManifestError, match=rf"split 'train': the (shard|brace) entry {match}"):
            Manifest.load(pack)
    # a local brace list in data.shards: the message a URL brace list gets
    with pytest.raises(ManifestError, match="is a brace list of shards"):
        Manifest.load(f"{synth_shards}/{brace}")
    # an absolute local path in a fetched manifest is refused by name (not turned into http://host/abs/path)
    pack = _manifest_with_entry(synth_shards, tmp_path / "abs", str(local[0].path))
    assert Manifest.load(pack).split("train").shards[0].path == local[0].path  # the user's own local manifest
    with serve(pack) as (server, url):
        with pytest.raises(ManifestError, match=rf"the shard entry '{local[0].path}' is not a URL or a relative "
                                                "name: a fetched manifest may not name local files"):
            Manifest.load(url)


# --------------------------------------------------------------------------- end to end


def test_ddp_training_from_a_url_is_bitwise_training_from_the_local_copy(synth_shards, tmp_path):
    """2-process DDP from an HTTP server that needs a token and drops one train shard's connection once
    half-way: the retry resumes at the failed sample, and the final weights equal a local run's bitwise.
    The token never reaches config.yaml, the run's files or its output."""
    runs = {}
    sections = dict(train={"epochs": 1, "log_every": 1}, eval={"test_at_end": False})
    local_cfg = write_config(tmp_path / "local.yaml", synth_shards, tmp_path / "local", **sections)
    proc = launch(local_cfg)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs["local"] = json.loads((tmp_path / "local" / "summary.json").read_text())
    with serve(synth_shards, token=TOKEN) as (server, url):
        server.drops["train-000001.tar"] = 1
        cfg = write_config(tmp_path / "url.yaml", url, tmp_path / "url", **sections)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(remote.TOKEN_ENV, TOKEN)  # the launcher passes the environment on
            proc = launch(cfg)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert server.drops["train-000001.tar"] == 0 and server.gets.count("train-000001.tar") >= 2
    runs["url"] = json.loads((tmp_path / "url" / "summary.json").read_text())
    got = {name: {r["weights_sha256"] for r in run["ranks"]} for name, run in runs.items()}
    assert len(got["local"]) == 1 and got["url"] == got["local"], got
    assert (tmp_path / "url" / "config.yaml").read_text().count(url) == 1
    leaked = [p for p in (tmp_path / "url").rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaked and TOKEN not in proc.stdout + proc.stderr


SLOW_CHECK = dict(train={"epochs": 1, "timeout_s": 4}, eval={"test_at_end": False})


@contextlib.contextmanager
def slow_start_up_check(synth_shards, tmp_path):
    """A 2-process launch training from a served pack whose val shard's HEAD is answered after 120 s:
    yields (the launch's Popen, rank -> psutil.Process) once rank 0's start-up check waits on it."""
    with serve(synth_shards) as (server, url):
        server.slow_head["val-000000.tar"] = 120
        cfg = write_config(tmp_path / "c.yaml", url, tmp_path / "run", **SLOW_CHECK)
        with launched(cfg) as proc:
            wait_until(lambda: "val-000000.tar" in server.heads, proc, "start-up check")
            ranks = trainer_ranks(proc.pid)
            assert sorted(ranks) == [0, 1], ranks
            yield proc, ranks


def test_a_start_up_check_slower_than_train_timeout_s_keeps_the_other_rank_waiting(synth_shards, tmp_path):
    """2-process DDP from a server that answers the start-up check's HEAD of one val shard after 12 s, three
    times train.timeout_s: rank 1 waits for rank 0's verdict as long as rank 0 shows signs of life (it
    used to fail its broadcast after train.timeout_s with "lost contact"), and the job trains."""
    with serve(synth_shards) as (server, url):
        server.slow_head["val-000000.tar"] = 12
        cfg = write_config(tmp_path / "c.yaml", url, tmp_path / "run", **SLOW_CHECK)
        t0 = time.monotonic()
        proc = launch(cfg)
        took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "val-000000.tar" in server.heads and took > 12
    assert "lost contact" not in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["ranks"]


def test_a_rank_0_that_stops_in_its_start_up_check_ends_the_other_rank_within_train_timeout_s(synth_shards, tmp_path):
    """Rank 0 is stopped (SIGSTOP: a host that vanished, the worst case) while its start-up check waits on a
    slow HEAD: its signs of life stop, and rank 1 ends on its own about train.timeout_s later with the
    one lost-peer line (a time-out: an error line), not a traceback."""
    import signal

    with slow_start_up_check(synth_shards, tmp_path) as (proc, ranks):
        ranks[0].send_signal(signal.SIGSTOP)
        t_stop = time.monotonic()
        ranks[1].wait(timeout=4 + 120)  # the bound: train.timeout_s, plus a loaded machine
        waited = time.monotonic() - t_stop
        ranks[0].kill()
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]
    lost = [line for line in out.splitlines() if line.startswith("error: rank 1: lost contact with the other ranks")]
    assert lost and "rank 0 gave no sign of life for 4 s (train.timeout_s) while it did its start-up check" in lost[0], (
        out[-3000:])
    assert 4 <= waited < 4 + 60, f"rank 1 ran {waited:.0f} s past rank 0's stop"
    assert "[rank1]: Traceback" not in out, out[-3000:]
    print(f"rank 1 ended {waited:.1f} s after rank 0 stopped")


@pytest.mark.parametrize("code", [0, 3])
def test_a_pipe_command_that_exits_while_its_child_holds_the_output_ends_the_read(synth_shards, tmp_path, code):
    """ssh with ControlPersist (or a wrapper starting a helper daemon) exits after printing everything, but
    a process it started in another session keeps its stdout open: the read waited for an end of file that
    never came and called it "printed nothing ... (stalled)" after every retry (breaker b12z F3). Now the
    command's exit, then EXITED_SILENCE_S of silence, ends its output; the exit status decides as ever."""
    import os
    import signal

    from bcc import remote_pipe

    shard = sorted(synth_shards.glob("train-*.tar"))[0]
    pid_file = tmp_path / "holder.pid"
    holder = f"setsid sh -c 'echo $$ > {pid_file}; exec sleep 60' &"  # escapes the command's process group
    stream = remote.open_location(f"pipe:cat {shard}; {holder} exit {code}", timeout_s=30)
    t0 = time.monotonic()
    try:
        if code == 0:
            assert stream.read() == shard.read_bytes()
        else:
            with pytest.raises(remote_pipe.PipeError, match=r"the command exited with code 3 \(no stderr\)"):
                stream.read()
        assert time.monotonic() - t0 < 10  # not the 30 s read time-out
    finally:
        stream.close()
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_after_sigterm_a_slow_pipe_is_read_and_a_silent_one_ended(monkeypatch):
    """After a termination request a `pipe:` command that still prints (gaps shorter than STOP_SILENCE_S)
    is read to its end, so the run can reach its preemption checkpoint; one silent for STOP_SILENCE_S is
    ended with a non-transient error (no retry)."""
    import time

    from bcc import remote_pipe

    monkeypatch.setattr(remote, "_STOPPING", [None])
    monkeypatch.setattr(remote_pipe, "STOP_POLL_S", 0.1)
    monkeypatch.setattr(remote_pipe, "STOP_SILENCE_S", 0.6)
    remote.request_stop()
    slow = remote_pipe.PipeOutput("for i in 1 2 3; do printf x; sleep 0.3; done", "slow", timeout_s=30)
    assert slow.read() == b"xxx"
    silent = remote_pipe.PipeOutput("printf x; exec sleep 30", "silent", timeout_s=30)
    t0 = time.monotonic()
    with pytest.raises(remote_pipe.PipeError, match="asked to terminate") as e:
        silent.read()
    assert time.monotonic() - t0 < 5 and not e.value.transient


def test_after_sigterm_a_slow_http_body_is_read_and_a_silent_one_cut(synth_shards, monkeypatch):
    """As for pipe: commands: after a termination request an http(s) body that still arrives (gaps shorter
    than STOP_SILENCE_S) is read to its end, and one silent for STOP_SILENCE_S is cut with a non-transient
    error (no retry) instead of waiting out its socket time-out (data.read_timeout_s)."""
    from bcc import remote_http

    monkeypatch.setattr(remote, "_STOPPING", [None])
    monkeypatch.setattr(remote_http, "STOP_POLL_S", 0.1)
    monkeypatch.setattr(remote_http, "STOP_SILENCE_S", 0.6)
    name = Manifest.load(synth_shards).split("train").shards[0].path.name
    whole = (synth_shards / name).read_bytes()
    with serve(synth_shards) as (server, url):
        server.trickle[name] = (0.3, 0)
        slow = remote.open_location(f"{url}/{name}", timeout_s=30)
        remote.request_stop()
        assert slow.read() == whole
        slow.close()
        server.trickle[name] = (0, 30)
        silent = remote.open_location(f"{url}/{name}", timeout_s=30)
        t0 = time.monotonic()
        with pytest.raises(remote.RemoteError, match="sent nothing for 0.6 s: the process was asked to terminate") as e:
            silent.read()
        silent.close()
    assert time.monotonic() - t0 < 10 and not e.value.transient


@pytest.mark.parametrize("location", ["s3://AKIAEXAMPLE:wJalrSEKRIT@bucket/ds", "gs://bucket/ds", "htps://me:wJalrSEKRIT@h/ds"])
def test_a_url_of_a_scheme_bcc_does_not_read_is_named(location, tmp_path, bcc_main):
    """`s3://...` (or a typo such as `htps://`) is no local folder: one error naming the option and the
    scheme, with the pipe: way to object storage, credentials masked (`bcc train` printed `no manifest at
    s3:/AKIA...:secret@bucket/...`), through `bcc train` and `bcc pack --verify`."""
    for args, key in [(("train", "--config", str(write_config(tmp_path / "cfg.yaml", location, tmp_path / "run"))),
                       "data.shards"), (("pack", "--verify", location), "--verify")]:
        proc = bcc_main(*args)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"error: {key}: {location.split('://')[0]}://") and "pipe:aws s3 cp" in lines[0]
        assert "wJalrSEKRIT" not in proc.stderr + proc.stdout


def test_a_var_whose_value_breaks_the_url_is_named_without_its_value(monkeypatch):
    """`https://${VAR}@host/ds` with a password holding `/` (AWS secret keys often do): urllib took the text
    before the `/` for a port and its error quoted it ("nonnumeric port: 'pa'"), a piece of the secret."""
    monkeypatch.setenv("BCC_TEST_USERINFO", "me:paZZ/ss#word")
    with pytest.raises(ManifestError) as e:
        Manifest.load("http://${BCC_TEST_USERINFO}@127.0.0.1:9/ds", retries=0)
    assert "not a valid URL" in str(e.value) and "${BCC_TEST_USERINFO}" in str(e.value)
    assert "paZZ" not in str(e.value) and "ss#word" not in str(e.value), str(e.value)


def test_a_pipe_command_that_fails_after_a_whole_shard_fails_the_read(synth_shards, no_backoff):
    """A command that printed the whole shard and then exited non-zero was taken for a good read in
    training (the tar reader stops at the archive's end), while `bcc pack --verify` called it missing:
    a read to the shard's end now checks the exit status too; a partial read (a lane's range) does not."""
    local = Manifest.load(synth_shards).split("train").shards[0]
    command = f"pipe:sh -c 'cat {synth_shards}/$1; case $1 in *.tar) exit 3;; esac' sh {{name}}"  # shards only
    failing = Manifest.load(command).split("train").shards[0]
    with pytest.raises(ShardError, match=r"at sample \d+ \(after 1 retry\): .* exited with code 3 after printing "
                                         r"the whole shard \(no stderr\)"):
        list(read_range(failing, retries=1))
    assert keys(read_range(failing, hi=local.count - 1)) == keys(read_range(local, hi=local.count - 1))
    good = Manifest.load(f"pipe:cat {synth_shards}/{{name}}").split("train").shards[0]
    assert keys(read_range(good)) == keys(read_range(local))


HTML_BODY = ("<html>\n<body>AccessDenied: request https://bucket/ds?X-Amz-Signature=deadbeef0123 "
             "denied</body></html>\n")  # an object store's error page: short, no tar, a signed URL in it


def _fake_client(path: Path, pack: Path, train: str) -> str:
    """A `pipe:` template whose command prints the train shards as `train` says (`cat`, `html`, `half`)."""
    body = {"cat": f'cat {pack}/"$1"', "html": f"printf '%s' '{HTML_BODY}'",
            "half": f'head -c $(( $(wc -c < {pack}/"$1") / 2 )) {pack}/"$1"'}[train]
    path.write_text(f'#!/bin/sh\ncase "$1" in\n  train-*) {body} ;;\n  *) cat {pack}/"$1" ;;\nesac\n')
    path.chmod(0o755)
    return f"pipe:{path} {{name}}"


def test_a_body_that_is_no_shard_is_shown_redacted(synth_shards, tmp_path, bcc_main, no_backoff):
    """An HTML / AccessDenied body of fewer than 512 bytes from a pipe: command was `the command printed less
    than one tar block` without what it printed; an http server's, `N bytes, the manifest says M`: both show
    the body's start now (printable, shortened, a signature in it masked), and so does `bcc pack --verify`."""
    pack = copy_pack(synth_shards, tmp_path / "pack")
    cfg = write_config(tmp_path / "cfg.yaml", pack, tmp_path / "run", train={"epochs": 1})
    shown = "'<html> <body>AccessDenied: request https://bucket/ds?X-Amz-Signature=*** denied</body></html>'"
    pipe = _fake_client(tmp_path / "client", pack, "html")
    proc = bcc_main("train", "--config", cfg, f"data.shards={pipe}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{tmp_path / 'client'} train-000000.tar: the command printed {len(HTML_BODY)} bytes, less than one tar " \
           f"block: not a shard ({shown})" in lines[0], lines[0]
    assert "deadbeef" not in proc.stderr
    proc = bcc_main("pack", "--verify", pipe)
    assert proc.returncode == 1 and "deadbeef" not in proc.stdout, proc.stdout
    assert f"not a shard: {len(HTML_BODY)} bytes, less than one tar block (it begins {shown})" in \
           " ".join(proc.stdout.split()), proc.stdout
    victim = pack / "train-000001.tar"
    victim.write_text(HTML_BODY)  # a server answering 200 OK with its error page instead of the shard
    with serve(pack) as (_, url):
        proc = bcc_main("train", "--config", cfg, f"data.shards={url}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"{url}/train-000001.tar ({len(HTML_BODY)} bytes, the manifest says " in lines[0], lines[0]
    assert f"; it begins {shown})" in lines[0] and "deadbeef" not in lines[0], lines[0]


def test_a_truncated_pipe_output_is_called_truncated(synth_shards, tmp_path, bcc_main):
    """A command that printed half a shard (and exited 0) gave `unexpected end of data in the member at byte
    N`: the line now says the shard looks truncated, naming the shard and the sample, and so does verify."""
    pipe = _fake_client(tmp_path / "client", synth_shards, "half")
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "run", train={"epochs": 1})
    proc = bcc_main("train", "--config", cfg, f"data.shards={pipe}", "data.retries=0")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(rf"error: cannot read shard pipe:{tmp_path / 'client'} train-\d+\.tar at sample \d+: the shard "
                     r"ends inside the member at byte \d+: it looks truncated; copy \(or upload\) it again", lines[0]), \
        lines[0]
    proc = bcc_main("pack", "--verify", pipe)
    assert proc.returncode == 1 and "MISMATCH" in proc.stdout, proc.stdout
    assert "it looks truncated" in " ".join(proc.stdout.split()) and "unexpected end" not in proc.stdout, proc.stdout


def test_a_blank_in_a_url_is_called_a_blank():
    """http.client refuses a blank as "URL can't contain control characters": the message says what it is."""
    with pytest.raises(ManifestError, match=r"my data/manifest.json: not a valid URL: it holds a blank "
                                            r"\(write a blank in a URL as %20\)") as e:
        Manifest.load("http://127.0.0.1:9/my data", retries=0)
    assert "control character" not in str(e.value)


@pytest.mark.parametrize("signum, code", [("SIGTERM", 75), ("SIGINT", 130)])
def test_a_signal_during_the_start_up_check_ends_it_at_once(synth_shards, tmp_path, bcc_main, monkeypatch,
                                                             signum, code):
    """SIGTERM or Ctrl-C while the start-up check waits on a slow HEAD (answered after 30 s, past its
    data.read_timeout_s of 20 s): the run ends within seconds with one line saying it was interrupted.
    Before, SIGTERM was kept for a vote and the check ran on to report "cannot reach the host: timed out"
    (exit 2), and Ctrl-C waited for the probe threads' time-outs and retries. SIGTERM exits 75 (nothing
    to save yet: launchers requeue on it, as after a preemption); Ctrl-C 130."""
    import os
    import signal
    import threading

    monkeypatch.setattr(remote, "_STOPPING", [None])
    sent = []

    def signal_at_the_slow_head(server):
        deadline = time.monotonic() + 120
        while "val-000000.tar" not in server.heads and time.monotonic() < deadline:
            time.sleep(0.05)
        sent.append(time.monotonic())
        os.kill(os.getpid(), getattr(signal, signum))

    with serve(synth_shards) as (server, url):
        server.slow_head["val-000000.tar"] = 30
        cfg = write_config(tmp_path / "c.yaml", url, tmp_path / "run", data={"read_timeout_s": 20},
                           train={"epochs": 1}, eval={"test_at_end": False})
        threading.Thread(target=signal_at_the_slow_head, args=(server,), daemon=True).start()
        proc = bcc_main("train", "--config", cfg)
        took = time.monotonic() - sent[0]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code and took < 10, (took, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"error: bcc train: interrupted ({signum})"), lines
    assert "cannot reach" not in proc.stdout + proc.stderr


def _lingering_client(pack: Path, printed: str, pids: Path) -> str:
    """A `pipe:` template whose command prints a train shard (`whole` or its first `half`), closes its output
    and then never exits (its pid noted in `pids`); other files it prints and exits. Written inline, not as
    a script: `sh -c SCRIPT` keeps its own copy of the output open while the script runs (a stall then)."""
    body = {"whole": f"cat {pack}/$f", "half": f"head -c $(( $(wc -c < {pack}/$f) / 2 )) {pack}/$f"}[printed]
    return (f"pipe:f={{name}}; case $f in train-*) {body}; exec >&-; echo $$ >> {pids}; exec sleep 300;; "
            f"*) cat {pack}/$f;; esac")


@pytest.mark.parametrize("printed", ["whole", "half"])
def test_a_pipe_command_that_closes_its_output_but_never_exits_fails_the_read_in_bounded_time(
        synth_shards, tmp_path, printed):
    """`sh -c 'cat x.tar; exec >&-; sleep 1000'`: the end of its output waited for its exit with no bound
    and hung the loader for good (the tar reader at a short output: `half`; the exit check after a whole
    shard: `whole`). Now the read fails within data.read_timeout_s with a named transient error, and the
    command (its process group) is ended. A regression fails the join below instead of hanging the suite."""
    import os

    pids = tmp_path / "pids"
    shard = Manifest.load(_lingering_client(synth_shards, printed, pids)).split("train").shards[0]
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            list(read_range(shard, retries=0, timeout_s=0.5))
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome.append(e)

    t0 = time.monotonic()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    try:
        assert not reader.is_alive(), "the read still waits on a command that closed its output"
        assert time.monotonic() - t0 < 10
        assert isinstance(outcome[0], ShardError), outcome
        assert re.search(r"cannot read shard pipe:.* at sample \d+: pipe:.*: the command closed its output but "
                         r"did not exit within 0.5 s \(data.read_timeout_s\)$", str(outcome[0])), str(outcome[0])
        pid = int(pids.read_text().split()[0])
        assert_gone(lambda: os.kill(pid, 0), "the lingering command outlived the read")
    finally:
        for pid in map(int, pids.read_text().split() if pids.exists() else ()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def test_sigterm_to_rank_1_alone_during_the_start_up_check_ends_it_and_the_job(synth_shards, tmp_path):
    """SIGTERM to rank 1 only (`kill PID`, a container runtime) while it waits for rank 0's slow start-up
    check (a HEAD answered after 120 s): rank 1 ends at once with exit code 75 and the job's one line,
    its own, and the launch ends soon after with 75 (the launcher ends rank 0, which stays quiet). Before,
    rank 1 ended without a word and rank 0's line said rank 0 was interrupted."""
    import signal

    with slow_start_up_check(synth_shards, tmp_path) as (proc, ranks):
        ranks[1].send_signal(signal.SIGTERM)
        t_term = time.monotonic()
        ranks[1].wait(timeout=60)
        rank1_took = time.monotonic() - t_term
        rank0_outlived_it = ranks[0].is_running()  # so rank 1 failed first: the launcher's code is rank 1's
        out, _ = proc.communicate(timeout=120)
        took = time.monotonic() - t_term
    assert rank1_took < 30 and took < 60, (rank1_took, took, out[-3000:])  # teardown takes seconds when loaded
    assert rank0_outlived_it and proc.returncode == 75, (proc.returncode, out[-3000:])
    said = [line for line in out.splitlines() if line.startswith(("error:", "note:")) or "interrupted" in line]
    assert said == ["error: bcc train (rank 1): interrupted (SIGTERM); during start-up, before the first training "
                    "step: nothing to save; exit code 75 (launchers requeue on it)"], out[-3000:]
    assert "Traceback" not in out and "exitcode" not in out, out[-3000:]
    print(f"rank 1 ended {rank1_took:.1f} s after its SIGTERM, the launch {took:.1f} s")

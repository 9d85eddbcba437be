"""A fault-injecting HTTP proxy in front of the moto S3 server, for the storage-fault tests.

Real object stores throttle (``503 SlowDown``), answer ``500``, drop connections, stall, lose
the response to a write that landed, and refuse expired credentials. The proxy does each of
these to the requests that match a rule, and forwards everything else to moto unchanged::

    proxy = start_fault_proxy(moto_endpoint)      # its own process, on 127.0.0.1
    proxy.set_rules([Rule("PUT", "chunks/", "status", status=503, every=20)])
    ...   # icechunk.s3_storage(endpoint_url=proxy.endpoint, ...)
    proxy.stats()   # what each rule did, and what was asked of the store

A rule matches a method and a key prefix inside the repository (``chunks/``, ``manifests/``,
``snapshots/``, ``transactions/``; ``repo`` is icechunk 2's repository object, which holds
the branches and is updated with a conditional PUT at each commit) and fires on every
``every``-th match (a deterministic rate), on the first ``times`` matches, or at random with
``rate`` (seeded). The first rule that fires on a request decides; a rule counts only the
requests that no earlier rule fired on. Its action is one of

``status``  answer with an S3 error (``status``, ``code``); the request never reaches moto
``reset``   close the connection with a TCP reset before forwarding anything
``lost``    forward the request (the write lands), then reset instead of answering
``stall``   hold the request until :meth:`FaultProxy.release` or ``seconds``, then forward

With ``expiring=True`` the proxy also plays the part of a credential service: an access key
``EXP<unix time>-...`` is refused with ``400 ExpiredToken`` once that time has passed, the way
S3 refuses an expired session token. Moto checks no signatures, so nothing else changes.

The proxy runs in a separate process, like the moto server, so that worker processes of every
executor reach it over HTTP; it exits when its stdin closes (the test process died or stopped
it). It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

CONTROL = "/__faults__"
ACTIONS = ("status", "reset", "lost", "stall")
# Repository keys by what they hold: ".../repo/chunks/ABC" -> "chunks/".
_KEY_KIND = re.compile(r"/(chunks|manifests|snapshots|refs|transactions|config|overwritten)\b")
_ACCESS_KEY = re.compile(r"Credential=([^/,\s]+)/")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "te", "upgrade"}


@dataclass
class Rule:
    """What to do to the requests that match ``method`` and the key ``prefix``."""

    method: str  # "PUT", "GET", ... or "*"
    prefix: str  # "chunks/", "refs/", ... or "" for every key
    action: str
    status: int = 503
    code: str = "SlowDown"
    every: int = 0  # fire on the every-th, 2*every-th... match
    times: int = 0  # fire on the first `times` matches
    rate: float = 0.0  # fire at random with this probability (seeded)
    seed: int = 0
    seconds: float = 30.0  # the longest a stall lasts
    after: int = 0  # let the first `after` matches through untouched
    # Filled in by the proxy:
    matched: int = field(default=0)
    fired: int = field(default=0)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {self.action!r}")
        if not (self.every or self.times or self.rate):
            raise ValueError("a rule fires on every=, times= or rate=; none was given")


# ---------------------------------------------------------------------------------------------
# The proxy (runs in its own process)


class _State:
    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.lock = threading.Lock()
        self.rules: list[Rule] = []
        self.randoms: list[random.Random] = []
        self.expiring = False
        self.release = threading.Event()
        self.counts: dict[str, int] = {}
        self.keys: dict[str, int] = {}
        self.refused_expired = 0
        self.stalled = 0  # requests held right now

    def reset(self, rules: list[dict[str, Any]], expiring: bool) -> None:
        with self.lock:
            self.rules = [Rule(**r) for r in rules]
            self.randoms = [random.Random(r.seed) for r in self.rules]
            self.expiring = expiring
            self.counts, self.keys, self.refused_expired = {}, {}, 0
            self.release.set()  # let go of anything a previous test stalled
            self.release = threading.Event()

    def decide(self, method: str, kind: str) -> Rule | None:
        """Count the request; return the rule that fires on it, if any."""
        with self.lock:
            self.counts[f"{method} {kind}"] = self.counts.get(f"{method} {kind}", 0) + 1
            for rule, rng in zip(self.rules, self.randoms, strict=True):
                if rule.method not in ("*", method) or not kind.startswith(rule.prefix):
                    continue
                rule.matched += 1
                n = rule.matched - rule.after
                if n <= 0:
                    continue
                fire = (
                    (rule.every and n % rule.every == 0)
                    or (rule.times and n <= rule.times)
                    or (rule.rate and rng.random() < rule.rate)
                )
                if fire:
                    rule.fired += 1
                    return rule
            return None

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "rules": [asdict(r) for r in self.rules],
                "requests": dict(self.counts),
                "access_keys": dict(self.keys),
                "refused_expired": self.refused_expired,
                "stalled": self.stalled,
            }


def _expired(access_key: str) -> bool:
    expiry = access_key[3:].split("-")[0]
    return access_key.startswith("EXP") and expiry.isdigit() and int(expiry) < time.time()


def _key_kind(path: str) -> str:
    path = path.split("?", 1)[0]
    if path.endswith("/repo"):  # icechunk 2's repository object: branches, tags, config
        return "repo"
    match = _KEY_KIND.search(path)
    return f"{match.group(1)}/" if match else "other"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None):
        self.send_response(status)
        headers = headers or []
        for name, value in headers:
            self.send_header(name, value)
        if not any(name == "Content-Length" for name, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout: close() sends RST, as a dropped connection does.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _s3_error(self, status: int, code: str, message: str) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
        ).encode()
        self._reply(status, body, [("Content-Type", "application/xml")])

    def _handle(self) -> None:
        state = self.server.state
        body = self._body()
        if self.path.startswith(CONTROL):
            return self._control(body)
        key = _ACCESS_KEY.search(self.headers.get("Authorization", ""))
        access_key = key.group(1) if key else ""
        with state.lock:
            state.keys[access_key] = state.keys.get(access_key, 0) + 1
        if state.expiring and _expired(access_key):
            with state.lock:
                state.refused_expired += 1
            return self._s3_error(400, "ExpiredToken", "The provided token has expired.")
        rule = state.decide(self.command, _key_kind(self.path))
        if rule is not None and rule.action == "status":
            return self._s3_error(rule.status, rule.code, "injected by the fault proxy")
        if rule is not None and rule.action == "reset":
            return self._reset()
        if rule is not None and rule.action == "stall":
            with state.lock:
                state.stalled += 1
                release = state.release
            release.wait(rule.seconds)
            with state.lock:
                state.stalled -= 1
        status, headers, answer = self._forward(body)
        if rule is not None and rule.action == "lost":
            return self._reset()
        self._reply(status, answer, headers)

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        up = self.server.state.upstream
        conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            answer = response.read()
            kept = [
                (k, v)
                for k, v in response.getheaders()
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"
            ]
            if self.command == "HEAD":  # no body, but the object's length
                kept.append(("Content-Length", response.getheader("Content-Length") or "0"))
            return response.status, kept, answer
        finally:
            conn.close()

    def _control(self, body: bytes) -> None:
        state = self.server.state
        if self.command == "PUT" and self.path == f"{CONTROL}/rules":
            spec = json.loads(body)
            state.reset(spec["rules"], spec.get("expiring", False))
            return self._reply(200, b"{}")
        if self.command == "POST" and self.path == f"{CONTROL}/release":
            state.release.set()
            return self._reply(200, b"{}")
        if self.command == "GET" and self.path == f"{CONTROL}/stats":
            return self._reply(200, json.dumps(state.stats()).encode())
        return self._reply(404, b"{}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many workers open connections at once (the default is 5)
    state: _State


def serve(upstream: str) -> None:
    """Serve on 127.0.0.1 (a free port, printed) until stdin closes."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = _State(upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()
    server.shutdown()


# ---------------------------------------------------------------------------------------------
# The test side


@dataclass
class ServerProcess:
    """A test server in a child process on 127.0.0.1: it stops when its stdin closes."""

    process: subprocess.Popen[str]
    endpoint: str
    log_path: str

    def stop(self, timeout: float = 10) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()  # the server's signal to stop
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def start_server(args: list[str], name: str, timeout: float = 60) -> ServerProcess:
    """Run ``args`` (a server that prints its port, then serves until stdin closes)."""
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, kept for diagnostics
        "w", prefix=f"{name.replace(' ', '-')}-", suffix=".log", delete=False
    )
    process = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
    )
    log.close()
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline().strip() if ready else ""
    if not line.isdigit():
        process.kill()
        process.wait()
        with open(log.name) as f:
            detail = f.read()[-2000:]
        raise RuntimeError(f"{name} did not start within {timeout} s:\n{detail}")
    return ServerProcess(process, f"http://127.0.0.1:{int(line)}", log.name)


class FaultProxy(ServerProcess):
    """The proxy's process, and its control calls."""

    def _call(self, method: str, what: str, data: dict[str, Any] | None = None) -> Any:
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(f"{self.endpoint}{CONTROL}/{what}", body, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def set_rules(self, rules: list[Rule], *, expiring: bool = False) -> None:
        """Replace the rules (and zero every count); release anything stalled."""
        self._call("PUT", "rules", {"rules": [_spec(r) for r in rules], "expiring": expiring})

    def release(self) -> None:
        """Let stalled requests go on (to moto) now."""
        self._call("POST", "release", {})

    def stats(self) -> dict[str, Any]:
        """``rules`` (each with ``matched`` and ``fired``), ``requests`` by method and key
        kind, ``access_keys`` seen, ``refused_expired``, and how many requests are ``stalled``
        right now."""
        return dict(self._call("GET", "stats"))

    def fired(self) -> list[int]:
        return [r["fired"] for r in self.stats()["rules"]]


def _spec(rule: Rule) -> dict[str, Any]:
    spec = asdict(rule)
    del spec["matched"], spec["fired"]
    return spec


def start_fault_proxy(upstream: str, timeout: float = 60) -> FaultProxy:
    """Start the proxy in front of ``upstream`` (moto's endpoint), in a child process."""
    server = start_server([sys.executable, __file__, upstream], "fault proxy", timeout)
    return FaultProxy(server.process, server.endpoint, server.log_path)


if __name__ == "__main__":
    serve(sys.argv[1])

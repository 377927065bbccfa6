#!/usr/bin/env python3
"""The web console's latencies (issue 10), measured from an HTTP client holding a console
session cookie, against a real `snapq serve` with 10,000 enrolled (simulated) endpoints.

  type-ahead   GET /v1/endpoints?limit=20&search=PREFIX, PREFIX being what a person has typed so
               far of a random endpoint's name (1 to 9 characters) or of its IP address; as the
               operator, whose groups hold half of the endpoints (so every answer is scoped).
               Target: median < 100 ms, p99 < 250 ms.
  live page    what Live Endpoints asks for when it opens: GET /v1/session + GET /v1/connections.
  snapshots    what Saved Evidence > Snapshots asks for: GET /v1/snapshots with 1,000 snapshot
               rows (failed captures of 1,000 endpoints) in the operator's groups.
               Target for both pages: < 200 ms (the API share of rendering).

Environment:
  SNAPQ_BIN            snapq binary [target/release/snapq beside this script]
  SNAPQ_BENCH_REQUESTS type-ahead requests [1000]
  SNAPQ_BENCH_ENDPOINTS endpoints enrolled [10000]
  SNAPQ_BENCH_TMP      parent of the scratch directory [/tmp]

Stdlib only (Python 3.11).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import ssl
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = os.environ.get("SNAPQ_BIN", str(REPO / "target" / "release" / "snapq"))
REQUESTS = int(os.environ.get("SNAPQ_BENCH_REQUESTS", "1000"))
ENDPOINTS = int(os.environ.get("SNAPQ_BENCH_ENDPOINTS", "10000"))
TMP = os.environ.get("SNAPQ_BENCH_TMP", "/tmp")
SITES = ["nyc", "lon", "sfo", "ber"]
ROLES = ["web", "db", "ws", "app", "dc"]
PASSWORD = "bench password 1"


class Api:
    """One kept-alive HTTPS connection with a bearer token or a session cookie."""

    def __init__(self, port: int, ctx: ssl.SSLContext, token: str | None = None):
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
        self.token = token
        self.cookie: str | None = None
        self.csrf: str | None = None

    def call(self, method: str, path: str, body=None):
        headers = {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.cookie:
            headers["Cookie"] = self.cookie
            if method != "GET" and self.csrf:
                headers["X-CSRF-Token"] = self.csrf
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        payload = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {payload[:300]!r}")
        if method == "POST" and path == "/v1/session":
            self.cookie = response.getheader("Set-Cookie").split(";")[0]
        return json.loads(payload) if payload else None


def stats(times: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=100)
    return statistics.median(times), q[89], q[98]


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="snapq-console-bench-", dir=TMP))
    data = scratch / "server"
    server = subprocess.Popen(
        [BIN, "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0",
         "--job-max-attempts", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "RUST_LOG": "error"},
    )
    try:
        port = None
        for line in server.stdout:
            if line.startswith("snapq server listening on "):
                port = int(line.rsplit(":", 1)[1])
                break
        assert port, "the server did not start"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # loopback bench; the product's clients pin
        admin = Api(port, ctx, (data / "admin.token").read_text().strip())
        agent = Api(port, ctx, (data / "enroll.token").read_text().strip().split(".")[0])

        rng = random.Random(10)
        hosts = []
        t0 = time.perf_counter()
        for i in range(ENDPOINTS):
            host = f"{SITES[i % 4]}-{ROLES[i // 4 % 5]}-{i:05}"
            ip = f"10.{i // 62500 % 256}.{i // 250 % 250}.{i % 250 + 1}"
            hosts.append((host, ip))
            agent.call("POST", "/v1/agents/heartbeat", {
                "hostname": host, "ips": [ip], "labels": [],
                "api_url": "https://127.0.0.1:1", "cert_sha256": "ab" * 32,
            })
        enrolled = time.perf_counter() - t0
        admin.call("POST", "/v1/groups", {"name": "east", "hostnames": ["nyc-*", "lon-*"]})
        admin.call("POST", "/v1/users", {"name": "op", "role": "operator", "groups": ["east"]})
        admin.call("POST", "/v1/users/op/password", {"password": PASSWORD})
        op = Api(port, ctx)
        signin_t0 = time.perf_counter()
        op.csrf = op.call("POST", "/v1/session", {"username": "op", "password": PASSWORD})["csrf_token"]
        signin_ms = (time.perf_counter() - signin_t0) * 1000
        east = [h for h, _ in hosts if h.startswith(("nyc-", "lon-"))]
        for h in east[:1000]:
            admin.call("POST", "/v1/captures", {"hosts": [h]})

        # What people type: growing prefixes of names, and of addresses.
        queries = []
        while len(queries) < REQUESTS:
            host, ip = rng.choice(hosts)
            text = host if rng.random() < 0.8 else ip
            queries.append(text[: rng.randint(1, min(9, len(text)))])
        for q in queries[:20]:  # warm up
            op.call("GET", f"/v1/endpoints?limit=20&search={q}")
        times, sizes = [], []
        for q in queries:
            t = time.perf_counter()
            found = op.call("GET", f"/v1/endpoints?limit=20&search={q}")
            times.append((time.perf_counter() - t) * 1000)
            sizes.append(len(found))
            assert all(e["hostname"].startswith(("nyc-", "lon-")) for e in found)

        def page(paths: list[str], n: int = 100) -> list[float]:
            out = []
            for _ in range(n):
                t = time.perf_counter()
                for p in paths:
                    op.call("GET", p)
                out.append((time.perf_counter() - t) * 1000)
            return out

        live = page(["/v1/session", "/v1/connections"])
        snaps = page(["/v1/snapshots"], 50)
        rows = sum(len(g["snapshots"]) for g in op.call("GET", "/v1/snapshots"))

        print(f"binary {BIN}; {ENDPOINTS} endpoints enrolled in {enrolled:.1f} s; "
              f"sign-in {signin_ms:.0f} ms (argon2id)")
        med, p90, p99 = stats(times)
        verdict = "PASS" if med < 100 and p99 < 250 else "FAIL"
        print(f"type-ahead  {REQUESTS} queries, median {med:.1f} ms, p90 {p90:.1f} ms, "
              f"p99 {p99:.1f} ms, max {max(times):.1f} ms; mean {statistics.mean(sizes):.1f} "
              f"matches shown  (target median < 100, p99 < 250) {verdict}")
        slow = sorted(zip(times, queries, sizes), reverse=True)[:8]
        print("            slowest: " + ", ".join(f"{q!r} {t:.0f} ms ({n})" for t, q, n in slow))
        for name, t, extra in [("live page", live, ""), ("snapshots", snaps, f", {rows} rows")]:
            med, p90, p99 = stats(t)
            verdict = "PASS" if p99 < 200 else "FAIL"
            print(f"{name:<11} median {med:.1f} ms, p90 {p90:.1f} ms, p99 {p99:.1f} ms{extra}  "
                  f"(target < 200) {verdict}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

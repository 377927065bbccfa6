#!/usr/bin/env python3
"""What authorization costs per request (issue 8): the same page through a real `snapq serve`,
as the admin (sees everything, no group evaluation) and as an operator whose groups are
evaluated against every endpoint, in one run, requests interleaved so drift hits both alike.

Pages (each 100 items, identical bodies for both callers, because the operator's groups hold
every endpoint through a hostname glob, a CIDR and a label, in three groups):
  endpoints   GET /v1/endpoints            (100 endpoints)
  snapshots   GET /v1/snapshots            (100 snapshot rows of those endpoints)
  show        GET /v1/snapshots/{id}       (one snapshot resolved to its endpoint and checked)

Prints per page: median and p90 for each caller, the difference of the medians, and PASS/FAIL
against the target: the operator's median at most 0.2 ms above the admin's. The live events
route the issue names does not exist yet; these listings stand in for it.

Environment:
  SNAPQ_BIN            snapq binary [target/release/snapq beside this script]
  SNAPQ_BENCH_REQUESTS requests per caller and page [1000]
  SNAPQ_BENCH_TMP      parent of the scratch directory [/tmp]

Stdlib only (Python 3.11).
"""

from __future__ import annotations

import http.client
import json
import os
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
TMP = os.environ.get("SNAPQ_BENCH_TMP", "/tmp")
ENDPOINTS = 100
TARGET_MS = 0.2


class Api:
    """One kept-alive HTTPS connection with a bearer token."""

    def __init__(self, port: int, token: str, ctx: ssl.SSLContext):
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
        self.token = token

    def call(self, method: str, path: str, body=None):
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        payload = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {payload[:300]!r}")
        return json.loads(payload) if payload else None


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="snapq-access-bench-", dir=TMP))
    data = scratch / "server"
    server = subprocess.Popen(
        [BIN, "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0",
         "--job-max-attempts", "1", "--capture-concurrency", "16"],
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
        admin = Api(port, (data / "admin.token").read_text().strip(), ctx)
        enroll = (data / "enroll.token").read_text().strip().split(".")[0]
        agent = Api(port, enroll, ctx)

        for i in range(ENDPOINTS):
            agent.call("POST", "/v1/agents/heartbeat", {
                "hostname": f"bench-{i:03}", "ips": [f"10.{i % 4}.1.{i + 1}"],
                "labels": ["bench"], "api_url": "https://127.0.0.1:1", "cert_sha256": "ab" * 32,
            })
        # Three groups; together (and each rule kind) they hold every endpoint.
        admin.call("POST", "/v1/groups", {"name": "g-glob", "hostnames": ["bench-0*"]})
        admin.call("POST", "/v1/groups", {"name": "g-cidr", "cidrs": ["10.0.0.0/14"]})
        admin.call("POST", "/v1/groups", {"name": "g-label", "labels": ["bench"]})
        admin.call("POST", "/v1/users", {"name": "op", "role": "operator",
                                         "groups": ["g-glob", "g-cidr", "g-label"]})
        op_token = admin.call("POST", "/v1/tokens", {"user": "op"})["token"]
        operator = Api(port, op_token, ctx)
        snaps = []
        for i in range(ENDPOINTS):
            snaps += admin.call("POST", "/v1/captures", {"hosts": [f"bench-{i:03}"]})
        snap_id = snaps[0]["snapshot_id"]

        pages = [
            ("endpoints", "/v1/endpoints"),
            ("snapshots", "/v1/snapshots"),
            ("show", f"/v1/snapshots/{snap_id}"),
        ]
        for _, path in pages:
            a, o = admin.call("GET", path), operator.call("GET", path)
            assert a == o or path == "/v1/snapshots", "the callers see different pages"
        print(f"{REQUESTS} requests per caller and page, interleaved; {ENDPOINTS} endpoints; "
              f"binary {BIN}")
        print(f"{'page':<10} {'admin median':>13} {'operator median':>16} {'difference':>11} "
              f"{'admin p90':>10} {'operator p90':>13}  target")
        for name, path in pages:
            times = {"admin": [], "operator": []}
            for _ in range(20):  # warm up both connections
                admin.call("GET", path)
                operator.call("GET", path)
            for i in range(REQUESTS):
                order = [("admin", admin), ("operator", operator)]
                if i % 2:
                    order.reverse()
                for who, api in order:
                    t0 = time.perf_counter()
                    api.call("GET", path)
                    times[who].append((time.perf_counter() - t0) * 1000)
            med = {k: statistics.median(v) for k, v in times.items()}
            p90 = {k: statistics.quantiles(v, n=10)[-1] for k, v in times.items()}
            diff = med["operator"] - med["admin"]
            verdict = "PASS" if diff <= TARGET_MS else "FAIL"
            print(f"{name:<10} {med['admin']:>10.3f} ms {med['operator']:>13.3f} ms "
                  f"{diff:>+8.3f} ms {p90['admin']:>7.3f} ms {p90['operator']:>10.3f} ms  "
                  f"<= {TARGET_MS} ms {verdict}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

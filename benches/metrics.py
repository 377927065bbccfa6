#!/usr/bin/env python3
"""A metrics scrape while 200 captures run (issue 13): `GET /metrics` through a real `snapq serve
--demo N` while 200 capture jobs of its simulated endpoints are queued and running, against the
same server's `GET /v1/queue/status` (the baseline: the counts a scrape must agree with), requests
interleaved so load hits both alike. Scrapes continue until every capture finished.

Prints median, p99 and max of each, the ratio of the medians, and PASS/FAIL against the target:
every scrape under 100 ms (the max, not a percentile). Also checks each scrape parses and that the
last scrape's capture counts equal the last `queue status`.

Environment:
  SNAPQ_BIN            snapq binary [target/release/snapq beside this script]
  SNAPQ_BENCH_DEMO     simulated endpoints [20]
  SNAPQ_BENCH_CAPTURES capture jobs [200]
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
DEMO = int(os.environ.get("SNAPQ_BENCH_DEMO", "20"))
CAPTURES = int(os.environ.get("SNAPQ_BENCH_CAPTURES", "200"))
TMP = os.environ.get("SNAPQ_BENCH_TMP", "/tmp")
TARGET_MS = 100.0


class Api:
    """One kept-alive HTTPS connection with a bearer token."""

    def __init__(self, port: int, token: str, ctx: ssl.SSLContext):
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
        self.token = token

    def call(self, method: str, path: str, body=None) -> tuple[float, bytes]:
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        payload = response.read()
        took = (time.perf_counter() - started) * 1000
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {payload[:300]!r}")
        return took, payload


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def summary(name: str, ms: list[float]) -> str:
    ms = sorted(ms)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"{name:<14} n={len(ms):<5} median {statistics.median(ms):7.2f} ms  p99 {p99:7.2f} ms  max {ms[-1]:7.2f} ms"


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="snapq-metrics-bench-", dir=TMP))
    data = scratch / "server"
    server = subprocess.Popen(
        [BIN, "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0",
         "--demo", str(DEMO), "--job-max-attempts", "1"],
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
        ctx = ssl.create_default_context(cafile=str(data / "certs" / "httpPublicCert.pem"))
        ctx.check_hostname = False
        token = (data / "admin.token").read_text().strip()
        api = Api(port, token, ctx)
        # Wait for every simulated endpoint to be online.
        deadline = time.time() + 60
        while time.time() < deadline:
            _, body = api.call("GET", "/v1/endpoints")
            if sum(1 for e in json.loads(body) if e["online"]) == DEMO:
                break
            time.sleep(0.2)
        hosts = [f"demo-{i:02}" for i in range(1, DEMO + 1)]
        queued = 0
        while queued < CAPTURES:
            batch = [hosts[(queued + i) % DEMO] for i in range(min(DEMO, CAPTURES - queued))]
            api.call("POST", "/v1/captures", {"hosts": batch})
            queued += len(batch)
        scrape_ms, status_ms = [], []
        while True:
            took, body = api.call("GET", "/metrics")
            scrape_ms.append(took)
            scraped = samples(body.decode())
            took, body = api.call("GET", "/v1/queue/status")
            status_ms.append(took)
            status = json.loads(body)
            capture = next(k for k in status["kinds"] if k["kind"] == "capture")
            if capture["done"] + capture["failed"] >= CAPTURES:
                break
        took, body = api.call("GET", "/metrics")
        scraped = samples(body.decode())
        _, body = api.call("GET", "/v1/queue/status")
        capture = next(k for k in json.loads(body)["kinds"] if k["kind"] == "capture")
        for state in ("done", "failed", "pending", "running"):
            key = f'snapq_jobs{{kind="capture",state="{state}"}}'
            assert scraped[key] == capture[state], (key, scraped[key], capture[state])
        print(f"{CAPTURES} captures of {DEMO} simulated endpoints: "
              f"{capture['done']} done, {capture['failed']} failed")
        print(summary("GET /metrics", scrape_ms))
        print(summary("queue status", status_ms))
        ratio = statistics.median(scrape_ms) / statistics.median(status_ms)
        print(f"median ratio /metrics : queue status = {ratio:.2f}x")
        verdict = "PASS" if max(scrape_ms) < TARGET_MS else "FAIL"
        print(f"{verdict}: slowest scrape {max(scrape_ms):.2f} ms (target < {TARGET_MS:.0f} ms)")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

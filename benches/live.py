#!/usr/bin/env python3
"""Query latency of the events grid (issue 15): a 100-event page through the server over a live
connection vs the same page asked directly of the agent, and on a stored snapshot.

Starts real `snapq serve` and `snapq agent` processes on loopback (the agent prefilled like the
agent bench, recording while measured), connects through the server's API, then times each query
over kept-alive HTTPS connections (as the CLI and the console keep theirs), alternating server and
agent runs so both see the same machine. The snapshot is the agent's database exported with
`snapq agent export` and uploaded with `snapq upload --connect`. Prints one table:

    measured | baseline | ratio | target | PASS/FAIL

Queries (each a 100-event page):
  newest    type=process&limit=100                       (newest first, the grid's default)
  filtered  type=file&where=op eq write&limit=100        (a condition on an indexed time walk)
  page2     newest's second page through its cursor

Environment:
  SNAPQ_BIN             snapq binary [target/release/snapq beside this script]
  SNAPQ_BENCH_EVENTS    prefill of the agent [4000000] (the agent bench's size; ~530 MiB)
  SNAPQ_BENCH_RATE      events/s the agent records while measured [100]
  SNAPQ_BENCH_RUNS      timed runs per query and target [40]
  SNAPQ_BENCH_TMP       parent of the scratch directory [/tmp]
  SNAPQ_BENCH_KEEP      1 = keep the scratch directory [0]

Stdlib only (Python 3.11); shares its process helpers with `e2e.py`.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402
from e2e import Server, agent, env_int, log, note, print_table, row  # noqa: E402

EVENTS = env_int("SNAPQ_BENCH_EVENTS", 4_000_000)
RATE = env_int("SNAPQ_BENCH_RATE", 100)
RUNS = env_int("SNAPQ_BENCH_RUNS", 40)
KEEP = env_int("SNAPQ_BENCH_KEEP", 0) == 1

QUERIES = {
    "newest": "type=process&limit=100",
    "filtered": "type=file&where=op%20eq%20write&limit=100",
}


class Conn:
    """One kept-alive HTTPS connection with a bearer token."""

    def __init__(self, addr: str, token: str):
        host, port = addr.rsplit(":", 1)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # timing only; snapq itself pins certificates
        self.http = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=60)
        self.token = token

    def get(self, path: str) -> tuple[float, dict]:
        t0 = time.perf_counter()
        self.http.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
        resp = self.http.getresponse()
        body = resp.read()
        took = time.perf_counter() - t0
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: {resp.status} {body[:300]!r}")
        return took, json.loads(body)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def time_pair(server: Conn, server_path: str, agent: Conn | None, agent_path: str) -> tuple[float, float | None]:
    for _ in range(3):  # warm both (page cache, prepared statements, TLS sessions)
        server.get(server_path)
        if agent:
            agent.get(agent_path)
    s_runs, a_runs = [], []
    for _ in range(RUNS):
        took, page = server.get(server_path)
        assert len(page["events"]) == 100, f"{server_path}: {len(page['events'])} events"
        s_runs.append(took)
        if agent:
            took, _ = agent.get(agent_path)
            a_runs.append(took)
    return median_ms(s_runs), (median_ms(a_runs) if agent else None)


def main() -> int:
    if not Path(e2e.BIN).exists():
        print(f"{e2e.BIN} not found: run `cargo build --release --bin snapq` (or set SNAPQ_BIN)", file=sys.stderr)
        return 2
    parent = Path(os.environ.get("SNAPQ_BENCH_TMP", "/tmp"))
    scratch = Path(tempfile.mkdtemp(prefix="snapq-live-", dir=parent))
    shutil.copy2(e2e.BIN, scratch / "snapq")
    e2e.BIN = str(scratch / "snapq")
    log(f"scratch {scratch}; events {EVENTS:,}; {RUNS} runs per query; nproc {os.cpu_count()}")
    status = 0
    try:
        server = Server(scratch, "server")
        ag = agent(scratch, "agent", "bench-live", EVENTS, RATE, server)
        server.wait_online(["bench-live"])
        made = server.api("POST", "/v1/connections", {"targets": ["bench-live"]})[0]
        assert made["status"] == "active", made
        cid = made["id"]
        note(f"recorder database of {made['events']:,} events, {e2e.human(made['db_bytes'])}, recording {RATE}/s")
        s = Conn(server.proc.addr, server.token)
        agent_token = (ag.data_dir / "agent.token").read_text().strip()  # type: ignore[attr-defined]
        a = Conn(ag.addr, agent_token)

        _, first = s.get(f"/v1/connections/{cid}/events?{QUERIES['newest']}")
        _, first_direct = a.get(f"/v1/events?{QUERIES['newest']}")
        cursor = first["next_cursor"]
        direct_cursor = first_direct["next_cursor"]
        live = dict(QUERIES)
        live["page2"] = f"{QUERIES['newest']}&cursor={cursor}"
        direct = dict(QUERIES)
        direct["page2"] = f"{QUERIES['newest']}&cursor={direct_cursor}"
        for name in live:
            via, straight = time_pair(s, f"/v1/connections/{cid}/events?{live[name]}", a, f"/v1/events?{direct[name]}")
            ratio = via / straight if straight else None
            row(f"live page ({name}) via server", f"{via:.1f} ms", f"agent direct {straight:.1f} ms", ratio,
                "< 50 ms and <= 2x", via < 50 and (ratio or 0) <= 2)

        out = scratch / "export"
        path, took, info = e2e.export(ag.data_dir, out)  # type: ignore[attr-defined]
        log(f"exported {path.name} in {took:.1f}s")
        _, res = server.cli("upload", str(path), "--connect", "--json")
        snap_conn = json.loads(res.stdout)[0]["connection"]
        assert snap_conn["status"] == "active", snap_conn
        sid = snap_conn["id"]
        _, sfirst = s.get(f"/v1/connections/{sid}/events?{QUERIES['newest']}")
        snap = dict(QUERIES)
        snap["page2"] = f"{QUERIES['newest']}&cursor={sfirst['next_cursor']}"
        for name in snap:
            via, _ = time_pair(s, f"/v1/connections/{sid}/events?{snap[name]}", None, "")
            row(f"snapshot page ({name}) via server", f"{via:.1f} ms", "", None, "< 25 ms", via < 25)
    except Exception as e:  # noqa: BLE001 - report what we have
        log(f"FAILED: {e!r}")
        status = 1
        import traceback

        traceback.print_exc()
    finally:
        for proc in e2e.PROCS:
            proc.stop()
        print_table()
        if KEEP or status:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    if any(r["result"] == "FAIL" for r in e2e.ROWS):
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Fleet batch over three nodes (issue 11): PostgreSQL catalog + queue and a shared store, against
the same batch on one SQLite node.

Target: a batch of 200 `snapq fleet-sim` endpoints over three nodes finishes within 1.5x of the
same batch on one SQLite node.

  1. one node: `snapq serve --capture-concurrency 16` on its SQLite files (no --database), a
     `snapq fleet-sim --db-mib 5` of N endpoints (prefix `one`), a group, one batch
     (`POST /v1/fleet/batches`, max_concurrency 16, as fleet.py's run_batch); time it; every
     endpoint captured exactly once.
  2. three nodes on a schema of their own in PostgreSQL (created here, dropped at the end):
     node 1 `snapq serve --database URL --store SCRATCH/store --capture-concurrency 16`; once it is
     up its `certs/`, `admin.token`, `enroll.token`, `agents.key` are copied into the data dirs of
     nodes 2 and 3, which start with the same --database and --store; a second fleet-sim of N
     endpoints (prefix `three`) enrolled against node 1; a group; one batch with max_concurrency
     16 started on node 1; time it; every endpoint captured exactly once; which node ran each
     capture (each capture job's attempts name a worker `<instance>-capture`; the bench maps the
     instance to a node's pid through the `snapq_workers` table, read-only with psql: a check of
     the bench's own, the product's API names no node per job).
  3. rows like fleet.py: both times, ratio three/one (target <= 1.5x), MiB/s each; and an extra
     row (no target): a second batch of the same three-node group with max_concurrency 48
     (16 per node; a batch's max_concurrency bounds the whole batch across nodes).

Phases run one after the other (one node's processes are stopped before the next phase starts);
SNAPQ_BENCH_THREE_FIRST=1 runs the three nodes first, to see the order's (load drift's) share.

Environment:
  SNAPQ_BIN                  snapq binary [target/release/snapq]; a private copy is run
  SNAPQ_BENCH_FLEET          endpoints per fleet [200]
  SNAPQ_BENCH_DB_MIB         database size per endpoint [5]
  SNAPQ_BENCH_PG             PostgreSQL URL (a schema fleetbench_<pid> is made in it and dropped)
                             [postgres://postgres@127.0.0.1:5432/test]
  SNAPQ_BENCH_WIDE           1 = also the max_concurrency 48 batch on three nodes [1]
  SNAPQ_BENCH_THREE_FIRST    1 = three nodes before one node [0]
  SNAPQ_BENCH_TMP / SNAPQ_BENCH_KEEP as in e2e.py

Reuses e2e.py's and fleet.py's process helpers. Stdlib only; needs `psql`.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402
import fleet  # noqa: E402
from e2e import MIB, Server, env_int, human, log, note, row  # noqa: E402
from fleet import batch_jobs, ms, run_batch, start_fleet  # noqa: E402

FLEET = env_int("SNAPQ_BENCH_FLEET", 200)
PG = os.environ.get("SNAPQ_BENCH_PG", "postgres://postgres@127.0.0.1:5432/test")
WIDE = env_int("SNAPQ_BENCH_WIDE", 1) == 1
THREE_FIRST = env_int("SNAPQ_BENCH_THREE_FIRST", 0) == 1
CONCURRENCY = fleet.CONCURRENCY  # 16: --capture-concurrency of every node and the batch's bound
SCHEMA = f"fleetbench_{os.getpid()}"
RESULTS: dict[str, dict] = {}


def psql(sql: str) -> str:
    out = subprocess.run(["psql", PG, "-v", "ON_ERROR_STOP=1", "-Atc", sql], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"psql {sql!r}: {out.stderr.strip()}")
    return out.stdout


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def serve_args(*extra: str) -> list[str]:
    return ["--capture-concurrency", str(CONCURRENCY), *extra]


def captured_once(server: Server, hosts: list[str], before: dict[str, int]) -> tuple[bool, dict[str, int]]:
    """Every host has exactly one more complete snapshot than in `before`."""
    per_host: dict[str, int] = {}
    for s in server.snapshots():
        if s["state"] == "complete":
            per_host[s["hostname"]] = per_host.get(s["hostname"], 0) + 1
    extra = {h: per_host.get(h, 0) - before.get(h, 0) for h in hosts}
    return all(n == 1 for n in extra.values()), per_host


def timed_batch(server: Server, group: str, hosts: list[str], before: dict[str, int], label: str,
                concurrency: int) -> dict:
    l0 = load()
    took, b = run_batch(server, group, None, concurrency)
    t = b["totals"]
    once, per_host = captured_once(server, hosts, before)
    bad = sorted(h for h in hosts if per_host.get(h, 0) - before.get(h, 0) != 1)
    res = {"took": took, "batch": b, "bytes": t["bytes"], "once": once, "per_host": per_host,
           "ok": once and t["done"] == t["total"] == len(hosts) and b["state"] == "complete",
           "load": f"{l0} -> {load()}"}
    note(f"{label}: batch {b['id']} {b['state']} ({b['reason']}); {t['done']}/{t['total']} done, "
         f"{t['failed']} failed, {t['skipped']} skipped; {human(t['bytes'])} in {took:.1f}s "
         f"({t['bytes'] / MIB / took:.1f} MiB/s); every endpoint captured exactly once: {once}"
         + (f" (not: {bad[:5]})" if bad else "") + f"; load average {res['load']}; " + job_times(server, b["id"]))
    return res


def job_times(server: Server, bid: int) -> str:
    """The queue's share, as fleet.py reports it: capture job created -> started, each capture's
    run (started -> finished), and the batch's end after its last capture."""
    jobs = batch_jobs(server, bid)
    caps = [j for j in jobs if j["kind"] == "capture"]
    waits = sorted(ms(j["started_at"]) - ms(j["created_at"]) for j in caps
                   if j.get("started_at") and j.get("created_at"))
    runs = sorted(ms(j["finished_at"]) - ms(j["started_at"]) for j in caps
                  if j.get("finished_at") and j.get("started_at"))
    fleet_job = next((j for j in jobs if j["kind"] == "fleet"), None)
    finished = [ms(j["finished_at"]) for j in caps if j.get("finished_at")]
    lag = (ms(fleet_job["finished_at"]) - max(finished)
           if fleet_job and fleet_job.get("finished_at") and finished else None)
    if not waits or not runs:
        return "no job times"
    starts = [ms(j["started_at"]) for j in caps if j.get("started_at")]
    span = max(finished) - min(starts)
    gaps = []  # per capture after the first wave: its job created this long after the latest finish
    ends = sorted(finished)
    for j in caps:
        c = ms(j["created_at"]) if j.get("created_at") else None
        prior = [e for e in ends if c is not None and e <= c]
        if prior:
            gaps.append(c - prior[-1])
    refill = (f"; a capture job created after the latest finish before it: median "
              f"{statistics.median(gaps) * 1000:.0f} ms" if gaps else "")
    return (f"capture job created -> started median {statistics.median(waits) * 1000:.0f} ms, p95 "
            f"{waits[int(len(waits) * 0.95)] * 1000:.0f} ms; capture run median "
            f"{statistics.median(runs) * 1000:.0f} ms, p95 {runs[int(len(runs) * 0.95)] * 1000:.0f} ms; "
            f"batch end after its last capture {(lag or 0) * 1000:.0f} ms; captures running on average "
            f"{sum(runs) / span:.1f} (sum of capture runs / first start to last finish {span:.1f}s)" + refill)


def server_log_problems(server: Server) -> list[str]:
    text = re.sub(r"\x1b\[[0-9;]*m", "", server.proc.stderr_path.read_text(errors="replace"))
    return [line for line in text.splitlines() if " WARN " in line or " ERROR " in line
            or line.startswith(("WARN", "ERROR"))]


def report_logs(servers: list[Server]) -> None:
    for s in servers:
        problems = server_log_problems(s)
        if problems:
            note(f"{s.proc.name}: {len(problems)} WARN/ERROR line(s) in its log, e.g. {problems[0][:300]}")
        else:
            note(f"{s.proc.name}: no WARN/ERROR lines in its log")


# ---------------------------------------------------------------------------------------------


def one_node(scratch: Path) -> None:
    log(f"one node (SQLite): load average {load()}")
    server = Server(scratch, "one-node", serve_args())
    st = server.api("GET", "/status")
    fl = start_fleet(scratch, server, "one", FLEET, [])
    hosts = sorted(fl.addrs)
    server.cli("groups", "add", "one", "--hostname", "one-*")
    RESULTS["one"] = timed_batch(server, "one", hosts, {}, f"one node ({st['catalog']})", CONCURRENCY)
    fl.stop()
    server.stop()
    report_logs([server])


def three_nodes(scratch: Path) -> None:
    log(f"three nodes (PostgreSQL schema {SCHEMA}): load average {load()}")
    url = f"{PG}?options=-c%20search_path%3D{SCHEMA}"
    store = scratch / "store"
    common = ["--database", url, "--store", str(store)]
    n1 = Server(scratch, "node1", serve_args(*common))
    for name in ("node2", "node3"):
        d = scratch / name
        d.mkdir()
        shutil.copytree(n1.data_dir / "certs", d / "certs")
        for f in ("admin.token", "enroll.token", "agents.key"):
            shutil.copy2(n1.data_dir / f, d / f)
    nodes = [n1] + [Server(scratch, name, serve_args(*common)) for name in ("node2", "node3")]
    status = [n.api("GET", "/status") for n in nodes]
    note("three nodes: " + ", ".join(f"{n.proc.name} {n.url} = {s['node']} ({s['catalog']})"
                                     for n, s in zip(nodes, status)))
    fl = start_fleet(scratch, n1, "three", FLEET, [])
    hosts = sorted(fl.addrs)
    n1.cli("groups", "add", "three", "--hostname", "three-*")
    RESULTS["three"] = res = timed_batch(n1, "three", hosts, {}, "three nodes (postgres)", CONCURRENCY)
    res["per_node"] = per_node(n1, nodes, res["batch"]["id"])
    if WIDE:
        RESULTS["wide"] = w = timed_batch(n1, "three", hosts, res["per_host"],
                                          "three nodes, batch max_concurrency 48", 3 * CONCURRENCY)
        w["per_node"] = per_node(n1, nodes, w["batch"]["id"])
    files = [p for p in store.rglob("*.db") if p.parent.name.startswith("three-")]
    hidden = [p for p in store.rglob(".*") if p.is_file() and p.parent.name.startswith("three-")]
    note(f"shared store: {len(files)} snapshot file(s) of the three-node fleet, {len(hidden)} hidden "
         f"(temporary) file(s) left")
    fl.stop()
    for n in nodes:
        n.stop()
    report_logs(nodes)


def per_node(server: Server, nodes: list[Server], bid: int) -> dict[str, int]:
    """Capture attempts of batch `bid` by node (worker `<instance>-capture` -> pid via psql)."""
    jobs = [j for j in batch_jobs(server, bid) if j["kind"] == "capture"]
    workers: dict[str, int] = {}
    for j in jobs:
        detail = server.api("GET", f"/v1/queue/jobs/{j['id']}")
        for a in detail.get("attempt_log", []):
            workers[a["worker"]] = workers.get(a["worker"], 0) + 1
    pid_of = {}
    for line in psql(f"SELECT id, pid FROM {SCHEMA}.snapq_workers").splitlines():
        wid, pid = line.split("|")
        pid_of[wid] = int(pid)
    name_of_pid = {n.proc.pid: n.proc.name for n in nodes}
    by_node: dict[str, int] = {n.proc.name: 0 for n in nodes}
    for wid, count in workers.items():
        name = name_of_pid.get(pid_of.get(wid, -1), f"unknown worker {wid}")
        by_node[name] = by_node.get(name, 0) + count
    attempts = sum(workers.values())
    note(f"batch {bid}: {len(jobs)} capture jobs, {attempts} attempts; attempts by node: "
         + ", ".join(f"{k} {v}" for k, v in by_node.items()))
    return by_node


def main() -> int:
    if not Path(e2e.BIN).exists():
        print(f"{e2e.BIN} not found: build it or set SNAPQ_BIN", file=sys.stderr)
        return 2
    parent = Path(os.environ.get("SNAPQ_BENCH_TMP", "/tmp"))
    scratch = Path(tempfile.mkdtemp(prefix="snapq-fleetnodes-", dir=parent))
    # A private copy: a build into the target dir during the run would swap the binary.
    shutil.copy2(e2e.BIN, scratch / "snapq")
    e2e.BIN = str(scratch / "snapq")
    log(f"scratch {scratch}; {FLEET} endpoints of ~{fleet.DB_MIB} MiB per fleet; schema {SCHEMA}; "
        f"nproc {os.cpu_count()}; load average {load()}")
    psql(f"CREATE SCHEMA {SCHEMA}")
    status = 0
    try:
        for phase in ((three_nodes, one_node) if THREE_FIRST else (one_node, three_nodes)):
            phase(scratch)
    except Exception as e:  # noqa: BLE001 - report what we have
        log(f"FAILED: {e!r}")
        import traceback

        traceback.print_exc()
        status = 1
    finally:
        for p in e2e.PROCS:
            try:
                p.stop()
            except Exception:  # noqa: BLE001
                pass
        try:
            psql(f"DROP SCHEMA {SCHEMA} CASCADE")
        except RuntimeError as e:
            log(f"could not drop schema {SCHEMA}: {e}")
        if os.environ.get("SNAPQ_BENCH_KEEP") == "1" or status:
            log(f"kept {scratch} (logs: *.stderr.log)")
            if os.environ.get("SNAPQ_BENCH_KEEP") != "1":
                for p in scratch.iterdir():
                    if not p.name.endswith(".log"):
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    one, three, wide = RESULTS.get("one"), RESULTS.get("three"), RESULTS.get("wide")

    def measured(r: dict) -> str:
        t = r["batch"]["totals"]
        return (f"{r['took']:.1f} s, {r['bytes'] / MIB / r['took']:.1f} MiB/s, {t['done']}/{t['total']} done"
                + (", each once" if r["once"] else ", NOT each once"))

    def nodes_text(r: dict) -> str:
        return "captures by node " + "/".join(str(v) for v in r["per_node"].values())

    if one:
        row(f"one SQLite node: batch of {FLEET} x ~{fleet.DB_MIB} MiB, max concurrency {CONCURRENCY}",
            measured(one), "", None, "all once", one["ok"])
    if three and one:
        ratio = three["took"] / one["took"]
        row(f"three nodes (PostgreSQL, shared store): same batch, max concurrency {CONCURRENCY}",
            measured(three) + "; " + nodes_text(three), f"one node {one['took']:.1f} s", ratio,
            "<= 1.5x, all once", ratio <= 1.5 and three["ok"] and one["ok"])
    elif three:
        row("three nodes (PostgreSQL, shared store)", measured(three), "", None, "all once", three["ok"])
    if wide:
        ratio = wide["took"] / one["took"] if one else None
        row(f"three nodes, max concurrency {3 * CONCURRENCY} (extra, no target)",
            measured(wide) + "; " + nodes_text(wide), f"one node {one['took']:.1f} s" if one else "",
            ratio, "", None)
    print()
    print(f"{'measure':<78} {'measured':<70} {'baseline':<18} {'ratio':>7} {'target':<18} result")
    for r in e2e.ROWS:
        print(f"{r['name']:<78} {r['measured']:<70} {r['baseline']:<18} {r['ratio']:>7} {r['target']:<18} {r['result']}")
    for n in e2e.NOTES:
        print(f"- {n}")
    if status:
        return status
    return 0 if e2e.ROWS and all(r["result"] != "FAIL" for r in e2e.ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Fleet-capture benchmark (issue 9): a batch over many `snapq fleet-sim` endpoints.

Starts a real `snapq serve --capture-concurrency 16` and `snapq fleet-sim --db-mib 5`, then:

  1. single-capture throughput on one endpoint (median of 3, the reference);
  2. `POST /v1/fleet/batches` of the whole group with max_concurrency 16: total time beside
     total bytes / single-capture throughput (target within 1.5x), every endpoint captured exactly
     once, the queue's per-job overhead (capture job created -> started, and the batch's end lag
     after its last capture), the server's peak memory (VmHWM, target < 128 MiB) and its peak
     while 16 captures run (sampled VmRSS, target < 64 MiB);
  3. a second fleet with `--flaky 10` in its own batch: it completes; retries (capture attempts
     beyond the first) and resumed bytes (from the server's "resuming the download" log lines).

Environment:
  SNAPQ_BIN                  snapq binary [target/release/snapq]
  SNAPQ_BENCH_FLEET          endpoints of the main fleet [1000]
  SNAPQ_BENCH_DB_MIB         database size per endpoint [5]
  SNAPQ_BENCH_FLAKY_FLEET    endpoints of the flaky fleet [100]
  SNAPQ_BENCH_TMP / SNAPQ_BENCH_KEEP as in e2e.py

Reuses e2e.py's process helpers. Stdlib only.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402
from e2e import MIB, Proc, Server, capture_api, env_int, human, log, note, row  # noqa: E402

FLEET = env_int("SNAPQ_BENCH_FLEET", 1000)
DB_MIB = env_int("SNAPQ_BENCH_DB_MIB", 5)
FLAKY_FLEET = env_int("SNAPQ_BENCH_FLAKY_FLEET", 100)
CONCURRENCY = 16


class RssSampler:
    """Samples a process's VmRSS every 50 ms; `peak` while `active` is set."""

    def __init__(self, pid: int):
        self.pid = pid
        self.active = threading.Event()
        self.peak = 0
        self.stop = threading.Event()
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            if not self.active.is_set():
                continue
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return


def start_fleet(scratch: Path, server: Server, prefix: str, count: int, extra: list[str]) -> Proc:
    t0 = time.monotonic()
    fleet = Proc(f"fleet-{prefix}", ["fleet-sim", "--count", str(count), "--prefix", prefix,
                                     "--server", server.url, "--enroll-token", server.enroll_token,
                                     "--data-dir", str(scratch / f"fleet-{prefix}"),
                                     "--db-mib", str(DB_MIB), "--events-per-sec", "1",
                                     "--heartbeat-secs", "10", *extra],
                 scratch, expect=count, timeout=7200, who_prefix=f"{prefix}-")
    log(f"fleet-sim {prefix}: {count} endpoints listening after {time.monotonic() - t0:.1f}s")
    server.wait_online(sorted(fleet.addrs), timeout=600)
    return fleet


def ms(t: str | None) -> float | None:
    return datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() if t else None


def run_batch(server: Server, group: str, sampler: RssSampler | None,
              concurrency: int = CONCURRENCY) -> tuple[float, dict]:
    t0 = time.monotonic()
    started = server.api("POST", "/v1/fleet/batches", {"group": group, "max_concurrency": concurrency,
                                                       "expire_secs": 7200})
    bid = started["batch_id"]
    while True:
        b = server.api("GET", f"/v1/fleet/batches/{bid}")
        if sampler is not None:
            if b["totals"]["running"] >= concurrency:
                sampler.active.set()
            else:
                sampler.active.clear()
        if b["state"] not in ("running", "paused"):
            return time.monotonic() - t0, b
        if b["state"] == "paused":
            raise RuntimeError(f"batch {bid} paused: {b['reason']}")
        time.sleep(0.2)


def batch_jobs(server: Server, bid: int) -> list[dict]:
    return server.api("GET", f"/v1/queue/jobs?batch={bid}&limit=10000", timeout=300)


def main() -> int:
    parent = os.environ.get("SNAPQ_BENCH_TMP", "/tmp")
    scratch = Path(tempfile.mkdtemp(prefix="snapq-fleet-", dir=parent))
    log(f"scratch {scratch}; {FLEET} endpoints of ~{DB_MIB} MiB, flaky fleet {FLAKY_FLEET}")
    try:
        env = os.environ.get("RUST_LOG")
        os.environ["RUST_LOG"] = "warn,snapq_jobs::handlers::capture=info"
        server = Server(scratch, "server", ["--capture-concurrency", str(CONCURRENCY),
                                            "--job-retry-base-ms", "500"])
        if env is None:
            del os.environ["RUST_LOG"]
        else:
            os.environ["RUST_LOG"] = env
        fleet = start_fleet(scratch, server, "fleet", FLEET, [])
        hosts = sorted(fleet.addrs)
        server.cli("groups", "add", "fleet", "--hostname", "fleet-*")

        singles = []
        for _ in range(3):
            took, by_id = capture_api(server, [hosts[0]], 300, 0.01)
            (s,) = by_id.values()
            assert s["state"] == "complete", s
            singles.append((took, s["size"]))
        took1, size1 = sorted(singles)[1]
        throughput = size1 / took1
        hwm_single = server.proc.vmhwm()
        log(f"single capture {human(size1)} in {took1 * 1000:.0f} ms ({throughput / MIB:.1f} MiB/s); "
            f"server VmHWM so far {human(hwm_single)}")

        sampler = RssSampler(server.proc.pid)
        took, b = run_batch(server, "fleet", sampler)
        sampler.stop.set()
        hwm = server.proc.vmhwm()
        t = b["totals"]
        expected = t["bytes"] / throughput
        ratio = took / expected if expected else 0
        per_host: dict[str, int] = {}
        for s in server.snapshots():
            if s["state"] == "complete":
                per_host[s["hostname"]] = per_host.get(s["hostname"], 0) + 1
        # hosts[0] also has the three reference captures.
        once = all(per_host.get(h, 0) == (4 if h == hosts[0] else 1) for h in hosts)
        note(f"batch {b['id']}: {b['state']} ({b['reason']}); {t['done']}/{t['total']} done, "
             f"{t['failed']} failed, {t['skipped']} skipped, {human(t['bytes'])} in {took:.1f}s "
             f"({t['bytes'] / MIB / took:.1f} MiB/s); every endpoint captured exactly once: {once}")
        row(f"batch of {FLEET} x ~{DB_MIB} MiB, max concurrency {CONCURRENCY}",
            f"{took:.1f} s, {t['done']}/{t['total']} done",
            f"{expected:.1f} s = {human(t['bytes'])} / {throughput / MIB:.1f} MiB/s", ratio,
            "<= 1.5x, all once", ratio <= 1.5 and once and t["done"] == t["total"])

        jobs = batch_jobs(server, b["id"])
        waits = sorted(ms(j["started_at"]) - ms(j["created_at"]) for j in jobs
                       if j["kind"] == "capture" and j.get("started_at") and j.get("created_at"))
        finished = [ms(j["finished_at"]) for j in jobs if j["kind"] == "capture" and j.get("finished_at")]
        fleet_job = next(j for j in jobs if j["kind"] == "fleet")
        lag = (ms(fleet_job["finished_at"]) - max(finished)) if finished and fleet_job.get("finished_at") else None
        if waits:
            note(f"queue overhead per capture job (created -> started, includes waiting for a free "
                 f"worker): median {statistics.median(waits) * 1000:.0f} ms, p95 "
                 f"{waits[int(len(waits) * 0.95)] * 1000:.0f} ms; batch end after its last capture: "
                 f"{(lag or 0) * 1000:.0f} ms")
        row("server peak memory (VmHWM), whole run", human(hwm), f"{human(hwm_single)} after single captures",
            None, "< 128 MiB", hwm < 128 * MIB)
        row(f"server peak RSS while {CONCURRENCY} captures run", human(sampler.peak), "", None, "< 64 MiB",
            0 < sampler.peak < 64 * MIB)
        fleet.stop()

        flaky = start_fleet(scratch, server, "flaky", FLAKY_FLEET, ["--flaky", "10"])
        server.cli("groups", "add", "flaky", "--hostname", "flaky-*")
        took, b = run_batch(server, "flaky", None)
        jobs = batch_jobs(server, b["id"])
        retries = sum(max(0, j["attempts"] - 1) for j in jobs if j["kind"] == "capture")
        log_text = re.sub(r"\x1b\[[0-9;]*m", "", server.proc.stderr_path.read_text(errors="replace"))
        resumed = [int(m) for m in re.findall(r"from=(\d+)[^\n]*resuming the download", log_text)]
        resumed += [int(m) for m in re.findall(r"resuming the download[^\n]*from=(\d+)", log_text)]
        t = b["totals"]
        note(f"flaky batch {b['id']}: {b['state']} ({b['reason']}) in {took:.1f}s; {retries} retries, "
             f"{len(resumed)} resumed downloads, {human(sum(resumed))} not fetched again")
        row(f"--flaky 10 batch of {FLAKY_FLEET}", f"{b['state']}, {t['done']}/{t['total']} done",
            f"{retries} retries, {human(sum(resumed))} resumed", None, "completes",
            b["state"] == "complete")
        flaky.stop()
        server.stop()
    finally:
        for p in e2e.PROCS:
            try:
                p.stop()
            except Exception:  # noqa: BLE001
                pass
        if os.environ.get("SNAPQ_BENCH_KEEP") != "1":
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(f"{'measure':<58} {'measured':<26} {'baseline':<44} {'ratio':>7} {'target':<18} result")
    for r in e2e.ROWS:
        print(f"{r['name']:<58} {r['measured']:<26} {r['baseline']:<44} {r['ratio']:>7} {r['target']:<18} {r['result']}")
    for n in e2e.NOTES:
        print(f"- {n}")
    return 0 if all(r["result"] != "FAIL" for r in e2e.ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""TLS on the endpoint API keeps captures fast (issue 8).

Two snapq builds side by side in one run: the build before the endpoint API went to TLS
(SNAPQ_BIN_BASE, plain HTTP to agents) and this one (SNAPQ_BIN, HTTPS pinned at enrollment). Each
capture runs on a fresh server and a fresh agent whose monitor.db is a copy of one prefilled
database (~725 MiB at 5,500,000 events), with the simulator recording 1,000 events/s; the time is
`snapq capture H --yes --wait` from start to exit (warm page cache: this measures the transfer's
CPU cost, which is what TLS adds). Prints:

    unthrottled loopback capture: median of SNAPQ_BENCH_RUNS per build, new / base <= 1.1x
    link-bound capture (`serve --capture-rate-kib 102400`): time / (size / rate) <= 1.07x

Environment: SNAPQ_BIN_BASE (required), SNAPQ_BIN [target/release/snapq], SNAPQ_BENCH_EVENTS
[5500000], SNAPQ_BENCH_RUNS [3], SNAPQ_BENCH_TMP [/tmp]. Stdlib only; reuses benches/e2e.py.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402

HOST = "bench-tls"
RATE_KIB = 102400


def seed(scratch: Path, binary: str, events: int) -> Path:
    """A prefilled, checkpointed monitor.db every capture starts from."""
    e2e.BIN = binary
    proc = e2e.agent(scratch, "seed", HOST, events, 1, None)
    proc.stop()
    db = scratch / "seed" / "monitor.db"
    e2e.checkpoint(db)
    return db


def capture(scratch: Path, label: str, binary: str, db: Path, extra: list[str]) -> tuple[float, int]:
    e2e.BIN = binary
    name = f"{label}-{time.monotonic_ns()}"
    server = e2e.Server(scratch, f"server-{name}", extra)
    agent_dir = scratch / f"agent-{name}"
    agent_dir.mkdir()
    shutil.copyfile(db, agent_dir / "monitor.db")
    agent = e2e.agent(scratch, f"agent-{name}", HOST, 0, e2e.RATE, server)
    try:
        server.wait_online([HOST])
        took, out = server.cli("capture", HOST, "--yes", "--wait", "--json")
        snap = json.loads(out.stdout)[0]
        assert snap["state"] == "complete", snap
    finally:
        agent.stop()
        server.stop()
        shutil.rmtree(agent_dir, ignore_errors=True)
        shutil.rmtree(server.data_dir, ignore_errors=True)
    e2e.log(f"{label}: {e2e.human(snap['size'])} in {took:.2f}s ({snap['size'] / e2e.MIB / took:.0f} MiB/s)")
    return took, snap["size"]


def main() -> int:
    base = os.environ.get("SNAPQ_BIN_BASE")
    new = os.environ.get("SNAPQ_BIN", e2e.BIN)
    if not base or not Path(base).exists() or not Path(new).exists():
        print("set SNAPQ_BIN_BASE to the build before this change (and SNAPQ_BIN)", file=sys.stderr)
        return 2
    events = e2e.env_int("SNAPQ_BENCH_EVENTS", 5_500_000)
    runs = e2e.env_int("SNAPQ_BENCH_RUNS", 3)
    parent = Path(os.environ.get("SNAPQ_BENCH_TMP", "/tmp"))
    scratch = Path(tempfile.mkdtemp(prefix="snapq-tls-", dir=parent))
    # Private copies: a build during the run must not swap a binary between steps.
    shutil.copy2(base, scratch / "snapq-base")
    shutil.copy2(new, scratch / "snapq-new")
    bins = {"base (plain HTTP)": str(scratch / "snapq-base"), "new (TLS, pinned)": str(scratch / "snapq-new")}
    status = 0
    try:
        db = seed(scratch, bins["new (TLS, pinned)"], events)
        times: dict[str, list[float]] = {k: [] for k in bins}
        size = 0
        for i in range(runs):
            order = list(bins.items()) if i % 2 == 0 else list(reversed(bins.items()))
            for label, binary in order:
                took, size = capture(scratch, label, binary, db, [])
                times[label].append(took)
        t_base = statistics.median(times["base (plain HTTP)"])
        t_new = statistics.median(times["new (TLS, pinned)"])
        fmt = lambda ts: ", ".join(f"{t:.2f}" for t in ts)  # noqa: E731
        e2e.row(f"unthrottled loopback capture of {e2e.human(size)}, median of {runs}",
                f"{t_new:.2f} s [{fmt(times['new (TLS, pinned)'])}]",
                f"{t_base:.2f} s [{fmt(times['base (plain HTTP)'])}] before", t_new / t_base, "<= 1.1x",
                t_new / t_base <= 1.1)
        ideal = size / (RATE_KIB * 1024)
        for label, binary in bins.items():
            took, size = capture(scratch, label + ", link-bound", binary, db, ["--capture-rate-kib", str(RATE_KIB)])
            target = label.startswith("new")
            e2e.row(f"{label}: capture of {e2e.human(size)} at --capture-rate-kib {RATE_KIB}",
                    f"{took:.2f} s", f"size / rate {ideal:.2f} s", took / ideal,
                    "<= 1.07x" if target else "(reference)", took / ideal <= 1.07 if target else None)
    except Exception as e:  # noqa: BLE001 - report what we have
        e2e.log(f"FAILED: {e!r}")
        status = 1
        import traceback

        traceback.print_exc()
    finally:
        for proc in e2e.PROCS:
            proc.stop()
        e2e.print_table()
        shutil.rmtree(scratch, ignore_errors=True)
    if any(r["result"] == "FAIL" for r in e2e.ROWS):
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())

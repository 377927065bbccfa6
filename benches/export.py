#!/usr/bin/env python3
"""Export benchmark (issue 15): `snapq export` of all `process` and `file` events of a stored
snapshot, against `sqlite3 -csv` writing the same rows in the same run.

For each size (default ~400k and ~4M events) it prefills a recorder database with the simulator
(`snapq agent --prefill-events`), exports it (`snapq agent export`), uploads it to a fresh
`snapq serve` and then, warm:

  baseline  `sqlite3 -csv -header FILE 'SELECT ... FROM process ORDER BY ts, id; SELECT ... FROM
            file ORDER BY ts, id' > out.csv` (the same columns and order the export writes)
  csv       POST /v1/exports {snapshot, types: [process, file], format: csv}, timed from the
            export's created_ms to finished_ms (queue pickup included)
  jsonl     the same as JSON Lines
  xlsx      the same as XLSX (constant-memory worksheets; a new sheet per 1,048,576 rows)

and the server's peak RSS during each export (VmHWM, reset through /proc/PID/clear_refs before
each one). Targets: CSV rows/s >= 0.8x sqlite3's; peak memory < 64 MiB and flat across sizes.

Environment:
  SNAPQ_BIN                 snapq binary [target/release/snapq]
  SNAPQ_BENCH_SIZES         comma-separated event counts [400000,4000000]
  SNAPQ_BENCH_FORMATS       comma-separated formats [csv,jsonl,xlsx]
  SNAPQ_BENCH_TMP           parent of the scratch directory [/tmp]
  SNAPQ_BENCH_KEEP          1 = keep the scratch directory [0]

Stdlib only; reuses the process helpers of benches/e2e.py. Needs /usr/bin/sqlite3.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402

SIZES = [int(s.replace("_", "")) for s in os.environ.get("SNAPQ_BENCH_SIZES", "400000,4000000").split(",")]
FORMATS = [f.strip() for f in os.environ.get("SNAPQ_BENCH_FORMATS", "csv,jsonl,xlsx").split(",")]
MIB = 1024 * 1024

PROCESS = "id, ts, process_id, pid, ppid, parent_id, path, cmdline, user, sha256, end_ts, exit_code"
FILE = "id, ts, process_id, op, path, new_path, size"


def reset_hwm(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def count_rows(db: Path) -> int:
    out = subprocess.run(["sqlite3", str(db), "SELECT (SELECT count(*) FROM process) + (SELECT count(*) FROM file)"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def sqlite_baseline(db: Path, out: Path) -> float:
    sql = (f"SELECT 'process' AS type, {PROCESS} FROM process ORDER BY ts, id;"
           f"SELECT 'file' AS type, {FILE} FROM file ORDER BY ts, id;")
    cmd = f"sqlite3 -csv -header 'file:{db}?immutable=1' \"{sql}\" > '{out}'"
    e2e.timed(cmd, shell=True)  # warm the cache
    best = min(e2e.timed(cmd, shell=True) for _ in range(2))
    out.unlink(missing_ok=True)
    return best


def run_export(server: e2e.Server, snap: int, fmt: str) -> tuple[float, int, int, int]:
    """(seconds, rows, bytes, peak RSS bytes) of one export."""
    pid = server.proc.pid
    reset_hwm(pid)
    made = server.api("POST", "/v1/exports", {"snapshot": snap, "types": ["process", "file"], "format": fmt})
    while True:
        e = server.api("GET", f"/v1/exports/{made['id']}")
        if e["state"] in ("complete", "failed", "cancelled"):
            break
        time.sleep(0.05)
    if e["state"] != "complete":
        raise RuntimeError(f"export {made['id']} {e['state']}: {e.get('error')}")
    peak = server.proc.vmhwm()
    secs = (e["finished_ms"] - e["created_ms"]) / 1000
    server.api("DELETE", f"/v1/exports/{made['id']}")
    return secs, e["rows"], e["bytes"], peak


def main() -> int:
    scratch = Path(tempfile.mkdtemp(prefix="snapq-export-bench-", dir=os.environ.get("SNAPQ_BENCH_TMP", "/tmp")))
    e2e.log(f"scratch {scratch}; binary {e2e.BIN}")
    peaks: dict[str, list[int]] = {f: [] for f in FORMATS}
    try:
        for n in SIZES:
            host = f"bench-{n // 1000}k"
            agent = e2e.agent(scratch, f"agent-{n}", host, n, 1, None)
            agent.stop()
            e2e.checkpoint(agent.data_dir / "monitor.db")  # type: ignore[attr-defined]
            file, _, _ = e2e.export(agent.data_dir, scratch / f"out-{n}")  # type: ignore[attr-defined]
            rows = count_rows(file)
            server = e2e.Server(scratch, f"server-{n}")
            server.cli("upload", str(file), "--connect")
            snap = next(s["id"] for s in server.snapshots(host) if s["state"] == "complete")
            stored = next((server.data_dir / "snapshots").rglob("*.db"))
            base = sqlite_baseline(stored, scratch / "baseline.csv")
            base_rate = rows / base
            e2e.row(f"sqlite3 -csv, {rows:,} rows", f"{base_rate:,.0f} rows/s", "", None, "", None)
            for fmt in FORMATS:
                secs, got, size, peak = run_export(server, snap, fmt)
                assert got == rows, f"{fmt}: {got} rows, expected {rows}"
                rate = got / secs
                peaks[fmt].append(peak)
                if fmt == "csv":
                    e2e.row(f"export csv, {rows:,} rows", f"{rate:,.0f} rows/s ({secs:.2f} s, {e2e.human(size)})",
                            f"{base_rate:,.0f} rows/s", rate / base_rate, ">= 0.8x sqlite3", rate >= 0.8 * base_rate)
                else:
                    e2e.row(f"export {fmt}, {rows:,} rows", f"{rate:,.0f} rows/s ({secs:.2f} s, {e2e.human(size)})",
                            "", None, "printed", None)
                e2e.row(f"server VmHWM during {fmt}, {rows:,} rows", f"{peak / MIB:.1f} MiB", "", None,
                        "< 64 MiB", peak < 64 * MIB)
            server.stop()
        for fmt, values in peaks.items():
            if len(values) > 1:
                flat = max(values) - min(values) < 16 * MIB
                e2e.row(f"VmHWM {fmt} across sizes", " / ".join(f"{v / MIB:.1f}" for v in values) + " MiB",
                        "", None, "flat (< 16 MiB apart)", flat)
        e2e.print_table()
        return 0 if all(r["result"] != "FAIL" for r in e2e.ROWS) else 1
    finally:
        for p in list(e2e.PROCS):
            p.stop()
        if os.environ.get("SNAPQ_BENCH_KEEP") != "1":
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

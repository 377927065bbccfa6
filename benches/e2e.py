#!/usr/bin/env python3
"""End-to-end benchmark of snapq capture, upload and drop-folder ingest (issues 3 and 4).

Starts real `snapq serve`, `snapq agent` and `snapq fleet-sim` processes on loopback, times the
product against plain-tool baselines measured in the same run, and prints one table:

    measured | baseline | ratio | target | PASS/FAIL

Sections (run all by default; SNAPQ_BENCH_ONLY=capture,fleet,upload,drop picks some):
  capture  one agent with a prefilled recorder db (~750 MB at 5,500,000 events) recording 1,000
           events/s: `snapq capture H --yes --wait` vs `cp monitor.db`; server VmHWM for a ~100 MB
           and the large capture (each on a fresh server)
  fleet    200 fleet-sim endpoints (~5 MB each): all captured at once vs total bytes divided by
           the single-capture throughput measured on one of them in the same run
  upload   `snapq upload FILE --connect` of a large export vs `cp FILE X && sha256sum FILE`
  drop     a fresh large export renamed into watch/ until listed complete vs
           `sha256sum FILE` + `sqlite3 FILE 'pragma quick_check'`; then 1,000 small distinct
           snapshot files renamed into watch/ at once (rate, none ingested twice)

Environment (sizes are selectable for a quick smoke run):
  SNAPQ_BIN                     snapq binary [target/release/snapq beside this script]
  SNAPQ_BENCH_EVENTS            prefill of the large agent [5500000] (~725 MiB = 760 MB; the
                                simulator writes ~138 bytes per event, so 4,000,000 is ~528 MiB)
  SNAPQ_BENCH_SMALL_EVENTS      prefill of the memory-check agent [EVENTS * 2 / 15] (~100 MB)
  SNAPQ_BENCH_RATE              events/s the large agent records while measured [1000]
  SNAPQ_BENCH_FLEET             fleet-sim endpoints [200]
  SNAPQ_BENCH_FLEET_EVENTS      prefill per fleet endpoint [36000] (~4.7 MiB snapshots)
  SNAPQ_BENCH_CAPTURE_CONCURRENCY  `serve --capture-concurrency` for the fleet section [16]
  SNAPQ_BENCH_SINGLE_RUNS       single captures timed for the fleet reference (median) [3]
  SNAPQ_BENCH_DROP_FILES        small files dropped at once [1000]
  SNAPQ_BENCH_DROP_EVENTS       prefill of the agent the small drop file is exported from [2000]
  SNAPQ_BENCH_DROP_CACHES       1 = `sync; echo 3 > /proc/sys/vm/drop_caches` before each timed
                                step (needs root; falls back to warm cache and says so) [1]
  SNAPQ_BENCH_TMP               parent of the scratch directory [/tmp]
  SNAPQ_BENCH_KEEP              1 = keep the scratch directory [0]
  SNAPQ_BENCH_ONLY              comma-separated sections [capture,fleet,upload,drop]

Stdlib only (Python 3.11). Needs /usr/bin/sqlite3 for the drop-folder baseline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = os.environ.get("SNAPQ_BIN", str(REPO / "target" / "release" / "snapq"))


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value.replace("_", "").replace(",", "")) if value else default


EVENTS = env_int("SNAPQ_BENCH_EVENTS", 5_500_000)
SMALL_EVENTS = env_int("SNAPQ_BENCH_SMALL_EVENTS", EVENTS * 2 // 15)
RATE = env_int("SNAPQ_BENCH_RATE", 1000)
FLEET = env_int("SNAPQ_BENCH_FLEET", 200)
FLEET_EVENTS = env_int("SNAPQ_BENCH_FLEET_EVENTS", 36_000)
CAPTURE_CONCURRENCY = env_int("SNAPQ_BENCH_CAPTURE_CONCURRENCY", 16)
SINGLE_RUNS = env_int("SNAPQ_BENCH_SINGLE_RUNS", 3)
DROP_FILES = env_int("SNAPQ_BENCH_DROP_FILES", 1000)
DROP_EVENTS = env_int("SNAPQ_BENCH_DROP_EVENTS", 2000)
WANT_DROP_CACHES = env_int("SNAPQ_BENCH_DROP_CACHES", 1) == 1
KEEP = env_int("SNAPQ_BENCH_KEEP", 0) == 1
ONLY = {
    s.strip()
    for s in os.environ.get("SNAPQ_BENCH_ONLY", "capture,fleet,upload,drop").split(",")
    if s.strip()
}

MIB = 1 << 20
ROWS: list[dict] = []  # the result table
PROCS: list["Proc"] = []  # every process started, stopped at exit whatever happened
NOTES: list[str] = []  # facts worth printing under the table


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def note(msg: str) -> None:
    NOTES.append(msg)
    log(msg)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def row(name: str, measured: str, baseline: str, ratio: float | None, target: str, ok: bool | None):
    ROWS.append(
        {
            "name": name,
            "measured": measured,
            "baseline": baseline,
            "ratio": "" if ratio is None else f"{ratio:.2f}x",
            "target": target,
            "result": "" if ok is None else ("PASS" if ok else "FAIL"),
        }
    )
    log(f"RESULT {name}: {measured} vs {baseline} {ROWS[-1]['ratio']} target {target} {ROWS[-1]['result']}")


# ---------------------------------------------------------------------------------------------
# page cache


DROP_CACHES_WORKS: bool | None = None


def drop_caches() -> bool:
    """`sync; echo 3 > /proc/sys/vm/drop_caches`; False (and a note, once) when not permitted."""
    global DROP_CACHES_WORKS
    if not WANT_DROP_CACHES or DROP_CACHES_WORKS is False:
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        DROP_CACHES_WORKS = True
    except OSError as e:
        DROP_CACHES_WORKS = False
        note(f"cannot drop the page cache ({e}); every step runs on a warm cache")
        return False
    return True


def cache_state() -> str:
    if DROP_CACHES_WORKS:
        return "cold cache"
    return "warm cache"


# ---------------------------------------------------------------------------------------------
# processes


class Proc:
    """A snapq process that announced `... listening on ADDR` on stdout."""

    def __init__(self, name: str, args: list[str], log_dir: Path, expect: int = 1, timeout: float = 600,
                 who_prefix: str = ""):
        self.name = name
        self.stderr_path = log_dir / f"{name}.stderr.log"
        self.stderr = open(self.stderr_path, "wb")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        self.popen = subprocess.Popen(
            [BIN, *args], stdout=subprocess.PIPE, stderr=self.stderr, stdin=subprocess.DEVNULL, env=env
        )
        PROCS.append(self)
        self.addrs: dict[str, str] = {}
        self.lines: list[str] = []
        got = threading.Event()
        deadline = time.monotonic() + timeout

        def reader():
            for raw in self.popen.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append(line)
                if " listening on " in line:
                    who, addr = line.split(" listening on ", 1)
                    if who.strip().startswith(who_prefix):
                        self.addrs[who.strip()] = addr.strip()
                    if len(self.addrs) >= expect:
                        got.set()
            got.set()

        threading.Thread(target=reader, daemon=True).start()
        while not got.wait(0.2):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name}: no listening line within {timeout}s; see {self.stderr_path}")
        if len(self.addrs) < expect:
            tail = self.stderr_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited before listening ({len(self.addrs)}/{expect}):\n{tail}")

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def addr(self) -> str:
        return next(iter(self.addrs.values()))

    def vmhwm(self) -> int:
        """Peak resident set size in bytes (VmHWM), 0 if unreadable."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if not self.stderr.closed:
            self.stderr.close()


class Server:
    def __init__(self, scratch: Path, name: str, extra: list[str] | None = None):
        self.data_dir = scratch / name
        # exist_ok: a caller may prepare the data dir beforehand (fleet_nodes.py copies a first
        # node's certs and tokens into it).
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = Proc(
            name,
            ["serve", "--data-dir", str(self.data_dir), "--listen", "127.0.0.1:0",
             "--online-window-secs", "30", *(extra or [])],
            scratch,
        )
        self.url = f"https://{self.proc.addr}"
        self.token = (self.data_dir / "admin.token").read_text().strip()
        self.enroll_token = (self.data_dir / "enroll.token").read_text().strip()
        cert = self.data_dir / "certs" / "httpPublicCert.pem"
        self.ctx = ssl.create_default_context(cafile=str(cert))
        self.ctx.check_hostname = False
        try:
            self.api("GET", "/v1/endpoints")
        except (ssl.SSLError, urllib.error.URLError) as e:
            if "CERTIFICATE_VERIFY_FAILED" not in str(e):
                raise
            note(f"python ssl does not accept the pinned self-signed cert ({e}); the bench's own "
                 "polling skips verification (the snapq CLI still pins it)")
            self.ctx = ssl.create_default_context()
            self.ctx.check_hostname = False
            self.ctx.verify_mode = ssl.CERT_NONE

    def api(self, method: str, path: str, body=None, timeout: float = 60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def cli(self, *args: str, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
        cmd = [BIN, *args, "--server", self.url, "--data-dir", str(self.data_dir)]
        t0 = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             env=dict(os.environ, RUST_LOG="error"))
        took = time.monotonic() - t0
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return took, out

    def snapshots(self, endpoint: str | None = None) -> list[dict]:
        path = "/v1/snapshots" + (f"?endpoint={endpoint}" if endpoint else "")
        try:
            return [s for g in self.api("GET", path) for s in g["snapshots"]]
        except urllib.error.HTTPError as e:
            if e.code == 404:  # the endpoint is not known yet (nothing of it stored)
                return []
            raise

    def wait_online(self, hosts: list[str], timeout: float = 300) -> None:
        want = set(hosts)
        deadline = time.monotonic() + timeout
        while True:
            online = {e["hostname"] for e in self.api("GET", "/v1/endpoints") if e.get("online")}
            if want <= online:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(want - online)} endpoint(s) not online after {timeout}s, "
                                   f"e.g. {sorted(want - online)[:5]}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.stop()


def agent(scratch: Path, name: str, hostname: str, prefill: int, rate: int, server: Server | None) -> Proc:
    data = scratch / name
    data.mkdir(parents=True, exist_ok=True)
    args = ["agent", "--data-dir", str(data), "--listen", "127.0.0.1:0", "--hostname", hostname,
            "--simulate", str(rate), "--prefill-events", str(prefill)]
    if server is not None:
        args += ["--server", server.url, "--enroll-token", server.enroll_token, "--heartbeat-secs", "1"]
    t0 = time.monotonic()
    proc = Proc(name, args, scratch, timeout=3600)
    size = sum(p.stat().st_size for p in data.glob("monitor.db*"))
    log(f"agent {hostname}: {prefill:,} events prefilled, monitor.db + WAL {human(size)} in {time.monotonic() - t0:.1f}s")
    proc.data_dir = data  # type: ignore[attr-defined]
    return proc


def checkpoint(db: Path) -> int:
    """Moves the prefill out of the WAL into monitor.db (as a capture's own checkpoint does), so
    `cp monitor.db` copies the same bytes a snapshot holds; returns the main file's size."""
    conn = sqlite3.connect(db, timeout=30)
    for _ in range(50):  # the recorder commits every few ms; retry until one checkpoint completes
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if not busy:
            break
        time.sleep(0.02)
    conn.close()
    if busy:
        log(f"checkpoint of {db} was busy; cp may copy less than the snapshot holds")
    return db.stat().st_size


def timed(cmd: list[str] | str, shell: bool = False) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, shell=shell, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def export(agent_dir: Path, out: Path) -> tuple[Path, float, dict]:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    res = subprocess.run([BIN, "agent", "export", "--data-dir", str(agent_dir), "--out", str(out), "--json"],
                         capture_output=True, text=True, check=True, env=dict(os.environ, RUST_LOG="error"))
    took = time.monotonic() - t0
    info = json.loads(res.stdout)
    return Path(info["path"]), took, info


class StatePoller:
    """Records when the newest snapshot of `host` first shows each state (phase timings)."""

    def __init__(self, server: Server, host: str, known_ids: set[int]):
        self.server, self.host, self.known = server, host, known_ids
        self.t0 = time.monotonic()
        self.seen: dict[str, float] = {}
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop_flag.is_set():
            try:
                for s in self.server.snapshots(self.host):
                    if s["id"] not in self.known:
                        self.seen.setdefault(s["state"], time.monotonic() - self.t0)
            except Exception:  # noqa: BLE001 - best effort
                pass
            time.sleep(0.05)

    def finish(self) -> dict[str, float]:
        self.stop_flag.set()
        self.thread.join()
        return self.seen


def phases_text(seen: dict[str, float], total: float) -> str:
    order = ["queued", "measuring", "transferring", "verifying", "complete"]
    marks = [(s, seen[s]) for s in order if s in seen]
    parts = []
    for (s, t), nxt in zip(marks, [m[1] for m in marks[1:]] + [total]):
        if s != "complete":
            parts.append(f"{s} {nxt - t:.1f}s")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# 1. capture


def bench_capture(scratch: Path) -> Proc | None:
    """Returns nothing; leaves no processes running."""
    host_small, host_big = "bench-small", "bench-big"

    # ~100 MB: server peak memory only.
    server = Server(scratch, "server-cap-small")
    a = agent(scratch, "agent-small", host_small, SMALL_EVENTS, RATE, server)
    server.wait_online([host_small])
    small_size = checkpoint(a.data_dir / "monitor.db")
    drop_caches()
    took, out = server.cli("capture", host_small, "--yes", "--wait", "--json")
    small_hwm = server.proc.vmhwm()
    snaps = json.loads(out.stdout)
    assert all(s["state"] == "complete" for s in snaps), snaps
    log(f"capture of {human(small_size)}: {took:.2f}s, server VmHWM {human(small_hwm)}")
    a.stop()
    server.stop()

    # ~750 MB: time vs cp, and peak memory.
    server = Server(scratch, "server-cap-big")
    a = agent(scratch, "agent-big", host_big, EVENTS, RATE, server)
    server.wait_online([host_big])
    db = a.data_dir / "monitor.db"
    size = checkpoint(db)
    copy = scratch / "cp-baseline.db"
    cps = []
    for _ in range(3):  # median of three cold copies: a single cold cp varies by +-50% here
        drop_caches()
        cps.append(timed(["cp", str(db), str(copy)]))
        copy.unlink()
    t_cp = statistics.median(cps)
    note(f"cp of {human(size)} ({cache_state()}), three runs: " + ", ".join(f"{t:.2f}s" for t in cps))
    drop_caches()
    t_cp_sync = timed(f"cp '{db}' '{copy}' && sync '{copy}'", shell=True)
    copy.unlink()

    drop_caches()
    poller = StatePoller(server, host_big, set())
    took, out = server.cli("capture", host_big, "--yes", "--wait", "--json")
    seen = poller.finish()
    big_hwm = server.proc.vmhwm()
    agent_hwm = a.vmhwm()
    snaps = json.loads(out.stdout)
    assert all(s["state"] == "complete" for s in snaps), snaps
    snap = snaps[0]
    server_side = (snap["completed_ms"] - snap["created_ms"]) / 1000
    log(f"capture of {human(snap['size'])}: {took:.2f}s (server created->completed {server_side:.2f}s; "
        f"{phases_text(seen, took)}); cp {t_cp:.2f}s, cp+sync {t_cp_sync:.2f}s")
    note(f"capture {human(snap['size'])}: phases seen by polling every 50 ms: {phases_text(seen, took)}; "
         f"`cp` + `sync` of the same file took {t_cp_sync:.2f}s; agent VmHWM {human(agent_hwm)}")
    ratio = took / t_cp
    row(f"capture {human(size)} db, recorder at {RATE}/s ({cache_state()})",
        f"{took:.2f} s ({size / MIB / took:.0f} MiB/s)", f"cp {t_cp:.2f} s", ratio, "<= 2.0x", ratio <= 2.0)
    row(f"server VmHWM, capture of {human(small_size)}", human(small_hwm), "", None, "< 64 MiB",
        small_hwm < 64 * MIB)
    grow = big_hwm - small_hwm
    row(f"server VmHWM, capture of {human(size)}", human(big_hwm), f"{human(small_hwm)} @ {human(small_size)}",
        big_hwm / small_hwm if small_hwm else None, "< 64 MiB, flat",
        big_hwm < 64 * MIB and grow < 16 * MIB)
    a.stop()
    server.stop()
    return None


# ---------------------------------------------------------------------------------------------
# 2. fleet of 200


def wait_snapshots(server: Server, ids: set[int], timeout: float, interval: float) -> tuple[float, dict[int, dict]]:
    """Polls until every snapshot in `ids` is complete or failed; returns (seconds, by id)."""
    t0 = time.monotonic()
    while True:
        by_id = {s["id"]: s for s in server.snapshots() if s["id"] in ids}
        if len(by_id) == len(ids) and all(s["state"] in ("complete", "failed") for s in by_id.values()):
            return time.monotonic() - t0, by_id
        if time.monotonic() - t0 > timeout:
            states: dict[str, int] = {}
            for s in by_id.values():
                states[s["state"]] = states.get(s["state"], 0) + 1
            raise RuntimeError(f"snapshots not finished after {timeout}s: {states}")
        time.sleep(interval)


def capture_api(server: Server, hosts: list[str], timeout: float, interval: float) -> tuple[float, dict[int, dict]]:
    t0 = time.monotonic()
    queued = server.api("POST", "/v1/captures", {"hosts": hosts}, timeout=300)
    ids = {q["snapshot_id"] for q in queued}
    _, by_id = wait_snapshots(server, ids, timeout, interval)
    return time.monotonic() - t0, by_id


def bench_fleet(scratch: Path) -> None:
    server = Server(scratch, "server-fleet", ["--capture-concurrency", str(CAPTURE_CONCURRENCY)])
    fdir = scratch / "fleet"
    t0 = time.monotonic()
    fleet = Proc("fleet-sim", ["fleet-sim", "--count", str(FLEET), "--server", server.url,
                               "--enroll-token", server.enroll_token, "--data-dir", str(fdir),
                               "--prefill-events", str(FLEET_EVENTS), "--events-per-sec", "10"],
                 scratch, expect=FLEET, timeout=3600, who_prefix="sim-")
    hosts = sorted(fleet.addrs)
    log(f"fleet-sim: {len(hosts)} endpoints listening after {time.monotonic() - t0:.1f}s ({hosts[0]}..{hosts[-1]})")
    server.wait_online(hosts)
    sizes = [sum(p.stat().st_size for p in (fdir / h).glob("monitor.db*")) for h in hosts]
    if sizes:
        log(f"fleet dbs (monitor.db + WAL): median {human(statistics.median(sizes))}, min {human(min(sizes))}, max {human(max(sizes))}")

    # Single-capture throughput on one of them (median of SINGLE_RUNS, polled every 10 ms).
    singles = []
    for _ in range(SINGLE_RUNS):
        took, by_id = capture_api(server, [hosts[0]], 300, 0.01)
        (s,) = by_id.values()
        assert s["state"] == "complete", s
        singles.append((took, s["size"]))
        log(f"single capture of {hosts[0]}: {human(s['size'])} in {took * 1000:.0f} ms")
    took1, size1 = sorted(singles)[len(singles) // 2]
    throughput = size1 / took1

    # All at once.
    took, by_id = capture_api(server, hosts, 3600, 0.1)
    hwm = server.proc.vmhwm()
    failed = [s for s in by_id.values() if s["state"] != "complete"]
    total = sum(s["size"] or 0 for s in by_id.values())
    expected = total / throughput
    ratio = took / expected
    durations = sorted((s["completed_ms"] - s["created_ms"]) / 1000 for s in by_id.values() if s["completed_ms"])
    note(f"fleet: {len(by_id) - len(failed)}/{len(by_id)} complete, {human(total)} in {took:.1f}s "
         f"({total / MIB / took:.0f} MiB/s, {len(by_id) / took:.1f} captures/s) with --capture-concurrency "
         f"{CAPTURE_CONCURRENCY}; single capture {human(size1)} in {took1 * 1000:.0f} ms "
         f"({throughput / MIB:.1f} MiB/s); per-capture queued->complete median "
         f"{statistics.median(durations):.2f}s max {durations[-1]:.2f}s; server VmHWM {human(hwm)}")
    for s in failed[:5]:
        note(f"fleet capture failed: {s['hostname']}: {s.get('error')}")
    snap_sizes = [s["size"] for s in by_id.values() if s["size"]]
    row(f"{len(hosts)} concurrent captures of ~{human(statistics.median(snap_sizes) if snap_sizes else 0)} "
        f"(concurrency {CAPTURE_CONCURRENCY})",
        f"{took:.1f} s, {len(by_id) - len(failed)}/{len(by_id)} ok",
        f"{expected:.1f} s = {human(total)} / {throughput / MIB:.1f} MiB/s", ratio, "<= 1.5x, all ok",
        ratio <= 1.5 and not failed)
    fleet.stop()
    server.stop()


# ---------------------------------------------------------------------------------------------
# 3. upload and 4. drop folder (share one server and one large agent)


def bench_upload_and_drop(scratch: Path, do_upload: bool, do_drop: bool) -> None:
    host = "bench-field"
    server = Server(scratch, "server-ingest")
    a = agent(scratch, "agent-field", host, EVENTS, RATE, None)
    exports = scratch / "exports"

    if do_upload:
        path, t_export, info = export(a.data_dir, exports)
        size = path.stat().st_size
        log(f"export {path.name}: {human(size)} in {t_export:.2f}s")
        x = scratch / "upload-baseline.db"
        drop_caches()
        t_base = timed(f"cp '{path}' '{x}' && sha256sum '{path}'", shell=True)
        x.unlink()
        drop_caches()
        took, out = server.cli("upload", str(path), "--connect", "--json")
        (result,) = json.loads(out.stdout)
        ingest, snap = result["ingest"], result["snapshot"]
        assert ingest["state"] == "complete" and snap["state"] == "complete", result
        assert snap["sha256"] == info["sha256"], (snap["sha256"], info["sha256"])
        ingest_s = (ingest["finished_ms"] - ingest["created_ms"]) / 1000
        note(f"upload {human(size)}: {took:.2f}s end to end; of which ingest job (created->finished) "
             f"{ingest_s:.2f}s, so streaming + spooling ~{took - ingest_s:.2f}s; server VmHWM "
             f"{human(server.proc.vmhwm())}")
        ratio = took / t_base
        row(f"upload --connect {human(size)} over loopback TLS ({cache_state()})",
            f"{took:.2f} s ({size / MIB / took:.0f} MiB/s)", f"cp+sha256sum {t_base:.2f} s", ratio,
            "<= 2.5x", ratio <= 2.5)
        path.unlink()

    if do_drop:
        if not Path("/usr/bin/sqlite3").exists() and shutil.which("sqlite3") is None:
            raise SystemExit("sqlite3 CLI missing: `apt-get install -y sqlite3` fixes it")
        watch = server.data_dir / "watch"
        stage = server.data_dir / "drop-stage"  # same filesystem as watch/, so rename is atomic
        stage.mkdir()
        path, _, info = export(a.data_dir, stage)
        size = path.stat().st_size
        drop_caches()
        t0 = time.monotonic()
        subprocess.run(["sha256sum", str(path)], check=True, stdout=subprocess.DEVNULL)
        t_sha = time.monotonic() - t0
        qc = subprocess.run(["sqlite3", str(path), "pragma quick_check"], check=True, capture_output=True, text=True)
        t_base = time.monotonic() - t0
        assert qc.stdout.strip() == "ok", qc.stdout
        # The same two reads in the order the ingest job does them (quick_check on a cold cache, then
        # the hash): information only, the target uses the order above.
        drop_caches()
        t1 = time.monotonic()
        subprocess.run(["sqlite3", str(path), "pragma quick_check"], check=True, capture_output=True)
        t_qc_cold = time.monotonic() - t1
        subprocess.run(["sha256sum", str(path)], check=True, stdout=subprocess.DEVNULL)
        t_rev = time.monotonic() - t1
        note(f"drop baseline in the ingest job's order: quick_check {t_qc_cold:.2f}s ({cache_state()}) then "
             f"sha256sum {t_rev - t_qc_cold:.2f}s = {t_rev:.2f}s")
        drop_caches()
        name = path.name
        t0 = time.monotonic()
        os.rename(path, watch / name)
        took = wait_listed_complete(server, host, name, info["sha256"]) - t0
        note(f"drop {human(size)}: listed complete {took:.2f}s after the rename; baseline sha256sum "
             f"{t_sha:.2f}s + quick_check {t_base - t_sha:.2f}s")
        row(f"drop folder {human(size)} renamed in ({cache_state()})", f"{took:.2f} s",
            f"sha256sum+quick_check {t_base:.2f} s", took / t_base, "<= baseline + 1 s", took <= t_base + 1.0)

        # The same with `cp` writing in place (issue 12): timed from the end of the copy (the writer
        # closed the file) to the snapshot listed complete.
        path, _, info = export(a.data_dir, stage)
        name = path.name
        drop_caches()
        t0 = time.monotonic()
        subprocess.run(["cp", str(path), str(watch / name)], check=True)
        copied = time.monotonic()
        took = wait_listed_complete(server, host, name, info["sha256"]) - copied
        note(f"drop by cp {human(path.stat().st_size)}: cp took {copied - t0:.2f}s, listed complete "
             f"{took:.2f}s after cp ended")
        row(f"drop folder {human(size)} by cp, from the copy's end ({cache_state()})", f"{took:.2f} s",
            f"sha256sum+quick_check {t_base:.2f} s", took / t_base, "<= baseline + 1 s", took <= t_base + 1.0)
        path.unlink()
    a.stop()

    if do_drop:
        bench_drop_many(scratch, server)
    server.stop()


def wait_listed_complete(server: Server, host: str, name: str, sha256: str) -> float:
    """Polls until snapshot `name` of `host` is listed complete with `sha256`; returns when it was."""
    deadline = time.monotonic() + 1800
    while True:
        hit = [s for s in server.snapshots(host) if s["name"] == name]
        if hit and hit[0]["state"] in ("complete", "failed"):
            at = time.monotonic()
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not listed complete after 1800s")
        time.sleep(0.05)
    assert hit[0]["state"] == "complete" and hit[0]["sha256"] == sha256, hit
    return at


def bench_drop_many(scratch: Path, server: Server) -> None:
    """DROP_FILES distinct small snapshot files renamed into watch/ at once."""
    small = agent(scratch, "agent-drop-src", "drop-src", DROP_EVENTS, 10, None)
    src, _, _ = export(small.data_dir, scratch / "drop-src-export")
    small.stop()
    stage = server.data_dir / "drop-stage-many"
    stage.mkdir()
    names = []
    t0 = time.monotonic()
    for i in range(DROP_FILES):
        name = f"drop{i:04d}_2026_01_01T00.00.00.000Z.db"
        dest = stage / name
        shutil.copyfile(src, dest)
        # Distinct content, so each is a new snapshot rather than a duplicate of the first.
        conn = sqlite3.connect(dest)
        conn.execute("INSERT INTO meta (ts, key, value) VALUES (?, 'bench_copy', ?)", (i, str(i)))
        conn.commit()
        conn.close()
        names.append(name)
    log(f"prepared {DROP_FILES} distinct {human(src.stat().st_size)} files in {time.monotonic() - t0:.1f}s")
    watch = server.data_dir / "watch"
    before = {s["id"] for s in server.snapshots()}
    want = set(names)
    t0 = time.monotonic()
    for name in names:
        os.rename(stage / name, watch / name)
    t_renamed = time.monotonic() - t0
    deadline = t0 + 1800
    first_done = None
    while True:
        new = [s for s in server.snapshots() if s["id"] not in before and s["name"] in want]
        done = [s for s in new if s["state"] in ("complete", "failed")]
        if done and first_done is None:
            first_done = time.monotonic() - t0
        if len(done) >= len(want):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(done)}/{len(want)} dropped files listed after 1800s")
        time.sleep(0.1)
    took = time.monotonic() - t0
    time.sleep(3)  # let any duplicate enqueue (a second ingest of the same file) show up
    new = [s for s in server.snapshots() if s["id"] not in before and s["name"] in want]
    complete = [s for s in new if s["state"] == "complete"]
    distinct = {s["name"] for s in complete}
    # Ingest outcomes from the catalog, read-only (the bench's own check; the product never does this).
    conn = sqlite3.connect(f"file:{server.data_dir / 'catalog.db'}?mode=ro", uri=True)
    states = dict(conn.execute(
        "SELECT state, count(*) FROM ingests WHERE original_name LIKE 'drop____\\_%' ESCAPE '\\' GROUP BY state"
    ).fetchall())
    per_name = conn.execute(
        "SELECT max(c) FROM (SELECT count(*) c FROM ingests WHERE original_name LIKE 'drop____\\_%' ESCAPE '\\' "
        "GROUP BY original_name)"
    ).fetchone()[0]
    conn.close()
    left = sorted(p.name for p in watch.iterdir())
    ok = len(complete) == len(want) and len(distinct) == len(want) and len(new) == len(want) and per_name == 1
    note(f"drop {len(want)} files: renames took {t_renamed * 1000:.0f} ms; first listed after "
         f"{first_done:.2f}s, all after {took:.2f}s; snapshots {len(complete)} complete / {len(new)} rows / "
         f"{len(distinct)} distinct names; ingests by state {states}, at most {per_name} ingest(s) per name; "
         f"{len(left)} file(s) left in watch/; server VmHWM {human(server.proc.vmhwm())}")
    row(f"drop folder: {len(want)} small files at once", f"{len(want) / took:.0f} files/s ({took:.1f} s)",
        "", None, "all ingested once", ok)


# ---------------------------------------------------------------------------------------------


def print_table() -> None:
    cols = ["name", "measured", "baseline", "ratio", "target", "result"]
    heads = ["step", "measured", "baseline (same run)", "ratio", "target", "result"]
    print()
    print("| " + " | ".join(heads) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in ROWS:
        print("| " + " | ".join(r[c] for c in cols) + " |")
    if NOTES:
        print()
        for n in NOTES:
            print(f"- {n}")


def main() -> int:
    global BIN
    if not Path(BIN).exists():
        print(f"{BIN} not found: run `cargo build --release --bin snapq` (or set SNAPQ_BIN)", file=sys.stderr)
        return 2
    if shutil.which("sqlite3") is None:
        print("sqlite3 CLI not found: `apt-get install -y sqlite3` fixes it", file=sys.stderr)
        return 2
    parent = Path(os.environ.get("SNAPQ_BENCH_TMP", "/tmp"))
    free = shutil.disk_usage(parent).free
    need = 6 * EVENTS * 190  # ~190 bytes per event on disk; agents, copies, store
    if free < need:
        print(f"{parent}: {human(free)} free, this run needs ~{human(need)}", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="snapq-e2e-", dir=parent))
    # Run a private copy: a `cargo build` in the shared target dir during the run would otherwise
    # swap the binary between steps.
    shutil.copy2(BIN, scratch / "snapq")
    BIN = str(scratch / "snapq")
    log(f"scratch {scratch}; events {EVENTS:,} (small {SMALL_EVENTS:,}), fleet {FLEET} x {FLEET_EVENTS:,}, "
        f"drop files {DROP_FILES}; nproc {os.cpu_count()}")
    status = 0
    try:
        if "capture" in ONLY:
            bench_capture(scratch)
        if "fleet" in ONLY:
            bench_fleet(scratch)
        if "upload" in ONLY or "drop" in ONLY:
            bench_upload_and_drop(scratch, "upload" in ONLY, "drop" in ONLY)
    except Exception as e:  # noqa: BLE001 - report what we have
        log(f"FAILED: {e!r}")
        status = 1
        import traceback

        traceback.print_exc()
    finally:
        for proc in PROCS:
            proc.stop()
        print_table()
        if KEEP or status:
            log(f"kept {scratch} (logs: *.stderr.log)")
            if not KEEP:
                # Keep only the logs on failure: the databases are large.
                for p in scratch.iterdir():
                    if not p.name.endswith(".log"):
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    if any(r["result"] == "FAIL" for r in ROWS):
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())

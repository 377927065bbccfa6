#!/usr/bin/env python3
"""A `cargo build` of this project with and without the Linux recorder running (issue 14).

Builds the workspace from scratch (`cargo build`, a fresh CARGO_TARGET_DIR each time) once without
an agent and once with `snapq agent` recording kernel events (processes from the process-events
connector, files from fanotify on `/`), and prints both wall times, the slowdown, and the events
per second the recorder stored during the build. Needs root (kernel events); takes two full builds.

Environment:
  SNAPQ_BIN          snapq binary running the agent [target/release/snapq beside this script]
  SNAPQ_BENCH_TMP    parent of the scratch directories [/tmp]
  SNAPQ_BENCH_ONLY   `with` or `without` to run one of the two builds only

Stdlib only (Python 3.11).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = os.environ.get("SNAPQ_BIN", str(REPO / "target" / "release" / "snapq"))
TMP = os.environ.get("SNAPQ_BENCH_TMP", "/tmp")
ONLY = os.environ.get("SNAPQ_BENCH_ONLY", "")
SLOWDOWN_TARGET = 5.0  # percent


def build(scratch: Path) -> float:
    target = scratch / "target"
    shutil.rmtree(target, ignore_errors=True)
    env = dict(os.environ, CARGO_TARGET_DIR=str(target))
    started = time.monotonic()
    subprocess.run(["cargo", "build", "-q"], cwd=REPO, env=env, check=True)
    took = time.monotonic() - started
    shutil.rmtree(target, ignore_errors=True)
    return took


def events(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("process", "file", "network")}
    finally:
        conn.close()


def with_recorder(scratch: Path) -> tuple[float, dict[str, int]]:
    data = scratch / "agent"
    log = open(scratch / "agent.log", "w")
    agent = subprocess.Popen(
        [BIN, "agent", "--data-dir", str(data), "--listen", "127.0.0.1:0", "--hostname", "build-01"],
        env=dict(os.environ, SNAPQ_AGENT_TOKEN="bench-token", RUST_LOG="info"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while "kernel events" not in (scratch / "agent.log").read_text():
            if agent.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the agent did not start recording kernel events; see {scratch / 'agent.log'}")
            time.sleep(0.1)
        before = events(data / "monitor.db")
        took = build(scratch)
        time.sleep(1)  # one batch interval and more, so the build's last events are stored
        after = events(data / "monitor.db")
        return took, {t: after[t] - before[t] for t in after}
    finally:
        agent.terminate()
        agent.wait()


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("needs root: the recorder's kernel events need CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_DAC_READ_SEARCH")
    scratch = Path(tempfile.mkdtemp(prefix="snapq-build-bench-", dir=TMP))
    try:
        print(f"# cargo build with and without the recorder ({os.cpu_count()} cores, agent {BIN})")
        print()
        plain = build(scratch) if ONLY != "with" else None
        if plain is not None:
            print(f"| build without the recorder | {plain:.1f} s |")
        if ONLY == "without":
            return
        recorded, counts = with_recorder(scratch)
        rate = sum(counts.values()) / recorded
        print(f"| build with the recorder (kernel events) | {recorded:.1f} s |")
        print(
            f"| events recorded during the build | {sum(counts.values())} ({counts['process']} process, "
            f"{counts['file']} file, {counts['network']} network): {rate:.0f}/s |"
        )
        if plain is not None:
            slower = 100.0 * (recorded - plain) / plain
            verdict = "ok" if slower <= SLOWDOWN_TARGET else "FAIL"
            print(f"| slowdown | {slower:+.1f} % | <= {SLOWDOWN_TARGET} % | {verdict} |")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

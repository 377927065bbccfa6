#!/usr/bin/env bash
# The API against its own OpenAPI document: schemathesis (from PyPI) fuzzes every documented
# route of a live `snapq serve --demo 3` (embedded SQLite, a temporary data directory, a free
# loopback port) as an operator and as the admin, and fails on any 5xx, any answer whose status,
# content type or body the document does not allow, and any documented route it did not exercise.
#
#   .ci/schemathesis.sh                 # build (debug) if needed, run, clean up
#   SCHEMATHESIS_MAX_EXAMPLES=50 ...    # more cases per route (default 25)
#   SNAPQ_BIN=target/release/snapq ...  # another build
#
# The virtualenv is kept in target/schemathesis-venv (a second run installs nothing).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION="${SCHEMATHESIS_VERSION:-4.32.5}"
MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-25}"
BIN="${SNAPQ_BIN:-target/debug/snapq}"
VENV=target/schemathesis-venv

if [ ! -x "$VENV/bin/schemathesis" ] || ! "$VENV/bin/schemathesis" --version | grep -q "$SCHEMATHESIS_VERSION"; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
[ -x "$BIN" ] || cargo build --bin snapq

work=$(mktemp -d)
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

data="$work/data"
RUST_LOG=warn "$BIN" serve --data-dir "$data" --listen 127.0.0.1:0 --demo 3 \
    >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
addr=
for _ in $(seq 1 600); do
    addr=$(sed -n 's/^snapq server listening on //p' "$work/server.out" | head -n 1)
    [ -n "$addr" ] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.err" >&2; echo "schemathesis: the server exited" >&2; exit 1; }
    sleep 0.1
done
[ -n "$addr" ] || { echo "schemathesis: the server did not start listening in 60 s" >&2; exit 1; }
url="https://$addr"
cli() { "$BIN" "$@" --server "$url" --data-dir "$data"; }

# An operator of the demo endpoints' group, with a token of its own.
cli groups add demo --label demo >/dev/null
cli users add fuzzer --role operator --group demo >/dev/null
token=$(cli tokens create --user fuzzer --name schemathesis --json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')

# Something to find: a capture of a demo endpoint, so snapshot, job and ingest routes see rows.
for _ in $(seq 1 300); do
    cli endpoints list --json | grep -q '"online": *true' && break
    sleep 0.1
done
cli capture demo-01 --yes >/dev/null 2>&1 || true

report=target/schemathesis-report
rm -rf "$report"
# One worker: CPython 3.11's parser is not thread-safe, and hypothesis parses lambdas' source
# ("AST constructor recursion depth mismatch" with two). Network-level failures are retried: the
# server may close a keep-alive connection after an early answer (a body it did not read) while
# the client sends the next request on it, which TLS reports as an EOF; a dead server still fails
# (and is checked below).
run() {
    local as=$1
    shift
    "$VENV/bin/schemathesis" run "$url/v1/openapi.json" \
        --tls-verify "$data/certs/httpPublicCert.pem" \
        --header "Authorization: Bearer $as" \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
        --phases examples,coverage,fuzzing \
        --max-examples "$MAX_EXAMPLES" \
        --seed 1 \
        --workers 1 \
        --request-timeout 30 \
        --request-retries 2 \
        --no-color \
        --report junit --report-dir "$report" \
        "$@" 2>&1 | tee -a "$work/run.log"
    return "${PIPESTATUS[0]}"
}
start=$(date +%s)
status=0
# As the operator (the issue's check), then as the admin, so the admin-only routes run past their
# 403. Last, what would cut the run short: revoking tokens (the fuzzer may hit its own). The
# document's own route runs only when named (schemathesis leaves out the schema's address).
admin=$(cat "$data/admin.token")
run "$token" --exclude-operation-id revoke_token --report-junit-path "$report/operator.xml" || status=$?
run "$admin" --exclude-operation-id revoke_token --report-junit-path "$report/admin.xml" || status=$?
run "$token" --include-operation-id revoke_token --include-operation-id serve \
    --report-junit-path "$report/operator-last.xml" || status=$?
run "$admin" --include-operation-id revoke_token --report-junit-path "$report/admin-last.xml" || status=$?
elapsed=$(( $(date +%s) - start ))

# Every documented operation must have run (schemathesis skips what it cannot generate for).
python3 - "$report" "$url" "$data/certs/httpPublicCert.pem" <<'EOF'
import glob, json, ssl, sys, urllib.request
import xml.etree.ElementTree as ET

report, url, cert = sys.argv[1:]
ctx = ssl.create_default_context(cafile=cert)
doc = json.load(urllib.request.urlopen(url + "/v1/openapi.json", context=ctx))
documented = {f"{m.upper()} {p}" for p, item in doc["paths"].items() for m in item}
ran, skipped = set(), set()
for f in glob.glob(report + "/*.xml"):
    for case in ET.parse(f).getroot().iter("testcase"):
        name = case.get("name")
        (skipped if case.find("skipped") is not None else ran).add(name)
missing = sorted(documented - ran)
print(f"schemathesis: {len(ran & documented)} of {len(documented)} documented operations exercised")
if missing:
    print("schemathesis: not exercised: " + ", ".join(missing), file=sys.stderr)
    sys.exit(1)
EOF

if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "schemathesis: the server died during the run" >&2
    cat "$work/server.err" >&2
    exit 1
fi
echo "schemathesis: finished in ${elapsed}s (max ${MAX_EXAMPLES} examples per operation)"
exit "$status"

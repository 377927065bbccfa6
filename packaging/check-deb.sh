#!/usr/bin/env bash
# Builds the Debian package with cargo-deb and checks it: the files are where the units and the
# settings expect them, and systemd-analyze accepts the units (where systemd-analyze exists).
# Needs cargo-deb (`cargo install cargo-deb`); builds the release binary.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deb --version >/dev/null 2>&1; then
    echo "skipped: cargo-deb is not installed (cargo install cargo-deb)"; exit 0
fi
deb=$(cargo deb 2>&1 | tail -1)
[ -f "$deb" ] || { echo "cargo deb made no package: $deb"; exit 1; }
root=$(mktemp -d); trap 'rm -rf "$root"' EXIT
dpkg -x "$deb" "$root"
for f in usr/bin/snapq etc/snapq/snapq.toml lib/systemd/system/snapq-server.service \
         lib/systemd/system/snapq-agent.service; do
    [ -e "$root/$f" ] || { echo "missing from the package: $f"; exit 1; }
done
"$root/usr/bin/snapq" --version
# (Not `grep -q` on the pipe: it would end dpkg-deb with SIGPIPE, which pipefail reports.)
info=$(dpkg-deb --info "$deb")
grep postinst >/dev/null <<<"$info" || { echo "no postinst in the package"; exit 1; }
if command -v systemd-analyze >/dev/null; then
    for unit in snapq-server snapq-agent; do
        sed "s#/usr/bin/snapq#$root/usr/bin/snapq#" "$root/lib/systemd/system/$unit.service" > "$root/$unit.service"
        systemd-analyze verify --man=no "$root/$unit.service"
    done
else
    echo "systemd-analyze not found: the units' syntax was not verified"
fi
echo "ok: $deb"

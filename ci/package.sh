#!/usr/bin/env bash
# The .deb: builds it with cargo-deb, installs it with dpkg, checks the unit with
# systemd-analyze, starts the installed binary on the packaged configuration (moved to a
# free port and a scratch data directory) and talks to it with libiscsi and the installed
# `ftss` CLI, then stops it with SIGTERM (exit 0) and removes the package. Needs root.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need iscsi-inq libiscsi-bin
need systemd-analyze systemd
if ! command -v cargo-deb >/dev/null 2>&1; then
  echo "installing cargo-deb"
  cargo install cargo-deb --locked -q
fi
work=$(mktemp -d)
trap 'ci_cleanup; dpkg -P ftss >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
cd "$CI_ROOT"
cargo build --release -q --bin ftss-target --bin ftss
deb=$(cargo deb -p ftss-target --no-build -o "$work" 2>&1 | tail -1)
[ -f "$deb" ] || { echo "cargo deb made no package: $deb" >&2; exit 1; }
echo "built $(basename "$deb") ($(du -k "$deb" | cut -f1) KiB)"
dpkg-deb --contents "$deb" | awk '{print "  " $6}'
dpkg -i "$deb" >/dev/null
check "dpkg lists the package as installed" bash -c "dpkg -s ftss | grep -q '^Status: install ok installed'"
check "both binaries are on PATH" bash -c "/usr/bin/ftss-target --version && /usr/bin/ftss --version"
check "the packaged config is valid" /usr/bin/ftss-target --config /etc/ftss/ftss.toml --check-config
check "the packaged config is a conffile" bash -c "dpkg-query -W -f='\${Conffiles}' ftss | grep -q /etc/ftss/ftss.toml"
check "systemd-analyze verify accepts the unit" systemd-analyze verify /lib/systemd/system/ftss-target.service
port=$(free_port)
sed -e "s|127.0.0.1:3260|127.0.0.1:$port|" -e "s|/var/lib/ftss|$work/data|" \
  /etc/ftss/ftss.toml >"$work/ftss.toml"
mkdir -p "$work/data"
RUST_LOG=info /usr/bin/ftss-target --config "$work/ftss.toml" >"$CI_OUT/package-daemon.log" 2>&1 &
pid=$!
CI_PIDS+=($pid)
wait_port "$port"
T=iqn.2026-11.org.ftss:target0
check "the installed daemon serves its LUN (iscsi-inq)" bash -c "iscsi-inq iscsi://127.0.0.1:$port/$T/0 | grep -q 'Vendor:FTSS'"
check "the installed ftss CLI registers a node" bash -c "/usr/bin/ftss --portal 127.0.0.1:$port -a 10.0.0.1 --json whoami | grep -q '\"10.0.0.1\"'"
kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
check "SIGTERM: the installed daemon exits 0" test "$rc" -eq 0
check "SIGTERM: it destaged and said so" grep -q "shut down: commands finished, write cache destaged" "$CI_OUT/package-daemon.log"
echo "package: $passes passed, $fails failed"
[ "$fails" -eq 0 ]

#!/usr/bin/env bash
# Interop with real initiators: libiscsi's iscsi-ls / iscsi-inq / iscsi-readcapacity16,
# and QEMU's iscsi driver (qemu-img convert into a LUN and back, byte-identical), plain
# and over CHAP. Prints PASS/FAIL per check; exits 1 on any FAIL.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need iscsi-ls libiscsi-bin
need_qemu
work=$(mktemp -d)
trap 'ci_cleanup; rm -rf "$work"' EXIT
ftss_build
(cd "$CI_ROOT" && cargo build --release --bin ftss -q)
port=$(free_port)
T=iqn.2026-11.org.ftss:interop
cat >"$work/ftss.toml" <<CONF
[server]
portals = ["127.0.0.1:$port"]
data_dir = "$work"
[[target]]
iqn = "$T"
[[target.lun]]
lun = 0
path = "lun0.img"
size = "128MiB"
# LUN masking: only this initiator sees LUN 1.
[[target.lun]]
lun = 1
path = "masked.img"
size = "16MiB"
initiators = ["iqn.2026-11.org.ftss:interop-mask"]
[packets]
size = "8MiB"
[[target]]
iqn = "$T-chap"
# The second name is QEMU's default initiator name (qemu-img sets no other).
initiators = ["iqn.2026-11.org.ftss:interop-chap", "iqn.2008-11.org.linux-kvm"]
[target.chap]
username = "interop"
secret = "interop-secret-1"
[[target.lun]]
lun = 0
path = "chap.img"
size = "64MiB"
# Per-initiator CHAP: every login with this name must prove the node's secret.
[[node]]
initiator = "iqn.2026-11.org.ftss:interop-node"
addresses = ["10.0.0.1"]
[node.chap]
username = "interopnode"
secret = "node-secret-123"
CONF
ftss_start "$work/ftss.toml" "$CI_OUT/interop-daemon.log" "$port"
url="iscsi://127.0.0.1:$port/$T/0"
check "iscsi-ls discovery lists the target" bash -c "iscsi-ls -s iscsi://127.0.0.1:$port | grep -q 'Target:$T Portal:127.0.0.1:$port,1'"
check "iscsi-ls lists LUN 0 with its size" bash -c "iscsi-ls -s iscsi://127.0.0.1:$port | grep -q 'Lun:0 .*Size:12[0-9]M'"
check "iscsi-inq standard page" bash -c "iscsi-inq $url | grep -q 'Vendor:FTSS'"
check "iscsi-inq unit serial VPD page" bash -c "iscsi-inq -e 1 -c 128 $url | grep -qi 'serial'"
check "iscsi-inq device identification VPD page" bash -c "iscsi-inq -e 1 -c 131 $url | grep -qi 'NAA'"
check "iscsi-readcapacity16" bash -c "iscsi-readcapacity16 $url | grep -q 'Total size:134217728'"
head -c $((64 << 20)) /dev/urandom >"$work/in.raw"
check "qemu-img convert raw -> iscsi" qemu-img convert -n -f raw -O raw "$work/in.raw" "$url"
check "qemu-img convert iscsi -> raw" qemu-img convert -f raw -O raw "$url" "$work/out-full.raw"
head -c $((64 << 20)) "$work/out-full.raw" >"$work/out.raw" 2>/dev/null || true
check "qemu-img round trip is byte-identical (64 MiB)" cmp "$work/in.raw" "$work/out.raw"
check "qemu-img compare" qemu-img compare -f raw -F raw "$work/in.raw" "$work/out.raw"
curl="iscsi://interop%interop-secret-1@127.0.0.1:$port/$T-chap/0"
CI=iqn.2026-11.org.ftss:interop-chap
check "ACL hides the CHAP target from other initiators" bash -c "! iscsi-ls iscsi://127.0.0.1:$port | grep -q $T-chap"
check "ACL shows it to its initiator" bash -c "iscsi-ls -i $CI iscsi://127.0.0.1:$port | grep -q $T-chap"
check "ACL refuses login from another initiator" bash -c "! iscsi-inq $curl"
check "CHAP login: iscsi-inq" bash -c "iscsi-inq -i $CI $curl | grep -q 'Vendor:FTSS'"
check "CHAP with a wrong secret is refused" bash -c "! iscsi-inq -i $CI iscsi://interop%wrong-secret-99@127.0.0.1:$port/$T-chap/0"
check "CHAP target refuses a login without CHAP" bash -c "! iscsi-inq -i $CI iscsi://127.0.0.1:$port/$T-chap/0"
head -c $((8 << 20)) /dev/urandom >"$work/c.raw"
curl_q=$curl
check "qemu-img over CHAP round trip" bash -c "qemu-img convert -n -f raw -O raw $work/c.raw $curl_q && qemu-img convert -f raw -O raw $curl_q $work/c-out.raw && cmp $work/c.raw <(head -c $((8 << 20)) $work/c-out.raw)"
NI=iqn.2026-11.org.ftss:interop-node
nurl="iscsi://interopnode%node-secret-123@127.0.0.1:$port"
check "per-node CHAP: iscsi-ls as the node with its secret" bash -c "iscsi-ls -s -i $NI $nurl | grep -q 'Target:$T '"
check "per-node CHAP: iscsi-inq as the node with its secret" bash -c "iscsi-inq -i $NI $nurl/$T/0 | grep -q 'Vendor:FTSS'"
check "per-node CHAP: the node's name without CHAP is refused" bash -c "! iscsi-ls -i $NI iscsi://127.0.0.1:$port"
check "per-node CHAP: the node's name with a wrong secret is refused" bash -c "! iscsi-inq -i $NI iscsi://interopnode%wrong-secret-99@127.0.0.1:$port/$T/0"
check "LUN masking: the named initiator sees LUN 1" bash -c "iscsi-ls -s -i iqn.2026-11.org.ftss:interop-mask iscsi://127.0.0.1:$port | grep -q 'Lun:1 '"
check "LUN masking: another initiator does not" bash -c "iscsi-ls -s -i iqn.2026-11.org.ftss:interop-other iscsi://127.0.0.1:$port > $work/ls.txt && grep -q 'Lun:0 ' $work/ls.txt && ! grep -q 'Lun:1 ' $work/ls.txt"
check "LUN masking: nor can it address it" bash -c "! iscsi-inq -i iqn.2026-11.org.ftss:interop-other iscsi://127.0.0.1:$port/$T/1"
# The ftss CLI against the same daemon twice: the second run's packets are new packets,
# not retries of the first run's (issue 16: "0 of N packets arrived" on a second run).
F="$CI_ROOT/target/release/ftss --portal 127.0.0.1:$port --target $T"
lat="$F -a 10.0.0.3 --initiator iqn.2026-11.org.ftss:interop-lat latency 10.0.0.4 --peer-initiator iqn.2026-11.org.ftss:interop-lat-rx --rate 500 --count 300 --size 64"
check "ftss latency: 300 of 300 packets arrive" bash -c "$lat | grep -q '^300 of 300 packets'"
check "ftss latency again on the same daemon: 300 of 300 arrive" bash -c "$lat | grep -q '^300 of 300 packets'"
# Two portals, the first one dead: the CLI's multipath transport takes the second.
dead=$(free_port)
M="$CI_ROOT/target/release/ftss --portal 127.0.0.1:$dead --portal 127.0.0.1:$port --target $T --initiator iqn.2026-11.org.ftss:interop-mp"
check "ftss --portal twice, first dead: whoami as JSON" bash -c "$M -a 10.0.0.7 --json whoami | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d == {\"state\": \"available\", \"addresses\": [\"10.0.0.7\"]}, d'"
J="$F --initiator iqn.2026-11.org.ftss:interop-json"
check "ftss --json nodes lists this node available" bash -c "$J -a 10.0.0.8 --json nodes | python3 -c 'import json,sys; d=json.load(sys.stdin); assert any(e[\"address\"] == \"10.0.0.8\" and e[\"state\"] == \"available\" for e in d[\"entries\"]), d'"
check "ftss --json stats has the queue's fields" bash -c "$J -a 10.0.0.8 --json stats | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d[\"queued_records\"] == 0 and d[\"capacity_bytes\"] > 0, d'"
check "ftss completions bash names the subcommands" bash -c "$CI_ROOT/target/release/ftss completions bash | grep -q latency"
echo "interop: $passes passed, $fails failed"
[ "$fails" -eq 0 ]

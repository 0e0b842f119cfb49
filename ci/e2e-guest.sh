#!/usr/bin/env bash
# Guest half of ci/e2e-vm.sh, run by vm-initiator's run-guest inside a QEMU guest whose
# kernel initiator (open-iscsi) is logged in to ftss-target. run-guest sets DISK
# (/dev/sdX) and SG (/dev/sgN) of LUN 0; the host's `ftss` binary is in /opt (on PATH).
#
#  1. ext4 on $DISK: 20 MiB of files with known content, fsck, read back by sha256.
#  2. docs/vendor-commands.md by hand with sg_raw: NODE REGISTER 192.0.2.7 + 2001:db8::7,
#     then SEND "ping" to 192.0.2.8 (the host node).
#  3. `ftss --device` (SG_IO): send "from-guest" to the host node, receive "from-host".
#
# Prints one PASS/FAIL line per check; exits 0 only if all pass.
set -u
failures=0
pass() { echo "PASS: $*"; }
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}
# check DESCRIPTION COMMAND...: runs the command, PASS on exit 0.
check() {
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what (exit $?)"; fi
}
step() { echo; echo "---- $*"; }

echo "guest: DISK=$DISK SG=$SG LUN=$LUN TARGET=$TARGET PORTAL=$PORTAL"
MNT=/mnt/e2e
mkdir -p "$MNT"

# ---------------------------------------------------------------------------------------
step "1. ext4 on $DISK"
FILES=20
# Each file is 1 MiB of 16-byte lines naming the file and the line, so a block read back
# from the wrong place (or a stale one) cannot match.
mkdir -p /tmp/src
for i in $(seq 1 $FILES); do
  awk -v f="$i" 'BEGIN { for (n = 0; n < 65536; n++) printf "%02d:%012d\n", f, n }' \
    >"/tmp/src/file$i"
done
(cd /tmp/src && sha256sum file* >/tmp/sums)
check "mkfs.ext4 $DISK" mkfs.ext4 -q -F "$DISK"
check "mount $DISK" mount -t ext4 "$DISK" "$MNT"
check "write $FILES MiB" cp /tmp/src/file* "$MNT"/
check "sync" sync
check "umount" umount "$MNT"
check "e2fsck -f -n: clean" e2fsck -f -n "$DISK"
# Reads after the remount must come from the target, not the page cache.
echo 3 >/proc/sys/vm/drop_caches
check "mount again" mount -t ext4 -o ro "$DISK" "$MNT"
check "sha256 of $FILES files read back" sh -c "cd $MNT && sha256sum -c /tmp/sums >/tmp/sumcheck && cat /tmp/sumcheck | tail -n 3"
umount "$MNT" 2>/dev/null

# ---------------------------------------------------------------------------------------
step "2. vendor commands by hand (docs/vendor-commands.md)"
cd /tmp
# The documents' files are built with `xxd -r -p`; busybox may lack xxd, and then the same
# hex text goes through printf instead.
unhex() {
  if command -v xxd >/dev/null 2>&1; then
    xxd -r -p
  else
    local hex
    hex=$(tr -d ' \n')
    printf "$(echo "$hex" | sed 's/../\\x&/g')"
  fi
}
if command -v xxd >/dev/null 2>&1; then
  echo "building the .bin files with xxd -r -p"
else
  echo "no xxd here: building the .bin files from the same hex with printf"
fi
# GOOD is both: sg_raw's exit status 0 and its "SCSI Status: Good" line.
sg_good() {
  local out rc
  out=$(sg_raw "$@" 2>&1)
  rc=$?
  echo "$out" | sed 's/^/    sg_raw: /'
  [ "$rc" -eq 0 ] && echo "$out" | grep -q "SCSI Status: Good"
}

unhex > register.bin <<'EOF'
46410100 00020000
00000000 00000000 0000ffff c0000207
20010db8 00000000 00000000 00000007
EOF
check "register.bin is the documented 40 bytes" test "$(wc -c <register.bin)" -eq 40
check "NODE REGISTER 192.0.2.7 2001:db8::7: GOOD" \
  sg_good -s 40 -i register.bin "$SG" C4 00 00 00 00 00 00 00 00 00 00 00 00 28 00 00

unhex > send.bin <<'EOF'
46500100 00010000
00000000 00000000 0000ffff c0000208 00000000 00000000 00000001 00000004 a7fa26e5
70696e67
EOF
check "send.bin is the documented 48 bytes" test "$(wc -c <send.bin)" -eq 48
check "SEND 'ping' to 192.0.2.8: GOOD (delivered)" \
  sg_good -s 48 -i send.bin "$SG" C0 00 00 00 00 00 00 00 00 01 00 00 00 30 00 00

# The rest of node 1's examples, unchanged from the document.
hexof() { xxd -p "$1" 2>/dev/null | tr -d '\n'; }
check "NODE SET STATE maintenance: GOOD" \
  sg_good "$SG" C4 01 01 00 00 00 00 00 00 00 00 00 00 00 00 00
check "NODE SET STATE available: GOOD" \
  sg_good "$SG" C4 01 00 00 00 00 00 00 00 00 00 00 00 00 00 00
check "NODE QUERY: GOOD" \
  sg_good -r 1032 -o query.bin "$SG" C4 02 00 00 00 00 00 00 00 00 00 00 04 08 00 00
check "NODE QUERY returns the documented 40 bytes" \
  test "$(hexof query.bin)" = "464e01000002000200000000000000000000ffffc000020720010db8000000000000000000000007"
check "NODE ROUTING TABLE: GOOD" \
  sg_good -r 4096 -o routes.bin "$SG" C4 03 00 00 00 00 00 00 00 00 00 00 10 00 00 00
unhex > send2.bin <<'EOF'
46500100 00030000
00000000 00000000 0000ffff c0000208 00000000 00000000 00000002 00000005 9a71bb4c
68656c6c 6f000000
00000000 00000000 0000ffff c6336401 00000000 00000000 00000003 00000002 f59dd9c2
68690000
00000000 00000000 00000000 00000000 00010000 00000000 00000004 00000003 9c839119
616c6c00
EOF
# CHECK CONDITION is the documented answer here, so sg_raw's exit status is not 0.
mixed() {
  local out
  out=$(sg_raw -s 132 -i send2.bin "$SG" C0 00 00 00 00 00 00 00 00 02 00 00 00 84 00 00 2>&1)
  echo "$out" | sed 's/^/    sg_raw: /'
  echo "$out" | grep -q "Recovered Error" && echo "$out" | grep -q "ASC=80, ASCQ=10"
}
check "send2.bin is the documented 132 bytes" test "$(wc -c <send2.bin)" -eq 132
check "SEND the mixed batch: Recovered Error, ASC=80, ASCQ=10" mixed
check "SEND RESULTS of batch 2: GOOD" \
  sg_good -r 1024 -o results.bin "$SG" C5 00 00 00 00 00 00 00 00 02 00 00 04 00 00 00
check "SEND RESULTS: delivered, unknown destination, delivered" \
  test "$(hexof results.bin)" = "46530100000300030000000000000002000000000000000200000000000000000000000000000003020000000000000000000000000000040000000000000000"
check "RECEIVE without waiting on node 1: GOOD" \
  sg_good -r 4096 -o notice.bin "$SG" C1 00 00 00 00 00 00 00 10 00 00 00 00 00 00 00

# ---------------------------------------------------------------------------------------
step "3. ftss --device (SG_IO)"
ftss_out() {
  local name=$1
  shift
  ftss "$@" >"/tmp/$name.out" 2>"/tmp/$name.err"
  local rc=$?
  sed 's/^/    ftss: /' "/tmp/$name.out" "/tmp/$name.err"
  return $rc
}
check "ftss --device auto inquiry finds the FTSS LUN" \
  sh -c 'ftss --device auto inquiry >/tmp/inq.out 2>&1; rc=$?; sed "s/^/    ftss: /" /tmp/inq.out; [ $rc -eq 0 ] && grep -q "vendor \"FTSS\"" /tmp/inq.out'
ftss_out whoami --device "$SG" whoami
check "whoami over SG_IO: 192.0.2.7 and 2001:db8::7, available" \
  grep -q "Available, addresses 192.0.2.7 2001:db8::7" /tmp/whoami.out
ftss_out send --device "$SG" send 192.0.2.8 from-guest
check "ftss --device $SG send 192.0.2.8 from-guest: delivered" grep -q ": delivered" /tmp/send.out
ftss_out recv --device "$SG" recv --wait 15 --count 1
check "ftss --device $SG recv: 'from-host' from 192.0.2.8" \
  grep -q 'from=192.0.2.8 .*"from-host"' /tmp/recv.out

echo
if [ "$failures" -eq 0 ]; then
  echo "GUEST: all checks passed"
  exit 0
fi
echo "GUEST: $failures checks failed"
exit 1

#!/usr/bin/env bash
# Shared helpers for the ci/ scripts: free ports, waiting for a portal, starting and
# always stopping the daemons a script starts. Everything stays on 127.0.0.1.

CI_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CI_OUT="$CI_ROOT/ci/out"
mkdir -p "$CI_OUT"
CI_PIDS=()

ci_cleanup() {
  local p
  for p in "${CI_PIDS[@]}"; do
    kill "$p" 2>/dev/null || true
  done
  sleep 0.5
  # tgtd ignores SIGTERM in the foreground; nothing we started may outlive us.
  for p in "${CI_PIDS[@]}"; do
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  CI_PIDS=()
}
trap ci_cleanup EXIT

# Prints a free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Waits up to 20 s for host:port to accept connections.
wait_port() {
  local port=$1 i
  for i in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "nothing listening on 127.0.0.1:$port" >&2
  return 1
}

# Installs Debian packages when a command is missing (CI runs as root).
# qemu packages go through need_qemu: the image may hold qemu-utils 10 from
# bookworm-backports, beside which bookworm's qemu-system-x86 does not install.
need() {
  local cmd=$1 pkg=$2
  if ! command -v "$cmd" >/dev/null 2>&1; then
    echo "installing $pkg for $cmd"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
  fi
}

# need_qemu: qemu-img with its iscsi driver and qemu-system-x86_64, the bookworm versions
# together (--allow-downgrades replaces a backports qemu-utils).
need_qemu() {
  if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || ! command -v qemu-img >/dev/null 2>&1 ||
    ! ls /usr/lib/*/qemu/block-iscsi.so >/dev/null 2>&1; then
    echo "installing qemu-utils/bookworm qemu-block-extra/bookworm qemu-system-x86"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades \
      qemu-utils/bookworm qemu-block-extra/bookworm qemu-system-x86 >/dev/null
  fi
}

ftss_build() {
  (cd "$CI_ROOT" && cargo build --release --bin ftss-target -q)
}

# ftss_start CONFIG LOG PORT: starts ftss-target and waits for its first portal.
ftss_start() {
  local config=$1 log=$2 port=$3
  RUST_LOG=${RUST_LOG:-info} "$CI_ROOT/target/release/ftss-target" --config "$config" >"$log" 2>&1 &
  CI_PIDS+=($!)
  wait_port "$port"
}

# A tgtd control-socket index (a small number, not a TCP port) unlikely to be in use.
tgt_control_index() {
  echo $((100 + RANDOM % 800))
}

# tgtd_start PORT CONTROL_INDEX LOG: a private tgtd instance on its own portal and socket.
tgtd_start() {
  local port=$1 cport=$2 log=$3
  tgtd -f -C "$cport" --iscsi "portal=127.0.0.1:$port" >"$log" 2>&1 &
  CI_PIDS+=($!)
  wait_port "$port"
}

# fsync_limit DIR: how many single 4 KiB durable writes per second a file in DIR takes
# the way the write cache commits one (pwrite into the page cache, then msync of the
# mapped range): the rate a store-then-acknowledge design gets without group commit.
fsync_limit() {
  echo "$(durable_write_rate "$1" 500 msync) per second"
}

# check NAME COMMAND...: runs COMMAND quietly and prints PASS or FAIL with the tail of its
# output; counts into $passes and $fails. Needs $work (a scratch directory).
passes=0
fails=0
check() {
  local name=$1
  shift
  if "$@" >"$work/check-out.txt" 2>&1; then
    echo "PASS  $name"
    passes=$((passes + 1))
  else
    echo "FAIL  $name"
    sed 's/^/      /' "$work/check-out.txt" | tail -5
    fails=$((fails + 1))
  fi
}

# tcp_server NS ADDR OUT: a TCP receiver in namespace NS on ADDR:5001 that writes the
# sha256 of what it got to OUT, the bytes so far to OUT.bytes and the longest pause
# between two reads ("seconds at") to OUT.gap; sets $server_pid. Returns once it listens
# (a fixed sleep was not enough on a loaded machine: connection refused, then a wait for
# the server forever).
tcp_server() {
  ip netns exec "$1" python3 -c '
import hashlib, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); open(sys.argv[2] + ".ready", "w").close()
c, _ = s.accept(); h = hashlib.sha256(); n = 0
last = None; gap = 0.0; at = 0
while True:
    b = c.recv(1 << 20)
    now = time.time()
    if not b: break
    if last is not None and now - last > gap: gap, at = now - last, last
    last = now
    h.update(b); n += len(b)
    open(sys.argv[2] + ".bytes", "w").write(str(n))
open(sys.argv[2] + ".gap", "w").write("%.3f %.3f" % (gap, at))
open(sys.argv[2], "w").write(h.hexdigest())' "$2" "$3" &
  server_pid=$!
  for _ in $(seq 1 300); do [ -e "$3.ready" ] && break; sleep 0.1; done
}

# tcp_client NS ADDR FILE: sends FILE from namespace NS to ADDR:5001; prints MB/s.
tcp_client() {
  ip netns exec "$1" python3 -c '
import socket, sys, time
d = open(sys.argv[2], "rb").read(); t = time.time()
s = socket.create_connection((sys.argv[1], 5001), timeout=120); s.sendall(d); s.shutdown(socket.SHUT_WR)
s.recv(1); print(round(len(d) / (time.time() - t) / 1e6, 1))' "$2" "$3"
}

# ftss_default_config PORT DATA_DIR [BINARY]: the embedded default configuration (a
# mirrored 1 GiB LUN behind the nonvolatile write cache, the packet queue on mirrors) of
# BINARY (default: this tree's release build) with only its portal and data directory
# moved, so benchmarks measure what `ftss-target` alone serves.
ftss_default_config() {
  "${3:-$CI_ROOT/target/release/ftss-target}" --print-default-config |
    sed -e "s|^portals = .*|portals = [\"127.0.0.1:$1\"]|" -e "s|^data_dir = .*|data_dir = \"$2\"|"
}

# ftss_default_iqn [BINARY]: the target name of the embedded default configuration.
ftss_default_iqn() {
  "${1:-$CI_ROOT/target/release/ftss-target}" --print-default-config | sed -n 's/^iqn = "\(.*\)"$/\1/p' | head -1
}

# cache_status CONFIG: the "cache ..." line of the daemon's admin status (key=value pairs).
cache_status() {
  "$CI_ROOT/target/release/ftss-target" --config "$1" admin status | grep '^cache '
}

# kv LINE KEY: the value of KEY=... in LINE, or nothing.
kv() {
  echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1
}

# wait_cache_clean CONFIG [SECONDS]: waits until destage has emptied the write cache, so a
# write test starts from the state the previous one did not leave behind.
wait_cache_clean() {
  for _ in $(seq 1 $((${2:-120} * 10))); do
    [ "$(kv "$(cache_status "$1")" dirty_bytes)" = 0 ] && return 0
    sleep 0.1
  done
  echo "write cache of $1 still dirty after ${2:-120} s" >&2
  return 1
}

# qemu_bench URL COUNT DEPTH SIZE ARGS...: seconds qemu-img bench takes for COUNT requests
# of SIZE bytes at consecutive offsets (-S SIZE), queue depth DEPTH, host cache off; empty
# when it failed (the caller prints n/a).
qemu_bench() {
  local url=$1 count=$2 depth=$3 size=$4
  shift 4
  qemu-img bench -f raw -t none -c "$count" -d "$depth" -s "$size" -S "$size" "$@" "$url" 2>&1 |
    grep -oE 'completed in [0-9.]+' | grep -oE '[0-9.]+$' || true
}

# median VALUES...: the median of numbers ("n/a" and empty values ignored); n/a if none.
median() {
  printf '%s\n' "$@" | awk '/^[0-9.]+$/' | sort -g |
    awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print "n/a"}'
}

# figure FILE KEY VALUE: records one result as KEY=VALUE in FILE (ci/out/*.figures), for
# ci/bench.sh to collect; an empty value is written as n/a.
figure() {
  echo "$2=${3:-n/a}" >>"$1"
}

# durable_write_rate DIR N HOW: 4 KiB durable overwrites per second of a pre-written
# 4 MiB file in DIR (no allocation or size change in the loop), over N writes, HOW being
#   fdatasync  pwrite, then fdatasync
#   msync      pwrite, then msync(MS_SYNC) of the page through a shared map: the write
#              cache's commit with media.cache_writes = "write"
#   dsync      pwritev2(RWF_DSYNC): one system call
#   direct     O_DIRECT|O_DSYNC from an aligned buffer: no page cache at all, the fastest
#              durable 4 KiB write this device takes, and the write cache's commit (the
#              default, media.cache_writes = "direct")
durable_write_rate() {
  python3 - "$1" "$2" "$3" <<'PY'
import mmap, os, sys, tempfile, time
d, n, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fd, p = tempfile.mkstemp(dir=d)
os.pwrite(fd, bytes(4 << 20), 0); os.fsync(fd)
b = b"x" * 4096
m = mmap.mmap(fd, 4 << 20)
if how == "direct":
    dfd = os.open(p, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    buf = mmap.mmap(-1, 4096); buf.write(b)
off = lambda i: (i % 1024) * 4096
step = {
    "fdatasync": lambda i: (os.pwrite(fd, b, off(i)), os.fdatasync(fd)),
    "msync": lambda i: (os.pwrite(fd, b, off(i)), m.flush(off(i), 4096)),
    "dsync": lambda i: os.pwritev(fd, [b], off(i), os.RWF_DSYNC),
    "direct": lambda i: os.pwritev(dfd, [buf], off(i)),
}[how]
t = time.time()
for i in range(n):
    step(i)
print(int(n / (time.time() - t)))
os.unlink(p)
PY
}

# idle_durable_write_us DIR N GAP_MS: median microseconds of one 4 KiB O_DIRECT|O_DSYNC
# overwrite (the write cache's commit) when the writes come GAP_MS apart, over N writes:
# the device's flush seen by a lone packet on a quiet machine (ping sends 5 a second), where
# back-to-back writes keep it warm.
idle_durable_write_us() {
  python3 - "$1" "$2" "$3" <<'PY'
import mmap, os, sys, tempfile, time
d, n, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) / 1000
fd, p = tempfile.mkstemp(dir=d)
os.pwrite(fd, bytes(4 << 20), 0); os.fsync(fd)
dfd = os.open(p, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
buf = mmap.mmap(-1, 4096); buf.write(b"x" * 4096)
lat = []
for i in range(n):
    time.sleep(gap)
    t = time.perf_counter()
    os.pwritev(dfd, [buf], (i % 1024) * 4096)
    lat.append((time.perf_counter() - t) * 1e6)
lat.sort()
print(int(lat[len(lat) // 2]))
os.unlink(p)
PY
}

# fdatasync_rate DIR N: `durable_write_rate DIR N fdatasync`.
fdatasync_rate() {
  durable_write_rate "$1" "$2" fdatasync
}

# seq_write_mbs DIR MIB: sequential write bandwidth in MB/s of MIB MiB in 1 MiB blocks,
# fdatasync'd before dd reports (the figure includes reaching the disk).
seq_write_mbs() {
  local f
  f=$(mktemp -p "$1")
  local t0 t1
  t0=$(date +%s.%N)
  dd if=/dev/zero of="$f" bs=1M count="$2" conv=fdatasync status=none
  t1=$(date +%s.%N)
  rm -f "$f"
  python3 -c "print(round($2 * 1048576 / ($t1 - $t0) / 1e6))"
}

#!/usr/bin/env python3
"""Host side of ci/power-cut.sh: the load that runs until the power cut, and the check
after the next boot. It only talks to the target through independent clients over the
forwarded port: qemu-io (QEMU's libiscsi initiator) for block writes, the ftss CLI for
packets. The host does not crash, so its event log is the truth about what was
acknowledged.

Event log (one line per event, appended, never rewritten; all cycles in one file):
    WI cycle slot gen      write issued       WA cycle slot gen    write acknowledged
    PI cycle id            packet SEND issued PA cycle id          packet delivered (GOOD)
    PN cycle id outcome    packet not stored  PR cycle id where    packet received
    LW cycle slot gen      check: acknowledged write lost  LP cycle id    packet lost

`load` writes 4 KiB blocks (slot = 4 KiB-aligned offset / 4096) whose every 512-byte
sector names the run, slot, generation and sector, so any block read back says which
write it came from. Each writer owns a disjoint set of slots and waits for each write's
completion before the next, so a slot's acknowledged generations increase in log order.
Generations and packet ids are unique over the whole run.

`check` drains the receiving node's queue, reads the whole LUN with qemu-img, and holds
everything logged so far to these rules:
  - every slot shows, in every sector, a generation that was issued for that slot, no
    older than its newest acknowledged one (newer: a write in flight at the cut landed);
    never-written slots read zeros;
  - every acknowledged packet was received at least once (by the live receiver before a
    cut, or by the drain); ids received more than once are counted as duplicates; an id
    never issued is an error.
It prints one summary line with counts and exits 1 if anything was lost.
"""

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

IQN = "iqn.2026-11.org.ftss:powercut"
TX = "iqn.2026-11.org.ftss:powercut-tx"
RX = "iqn.2026-11.org.ftss:powercut-rx"
TX_ADDR = "192.0.2.7"
RX_ADDR = "192.0.2.8"
BLOCK = 4096
SECTOR = 512


def sector_bytes(run, slot, gen, k):
    head = f"FTSS-POWERCUT run={run} slot={slot} gen={gen} sector={k} ".encode()
    return head + b"." * (SECTOR - 1 - len(head)) + b"\n"


def block_bytes(run, slot, gen):
    return b"".join(sector_bytes(run, slot, gen, k) for k in range(BLOCK // SECTOR))


SECTOR_RE = re.compile(rb"^FTSS-POWERCUT run=(\S+) slot=(\d+) gen=(\d+) sector=(\d+) ")


class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def add(self, *fields):
        with self.lock:
            self.f.write(" ".join(str(x) for x in fields) + "\n")
            self.f.flush()


def read_log(path):
    ev = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                p = line.split()
                if p:
                    ev.append(p)
    return ev


def ftss_cmd(a, initiator, addr):
    return [
        a.ftss,
        "--portal", f"127.0.0.1:{a.port}",
        "--target", IQN,
        "--initiator", initiator,
        "-a", addr,
        "--timeout", "20",
    ]


STOP = threading.Event()
CHILDREN = []
CHILDREN_LOCK = threading.Lock()


def spawn(argv, **kw):
    p = subprocess.Popen(argv, **kw)
    with CHILDREN_LOCK:
        CHILDREN.append(p)
    return p


def writer(a, log, w, nwriters, gens):
    """One qemu-io session; writes slots w, w + nwriters, ... one at a time."""
    rnd = random.Random(f"{a.seed}-{a.cycle}-w{w}")
    slots = list(range(w, a.slots, nwriters))
    src = f"/dev/shm/ftss-powercut-{os.getpid()}-w{w}"
    url = f"iscsi://127.0.0.1:{a.port}/{IQN}/0"
    # -t writeback: no flush after each write. The target must make every write durable
    # before its completion on its own (nonvolatile cache); in volatile mode it need not.
    p = spawn(
        ["stdbuf", "-oL", "qemu-io", "-f", "raw", "-t", "writeback", url],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1,
    )
    try:
        while not STOP.is_set():
            slot = rnd.choice(slots)
            gen = next(gens)
            with open(src, "wb") as f:
                f.write(block_bytes(a.run, slot, gen))
            log.add("WI", a.cycle, slot, gen)
            p.stdin.write(f"write -s {src} {slot * BLOCK} {BLOCK}\n")
            p.stdin.flush()
            want = f"wrote {BLOCK}/{BLOCK} bytes at offset {slot * BLOCK}"
            while True:
                line = p.stdout.readline()
                if not line:
                    return
                if want in line:
                    log.add("WA", a.cycle, slot, gen)
                    break
                if "fail" in line.lower() or "error" in line.lower():
                    log.add("WE", a.cycle, slot, gen)
                    return
    except (BrokenPipeError, OSError):
        return
    finally:
        try:
            os.unlink(src)
        except OSError:
            pass


def sender(a, log, ids):
    while not STOP.is_set():
        pid = next(ids)
        log.add("PI", a.cycle, pid)
        p = spawn(
            ftss_cmd(a, TX, TX_ADDR) + ["send", "--id", str(pid), RX_ADDR, f"powercut {a.run} packet {pid}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        out, _ = p.communicate()
        if p.returncode == 0 and f"packet {pid}: delivered" in out:
            log.add("PA", a.cycle, pid)
        else:
            log.add("PN", a.cycle, pid, (out.strip().splitlines() or ["?"])[-1].replace(" ", "_")[:80])
            time.sleep(0.2)


RECV_RE = re.compile(r"^seq=\d+ from=\S+ flags=\S+ id=(\d+) ")


def receive(a, log, where, wait):
    """Run `ftss recv` (it acknowledges what it printed) and log every packet id."""
    p = spawn(
        ftss_cmd(a, RX, RX_ADDR) + ["recv", "--wait", str(wait), "--count", "1000000000"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
    )
    n = 0
    for line in p.stdout:
        m = RECV_RE.match(line)
        if m:
            log.add("PR", a.cycle, m.group(1), where)
            n += 1
    p.wait()
    return p.returncode, n


def live_receiver(a, log):
    while not STOP.is_set():
        receive(a, log, "live", 10)
        time.sleep(0.2)


class Counter:
    """Thread-safe increasing numbers after `start`."""

    def __init__(self, start):
        self.n = start
        self.lock = threading.Lock()

    def __next__(self):
        with self.lock:
            self.n += 1
            return self.n


def load(a):
    log = Log(a.log)
    # unique over the run: generations and ids carry the cycle number
    gens = Counter(a.cycle * 10_000_000)
    ids = Counter(a.cycle * 10_000_000)

    def stop(*_):
        STOP.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # the receiving node stays logged in (available) while the live receiver restarts
    hold = spawn(ftss_cmd(a, RX, RX_ADDR) + ["hold", "100000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    threads = [threading.Thread(target=writer, args=(a, log, w, a.writers, gens), daemon=True) for w in range(a.writers)]
    threads.append(threading.Thread(target=sender, args=(a, log, ids), daemon=True))
    if a.live_receiver:
        threads.append(threading.Thread(target=live_receiver, args=(a, log), daemon=True))
    for t in threads:
        t.start()
    STOP.wait()
    # The power is already cut (or the run is over): end every client. Nothing they
    # print from now on can be an acknowledgement, since the target is gone.
    with CHILDREN_LOCK:
        for p in CHILDREN:
            if p.poll() is None:
                p.kill()
    hold.wait()
    for t in threads:
        t.join(timeout=5)
    return 0


def check(a):
    log = Log(a.log)
    a.cycle = a.last_cycle  # what the drain receives belongs to the cut being checked
    rc, drained = receive(a, log, "drain", a.drain_wait)
    if rc != 0:
        print(f"check: ftss recv (drain) failed with exit {rc}", file=sys.stderr)
        return 2
    img = f"/dev/shm/ftss-powercut-{os.getpid()}.img"
    url = f"iscsi://127.0.0.1:{a.port}/{IQN}/0"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url, img], check=True)
    with open(img, "rb") as f:
        data = f.read()
    os.unlink(img)

    ev = read_log(a.log)
    issued = {}   # slot -> set of gens
    acked = {}    # slot -> newest acknowledged gen
    acked_writes = 0
    acked_writes_cycle = 0
    p_issued, p_acked, p_recv = set(), set(), {}
    p_acked_cycle = 0
    known_lost_w, known_lost_p = set(), set()  # reported by an earlier check
    for e in ev:
        k = e[0]
        if k == "WI":
            issued.setdefault(int(e[2]), set()).add(int(e[3]))
        elif k == "WA":
            slot, gen = int(e[2]), int(e[3])
            acked[slot] = max(acked.get(slot, 0), gen)
            acked_writes += 1
            if int(e[1]) == a.last_cycle:
                acked_writes_cycle += 1
        elif k == "PI":
            p_issued.add(int(e[2]))
        elif k == "PA":
            p_acked.add(int(e[2]))
            if int(e[1]) == a.last_cycle:
                p_acked_cycle += 1
        elif k == "LW":
            known_lost_w.add((int(e[2]), int(e[3])))
        elif k == "LP":
            known_lost_p.add(int(e[2]))
        elif k == "PR":
            i = int(e[2])
            p_recv[i] = p_recv.get(i, 0) + 1

    lost_writes, garbage, newer, torn = [], [], 0, 0
    for slot in range(a.slots):
        blk = data[slot * BLOCK:(slot + 1) * BLOCK]
        want = acked.get(slot, 0)
        gens = set()
        for k in range(BLOCK // SECTOR):
            s = blk[k * SECTOR:(k + 1) * SECTOR]
            if s == b"\0" * SECTOR:
                g = 0
            else:
                m = SECTOR_RE.match(s)
                if not m or m.group(1).decode() != a.run or int(m.group(2)) != slot or int(m.group(4)) != k \
                        or s != sector_bytes(a.run, slot, int(m.group(3)), k):
                    garbage.append((slot, k))
                    continue
                g = int(m.group(3))
                if g not in issued.get(slot, set()):
                    garbage.append((slot, k))
                    continue
            gens.add(g)
            if g < want:
                lost_writes.append((slot, k, want, g))
        if len(gens) > 1:
            torn += 1
        if gens and min(gens) > want:
            newer += 1
    lost_slots = sorted({x[0] for x in lost_writes})
    lost_packets = sorted(p_acked - set(p_recv))
    # a loss stays visible until the slot is written again: count each one once
    new_lost_w = sorted({(x[0], x[2]) for x in lost_writes} - known_lost_w)
    new_lost_p = [i for i in lost_packets if i not in known_lost_p]
    for slot, want in new_lost_w:
        log.add("LW", a.last_cycle, slot, want)
    for i in new_lost_p:
        log.add("LP", a.last_cycle, i)
    phantom = sorted(set(p_recv) - p_issued)
    dups = sum(n - 1 for n in p_recv.values() if n > 1)
    landed = len([i for i in p_recv if i not in p_acked and i in p_issued])
    res = {
        "acked_writes_total": acked_writes,
        "acked_writes_cycle": acked_writes_cycle,
        "slots_checked": len(acked),
        "lost_writes": len(new_lost_w),
        "lost_slots_now": len(lost_slots),
        "garbage_sectors": len(garbage),
        "inflight_landed_slots": newer,
        "mixed_slots": torn,
        "acked_packets_total": len(p_acked),
        "acked_packets_cycle": p_acked_cycle,
        "drained": drained,
        "lost_packets": len(new_lost_p),
        "lost_packets_now": len(lost_packets),
        "dup_packets": dups,
        "unacked_received": landed,
        "phantom_packets": len(phantom),
    }
    print("CHECK " + " ".join(f"{k}={v}" for k, v in res.items()))
    shown = set()
    for slot, k, want, g in lost_writes:
        if slot not in shown and len(shown) < 20:
            shown.add(slot)
            n = sum(1 for x in lost_writes if x[0] == slot)
            print(f"  LOST write: slot {slot}: newest acknowledged gen {want}, read gen {g} ({n} of 8 sectors)")
    for slot, k in garbage[:20]:
        print(f"  GARBAGE: slot {slot} sector {k}")
    for i in lost_packets[:20]:
        print(f"  LOST packet: id {i}")
    for i in phantom[:20]:
        print(f"  PHANTOM packet: id {i} was never sent")
    return 1 if (lost_slots or garbage or lost_packets or phantom) else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["load", "check"])
    ap.add_argument("--log", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--run", required=True, help="run id written into every block")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cycle", type=int, default=0)
    ap.add_argument("--last-cycle", type=int, default=0)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--slots", type=int, default=4096, help="4 KiB slots used (LUN is 16 MiB = 4096)")
    ap.add_argument("--live-receiver", action="store_true",
                    help="receive (and acknowledge) packets during the load too")
    ap.add_argument("--drain-wait", type=int, default=3)
    ap.add_argument("--ftss", default="ftss")
    a = ap.parse_args()
    sys.exit(load(a) if a.mode == "load" else check(a))


if __name__ == "__main__":
    main()

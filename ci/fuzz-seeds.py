#!/usr/bin/env python3
"""Writes seed corpora for the fuzz targets (fuzz/fuzz_targets) from the conformance
vectors in testdata/, in each target's input format, into fuzz/corpus/<target>/."""
import hashlib
import os
import struct
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus")


def unhex(s):
    s = "".join(c for c in s if c in "0123456789abcdefABCDEF")
    return bytes.fromhex(s)


def put(target, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def load(name):
    with open(os.path.join(ROOT, "testdata", name, "vectors.toml"), "rb") as f:
        return tomllib.load(f)


def text(pairs):
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def login_pdu(transit, csg, nsg, data, isid=b"\x80\x00\x00\x00\x00\x01", itt=1, cmd_sn=1):
    flags = (0x80 if transit else 0) | (csg << 2) | nsg
    dsl = len(data)
    bhs = bytes([0x43, flags, 0, 0, 0]) + dsl.to_bytes(3, "big") + isid + b"\x00\x00"
    bhs += struct.pack(">IHHII", itt, 1, 0, cmd_sn, 0) + b"\x00" * 16
    assert len(bhs) == 48
    return bhs + data + b"\x00" * ((4 - dsl % 4) % 4)


def main():
    pdus = load("pdu")
    for v in pdus["vector"]:
        frame = unhex(v["hex"])
        flags = (1 if v.get("header_digest") else 0) | (2 if v.get("data_digest") else 0)
        put("pdu", bytes([flags]) + frame)
        if frame and frame[0] & 0x3F == 0x03:
            put("login", b"\x00" + frame)
    init = "iqn.2026-11.org.ftss:allowed"
    tgt = "iqn.2026-11.org.ftss:target0"
    normal = [("InitiatorName", init), ("TargetName", tgt), ("SessionType", "Normal")]
    ops = [("HeaderDigest", "None"), ("DataDigest", "None"), ("MaxRecvDataSegmentLength", "262144"),
           ("MaxBurstLength", "1048576"), ("FirstBurstLength", "262144"), ("InitialR2T", "No"),
           ("ImmediateData", "Yes"), ("ErrorRecoveryLevel", "0")]
    for flags in (0, 1, 2, 3):
        # Straight to the operational stage, then the full feature phase.
        put("login", bytes([flags]) + login_pdu(True, 1, 3, text(normal + ops)))
        # Security stage with CHAP offered, then operational.
        sec = login_pdu(True, 0, 1, text(normal + [("AuthMethod", "CHAP,None")]))
        chap = login_pdu(False, 0, 1, text([("CHAP_A", "5")]), cmd_sn=1)
        resp = login_pdu(True, 0, 1, text([("CHAP_N", "user"), ("CHAP_R", "0x" + "00" * 16)]))
        op = login_pdu(True, 1, 3, text(ops))
        put("login", bytes([flags]) + sec + chap + resp + op)
        put("login", bytes([flags]) + login_pdu(True, 1, 3, text(
            [("InitiatorName", init), ("SessionType", "Discovery")] + ops[:3])))
    for pairs in (normal + ops, [("SendTargets", "All")], [("X-com.example", "1"), ("CHAP_C", "0x00ff")]):
        data = text(pairs)
        put("text", data)
        for role in (0, 1, 2, 3):
            put("negotiate", bytes([role]) + struct.pack(">H", len(data)) + data)
    put("negotiate_pair", bytes(64))
    put("negotiate_pair", bytes(range(64)))
    for v in load("chap")["vector"]:
        keys = text([("CHAP_A", str(v["algorithm"]))])
        resp = text([("CHAP_N", "user"), ("CHAP_R", v["response"])])
        ch = text([("CHAP_A", str(v["algorithm"])), ("CHAP_I", str(v["id"])), ("CHAP_C", v["challenge"])])
        seed = b""
        for part in (keys, resp, ch, resp):
            seed += struct.pack(">H", len(part)) + part
        for flags in (0, 1, 3, 7):
            put("chap", bytes([flags]) + seed)
    scsi = load("scsi")
    program = b""
    for v in scsi["vector"]:
        cdb = unhex(v["cdb"])
        put("cdb", cdb)
        data = unhex(v.get("data_out", ""))[:8191]
        if len(cdb) in (6, 10, 12, 16):
            sel = {6: 0, 10: 1, 12: 2, 16: 3}[len(cdb)]
            step = bytes([0, sel]) + cdb + struct.pack(">H", len(data)) + data
            if not data:
                step += struct.pack(">H", 4096)
            put("scsi", step)
            if len(program) < 4000:
                program += step
    put("scsi", program)
    vend = load("vendor")
    lists = {0xC0: 0, 0xC1: 1, 0xC3: 1, 0xC2: 2}
    for v in vend.get("vector", []):
        cdb = unhex(v["cdb"])
        put("cdb", cdb)
        do = unhex(v.get("data_out", ""))
        di = unhex(v.get("data_in", ""))
        op = cdb[0] if cdb else 0
        if do:
            which = lists.get(op, 3)
            put("vendor_lists", bytes([which]) + do)
        if di:
            which = {0xC1: 1, 0xC3: 1}.get(op)
            if which is None and op == 0xC4:
                which = 4 if (cdb[1] & 0x1F) == 2 else 5
            put("vendor_lists", bytes([which if which is not None else 1]) + di)
        step = bytes([1, 3]) + cdb[:16].ljust(16, b"\0") + struct.pack(">H", len(do[:8191])) + do[:8191]
        if not do:
            step += struct.pack(">H", 65535)
        put("scsi", step)
    for line in ("status", "json status", "sessions", "json sessions", "queues", "json queues",
                 "luns", "json luns", "nodes", "json nodes", "config effective",
                 "json config effective", "scrub iqn.2026-11.org.ftss:fuzz/0",
                 "rebuild iqn.2026-11.org.ftss:fuzz/0 1", "nodes retire iqn.x",
                 "luns add iqn.2026-11.org.ftss:target0 5 1048576",
                 "luns resize iqn.2026-11.org.ftss:target0 5 2097152",
                 "luns remove iqn.2026-11.org.ftss:target0 5"):
        put("admin", line.encode())
    for path in ("contrib/ftss.toml",):
        with open(os.path.join(ROOT, path), "rb") as f:
            put("config", f.read())
    src = open(os.path.join(ROOT, "target-daemon/src/config.rs")).read()
    start = src.index('pub const DEFAULT_CONFIG: &str = r#"') + len('pub const DEFAULT_CONFIG: &str = r#"')
    put("config", src[start:src.index('"#;', start)].encode())
    for t in ("recovery_cache", "recovery_mirror", "recovery_packet_log"):
        put(t, b"\x00\x00\x00\x00\x10\x04\xff\xff\xff\xff")
        put(t, b"\x01\x80\x00\x10\x00\x08" + bytes(8))
    print("seeded:", ", ".join(f"{d} {len(os.listdir(os.path.join(OUT, d)))}" for d in sorted(os.listdir(OUT))))


main()

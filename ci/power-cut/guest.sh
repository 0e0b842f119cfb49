#!/bin/bash
# Runs inside the run-guest VM (ci/power-cut.sh): ftss-target on an ext4 file system on
# the virtio disk /dev/vda, listening on the guest's slirp address for the host's port
# forward. Never returns: the host ends the guest with SIGKILL to QEMU (the power cut).
# $1: the write cache mode, nonvolatile (the real test) or volatile (the negative control).
set -u
MODE=${1:-nonvolatile}
DEV=/dev/vda
MNT=/mnt/ftss
if ! blkid "$DEV" >/dev/null 2>&1; then
  echo "POWERCUT: first boot: mkfs.ext4 $DEV"
  mkfs.ext4 -q -F "$DEV" || exit 2
fi
mkdir -p "$MNT"
# Default mount options: ext4 journals metadata with data=ordered (what a real server
# runs); mounting replays the journal after the cut.
mount -t ext4 "$DEV" "$MNT" || exit 3
echo "POWERCUT: mounted: $(grep " $MNT " /proc/mounts)"
mkdir -p "$MNT/data"
cat >/tmp/ftss.toml <<CONF
[server]
portals = ["10.0.2.15:3260"]
data_dir = "$MNT/data"
shutdown_timeout_s = 5

[media]
cache_size = "16MiB"
cache = "$MODE"

[[target]]
iqn = "iqn.2026-11.org.ftss:powercut"

[[target.lun]]
lun = 0
mirrors = ["lun0-a.mirror", "lun0-b.mirror"]
size = "16MiB"
block_size = 512

[packets]
mirrors = ["packets-a.mirror", "packets-b.mirror"]
size = "16MiB"

[[node]]
initiator = "iqn.2026-11.org.ftss:powercut-tx"
addresses = ["192.0.2.7"]

[[node]]
initiator = "iqn.2026-11.org.ftss:powercut-rx"
addresses = ["192.0.2.8"]
CONF
echo "POWERCUT: starting ftss-target (cache $MODE)"
ftss-target --config /tmp/ftss.toml
echo "POWERCUT: ftss-target exited $?"
exit 4

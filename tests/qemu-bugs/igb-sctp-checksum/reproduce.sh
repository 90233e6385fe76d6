#!/bin/sh
# Reproduces QEMU 10.0.2's igb crash (SIGSEGV in net_rx_pkt_validate_l4_csum): boots the iperf
# app with the given NIC paths on a tap in a network namespace of its own, sends frames.hex at
# it from a raw socket, and reports whether QEMU survived. Run as root from anywhere:
#
#   tests/qemu-bugs/igb-sctp-checksum/reproduce.sh [vf|both|virtio] [repeat] [extra cmdline]
#
# e.g. `reproduce.sh vf 1` dies at once on QEMU 10.0.2; `reproduce.sh vf 100 igb.rx_checksum=0`
# (the lab PF leaves receive checksum offload off) survives.
#
# Exit status: 0 QEMU survived, 1 QEMU died (the bug), 2 set-up failed.
set -u
paths=${1:-vf}
repeat=${2:-200}
extra=${3:-}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
ns="tandem-igb-sctp-$$"
log=$(mktemp)
qemu_pid=""

cleanup() {
    [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null
    ip netns del "$ns" 2>/dev/null
    rm -f "$log"
}
trap cleanup EXIT INT TERM

set -e
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add br0 type bridge
ip -n "$ns" tuntap add tap0 mode tap
ip -n "$ns" link set tap0 master br0
ip -n "$ns" link set tap0 up
ip -n "$ns" link set br0 up
(cd "$root" && cargo xtask build iperf >/dev/null)
set +e

# The guest's lab PF enables the igb's receive checksum offload (RXCSUM IPOFLD|TUOFLD|CRCOFL),
# as a Linux igb PF does; the crash needs L4 offload on.
ip netns exec "$ns" sh -c "cd '$root' && exec cargo xtask run iperf --paths $paths --net tap=tap0 --accel tcg --cmdline 'ip=10.78.0.2/24 gw=10.78.0.1 $extra'" >"$log" 2>&1 &
qemu_pid=$!
for _ in $(seq 1 120); do
    grep -q "server listening" "$log" && break
    kill -0 "$qemu_pid" 2>/dev/null || break
    sleep 1
done
if ! grep -q "server listening" "$log"; then
    echo "reproduce: the guest did not come up:"; tail -20 "$log"; exit 2
fi
ip netns exec "$ns" python3 "$here/send_frames.py" br0 "$here/frames.hex" "$repeat"
sleep 3
if kill -0 "$qemu_pid" 2>/dev/null; then
    echo "reproduce: QEMU survived ($paths)"
    exit 0
fi
wait "$qemu_pid"
status=$?
echo "reproduce: QEMU DIED ($paths, cargo xtask run exit $status; 128+11 = SIGSEGV):"
grep "xtask: QEMU" "$log" | tail -2
exit 1

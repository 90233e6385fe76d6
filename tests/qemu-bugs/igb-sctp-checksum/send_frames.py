#!/usr/bin/env python3
"""Sends the Ethernet frames of a hex file (one frame per line, '#' comments) out of an
interface through a raw AF_PACKET socket: send_frames.py <ifname> <frames.hex> [repeat]."""
import socket
import sys

ifname, path = sys.argv[1], sys.argv[2]
repeat = int(sys.argv[3]) if len(sys.argv) > 3 else 1
frames = []
with open(path) as file:
    for line in file:
        line = line.split("#", 1)[0].strip()
        if line:
            frames.append(bytes.fromhex(line))
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind((ifname, 0))
for _ in range(repeat):
    for frame in frames:
        sock.send(frame)
print(f"sent {len(frames)} frame(s) x {repeat} on {ifname}")

"""Writes examples/phantom.png: a synthetic grey CT-like slice (body ellipse, two organs, a
bright lesion) with a little deterministic noise. Pure standard library (zlib PNG writer), so
it runs anywhere; the PNG is committed and this script documents where it came from."""
import math
import random
import struct
import zlib

W, H = 192, 160
random.seed(7)
rows = []
for y in range(H):
    row = bytearray()
    for x in range(W):
        v = 10.0
        if ((x - 96) / 86) ** 2 + ((y - 80) / 66) ** 2 < 1:
            v = 90.0  # body
        if ((x - 60) / 26) ** 2 + ((y - 78) / 32) ** 2 < 1:
            v = 140.0  # organ A
        if ((x - 132) / 30) ** 2 + ((y - 86) / 24) ** 2 < 1:
            v = 120.0  # organ B
        if (x - 128) ** 2 + (y - 80) ** 2 < 9 ** 2:
            v = 220.0  # lesion
        v += random.gauss(0, 6) + 8 * math.sin(x / 9.0) * math.cos(y / 11.0)
        row.append(max(0, min(255, int(v))))
    rows.append(b"\x00" + bytes(row))


def chunk(kind, data):
    c = struct.pack(">I", len(data)) + kind + data
    return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 0, 0, 0, 0))
png += chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b"")
open("examples/phantom.png", "wb").write(png)
print("wrote examples/phantom.png", W, "x", H)

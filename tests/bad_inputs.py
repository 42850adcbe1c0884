#!/usr/bin/env python3
"""Makes the damaged inputs the CLI tests feed the example programs (standard library only).

  bad_inputs.py nan-checkpoint IN OUT   copy a safetensors file with one value of its first
                                        F32 tensor (by name) set to NaN
  bad_inputs.py idx-images OUT N H W    an uncompressed IDX image file of N HxW images
"""
import json
import math
import struct
import sys


def nan_checkpoint(src, dst):
    data = bytearray(open(src, "rb").read())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = sorted(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")[0]
    begin = 8 + n + header[name]["data_offsets"][0]
    data[begin:begin + 4] = struct.pack("<f", math.nan)
    open(dst, "wb").write(data)
    print(name)


def idx_images(dst, n, h, w):
    with open(dst, "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 0x08, 3, n, h, w))
        f.write(bytes((i * 7) % 256 for i in range(n * h * w)))


if __name__ == "__main__":
    if sys.argv[1] == "nan-checkpoint":
        nan_checkpoint(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "idx-images":
        idx_images(sys.argv[2], *map(int, sys.argv[3:6]))
    else:
        sys.exit("unknown command " + sys.argv[1])

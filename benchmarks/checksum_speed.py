"""Speed of the cache checksum (xxh3-128, `iisan.encoders.cache.file_checksum`) against sha256 and crc32.

Writes a file of --gib GiB (random float16 rows, like a cache) and hashes it twice with each
algorithm; the second pass reads from the page cache, which is where a freshly built or
freshly loaded cache sits. Prints GiB/s and the time a 26 GB cache (Llama-3-70B, 81 x 8192
states of 20,825 items in fp16) would take at that rate.

    python benchmarks/checksum_speed.py --gib 2
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from iisan.encoders.cache_files import file_checksum, file_chunks

CACHE_70B = 20826 * 81 * 8192 * 2  # bytes


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    for block in file_chunks(path):
        h.update(block)
    return h.hexdigest()


def crc32(path: Path) -> str:
    crc = 0
    for block in file_chunks(path):
        crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--dir", default=None, help="where to write the test file (default: a temporary folder)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        path = Path(tmp) / "cache.npy"
        rows = int(a.gib * 2**30 / (8192 * 2))
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, 8192))
        rng = np.random.default_rng(0)
        for s in range(0, rows, 4096):
            arr[s : s + 4096] = rng.standard_normal((min(4096, rows - s), 8192), dtype=np.float32)
        arr.flush()
        del arr
        size = path.stat().st_size
        print(f"file: {size / 2**30:.2f} GiB")
        print("| algorithm | pass | GiB/s | 26 GB cache (s) |")
        print("|---|---|---|---|")
        for name, fn in (("xxh3_128 (ours)", file_checksum), ("sha256", sha256), ("crc32 (zlib)", crc32)):
            for run in (1, 2):
                t0 = time.perf_counter()
                fn(path)
                dt = time.perf_counter() - t0
                rate = size / dt / 2**30
                print(f"| {name} | {run} | {rate:.2f} | {CACHE_70B / 2**30 / rate:.1f} |")


if __name__ == "__main__":
    main()

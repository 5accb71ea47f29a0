"""What the checksum of a written model directory costs (runtime/checksums.py): recording it when the directory
is finished and verifying it when a reader opens it, in seconds per GB, beside reading the same bytes.

    python benchmarks/checksums.py              # 2 GiB of weights in 2 files, 3 repeats
    python benchmarks/checksums.py --gib 8

The files come from the page cache (they were just written), as they do when a model that was just written or
read is loaded; "read" is a plain sequential read of the same bytes, the floor any check must pay.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from llmneo.runtime import checksums


def seconds(action, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        checksums._verified.clear()  # each verification hashes again
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best


def read_all(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb", buffering=0) as handle:
            while handle.read(16 * 2**20):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        size = int(args.gib * 2**30 / 2)
        for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
            with open(directory / name, "wb") as handle:
                for _ in range(0, size, 64 * 2**20):
                    handle.write(os.urandom(64 * 2**20))
        gigabytes = sum(path.stat().st_size for path in directory.iterdir()) / 1e9
        rows = [("read the bytes", seconds(lambda: read_all(directory), args.repeats)),
                ("record checksums", seconds(lambda: checksums.record_checksums(directory), args.repeats)),
                ("verify checksums", seconds(lambda: checksums.verify_checksums(directory, "model"), args.repeats))]
        print(f"{gigabytes:.2f} GB in 2 files, {os.cpu_count()} cores, best of {args.repeats}")
        print(f"{'':18} {'s':>7} {'s per GB':>9} {'GB/s':>6}")
        for name, taken in rows:
            print(f"{name:18} {taken:7.2f} {taken / gigabytes:9.3f} {gigabytes / taken:6.2f}")


if __name__ == "__main__":
    main()

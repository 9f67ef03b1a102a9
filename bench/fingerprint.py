"""What the image-content fingerprint (``pipeline.store.io.files_fingerprint``) costs on a folder of images.

    python bench/fingerprint.py ../shared/data/mnist-writers/images

prints the first run (every image read and hashed) and a later run (a ``stat`` per image, hashes from the
cache), each against reading the file list alone, measured in the same run.
"""
from __future__ import annotations

import glob
import os
import sys
import tempfile
import time

from pipeline.store.io import files_fingerprint


def main(folder: str) -> None:
    t = time.perf_counter()
    paths = sorted(glob.glob(os.path.join(folder, "**", "*.*"), recursive=True))
    listing = time.perf_counter() - t
    cache = os.path.join(tempfile.mkdtemp(), "image-hashes.json")
    t = time.perf_counter()
    first = files_fingerprint(paths, cache)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    again = files_fingerprint(paths, cache)
    t_again = time.perf_counter() - t
    assert first == again
    mb = sum(os.path.getsize(p) for p in paths) / 2**20
    print(f"{len(paths)} images, {mb:.0f} MiB; listing them: {listing:.2f}s")
    print(f"first run (read + hash): {t_first:.2f}s ({t_first / max(listing, 1e-9):.1f}x the listing)")
    print(f"later run (stat + cache): {t_again:.2f}s ({t_again / max(listing, 1e-9):.1f}x the listing)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mnist-writers/images")

"""A model's fingerprint: which weights the statistics were computed from.

Two fine-tunes of one base have the same tensor names, shapes and offsets, so a header hash
cannot tell them apart; the fingerprint also hashes the weight bytes. For every weight file (in
name order) it hashes the file name, its size, its safetensors header hash and its data: all of
it for files up to :data:`FULL_HASH_BYTES`, else :data:`SAMPLES` blocks of :data:`SAMPLE_BYTES`
at evenly spaced offsets (a few MB read per file: any fine-tune that changes the weights
changes the sampled bytes). The fingerprint is recomputed for each model before a merge and
compared with the one in its statistics' manifest.
"""

from __future__ import annotations

import hashlib
import os

FINGERPRINT_VERSION = "m3k-fp1"
FULL_HASH_BYTES = 64 << 20
SAMPLES = 256
SAMPLE_BYTES = 16 << 10


def _hash_file(h, path: str, size: int) -> None:
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return
        step = (size - SAMPLE_BYTES) / (SAMPLES - 1)
        for i in range(SAMPLES):
            f.seek(int(i * step))
            h.update(f.read(SAMPLE_BYTES))


def model_fingerprint(path, *, allow_bin: bool = False, follow_symlinks: bool = False) -> str:
    """The fingerprint of the checkpoint folder (or file) ``path``: ``m3k-fp1:<sha256 hex>``."""
    from m3kernels.checkpoint.source import Checkpoint

    ck = Checkpoint(path, role="model", allow_bin=allow_bin, follow_symlinks=follow_symlinks)
    try:
        h = hashlib.sha256(FINGERPRINT_VERSION.encode())
        headers = {os.path.basename(d["name"]): d.get("header_sha256") for d in ck.files()}
        files = sorted((os.path.basename(str(f.path)), f.real) for f in ck.input_files())
        for name, real in files:
            size = os.stat(real).st_size
            h.update(f"\0{name}\0{size}\0{headers.get(name)}\0".encode())
            _hash_file(h, real, size)
        return f"{FINGERPRINT_VERSION}:{h.hexdigest()}"
    finally:
        ck.close()


__all__ = ["model_fingerprint", "FINGERPRINT_VERSION"]

"""Ship a checkpoint's weights to another machine as bf16, compressed, in bounded parts.

    python scripts/weight_parts.py split CKPT_DIR OUT_DIR [--part-bytes 16000000]
    python scripts/weight_parts.py join PARTS_DIR OUT_DIR

``split`` casts CKPT_DIR/model.safetensors to bf16 (its metadata kept, ``config.json``
added as metadata "config") and compresses that file losslessly. A bf16 value's high byte
(sign and 7 exponent bits) carries ~2.7 bits of information and its low byte (the last
exponent bit and the mantissa) ~8, so the stream is two xz streams: the safetensors header
and every value's high byte, then every low byte at lzma's fastest preset (it cannot
shrink them). The stream is cut into ``weights.part-000``, ``-001``, ... and described by
``manifest.json`` (size and sha256 of every part and of the bf16 file).

``join`` checks every part against the manifest, decompresses, interleaves the bytes back
into the bf16 file (checked against its sha256) and writes OUT_DIR/model.safetensors and
OUT_DIR/config.json: a checkpoint directory for ``route-cli compressor train --init-from``
and ``cir.checkpoint.load_checkpoint``. Both print one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from cir.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, weights_metadata

MANIFEST = "manifest.json"
# On the 87M `paper` compressor (one Xeon core) these take the high bytes to 35% of their
# size at ~10 MB/s; preset 6's deep match finder gets 36% at 1 MB/s (no long repeats to find).
HIGH_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "mf": lzma.MF_HC3, "depth": 2,
                 "nice_len": 8}]
LOW_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 0}]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bf16_safetensors(ckpt_dir: Path) -> bytes:
    """The checkpoint's weights as a bf16 safetensors file, config.json in its metadata."""
    weights = ckpt_dir / WEIGHTS_FILE
    metadata = {**weights_metadata(weights), "config": (ckpt_dir / CONFIG_FILE).read_text()}
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
               for k, v in load_file(weights).items()}
    return save(tensors, metadata=metadata)


def _header_size(blob: bytes) -> int:
    return 8 + int.from_bytes(blob[:8], "little")  # u64 length, then the JSON header


def compress(blob: bytes) -> bytes:
    n = _header_size(blob)
    pad = b"\0" * ((len(blob) - n) % 2)  # an odd-sized bool/int8 tensor: one byte, dropped by join
    values = np.frombuffer(blob[n:] + pad, np.uint8).reshape(-1, 2)  # [N, 2], little-endian
    return (lzma.compress(blob[:n] + values[:, 1].tobytes(), filters=HIGH_FILTERS)
            + lzma.compress(values[:, 0].tobytes(), filters=LOW_FILTERS))


def decompress(stream: bytes) -> bytes:
    raw = lzma.decompress(stream)  # both xz streams: header, high bytes, low bytes
    n = _header_size(raw)
    high, low = np.frombuffer(raw, np.uint8, offset=n).reshape(2, -1)  # [2, N]
    tensors = {k: v for k, v in json.loads(raw[8:n]).items() if k != "__metadata__"}
    end = max((t["data_offsets"][1] for t in tensors.values()), default=0)  # without the pad
    return (raw[:n] + np.stack([low, high], axis=1).tobytes())[: n + end]  # [N, 2], little-endian


def split(ckpt_dir: Path, out_dir: Path, part_bytes: int) -> dict[str, Any]:
    if part_bytes <= 0:
        raise CheckpointError(f"--part-bytes must be > 0, got {part_bytes}")
    blob = bf16_safetensors(ckpt_dir)
    stream = compress(blob)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, start in enumerate(range(0, len(stream), part_bytes)):
        chunk = stream[start : start + part_bytes]
        name = f"weights.part-{i:03d}"
        (out_dir / name).write_bytes(chunk)
        parts.append({"name": name, "bytes": len(chunk), "sha256": _sha256(chunk)})
    sizes = {"source_bytes": (ckpt_dir / WEIGHTS_FILE).stat().st_size,
             "bf16_bytes": len(blob), "compressed_bytes": len(stream)}
    manifest = {"layout": "xz(header + high bytes) + xz(low bytes) of a bf16 safetensors file",
                "parts": parts, "bf16_sha256": _sha256(blob), **sizes}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {"command": "split", "parts": len(parts), **sizes,
            "ratio_to_bf16": round(len(stream) / len(blob), 4)}


def read_parts(parts_dir: Path) -> tuple[dict[str, Any], bytes]:
    """The manifest and the compressed stream, every part checked."""
    if not (parts_dir / MANIFEST).is_file():
        raise CheckpointError(f"{parts_dir}: no {MANIFEST}")
    try:
        manifest = json.loads((parts_dir / MANIFEST).read_text())
        parts = [(p["name"], p["bytes"], p["sha256"]) for p in manifest["parts"]]
        manifest["bf16_sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{parts_dir / MANIFEST}: not a weight-parts manifest ({exc!r})") from None
    chunks = []
    for name, size, sha256 in parts:
        path = parts_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: part missing")
        chunk = path.read_bytes()
        if len(chunk) != size or _sha256(chunk) != sha256:
            raise CheckpointError(f"{path}: part corrupt (size or sha256 differs from {MANIFEST})")
        chunks.append(chunk)
    return manifest, b"".join(chunks)


def join(parts_dir: Path, out_dir: Path) -> dict[str, Any]:
    manifest, stream = read_parts(parts_dir)
    blob = decompress(stream)
    if _sha256(blob) != manifest["bf16_sha256"]:
        raise CheckpointError(f"{parts_dir}: the joined weights do not match their sha256")
    n = _header_size(blob)
    config = json.loads(blob[8:n])["__metadata__"]["config"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / WEIGHTS_FILE).write_bytes(blob)
    (out_dir / CONFIG_FILE).write_text(config)  # last: a directory with a config is complete
    return {"command": "join", "parts": len(manifest["parts"]), "compressed_bytes": len(stream),
            "bf16_bytes": len(blob)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split", help="CKPT_DIR -> bf16, compressed parts in OUT_DIR")
    p.add_argument("ckpt_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--part-bytes", type=int, default=16_000_000, help="largest part size")
    p = sub.add_parser("join", help="PARTS_DIR -> checkpoint directory OUT_DIR (bf16)")
    p.add_argument("parts_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.command == "split":
            summary = split(args.ckpt_dir, args.out_dir, args.part_bytes)
        else:
            summary = join(args.parts_dir, args.out_dir)
    except (CheckpointError, OSError) as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - t0, 2)}))


if __name__ == "__main__":
    main()

"""More Python code for a GPU run than its machine holds: the `.py` files of PyPI wheels,
packed into bundles that travel with the calls (64 MiB each, weight parts included).

    python3 scripts/extra_code.py fetch PACKAGES.txt WHEELS/     # pip download, no deps
    python3 scripts/extra_code.py pack WHEELS/ OUT/ --bundle-mb 14 --bundle-mb 14 --bundle-mb 38
    # on the GPU machine, for each bundle as it arrives:
    for f in OUT/1/*.tar.xz; do tar -xJf "$f" -C /tmp/extra-code; done

A bundle holds one `.tar.xz` per top-level package (`<package>/<path>.py`), so each call
can unpack its own. Vendored copies (`_vendor/`, `vendored/`, `third_party/`, ...) are
left out: they are other packages' files, the near-duplicates that would put a held-out
document's twin in training. The GPU script then drops every package its machine already
has (`EXTRA_CODE`, scripts/gpu_reproduce_tra.sh), builds the rest as its own dataset and
trains on both; `route-cli data overlap gpu-code --also gpu-extra` measures what remains.
"""

from __future__ import annotations

import argparse
import io
import lzma
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

VENDORED = frozenset({"_vendor", "vendor", "vendored", "_vendored", "third_party", "thirdparty",
                      "_thirdparty", "externals", "_externals", "extern", "_extern"})


def fetch(packages: Path, wheels: Path) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    for name in packages.read_text().split():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", "--platform",
               "manylinux2014_x86_64", "--platform", "any", "-q", "-d", str(wheels), name]
        if subprocess.run(cmd, capture_output=True).returncode:
            print(f"skipped {name}: no wheel for Python 3.12", file=sys.stderr)


def package_files(wheels: Path, max_mb: float) -> dict[str, dict[str, bytes]]:
    """``{top-level package: {path: source}}`` of every wheel's `.py` files, at most
    ``max_mb`` per package (in path order); the first wheel to ship a path keeps it."""
    out: dict[str, dict[str, bytes]] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                parts = info.filename.split("/")
                top = parts[0]
                if (not info.filename.endswith(".py") or top.endswith((".dist-info", ".data"))
                        or VENDORED.intersection(parts[:-1])):
                    continue
                files = out.setdefault(top, {})
                if info.filename in files or sum(map(len, files.values())) >= max_mb * 2**20:
                    continue
                files[info.filename] = zf.read(info)
    return out


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME)


def pack(wheels: Path, out: Path, bundle_mb: list[float], max_package_mb: float) -> None:
    packages = package_files(wheels, max_package_mb)
    archives = {top: _tar_xz(files) for top, files in packages.items() if files}
    room = [mb * 2**20 for mb in bundle_mb]
    for old in out.glob("[0-9]*/*.tar.xz"):  # a previous pack's bundles: none of its packages stay
        old.unlink()
    raw = {top: sum(map(len, packages[top].values())) for top in archives}
    for top in sorted(archives, key=lambda t: -len(archives[t])):  # largest first, first fit
        b = next((i for i, r in enumerate(room) if len(archives[top]) <= r), None)
        if b is None:
            print(f"left out {top}: {len(archives[top]) / 2**20:.1f} MiB fits no bundle", file=sys.stderr)
            continue
        room[b] -= len(archives[top])
        (out / str(b + 1)).mkdir(parents=True, exist_ok=True)
        (out / str(b + 1) / f"{top}.tar.xz").write_bytes(archives[top])
    for b in range(len(bundle_mb)):
        got = sorted((out / str(b + 1)).glob("*.tar.xz"))
        size = sum(p.stat().st_size for p in got)
        src = sum(raw[p.name.removesuffix(".tar.xz")] for p in got)
        print(f"bundle {b + 1}: {len(got)} packages, {src / 2**20:.1f} MiB of source in "
              f"{size / 2**20:.1f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="pip download the wheels named in a file (no dependencies)")
    f.add_argument("packages", type=Path)
    f.add_argument("wheels", type=Path)
    p = sub.add_parser("pack", help="the wheels' .py files as per-package .tar.xz, in bundles")
    p.add_argument("wheels", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--bundle-mb", type=float, action="append", required=True,
                   help="room of one bundle in MiB (repeat: one per call that carries one)")
    p.add_argument("--max-package-mb", type=float, default=12.0,
                   help="source taken from one top-level package at most")
    args = ap.parse_args()
    if args.cmd == "fetch":
        fetch(args.packages, args.wheels)
    else:
        pack(args.wheels, args.out, args.bundle_mb, args.max_package_mb)


if __name__ == "__main__":
    main()

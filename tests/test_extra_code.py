"""scripts/extra_code.py: the `.py` files of wheels, per top-level package, without vendored
copies, packed into bundles that unpack to the same files."""

from __future__ import annotations

import importlib.util
import tarfile
import zipfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "extra_code.py"
_spec = importlib.util.spec_from_file_location("extra_code", SCRIPT)
extra_code = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(extra_code)


def _wheel(path: Path, files: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)


def test_pack_keeps_packages_code_and_unpacks_to_the_same_files(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels / "alpha-1.0-py3-none-any.whl", {
        "alpha/__init__.py": "from .core import run\n",
        "alpha/core.py": "def run(x):\n    return x * 2\n" * 50,
        "alpha/_vendor/six.py": "# someone else's module\n",
        "alpha/data/table.csv": "a,b\n1,2\n",
        "alpha-1.0.dist-info/METADATA": "Name: alpha\n",
        "alpha-1.0.data/scripts/tool.py": "print('installed elsewhere')\n",
        "beta.py": "VALUE = 3\n",
    })
    _wheel(wheels / "gamma-2.0-py3-none-any.whl", {
        "gamma/big.py": "x = 1\n" * 40_000,  # 240 KB: over a 0.1 MiB cap on its own
        "gamma/small.py": "y = 2\n",
        "gamma/third_party/lib.py": "z = 3\n",
    })
    got = extra_code.package_files(wheels, max_mb=0.1)
    assert sorted(got) == ["alpha", "beta.py", "gamma"]
    assert sorted(got["alpha"]) == ["alpha/__init__.py", "alpha/core.py"]
    assert sorted(got["gamma"]) == ["gamma/big.py"]  # the cap reached, small.py is left out
    extra_code.pack(wheels, tmp_path / "out", bundle_mb=[1.0, 1.0], max_package_mb=1.0)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    archives = sorted((tmp_path / "out").glob("*/*.tar.xz"))
    assert {a.name for a in archives} == {"alpha.tar.xz", "beta.py.tar.xz", "gamma.tar.xz"}
    for archive in archives:
        with tarfile.open(archive, "r:xz") as tar:
            for member in tar.getmembers():  # no extractall(filter=): Python < 3.11.4 lacks it
                target = unpacked / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    every = {p.relative_to(unpacked).as_posix(): p.read_bytes() for p in unpacked.rglob("*.py")}
    want = {k: v for files in extra_code.package_files(wheels, max_mb=1.0).values() for k, v in files.items()}
    assert every == want and "gamma/small.py" in every


def test_pack_again_replaces_the_previous_bundles(tmp_path):
    wheels, out = tmp_path / "wheels", tmp_path / "out"
    wheels.mkdir()
    _wheel(wheels / "alpha-1.0-py3-none-any.whl", {"alpha/core.py": "x = 1\n"})
    _wheel(wheels / "beta-1.0-py3-none-any.whl", {"beta/core.py": "y = 2\n"})
    extra_code.pack(wheels, out, bundle_mb=[1.0], max_package_mb=1.0)
    assert sorted(p.name for p in out.glob("*/*.tar.xz")) == ["alpha.tar.xz", "beta.tar.xz"]
    (wheels / "beta-1.0-py3-none-any.whl").unlink()  # beta dropped, then packed again
    extra_code.pack(wheels, out, bundle_mb=[1.0], max_package_mb=1.0)
    assert [p.relative_to(out).as_posix() for p in out.glob("*/*.tar.xz")] == ["1/alpha.tar.xz"]

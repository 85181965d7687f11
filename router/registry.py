"""The expert registry: one directory holding a shared tokenizer and one folder per expert.

Layout (``REGISTRY`` defaults to ``$CIR_HOME/registry``, or ``$CIR_REGISTRY``)::

    REGISTRY/
      tokenizer.json          every expert scores text with this tokenizer
      .lock                   file lock guarding every write
      .work/NAME/             resumable training state of a mount in progress
      .data/NAME/             the corpus an expert was trained on (held-out splits)
      .tmp-NAME-PID-XXXX/     an expert being written (ignored on load, cleaned later)
      NAME/
        compressor/           checkpoint (config.json, model.safetensors, tokenizer.json)
        lm/                   checkpoint of the expert LM
        calibration.json      held-out in-domain TRA / loss quantiles and the OOD threshold
        meta.json             domain, source, corpus fingerprint, sha256 + size of every
                              file, parameter counts, creation time, format version

An expert appears in one ``os.replace`` of a complete, fsynced temp directory, under the
lock, so concurrent or interrupted writes never leave a half-registered expert. Loading
checks every file against the sha256 recorded in ``meta.json``; a corrupted expert is
reported by name while the others load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from cir.paths import default_registry

FORMAT_VERSION = 1
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
CALIBRATION_FILE = "calibration.json"
PARTS = ("compressor", "lm")
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")
TMP_PREFIX = ".tmp-"
LOCK_TIMEOUT_S = 600.0


class RegistryError(ValueError):
    """A registry operation that cannot be done, with the reason."""


class UnknownExpertError(RegistryError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ExpertExistsError(RegistryError):
    pass


class CorruptedExpertError(RegistryError):
    pass


def validate_name(name: str) -> str:
    """``name`` if it is a valid expert name, else a ``RegistryError`` saying why."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise RegistryError(
            f"invalid expert name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit (no '/', '..' or spaces)"
        )
    return name


def resolve_registry(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$CIR_REGISTRY``, else ``$CIR_HOME/registry``."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get("CIR_REGISTRY")
    return Path(env).expanduser() if env else default_registry()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")) + [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class ExpertInfo:
    """What the registry knows about one mounted expert (no weights loaded)."""

    name: str
    path: Path
    meta: dict[str, Any]
    calibration: dict[str, Any]

    @property
    def threshold(self) -> float | None:
        value = self.calibration.get("threshold")
        return None if value is None else float(value)

    @property
    def loss_threshold(self) -> float | None:
        value = self.calibration.get("loss_threshold")
        return None if value is None else float(value)

    @property
    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes per token of the registry tokenizer on this domain's held-out text
        (val + test; the train split when there is none), from the mount's corpus stats."""
        splits = self.meta.get("corpus", {}).get("splits", {})
        for names in (("val", "test"), ("train",)):
            n_bytes = sum(splits.get(n, {}).get("bytes", 0) for n in names)
            n_tokens = sum(splits.get(n, {}).get("tokens", 0) for n in names)
            if n_bytes > 0 and n_tokens > 0:
                return n_bytes / n_tokens
        return None

    def checkpoint(self, part: str) -> Path:
        return self.path / part


@dataclass
class Expert:
    """A mounted expert with its compressor loaded (the LM loads on demand)."""

    info: ExpertInfo
    compressor: Any
    _lm: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def threshold(self) -> float | None:
        return self.info.threshold

    @property
    def loss_threshold(self) -> float | None:
        return self.info.loss_threshold

    @property
    def bytes_per_token(self) -> float | None:
        return self.info.bytes_per_token

    def lm(self, device: str = "cpu") -> Any:
        if self._lm is None:
            from cir.checkpoint import load_checkpoint

            self._lm = load_checkpoint(self.info.checkpoint("lm"), device=device,
                                       expect="language model")
        return self._lm


@dataclass
class LoadResult:
    experts: list[Expert]
    errors: list[tuple[str, str]]


class Registry:
    """A registry directory; every write goes through the file lock."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = resolve_registry(root)

    # -- paths ---------------------------------------------------------------------------
    @property
    def tokenizer_path(self) -> Path:
        return self.root / TOKENIZER_FILE

    def work_dir(self, name: str) -> Path:
        return self.root / ".work" / validate_name(name)

    def data_dir(self, name: str) -> Path:
        """The corpus a mounted expert was trained on (kept for held-out evaluations)."""
        return self.root / ".data" / validate_name(name)

    def lock(self, timeout: float = LOCK_TIMEOUT_S) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"), timeout=timeout)

    def has_tokenizer(self) -> bool:
        return self.tokenizer_path.is_file()

    def tokenizer_hash(self) -> str:
        if not self.has_tokenizer():
            raise RegistryError(
                f"registry {self.root} has no tokenizer.json yet: mount an expert or run "
                "`route-cli quickstart`"
            )
        return sha256_file(self.tokenizer_path)

    # -- listing -------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Mounted expert names (complete directories only), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and NAME_RE.fullmatch(p.name) and (p / META_FILE).is_file()
        )

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def require(self, name: str) -> str:
        """``name`` if it is mounted (its metadata is not read, so a corrupted expert
        passes); an unknown name lists the mounted ones."""
        validate_name(name)
        if name not in self.names():
            mounted = ", ".join(self.names()) or "none"
            raise UnknownExpertError(
                f"no expert named {name!r} in {self.root} (mounted: {mounted})"
            )
        return name

    def mount_lock_path(self, name: str) -> Path:
        """The per-name lock of a mount in progress (a leading dot: no name can collide)."""
        return self.root / ".work" / f".{validate_name(name)}.lock"

    def info(self, name: str) -> ExpertInfo:
        """Metadata of a mounted expert; an unknown name lists the mounted ones."""
        self.require(name)
        path = self.root / name
        try:
            meta = json.loads((path / META_FILE).read_text())
            calib_path = path / CALIBRATION_FILE
            calibration = json.loads(calib_path.read_text()) if calib_path.is_file() else {}
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptedExpertError(f"{name}: unreadable metadata ({exc})") from None
        return ExpertInfo(name, path, meta, calibration)

    def verify(self, name: str) -> ExpertInfo:
        """Check every file of ``name`` against its recorded sha256 and size."""
        info = self.info(name)
        files = info.meta.get("files")
        if not isinstance(files, dict) or not files:
            raise CorruptedExpertError(f"{name}: meta.json lists no files")
        for rel, rec in sorted(files.items()):
            path = info.path / rel
            if not path.is_file():
                raise CorruptedExpertError(f"{name}: missing file {rel}")
            if path.stat().st_size != rec.get("bytes") or sha256_file(path) != rec.get("sha256"):
                raise CorruptedExpertError(f"{name}: {rel} does not match its sha256 (corrupted)")
        expected = info.meta.get("tokenizer_sha256")
        if self.has_tokenizer() and expected != self.tokenizer_hash():
            raise CorruptedExpertError(
                f"{name}: built with another tokenizer than the registry's tokenizer.json"
            )
        return info

    def check(self) -> list[tuple[str, str | None]]:
        """``(name, error or None)`` for every mounted expert, hashes verified."""
        out: list[tuple[str, str | None]] = []
        for name in self.names():
            try:
                self.verify(name)
                out.append((name, None))
            except RegistryError as exc:
                out.append((name, str(exc)))
        return out

    # -- loading -------------------------------------------------------------------------
    def load(self, names: list[str] | None = None, device: str = "cpu") -> LoadResult:
        """Load the compressors of ``names`` (default: all), verifying hashes.

        An unknown name raises; a corrupted expert lands in ``errors`` and the rest load."""
        from cir.checkpoint import CheckpointError, load_checkpoint

        # unknown names raise; unreadable metadata is reported below, as any corruption
        wanted = self.names() if names is None else [self.require(n) for n in names]
        experts, errors = [], []
        for name in wanted:
            try:
                info = self.verify(name)
                model = load_checkpoint(info.checkpoint("compressor"), device=device,
                                        expect="compressor")
            except (RegistryError, CheckpointError, OSError) as exc:
                errors.append((name, str(exc)))
                continue
            experts.append(Expert(info, model))
        return LoadResult(experts, errors)

    def get(self, name: str, device: str = "cpu") -> Expert:
        result = self.load([name], device=device)
        if result.errors:
            raise CorruptedExpertError(result.errors[0][1])
        return result.experts[0]

    # -- writing -------------------------------------------------------------------------
    def set_tokenizer(self, path: str | os.PathLike) -> str:
        """Install ``path`` as the registry tokenizer (once); returns its sha256.

        Installing the same file again is a no-op; a different one is refused."""
        new_hash = sha256_file(Path(path))
        with self.lock():
            if self.has_tokenizer():
                if self.tokenizer_hash() != new_hash:
                    raise RegistryError(
                        f"registry {self.root} already has a different tokenizer.json; "
                        "experts of one registry must share one tokenizer"
                    )
                return new_hash
            tmp = self.root / f"{TMP_PREFIX}tokenizer-{os.getpid()}-{time.time_ns()}"
            shutil.copyfile(path, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.tokenizer_path)
            _fsync_dir(self.root)
        return new_hash

    def add_expert(
        self,
        name: str,
        compressor_dir: str | os.PathLike,
        lm_dir: str | os.PathLike,
        calibration: dict[str, Any],
        meta: dict[str, Any] | None = None,
    ) -> ExpertInfo:
        """Register a new expert from two checkpoint directories, atomically.

        The copy is built in a temp dir inside the registry, fsynced, then renamed into
        place under the lock. An existing expert is never replaced or modified."""
        validate_name(name)
        from cir.checkpoint import CheckpointError, check_role, read_config

        for role, src in (("compressor", compressor_dir), ("language model", lm_dir)):
            kind = read_config(src)[0]  # a checkpoint directory, or a clear error
            try:
                check_role(src, kind, role)
            except CheckpointError as exc:
                raise RegistryError(f"refusing {name}: {exc}") from None
        reg_hash = self.tokenizer_hash()
        for part, src in (("compressor", compressor_dir), ("lm", lm_dir)):
            tok = Path(src) / TOKENIZER_FILE
            if not tok.is_file() or sha256_file(tok) != reg_hash:
                raise RegistryError(
                    f"refusing {name}: its {part} was built with a tokenizer other than the "
                    f"registry's ({self.tokenizer_path})"
                )
        self.check_free(name)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-{os.getpid()}-", dir=self.root))
        try:
            self._stage(tmp, name, compressor_dir, lm_dir, calibration, meta or {}, reg_hash)
            with self.lock():
                self.check_free(name)
                os.replace(tmp, self.root / name)
                _fsync_dir(self.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self.info(name)

    def check_free(self, name: str) -> None:
        """``ExpertExistsError`` when ``REGISTRY/name`` is taken: by a mounted expert, or by
        anything else (the registry tokenizer, a directory left without its meta.json)."""
        if name in self:
            raise ExpertExistsError(f"an expert named {name!r} is already mounted (unmount it first)")
        if os.path.lexists(self.root / name):
            raise ExpertExistsError(
                f"{self.root / name} exists but is not a mounted expert (no readable "
                "meta.json, or a registry file): choose another name, or remove that path"
            )

    def _stage(
        self,
        tmp: Path,
        name: str,
        compressor_dir: str | os.PathLike,
        lm_dir: str | os.PathLike,
        calibration: dict[str, Any],
        meta: dict[str, Any],
        tokenizer_sha256: str,
    ) -> None:
        params: dict[str, int] = {}
        for part, src in (("compressor", Path(compressor_dir)), ("lm", Path(lm_dir))):
            (tmp / part).mkdir()
            for fname in CHECKPOINT_FILES:
                shutil.copyfile(src / fname, tmp / part / fname)
            if (src / "metrics.jsonl").is_file():  # the training curve, for the record
                shutil.copyfile(src / "metrics.jsonl", tmp / part / "metrics.jsonl")
            params[part] = _count_params(tmp / part / "model.safetensors")
        _write_json(tmp / CALIBRATION_FILE, calibration)
        files = {
            str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        record = {
            **meta,
            "name": name,
            "format_version": FORMAT_VERSION,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tokenizer_sha256": tokenizer_sha256,
            "params": params,
            "bytes": sum(f["bytes"] for f in files.values()),
            "files": files,
        }
        _write_json(tmp / META_FILE, record)
        _fsync_tree(tmp)

    def remove(self, name: str) -> None:
        """Unmount ``name``: renamed away under the lock, then deleted. Its metadata is not
        read, so a corrupted expert can be unmounted."""
        self.require(name)
        with self.lock():
            trash = self.root / f"{TMP_PREFIX}removed-{name}-{os.getpid()}-{time.time_ns()}"
            os.replace(self.root / name, trash)
            _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(self.data_dir(name), ignore_errors=True)

    def cleanup(self) -> list[str]:
        """Delete temp dirs left by writers that are gone; returns what was removed."""
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        with self.lock():
            for p in self.root.iterdir():
                if not p.name.startswith(TMP_PREFIX) or _owner_alive(p.name):
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed


def _owner_alive(tmp_name: str) -> bool:
    """Temp names end in ``-PID-SUFFIX``: is that writer (or this process) still running?"""
    parts = tmp_name.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    return pid == os.getpid() or _pid_alive(pid)


def _count_params(weights: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            n = 1
            for d in shape:
                n *= d
            total += n
    return total

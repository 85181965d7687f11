"""Document sources: local files, built-in corpora, Hugging Face datasets.

``iter_documents(spec)`` streams ``Document(id, text, source)`` for:

- a built-in name from ``SOURCES`` (``python-code``, ``python-docs``, ``python-prose``,
  ``python-docstrings``, ``c-code``, ``man-pages``);
- a directory (every regular file under it), a glob (``"src/**/*.py"``), a file, or a list
  of any of these;
- ``hf:<dataset>[:<config>][:<split>][?data_files=<path>&column=<name>]`` through
  ``datasets.load_dataset`` (streamed, so a token budget stops it early).

Ids are stable: ``<source>:<path relative to its root>`` for files, so the train/val/test
split of a document (``cir.data.split``) never changes. File sources list their files
first and then yield them ordered by a hash of the id: a prefix of the stream (a token
budget) is then a sample of the whole corpus rather than its alphabetically first folders.

Bad files never crash a build: binary, non-UTF-8, unreadable, empty and oversized files,
and anything that is not a regular file (FIFOs, sockets, devices) are skipped and counted in
``SkipStats``; ``strict=True`` raises on the first instead. Folder walks and globs do not
follow symlinks: each is counted (``symlink``, or ``dangling-symlink`` / ``symlink-loop``
for broken ones); a file named directly is read through its link.
``random`` (uniform token ids, the full-OOD set) has no text: it is a dataset
(``open_dataset("random", ...)``), not a document source.
"""

from __future__ import annotations

import ast
import errno
import glob
import gzip
import os
import re
import site
import stat
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cir.data.roff import roff_to_text
from cir.data.split import stable_unit

DEFAULT_MAX_FILE_BYTES = 8 * 2**20
BINARY_SNIFF_BYTES = 8192
SKIP_REASONS = ("binary", "non-utf8", "unreadable", "empty", "too-large", "filtered", "duplicate",
                "not-regular-file", "symlink", "dangling-symlink", "symlink-loop")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str


class BadFileError(ValueError):
    """A file that a ``strict=True`` source refuses (binary, non-UTF-8, unreadable, ...)."""


class UnknownSourceError(ValueError):
    """A source spec that names nothing known."""


@dataclass
class SkipStats:
    """Files skipped by reason, with a few example paths per reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}


@dataclass
class ReadOptions:
    stats: SkipStats
    strict: bool = False
    max_bytes: int = DEFAULT_MAX_FILE_BYTES
    exclude: tuple[str, ...] = ()  # real paths of folders never read (a build's own output)


# --------------------------------------------------------------------------- reading files


def _reject(opts: ReadOptions, reason: str, where: str, detail: str = "") -> None:
    if opts.strict:
        raise BadFileError(f"{where}: {reason}{' (' + detail + ')' if detail else ''}")
    opts.stats.add(reason, where)


def _open_nonblocking(path: str, flags: int) -> int:
    """``open`` opener: a file swapped for a FIFO since its stat cannot block the open."""
    return os.open(path, flags | os.O_NONBLOCK)


def read_bytes(path: Path, opts: ReadOptions) -> bytes | None:
    """The file's bytes, or None (counted) when it is unreadable, not a regular file (a FIFO
    would block the read forever) or over the size cap."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            _reject(opts, "not-regular-file", str(path), "a FIFO, socket or device")
            return None
        if info.st_size > opts.max_bytes:
            _reject(opts, "too-large", str(path), f"{info.st_size} bytes > cap {opts.max_bytes}")
            return None
        with open(path, "rb", opener=_open_nonblocking) as f:
            # in blocks: one read of a huge cap would allocate the whole cap up front
            blocks, left = [], opts.max_bytes + 1
            while left > 0 and (block := f.read(min(left, 16 << 20))):
                blocks.append(block)
                left -= len(block)
            return b"".join(blocks)
    except OSError as exc:
        _reject(opts, "unreadable", str(path), exc.strerror or type(exc).__name__)
        return None


def decode_text(data: bytes, where: str, opts: ReadOptions) -> str | None:
    """UTF-8 text of ``data``, or None (counted) for binary, non-UTF-8 or blank content."""
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        _reject(opts, "binary", where, "NUL byte in the first 8 KiB")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        _reject(opts, "non-utf8", where, str(exc.reason))
        return None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        _reject(opts, "empty", where)
        return None
    return text


def read_text(path: Path, opts: ReadOptions) -> str | None:
    data = read_bytes(path, opts)
    return None if data is None else decode_text(data, str(path), opts)


# --------------------------------------------------------------------------- file sources


@dataclass(frozen=True)
class FileSet:
    """Files of one named root: ids are ``<source>:<label>/<path relative to root>``;
    symlinks among them are counted, not read, unless ``follow_links``."""

    root: Path
    label: str
    accept: Callable[[Path], bool] = lambda p: True
    skip_dirs: frozenset[str] = frozenset()
    files: tuple[Path, ...] | None = None  # given files under root, instead of walking it
    follow_links: bool = False


def _walk(fs: FileSet, opts: ReadOptions) -> Iterator[Path]:
    if fs.files is not None:
        yield from fs.files
        return

    def unreadable(exc: OSError) -> None:
        _reject(opts, "unreadable", str(exc.filename), exc.strerror or type(exc).__name__)

    for dirpath, dirnames, filenames in os.walk(fs.root, onerror=unreadable):
        here = Path(dirpath)
        kept = []
        for d in sorted(dirnames):
            if d in fs.skip_dirs:
                continue
            if (here / d).is_symlink():  # not followed: counted by the caller as a symlink
                yield here / d
            else:
                kept.append(d)
        dirnames[:] = kept
        for name in filenames:
            path = here / name
            if fs.accept(path):
                yield path


def _link_reason(path: Path) -> str:
    """Skip reason of a symlink that is not followed: ``symlink``, ``dangling-symlink`` or
    ``symlink-loop``."""
    try:
        path.stat()
    except OSError as exc:
        return "symlink-loop" if exc.errno == errno.ELOOP else "dangling-symlink"
    return "symlink"


def _listing(source: str, filesets: Iterable[FileSet], opts: ReadOptions) -> list[tuple[str, Path]]:
    """(id, path) of every accepted file, deduplicated by real path, in stable hash order;
    symlinks not followed are counted in ``opts.stats``."""
    seen: set[str] = set()
    items: list[tuple[str, Path]] = []
    excluded = tuple(os.path.join(e, "") for e in opts.exclude)
    for fs in filesets:
        if not fs.root.is_dir():
            continue
        for path in _walk(fs, opts):
            if path.is_symlink() and not fs.follow_links:
                link = os.path.join(os.path.realpath(path.parent), path.name)
                if link not in seen:
                    seen.add(link)
                    opts.stats.add(_link_reason(path), str(path))
                continue
            real = os.path.realpath(path)
            if real in seen or real.startswith(excluded):
                continue
            seen.add(real)
            rel = path.relative_to(fs.root).as_posix()
            items.append((f"{source}:{fs.label}/{rel}" if fs.label else f"{source}:{rel}", path))
    # salted: the order must be independent of the split hash, or a prefix would be all val
    items.sort(key=lambda item: (stable_unit("order:" + item[0]), item[0]))
    return items


def file_documents(
    source: str,
    filesets: Iterable[FileSet],
    opts: ReadOptions,
    transform: Callable[[Path, str], str] | None = None,
) -> Iterator[Document]:
    for doc_id, path in _listing(source, filesets, opts):
        text = read_text(path, opts) if transform is None else _read_transformed(path, opts, transform)
        if text is not None:
            yield Document(doc_id, text, source)


def _read_transformed(path: Path, opts: ReadOptions, transform: Callable[[Path, str], str]) -> str | None:
    text = read_text(path, opts)
    if text is None:
        return None
    out = transform(path, text)
    if not out.strip():
        _reject(opts, "filtered", str(path), "nothing left after cleaning")
        return None
    return out


def path_documents(spec: str | os.PathLike | list, opts: ReadOptions) -> Iterator[Document]:
    """A directory, a file, a glob, or a list of them; ids relative to each root."""
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    filesets: list[FileSet] = []
    files: list[Path] = []
    for item in specs:
        path = Path(item).expanduser()
        if path.is_dir():
            filesets.append(FileSet(path, ""))
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(str(item)):
            filesets.extend(_glob_filesets(str(Path(item).expanduser())))
        elif path.exists():
            raise UnknownSourceError(f"{item!s}: not a regular file or directory")
        else:
            raise UnknownSourceError(f"no such file, directory or source: {item!s}. {_valid_names()}")
    if files:  # ids relative to the files' common folder, so equal names stay distinct
        root = Path(os.path.commonpath([f.absolute().parent for f in files]))
        filesets.append(FileSet(root, "", files=tuple(f.absolute() for f in files), follow_links=True))
    return file_documents("file", filesets, opts)


def _glob_filesets(pattern: str) -> list[FileSet]:
    """Files matching ``pattern``, with ids relative to its fixed leading folders (``src`` of
    ``src/**/*.py``), so a document's id and split do not depend on which other files match.
    ``**`` does not enter symlinked folders (no loop, nothing outside the tree), and hidden
    names match only a pattern with a part starting with ``.``, as with ``glob.glob``."""
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:first]) if first else Path(".")
    rest = list(parts[first:])
    if rest[-1] == "**":  # glob.glob's "a/**" lists files too, pathlib's only folders
        rest.append("*")
    hidden_ok = any(part.startswith(".") for part in rest)
    # everything but folders: symlinks and FIFOs are counted when read, not dropped unseen
    matches = sorted(
        m for m in root.glob(str(Path(*rest)))
        if not m.is_dir()
        and (hidden_ok or not any(c.startswith(".") for c in m.relative_to(root).parts))
    )
    if not matches:
        raise UnknownSourceError(f"glob matches no file: {pattern}")
    return [FileSet(root, "", files=tuple(matches))]


# --------------------------------------------------------------------------- built-in corpora


def python_roots() -> list[tuple[str, Path]]:
    """(label, dir) of the stdlib and every site-packages directory, deduplicated."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", paths["stdlib"]), ("site-packages", paths["purelib"]), ("site-packages", paths["platlib"])]
    roots += [("site-packages", p) for p in site.getsitepackages()]
    seen: set[str] = set()
    out = []
    for label, root in roots:
        real = os.path.realpath(root)
        if real not in seen and Path(real).is_dir():
            seen.add(real)
            out.append((label, Path(root)))
    return out


_PY_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", ".git"})


def _python_filesets(accept: Callable[[Path], bool], skip_dirs: frozenset[str] = frozenset()) -> list[FileSet]:
    filesets = []
    for label, root in python_roots():
        # the stdlib root holds its own site-packages: those are walked as their own root
        skip = _PY_SKIP_DIRS if label == "stdlib" else frozenset({"__pycache__", ".git"})
        filesets.append(FileSet(root, label, accept, skip | skip_dirs))
    return filesets


def python_code(opts: ReadOptions) -> Iterator[Document]:
    """``.py`` files of the standard library and installed packages."""
    return file_documents("python-code", _python_filesets(lambda p: p.suffix == ".py"), opts)


_NOT_DOCS = frozenset({
    "top_level.txt", "entry_points.txt", "sources.txt", "requires.txt", "dependency_links.txt",
    "namespace_packages.txt", "not-zip-safe", "vendor.txt", "cmakelists.txt", "record",
    "installer", "requested", "wheel",
})


# legal boilerplate: near-identical copies across packages would leak between splits
_LEGAL = ("license", "licence", "copying", "notice", "authors", "thirdpartynotices")


def _is_doc(path: Path) -> bool:
    name = path.name.lower()
    if name in _NOT_DOCS or name.startswith(_LEGAL) or path.parent.name.lower() == "licenses":
        return False
    return path.suffix.lower() in {".rst", ".md", ".txt"} or (
        name == "metadata" and path.parent.name.endswith(".dist-info")
    )


def _clean_doc(path: Path, text: str) -> str:
    if path.name == "METADATA":  # e-mail style headers, then the long description
        _, _, text = text.partition("\n\n")
    return text if _looks_like_prose(text) else ""


def _looks_like_prose(text: str, min_letters: float = 0.6) -> bool:
    """Mostly letters among non-space characters: keeps docs, drops number tables and data."""
    sample = "".join(text[:20000].split())
    return bool(sample) and sum(c.isalpha() for c in sample) / len(sample) >= min_letters


def pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return {}
    return dict(topics)


def python_docs(opts: ReadOptions) -> Iterator[Document]:
    """pydoc topics (the language reference as text) and installed packages' prose docs.

    Package docs are ``.rst`` / ``.md`` / ``.txt`` files and wheel METADATA descriptions;
    licence texts and packaging metadata are left out, and files that are mostly not
    letters (data tables) are counted as ``filtered``; ``test(s)`` folders (test data) are
    not walked.
    """
    for name, text in sorted(pydoc_topics().items()):
        if text.strip():
            yield Document(f"python-docs:pydoc/{name}", text, "python-docs")
    filesets = _python_filesets(_is_doc, skip_dirs=frozenset({"test", "tests"}))  # test data is not docs
    yield from file_documents("python-docs", filesets, opts, _clean_doc)


_FENCE = re.compile(r"^\s*(```|~~~)")
_RST_CODE = re.compile(r"^\s*\.\.\s+(code-block|code|sourcecode|doctest|testcode|testoutput|"
                       r"highlight|literalinclude|ipython|jupyter-execute)::")
_PROMPT = re.compile(r"^\s*(>>>|\.\.\.|\$ |In \[\d+\]:)")


def strip_code(text: str, min_indent: int = 4) -> str:
    """Prose of a doc: Markdown fences, reST code directives and ``::`` literal blocks,
    lines indented by ``min_indent`` columns or more, and interactive-session lines
    (``>>>``, ``...``, ``$``) removed; blank lines collapsed. Inline code in a sentence
    stays."""
    out: list[str] = []
    fence: str | None = None
    literal = False  # inside an indented block opened by `::` or a code directive
    for line in text.splitlines():
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            continue
        m = _FENCE.match(line)
        if m:
            fence = m.group(1)
            continue
        expanded = line.expandtabs(4)
        indent = len(expanded) - len(expanded.lstrip())
        if not line.strip():
            if not out or out[-1]:
                out.append("")
            continue
        if literal and indent > 0:
            continue
        literal = False
        if _RST_CODE.match(line):
            literal = True
            continue
        if indent >= min_indent or _PROMPT.match(line):
            continue
        if line.rstrip().endswith("::"):
            literal = True
            line = line.rstrip()[:-1]  # "Example::" reads "Example:"
            if line.strip() == ":":
                continue
        out.append(line.rstrip())
    return "\n".join(out).strip() + "\n"


def _clean_prose(path: Path, text: str) -> str:
    text = _clean_doc(path, text)
    return strip_code(text) if text.strip() else ""


def python_prose(opts: ReadOptions) -> Iterator[Document]:
    """``python-docs`` with the code taken out (``strip_code``): documentation prose, the
    semi-OOD set for a code domain without the code examples that docs are full of."""
    for name, text in sorted(pydoc_topics().items()):
        prose = strip_code(text, min_indent=3)  # pydoc's rendered text indents code by 3
        if prose.strip():
            yield Document(f"python-prose:pydoc/{name}", prose, "python-prose")
    filesets = _python_filesets(_is_doc, skip_dirs=frozenset({"test", "tests"}))
    yield from file_documents("python-prose", filesets, opts, _clean_prose)


def _docstrings(path: Path, text: str) -> str:
    """Module, class and function docstrings of a Python file, in source order."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, kinds)), key=lambda n: getattr(n, "lineno", 0))
    docs = (ast.get_docstring(n, clean=True) for n in nodes)
    return "\n\n".join(d for d in docs if d and d.strip()) + "\n"


def python_docstrings(opts: ReadOptions) -> Iterator[Document]:
    """Docstrings of the stdlib and installed packages, one document per module."""
    filesets = _python_filesets(lambda p: p.suffix == ".py")
    return file_documents("python-docstrings", filesets, opts, _docstrings)


INCLUDE_ROOT = Path("/usr/include")


def c_code(opts: ReadOptions) -> Iterator[Document]:
    """C headers under ``/usr/include``."""
    fs = FileSet(INCLUDE_ROOT, "include", lambda p: p.suffix == ".h")
    return file_documents("c-code", [fs], opts)


MAN_ROOT = Path("/usr/share/man")


def _man_filesets() -> list[FileSet]:
    """English sections only (``man1`` ... ``man9``); translations live in language folders."""
    sections = sorted(MAN_ROOT.glob("man[0-9]*")) if MAN_ROOT.is_dir() else []
    return [FileSet(d, d.name, lambda p: p.suffix == ".gz") for d in sections if d.is_dir()]


def man_pages(opts: ReadOptions) -> Iterator[Document]:
    """Gzipped man pages, stripped of roff macros to readable text."""
    for doc_id, path in _listing("man-pages", _man_filesets(), opts):
        data = read_bytes(path, opts)
        if data is None:
            continue
        try:
            raw = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            _reject(opts, "unreadable", str(path), f"bad gzip: {exc}")
            continue
        text = decode_text(raw, str(path), opts)
        if text is None:
            continue
        if text.lstrip().startswith(".so "):  # a pointer to another page, no content of its own
            opts.stats.add("filtered", str(path))
            continue
        text = roff_to_text(text)
        if text.strip():
            yield Document(doc_id, text, "man-pages")


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class SourceInfo:
    name: str
    description: str
    documents: Callable[[ReadOptions], Iterator[Document]]
    present: Callable[[], bool]


SOURCES: dict[str, SourceInfo] = {
    "python-code": SourceInfo(
        "python-code", "stdlib and installed packages' .py files", python_code,
        lambda: any(root.is_dir() for _, root in python_roots()),
    ),
    "python-docs": SourceInfo(
        "python-docs", "pydoc topics and installed packages' .rst/.md/.txt docs", python_docs,
        lambda: bool(pydoc_topics()),
    ),
    "python-prose": SourceInfo(
        "python-prose", "python-docs without code: fences, literal blocks, indented blocks "
        "and >>> sessions removed", python_prose, lambda: bool(pydoc_topics()),
    ),
    "python-docstrings": SourceInfo(
        "python-docstrings", "docstrings of the stdlib and installed packages, one document per module",
        python_docstrings, lambda: any(root.is_dir() for _, root in python_roots()),
    ),
    "c-code": SourceInfo(
        "c-code", "C headers under /usr/include", c_code,
        lambda: INCLUDE_ROOT.is_dir() and any(INCLUDE_ROOT.glob("*.h")),
    ),
    "man-pages": SourceInfo(
        "man-pages", "man pages under /usr/share/man, roff stripped", man_pages,
        lambda: bool(_man_filesets()),
    ),
}
DATASET_ONLY = {"random": "uniform random token ids (full-OOD); open_dataset('random', ...)"}


def _valid_names() -> str:
    return (
        f"valid sources: {', '.join(SOURCES)}, a directory, a file, a glob, or "
        "hf:<dataset>[:<config>][:<split>]"
    )


def iter_documents(
    spec: str | os.PathLike | list,
    stats: SkipStats | None = None,
    strict: bool = False,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    exclude: Iterable[str | os.PathLike] = (),
) -> Iterator[Document]:
    """Stream the documents of ``spec``; skipped files are counted in ``stats``; files under
    an ``exclude`` folder (a build's output) are never read."""
    opts = ReadOptions(stats if stats is not None else SkipStats(), strict, max_file_bytes,
                       tuple(os.path.realpath(e) for e in exclude))
    if isinstance(spec, str) and spec in DATASET_ONLY:
        raise UnknownSourceError(
            f"'{spec}' has no text: it is a dataset, open it with open_dataset('{spec}', split)"
        )
    if isinstance(spec, str) and spec in SOURCES:
        return SOURCES[spec].documents(opts)
    if isinstance(spec, str) and spec.startswith("hf:"):
        from cir.data.hf import hf_documents

        return hf_documents(spec, opts)
    return path_documents(spec, opts)


def describe_sources() -> list[dict[str, Any]]:
    """Built-in sources with whether they are present on this machine."""
    rows = [
        {"name": s.name, "kind": "documents", "description": s.description, "present": s.present()}
        for s in SOURCES.values()
    ]
    rows += [{"name": n, "kind": "dataset", "description": d, "present": True} for n, d in DATASET_ONLY.items()]
    return rows

"""The text sources of the reference corpus: files that exist offline on a stock Debian machine with a Python
interpreter, each read as ``(key, text)`` documents (see :mod:`reference.corpus` for what each domain holds)."""

from __future__ import annotations

import os
import re
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

MAX_FILE_BYTES = 200_000


class SourceMissingError(RuntimeError):
    """A corpus source directory/file is absent (or holds no usable files)."""


def _read_text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) > MAX_FILE_BYTES or b"\x00" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    return text if text.strip() else None


def _require_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise SourceMissingError(f"corpus source directory is missing: {p}")
    return p


def _walk(root: Path, keep: Callable[[Path], bool], skip_dirs: Iterable[str] = ()) -> list[Path]:
    skip = set(skip_dirs)
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not os.path.islink(os.path.join(dirpath, d)))
        for f in sorted(filenames):
            p = Path(dirpath, f)
            if p.is_symlink() or not p.is_file():
                continue
            if keep(p):
                out.append(p)
    return out


# ---------------------------------------------------------------- sources: each returns (key, text) documents


def python_stdlib_docs() -> list[tuple[str, str]]:
    root = _require_dir(sysconfig.get_paths()["stdlib"])
    files = _walk(root, lambda p: p.suffix == ".py", skip_dirs=("site-packages", "__pycache__", "dist-packages"))
    return [(str(p.relative_to(root)), t) for p in files if (t := _read_text(p))]


def c_header_docs() -> list[tuple[str, str]]:
    root = _require_dir("/usr/include")
    files = _walk(root, lambda p: p.suffix == ".h")
    return [(str(p), t) for p in files if (t := _read_text(p))]


_SHEBANG = re.compile(rb"^#! ?/(usr/)?bin/(env +)?(ba|da)?sh\b")
SHELL_ROOTS = ("/usr/bin", "/usr/sbin", "/usr/lib", "/usr/share", "/etc")


def _is_shell(p: Path) -> bool:
    if p.suffix == ".sh":
        return True
    try:
        with p.open("rb") as fh:
            return bool(_SHEBANG.match(fh.read(64)))
    except OSError:
        return False


def shell_docs() -> list[tuple[str, str]]:
    out = []
    for r in SHELL_ROOTS:
        root = _require_dir(r)
        skip = ("site-packages", "dist-packages") + (("python3", "X11") if r == "/usr/bin" else ())
        files = _walk(root, _is_shell, skip_dirs=skip)
        out += [(str(p), t) for p in files if (t := _read_text(p))]
    return out


def prose_docs() -> list[tuple[str, str]]:
    """Paragraphs (keyed by content) of license/copyright texts, de-duplicated after whitespace folding."""
    lic = _require_dir("/usr/share/common-licenses")
    doc = _require_dir("/usr/share/doc")
    files = _walk(lic, lambda p: True)
    files += sorted(p for p in doc.glob("*/copyright") if p.is_file())
    paras: dict[str, str] = {}
    for p in files:
        text = _read_text(p)
        if not text:
            continue
        for para in re.split(r"\n\s*\n", text):
            lines = [ln.strip() for ln in para.strip().splitlines()]
            lines = [ln[2:] if ln.startswith(". ") else ("" if ln == "." else ln) for ln in lines]
            para = " ".join(ln for ln in lines if ln)
            words = para.split()
            if len(words) < 12:
                continue
            letters = sum(c.isalpha() for c in para)
            if letters < 0.6 * len(para):  # drop file lists, e-mail headers, tables
                continue
            para = " ".join(words)
            paras.setdefault(para.lower(), para)
    return [(k, v) for k, v in sorted(paras.items())]


@dataclass(frozen=True)
class TextDomain:
    name: str
    description: str
    loader: Callable[[], list[tuple[str, str]]]
    paths: tuple[str, ...] = field(default_factory=tuple)


TEXT_DOMAINS: dict[str, TextDomain] = {
    "python": TextDomain("python", "Python standard library source (.py)", python_stdlib_docs,
                         (sysconfig.get_paths()["stdlib"],)),
    "c": TextDomain("c", "C headers under /usr/include", c_header_docs, ("/usr/include",)),
    "prose": TextDomain("prose", "English license/copyright paragraphs", prose_docs,
                        ("/usr/share/common-licenses", "/usr/share/doc/*/copyright")),
    "shell": TextDomain("shell", "shell scripts found by shebang", shell_docs, SHELL_ROOTS),
}

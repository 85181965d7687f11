"""roff (man page) source to readable plain text, for the ``man-pages`` corpus.

Not a typesetter: it keeps the words and the section structure (headings, paragraphs,
tagged items) and drops requests, macro definitions, fonts, sizes and motions, which is
what a text corpus needs.
"""

from __future__ import annotations

import re
import shlex

_NAMED = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d",
    "oq": "\u2018", "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122",
    "de": "\u00b0", "mu": "\u00d7", "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265", "->": "\u2192",
    "<-": "\u2190", "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "ga": "`", "at": "@", "sh": "#",
    "Do": "$", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "ba": "|", "or": "|", "pl": "+",
    "mi": "-", "eq": "=", "fm": "\u2032", "sq": "\u25a1", "pc": "\u00b7", "ss": "\u00df",
}

_ESCAPE = re.compile(
    r"""\\(?:
        f(?:\[[^\]]*\]|\(..|.)          # font
      | s[+-]?(?:\d|\(\d\d|\[[^\]]*\])  # size
      | \*(?:\[[^\]]*\]|\(..|.)         # string
      | [hvwlLNbkxoDRSXZ]'[^']*'        # motions and other quoted escapes
      | n[+-]?(?:\[[^\]]*\]|\(..|.)     # number register
      | k.                              # mark
      | \((?P<two>..)                   # named char \(xx
      | \[(?P<long>[^\]]*)\]            # named char \[xx]
      | (?P<one>.)                      # one-character escape
    )""",
    re.VERBOSE,
)
_ONE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", "'": "'", "`": "`", ".": "."}

_FONT_MACROS = {"B", "I", "SM", "SB"}
_ALT_MACROS = {"BI", "BR", "IB", "IR", "RB", "RI"}
_BREAKS = {"PP", "LP", "P", "sp", "br", "RS", "RE", "nf", "fi", "HP", "PD", "in", "ti", "EX", "EE", "Vb", "Ve"}
_HEADINGS = {"SH", "SS", "Sh", "Ss"}


def _unescape(text: str) -> str:
    def repl(m: re.Match) -> str:
        if m.group("two") is not None:
            return _NAMED.get(m.group("two"), "")
        if m.group("long") is not None:
            name = m.group("long")
            if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
                return chr(int(name[1:], 16))
            return _NAMED.get(name, "")
        if m.group("one") is not None:
            return _ONE.get(m.group("one"), "")
        return ""

    return _ESCAPE.sub(repl, text)


def _args(rest: str) -> list[str]:
    try:
        return shlex.split(rest, posix=True)
    except ValueError:
        return rest.split()


def _request(name: str, rest: str) -> str | None:
    """Text that a request line contributes ("" = paragraph break, None = nothing)."""
    if name in _HEADINGS:
        return "\n" + " ".join(_args(rest)).upper()
    if name in _FONT_MACROS:
        return " ".join(_args(rest))
    if name in _ALT_MACROS:
        return "".join(_args(rest))
    if name in {"TP", "IP"}:
        args = _args(rest)
        return "" if name == "TP" or not args else "\n" + args[0]
    if name in _BREAKS:
        return ""
    return None


def roff_to_text(source: str) -> str:
    """Readable text of a roff document."""
    out: list[str] = []
    skipping_def = False
    for raw in source.splitlines():
        if skipping_def:
            skipping_def = raw.strip() != ".."
            continue
        line = raw.rstrip()
        if line.startswith((".\\\"", "'\\\"", '.\\"', "\\\"")) or line in {".", "'"}:
            continue
        if line.startswith((".", "'")):
            name, _, rest = line[1:].lstrip().partition(" ")
            if name in {"de", "de1", "am", "ig"}:
                skipping_def = True
                continue
            piece = _request(name, rest)
            if piece is None:
                continue
            line = piece
        line = _unescape(line)
        if line == "" and out and out[-1] == "":
            continue
        out.append(line)
    text = "\n".join(out).strip() + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)

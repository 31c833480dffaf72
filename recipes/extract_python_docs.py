#!/usr/bin/env python
"""Extract the English prose of the CPython documentation as extra training text for the demo MoE.

Reads the reStructuredText sources that Debian's ``python3.11-doc`` package ships
(``html/_sources/**/*.rst.txt``; PSF licence) and keeps unindented paragraph text: code blocks,
directives, comments and heading underlines are dropped, inline roles become their plain text.

    apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb /tmp/pydoc
    python recipes/extract_python_docs.py /tmp/pydoc/usr/share/doc/python3.11/html/_sources \\
        .traindata/train/python_docs.txt
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROLE = re.compile(r":[a-z:]+:`!?~?([^`<]*?)(?:\s*<[^`>]*>)?`")
LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_+")
UNDERLINE = re.compile(r"^([=\-~^*#+\"'`.:_])\1{2,}\s*$")


def prose(text: str) -> str:
    out: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            if out and out[-1]:
                out.append("")
            continue
        if line[0].isspace() or line.startswith("..") or UNDERLINE.match(line) or line.lstrip().startswith(">>>"):
            continue
        line = LINK.sub(r"\1", ROLE.sub(r"\1", line)).replace("``", "").replace("**", "")
        out.append(line.rstrip(":") + (":" if line.endswith("::") else ""))
    return "\n".join(out).strip()


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    parts = [prose(f.read_text(encoding="utf-8", errors="replace")) for f in sorted(src.rglob("*.rst.txt"))]
    dst.write_text("\n\n".join(p for p in parts if p) + "\n", encoding="utf-8")
    print(f"{len(parts)} files -> {dst} ({dst.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

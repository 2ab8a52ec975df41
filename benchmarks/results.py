"""Write one benchmark's section into benchmarks/RESULTS.md (between markers), never by hand.

Each benchmark command calls ``write_section(name, markdown)``; other sections are kept. The header of
each section records the command, the date, torch version and the load average when it ran."""
from __future__ import annotations

import os
import platform
import re
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
ROOT = Path(__file__).resolve().parent.parent
TITLE = "# slimtorch benchmark results\n\nEvery section below is written by the command it names.\n"


def machine_line() -> str:
    import torch
    la = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
            f"load average {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}")


def _relative(arg: str, root: Path) -> str:
    """``arg`` with an absolute path inside the checkout made relative to its root."""
    p = Path(arg)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return arg
    return arg


def command_line(argv=None, root: Path = ROOT, module: str | None = None) -> str:
    """The command that ran, as one can type it at the repo root: ``python benchmarks/x.py ...``
    (or ``python -m benchmarks.x ...`` when run with -m); paths inside the checkout relative."""
    if argv is None:
        argv = list(sys.argv)
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if module is None and spec is not None and spec.name != "__main__":
            module = spec.name
    head = [f"-m {module}"] if module else [_relative(argv[0], root)] if argv else []
    return " ".join(["python", *head, *(_relative(a, root) for a in argv[1:])])


def write_section(name: str, body: str, command: str | None = None) -> None:
    command = command or command_line()
    block = (f"<!-- BEGIN {name} -->\n## {name}\n\n_Command:_ `{command}`  \n"
             f"_Run:_ {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine_line()}\n\n"
             f"{body.strip()}\n<!-- END {name} -->\n")
    text = RESULTS.read_text() if RESULTS.exists() else TITLE
    pat = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->\n?", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + block
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(RESULTS)

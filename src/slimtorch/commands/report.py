"""``slimtorch report FILE.slim``: per-layer bits, theoretical and real bytes, PNG bar chart."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("report", help="sizes of a packed model: theoretical vs file bytes per layer",
                       description="Verify FILE.slim, print bits and bytes per layer (theoretical and in "
                                   "the file) and write a PNG bar chart.")
    p.add_argument("file", help="packed model (.slim)")
    p.add_argument("--png", default=None, help="chart path (default: FILE with suffix .png)")
    p.add_argument("--no-png", action="store_true", help="do not write the chart")
    p.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    p.set_defaults(func=_report)


def _report(args) -> int:
    from ..export.file_report import file_report

    rep = file_report(args.file)
    if args.format == "json":
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print(rep.to_markdown() if args.format == "markdown" else rep)
    if not args.no_png:
        png = Path(args.png) if args.png else Path(args.file).with_suffix(".png")
        rep.plot(png)
        print(f"wrote {png}")
    return 0 if rep.totals["within_limit"] else 1

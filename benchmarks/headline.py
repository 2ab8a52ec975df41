"""Copy the headline lines of benchmarks/RESULTS.md (lines starting with "Headline:" or "Goal")
into README.md between the headline markers, so the README never carries a hand-typed figure.

    python -m benchmarks.headline
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- BEGIN headline -->", "<!-- END headline -->"


def headlines(text: str) -> list[str]:
    out = []
    for m in re.finditer(r"<!-- BEGIN (.*?) -->\n(.*?)<!-- END \1 -->", text, re.S):
        name, body = m.group(1), m.group(2)
        lines = [ln.strip() for ln in body.splitlines()
                 if ln.strip().startswith(("Headline:", "Goal", "**Headline"))]
        out += [f"- **{name}**: {ln}" for ln in lines]
    return out


def main():
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    block = "\n".join([BEGIN, "Headline figures, copied from `benchmarks/RESULTS.md` by "
                       "`python -m benchmarks.headline`:", "", *headlines(results), END])
    readme = ROOT / "README.md"
    text = readme.read_text()
    pat = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.replace("<!-- headline -->", block)
    readme.write_text(text)
    print(block)


if __name__ == "__main__":
    main()

"""Rewrite every marked section of docs/benchmarks.md (and the README's headline) from bench/results.

Each benchmark script publishes its own section when it runs; this re-publishes all of them at once
(after a checkout, or when the page layout changed), so no table is ever copied by hand.

    python bench/publish.py            # rewrite; exit 1 if a section has no result file
    python bench/publish.py --check    # exit 1 if any section differs from its result file
"""
from __future__ import annotations

import argparse
import sys

from _results import PAGES, RESULTS, publish, section_span, section_text, sections


def all_sections() -> list[str]:
    return [s for doc in PAGES for s in sections(doc)]


def stale() -> list[str]:
    """Sections whose text differs from what their result file publishes."""
    out = []
    for doc in PAGES:
        if not doc.exists():
            continue
        text = doc.read_text()
        for stem in sections(doc):
            a, b = section_span(text, stem)
            if text[a:b].strip() != section_text(stem).strip():
                out.append(f"{doc.name}:{stem}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    missing = [s for s in all_sections() if not (RESULTS / f"{s}.md").exists()]
    if missing:
        print(f"no result file for sections {missing}", file=sys.stderr)
        return 1
    if args.check:
        bad = stale()
        if bad:
            print(f"sections out of date with bench/results: {bad}; run python bench/publish.py", file=sys.stderr)
        return 1 if bad else 0
    for stem in dict.fromkeys(all_sections()):
        publish(stem)
    print(f"published {len(all_sections())} sections into {', '.join(str(p.name) for p in PAGES)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The shift comparison of groups of runs (e.g. teacher, supervised, CQKD), seeds paired, as Markdown.

Each run needs its shift.csv (`cqkd evaluate RUN... --shift`). For every corruption at severities
0 (clean), 1, 3 and 5: each group's mean top-1 and ECE over its seeds, and its difference to the
reference group paired by seed with a 95% percentile bootstrap interval over the seeds (scipy);
then each group's mCE and relative mCE against the reference run of the same seed (ImageNet-C's
definition, docs/quality.md), mean and interval over seeds.

  PYTHONPATH=src python scripts/shift_table.py --reference supervised \\
      --group teacher runs/quality/teachers/large \\
      --group supervised 'runs/quality/supervised/model=cnn-small,size=7,seed=*' \\
      --group cqkd 'runs/quality/distill/teacher=large,model=cnn-small,size=7,T=1,tcal=none,alpha=0.5,seed=*' \\
      [--out docs/results/quality-shift.md]

A group of one run (the teacher) is compared with every seed of the reference.
"""

from __future__ import annotations

import argparse
import glob
import sys

import numpy as np

from cqkd.analysis.shift import interval, seed_of, compare_groups, corruption_errors, read_shift
from cqkd.core.io import write_text
from cqkd.core.text import markdown_table
from cqkd.errors import CqkdError


def _groups(specs: list[list[str]]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for spec in specs:
        if len(spec) < 2:
            raise CqkdError(f"--group {' '.join(spec)!r}: expected NAME RUN [RUN...] (globs allowed)")
        name, patterns = spec[0], spec[1:]
        groups[name] = sorted(p for part in patterns for p in (glob.glob(glob.escape(part).replace("[*]", "*"))
                                                               or [part]))
    return groups


def _ci(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def mce_rows(groups: dict[str, list[str]], reference: str) -> list[list[str]]:
    """Per group: mCE and relative mCE against the reference run of the same seed, over seeds."""
    ref = {seed_of(p): read_shift(p) for p in groups[reference]}
    out = []
    for g, paths in groups.items():
        mine = {seed_of(p): read_shift(p) for p in paths}
        pairs = [(mine[s], ref[s]) for s in mine if s in ref] if len(mine) > 1 else \
            [(next(iter(mine.values())), r) for r in ref.values()]
        ce = np.array([corruption_errors(a, b)["mean"]["ce"] for a, b in pairs])
        rel = np.array([corruption_errors(a, b)["mean"]["relative_ce"] for a, b in pairs])
        out.append([g, str(len(pairs)), f"{ce.mean():.4f} {_ci(interval(ce))}", f"{rel.mean():.4f} {_ci(interval(rel))}"])
    return out


def main(argv: list[str] | None = None) -> int:
    """Print (or write) the comparison tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--group", action="append", nargs="+", required=True, metavar="NAME RUN",
                   help="a group: its name, then run directories (a * in a name matches anything)")
    p.add_argument("--reference", required=True, metavar="NAME")
    p.add_argument("--out", default=None, metavar="FILE.md")
    args = p.parse_args(argv)
    try:
        groups = _groups(args.group)
        table = compare_groups(groups, args.reference)
        others = [g for g in groups if g != args.reference]
        headers = ["corruption", "severity", "metric", *groups, *(f"{g} − {args.reference} [95% CI]" for g in others)]
        body = [[r["corruption"], r["severity"], r["metric"], *(f"{r[g]:.4f}" for g in groups),
                 *(f"{r[f'{g}-{args.reference}']:+.4f} {_ci(r[f'{g}-{args.reference} CI'])}" for g in others)]
                for r in table]
        text = "\n".join([markdown_table(headers, body), "",
                          markdown_table(["group", "seeds", f"mCE vs {args.reference} [95% CI]", "relative mCE"],
                                         mce_rows(groups, args.reference))])
    except CqkdError as e:
        print(f"shift_table: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_text(args.out, text + "\n")
        print(f"written: {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

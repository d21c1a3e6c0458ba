#!/opt/mailgate/bin/python
"""How well `parse_bounce` reads a public corpus of delivery reports: detection, recipient recall
and precision, reason agreement and hard/soft agreement.

    bench/bounce_corpus.py SAMPLES EXPECTATIONS [--verbose]

SAMPLES is a directory of sample reports named `<family>-<engine>-NN.eml` (`lhost-postfix-01.eml`,
`rhost-google-03.eml`, `rfc3464-07.eml`), as in the sisimai project's set-of-emails
(`maildir/bsd`). EXPECTATIONS is a directory of that project's test scripts (`t/*.t`), each of
which names an engine (`my $enginename = 'Postfix';`) and, per sample number, one entry per failed
recipient: `'05' => [['4.1.1', '450', 'userunknown', 1]]` (status, reply code, reason, hard). The
expectations are read from those scripts as they stand; nothing is adjusted here.

Figures, over samples whose expectations name at least one failure (not only `delivered`,
`vacation` or `feedback`):

- detection: the share of samples `parse_bounce` reads as a delivery report: a bounce, or a
  delay notice (sisimai calls a "delayed" DSN a bounce, `expired`; mailgate reads it, names its
  recipients, and on purpose does not count a warning as a failure). `strict_detection` is the
  share called a bounce;
- recipient recall / precision: recipients found (failed, or delayed in a delay notice) against
  recipients expected, by count per
  sample (the expectations name how many recipients failed, not which): recall is the sum of
  min(found, expected) over the sum expected, precision the same over the sum found;
- reason agreement: expected entries whose reason one of ours matches (as multisets per sample);
- hard/soft agreement: the same for the hard flag (before reasons existed, `permanent` stood for
  hard, which is what the blacklist counted);
- the last two again over the samples read as bounces only (`..._on_bounces`), leaving out the
  delay notices, whose delayed recipients mailgate does not judge as failures.

Every figure is printed as `RESULT name value`; `--verbose` also lists each disagreement.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

from mailgate.bounceparse import parse_bounce

NOT_FAILURES = {"delivered", "vacation", "feedback"}
_ENGINE_RE = re.compile(r"my \$enginename = '([^']+)'")
_ENTRY_RE = re.compile(r"'(\d+)'\s*=>\s*\[((?:\s*\[[^\]]*\],?)+)\s*\]")
_ROW_RE = re.compile(r"\[\s*'([^']*)',\s*'([^']*)',\s*'([^']*)',\s*(\d)\s*\]")
_FAMILIES_WITHOUT_PREFIX = {"arf", "rfc3464", "rfc3834"}


def expectations(directory: Path) -> dict[str, list[tuple[str, bool]]]:
    """Sample file name -> [(reason, hard), ...] per failed recipient."""
    expected: dict[str, list[tuple[str, bool]]] = {}
    for script in sorted(directory.glob("*.t")):
        text = script.read_text(errors="replace")
        engine = _ENGINE_RE.search(text)
        if not engine:
            continue
        name = engine.group(1).lower()
        prefix = "" if name in _FAMILIES_WITHOUT_PREFIX else ("rhost-" if "-rhost-" in script.name else "lhost-")
        for number, rows in _ENTRY_RE.findall(text):
            expected[f"{prefix}{name}-{int(number):02d}.eml"] = [(r[2], r[3] == "1") for r in _ROW_RE.findall(rows)]
    return expected


def _overlap(ours: list, theirs: list) -> int:
    return sum((Counter(ours) & Counter(theirs)).values())


def measure(samples: Path, expected: dict[str, list[tuple[str, bool]]], verbose: bool) -> dict[str, float]:
    totals = Counter()
    for name, rows in sorted(expected.items()):
        failures = [row for row in rows if row[0] not in NOT_FAILURES]
        path = samples / name
        if not failures or not path.exists():
            continue
        report = parse_bounce(path.read_bytes())
        found = report.recipients if report.is_bounce else report.delayed
        reasons = [r.reason if hasattr(r, "diagnostic") else None for r in found]  # before: no classes
        hards = [bool(getattr(r, "hard", r.permanent)) for r in found]
        totals["samples"] += 1
        totals["detected"] += report.is_bounce or report.kind == "delay"
        totals["strict"] += report.is_bounce
        totals["expected"] += len(failures)
        totals["found"] += len(found)
        totals["matched"] += min(len(found), len(failures))
        totals["reasons"] += _overlap(reasons, [f[0] for f in failures])
        totals["hards"] += _overlap(hards, [f[1] for f in failures])
        if report.is_bounce:
            totals["failed_expected"] += len(failures)
            totals["failed_reasons"] += _overlap(reasons, [f[0] for f in failures])
            totals["failed_hards"] += _overlap(hards, [f[1] for f in failures])
        if verbose and (not found or Counter(reasons) != Counter(f[0] for f in failures)):
            print(f"{name}: expected {[f[0] for f in failures]} {[int(f[1]) for f in failures]}, "
                  f"got {reasons} {[int(h) for h in hards]} bounce={report.is_bounce}")
    return {
        "samples": totals["samples"],
        "detection": totals["detected"] / max(totals["samples"], 1),
        "strict_detection": totals["strict"] / max(totals["samples"], 1),
        "recipient_recall": totals["matched"] / max(totals["expected"], 1),
        "recipient_precision": totals["matched"] / max(totals["found"], 1),
        "reason_agreement": totals["reasons"] / max(totals["expected"], 1),
        "hard_soft_agreement": totals["hards"] / max(totals["expected"], 1),
        "reason_agreement_on_bounces": totals["failed_reasons"] / max(totals["failed_expected"], 1),
        "hard_soft_agreement_on_bounces": totals["failed_hards"] / max(totals["failed_expected"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("samples", type=Path)
    parser.add_argument("expectations", type=Path)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    figures = measure(args.samples, expectations(args.expectations), args.verbose)
    for key, value in figures.items():
        print(f"RESULT {key} {value:.4f}" if isinstance(value, float) else f"RESULT {key} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

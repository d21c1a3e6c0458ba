#!/opt/mailgate/bin/python
"""Summarise a py-spy `--format raw` profile (collapsed stacks): where the samples are.

    pyspy_summary.py PROFILE.txt [--top 25] [--match SUBSTRING]

Prints the share of samples per function, inclusive (the function is anywhere on the stack) and
self (it is the innermost frame), so a profile can be read in a terminal and quoted in a report.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    found = FRAME.match(frame)
    if not found:
        return frame
    path = found.group("file")
    for marker in ("site-packages/", "src/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{found.group('func')} ({path})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", help="only stacks containing this text")
    args = parser.parse_args()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    with open(args.profile) as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            if args.match and args.match not in stack:
                continue
            n = int(count)
            total += n
            frames = [short(f) for f in stack.split(";") if f]
            # the first frame is the thread name ("process ..." / "thread ...") in py-spy raw output
            for frame in set(frames):
                inclusive[frame] += n
            if frames:
                own[frames[-1]] += n
    print(f"{total} samples{' matching ' + repr(args.match) if args.match else ''}")
    print(f"-- inclusive (top {args.top})")
    for frame, n in inclusive.most_common(args.top):
        print(f"{n / total:6.1%}  {frame}")
    print(f"-- self (top {args.top})")
    for frame, n in own.most_common(args.top):
        print(f"{n / total:6.1%}  {frame}")


if __name__ == "__main__":
    main()

"""Summarise py-spy's folded stacks: where the relay's time goes, by function.

    python3 benchmarks/bench_relay.py --only kvgraph --events-per-message 128 --profile p.txt
    python3 benchmarks/profile_summary.py p.txt [--top 25]

Prints each function's share of all samples: "self" (time in the function itself) and "total"
(time with everything it calls), the view a flame graph gives, as text for a closing note.
"""

from __future__ import annotations

import argparse
import collections
import re

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _name(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "kvgraph/", "lib/python3"):
        if marker in path:
            path = path[path.index(marker):]
            break
    return f"{m['func']} ({path})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    self_n: collections.Counter[str] = collections.Counter()
    total_n: collections.Counter[str] = collections.Counter()
    all_n = 0
    with open(args.file) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = [_name(fr) for fr in stack.split(";")]
            frames = [fr for fr in frames if not fr.startswith("process ")]
            all_n += n
            if frames:
                self_n[frames[-1]] += n
            for fr in set(frames):
                total_n[fr] += n
    print(f"{all_n} samples")
    print(f"{'self':>6} {'total':>6}  function")
    for fr, n in self_n.most_common(args.top):
        print(f"{100 * n / all_n:5.1f}% {100 * total_n[fr] / all_n:5.1f}%  {fr}")
    print(f"\nby total (top {args.top}):")
    for fr, n in total_n.most_common(args.top):
        print(f"{100 * n / all_n:5.1f}%  {fr}")


if __name__ == "__main__":
    main()

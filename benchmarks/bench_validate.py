"""Validation speed: a 1,000-node graph in-process, and `kvgraph validate` as a whole process.

    python3 benchmarks/bench_validate.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def big_graph(n: int = 1000) -> str:
    parts = ['[graph]\nname = "big"\n[nodes.src]\ntype = "synthetic"\n']
    parts += [f'[nodes.f{i}]\ntype = "filter"\nkinds = ["stored"]\n' for i in range(n - 2)]
    parts.append('[nodes.sink]\ntype = "null"\n')
    chain = ["src", *(f"f{i}" for i in range(n - 2)), "sink"]
    parts += [f'[[edges]]\nfrom = "{a}"\nto = "{b}"\n' for a, b in zip(chain, chain[1:])]
    return "".join(parts)


def measure() -> dict[str, float]:
    """Median milliseconds: a 1,000-node graph validated in-process, and `kvgraph validate` on
    a small graph as a whole process (interpreter start and imports included)."""
    from kvgraph import validate_text

    text = big_graph()
    validate_text(text)  # warm: imports and compiled validators
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        result = validate_text(text)
        times.append(time.perf_counter() - t0)
    assert result.ok
    # An installed package has its bytecode compiled; an editable checkout under
    # PYTHONDONTWRITEBYTECODE=1 (as on these machines) would recompile kvgraph every run.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "kvgraph")], check=True)
    proc = []
    for _ in range(7):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kvgraph", "validate", "-q",
                        str(ROOT / "graphs" / "demo.toml")], check=True)
        proc.append(time.perf_counter() - t0)
    return {"big_ms": statistics.median(times) * 1e3, "process_ms": statistics.median(proc) * 1e3}


def main() -> None:
    r = measure()
    print(f"validate 1,000-node graph in-process: median {r['big_ms']:.0f} ms")
    print(f"`kvgraph validate graphs/demo.toml` as a process: median {r['process_ms']:.0f} ms "
          "(target < 300 ms)")


if __name__ == "__main__":
    main()

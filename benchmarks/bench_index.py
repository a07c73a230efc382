"""The prefix index at scale: memory per block and query latency at 1M blocks.

    python3 benchmarks/bench_index.py [--blocks 1000000] [--workers 8]

Builds the index through the same calls the ``index`` sink makes (tokens_hash, then store),
from stored events of 4 blocks (block_size 16) chained into 64-block sequences; half of the
sequences on each worker start with one of 32 shared 16-block system prompts. Memory is the
growth of this process's RSS divided by the blocks held. Queries are 1,024-token prompts (64
blocks) drawn from stored sequences, answered by ``index.query`` (tokens_hash + tree walk).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import xxhash  # noqa: E402

from kvgraph.codecs.dynamo import tokens_hash  # noqa: E402
from kvgraph.prefix_index import PrefixIndex  # noqa: E402


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure(blocks: int = 1_000_000, workers: int = 8, queries: int = 2000) -> dict[str, float]:
    """Build an index of ``blocks`` blocks, then time ``queries`` queries; the figures."""
    bs, per_event, seq_blocks = 16, 4, 64
    rng = random.Random(1)
    system = [[rng.randrange(151936) for _ in range(16 * bs)] for _ in range(32)]
    sample: list[list[int]] = []   # a reservoir of stored sequences, for the queries
    n_seq = 0
    gc.collect()
    base = rss_kb()
    idx = PrefixIndex()
    events = 0
    applied_s = 0.0
    while idx.blocks < blocks:
        w = (n_seq % workers, 0)
        if rng.random() < 0.5:
            tokens = rng.choice(system) + [rng.randrange(151936) for _ in range(48 * bs)]
        else:
            tokens = [rng.randrange(151936) for _ in range(seq_blocks * bs)]
        n_seq += 1
        if len(sample) < queries:
            sample.append(tokens)
        elif rng.randrange(n_seq) < queries:
            sample[rng.randrange(queries)] = tokens
        parent = None
        chained = 0
        t0 = time.perf_counter()
        for i in range(0, seq_blocks, per_event):
            chunk = tokens[i * bs:(i + per_event) * bs]
            th = tokens_hash(chunk, bs)
            hashes = []
            for k in range(per_event):  # engine hashes chain, like vLLM's: equal prefixes
                chained = xxhash.xxh3_64_intdigest(th[k].to_bytes(8, "little"), chained)
                hashes.append(chained)
            idx.store(w, parent, hashes, th)
            parent = hashes[-1]
            events += 1
        applied_s += time.perf_counter() - t0
    gc.collect()
    grown = (rss_kb() - base) * 1024
    lat = []
    for tokens in sample:
        t0 = time.perf_counter()
        scores = idx.query_hashes(tokens_hash(tokens, bs))
        lat.append(time.perf_counter() - t0)
        assert scores
    lat.sort()
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6  # noqa: E731
    return {"blocks": idx.blocks, "nodes": idx.nodes, "workers": workers,
            "events_s": events / applied_s, "blocks_s": events * per_event / applied_s,
            "bytes_per_block": grown / idx.blocks, "rss_growth_mb": grown / 2**20,
            "samples": len(sample), "p50_us": p(0.5), "p99_us": p(0.99), "max_us": lat[-1] * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--queries", type=int, default=2000)
    args = ap.parse_args()
    r = measure(args.blocks, args.workers, args.queries)
    print(f"index: {r['blocks']:,} blocks held ({r['nodes']:,} tree nodes) over {r['workers']} "
          f"workers; {r['events_s']:,.0f} stored events/s applied "
          f"({r['blocks_s']:,.0f} blocks/s, tokens_hash included)")
    print(f"memory: {r['bytes_per_block']:.0f} bytes per block held ({r['rss_growth_mb']:.0f} MiB "
          f"RSS growth; includes {r['samples']} sample prompts, about 70 MiB)")
    print(f"query (1,024 tokens = 64 blocks, tokens_hash included): p50 {r['p50_us']:.0f} us, "
          f"p99 {r['p99_us']:.0f} us, max {r['max_us']:.0f} us")


if __name__ == "__main__":
    main()

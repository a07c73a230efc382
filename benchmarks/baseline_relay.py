"""The baseline: a minimal hand-written vLLM ZMQ -> NATS relay, no graph, no runtime.

    python3 benchmarks/baseline_relay.py ZMQ_ENDPOINT NATS_URL SUBJECT

It does the same work as kvgraph's relay graph in the `dynamo-msgpack` format (decode the batch,
normalise hashes, compute Dynamo's tokens_hash, contiguous event ids, 1.6.1 envelopes of up to
128 RouterEvents, no flush per message) with every shortcut a hand-written relay would take:
the ZMQ socket is drained without an await per message, decoding is msgspec without typed
structs, and there is no validation, metrics, backpressure or error port. It exists so that the
benchmark can measure kvgraph's framework overhead against the same work done by hand.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
import time
from array import array

import msgspec
import nats
import xxhash
import zmq
import zmq.asyncio

MASK = (1 << 64) - 1
TIERS = {"GPU": "device", "CPU": "host_pinned", "DISK": "disk"}


def tokens_hash(tokens: list[int], bs: int, seed: int = 1337) -> list[int]:
    n = len(tokens) // bs
    mv = memoryview(array("I", tokens[: n * bs]).tobytes())
    step = bs * 4
    return [xxhash.xxh3_64_intdigest(mv[i:i + step], seed) for i in range(0, n * step, step)]


def engine_socket(endpoint: str) -> zmq.Socket:
    """A SUB socket connected to the engine, subscribed to everything."""
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


async def main(endpoint: str, url: str, subject: str) -> None:
    nc = await nats.connect(url)
    sock = engine_socket(endpoint)
    waiter = zmq.asyncio.Socket.from_socket(sock)
    dec, enc = msgspec.msgpack.Decoder(), msgspec.msgpack.Encoder()
    ids: dict[tuple[int, int], int] = {}
    publisher_id, sequence = secrets.randbits(63), 0
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        routers = []
        while len(routers) < 1024:
            try:
                _, _, payload = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            batch = dec.decode(payload)
            rank = batch[2] if len(batch) > 2 and batch[2] is not None else 0
            for ev in batch[1]:
                tag = ev["type"] if isinstance(ev, dict) else ev[0]
                key = (0, rank)
                ids[key] = eid = ids.get(key, 0) + 1
                if tag == "BlockStored":
                    get = ev.get if isinstance(ev, dict) else None
                    hashes = [h & MASK for h in (get("block_hashes") if get else ev[1])]
                    parent = get("parent_block_hash") if get else ev[2]
                    tokens = get("token_ids") if get else ev[3]
                    medium = (get("medium") if get else None) or "GPU"
                    th = tokens_hash(tokens, 16)
                    data = {"stored": {"parent_hash": None if parent is None else parent & MASK,
                                       "start_position": None,
                                       "blocks": [{"block_hash": b, "tokens_hash": t,
                                                   "mm_extra_info": None}
                                                  for b, t in zip(hashes, th)]}}
                elif tag == "BlockRemoved":
                    hashes = ev.get("block_hashes") if isinstance(ev, dict) else ev[1]
                    medium = "GPU"
                    data = {"removed": {"block_hashes": [h & MASK for h in hashes]}}
                else:
                    medium, data = "GPU", "cleared"
                routers.append({"worker_id": 0, "storage_tier": TIERS.get(medium, "device"),
                                "residency_domain": "worker",
                                "event": {"event_id": eid, "data": data, "dp_rank": rank}})
        if not routers:
            await waiter.poll(100, zmq.POLLIN)
            continue
        now = int(time.time() * 1000)
        for i in range(0, len(routers), 128):
            body = {"publisher_id": publisher_id, "sequence": sequence, "published_at": now,
                    "topic": "kv-events", "payload": enc.encode(routers[i:i + 128])}
            sequence += 1
            await nc.publish(subject, enc.encode(body))
    await nc.flush()
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))

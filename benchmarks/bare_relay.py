"""kvgraph's relay code without kvgraph's runtime: the framework-overhead reference.

    python3 benchmarks/bare_relay.py ZMQ_ENDPOINT NATS_URL SUBJECT

The same functions the ``zmq -> nats`` graph runs (``codecs.vllm.decode_payload``,
``codecs.dynamo.block_hashes_for`` / ``router_event`` / ``EnvelopeWriter``, the same GC
settings as ``kvgraph run``, the same ZMQ draining), called from one hand-written loop: no
graph, no channels, tasks, metrics, acknowledgements, sequence tracking or error ports. The
graph's throughput divided by this one's is what the runtime costs.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import nats
import zmq
from baseline_relay import engine_socket

from kvgraph.cli import _tune_gc
from kvgraph.codecs import dynamo
from kvgraph.codecs.vllm import decode_payload, split_frames
from kvgraph.proto.zmq import Readable


async def main(endpoint: str, url: str, subject: str) -> None:
    _tune_gc()  # first, as kvgraph run does: its full collection must not delay any event
    nc = await nats.connect(url)
    sock = engine_socket(endpoint)
    readable = Readable([sock])
    ids, envelope = dynamo.EventIds(), dynamo.EnvelopeWriter()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    recv = sock.recv
    while not stop.is_set():
        routers = []
        while len(routers) < 1024:
            try:
                frame = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            frames = [frame.bytes]
            while frame.more:
                frame = recv(zmq.NOBLOCK, copy=False)
                frames.append(frame.bytes)
            _, seq, payload = split_frames(frames)
            for e in decode_payload(payload, 0, seq)[2]:
                hashes = dynamo.block_hashes_for(e, 16) if e.kind == "stored" else None
                routers.append(dynamo.router_event(e, ids.next(e.worker_id, e.dp_rank), 16,
                                                   True, hashes))
        if not routers:
            await readable.wait(0.01)
            continue
        now = int(time.time() * 1000)
        for i in range(0, len(routers), dynamo.MAX_EVENTS_PER_ENVELOPE):
            await nc.publish(subject, envelope.encode(
                routers[i:i + dynamo.MAX_EVENTS_PER_ENVELOPE], now))
    await nc.flush()
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))

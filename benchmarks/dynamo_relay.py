"""Dynamo's own vLLM ZMQ -> NATS relay (ai-dynamo-runtime's KvEventPublisher, Rust), for the
side-by-side benchmark.

    python3 benchmarks/dynamo_relay.py ZMQ_ENDPOINT NATS_URL

The publisher subscribes to the engine's ZMQ PUB and publishes Dynamo 1.6.1 event-plane
envelopes on ``namespace.bench.component.backend.endpoint.generate.kv-events``. With
discovery ``mem`` and a NATS event plane it needs no etcd. ``pip install ai-dynamo-runtime``
(about 75 MB) to include it; the benchmark says so and skips it when it is absent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

SUBJECT = "namespace.bench.component.backend.endpoint.generate.kv-events"


async def main(endpoint: str, url: str) -> None:
    os.environ["NATS_SERVER"] = url
    from dynamo._core import DistributedRuntime, KvEventPublisher

    loop = asyncio.get_running_loop()
    runtime = DistributedRuntime(loop, "mem", "tcp", event_plane="nats")
    publisher = KvEventPublisher(runtime.endpoint("bench.backend.generate"), worker_id=0,
                                 kv_block_size=16, zmq_endpoint=endpoint)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    publisher.shutdown()
    runtime.shutdown()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:3]))

"""Dynamo 1.6.1's own processes, for tests that use Dynamo as the oracle (the
``ai-dynamo-runtime`` wheel). Each runs in a process of its own (a DistributedRuntime holds its
event loop and threads), found through the discovery the environment names (``DYN_FILE_KV``, or
``ETCD_ENDPOINTS`` with ``--discovery etcd``):

    python tests/dynamo_procs.py worker [--publish ZMQ_ENDPOINT] [--block-size N]
        A worker serving dynamo/backend/generate with a model card (what a router needs to
        know a worker). Prints {"instance_id": N} once registered. With --publish, it also runs
        Dynamo's own KvEventPublisher reading a vLLM engine's ZMQ stream. Ends at stdin EOF.

    python tests/dynamo_procs.py router [--block-size N]
        A KvRouter on that endpoint. Prints {"ready": true}; then reads JSON lists of token ids
        from stdin, one a line, and answers each with {"worker_id": device_blocks, ...}
        (get_overlap_scores), one a line.

    python tests/dynamo_procs.py publisher --worker-id N [--block-size N]
        Dynamo's own KvEventPublisher for worker N with the Python API; reads JSON lines
        {"stored": [token_ids, block_hashes, parent]} / {"removed": [hashes]} from stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

ENDPOINT = "dynamo.backend.generate"


async def _stdin_lines():
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        yield line


def _runtime(args):
    from dynamo._core import DistributedRuntime

    kwargs = {"event_plane": args.event_plane} if args.event_plane else {}
    return DistributedRuntime(asyncio.get_running_loop(), args.discovery, "tcp", **kwargs)


async def worker(args) -> None:
    from dynamo._core import KvEventPublisher
    from dynamo.llm import ModelInput, ModelType, WorkerType, register_model

    runtime = _runtime(args)
    endpoint = runtime.endpoint(ENDPOINT)

    async def generate(request, context=None):
        yield {"token_ids": []}

    serving = asyncio.ensure_future(endpoint.serve_endpoint(generate))
    await register_model(ModelInput.Tokens, ModelType.Chat, endpoint, "kvgraph-test",
                         worker_type=WorkerType.Aggregated, kv_cache_block_size=args.block_size,
                         skip_model_assets=True)
    publisher = None
    if args.publish:
        publisher = KvEventPublisher(endpoint, kv_block_size=args.block_size,
                                     zmq_endpoint=args.publish)
    print(json.dumps({"instance_id": endpoint.connection_id()}), flush=True)
    async for _ in _stdin_lines():
        pass
    if publisher is not None:
        publisher.shutdown()
    serving.cancel()
    runtime.shutdown()


async def router(args) -> None:
    from dynamo._core import KvRouter, KvRouterConfig

    runtime = _runtime(args)
    kv_router = KvRouter(runtime.endpoint(ENDPOINT), args.block_size, KvRouterConfig())
    print(json.dumps({"ready": True}), flush=True)
    async for line in _stdin_lines():
        scores = await kv_router.get_overlap_scores(json.loads(line))
        print(json.dumps({str(w["worker_id"]): w["device_blocks"] for w in scores["workers"]}),
              flush=True)
    runtime.shutdown()


async def publisher(args) -> None:
    from dynamo._core import KvEventPublisher

    runtime = _runtime(args)
    pub = KvEventPublisher(runtime.endpoint(ENDPOINT), worker_id=args.worker_id,
                           kv_block_size=args.block_size)
    print(json.dumps({"ready": True}), flush=True)
    async for line in _stdin_lines():
        msg = json.loads(line)
        if "stored" in msg:
            tokens, hashes, parent = msg["stored"]
            pub.publish_stored(tokens, [args.block_size] * len(hashes), hashes, parent)
        else:
            pub.publish_removed(msg["removed"])
        print(json.dumps({"published": True}), flush=True)
    pub.shutdown()
    runtime.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["worker", "router", "publisher"])
    ap.add_argument("--publish", default="")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--worker-id", type=int, default=0)
    ap.add_argument("--discovery", default="file", choices=["file", "etcd"])
    ap.add_argument("--event-plane", default="", choices=["", "zmq", "nats"])
    args = ap.parse_args()
    os.environ.setdefault("DYN_LOG", "warn")
    asyncio.run({"worker": worker, "router": router, "publisher": publisher}[args.role](args))


if __name__ == "__main__":
    main()

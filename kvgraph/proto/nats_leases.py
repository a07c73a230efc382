"""Partitions of a stream shared by the members of a consumer group, through leases in a NATS
KV bucket (for the ``nats`` source's ``group``).

Why leases in a KV bucket, not NATS 2.11's consumer priority groups (``pinned_client``):
nats-py, the client kvgraph uses, has no API for priority groups (pull requests with a group
and a pin id); leases need only the KV API every NATS 2.9+ server and client have, and they
give what a pin gives: one reader per partition at a time, and a takeover within a bounded
time when the reader dies.

* The bucket's ``ttl`` is the lease: a key the server has not seen written for ``lease_s``
  is gone. Nothing depends on the members' clocks.
* A member announces itself with a key ``member.GROUP.ID`` and renews it every third of the
  lease; the live members are the keys there.
* Partition ``P`` belongs to whoever holds ``lease.GROUP.P``: taken with ``create`` (only if
  absent), renewed with ``update`` at the revision last written (a compare-and-set: a member
  whose lease was lost, or taken, finds out at once and stops reading that partition).
* Each member takes free partitions up to its fair share, ``ceil(partitions / members)``;
  one that holds more than its share (a member joined) gives the extra back once what it read
  from it is settled, so that two members never read one partition at once.

The member that takes a partition also fences it (see the ``nats`` source): whatever the last
reader received but did not acknowledge is delivered again, in stream order, before anything
newer. A member that stalls longer than the lease loses its partitions to that fence.
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Mapping

LEASE_PREFIX, MEMBER_PREFIX = "lease", "member"


async def open_bucket(js: Any, config: Mapping[str, Any], log: Any = None) -> Any:
    """The KV bucket of the leases (``lease_bucket``); created with a ``ttl`` of ``lease_s``
    when missing. Tried again while JetStream does not answer (a cluster electing a leader)."""
    from nats.js.api import KeyValueConfig
    from nats.js.errors import BucketNotFoundError, NotFoundError

    from .nats import while_electing

    bucket = config["lease_bucket"]
    try:
        return await while_electing(lambda: js.key_value(bucket), config, log)
    except (BucketNotFoundError, NotFoundError):
        pass
    kv_config = KeyValueConfig(bucket=bucket, ttl=config["lease_s"], history=1,
                               replicas=config["replicas"])
    try:
        return await while_electing(lambda: js.create_key_value(kv_config), config, log)
    except Exception as exc:
        if "already in use" in str(exc):   # another member created it meanwhile
            return await js.key_value(bucket)
        raise


class Leases:
    """One member's view of the group: which partitions it holds (:attr:`owned`).

    Call :meth:`tick` every ``lease_s / 3``; it renews, takes and gives back, and returns
    (taken, lost, to_release): partitions to start reading, to stop reading at once, and to
    stop reading and :meth:`release` once settled."""

    def __init__(self, kv: Any, group: str, partitions: int, member: str | None = None):
        self.kv, self.group, self.partitions = kv, group, partitions
        self.member = member or uuid.uuid4().hex[:12]
        self.owned: dict[int, int] = {}   # partition -> the revision we last wrote
        self.members = 1
        self._member_rev: int | None = None

    def _lease(self, p: int) -> str:
        return f"{LEASE_PREFIX}.{self.group}.{p}"

    async def _heartbeat(self) -> None:
        key = f"{MEMBER_PREFIX}.{self.group}.{self.member}"
        try:
            self._member_rev = await (self.kv.update(key, b"1", last=self._member_rev)
                                      if self._member_rev else self.kv.create(key, b"1"))
        except Exception:
            self._member_rev = await self.kv.put(key, b"1")
        prefix = f"{MEMBER_PREFIX}.{self.group}."
        try:   # all keys, filtered here (nats-py warns at each call given filters)
            keys = [k for k in await self.kv.keys() if k.startswith(prefix)]
        except Exception:   # nats-py raises when there is no key at all
            keys = []
        self.members = max(1, len(keys))

    async def tick(self) -> tuple[list[int], list[int], list[int]]:
        from nats.js.errors import KeyWrongLastSequenceError

        await self._heartbeat()
        lost: list[int] = []
        for p, rev in list(self.owned.items()):
            try:
                self.owned[p] = await self.kv.update(self._lease(p), self.member.encode(),
                                                     last=rev)
            except KeyWrongLastSequenceError:
                del self.owned[p]   # expired and taken, or deleted: not ours any more
                lost.append(p)
        fair = math.ceil(self.partitions / self.members)
        taken: list[int] = []
        for p in range(self.partitions):
            if len(self.owned) >= fair:
                break
            if p in self.owned:
                continue
            try:
                self.owned[p] = await self.kv.create(self._lease(p), self.member.encode())
            except KeyWrongLastSequenceError:
                continue   # someone holds it
            taken.append(p)
        extra = sorted(self.owned)[fair:] if len(self.owned) > fair else []
        return taken, lost, extra

    async def release(self, p: int) -> None:
        """Give partition ``p`` back (its reads are settled): another member may take it."""
        rev = self.owned.pop(p, None)
        if rev is not None:
            try:
                await self.kv.delete(self._lease(p), last=rev)
            except Exception:
                pass   # it expires anyway

    async def leave(self) -> None:
        """Give everything back and say goodbye: the others take over at once."""
        for p in list(self.owned):
            await self.release(p)
        try:
            await self.kv.delete(f"{MEMBER_PREFIX}.{self.group}.{self.member}")
        except Exception:
            pass

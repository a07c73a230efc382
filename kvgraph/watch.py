"""``kvgraph run --watch``: apply the graph file again whenever it changes.

The watch polls ``os.stat`` of the path as given, every ``interval`` seconds. Polling, not
inotify, on purpose: ``stat`` follows symlinks, so a file replaced by a symlink swap (how
Kubernetes updates a mounted ConfigMap: ``..data`` is re-pointed to a new directory) shows as
a new inode, where an inotify watch on the old file sees nothing (vectordotdev/vector#15514).
Editors that save by writing a new file and renaming it over the old are seen the same way.

Debounced: once the file looks different (device, inode, size or mtime), the watch waits
until it has looked the same for ``settle`` seconds (an editor or ``kubectl cp`` may write it
in several steps) and then reads it; a text equal to the last one applied is no change. A
file that is missing for a moment (between the steps of a swap) is waited for, and said once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from typing import Awaitable, Callable

log = logging.getLogger("kvgraph")

#: How often the file is looked at, and how long it must stay the same before it is read.
WATCH_INTERVAL_S = 0.5
WATCH_SETTLE_S = 0.5

Signature = tuple[int, int, int, int]


def signature(path: str) -> Signature | None:
    """What changes when the file (or what a symlink points to) changes; None: missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def watch(path: str, apply: Callable[[str], Awaitable[object]], applied_text: str,
                interval: float = WATCH_INTERVAL_S, settle: float = WATCH_SETTLE_S) -> None:
    """Call ``apply(text)`` with each new version of ``path`` until cancelled.
    ``applied_text``: the version running now."""
    last_digest = digest(applied_text)
    seen = signature(path)
    missing_said = False
    while True:
        await asyncio.sleep(interval)
        now = signature(path)
        if now is None:
            if not missing_said:
                log.warning("--watch: %s is missing; waiting for it to come back", path)
                missing_said = True
            seen = None
            continue
        if now == seen:
            continue
        # changed: wait until it stays the same for `settle` seconds
        stable_since = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(min(interval, settle))
            again = signature(path)
            if again != now:
                now, stable_since = again, asyncio.get_running_loop().time()
                continue
            if asyncio.get_running_loop().time() - stable_since >= settle:
                break
        if now is None:
            continue
        seen, missing_said = now, False
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            log.error("--watch: cannot read %s: %s; the running graph is unchanged", path, exc)
            continue
        d = digest(text)
        if d == last_digest:
            continue
        last_digest = d   # a version is tried once; an invalid one is not tried again
        await apply(text)

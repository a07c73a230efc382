"""``kvgraph top URL...``: the live view of graphs running elsewhere, from their ``/metrics``.

Each URL is a ``kvgraph run --metrics-port`` endpoint (``http://host:9464``; ``/metrics`` is
added when the path is empty). With several (the workers of ``--workers N`` serve P, P+1, ...),
the same node's figures add up. Warnings come from each endpoint's ``/warnings``. A URL that
does not answer is shown as such and retried every refresh; ``--once`` prints the view once
(for scripts and tests) and exits 1 when no URL answered.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def _metrics_url(url: str) -> str:
    if "://" not in url:
        url = "http://" + url
    path = url.partition("://")[2].partition("/")[2]
    return url if path else url.rstrip("/") + "/metrics"


def _fetch(url: str, timeout: float) -> tuple[str | None, list[dict[str, Any]], str]:
    """(metrics page or None, warnings, error text) of one endpoint."""
    page_url = _metrics_url(url)
    try:
        with urllib.request.urlopen(page_url, timeout=timeout) as r:
            page = r.read().decode()
    except (OSError, urllib.error.URLError) as exc:
        return None, [], f"{page_url}: {getattr(exc, 'reason', exc)}"
    warnings: list[dict[str, Any]] = []
    try:
        root = page_url.rsplit("/", 1)[0]
        with urllib.request.urlopen(root + "/warnings", timeout=timeout) as r:
            warnings = json.loads(r.read()).get("warnings", [])
    except (OSError, ValueError, urllib.error.URLError):
        pass   # an older kvgraph, or no warnings endpoint: the view goes without
    return page, warnings, ""


def gather(urls: list[str], timeout: float = 2.0) -> tuple[Any, list[str]]:
    """One snapshot of every URL, combined; and the errors of those that did not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    from .live import Warning_, snapshot, warnings_from_json

    families: list[Any] = []
    warnings: list[Any] = []
    errors: list[str] = []
    for url in urls:
        page, warns, err = _fetch(url, timeout)
        if page is None:
            errors.append(err)
            continue
        families += list(text_string_to_metric_families(page))
        warnings += warnings_from_json(warns)
    warnings.sort(key=lambda w: -w.last)
    for err in errors:
        now = time.time()
        warnings.insert(0, Warning_(f"no answer: {err}", "ERROR", now, now))
    title = ", ".join(urls) if len(urls) <= 2 else f"{len(urls)} endpoints"
    return snapshot(families, title, warnings[:8]), errors


async def run(urls: list[str], interval: float, once: bool) -> int:
    from rich.console import Console
    from rich.live import Live

    from .live import render

    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)
    footer = "Ctrl-C quits; the graphs go on"
    snap, errors = await asyncio.to_thread(gather, urls)
    if once:
        console.print(render(snap, None, footer))
        return 1 if len(errors) == len(urls) else 0
    prev = None
    with Live(console=console, auto_refresh=False, screen=False) as live:
        while True:
            live.update(render(snap, prev, footer), refresh=True)
            prev = snap
            await asyncio.sleep(interval)
            snap, errors = await asyncio.to_thread(gather, urls)

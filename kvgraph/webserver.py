"""kvgraph's HTTP servers (the metrics endpoint, the ``index`` node's API) on aiohttp.

One place that starts an aiohttp application on a host and port and stops it: keep-alive,
HEAD, ``Expect: 100-continue``, bounded request lines and headers (8 KiB each) come from
aiohttp; no access log (the metrics say what was asked).
"""

from __future__ import annotations

from typing import Any


class WebServer:
    """A running aiohttp application; ``port`` is the one it got (0 asks for a free one)."""

    def __init__(self, runner: Any, port: int):
        self._runner, self.port = runner, port

    async def close(self) -> None:
        await self._runner.cleanup()


async def serve(app: Any, host: str, port: int) -> WebServer:
    """Listen; OSError (a taken port) leaves nothing behind."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return WebServer(runner, runner.addresses[0][1])


def application(client_max_size: int = 1024 * 1024, **kwargs: Any) -> Any:
    """An aiohttp Application with kvgraph's bounds on request lines and headers."""
    from aiohttp import web

    return web.Application(client_max_size=client_max_size,
                           handler_args={"max_field_size": 8190, "max_line_size": 8190},
                           **kwargs)

"""HEAD and OPTIONS wherever GET works: HEAD runs the GET and drops its body; OPTIONS answers with `Allow`."""

from __future__ import annotations

from starlette.routing import Match, Mount, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadOptionsMiddleware:
    """Monitors probe with HEAD and clients ask OPTIONS; FastAPI routes answer only the methods they declare.

    HEAD: the request goes on as a GET and the response keeps its status and headers (Content-Length included)
    but sends no body. OPTIONS: 204 with the methods the path's routes take, plus HEAD and OPTIONS where GET is
    one of them; 404 for a path no route takes. CORS preflights are answered before this, by CORSMiddleware."""

    def __init__(self, app: ASGIApp, router: Router):
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        allowed = self._allowed(scope)
        if scope["method"] == "OPTIONS":
            status = 204 if allowed else 404
            headers = [(b"allow", ", ".join(sorted(allowed)).encode())] if allowed else []
            await send(
                {"type": "http.response.start", "status": status, "headers": [*headers, (b"content-length", b"0")]}
            )
            await send({"type": "http.response.body", "body": b""})
            return
        if "GET" not in allowed:
            await self.app(scope, receive, send)  # the router answers 405 (or 404) as for any other method
            return

        async def bodiless_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # swallow the streamed parts; the last (empty) one ends the response
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, bodiless_send)

    def _allowed(self, scope: Scope) -> set[str]:
        """The methods some route takes at this path: each asked of the router as a request of that method would."""
        methods: set[str] = set()
        for route in self.router.routes:
            if isinstance(route, Mount):  # static files: GET and HEAD, whatever the path under them
                if route.matches({**scope, "method": "GET"})[0] != Match.NONE:
                    methods |= {"GET", "HEAD"}
                continue
            for method in _METHODS - methods:
                if route.matches({**scope, "method": method})[0] == Match.FULL:
                    methods.add(method)
        if "GET" in methods:
            methods.add("HEAD")
        return methods | {"OPTIONS"} if methods else set()


_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})

"""GET /ui: the auditors' web page, static files that call the JSON API with the auditor's own key.

The files need no key, like /docs, because the page contains no data until
the API, which checks the key and its scopes, returns some.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse

from server.errors import ApiError

router = APIRouter(include_in_schema=False)

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Every file the page consists of, by name; nothing else under /ui/ is served.
ASSETS = {path.name: path for path in sorted(UI_DIR.iterdir()) if path.suffix in MEDIA_TYPES}

# The page loads only its own files and talks only to this server, and runs no inline script,
# so an injected script could neither run nor send the key elsewhere.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


@router.get("/ui")
async def ui_redirect(request: Request) -> RedirectResponse:
    # A relative Location keeps the prefix the browser used (TRACEHEAD_ROOT_PATH or a gateway's),
    # and the trailing slash makes the page's relative URLs resolve under /ui/.
    query = request.url.query
    return RedirectResponse("ui/" + (f"?{query}" if query else ""), status_code=307)


@router.get("/ui/")
async def ui_page() -> FileResponse:
    return _asset("index.html")


@router.get("/ui/{name}")
async def ui_asset(name: str) -> FileResponse:
    return _asset(name)


def _asset(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise ApiError(404, f"the web page has no file {name[:80]!r}; open /ui/", type="not_found_error",
                       param="name", code="not_found")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)

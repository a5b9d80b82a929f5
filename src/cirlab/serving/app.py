"""The HTTP API and web page over a SearchService (FastAPI; `cirlab serve` runs it under uvicorn).

Routes: `POST /search` (multipart: `image` file or `image_id`, `text`, optional `k`, `filter` (a JSON object over
the items' metadata), `more` and `less` (comma-separated ids: feedback)), `GET /images/{id}`; `POST /sessions`,
`POST /sessions/{id}/turns` (multipart: `text`; an `image` or `image_id` to start from, or `choose`, one of the last
turn's results, or neither: the last turn's top result; `k`, `filter`) and `GET /sessions/{id}`
(serving/session.py); `GET /items` (browse: `offset`, `limit`), `POST /items` (optional `metadata`, a JSON object)
and `DELETE /items/{id}` (bearer key), `GET /health`, the page at `/` and OpenAPI docs at `/docs`. Every error is
JSON `{"error": "..."}` with a 4xx status; a form POST without a Content-Length (a chunked body) gets 411 before
anything is read; a body whose declared length exceeds the upload limit gets 413, read away first when it is at
most twice the limit (so a client that sends the whole body before reading still receives the answer). Searches,
turns and additions run in a bounded set of worker threads with a bounded queue and a time limit (serving/work.py:
503 when full or late), so `/health` answers while the model works.
"""
from __future__ import annotations

from fastapi import FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from cirlab.serving.page import FAVICON, PAGE
from cirlab.serving.service import SearchService, ServiceError
from cirlab.serving.work import BoundedWork, Busy

BODY_OVERHEAD = 64 * 1024  # multipart framing and the form's other fields


async def _read(upload: UploadFile | None, service: SearchService) -> bytes | None:
    """The upload's bytes, reading at most one byte over the limit (so a lying client cannot fill memory)."""
    if upload is None:
        return None
    data = await upload.read(service.max_upload_bytes + 1)
    if len(data) > service.max_upload_bytes:
        raise ServiceError(413, f"the upload is over the limit of {service.max_upload_bytes:,} bytes")
    return data


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # the page's own inline script and style, images from this origin and the upload preview (blob:)
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; script-src 'self' 'unsafe-inline'; "
                               "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
}


def create_app(service: SearchService, cors_origins: tuple = (), allowed_hosts: tuple = (),
               work: BoundedWork | None = None) -> FastAPI:
    """The app. CORS is off unless `cors_origins` lists the origins whose pages may call the API; `allowed_hosts`,
    when given, refuses requests whose Host header names another host (DNS rebinding); every answer carries the
    standard security headers (SECURITY_HEADERS); the model's work runs within `work`'s bounds (default
    BoundedWork())."""
    work = work or BoundedWork()
    app = FastAPI(title="cirlab", description="Composed image retrieval: a reference image plus a text that says "
                                              "what to change.", version="1")
    _add_middleware(app, cors_origins, allowed_hosts)
    _add_error_handlers(app)
    _add_body_limits(app, service)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return PAGE

    @app.get("/health")
    def health():
        return service.health() | {"work": work.health()}

    @app.post("/search")
    async def search(text: str = Form(""), k: str = Form("10"), image_id: str | None = Form(None),
                     image: UploadFile | None = File(None), filter: str | None = Form(None),
                     more: str | None = Form(None), less: str | None = Form(None)):
        data = await _read(image, service)  # the model's work runs in a worker thread: the loop keeps answering
        return await work.run(service.search, text, data, image_id or None, k, filter, more, less)

    _add_session_routes(app, service, work)
    _add_item_routes(app, service, work)
    return app


def _add_middleware(app: FastAPI, cors_origins: tuple, allowed_hosts: tuple) -> None:
    """CORS for the listed origins only, the Host check when hosts are listed, and the security headers on every
    answer."""
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization"])
    if allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response


def _add_item_routes(app: FastAPI, service: SearchService, work: BoundedWork) -> None:
    """The gallery: its images, a page of its items, and (with the token) adding and removing one."""
    @app.get("/images/{item_id}")
    def get_image(item_id: str):
        return FileResponse(service.image_path(item_id))

    @app.get("/items")
    def items(offset: int = 0, limit: int = 60):
        return service.items(offset, limit)

    @app.post("/items", status_code=201)
    async def add_item(image: UploadFile = File(...), id: str | None = Form(None), metadata: str | None = Form(None),
                       authorization: str | None = Header(None)):
        service.authorise(authorization)
        return await work.run(service.add, await _read(image, service), id or None, metadata)

    @app.delete("/items/{item_id}")
    def delete_item(item_id: str, authorization: str | None = Header(None)):
        service.authorise(authorization)
        return service.remove(item_id)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error a JSON `{"error": ...}`: the service's own with its status (503s with Retry-After), HTTP and
    validation errors, and anything else a 500 that names only the exception's type."""
    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError):
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else None
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception):  # logged by the server; the client gets one JSON line
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server's log has the details"},
                            status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
                 for e in exc.errors()]
        return JSONResponse({"error": "; ".join(parts)}, status_code=422)


def _add_body_limits(app: FastAPI, service: SearchService) -> None:
    """Form POSTs: multipart or urlencoded only (415), a Content-Length required (411), the upload limit (413)."""
    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        form = request.method == "POST" and (request.url.path in ("/search", "/items")
                                             or request.url.path.endswith("/turns"))
        kind = request.headers.get("content-type", "")
        if form and not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            return JSONResponse({"error": f"POST {request.url.path} takes multipart/form-data (fields: image or "
                                          "image_id, text, k), not " + (kind.split(";")[0] or "an empty body")},
                                status_code=415)
        length = request.headers.get("content-length")
        if form and (length is None or not length.isdigit()):  # a chunked body could stream past every limit
            return JSONResponse({"error": f"POST {request.url.path} needs a Content-Length header (chunked bodies "
                                          "are refused)"}, status_code=411)
        limit = service.max_upload_bytes + BODY_OVERHEAD
        if length is not None and length.isdigit() and int(length) > limit:
            if int(length) <= 2 * limit:  # read it away, so a client that sends it all first still gets the 413
                async for _ in request.stream():
                    pass
            return JSONResponse({"error": f"the request body has {int(length):,} bytes, over the upload limit "
                                          f"of {service.max_upload_bytes:,}"}, status_code=413)
        return await call_next(request)


def _add_session_routes(app: FastAPI, service: SearchService, work: BoundedWork) -> None:
    """Sessions (POST /sessions, POST /sessions/{id}/turns, GET /sessions/{id}), the metadata keys the page's
    filters offer, and the favicon."""
    @app.post("/sessions", status_code=201)
    def create_session():
        return service.create_session()

    @app.post("/sessions/{sid}/turns")
    async def session_turn(sid: str, text: str = Form(""), k: str = Form("10"), image_id: str | None = Form(None),
                           image: UploadFile | None = File(None), choose: str | None = Form(None),
                           filter: str | None = Form(None), more: str | None = Form(None),
                           less: str | None = Form(None)):
        data = await _read(image, service)
        return await work.run(service.session_turn, sid, text, data, image_id or None, choose or None, k,
                                       filter, more, less)

    @app.get("/metadata")
    def metadata():
        return service.metadata_keys()

    @app.get("/favicon.svg", include_in_schema=False)
    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(FAVICON, media_type="image/svg+xml")

    @app.get("/sessions/{sid}")
    def get_session(sid: str):
        return service.get_session(sid)

"""The local web app: a Starlette application around one model (``make_app``) and a server on a
socket bound to localhost (``serve``). JavaScript and CSS are shipped in ``static/`` (no CDN).

Endpoints (JSON; an error is ``{"error": message}`` with status 400/404/500, shown on the page):
``GET /api/info``, ``POST /api/trace``, ``GET /api/value/{label}?prompt=``, ``POST /api/search``,
``POST /api/generate``, ``POST /api/interventions/parse`` (validate a JSON file's content).
The model is used by one request at a time (a lock); every request runs with observation hooks
added for that call only and with interventions enabled inside ``tl_plugins.enabled`` (so a
request never leaves a hook or a plugin behind, also on error). The value index is loaded or built
in a background thread at start; ``/api/info`` reports its progress.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from tl_embedspace.debugger.model import debug_weights, parse_unit, resolve_tokens, token_strs

STATIC = Path(__file__).parent / "static"


class BadRequest(Exception):
    pass


class DebuggerState:
    """The model, its index (loaded in the background) and a lock serialising model use."""

    def __init__(self, model: Any, name: str = "model", *, index: Any = "build", index_options=None):
        self.model = model
        self.name = name
        self.lock = threading.Lock()
        self.index = None
        self.index_error: Optional[str] = None
        self.index_progress = [0, 0]
        self.dw = debug_weights(model)
        if index == "build":
            threading.Thread(target=self._load_index, kwargs=index_options or {}, daemon=True).start()
        elif index is not None:
            self.index = index
            self.index_progress = [index.n_values, index.n_values]

    def _load_index(self, **options):
        from tl_embedspace.debugger.index import ValueIndex

        def prog(done, total):
            self.index_progress = [done, total]

        try:
            with self.lock:
                self.index = ValueIndex.load(self.model, progress=False, progress_fn=prog, **options)
            self.index_progress = [self.index.n_values, self.index.n_values]
        except Exception as exc:  # noqa: BLE001 - shown on the page
            self.index_error = f"{type(exc).__name__}: {exc}"


def _int(body: dict, key: str, default: Any, lo: int, hi: int) -> int:
    v = body.get(key, default)
    try:
        if isinstance(v, bool):
            raise ValueError
        v = int(v)
    except (TypeError, ValueError):
        raise BadRequest(f"{key}: got {body.get(key)!r}; accepted: an int in [{lo}, {hi}]") from None
    if not lo <= v <= hi:
        raise BadRequest(f"{key}: got {v}; accepted: an int in [{lo}, {hi}]")
    return v


def _prompt(body: dict) -> str:
    p = body.get("prompt")
    if not isinstance(p, str) or not p.strip():
        raise BadRequest("prompt: empty; type a prompt")
    return p


def _opt_token(body: dict, key: str) -> Any:
    v = body.get(key)
    if v is None or (isinstance(v, str) and v == ""):
        return None
    return v


def make_app(state: DebuggerState):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from tl_embedspace.debugger import steer
    from tl_embedspace.debugger.trace import coefficients, trace

    def err(status: int, msg: str) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status)

    async def run(fn, *args):
        def locked():
            with state.lock:
                return fn(*args)
        try:
            return JSONResponse(await asyncio.to_thread(locked))
        except BadRequest as exc:
            return err(400, str(exc))
        except (ValueError, IndexError, KeyError, TypeError) as exc:
            return err(400, str(exc).strip("'\""))
        except Exception as exc:  # noqa: BLE001 - the page shows it instead of going blank
            traceback.print_exc()
            return err(500, f"{type(exc).__name__}: {exc}")

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            raise BadRequest("request body: not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("request body: a JSON object expected")
        return body

    async def index_page(request):
        return FileResponse(STATIC / "index.html")

    async def info(request):
        be = state.dw.backend
        return JSONResponse({"model": state.name, "backend": be.name, "n_layers": be.n_layers,
                             "d_mlp": be.d_mlp, "n_heads": be.n_heads, "d_vocab": be.d_vocab,
                             "weights": state.dw.processing,
                             "index": {"ready": state.index is not None, "error": state.index_error,
                                       "done": state.index_progress[0], "total": state.index_progress[1]}})

    async def api_trace(request):
        try:
            body = await body_of(request)
            prompt = _prompt(body)
            k = _int(body, "k", 10, 1, 100)
            pos = _int(body, "position", -1, -100000, 100000)
        except BadRequest as exc:
            return err(400, str(exc))

        def work():
            t0 = time.perf_counter()
            r = trace(state.model, prompt, position=pos, target=_opt_token(body, "target"),
                      contrast=_opt_token(body, "contrast"), k=k, index=state.index)
            d = r.to_dict()
            d["seconds"] = time.perf_counter() - t0
            return d
        return await run(work)

    async def api_value(request):
        label = request.path_params["label"]
        prompt = request.query_params.get("prompt") or None

        def work():
            layer, unit = parse_unit(label)
            from tl_embedspace.debugger.model import check_unit

            check_unit(state.dw.backend, layer, unit)
            if state.index is None:
                raise BadRequest("the value index is still being built; try again when the progress bar is full")
            d = state.index.value(layer, unit, n=20)
            if prompt:
                c = coefficients(state.model, prompt, layer)[:, unit]
                ids = state.dw.backend.to_tokens(prompt)[0].tolist()
                d["activations"] = [{"token": t, "coefficient": float(x)}
                                    for t, x in zip(token_strs(state.dw.backend, ids), c.tolist())]
            return d
        return await run(work)

    async def api_search(request):
        try:
            body = await body_of(request)
        except BadRequest as exc:
            return err(400, str(exc))

        def work():
            if state.index is None:
                raise BadRequest("the value index is still being built; try again when the progress bar is full")
            raw = body.get("tokens")
            if isinstance(raw, str):
                raw = [t for t in raw.split("|") if t != ""]
            if isinstance(raw, list):
                from tl_embedspace.projections import from_visible

                raw = [from_visible(t) if isinstance(t, str) else t for t in raw]
            if not raw:
                raise BadRequest("tokens: none given; separate tokens with |, e.g. ' Paris| London'")
            k = _int(body, "k", 20, 1, 500)
            mode = body.get("mode", "tokens")
            t0 = time.perf_counter()
            if mode == "tokens":
                df = state.index.search(raw, k=k)
            elif mode == "concept":
                df = state.index.concept(raw, k=k)
            else:
                raise BadRequest(f"mode: got {mode!r}; accepted: tokens, concept")
            ms = (time.perf_counter() - t0) * 1e3
            rows = df.to_dict(orient="records")
            for r in rows:
                r["top_tokens"] = token_strs(state.dw.backend, state.index.promoted(r["layer"], r["unit"], 1.0, 8))
                for key, v in list(r.items()):
                    if hasattr(v, "item"):
                        r[key] = v.item()
            return {"tokens": [token_strs(state.dw.backend, [i])[0] for i in
                               resolve_tokens(state.dw.backend, raw, "tokens")], "rows": rows, "ms": ms}
        return await run(work)

    async def api_generate(request):
        try:
            body = await body_of(request)
            prompt = _prompt(body)
            n = _int(body, "max_new_tokens", 20, 1, 256)
        except BadRequest as exc:
            return err(400, str(exc))

        def work():
            ivs = steer.SteerConfig(body.get("interventions") or []).interventions
            steer.install(state.model, steer.SteerConfig(ivs), state.dw.backend)  # validate early
            out = steer.generate(state.model, prompt, ivs, max_new_tokens=n)
            out["interventions"] = [iv.to_dict() for iv in ivs]
            return out
        return await run(work)

    async def api_parse(request):
        try:
            body = await body_of(request)
        except BadRequest as exc:
            return err(400, str(exc))

        def work():
            cfg = steer.SteerConfig(body.get("interventions", body.get("items", [])))
            steer.install(state.model, cfg, state.dw.backend)
            return {"interventions": [iv.to_dict() for iv in cfg.interventions]}
        return await run(work)

    async def not_found(request, exc):
        if request.url.path.startswith("/api/"):
            return err(404, f"no such endpoint: {request.url.path}")
        return FileResponse(STATIC / "index.html", status_code=404)

    routes = [
        Route("/", index_page),
        Route("/api/info", info),
        Route("/api/trace", api_trace, methods=["POST"]),
        Route("/api/value/{label}", api_value),
        Route("/api/search", api_search, methods=["POST"]),
        Route("/api/generate", api_generate, methods=["POST"]),
        Route("/api/interventions/parse", api_parse, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found})


class PortInUseError(OSError):
    pass


def bind(host: str = "127.0.0.1", port: int = 8765) -> socket.socket:
    """A listening socket on ``host:port`` (0 = any free port), or a clear error naming ``--port``."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUseError(f"port {port} on {host} is in use or cannot be bound ({exc.strerror}); start the "
                             f"debugger on another one with --port N (or --port 0 for any free port)") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Server:
    """uvicorn serving ``app`` on a socket we bound (so the port is known before it starts)."""

    def __init__(self, app: Any, sock: socket.socket):
        import uvicorn

        self.sock = sock
        self.config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(self.config)
        self.thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self) -> "Server":
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started and time.time() - t0 < 30:
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.sock.close()

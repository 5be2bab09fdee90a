"""The HTTP side: a Flask application factory speaking Label Studio's ML backend protocol.

Routes: `GET /` and `GET /health`, `POST /setup`, `POST /predict`, `POST /webhook`, `GET /metrics`.
Every error is a JSON body `{"error": ...}`: 4xx for what the caller sent, 5xx (without a traceback; the
traceback goes to the log) for our own faults.
"""
from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import threading
import time
from typing import Any, Protocol

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, NotFound, RequestEntityTooLarge

from sam_backend.errors import ClientError, RequestError
from sam_backend.settings import Settings

log = logging.getLogger(__name__)


class Metrics:
    """Request counts and latencies, per route. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, dict[str, float]] = {}
        self.started = time.time()

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            entry = self._routes.setdefault(route, {"count": 0, "errors": 0, "seconds_total": 0.0,
                                                    "seconds_max": 0.0})
            entry["count"] += 1
            entry["errors"] += status >= 400
            entry["seconds_total"] += seconds
            entry["seconds_max"] = max(entry["seconds_max"], seconds)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {route: dict(values) for route, values in self._routes.items()}


class Backend(Protocol):
    """What the routes call: `model.SamModel`, the Label Studio layer. Its errors derive from `ClientError`."""

    model_version: str
    model_class: str

    def setup(self, body: Any, peer: str | None = None) -> dict: ...

    def predict(self, body: Any) -> dict: ...

    def webhook(self, body: Any) -> dict: ...

    def stats(self) -> dict[str, Any]: ...

    def health(self) -> dict[str, Any]: ...


def configure_logging(settings: Settings) -> None:
    """The process's log format and level (LOG_LEVEL)."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the SDK's HTTP client logs every call of a project job at INFO; its failures reach our own log lines
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def create_app(model: Backend, settings: Settings) -> Flask:
    """The Flask app that serves `model` (built once per process by `_wsgi`, or by the tests)."""
    metrics = Metrics()

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length
    app.json.sort_keys = False
    app.extensions["sam_model"] = model

    @app.before_request
    def _authenticate_and_time():
        g.started = time.perf_counter()
        host = _host_name(request.host)
        if not host_allowed(host, settings.allowed_server_hosts):
            # DNS rebinding: a page of another site, its name re-pointed at this server, would otherwise be
            # served as if it were on the same origin.
            return _refused(400, f"Host {host!r} is not a name of this server; add it to ALLOWED_HOSTS")
        if request.method == "POST" and request.routing_exception is None and not _is_json(request.mimetype):
            # Cross-site pages may POST text/plain or form bodies without a CORS preflight; a JSON type needs one.
            return _refused(415, f"send the body as JSON with Content-Type: application/json (got "
                               f"{request.mimetype or 'no Content-Type'!r})")
        if settings.basic_auth_user and not _authorized(settings):
            if not isinstance(request.routing_exception, NotFound):  # a wrong URL (a scanner) is not logged
                _log_refusal(401, "no or wrong Basic auth credentials (BASIC_AUTH_USER / BASIC_AUTH_PASS)")
            return Response(response='{"error": "authentication required"}', status=401,
                            mimetype="application/json",
                            headers={"WWW-Authenticate": 'Basic realm="sam-backend"'})
        return None

    @app.after_request
    def _observe(response: Response) -> Response:
        if request.url_rule is not None:
            metrics.observe(request.url_rule.rule, response.status_code, time.perf_counter() - g.started)
        return response

    @app.get("/")
    @app.get("/health")
    def health():
        # "UP" while the store is degraded too: the backend still answers, computing locally (see "state_store")
        return jsonify(status="UP", model_class=model.model_class, model_loaded=True,
                       model_version=model.model_version, **model.health())

    @app.post("/setup")
    def setup():
        return jsonify(model.setup(_json_body(), peer=request.remote_addr))

    @app.post("/predict")
    def predict():
        return jsonify(model.predict(_json_body()))

    @app.post("/webhook")
    def webhook():
        try:
            body = request.get_json(silent=True)
        except RecursionError:  # silent=True only silences ValueError
            body = None
        answer = model.webhook(body)
        log.debug("webhook %s: %s", answer.get("action"), answer.get("status"))
        return jsonify(answer), 200

    @app.get("/metrics")
    def metrics_route():
        return jsonify(model_version=model.model_version, uptime_seconds=round(time.time() - metrics.started, 1),
                       routes=metrics.snapshot(), **model.stats())

    @app.errorhandler(ClientError)
    def _client_error(error: ClientError):
        _log_refusal(error.status, error.message)
        return jsonify(error=error.message), error.status

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        if not isinstance(error, NotFound):  # a wrong URL (or a scanner), not a refused request of Label Studio's
            _log_refusal(error.code or 500, f"{error.name}: {error.description}")
        return jsonify(error=f"{error.name}: {error.description}"), error.code

    @app.errorhandler(Exception)
    def _server_error(error: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(error=f"internal error ({type(error).__name__}); see the backend's log"), 500

    return app


#: names that only resolve inside a machine, a LAN, a Docker network or a cluster: no outside site can own them
LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".lan", ".home.arpa", ".svc", ".cluster.local")


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether `host` (a Host header without its port, lower case) names this server.

    Always: IP addresses, single-label names (`sam`, `localhost`) and local-only suffixes; else only names in
    `allowed` (ALLOWED_HOSTS): exact, `.example.com` for the domain and its subdomains, or `*`.
    """
    if not host:
        return False
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        pass
    if "." not in host.rstrip(".") or host.rstrip(".").endswith(LOCAL_SUFFIXES):
        return True
    host = host.rstrip(".")
    for name in allowed:
        if name == "*" or host == name.lstrip(".") or (name.startswith(".") and host.endswith(name)):
            return True
    return False


def _host_name(host: str) -> str:
    """The Host header's name, lower case, without the port (IPv6 literals keep their brackets)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def _error(status: int, message: str) -> Response:
    return Response(response=json.dumps({"error": message}), status=status, mimetype="application/json")


def _refused(status: int, message: str) -> Response:
    _log_refusal(status, message)
    return _error(status, message)


def _log_refusal(status: int, message: str) -> None:
    """Log why a request was refused: Label Studio shows its users only the status line of an error answer
    ("422 Client Error: UNPROCESSABLE ENTITY for url ..."), never the JSON reason, so the log is where it is read."""
    if len(message) > 500:  # messages quote names from the body: one request must not write megabytes of log
        message = message[:500] + f"... ({len(message)} characters)"
    # the path and the names a message quotes are the client's: a line break in them must not start a log line
    log.warning("%s %s refused with %d: %s", request.method, _one_line(request.path[:200]), status,
                _one_line(message))


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _json_body() -> Any:
    data = request.get_data(cache=True)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(data) >= limit:
        # A body without Content-Length (chunked) is cut at MAX_CONTENT_LENGTH by werkzeug, not refused: a body
        # that fills the limit is taken as one that went past it.
        raise RequestEntityTooLarge()
    if not data.strip():
        raise RequestError("the request body is empty; send a JSON object")
    try:
        return json.loads(data)
    except RecursionError:  # the C decoder's recursion guard: not a ValueError, and no server fault
        raise RequestError("the request body is nested too deeply to be read") from None
    except ValueError as error:  # JSONDecodeError (with line and column), UnicodeDecodeError, too many digits
        raise RequestError(f"the request body is not valid JSON: {error}") from None


def _authorized(settings: Settings) -> bool:
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "basic":  # auth schemes are case-insensitive (RFC 9110)
        return False
    try:
        user, _, password = base64.b64decode(credentials.strip(), validate=True).partition(b":")
    except ValueError:
        return False
    # Label Studio calls the backend with python-requests, which encodes Basic credentials as Latin-1; browsers
    # and curl send UTF-8. Either encoding of the configured credentials is accepted.
    matches = []
    for encoding in ("utf-8", "latin-1"):
        try:
            expected_user = settings.basic_auth_user.encode(encoding)
            expected_pass = settings.basic_auth_pass.encode(encoding)
        except UnicodeEncodeError:
            continue
        matches.append(hmac.compare_digest(user, expected_user) & hmac.compare_digest(password, expected_pass))
    return any(matches)

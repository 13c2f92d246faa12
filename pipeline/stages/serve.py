"""Command `serve`: the registry's champion (or any generator `generate` reads) answers HTTP requests.

    python -m pipeline serve                       # models:/<experiment>-generator@champion on 127.0.0.1:8000
    curl 'http://127.0.0.1:8000/digits?n=4&seed=7'              # JSON: the samples as 28 x 28 uint8 rows
    curl -o digits.png 'http://127.0.0.1:8000/digits?n=16&format=png'

The weights are read as `generate` reads them (weights-only, SHA-256-checked; never the pickled
MLflow model, which `mlflow models serve` would load), once at start. A request draws as
`generate` does: the same n, seed and label give the same pixels as `generate -n N --seed S
--label L`. `label` (a conditional generator only) is a class number or name. A bad request gets
status 400 and one sentence; the server listens on the loopback interface unless told otherwise.
"""

from __future__ import annotations

import json
import math
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch

from pipeline import data, machine
from pipeline.errors import UserError
from pipeline.params import Params, load_params
from pipeline.stages.drawing import chosen_generator, draw
from pipeline.tracking import registry

MAX_N = 1000  # samples per request: a JSON body of about 2 MB


class Service:
    """One loaded generator and what a request may ask of it; requests draw one at a time."""

    def __init__(self, params: Params, generator: torch.nn.Module, source: str, device: torch.device) -> None:
        self.params, self.generator, self.source, self.device = params, generator, source, device
        self.lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        classes = list(data.class_names(self.params.data))
        return {
            "model": self.source,
            "conditional": bool(self.generator.n_classes),
            "classes": classes,
            "default_seed": self.params.evaluate.seed,
            "max_n": MAX_N,
        }

    def digits(self, query: dict[str, list[str]]) -> tuple[np.ndarray, dict[str, Any]]:
        unknown = set(query) - {"n", "seed", "label", "format"}
        if unknown:
            raise UserError(
                f"unknown query parameter {sorted(unknown)[0]!r} (allowed: n, seed, label, format)."
            )
        n, seed = _integer(query, "n", 16), _integer(query, "seed", None)
        if not 1 <= n <= MAX_N:
            raise UserError(f"n must be between 1 and {MAX_N}, not {n}.")
        label = query["label"][-1] if "label" in query else None
        with self.lock:
            pixels, seed = draw(
                self.generator, self.source, self.params, n, seed, label, self.device, "label"
            )
        return pixels, {"model": self.source, "n": n, "seed": seed, "label": label}


def _integer(query: dict[str, list[str]], key: str, default: int | None) -> Any:
    if key not in query:
        return default
    text = query[key][-1]
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{key} must be a whole number, not {text[:40]!r}.") from None


def png_grid(pixels: np.ndarray) -> bytes:
    """The samples as one square PNG grid, each pixel 3 x 3."""
    return data.png_bytes(data.make_grid(pixels, rows=math.isqrt(len(pixels) - 1) + 1))


def handler(service: Service) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            url = urlsplit(self.path)
            try:
                if url.path == "/health":
                    return self.send(
                        HTTPStatus.OK, json.dumps(service.describe()).encode(), "application/json"
                    )
                if url.path != "/digits":
                    raise LookupError(f"no such path {url.path!r}: ask /digits?n=16 or /health")
                query = parse_qs(url.query, keep_blank_values=True)
                pixels, meta = service.digits(query)
                if query.get("format", ["json"])[-1] == "png":
                    return self.send(HTTPStatus.OK, png_grid(pixels), "image/png")
                body = {**meta, "shape": list(pixels.shape), "images": pixels.tolist()}
                return self.send(HTTPStatus.OK, json.dumps(body).encode(), "application/json")
            except UserError as exc:
                return self.send(
                    HTTPStatus.BAD_REQUEST, json.dumps({"error": str(exc)}).encode(), "application/json"
                )
            except LookupError as exc:
                return self.send(
                    HTTPStatus.NOT_FOUND, json.dumps({"error": str(exc)}).encode(), "application/json"
                )

        def send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            print(f"{self.address_string()} {format % args}", flush=True)

    return Handler


def main(
    params_path: Path = Path("params.yaml"),
    run: str | None = None,
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> None:
    params = load_params(params_path)
    device = machine.pick_device(params.train.device)
    if run is None and model is None:
        model = f"models:/{registry.model_name(params.tracking.experiment, params.data.dataset)}@{registry.CHAMPION}"
    generator, source = chosen_generator(params, device, run, model)
    service = Service(params, generator.eval(), source, device)
    try:
        server = ThreadingHTTPServer((host, port), handler(service))
    except OSError as exc:
        raise UserError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); give another --port."
        ) from None
    print(f"serving {source} at http://{host}:{server.server_port}/digits?n=16 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

"""``spcxr serve``: trained models behind a local HTTP service, and a page to look at answers.

Routes (a Starlette ASGI app, run by uvicorn):

* ``POST /v1/predict`` (multipart, one or several files; ``?heatmap=1`` adds pictures as PNG
  data URLs; ``?model=NAME`` restricts to some models): per file ``status`` ("ok"/"error") and
  ``error`` (the messages of ``spcxr predict``), and per model the class probabilities and the
  predicted class, or the lung area of a segmenter;
* ``GET /v1/models``: the loaded models and their model card summary; ``GET /healthz``;
* ``GET /``: a page (plain HTML and JavaScript shipped with the package, nothing fetched from
  elsewhere) to drop films on and see the prediction, the heatmap and the lung overlay.

Every model is loaded once with the preprocessing recorded at training time and applied by
:class:`spcxr.inference.BatchPredictor`, the code behind ``spcxr predict``, so the service gives
the CSV's numbers. Concurrent requests share model batches (:mod:`spcxr.serve.batcher`).

Safety: the default address is 127.0.0.1; the request body and every image's pixel count are
bounded (413, or an error for that file); uploads are held in memory and written, under a
random name, only to a private temporary folder (deleted right after decoding, the folder when
the service stops), so no client-given path is ever opened; a file that fails to decode is an
error entry in the answer, never a failed worker.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import contextlib
import io
import ipaddress
import logging
import os
import re
import shutil
import tempfile
import uuid
import warnings
import weakref
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from spcxr.inference.predict import BatchPredictor, Decoded, LoadedModel, decode, load_model
from spcxr.io import sniff_format
from spcxr.modelcard import NOT_A_DEVICE, model_card
from spcxr.serve.batcher import Batcher, QueueFull
from spcxr.train.distributed import resolve_device

log = logging.getLogger(__name__)

__all__ = ["ServeConfig", "Service", "create_app", "serve", "torch_threads"]

_PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
# The page loads nothing from elsewhere; pictures come back as data URLs.
_CSP = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; frame-ancestors 'none'"
_RETRY_AFTER_S = 1


@dataclass
class ServeConfig:
    """Settings of ``spcxr serve`` (every field is a CLI flag and a YAML key).

    Attributes:
        run: fine-tuning / segmentation run folders or ``spcxr export`` folders (repeat the flag
            for several models; every upload is answered by each).
        host: address to listen on (127.0.0.1: this machine only; another address exposes the
            models to the network, without authentication).
        port: TCP port.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:i]``.
        precision: ``auto`` (bf16 autocast on CUDA and on CPUs with native bf16), ``fp32`` or
            ``bf16``.
        max_batch: most images per model batch.
        max_wait_ms: how long the first image of a batch may wait for others (milliseconds).
        max_queue: most images queued or in prediction at a time; beyond it requests get 503
            with Retry-After.
        max_upload_mb: largest request body (all files of a request together), in MiB.
        max_files: most files per request.
        max_pixels: largest image (height x width) decoded; larger ones get an error entry.
        heatmap_steps: path-integral steps of the explanation maps (``?heatmap=1``).
        workers: threads that decode uploads and encode pictures.
        threads: PyTorch intra-op threads of the model (0: half the CPU cores, at least one:
            the other cores decode uploads and speak HTTP; more threads than free cores make
            OpenMP spin and slow every batch down).
    """

    run: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    precision: str = "auto"
    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_upload_mb: float = 64.0
    max_files: int = 64
    max_pixels: int = 50_000_000
    heatmap_steps: int = 16
    workers: int = 2
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_files", "max_pixels", "workers"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.max_upload_mb <= 0:
            raise ValueError(f"--max-upload-mb must be > 0, got {self.max_upload_mb}")
        if self.heatmap_steps < 1:
            raise ValueError(f"--heatmap-steps must be >= 1, got {self.heatmap_steps}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass
class _Served:
    name: str
    loaded: LoadedModel
    predictor: BatchPredictor
    summary: dict[str, Any]


class _TooLarge(Exception):
    pass


def _model_name(run: str, loaded: LoadedModel, taken: set[str]) -> str:
    folder = loaded.folder.resolve()
    base = folder.parent.name if folder.name == "model" else folder.name
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base) or "model"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    return name


def _card_summary(name: str, loaded: LoadedModel) -> dict[str, Any]:
    """What /v1/models says about a model: task, classes, input, and its model card."""
    config = loaded.meta.get("config", {})
    prep = loaded.preprocessing
    shipped = loaded.folder / "MODEL_CARD.md"
    try:
        card = (
            shipped.read_text(encoding="utf-8") if shipped.is_file() else model_card(loaded.folder)
        )
    except (OSError, ValueError, KeyError, TypeError) as err:  # a card is help, not a requirement
        log.warning("%s: no model card (%s)", loaded.folder, err)
        card = ""
    title = next((line.lstrip("# ").strip() for line in card.splitlines() if line.strip()), name)
    return {
        "name": name,
        "task": loaded.task,
        "class_names": loaded.class_names,
        "multilabel": loaded.multilabel,
        "arch": config.get("arch"),
        "img_size": prep.img_size,
        "patch_size": config.get("patch_size"),
        "preprocessing": {
            "store_image_size": prep.store_image_size,
            "mean": prep.mean,
            "std": prep.std,
            "dicom_windowing": prep.dicom.windowing,
            "dicom_percentiles": list(prep.dicom.percentiles),
        },
        "card_title": title,
        "notice": NOT_A_DEVICE.replace("**", ""),
        "card": card,
    }


def image_shape(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` from the file's header, without decoding pixels (None: unknown).

    Pillow reads only the header of PNG, JPEG and TIFF on open; DICOM is parsed up to the
    pixel data.

    Raises:
        ValueError: more pixels than Pillow's decompression-bomb limit.
    """
    with path.open("rb") as handle:
        kind = sniff_format(handle.read(132))
    try:
        if kind in ("png", "jpeg", "tiff"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    return int(image.height), int(image.width)
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        rows, cols = ds.get("Rows"), ds.get("Columns")
        return (int(rows), int(cols)) if rows and cols else None
    except Image.DecompressionBombError as err:
        raise ValueError(str(err)) from err
    except Exception:  # the decoder gives the real message
        return None


def _png_data_url(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _display_name(filename: str | None, index: int) -> str:
    """The client's file name as a label only (its last component, shortened)."""
    name = re.split(r"[\\/]", filename or "")[-1].strip()
    return name[:200] or f"file{index + 1}"


class _Parser(MultiPartParser):
    def __init__(self, *args: Any, spool: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spool_max_size = spool  # uploads stay in memory (bounded by the body limit)


class Service:
    """The loaded models, the batcher, the decoding threads and the private temp folder."""

    def __init__(self, config: ServeConfig) -> None:
        if not config.run:
            raise ValueError("serve: --run is required (a run folder or an spcxr export)")
        self.config = config
        self.device = resolve_device(config.device)
        self.models: dict[str, _Served] = {}
        for run in config.run:
            loaded = load_model(run)
            name = _model_name(run, loaded, set(self.models))
            predictor = BatchPredictor(
                loaded,
                self.device,
                heatmap_steps=config.heatmap_steps,
                max_batch=max(config.max_batch, 64),
                precision=config.precision,
            )
            self.models[name] = _Served(name, loaded, predictor, _card_summary(name, loaded))
            log.info("serving %s (%s) from %s", name, loaded.task, loaded.folder)
        self.tmp = Path(tempfile.mkdtemp(prefix="spcxr-serve-"))  # mode 0700
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.tmp), ignore_errors=True)
        self.pool = cf.ThreadPoolExecutor(config.workers, thread_name_prefix="spcxr-serve")
        self.batcher = Batcher(
            self._run_batch,
            max_batch=config.max_batch,
            max_wait=config.max_wait_ms / 1000.0,
            max_queue=config.max_queue,
        )

    def close(self) -> None:
        self.batcher.close()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._cleanup()

    def _run_batch(self, key: Hashable, batch: list[Decoded]) -> list[Any]:
        name, heatmaps = key  # type: ignore[misc]
        return self.models[name].predictor(batch, heatmaps)

    # -- decoding -------------------------------------------------------------------------

    def decode_upload(self, name: str, data: bytes, models: list[_Served]) -> dict[str, Decoded]:
        """Decodes one upload for each model's preprocessing (runs in a pool thread).

        The bytes go to a random name in the private temp folder (the readers take paths),
        which is deleted before this returns.
        """
        path = self.tmp / f"upload-{uuid.uuid4().hex}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            error = self._pixel_error(path) if data else ""
            out: dict[str, Decoded] = {}
            by_prep: dict[Any, Decoded] = {}
            for model in models:
                prep = model.loaded.preprocessing
                if prep not in by_prep:
                    if error:
                        by_prep[prep] = Decoded(name, error=error)
                    else:
                        found = decode(str(path), prep)
                        found.file = name
                        found.error = found.error.replace(str(path), name)
                        by_prep[prep] = found
                out[model.name] = by_prep[prep]
            return out
        finally:
            path.unlink(missing_ok=True)

    def _pixel_error(self, path: Path) -> str:
        try:
            shape = image_shape(path)
        except ValueError as err:  # over Pillow's decompression-bomb limit
            limit = self.config.max_pixels
            return f"image too large: {err}; this server decodes at most {limit:,} (--max-pixels)"
        if shape is None:
            return ""
        pixels = shape[0] * shape[1]
        if pixels <= self.config.max_pixels:
            return ""
        return (
            f"image too large: {pixels:,} pixels ({shape[0]} x {shape[1]}); this server decodes "
            f"at most {self.config.max_pixels:,} (--max-pixels)"
        )

    # -- answering --------------------------------------------------------------------------

    async def answer_file(
        self, name: str, data: bytes, models: list[_Served], heatmap: bool
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        try:
            decoded = await loop.run_in_executor(self.pool, self.decode_upload, name, data, models)
        except OSError as err:  # the temp folder is full or gone: this file fails, not the server
            log.error("%s: could not store the upload: %s", name, err)
            reason = err.strerror or str(err)
            return {
                "file": name,
                "status": "error",
                "error": f"could not store the upload: {reason}",
            }
        first = next(iter(decoded.values()))
        failed = next((d for d in decoded.values() if d.error), None)
        entry: dict[str, Any] = {"file": name, "status": "ok", "error": ""}
        if failed is not None:
            entry.update(status="error", error=failed.error)
            return entry
        entry.update(height=first.shape[0], width=first.shape[1], models={})
        futures = {
            m.name: asyncio.wrap_future(self.batcher.submit((m.name, heatmap), decoded[m.name]))
            for m in models
        }
        pictures: dict[str, np.ndarray] = {}
        for model in models:
            try:
                values, images = await futures[model.name]
            except Exception as err:  # reported for this file; the service goes on
                log.exception("%s: prediction failed for %s", model.name, name)
                entry.update(status="error", error=f"prediction failed: {err}")
                entry.pop("models")
                return entry
            result = _model_result(model, values)
            entry["models"][model.name] = result
            if heatmap:
                for kind in ("heatmap", "overlay"):
                    if kind in images:
                        pictures[f"{model.name}/{kind}"] = images[kind]
        if heatmap:
            pictures["film"] = first.content
            urls = await loop.run_in_executor(
                self.pool, lambda: {k: _png_data_url(v) for k, v in pictures.items()}
            )
            entry["film"] = urls.pop("film")
            for key, url in urls.items():
                model_name, kind = key.split("/")
                entry["models"][model_name][kind] = url
        return entry


def _model_result(model: _Served, values: dict[str, Any]) -> dict[str, Any]:
    if model.loaded.task == "classification":
        probs = {c: values[f"p_{c}"] for c in model.loaded.class_names}
        out: dict[str, Any] = {
            "task": "classification",
            "probabilities": probs,
            "predicted": values["predicted"],
        }
        if "heatmap_completeness_gap" in values:
            out["heatmap_completeness_gap"] = values["heatmap_completeness_gap"]
        return out
    return {
        "task": "segmentation",
        "lung_area_fraction": values["lung_area_fraction"],
        "lung_area_px": values["lung_area_px"],
    }


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "0").lower() in ("1", "true", "yes", "on")


def create_app(config: ServeConfig, service: Service | None = None) -> Starlette:
    """The ASGI app; loads the models now (errors surface before anything listens).

    A ``service`` passed in is shared (its owner closes it); one made here is closed when the
    app shuts down.
    """
    owned = service is None
    service = service or Service(config)
    limit = config.max_upload_bytes

    async def predict(request: Request) -> Response:
        declared = request.headers.get("content-length")
        too_large = (
            f"upload too large: the request body exceeds {limit:,} bytes (--max-upload-mb "
            f"{config.max_upload_mb:g})"
        )
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _error(413, too_large)
        if "multipart/form-data" not in request.headers.get("content-type", ""):
            return _error(400, "send the images as multipart/form-data (field name: files)")
        names = request.query_params.getlist("model") or list(service.models)
        unknown = [n for n in names if n not in service.models]
        if unknown:
            return _error(400, f"unknown model {unknown[0]!r}; loaded: {sorted(service.models)}")
        models = [service.models[n] for n in dict.fromkeys(names)]

        async def bounded() -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise _TooLarge
                yield chunk

        parser = _Parser(
            request.headers,
            bounded(),
            max_files=config.max_files,
            max_fields=config.max_files + 16,
            spool=limit + 1,
        )
        try:
            form = await parser.parse()
        except _TooLarge:
            return _error(413, too_large)
        except MultiPartException as err:
            status = 413 if "Too many files" in err.message else 400
            message = err.message
            if status == 413:
                message = f"too many files: at most {config.max_files} per request (--max-files)"
            return _error(status, message)
        try:
            uploads = [
                (_display_name(item.filename, i), await item.read())
                for i, (_, item) in enumerate(form.multi_items())
                if not isinstance(item, str)
            ]
        finally:
            await form.close()
        if not uploads:
            return _error(400, "no file in the request: send one or more files (field: files)")
        slots = len(uploads) * len(models)
        try:
            service.batcher.admit(slots)
        except QueueFull as err:
            return _error(503, f"busy: {err}", headers={"Retry-After": str(_RETRY_AFTER_S)})
        try:
            heatmap = _flag(request, "heatmap")
            results = await asyncio.gather(
                *(service.answer_file(name, data, models, heatmap) for name, data in uploads)
            )
        finally:
            service.batcher.release(slots)
        return JSONResponse(
            {
                "models": [m.name for m in models],
                "notice": NOT_A_DEVICE.replace("**", ""),
                "results": results,
            }
        )

    async def models(request: Request) -> Response:
        return JSONResponse({"models": [m.summary for m in service.models.values()]})

    async def healthz(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "models": list(service.models),
                "device": str(service.device),
                "queued": service.batcher.admitted,
                "batching": service.batcher.stats.as_dict(),
            }
        )

    async def page(request: Request) -> Response:
        name, media = _PAGE_FILES[request.url.path]
        body = resources.files("spcxr.serve").joinpath("page", name).read_bytes()
        return Response(body, media_type=media, headers={"Content-Security-Policy": _CSP})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if owned:
            service.close()

    routes = [
        Route("/v1/predict", predict, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        *(Route(path, page, methods=["GET"]) for path in _PAGE_FILES),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = service
    return app


def torch_threads(threads: int = 0) -> int:
    """``threads``, or by default half the CPU cores (at least one)."""
    return threads or max(1, (os.cpu_count() or 1) // 2)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: ServeConfig) -> None:
    """Loads the models and serves them until interrupted."""
    import torch
    import uvicorn

    torch.set_num_threads(torch_threads(config.threads))
    app = create_app(config)
    if not _is_loopback(config.host):
        log.warning(
            "listening on %s: the models are reachable from the network, without "
            "authentication (the default --host 127.0.0.1 keeps them on this machine)",
            config.host,
        )
    log.info("page and API on http://%s:%d/", config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", access_log=False)

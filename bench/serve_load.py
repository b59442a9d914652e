"""Load test of ``spcxr serve`` on 127.0.0.1, compared with ``spcxr predict`` on the same files.

A ViT classifier (random weights: the speed does not depend on them; ViT-Ti/16 at 112 px by
default) is saved as a run with its preprocessing record, ``--files`` PNG films are generated,
and then, in one run of this script:

1. ``spcxr predict`` (:func:`spcxr.inference.run_predict`, heatmaps off) over the files;
2. ``spcxr serve`` started as its own process on a free loopback port, and ``--clients``
   threads that each POST one film per request (round-robin over the files, keep-alive) for
   ``--seconds``, without heatmaps; latencies are per request, client side;
3. ``spcxr predict`` again (the machine may be shared: the ratio uses the mean of both).

Prints one JSON line: requests/s, images/s, p50/p99 latency, errors, the server's batching,
predict's images/s and ``serve_to_predict``. The issue's aim on a 2-core machine:
``serve_to_predict >= 0.7``, ``p99 < 2 s``, zero errors. The clients run on the same machine
as the server and take CPU from it, as they would on a workstation.

Usage:
    python bench/serve_load.py                    # 30 s, 8 clients
    python bench/serve_load.py --seconds 15 --threads 2
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from spcxr.inference import PredictConfig, run_predict
from spcxr.models.classifier import ClassifierConfig, build_classifier, save_classifier
from spcxr.serve.app import torch_threads

STORE_SIZE = 256  # spcxr prepare's default square


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--seconds", type=float, default=30.0, help="length of the load phase")
    add("--clients", type=int, default=8, help="concurrent clients (threads)")
    add("--arch", default="vit_tiny")
    add("--img-size", type=int, default=112)
    add("--patch-size", type=int, default=16)
    add("--files", type=int, default=256, help="generated PNG films")
    add("--file-size", type=int, default=384, help="side of the films in pixels")
    add("--workers", type=int, default=2, help="decoding threads (predict and serve alike)")
    add("--threads", type=int, default=0, help="torch threads of both (0: serve's default)")
    add("--max-batch", type=int, default=32)
    add("--max-wait-ms", type=float, default=10.0)
    add("--batch-size", type=int, default=64, help="spcxr predict's batch size")
    add("--tag", default="", help="free text copied to the JSON line")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.seconds > 600:
        p.error("--seconds must be in (0, 600]: the load test is bounded")
    if args.clients < 1 or args.files < 1:
        p.error("--clients and --files must be >= 1")
    return args


def _write_png(path: Path, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    small = rng.random((size // 16, size // 16), dtype=np.float32)
    base = np.asarray(Image.fromarray(small, mode="F").resize((size, size), Image.BILINEAR))
    pixels = np.clip(base * 200 + rng.normal(0, 8, (size, size)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, compress_level=1)


def _make_run(root: Path, args: argparse.Namespace) -> Path:
    torch.manual_seed(0)
    cfg = ClassifierConfig(
        arch=args.arch, img_size=args.img_size, patch_size=args.patch_size, in_chans=1
    )
    preprocessing = {
        "store_image_size": STORE_SIZE,
        "dicom_windowing": "auto",
        "dicom_percentiles": [0.5, 99.5],
        "img_size": args.img_size,
        "mean": 0.5,
        "std": 0.25,
    }
    names = ["normal", "consolidation", "bilateral_opacities"]
    model, _ = build_classifier(cfg, num_classes=len(names))
    save_classifier(
        model, cfg, names, root / "run" / "model", extra={"preprocessing": preprocessing}
    )
    return root / "run"


def _predict_rate(
    run: Path, files: list[Path], out: Path, args: argparse.Namespace
) -> tuple[float, float]:
    """(images/s, CPU ms per image) of spcxr predict on ``files``."""
    cpu = time.process_time()
    _, stats = run_predict(
        PredictConfig(
            run=str(run),
            inputs=[str(f) for f in files],
            out=str(out),
            batch_size=args.batch_size,
            device="cpu",
            heatmaps=False,
            workers=args.workers,
            progress=False,
        )
    )
    if stats.errors:
        raise RuntimeError(f"predict gave {stats.errors} error rows")
    return stats.images / stats.seconds, 1000 * (time.process_time() - cpu) / stats.images


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_server(run: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "spcxr", "serve",
        "--run", str(run),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--device", "cpu",
        "--workers", str(args.workers),
        "--threads", str(args.threads),
        "--max-batch", str(args.max_batch),
        "--max-wait-ms", str(args.max_wait_ms),
    ]  # fmt: skip
    handle = log.open("wb")
    server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"spcxr serve exited with {server.returncode}: {log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.terminate()
    raise RuntimeError(f"spcxr serve did not answer within 120 s: {log.read_text()}")


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _load(url: str, films: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    """``--clients`` threads, one film per request, for ``--seconds``."""
    latencies: list[list[float]] = [[] for _ in range(args.clients)]
    errors: list[int] = [0] * args.clients
    counter = iter(range(1 << 62))
    lock = threading.Lock()
    start = threading.Barrier(args.clients + 1)
    stop_at = [0.0]

    def client(k: int) -> None:
        with httpx.Client(timeout=60) as http:
            start.wait()
            while time.monotonic() < stop_at[0]:
                with lock:
                    i = next(counter)
                data = films[i % len(films)]
                t0 = time.perf_counter()
                try:
                    response = http.post(url, files=[("files", (f"{i}.png", data))])
                    ok = response.status_code == 200 and all(
                        r["status"] == "ok" for r in response.json()["results"]
                    )
                except httpx.HTTPError:
                    ok = False
                latencies[k].append(time.perf_counter() - t0)
                errors[k] += not ok

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + args.seconds
    started = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    every = np.array([x for per in latencies for x in per])
    n_errors = sum(errors)
    return {
        "seconds": round(seconds, 2),
        "requests": len(every),
        "requests_per_s": round(len(every) / seconds, 1),
        "images_per_s": round((len(every) - n_errors) / seconds, 1),
        "p50_ms": round(1000 * float(np.percentile(every, 50)), 1) if len(every) else None,
        "p99_ms": round(1000 * float(np.percentile(every, 99)), 1) if len(every) else None,
        "errors": n_errors,
    }


def _per_image(cpu: float | None, load: dict[str, Any]) -> float | None:
    images = load["images_per_s"] * load["seconds"]
    return round(1000 * cpu / images, 1) if cpu is not None and images else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.threads = torch_threads(args.threads)
    torch.set_num_threads(args.threads)  # predict here and the server alike
    with tempfile.TemporaryDirectory(prefix="spcxr_serve_bench_") as tmp:
        root = Path(tmp)
        run = _make_run(root, args)
        images = root / "images"
        images.mkdir()
        files = [images / f"{i:05d}.png" for i in range(args.files)]
        with cf.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: _write_png(files[i], args.file_size, i), range(args.files)))
        films = [f.read_bytes() for f in files]
        (predict_before, cpu_before) = _predict_rate(run, files, root / "p1.csv", args)
        port = _free_port()
        server = _start_server(run, port, args, root / "serve.log")
        try:
            url = f"http://127.0.0.1:{port}/v1/predict"
            httpx.post(url, files=[("files", ("warm.png", films[0]))], timeout=60)  # warm-up
            server_cpu, client_cpu = _cpu_seconds(server.pid), time.process_time()
            load = _load(url, films, args)
            client_cpu = time.process_time() - client_cpu
            if server_cpu is not None:
                server_cpu = _cpu_seconds(server.pid) - server_cpu
            batching = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()["batching"]
        finally:
            server.terminate()
            server.wait(30)
        (predict_after, cpu_after) = _predict_rate(run, files, root / "p2.csv", args)
    predict_rate = (predict_before + predict_after) / 2
    result = {
        "bench": "serve_load",
        "arch": args.arch,
        "img_size": args.img_size,
        "patch_size": args.patch_size,
        "file_size": args.file_size,
        "files": args.files,
        "clients": args.clients,
        "workers": args.workers,
        "threads": args.threads,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        **load,
        "mean_batch": round(batching["mean_batch"], 2),
        # CPU per answered image: the server's, and the load-generating clients' (same machine)
        "server_cpu_ms_per_image": _per_image(server_cpu, load),
        "client_cpu_ms_per_image": _per_image(client_cpu, load),
        "largest_batch": batching["largest"],
        "predict_images_per_s": round(predict_rate, 1),
        "predict_cpu_ms_per_image": round((cpu_before + cpu_after) / 2, 1),
        "predict_images_per_s_before_after": [round(predict_before, 1), round(predict_after, 1)],
        "serve_to_predict": round(load["images_per_s"] / predict_rate, 3),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "tag": args.tag,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

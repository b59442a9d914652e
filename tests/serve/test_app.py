"""``spcxr serve``: answers equal ``spcxr predict``'s, bad files are error entries, limits give
clear refusals, concurrent requests share batches, a full queue answers 503."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient  # needs httpx (the test extra)
from tests.inference.test_predict import _dicom, _png

from spcxr.cli import main
from spcxr.inference import PredictConfig, predict
from spcxr.serve import ServeConfig, Service, create_app


def _config(*runs: Path, **overrides) -> ServeConfig:
    return ServeConfig(run=[str(r) for r in runs], device="cpu", workers=2, **overrides)


@pytest.fixture(scope="module")
def service(serve_class_run, serve_seg_run):
    """Both models behind one service (closed at the end; each test's client reuses it)."""
    service = Service(_config(serve_class_run, serve_seg_run, max_pixels=20_000))
    yield service
    service.close()


@pytest.fixture
def client(service):
    with TestClient(create_app(service.config, service)) as client:
        yield client


def _post(client, files: list[tuple[str, bytes]], query: str = ""):
    return client.post(f"/v1/predict{query}", files=[("files", f) for f in files])


def _bad_files(folder: Path) -> dict[str, Path]:
    """Every bad-file kind of the user-path fault list that can arrive as an upload."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = {
        "corrupt": folder / "corrupt.png",
        "truncated_dicom": folder / "truncated.dcm",
        "empty": folder / "empty.dcm",
        "not_an_image": folder / "notes.png",
        "one_bit": folder / "one_bit.png",
        "tiny": folder / "tiny.png",
        "too_many_pixels": folder / "huge.png",
        "too_many_pixels_dicom": folder / "huge.dcm",
    }
    bad["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    full = _dicom(folder / "full.dcm", (60, 50)).read_bytes()
    bad["truncated_dicom"].write_bytes(full[: len(full) - 2000])
    bad["empty"].write_bytes(b"")
    bad["not_an_image"].write_text("patient notes, not a film\n")
    Image.fromarray(np.eye(32, dtype=bool)).convert("1").save(bad["one_bit"])
    _png(bad["tiny"], (4, 30))
    _png(bad["too_many_pixels"], (150, 150))  # 22,500 pixels > the service's 20,000
    _dicom(bad["too_many_pixels_dicom"], (150, 150))
    return bad


def test_models_health_and_page(client) -> None:
    models = client.get("/v1/models").json()["models"]
    assert [(m["name"], m["task"]) for m in models] == [
        ("cls", "classification"),
        ("seg", "segmentation"),
    ]
    assert models[0]["class_names"] == ["normal", "consolidation", "bilateral_opacities"]
    assert models[0]["img_size"] == 32 and models[0]["preprocessing"]["store_image_size"] == 64
    assert models[0]["notice"].startswith("Research use only. Not a medical device")
    assert "# Model card: cls" in models[0]["card"]
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["models"] == ["cls", "seg"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="notice"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for path in ("/", "/static/app.js", "/static/style.css"):
        body = client.get(path).text
        assert "://" not in body  # nothing is fetched from elsewhere: works offline
    assert client.get("/static/../app.py").status_code == 404


def test_answers_equal_predicts_rows_for_png_and_dicom(client, tmp_path) -> None:
    png = _png(tmp_path / "film.png", (40, 70), seed=4)
    dicom = _dicom(tmp_path / "scan.dcm", (60, 50))
    answer = _post(client, [(p.name, p.read_bytes()) for p in (png, dicom)])
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert [r["file"] for r in results] == ["film.png", "scan.dcm"]
    assert all(r["status"] == "ok" and r["error"] == "" for r in results)
    assert (results[1]["height"], results[1]["width"]) == (60, 50)
    service = client.app.state.service
    for run, name in ((service.config.run[0], "cls"), (service.config.run[1], "seg")):
        frame = predict(
            PredictConfig(
                run=run,
                inputs=[str(png), str(dicom)],
                out=str(tmp_path / f"{name}.csv"),
                device="cpu",
                heatmaps=False,
                workers=0,
                progress=False,
            )
        ).set_index("file")
        for path, result in zip((png, dicom), results, strict=True):
            got, row = result["models"][name], frame.loc[str(path)]
            if name == "cls":
                probs = got["probabilities"]
                assert list(probs) == ["normal", "consolidation", "bilateral_opacities"]
                for c, p in probs.items():
                    assert p == pytest.approx(row[f"p_{c}"], abs=1e-6)
                assert got["predicted"] == row["predicted"]
                assert "heatmap" not in got  # pictures only on request
            else:
                assert got["lung_area_px"] == row["lung_area_px"]
                assert got["lung_area_fraction"] == pytest.approx(row["lung_area_fraction"])
                assert "overlay" not in got


def _png_of(data_url: str) -> np.ndarray:
    head, payload = data_url.split(",", 1)
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))))


def test_heatmap_1_adds_the_film_heatmap_and_lung_overlay(client, tmp_path) -> None:
    png = _png(tmp_path / "film.png", (40, 70), seed=5)
    result = _post(client, [("film.png", png.read_bytes())], "?heatmap=1").json()["results"][0]
    # the film as the model saw it: the 64 px store square cropped to the content (37 x 64)
    assert _png_of(result["film"]).shape == (37, 64)
    assert _png_of(result["models"]["cls"]["heatmap"]).shape == (37, 64, 3)
    assert np.isfinite(result["models"]["cls"]["heatmap_completeness_gap"])
    assert _png_of(result["models"]["seg"]["overlay"]).shape == (37, 64, 3)
    only_seg = _post(client, [("film.png", png.read_bytes())], "?heatmap=1&model=seg").json()
    assert list(only_seg["results"][0]["models"]) == ["seg"]


def test_every_bad_file_kind_is_an_error_entry_with_predicts_message(client, tmp_path) -> None:
    bad = _bad_files(tmp_path / "bad")
    good = _png(tmp_path / "good.png", (40, 70))
    uploads = [(p.name, p.read_bytes()) for p in (*bad.values(), good)]
    answer = _post(client, uploads)
    assert answer.status_code == 200
    results = {r["file"]: r for r in answer.json()["results"]}
    assert results["good.png"]["status"] == "ok"  # the rest of the request is answered
    service = client.app.state.service
    frame = predict(
        PredictConfig(
            run=service.config.run[0],
            inputs=[str(p) for kind, p in bad.items() if not kind.startswith("too_many")],
            out=str(tmp_path / "p.csv"),
            device="cpu",
            heatmaps=False,
            workers=0,
            progress=False,
        )
    ).set_index("file")
    for kind, path in bad.items():
        got = results[path.name]
        assert got["status"] == "error" and "models" not in got, kind
        if kind.startswith("too_many_pixels"):
            assert got["error"] == (
                "image too large: 22,500 pixels (150 x 150); this server decodes at most "
                "20,000 (--max-pixels)"
            )
        else:
            assert got["error"] == frame.loc[str(path), "error"], kind
    assert "1-bit" in results["one_bit.png"]["error"]
    assert "empty file" in results["empty.dcm"]["error"]
    assert "not a DICOM, PNG, JPEG or TIFF" in results["notes.png"]["error"]
    # nothing of the uploads is left in the private temp folder
    assert list(service.tmp.iterdir()) == []
    assert client.get("/healthz").json()["status"] == "ok"


def test_request_limits_are_clear_refusals(serve_class_run, tmp_path) -> None:
    config = _config(serve_class_run, max_upload_mb=0.01, max_files=2)  # 10,485 bytes
    big = _png(tmp_path / "big.png", (160, 160)).read_bytes()
    small = _png(tmp_path / "small.png", (20, 20)).read_bytes()
    assert len(big) > 10_485 > 3 * len(small)
    with TestClient(create_app(config)) as client:
        answer = _post(client, [("big.png", big)])
        assert answer.status_code == 413
        assert answer.json()["error"] == (
            "upload too large: the request body exceeds 10,485 bytes (--max-upload-mb 0.01)"
        )

        def chunks():  # no Content-Length: the limit holds while the body streams in
            boundary = b"--b\r\n"
            yield boundary + b'Content-Disposition: form-data; name="files"; filename="a.png"\r\n'
            yield b"Content-Type: image/png\r\n\r\n"
            for start in range(0, len(big), 1000):
                yield big[start : start + 1000]
            yield b"\r\n--b--\r\n"

        streamed = client.post(
            "/v1/predict",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert streamed.status_code == 413 and "--max-upload-mb" in streamed.json()["error"]
        many = _post(client, [(f"{i}.png", small) for i in range(3)])
        assert many.status_code == 413
        assert many.json()["error"] == "too many files: at most 2 per request (--max-files)"
        assert _post(client, [(f"{i}.png", small) for i in range(2)]).status_code == 200
        empty = client.post(  # a form with a text field and no file
            "/v1/predict",
            content=b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nx\r\n--b--\r\n',
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert empty.status_code == 400 and "no file" in empty.json()["error"]
        plain = client.post(
            "/v1/predict", content=b"\x89PNG", headers={"content-type": "image/png"}
        )
        assert plain.status_code == 400 and "multipart/form-data" in plain.json()["error"]
        unknown = _post(client, [("a.png", small)], "?model=nope")
        assert unknown.status_code == 400 and "unknown model 'nope'" in unknown.json()["error"]
        tmp = client.app.state.service.tmp
    assert not tmp.exists()  # the private temp folder goes with the service


def test_concurrent_requests_are_answered_and_batched(serve_class_run, tmp_path) -> None:
    # a long max wait: the batch is run as soon as all 8 images are queued (max_batch 8)
    config = _config(serve_class_run, max_batch=8, max_wait_ms=5000)
    films = [_png(tmp_path / f"{i}.png", (40, 40 + i), seed=i).read_bytes() for i in range(8)]
    with TestClient(create_app(config)) as client:
        start = threading.Barrier(len(films))
        answers: dict[int, dict] = {}

        def one(i: int) -> None:
            start.wait()
            response = _post(client, [(f"{i}.png", films[i])])
            answers[i] = {"code": response.status_code, **response.json()}

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(films))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = client.app.state.service.batcher.stats
        assert sorted(answers) == list(range(8))
        assert all(a["code"] == 200 and a["results"][0]["status"] == "ok" for a in answers.values())
        assert [a["results"][0]["file"] for _, a in sorted(answers.items())] == [
            f"{i}.png" for i in range(8)
        ]
        assert stats.items == 8 and stats.largest > 1 and stats.batches < 8
        assert client.get("/healthz").json()["batching"]["largest"] == stats.largest


def test_a_full_queue_answers_503_with_retry_after(serve_class_run, tmp_path) -> None:
    config = _config(serve_class_run, max_queue=2, max_wait_ms=0)
    film = _png(tmp_path / "a.png", (40, 40)).read_bytes()
    with TestClient(create_app(config)) as client:
        service = client.app.state.service
        release, entered = threading.Event(), threading.Event()
        run_batch = service.batcher.fn

        def held(key, batch):  # the model is busy until the test lets it go
            entered.set()
            release.wait(30)
            return run_batch(key, batch)

        service.batcher.fn = held
        first: dict = {}
        worker = threading.Thread(
            target=lambda: first.update(r=_post(client, [("a.png", film), ("b.png", film)]))
        )
        worker.start()
        assert entered.wait(30) and service.batcher.admitted == 2
        refused = _post(client, [("c.png", film)])
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "busy" in refused.json()["error"]
        release.set()
        worker.join(30)
        assert first["r"].status_code == 200
        assert [r["status"] for r in first["r"].json()["results"]] == ["ok", "ok"]
        assert service.batcher.admitted == 0 and service.batcher.stats.refused == 1
        assert _post(client, [("c.png", film)]).status_code == 200  # room again


def test_a_failing_batch_is_an_error_entry_and_the_worker_goes_on(serve_class_run, tmp_path):
    film = _png(tmp_path / "a.png", (40, 40)).read_bytes()
    with TestClient(create_app(_config(serve_class_run))) as client:
        service = client.app.state.service
        run_batch = service.batcher.fn

        def broken(key, batch):
            raise RuntimeError("out of memory")

        service.batcher.fn = broken
        failed = _post(client, [("a.png", film)]).json()["results"][0]
        assert failed == {
            "file": "a.png",
            "status": "error",
            "error": "prediction failed: out of memory",
            "height": 40,
            "width": 40,
        }
        service.batcher.fn = run_batch
        assert _post(client, [("a.png", film)]).json()["results"][0]["status"] == "ok"


def test_client_file_names_are_labels_only(client, tmp_path) -> None:
    film = _png(tmp_path / "a.png", (40, 40)).read_bytes()
    answer = _post(client, [("../../etc/passwd", film), ("C:\\x\\y.png", b"")]).json()
    assert [r["file"] for r in answer["results"]] == ["passwd", "y.png"]
    assert answer["results"][0]["status"] == "ok"  # read from the upload, not from a path


def test_cli_serve_usage_errors_are_one_line(capsys, tmp_path) -> None:
    assert main(["serve", "--run", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"spcxr serve: error: {tmp_path / 'nope'}: no such run folder"]
    assert main(["serve", "--run", "x", "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "--run is required" in capsys.readouterr().err


@pytest.mark.slow
def test_spcxr_serve_command_answers_on_loopback_and_cleans_up(serve_class_run, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    command = [sys.executable, "-m", "spcxr", "serve", "--run", str(serve_class_run)]
    command += ["--port", str(port), "--device", "cpu", "--threads", "1"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "spcxr serve did not start"
                time.sleep(0.1)
        assert health.json()["models"] == ["cls"]
        assert [p.name.startswith("spcxr-serve-") for p in temp.iterdir()] == [True]
        film = _png(tmp_path / "a.png", (40, 40)).read_bytes()
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/predict", files=[("files", ("a.png", film))], timeout=60
        )
        assert answer.json()["results"][0]["status"] == "ok"
    finally:
        server.send_signal(signal.SIGINT)
        output = server.communicate(timeout=60)[0].decode()
    assert server.returncode == 0, output
    assert "Uvicorn running on http://127.0.0.1:" in output  # the default address: loopback
    assert list(temp.iterdir()) == []  # the private temp folder went with the server


def test_an_upload_that_cannot_be_stored_is_an_error_entry(client, tmp_path, monkeypatch):
    film = _png(tmp_path / "a.png", (40, 40)).read_bytes()
    service = client.app.state.service
    monkeypatch.setattr(service, "tmp", tmp_path / "gone")  # e.g. the temp folder was removed
    answer = _post(client, [("a.png", film)])
    assert answer.status_code == 200
    assert answer.json()["results"] == [
        {
            "file": "a.png",
            "status": "error",
            "error": "could not store the upload: No such file or directory",
        }
    ]

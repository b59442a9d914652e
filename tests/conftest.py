"""Shared fixtures: the real-data folder (skipped with a reason when absent)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spcxr.paths import ENV_VAR, shared_data_dir


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread per test process: on a shared 2-core machine, two OpenMP threads
    fighting other processes make small models several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """Make folders for one test module's shared fixtures; they are removed when the module's
    tests are done. Trained runs weigh 100-200 MB each: kept to the end of the session they
    added up to 11 GB per `make test` and filled a CI disk (pyproject's tmp_path retention
    policy "failed" does the same for each test's own tmp_path)."""
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Every test starts from the same global random state, whatever ran before it: a test that
    draws from torch / numpy / random without its own generator still gives the same numbers in
    any order and on every run."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def sigterm_group_after_first_log_line(
    argv: list[str], run: Path, timeout: float = 120
) -> tuple[int, str, str]:
    """Start ``argv`` in a session of its own, wait for its first ``run/log.jsonl`` line, then
    send SIGTERM to its whole process group (data-loader workers included), as ``kill -- -PGID``
    or a cluster scheduler does. Returns ``(exit status, stdout, stderr)``."""
    import os
    import signal

    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        wait_for_first_log_line(proc, run, timeout=timeout)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def wait_for_first_log_line(proc: subprocess.Popen, run: Path, timeout: float) -> None:
    """Block until the training ``proc`` has written its first ``run/log.jsonl`` line; fail
    with its output if it exits first or ``timeout`` seconds pass."""
    import time

    log_file = run / "log.jsonl"
    deadline = time.monotonic() + timeout
    while not log_file.is_file() or not log_file.read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)


def console_script() -> str:
    """The installed ``spcxr`` script: beside this interpreter (the README's venv), else on PATH.

    Skips the calling test when spcxr is not installed as a package (``pip install -e .``).
    """
    import shutil
    import sys

    script = Path(sys.executable).with_name("spcxr")
    if script.is_file():
        return str(script)
    found = shutil.which("spcxr")
    if found is None:
        pytest.skip("the spcxr console script is not installed (pip install -e .)")
    return found


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real chest X-ray folder; skips the test when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip(
            f"real chest X-ray folder not found: set {ENV_VAR} or place it at ../shared/data/cxr"
        )
    return path


def write_smooth_images(root: Path, n_patients: int, per_patient: int = 2, size: int = 64) -> Path:
    """Class folders of small smooth random grayscale PNGs (``CLASS/personN_M.png``)."""
    import numpy as np
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    k = 0
    for p in range(n_patients):
        label = "abnormal" if p % 2 else "normal"
        (root / label).mkdir(parents=True, exist_ok=True)
        for _ in range(per_patient):
            rng = np.random.default_rng(k)
            img = gaussian_filter(rng.random((size, size)), 3)
            img = (img - img.min()) / (img.max() - img.min())
            Image.fromarray((img * 255).astype(np.uint8)).save(root / label / f"person{p}_{k}.png")
            k += 1
    return root


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A prepared store of 96 small synthetic images (48 patients), 40 px."""
    from spcxr.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("tiny")
    write_smooth_images(root / "images", n_patients=48)
    prepare(
        PrepareConfig(
            sources=[f"folder:{root / 'images'}"],
            out=str(root / "store"),
            image_size=40,
            workers=1,
            progress=False,
        )
    )
    return root / "store"


@pytest.fixture(scope="session")
def synth_store(tmp_path_factory) -> Path:
    """A store of the synthetic phantom set: 3 labels, 3 sites, lung masks; 64 px."""
    from spcxr.data.prepare import PrepareConfig, prepare
    from spcxr.data.synthetic import SyntheticConfig, write_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root / "synthetic", SyntheticConfig(n_patients=40, size=96, seed=3))
    prepare(
        PrepareConfig(
            sources=[f"synthetic=csv:{root / 'synthetic'}"],
            out=str(root / "store"),
            image_size=64,
            workers=1,
            progress=False,
        )
    )
    return root / "store"


def tiny_pretrain_config(store: Path, out: Path, **overrides):
    """A ViT-Ti/8 GMML run at 32 px on the CPU: a few steps take seconds. Keyword arguments
    override any :class:`~spcxr.pretrain.engine.PretrainConfig` field."""
    from spcxr.pretrain.engine import OptimConfig, PretrainConfig
    from spcxr.pretrain.gmml import GMMLConfig

    settings = dict(
        store=str(store),
        out=str(out),
        model=GMMLConfig(arch="vit_tiny", img_size=32, patch_size=8, drop_path_rate=0.1),
        optim=OptimConfig(lr=1e-3, warmup_epochs=0.2),
        batch_size=8,
        max_steps=8,
        device="cpu",
        workers=0,
        log_every=2,
        checkpoint_every=4,
        preview_every=4,
        progress=False,
        tensorboard=False,
    )
    settings.update(overrides)
    return PretrainConfig(**settings)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Runs a module's tiny models on one intra-op thread (restored afterwards).

    They gain nothing from more, and on a shared CPU OpenMP workers waiting for a busy core make
    them several times slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

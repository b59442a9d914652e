"""Cases and the data set on disk: ``generate_case`` draws one case, ``iter_synthetic_cases``
the patients (with follow-ups) of a ``SyntheticConfig``, ``write_synthetic_dataset`` writes
them as PNG files and a ``manifest.csv``."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from spcxr.atomic import naming
from spcxr.data.synthetic.acquire import acquire
from spcxr.data.synthetic.anatomy import Anatomy, Pose, followup_pose, sample_anatomy, sample_pose
from spcxr.data.synthetic.config import MANIFEST_COLUMNS, SiteProfile, SyntheticConfig, site_profile
from spcxr.data.synthetic.findings import Pathology, sample_pathology
from spcxr.data.synthetic.grids import _u
from spcxr.data.synthetic.render import render_attenuation


def render_case(
    anatomy: Anatomy,
    pose: Pose,
    pathology: Pathology,
    profile: SiteProfile,
    size: int,
    rng: np.random.Generator,
    site: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32 ``[size, size]`` in ``[0, 1]``) and lung mask (bool) of one exposure."""
    attenuation, mask = render_attenuation(anatomy, pose, pathology, size)
    return acquire(attenuation, profile, pose.exposure, rng, site, pose.exposure_tilt), mask


@cache
def _prefer_heap_allocations() -> None:
    """Let glibc serve the generator's many short-lived 64 KB - 1 MB arrays from its heap.

    glibc allocates blocks above its mmap threshold (128 KB at start) with ``mmap`` and gives
    them back to the OS on ``free``, so every temporary image costs fresh page faults: in
    sandboxed or virtualised machines that is about 3x the arithmetic. Freeing one large block
    raises the threshold (glibc's documented dynamic heuristic), after which such blocks are
    reused. It changes no result, and does nothing on other allocators.
    """
    block = np.empty(16 << 20, dtype=np.uint8)
    del block


def _children(rng: np.random.Generator, n: int) -> list[np.random.Generator]:
    """Independent child generators, so that e.g. the anatomy does not depend on the label."""
    return [np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=n)]


def generate_case(
    rng: np.random.Generator,
    label: str,
    site: str,
    size: int,
    *,
    severity: float | None = None,
    view: str = "PA",
    sex: str | None = None,
    age: int | None = None,
    profile: SiteProfile | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic radiograph and its lung mask.

    The anatomy, pose, pathology and acquisition noise come from separate child generators of
    ``rng``, so the same ``rng`` state with another label (or severity, or site) gives the same
    patient and the same noise: only the disease (or the acquisition) differs.

    Args:
        rng: source of randomness (consumed).
        label: one of ``LABELS``.
        site: a site name with a default profile, unless ``profile`` is given.
        size: image side in pixels.
        severity: pathology severity (default: drawn in [0.35, 0.8]).
        view: ``"PA"`` or ``"AP"``.
        sex: ``"M"`` / ``"F"`` (default: drawn).
        age: years (default: drawn in [18, 90]).
        profile: acquisition profile overriding the site's default.

    Returns:
        ``(image, mask)``: float32 ``[size, size]`` in ``[0, 1]`` and bool ``[size, size]``.
    """
    profile = site_profile(site) if profile is None else profile
    _prefer_heap_allocations()
    anatomy_rng, pathology_rng, pose_rng, noise_rng = _children(rng, 4)
    if sex is None:
        sex = "M" if anatomy_rng.random() < 0.5 else "F"
    if age is None:
        age = int(anatomy_rng.integers(18, 91))
    anatomy = sample_anatomy(anatomy_rng, sex=sex, age=age)
    pose = sample_pose(pose_rng, view)
    pathology = sample_pathology(pathology_rng, label, anatomy, severity)
    return render_case(anatomy, pose, pathology, profile, size, noise_rng, site)


@dataclass(frozen=True, eq=False)
class SyntheticCase:
    """One generated image with its metadata (a manifest row before writing)."""

    image_id: str
    patient_id: str
    site: str
    label: str
    view: str
    sex: str
    age: int
    image: np.ndarray
    mask: np.ndarray


def iter_synthetic_cases(config: SyntheticConfig | None = None) -> Iterator[SyntheticCase]:
    """Every image of the data set described by ``config``, patient by patient.

    Follow-ups share the patient's anatomy and label; their pose, exposure, view and disease
    severity change a little (the disease progresses or resolves), so no two are identical.
    """
    config = SyntheticConfig() if config is None else config
    _prefer_heap_allocations()
    classes = list(config.classes)
    for index in range(config.n_patients):
        site = config.sites[index % len(config.sites)]
        profile = config.site_profiles[site]
        rng = np.random.default_rng([config.seed, index])
        label = classes[int(rng.choice(len(classes), p=config.label_probabilities(site)))]
        sex = "M" if rng.random() < 0.5 else "F"
        age = int(rng.integers(config.age_range[0], config.age_range[1] + 1))
        n_images = int(rng.integers(config.images_per_patient[0], config.images_per_patient[1] + 1))
        anatomy_rng, pathology_rng, pose_rng, noise_rng = _children(rng, 4)
        anatomy = sample_anatomy(anatomy_rng, sex=sex, age=age)
        severity = _u(pathology_rng, *config.severity)
        pathology = sample_pathology(pathology_rng, label, anatomy, severity)
        trend = _u(pathology_rng, -0.5, 0.35)  # < 0: resolving, > 0: progressing
        patient_id = f"{config.id_prefix}-{site}-{index:05d}"
        # Follow-ups are displaced from the first image in directions 60-100 degrees apart, so
        # that no two images of the patient end up in the same position.
        direction = _u(pose_rng, 0.0, 2.0 * math.pi)
        base = None
        for k in range(n_images):
            view = "AP" if pose_rng.random() < profile.ap_fraction else "PA"
            if base is None:
                pose = base = sample_pose(pose_rng, view)
            else:
                direction += math.radians(_u(pose_rng, 60.0, 100.0))
                pose = followup_pose(base, pose_rng, view, direction)
            image, mask = render_case(
                anatomy,
                pose,
                pathology.evolved(math.exp(trend * k)),
                profile,
                config.size,
                noise_rng,
                site,
            )
            yield SyntheticCase(
                image_id=f"{patient_id}-{k}",
                patient_id=patient_id,
                site=site,
                label=label,
                view=view,
                sex=sex,
                age=age,
                image=image,
                mask=mask,
            )


def write_synthetic_dataset(
    out_dir: str | Path, config: SyntheticConfig | None = None, *, progress: bool = False
) -> Path:
    """Write the synthetic data set: images, lung masks and a manifest.

    Layout: ``out_dir/images/<id>.png`` (16-bit grayscale), ``out_dir/masks/<id>.png`` (8-bit,
    0/255) and ``out_dir/manifest.csv`` with columns ``file, mask_file, label, patient_id, site,
    view, sex, age`` (paths relative to ``out_dir``), readable by the generic CSV source adapter.
    The same config gives byte-identical files.

    Returns:
        The path of ``manifest.csv`` (written last, atomically).
    """
    config = SyntheticConfig() if config is None else config
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    cases = iter_synthetic_cases(config)
    if progress:
        from tqdm import tqdm

        expected = config.n_patients * sum(config.images_per_patient) / 2
        cases = tqdm(cases, total=round(expected), desc="synthetic", unit="img")
    rows = []
    for case in cases:
        image_file = f"images/{case.image_id}.png"
        mask_file = f"masks/{case.image_id}.png"
        pixels = np.round(case.image * 65535.0).astype(np.uint16)
        # Pillow removes a file it could not finish; naming() puts the file in the error line.
        with naming(out / image_file):
            Image.fromarray(pixels).save(out / image_file, compress_level=config.png_compress_level)
        with naming(out / mask_file):
            Image.fromarray(case.mask.astype(np.uint8) * 255).save(
                out / mask_file, compress_level=1
            )
        rows.append(
            (
                image_file,
                mask_file,
                case.label,
                case.patient_id,
                case.site,
                case.view,
                case.sex,
                case.age,
            )
        )
    manifest = out / "manifest.csv"
    tmp = out / "manifest.csv.tmp"
    try:
        with naming(manifest), tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(MANIFEST_COLUMNS)
            writer.writerows(rows)
        os.replace(tmp, manifest)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a half-written manifest
    return manifest

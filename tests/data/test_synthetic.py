"""Tests of the embedded synthetic chest-radiograph generator (spcxr.data.synthetic)."""

from __future__ import annotations

import csv
import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage, signal

from spcxr.data.synthetic import (
    LABELS,
    MANIFEST_COLUMNS,
    Pathology,
    SiteProfile,
    SyntheticConfig,
    followup_pose,
    generate_case,
    iter_synthetic_cases,
    render_case,
    sample_anatomy,
    sample_pose,
    site_profile,
    write_synthetic_dataset,
)

SIZE = 128
SITES = ("site_a", "site_b", "site_c")


def case(seed: int, label: str = "normal", site: str = "site_a", size: int = SIZE, **kw):
    return generate_case(np.random.default_rng(seed), label, site, size, **kw)


def lungs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image-left lung, image-right lung) masks of a two-lung mask."""
    labels, n = ndimage.label(mask)
    assert n == 2, f"expected 2 lungs, found {n} connected components"
    first, second = labels == 1, labels == 2
    if np.nonzero(first)[1].mean() > np.nonzero(second)[1].mean():
        first, second = second, first
    return first, second


def thumbnail(image: np.ndarray) -> np.ndarray:
    """The near-duplicate key of spcxr's dedup: 32 x 32 rank-equalised unit vector."""
    u8 = np.round(image * 255).astype(np.uint8)
    small = np.asarray(Image.fromarray(u8).resize((32, 32), Image.Resampling.BILINEAR), np.float32)
    ranks = np.empty(small.size, np.float32)
    ranks[np.argsort(small.ravel(), kind="stable")] = np.arange(small.size, dtype=np.float32)
    ranks -= ranks.mean()
    return ranks / np.linalg.norm(ranks)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ------------------------------------------------------------------------------------------
# single cases


def test_same_seed_same_case_and_other_seed_differs():
    image, mask = case(3, "consolidation", "site_b")
    again, mask_again = case(3, "consolidation", "site_b")
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(mask, mask_again)
    other, other_mask = case(4, "consolidation", "site_b")
    assert np.abs(other - image).mean() > 0.02
    assert (other_mask != mask).mean() > 0.01


@pytest.mark.parametrize(("label", "site"), list(zip(LABELS, SITES, strict=True)))
def test_dtype_shape_and_range(label, site):
    image, mask = case(11, label, site, size=96)
    assert image.dtype == np.float32 and image.shape == (96, 96)
    assert mask.dtype == np.bool_ and mask.shape == (96, 96)
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0.15  # a radiograph, not a flat field


@pytest.mark.parametrize("seed", range(6))
def test_two_lungs_of_plausible_size_right_lung_larger(seed):
    _, mask = case(seed, LABELS[seed % 3], SITES[seed % 3], view="AP" if seed == 5 else "PA")
    image_left, image_right = lungs(mask)
    for lung in (image_left, image_right):
        assert 0.05 < lung.mean() < 0.25  # fraction of the image (real masks: ~0.08-0.16)
    # Image left = the patient's right lung: larger, the heart indents the left one.
    assert image_left.sum() > 1.02 * image_right.sum()
    # The left lung lies left of the image centre, the right lung right of it.
    cols = np.arange(SIZE)[None, :]
    assert (cols * image_left).sum() / image_left.sum() < SIZE / 2 - SIZE / 10
    assert (cols * image_right).sum() / image_right.sum() > SIZE / 2 + SIZE / 10


@pytest.mark.parametrize("site", SITES)
def test_lungs_darker_than_mediastinum(site):
    image, mask = case(21, "normal", site)
    strip = image[SIZE // 4 : 3 * SIZE // 4, SIZE // 2 - 3 : SIZE // 2 + 3]
    assert image[mask].mean() < strip.mean() - 0.15
    # Outside the body (top corners above the shoulders) is darker still than the lungs.
    assert image[:4, :4].mean() < image[mask].mean()


@pytest.mark.parametrize("seed", range(4))
def test_ribs_make_the_lung_profile_oscillate(seed):
    image, mask = case(seed, LABELS[seed % 3], SITES[seed % 3], size=256)
    image_left, _ = lungs(mask)
    rows, cols = np.nonzero(image_left)
    col = int(np.percentile(cols, 30))  # lateral third: ribs, few large vessels
    top, bottom = rows[cols == col].min() + 4, rows[cols == col].max() - 4
    profile = image[top:bottom, col - 2 : col + 3].mean(axis=1)
    band = ndimage.gaussian_filter1d(profile, 1.5) - ndimage.gaussian_filter1d(profile, 6)
    peaks, _ = signal.find_peaks(band, prominence=0.5 * band.std())
    # Posterior ribs cross the lung every 13-23 px at this size, regularly; without ribs the
    # vessel texture alone gives 3-4 irregular peaks.
    gaps = np.diff(peaks)
    assert len(peaks) >= 5, f"{len(peaks)} peaks"
    assert 10 <= np.median(gaps) <= 24
    assert gaps.std() < 0.35 * gaps.mean()


def test_pathology_brightens_lungs_and_keeps_the_mask():
    normal, mask = case(8, "normal", "site_a", severity=0.7)
    for label in ("consolidation", "bilateral_opacities"):
        sick, sick_mask = case(8, label, "site_a", severity=0.7)
        np.testing.assert_array_equal(sick_mask, mask)  # same patient, same lungs
        # Same rng: same anatomy, pose and noise; the disease changes only the lungs (plus
        # the detector blur's reach).
        outside = ~ndimage.binary_dilation(mask, iterations=3)
        assert np.abs(sick - normal)[outside].max() < 1e-4
        assert sick[mask].mean() > normal[mask].mean() + 0.01, label
        # ...and more so with a higher severity.
        worse, _ = case(8, label, "site_a", severity=1.0)
        assert worse[mask].mean() > sick[mask].mean()


def test_consolidation_is_focal_in_one_lung():
    diffs = []
    for seed in range(4):
        normal, mask = case(seed, "normal", "site_a", severity=0.8)
        sick, _ = case(seed, "consolidation", "site_a", severity=0.8)
        first, second = lungs(mask)
        diff = sick - normal
        per_lung = sorted([diff[first].mean(), diff[second].mean()])
        diffs.append(per_lung)
        inside = diff[first | second]
        # Focal: most of the lung is untouched, a patch is much brighter.
        assert np.percentile(inside, 50) < 0.01
        assert np.percentile(inside, 99) > 0.1
    for small, large in diffs:
        assert large > 5 * max(small, 1e-3)


def test_bilateral_opacities_in_both_lungs_peripheral_and_lower():
    upper = lower = medial = lateral = 0.0
    for seed in range(4):
        normal, mask = case(seed, "normal", "site_a", severity=0.9)
        sick, _ = case(seed, "bilateral_opacities", "site_a", severity=0.9)
        diff = sick - normal
        for lung, outward in zip(lungs(mask), (-1, 1), strict=True):
            assert diff[lung].mean() > 0.01  # both lungs
            rows, cols = np.nonzero(lung)
            values = diff[rows, cols]
            low = rows > np.median(rows)
            out = outward * cols > np.median(outward * cols)
            upper += values[~low].mean()
            lower += values[low].mean()
            medial += values[~out].mean()
            lateral += values[out].mean()
    assert lower > 1.5 * upper
    assert lateral > 1.5 * medial


def test_sites_differ_in_noise_contrast_and_marker():
    images = {site: case(5, "normal", site, size=256) for site in SITES}
    mask = images["site_a"][1]
    inner = ndimage.binary_erosion(mask, iterations=4)

    def noise(image):
        # High-pass residual in a smooth region (liver, below the right dome).
        region = image[218:248, 64:102]
        return (region - ndimage.gaussian_filter(region, 1.0)).std()

    def contrast(image):
        return image[64:192, 122:134].mean() - image[inner].mean()  # mediastinum - lungs

    a, b, c = (images[s][0] for s in SITES)
    assert noise(b) > 2.0 * noise(a)
    assert noise(c) > 1.4 * noise(a)
    assert contrast(c) > contrast(a) + 0.08  # steep gamma, narrow window
    assert contrast(a) > contrast(b) + 0.03  # washed-out display
    # Only site_c burns a bright marker with dark "text" into the top right corner.
    corner = (slice(10, 26), slice(212, 244))
    assert (c[corner] > 0.9).mean() > 0.3 and c[corner].min() < 0.2
    assert (a[corner] > 0.9).mean() < 0.05
    # Same patient, same anatomy: the masks agree.
    for site in SITES:
        np.testing.assert_array_equal(images[site][1], mask)


def test_followups_similar_but_not_duplicates():
    rng = np.random.default_rng(7)
    anatomy = sample_anatomy(rng, sex="F", age=60)
    base = sample_pose(rng)
    profile = site_profile("site_a")
    normal = Pathology("normal")
    first, _ = render_case(anatomy, base, normal, profile, 256, rng)
    later = [render_case(anatomy, followup_pose(base, rng), normal, profile, 256, rng)[0]]
    later.append(render_case(anatomy, followup_pose(base, rng), normal, profile, 256, rng)[0])
    other = [case(seed, "normal", "site_a", size=256)[0] for seed in (100, 101)]
    for image in later:
        assert 0.8 < corr(first, image) < 0.999
        # Not near-duplicates for spcxr's dedup (thumbnail correlation >= 0.98 merges).
        assert float(thumbnail(first) @ thumbnail(image)) < 0.98
    same = np.mean([corr(first, image) for image in later])
    different = np.mean([corr(first, image) for image in other])
    assert different < same - 0.05


def test_dataset_followups_are_distinct_images_of_one_patient():
    config = SyntheticConfig(n_patients=6, images_per_patient=(3, 3), size=128, seed=4)
    by_patient: dict[str, list] = {}
    for item in iter_synthetic_cases(config):
        by_patient.setdefault(item.patient_id, []).append(item)
    assert len(by_patient) == 6
    same, thumbs = [], []
    for items in by_patient.values():
        assert len({(i.label, i.sex, i.age, i.site) for i in items}) == 1
        for x, y in itertools.combinations(items, 2):
            same.append(corr(x.image, y.image))
            thumbs.append(float(thumbnail(x.image) @ thumbnail(y.image)))
            assert not np.array_equal(x.image, y.image)
    different = [
        corr(a[0].image, b[0].image)
        for a, b in itertools.combinations(by_patient.values(), 2)
        if a[0].site == b[0].site
    ]
    assert max(same) < 0.999 and max(thumbs) < 0.98
    assert np.mean(same) > np.mean(different) + 0.05


def test_label_prevalence_differs_per_site():
    config = SyntheticConfig(n_patients=300, images_per_patient=(1, 1), size=32, seed=1)
    counts = {site: dict.fromkeys(LABELS, 0) for site in SITES}
    for item in iter_synthetic_cases(config):
        counts[item.site][item.label] += 1
    # Defaults: bilateral opacities 0.2 at site_a, 0.5 at site_c; consolidation 0.4 at site_b.
    assert counts["site_c"]["bilateral_opacities"] > 2 * counts["site_a"]["bilateral_opacities"]
    assert counts["site_b"]["consolidation"] > counts["site_c"]["consolidation"] + 10
    assert all(sum(c.values()) == 100 for c in counts.values())


# ------------------------------------------------------------------------------------------
# files


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_write_dataset_files_manifest_and_determinism(tmp_path):
    config = SyntheticConfig(n_patients=6, images_per_patient=(1, 2), size=64, seed=3)
    manifest = write_synthetic_dataset(tmp_path / "a", config)
    assert manifest == tmp_path / "a" / "manifest.csv"
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
        rows = list(reader)
    assert 6 <= len(rows) <= 12
    assert len(list((tmp_path / "a" / "images").iterdir())) == len(rows)
    assert len(list((tmp_path / "a" / "masks").iterdir())) == len(rows)
    assert len({r["patient_id"] for r in rows}) == 6
    for row in rows:
        assert row["patient_id"].startswith(f"synth-{row['site']}-000")
        assert row["label"] in LABELS and row["site"] in SITES
        assert row["view"] in ("PA", "AP") and row["sex"] in ("M", "F")
        assert 18 <= int(row["age"]) <= 90
        with Image.open(tmp_path / "a" / row["file"]) as im:
            assert im.mode in ("I;16", "I") and im.size == (64, 64)
            pixels = np.asarray(im)
        assert pixels.max() > 40000 and pixels.min() < 20000  # uses the 16-bit range
        with Image.open(tmp_path / "a" / row["mask_file"]) as im:
            assert im.mode == "L"
            mask = np.asarray(im)
        assert set(np.unique(mask)) == {0, 255}
        assert ndimage.label(mask > 0)[1] == 2
    # Same config: byte-identical files; another seed: different images.
    write_synthetic_dataset(tmp_path / "b", config)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.*"))
    for rel in files:
        assert sha(tmp_path / "a" / rel) == sha(tmp_path / "b" / rel), rel
    other = SyntheticConfig(n_patients=6, images_per_patient=(1, 2), size=64, seed=4)
    write_synthetic_dataset(tmp_path / "c", other)
    first = rows[0]["file"]
    if (tmp_path / "c" / first).exists():
        assert sha(tmp_path / "a" / first) != sha(tmp_path / "c" / first)


def test_adding_patients_keeps_the_earlier_ones():
    small = list(iter_synthetic_cases(SyntheticConfig(n_patients=2, size=48, seed=9)))
    large = list(iter_synthetic_cases(SyntheticConfig(n_patients=4, size=48, seed=9)))
    for a, b in zip(small, large, strict=False):
        assert a.image_id == b.image_id
        np.testing.assert_array_equal(a.image, b.image)


# ------------------------------------------------------------------------------------------
# configuration errors


def test_bad_configuration_is_rejected_with_the_reason():
    with pytest.raises(ValueError, match="classes"):
        SyntheticConfig(classes=("normal", "tuberculosis"))
    with pytest.raises(ValueError, match="site_x"):
        SyntheticConfig(sites=("site_a", "site_x"))
    with pytest.raises(ValueError, match="images_per_patient"):
        SyntheticConfig(images_per_patient=(2, 1))
    with pytest.raises(ValueError, match="class_weights"):
        SyntheticConfig(class_weights={"site_a": {"normal": -1.0}})
    with pytest.raises(ValueError, match="unknown site"):
        case(0, "normal", "hospital_9")
    with pytest.raises(ValueError, match="unknown label"):
        case(0, "pneumothorax", "site_a")
    with pytest.raises(ValueError, match="window"):
        SiteProfile(window=(0.8, 0.2))


def test_custom_site_profile_and_classes():
    profiles = {"north": SiteProfile(noise_std=0.0, blur_sigma=0.0, marker="bottom_left")}
    config = SyntheticConfig(
        n_patients=2,
        images_per_patient=(1, 1),
        size=128,
        sites=("north",),
        classes=("normal",),
        site_profiles=profiles,
    )
    items = list(iter_synthetic_cases(config))
    assert [i.patient_id for i in items] == ["synth-north-00000", "synth-north-00001"]
    assert {i.label for i in items} == {"normal"}
    marker = items[0].image[-12:-6, 6:24]  # the burned-in label, in the configured corner
    assert (marker > 0.9).mean() > 0.3 and marker.min() < 0.2
    assert (items[0].image[6:12, -24:-6] > 0.9).mean() < 0.05  # and not in the default one


def test_config_accepts_yaml_shapes():
    # What a YAML file gives: lists instead of tuples, mappings instead of SiteProfile.
    config = SyntheticConfig(
        images_per_patient=[2, 2],
        sites=["east"],
        site_profiles={"east": {"window": [0.1, 0.9], "noise_std": 0.02, "marker": None}},
        class_weights={"east": {"normal": 1.0}},
        n_patients=1,
        size=48,
    )
    assert config.images_per_patient == (2, 2) and config.sites == ("east",)
    assert config.site_profiles["east"].window == (0.1, 0.9)
    items = list(iter_synthetic_cases(config))
    assert len(items) == 2 and {i.label for i in items} == {"normal"}

"""What the synthetic set holds: labels, views, the acquisition profile of each synthetic site
(``SiteProfile``) and the data set's settings (``SyntheticConfig``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

LABELS = ("normal", "consolidation", "bilateral_opacities")
MANIFEST_COLUMNS = ("file", "mask_file", "label", "patient_id", "site", "view", "sex", "age")
VIEWS = ("PA", "AP")
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


@dataclass(frozen=True)
class SiteProfile:
    """Acquisition of one synthetic hospital: what makes its images drift from the others.

    Attributes:
        gamma: display gamma applied after windowing (> 1 darkens mid-tones, more contrast in
            bright regions; < 1 washes out).
        window: detector signal mapped to ``[0, 1]`` (lower, upper); narrower = more contrast.
        noise_std: standard deviation of the additive quantum-like noise, in display units.
        blur_sigma: Gaussian blur in pixels at 256 px (scaled with the image size, at least
            0.5 px when > 0): resolution.
        offset: intensity offset added after noise (a different display calibration).
        gradient: top-to-bottom intensity ramp amplitude (anode heel effect / uneven exposure).
        marker: corner of a burned-in text-like label, or ``None``.
        ap_fraction: probability that an image is an AP (portable) view instead of PA.
    """

    gamma: float = 1.0
    window: tuple[float, float] = (0.0, 1.0)
    noise_std: float = 0.01
    blur_sigma: float = 0.5
    offset: float = 0.0
    gradient: float = 0.0
    marker: str | None = None
    ap_fraction: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", tuple(self.window))  # YAML gives lists
        lo, hi = self.window
        if not 0.0 <= lo < hi <= 1.5:
            raise ValueError(
                f"SiteProfile.window must satisfy 0 <= lower < upper <= 1.5, got {self.window}"
            )
        if self.gamma <= 0 or self.noise_std < 0 or self.blur_sigma < 0:
            raise ValueError(
                "SiteProfile: gamma must be > 0, noise_std and blur_sigma >= 0, got "
                f"gamma={self.gamma}, noise_std={self.noise_std}, blur_sigma={self.blur_sigma}"
            )
        if self.marker is not None and self.marker not in CORNERS:
            raise ValueError(
                f"SiteProfile.marker must be one of {CORNERS} or None, got {self.marker!r}"
            )
        if not 0.0 <= self.ap_fraction <= 1.0:
            raise ValueError(f"SiteProfile.ap_fraction must be in [0, 1], got {self.ap_fraction}")


def default_site_profiles() -> dict[str, SiteProfile]:
    """Three hospitals that differ the way real ones do (contrast, noise, resolution, labels).

    ``site_a`` is a clean modern DR unit; ``site_b`` an older, noisier, blurrier CR unit with a
    washed-out display; ``site_c`` a high-contrast unit that burns a marker into the corner and
    images many patients AP at the bedside (like the portable COVID films in public sets).
    """
    return {
        "site_a": SiteProfile(
            gamma=1.0, window=(0.02, 0.98), noise_std=0.008, blur_sigma=0.45, ap_fraction=0.05
        ),
        "site_b": SiteProfile(
            gamma=0.75,
            window=(0.0, 1.05),
            noise_std=0.028,
            blur_sigma=1.3,
            offset=0.04,
            gradient=0.05,
            ap_fraction=0.15,
        ),
        "site_c": SiteProfile(
            gamma=1.45,
            window=(0.12, 0.95),
            noise_std=0.016,
            blur_sigma=0.7,
            offset=-0.02,
            marker="top_right",
            ap_fraction=0.45,
        ),
    }


def default_class_weights() -> dict[str, dict[str, float]]:
    """Label prevalence per site: different on purpose, so that drift experiments see it."""
    return {
        "site_a": {"normal": 0.5, "consolidation": 0.3, "bilateral_opacities": 0.2},
        "site_b": {"normal": 0.4, "consolidation": 0.4, "bilateral_opacities": 0.2},
        "site_c": {"normal": 0.3, "consolidation": 0.2, "bilateral_opacities": 0.5},
    }


@dataclass
class SyntheticConfig:
    """What ``write_synthetic_dataset`` generates.

    Attributes:
        n_patients: number of patients; patient ``i`` goes to site ``sites[i % len(sites)]``.
        images_per_patient: inclusive range of images (follow-ups) per patient.
        size: image side in pixels (square images).
        sites: site names; each needs a profile in ``site_profiles``.
        classes: labels to draw, a subset of ``LABELS``.
        class_weights: per site, label -> prevalence (renormalised over ``classes``); a site
            missing here gets equal weights.
        seed: root seed; patient ``i`` is drawn from ``SeedSequence([seed, i])``, so adding
            patients never changes the earlier ones.
        severity: range of pathology severity (0 = invisible, 1 = as dense as soft tissue).
        age_range: inclusive range of ages in years; ages below 16 get pediatric proportions.
        site_profiles: acquisition per site.
        id_prefix: first part of patient ids (``synth-site_a-00012``).
        png_compress_level: zlib level of the written PNGs. 0 stores the noisy 16-bit pixels
            uncompressed: deflate saves only ~2 % on them and would cost more time than
            generating the image.
    """

    n_patients: int = 120
    images_per_patient: tuple[int, int] = (1, 3)
    size: int = 256
    sites: tuple[str, ...] = ("site_a", "site_b", "site_c")
    classes: tuple[str, ...] = LABELS
    class_weights: dict[str, dict[str, float]] = field(default_factory=default_class_weights)
    seed: int = 0
    severity: tuple[float, float] = (0.35, 0.8)
    age_range: tuple[int, int] = (18, 90)
    site_profiles: dict[str, SiteProfile] = field(default_factory=default_site_profiles)
    id_prefix: str = "synth"
    png_compress_level: int = 0

    def __post_init__(self) -> None:
        # Accept what a YAML file gives: lists for tuples, mappings for site profiles.
        for name in ("images_per_patient", "sites", "classes", "severity", "age_range"):
            setattr(self, name, tuple(getattr(self, name)))
        self.site_profiles = {
            site: p if isinstance(p, SiteProfile) else SiteProfile(**p)
            for site, p in self.site_profiles.items()
        }
        lo, hi = self.images_per_patient
        if self.n_patients < 1:
            raise ValueError(f"SyntheticConfig.n_patients must be >= 1, got {self.n_patients}")
        if not 1 <= lo <= hi:
            raise ValueError(
                f"SyntheticConfig.images_per_patient must be (lo, hi) with 1 <= lo <= hi, "
                f"got {self.images_per_patient}"
            )
        if self.size < 32:
            raise ValueError(f"SyntheticConfig.size must be >= 32 pixels, got {self.size}")
        if not self.sites:
            raise ValueError("SyntheticConfig.sites is empty")
        unknown = [c for c in self.classes if c not in LABELS]
        if unknown or not self.classes:
            raise ValueError(
                f"SyntheticConfig.classes must be a non-empty subset of {LABELS}, got {self.classes}"
            )
        missing = [s for s in self.sites if s not in self.site_profiles]
        if missing:
            raise ValueError(
                f"SyntheticConfig: no site profile for {missing}; known: {sorted(self.site_profiles)}"
            )
        if not 0.0 <= self.severity[0] <= self.severity[1] <= 1.5:
            raise ValueError(
                f"SyntheticConfig.severity must be a range in [0, 1.5], got {self.severity}"
            )
        if not 0 <= self.age_range[0] <= self.age_range[1]:
            raise ValueError(
                f"SyntheticConfig.age_range must be (lo, hi) with 0 <= lo <= hi, got {self.age_range}"
            )
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(
                f"SyntheticConfig.png_compress_level must be in 0..9, got {self.png_compress_level}"
            )
        for site in self.sites:
            self.label_probabilities(site)  # raises on bad weights

    def label_probabilities(self, site: str) -> np.ndarray:
        """Probabilities of ``classes`` at ``site`` (float64, sums to 1)."""
        weights = self.class_weights.get(site)
        if weights is None:
            return np.full(len(self.classes), 1.0 / len(self.classes))
        p = np.array([float(weights.get(c, 0.0)) for c in self.classes])
        if (p < 0).any() or p.sum() <= 0:
            raise ValueError(
                f"SyntheticConfig.class_weights[{site!r}] must be >= 0 with a positive sum over "
                f"{self.classes}, got {weights}"
            )
        return p / p.sum()


def site_profile(site: str, profiles: Mapping[str, SiteProfile] | None = None) -> SiteProfile:
    """The profile of ``site`` (default profiles unless ``profiles`` is given)."""
    profiles = default_site_profiles() if profiles is None else profiles
    if site not in profiles:
        raise ValueError(f"unknown site {site!r}; known sites: {sorted(profiles)}")
    return profiles[site]

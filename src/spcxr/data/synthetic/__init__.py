"""Embedded synthetic chest radiographs: the data set spcxr runs on when no real data is present.

A phantom generator draws PA (and some AP) chest radiographs with anatomy-like structure, exact
lung masks, three labels and several acquisition sites, so that the demo, the tests and CI
exercise every stage of the pipeline (GMML pretraining, classification, lung segmentation,
drift across hospitals, follow-up images for patient-level splits and deduplication) without
any real image. Everything is deterministic from a seed.

Conventions
    Images are float32 ``[H, W]`` in ``[0, 1]``, higher = more attenuation (bone and soft tissue
    bright, air and lungs dark), as a PA chest radiograph is displayed. Image left is the
    patient's right. Masks are bool ``[H, W]``: the lung fields exactly as drawn (pathology never
    changes them; the retro-cardiac lung is excluded, as in the Shenzhen/JSRT-style masks).

Labels
    ``normal``; ``consolidation`` (one or two dense, irregular, soft-edged patches in one lung,
    sometimes bounded by a fissure: lobar pneumonia); ``bilateral_opacities`` (patchy
    ground-glass haze in both lungs, peripheral and lower-zone predominant: the COVID-19
    pattern). ``severity`` (0..1, the fraction of air replaced) makes them subtle or obvious.

How an image is made (vectorised numpy on coordinate grids, no per-pixel Python)
    1. ``anatomy``: one patient's anatomy (``sample_anatomy``: body, lungs, heart, aortic knob,
       ribs, clavicles, scapulae, spine, trachea, gastric bubble, a vessel texture fanning out
       from the hila) and one film's pose (``sample_pose`` / ``followup_pose``: position,
       rotation, magnification, exposure, inspiration).
    2. ``findings``: lesions of the label (``sample_pathology``; ``Pathology.evolved`` for
       follow-ups).
    3. ``render``: a line-integral map (soft tissue + bone - lung air + disease) and the lung
       mask; the detector shows ``1 - exp(-exposure * A)``.
    4. ``acquire``: the site's acquisition (``SiteProfile``).
    5. ``dataset``: ``generate_case`` draws one case, ``iter_synthetic_cases`` the patients of a
       ``SyntheticConfig``, ``write_synthetic_dataset`` writes 16-bit PNG images, 8-bit masks
       and a ``manifest.csv`` with the columns the generic CSV source adapter reads.
"""

from __future__ import annotations

from spcxr.data.synthetic.acquire import acquire
from spcxr.data.synthetic.anatomy import (
    Anatomy,
    Lung,
    Pose,
    followup_pose,
    sample_anatomy,
    sample_pose,
)
from spcxr.data.synthetic.config import (
    CORNERS,
    LABELS,
    MANIFEST_COLUMNS,
    VIEWS,
    SiteProfile,
    SyntheticConfig,
    default_class_weights,
    default_site_profiles,
    site_profile,
)
from spcxr.data.synthetic.dataset import (
    SyntheticCase,
    generate_case,
    iter_synthetic_cases,
    render_case,
    write_synthetic_dataset,
)
from spcxr.data.synthetic.findings import Lesion, Pathology, sample_pathology
from spcxr.data.synthetic.render import render_attenuation

__all__ = [
    "CORNERS",
    "LABELS",
    "MANIFEST_COLUMNS",
    "VIEWS",
    "Anatomy",
    "Lesion",
    "Lung",
    "Pathology",
    "Pose",
    "SiteProfile",
    "SyntheticCase",
    "SyntheticConfig",
    "acquire",
    "default_class_weights",
    "default_site_profiles",
    "followup_pose",
    "generate_case",
    "iter_synthetic_cases",
    "render_attenuation",
    "render_case",
    "sample_anatomy",
    "sample_pathology",
    "sample_pose",
    "site_profile",
    "write_synthetic_dataset",
]

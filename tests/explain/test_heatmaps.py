"""Explanation maps: they follow a planted signal, change when the model is randomised, are
batch-independent and add up (Integrated Gradients' completeness); overlays."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spcxr.explain import explain, explained_score, heatmap_overlay, mask_overlay, save_png
from spcxr.models.classifier import Classifier
from spcxr.models.vit import create_encoder

IMG, PATCH, SQUARE = 48, 8, 12
GRID = IMG // PATCH


def _tiny_vit(seed: int, head: str = "cls") -> Classifier:
    torch.manual_seed(seed)
    encoder = create_encoder(
        "vit_tiny",
        img_size=IMG,
        patch_size=PATCH,
        depth=2,
        embed_dim=64,
        num_heads=4,
        drop_path_rate=0.0,
    )
    model = Classifier(encoder, 2, head)
    torch.nn.init.normal_(model.head.weight, std=0.02)  # not the near-zero fine-tuning init
    return model


def _squares(n: int, seed: int, label: int | None = None, at: tuple[int, int] | None = None):
    """Noise images; class 1 has a bright square at a random (or the given) position."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, IMG, IMG, generator=gen) * 0.3
    y = torch.randint(0, 2, (n,), generator=gen) if label is None else torch.full((n,), label)
    corners = []
    for i in range(n):
        r, c = at or torch.randint(0, IMG - SQUARE + 1, (2,), generator=gen).tolist()
        corners.append((r, c))
        if y[i] == 1:
            x[i, :, r : r + SQUARE, c : c + SQUARE] += 2.0
    return x, y, corners


@pytest.fixture(scope="module")
def trained() -> Classifier:
    """A 2-block ViT trained for 60 steps to tell images with a square from those without."""
    model = _tiny_vit(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(60):
        x, y, _ = _squares(32, seed=1000 + step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _peak(maps: torch.Tensor) -> list[tuple[float, float]]:
    """Centre (row, col) in pixels of every map's hottest patch."""
    out = []
    for k in maps.flatten(1).argmax(dim=1).tolist():
        r, c = divmod(k, GRID)
        out.append(((r + 0.5) * PATCH, (c + 0.5) * PATCH))
    return out


def _on_square(peak: tuple[float, float], corner: tuple[int, int]) -> bool:
    """The hottest patch overlaps the square (its centre within half a patch of it)."""
    (pr, pc), (r, c) = peak, corner
    half = PATCH / 2
    return r - half <= pr <= r + SQUARE + half and c - half <= pc <= c + SQUARE + half


def _hit_rate(maps: torch.Tensor, corners: list[tuple[int, int]]) -> float:
    return float(np.mean([_on_square(p, c) for p, c in zip(_peak(maps), corners, strict=True)]))


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-9)).mean())


def test_map_peaks_on_the_planted_square_and_is_random_for_a_random_model(trained) -> None:
    x, _, corners = _squares(32, seed=5, label=1)
    with torch.no_grad():
        assert (trained(x).argmax(1) == 1).float().mean() > 0.95  # the model learned the task
    maps = explain(trained, x, torch.ones(32, dtype=torch.long), steps=8).maps
    assert maps.shape == (32, GRID, GRID)
    assert float(maps.amax(dim=(1, 2)).min()) == pytest.approx(1.0)
    assert _hit_rate(maps, corners) >= 0.9  # chance: about 4 of 36 patches, 0.2
    # Adebayo et al. 2018, model parameter randomisation: the same images, a re-initialised
    # model of the same architecture -> maps unrelated to the trained ones.
    random_maps = explain(_tiny_vit(1).eval(), x, torch.ones(32, dtype=torch.long), steps=8).maps
    assert _hit_rate(random_maps, corners) <= 0.6
    assert _correlation(maps, random_maps) < 0.5
    # ... and the first step of their cascade: only the head re-initialised.
    head_random = copy.deepcopy(trained)
    torch.nn.init.normal_(head_random.head.weight, std=0.02)
    torch.nn.init.zeros_(head_random.head.bias)
    head_maps = explain(head_random, x, torch.ones(32, dtype=torch.long), steps=8).maps
    assert _hit_rate(head_maps, corners) <= 0.6
    assert _correlation(maps, head_maps) < 0.5


def test_map_moves_with_the_square(trained) -> None:
    top_left, _, c1 = _squares(1, seed=9, label=1, at=(2, 3))
    bottom_right, _, c2 = _squares(1, seed=9, label=1, at=(33, 34))  # the same noise
    maps = explain(trained, torch.cat([top_left, bottom_right]), steps=8).maps
    (p1, p2) = _peak(maps)
    assert _on_square(p1, c1[0]) and _on_square(p2, c2[0])
    assert p1[0] < IMG / 2 and p1[1] < IMG / 2 and p2[0] > IMG / 2 and p2[1] > IMG / 2


def test_batched_maps_equal_single_image_maps(trained) -> None:
    x, _, _ = _squares(6, seed=11)
    together = explain(trained, x, steps=4, max_batch=64)
    # also exercises chunking: 2 interpolation points per pass for a batch of 1
    alone = [explain(trained, x[i : i + 1], steps=4, max_batch=2) for i in range(6)]
    assert torch.equal(together.target, torch.cat([a.target for a in alone]))
    torch.testing.assert_close(
        together.attributions, torch.cat([a.attributions for a in alone]), atol=1e-5, rtol=1e-4
    )


def test_attributions_add_up_to_the_score_difference() -> None:
    # A smooth (untrained) model: with enough steps the trapezoid rule converges and IG's
    # completeness holds: the patch attributions sum to F(x) - F(baseline).
    model = _tiny_vit(3, head="mean").eval()
    x, _, _ = _squares(4, seed=2)
    target = torch.tensor([0, 1, 0, 1])
    out = explain(model, x, target, steps=64)
    with torch.no_grad():
        score = explained_score(model(x), target)
        base = explained_score(model(torch.zeros_like(x)), target)
    torch.testing.assert_close(out.score, score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.baseline_score, base, atol=1e-5, rtol=1e-5)
    total = out.attributions.flatten(1).sum(1)
    assert torch.allclose(
        total, score - base, rtol=0.02, atol=2e-3 * float((score - base).abs().max())
    )
    assert float(out.completeness_gap.max()) < 0.02
    # The margin does not change when every logit moves by the same amount.
    logits = torch.randn(3, 4)
    t = torch.tensor([0, 2, 3])
    torch.testing.assert_close(explained_score(logits + 5.0, t), explained_score(logits, t))


def test_overlays() -> None:
    gray = np.full((20, 30), 100, dtype=np.uint8)
    heat = np.zeros((20, 30), dtype=np.float32)
    heat[5:10, 5:10] = 1.0
    out = heatmap_overlay(gray, heat)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 100).all()  # cold: the image itself
    assert not (out[7, 7] == 100).all()  # hot: coloured
    mask = np.zeros((20, 30), dtype=bool)
    mask[4:12, 6:20] = True
    tinted = mask_overlay(gray, mask, colour=(255, 0, 0))
    assert tuple(tinted[0, 0]) == (100, 100, 100)
    assert tuple(tinted[4, 10]) == (255, 0, 0)  # outline
    assert tinted[8, 10, 0] > 100 > tinted[8, 10, 1]  # tinted inside
    with pytest.raises(ValueError, match="differ in shape"):
        heatmap_overlay(gray, heat[:10])


def test_save_png_round_trip(tmp_path) -> None:
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    path = save_png(rgb, tmp_path / "a" / "b.png")
    assert np.array_equal(np.asarray(Image.open(path)), rgb)

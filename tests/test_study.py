"""``spcxr study``: every shipped study config resolves to valid run configs; pool hygiene."""

from __future__ import annotations

from pathlib import Path

import pytest

from spcxr.config import from_dict
from spcxr.pretrain.engine import PretrainConfig
from spcxr.study import Study, _merge, _nest_prepare, load_study
from spcxr.tasks.classify import FinetuneConfig
from spcxr.tasks.segment import SegmentConfig

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("study_*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_study_config_resolves_every_run(path: Path, tmp_path: Path) -> None:
    config = load_study(path, {"out": str(tmp_path / "s")})
    study = Study(config)
    study.pretrain_dir = tmp_path / "s" / "pretrain"
    from spcxr.data.prepare import PrepareConfig

    prep = from_dict(PrepareConfig, _nest_prepare(_merge({"sources": ["x"]}, config.prepare)))
    assert prep.image_size >= 128
    pre = from_dict(PretrainConfig, _merge({"store": "s", "out": "o"}, config.pretrain))
    assert pre.model.arch.startswith("vit_")
    n = 0
    names = set()
    for task in config.tasks:
        if task.reuse:
            continue
        for run, settings in study.runs_of(task):
            cls = SegmentConfig if task.kind == "segment" else FinetuneConfig
            cfg = from_dict(cls, settings)
            model = cfg.model
            # downstream models match the pretrained encoder (same arch, patch, input size)
            assert (model.arch, model.patch_size, model.img_size) == (
                pre.model.arch,
                pre.model.patch_size,
                pre.model.img_size,
            )
            assert cfg.init == "scratch" or Path(cfg.init) == study.pretrain_dir
            names.add(run)
            n += 1
    assert len(names) == n  # every run has its own folder
    # drift tasks evaluate runs trained by other tasks (no duplicate training)
    reused = [r for t in config.tasks if t.reuse for r, _ in study.runs_of(t)]
    assert reused and set(reused) <= names
    # every task is run from GMML and from scratch with the same settings otherwise
    assert set(config.inits) == {"gmml", "scratch"}
    # the k-fold source is left out of the pretraining pool
    assert study._kfold_sources() == ["ieee8023"]

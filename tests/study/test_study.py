"""``spcxr study``: every shipped study config resolves to valid run configs; pool hygiene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spcxr.config import from_dict, merge
from spcxr.errors import UsageError
from spcxr.pretrain.engine import PretrainConfig
from spcxr.study import Study, _nest_prepare
from spcxr.study.config import load_study
from spcxr.tasks.classify import FinetuneConfig
from spcxr.tasks.segment import SegmentConfig

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("study_*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_study_config_resolves_every_run(path: Path, tmp_path: Path) -> None:
    config = load_study(path, {"out": str(tmp_path / "s")})
    study = Study(config)
    study.pretrain_dir = tmp_path / "s" / "pretrain"
    from spcxr.data.prepare import PrepareConfig

    prep = from_dict(PrepareConfig, _nest_prepare(merge({"sources": ["x"]}, config.prepare)))
    assert prep.image_size >= 128
    pre = from_dict(PretrainConfig, merge({"store": "s", "out": "o"}, config.pretrain))
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
            named = dict(i.split("=", 1) for i in config.inits if "=" in i)
            assert (
                cfg.init == "scratch"
                or Path(cfg.init) == study.pretrain_dir
                or (any(run.name.startswith(f"{n}_") and p == cfg.init for n, p in named.items()))
            )
            names.add(run)
            n += 1
    assert len(names) == n  # every run has its own folder
    # drift tasks evaluate runs trained by other tasks (no duplicate training)
    reused = [r for t in config.tasks if t.reuse for r, _ in study.runs_of(t)]
    assert reused or config.reports != "reports"  # (a curve config has no drift tables)
    assert set(reused) <= names
    # every task is run from scratch and from at least one GMML encoder
    assert "scratch" in config.inits and len(config.inits) >= 2
    # the k-fold source is left out of the pretraining pool (the base config's tasks)
    assert study._kfold_sources() == ([] if config.reports != "reports" else ["ieee8023"])


def test_base_config_and_named_inits(tmp_path: Path) -> None:
    """``base:`` starts from another study config (nested settings merged, tasks replaced);
    ``NAME=PATH`` inits train runs named after NAME from that encoder; bad entries are refused."""
    import yaml

    base = {
        "variant": "v", "out": "o", "budget_seeds": [0, 1],
        "finetune": {"mode": "finetune", "train": {"epochs": 3, "batch_size": 64}},
        "tasks": [{"name": "a", "budgets": ["all"]}, {"name": "b"}],
    }  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    child = {
        "base": "base.yaml",
        "reports": "reports_x",
        "finetune": {"train": {"epochs": 5}},
        "inits": ["gmml", "scratch", "short=enc/short"],
        "tasks": [{"name": "a", "budgets": ["2/class"]}],
    }
    (tmp_path / "child.yaml").write_text(yaml.safe_dump(child))
    config = load_study(tmp_path / "child.yaml")
    assert config.finetune == {"mode": "finetune", "train": {"epochs": 5, "batch_size": 64}}
    assert [t.name for t in config.tasks] == ["a"] and config.budget_seeds == [0, 1]
    study = Study(config)
    study.pretrain_dir = Path("pre")
    runs = {r.name: s["init"] for r, s in study.runs_of(config.tasks[0])}
    assert runs == {
        "gmml_2perclass_draw0": "pre", "scratch_2perclass_draw0": "scratch",
        "short_2perclass_draw0": "enc/short", "gmml_2perclass_draw1": "pre",
        "scratch_2perclass_draw1": "scratch", "short_2perclass_draw1": "enc/short",
    }  # fmt: skip
    for bad in (["gmml", "imagenet"], ["x/y=enc"], ["short="]):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**child, "inits": bad}))
        with pytest.raises(ValueError, match="inits entry"):
            load_study(tmp_path / "bad.yaml")


def test_pretraining_pool_is_the_sources_tasks_train_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pretraining takes only sources that a task trains on, less the k-fold ones. A source no
    task names is left out: a config trimmed to one task (this happened with
    ``tasks: [kermany_pneumonia]`` on the CPU study's sources) must not pretrain on Montgomery,
    whose task, and with it its test-only status, was left out."""
    import types

    import pandas as pd
    import yaml

    import spcxr.data.store
    import spcxr.pretrain.engine

    names = ["kermany", "kermany_test", "shenzhen", "montgomery", "covid"]
    manifest = pd.DataFrame({"source": names})
    monkeypatch.setattr(
        spcxr.data.store, "PreparedStore", lambda path: types.SimpleNamespace(manifest=manifest)
    )
    seen = []

    def fake_pretrain(config):
        seen.append(config.sources)
        return types.SimpleNamespace(budget_stop=None)

    monkeypatch.setattr(spcxr.pretrain.engine, "pretrain", fake_pretrain)
    pneumonia = {"name": "p", "sources": ["kermany"], "external_sources": ["kermany_test"]}
    lungs = {
        "name": "l", "kind": "segment", "sources": ["shenzhen"], "external_sources": ["montgomery"]
    }  # fmt: skip
    covid = {"name": "c", "sources": ["covid"], "n_folds": 5}
    drift = {"name": "d", "reuse": "p", "test_sources": ["shenzhen", "covid"]}
    for tasks, pool in [
        ([pneumonia, lungs, covid, drift], ["kermany", "shenzhen"]),
        ([pneumonia], ["kermany"]),  # trimmed: montgomery, shenzhen, covid not pretrained on
        ([pneumonia, drift], ["kermany"]),  # a reused task trains nothing
        # a task on every source: its external / test-only images are in no training split,
        # so the pretraining's `splits: [train]` still never reads them
        ([{"name": "all"}, covid], ["kermany", "kermany_test", "montgomery", "shenzhen"]),
    ]:
        config = {"variant": "v", "out": str(tmp_path / "s"), "tasks": tasks}
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(config))
        Study(load_study(tmp_path / "s.yaml")).pretrain()
        assert seen.pop() == pool
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**config, "tasks": [covid]}))
    with pytest.raises(UsageError, match="no source left to pretrain on"):
        Study(load_study(tmp_path / "s.yaml")).pretrain()


def test_init_settings_give_each_initialisation_its_recipe(tmp_path: Path) -> None:
    """A task's ``init_settings`` override its settings for one initialisation's runs only;
    the draws stay paired; a name that is not an init is refused."""
    import yaml

    study_yaml = {
        "variant": "v", "out": "o", "budget_seeds": [0, 1],
        "finetune": {"mode": "finetune", "train": {"epochs": 3, "optim": {"lr": 1e-3}}},
        "inits": ["scratch", "long=enc/long"],
        "tasks": [{
            "name": "a", "budgets": ["2/class"], "settings": {"model": {"head": "cls"}},
            "init_settings": {
                "long": {"mode": "probe_finetune", "train": {"optim": {"lr": 3e-3}}},
                "scratch": {"train": {"optim": {"layer_decay": 0.9}}},
            },
        }],
    }  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study_yaml))
    config = load_study(tmp_path / "s.yaml")
    runs = {r.name: s for r, s in Study(config).runs_of(config.tasks[0])}
    assert sorted(runs) == [
        "long_2perclass_draw0", "long_2perclass_draw1",
        "scratch_2perclass_draw0", "scratch_2perclass_draw1",
    ]  # fmt: skip
    long, scratch = runs["long_2perclass_draw1"], runs["scratch_2perclass_draw1"]
    assert long["mode"] == "probe_finetune" and scratch["mode"] == "finetune"
    assert long["train"]["optim"] == {"lr": 3e-3}
    assert scratch["train"]["optim"] == {"lr": 1e-3, "layer_decay": 0.9}
    assert long["model"] == scratch["model"] == {"head": "cls"}
    assert long["budget_seed"] == scratch["budget_seed"] == 1
    assert long["train"]["epochs"] == scratch["train"]["epochs"] == 3
    study_yaml["tasks"][0]["init_settings"]["gmml"] = {"mode": "linear"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(study_yaml))
    with pytest.raises(ValueError, match=r"init_settings names \['gmml'\]"):
        load_study(tmp_path / "bad.yaml")


def test_tiny_study_keeps_external_test_out_and_pairs_draws(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny study end to end: an external test source with a planted file (also copied,
    under another patient id, into the internal source) never reaches pretraining, training
    or selection; small budgets run one paired draw per budget seed; the results page has the
    draw and paired tables with the external test beside the internal one."""
    import json
    import shutil

    import pandas as pd
    import yaml
    from PIL import Image
    from tests.conftest import write_smooth_images

    from spcxr.data.store import PreparedStore
    from spcxr.pretrain.engine import select_rows as pretrain_rows
    from spcxr.tasks.classify import select_rows

    data = tmp_path / "data"
    write_smooth_images(data / "site", n_patients=24, size=40)
    write_smooth_images(data / "ext", n_patients=8, size=40)
    planted = np.random.default_rng(99).integers(0, 255, (40, 40)).astype(np.uint8)
    Image.fromarray(planted).save(data / "ext" / "abnormal" / "person900_0.png")
    shutil.copy(
        data / "ext" / "abnormal" / "person900_0.png", data / "site" / "abnormal" / "person77_0.png"
    )
    train = {
        "epochs": 1, "min_steps": 2, "batch_size": 8, "eval_every": 2, "patience": 0,
        "workers": 0, "progress": False, "tensorboard": False,
        "optim": {"lr": 1.0e-3, "warmup_epochs": 0.0},
    }  # fmt: skip
    model = {"arch": "vit_tiny", "img_size": 32, "patch_size": 8}
    config = {
        "variant": "tiny",
        "out": str(tmp_path / "study"),
        "results": str(tmp_path / "results"),
        "data": str(data),
        "device": "cpu",
        "sources": ["site=folder:site", "ext=folder:ext"],
        "prepare": {"image_size": 40, "workers": 1, "split_fractions": [0.5, 0.2, 0.3]},
        "pretrain": {
            "model": model,
            "batch_size": 8,
            "max_steps": 2,
            "workers": 0,
            "log_every": 1,
            "checkpoint_every": 2,
            "preview_every": 0,
            "progress": False,
            "tensorboard": False,
        },
        "budget_seeds": [0, 1],
        "finetune": {"model": {**model, "head": "both"}, "train": train},
        "evaluate": {"n_boot": 50},
        "tasks": [
            {
                "name": "tiny",
                "sources": ["site"],
                "external_sources": ["ext"],
                "labels": {"column": "label", "classes": ["normal", "abnormal"]},
                "budgets": ["3/class", "all"],
                # scratch's own recipe: here the shared one, restated (the page must say so)
                "init_settings": {"scratch": {"label_smoothing": 0.1}},
            }
        ],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    study = Study(load_study(path))
    study.run()

    store = PreparedStore(study.store)
    m = store.manifest
    ext = m["source"] == "ext"
    assert ext.sum() == 17 and set(m.loc[ext, "split"]) == {"test"}
    # the internal copy of the planted file shares its duplicate group: moved to test as well
    copy = m["image_path"].str.endswith("person77_0.png")
    assert copy.sum() == 1 and m.loc[copy, "split"].item() == "test"
    hidden = set(m.loc[ext | copy, "pixel_hash"])
    assert len(hidden) == 16 + 1  # the planted image and its copy are one hash

    from spcxr.config import from_dict
    from spcxr.pretrain.engine import PretrainConfig
    from spcxr.tasks.classify import FinetuneConfig

    pre_cfg = from_dict(
        PretrainConfig, yaml.safe_load((study.out / "pretrain" / "config.yaml").read_text())
    )
    for splits in (["train"], ["train", "val", "test"]):  # even asked for, test-only rows stay out
        pre_cfg.splits = splits
        assert not hidden & set(m["pixel_hash"].iloc[pretrain_rows(store, pre_cfg)])
    runs = study.runs_of(study.config.tasks[0])
    names = sorted(r.name for r, _ in runs)
    assert names == [
        "gmml_3perclass_draw0", "gmml_3perclass_draw1", "gmml_all",
        "scratch_3perclass_draw0", "scratch_3perclass_draw1", "scratch_all",
    ]  # fmt: skip
    for run, settings in runs:
        rows = select_rows(store, from_dict(FinetuneConfig, settings))
        used = set(m["pixel_hash"].iloc[np.concatenate([rows.train, rows.val])])
        assert not hidden & used
        trained = set(pd.read_csv(run / "train_rows.csv")["pixel_hash"].astype(str))
        assert not hidden & trained
        info = json.loads((run / "run.json").read_text())
        assert info["data"]["budget_seed"] == settings.get("budget_seed", 0)

    metrics = json.loads((study.out / "reports" / "tiny" / "metrics.json").read_text())
    entry = metrics["runs"]["gmml_all"]
    assert entry["eval"]["ext"]["external"] and entry["eval"]["ext"]["data"]["images"] == 17
    assert "all" not in entry["eval"]  # the external set is never pooled with the internal one
    paired = [
        p for p in metrics["paired"]
        if p["budget"] == "3/class" and p["tested_on"] == "ext" and p["metric"] == "accuracy"
    ]  # fmt: skip
    assert len(paired) == 1 and paired[0]["difference"]["paired"]
    d = paired[0]["difference"]
    acc = {
        name: metrics["runs"][name]["eval"]["ext"]["metrics"]["accuracy"]["value"] for name in names
    }
    diffs = [acc[f"gmml_3perclass_draw{s}"] - acc[f"scratch_3perclass_draw{s}"] for s in (0, 1)]
    np.testing.assert_allclose(d["differences"], diffs)
    assert d["value"] == pytest.approx(np.mean(diffs))
    page = (tmp_path / "results" / "RESULTS.md").read_text()
    assert "Paired differences" in page and "Label draws" in page and "ext (external)" in page
    assert "never pretrained on: ext" in page
    assert (
        'Settings of `scratch` runs only (its own recipe, chosen on validation): `{"label_smoothing": 0.1}`'
        in page
    )
    assert "## Summary: where GMML helps" in page and "| gmml - scratch | 3/class |" in page
    # a study that compares only NAME=PATH encoders (no `gmml`) still gets its page
    import dataclasses

    from spcxr.study.page import write_results_page

    named = dataclasses.replace(
        study.config,
        inits=["scratch", f"enc={study.pretrain_dir}"],
        results=str(tmp_path / "results_named"),
    )
    other = write_results_page(named, None, []).read_text()
    assert "The study's own GMML run is not compared here" in other
    assert f"| `enc` | `{study.pretrain_dir}` |" in other and "| `gmml` |" not in other

    # Resumed, the study neither retrains nor re-scores: its reports are up to date.
    import spcxr.tasks.evaluate as evaluate_module

    stamps = {r.name: (r / "run.json").stat().st_mtime for r, _ in runs}

    def refuse(config):
        raise AssertionError(f"re-evaluated {config.out}")

    with monkeypatch.context() as m:
        m.setattr(evaluate_module, "evaluate", refuse)
        Study(load_study(path)).run()

    # A second config on the same folder (``base:``) adds an encoder pretrained for another
    # length: only its runs are trained, and its report pairs each GMML encoder with scratch.
    from spcxr.pretrain.engine import pretrain

    short = tmp_path / "short"
    pre_cfg = from_dict(
        PretrainConfig, yaml.safe_load((study.out / "pretrain" / "config.yaml").read_text())
    )
    pre_cfg.out, pre_cfg.max_steps, pre_cfg.seed = str(short), 1, 5
    pretrain(pre_cfg)
    curve = {
        "base": "study.yaml",
        "reports": "reports_curve",
        "results": str(tmp_path / "results_curve"),
        "inits": [
            "gmml",
            "scratch",
            f"short={short}",
            f"unfinished={tmp_path / 'running'}",
            f"continued={tmp_path / 'continued'}",
        ],
        "tasks": [{**config["tasks"][0], "budgets": ["3/class"]}],
    }
    (tmp_path / "curve.yaml").write_text(yaml.safe_dump(curve))
    (tmp_path / "running").mkdir()
    shutil.copy(short / "checkpoint.pt", tmp_path / "running")  # a pretraining still running
    # a finished pretraining being continued to more steps: its encoder/ is the old one
    shutil.copytree(short, tmp_path / "continued")
    info = json.loads((tmp_path / "continued" / "run.json").read_text())
    (tmp_path / "continued" / "run.json").write_text(json.dumps({**info, "steps": 3}))
    Study(load_study(tmp_path / "curve.yaml")).run()
    assert stamps == {r.name: (r / "run.json").stat().st_mtime for r, _ in runs}
    trained = sorted(p.name for p in (study.out / "tasks" / "tiny").iterdir())
    assert [n for n in trained if n.startswith("short")] == [
        "short_3perclass_draw0", "short_3perclass_draw1"
    ]  # fmt: skip
    metrics = json.loads((study.out / "reports_curve" / "tiny" / "metrics.json").read_text())
    assert len(metrics["runs"]) == 6
    compared = {p["comparison"] for p in metrics["paired"]}
    assert len(compared) == 2 and all(c.startswith("gmml ") for c in compared)
    assert all(p["difference"]["n"] == 2 for p in metrics["paired"])
    page = (tmp_path / "results_curve" / "RESULTS.md").read_text()
    assert f"`short` | `{short}` | 1 / 1" in page
    assert f"`gmml` | `{study.out / 'pretrain'}` | 2 / 2" in page
    # the runs from the unfinished pretraining are left out and listed, never trained
    assert not [n for n in trained if n.startswith(("unfinished", "continued"))]
    assert "unfinished_3perclass_draw0 (encoder" in page and "not finished)" in page
    assert "continued_3perclass_draw0 (encoder" in page


def test_a_study_stops_after_an_unfinished_pretraining_and_continues_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A pretraining piece that stops early (its step budget here, SIGTERM below) ends the study
    there: no fine-tuning from an unfinished encoder. The same command continues it."""
    import yaml
    from tests.conftest import write_smooth_images

    from spcxr.cli import main
    from spcxr.pretrain import engine
    from spcxr.train.checkpoint import load_checkpoint

    write_smooth_images(tmp_path / "data" / "site", n_patients=12, size=32)
    model = {"arch": "vit_tiny", "img_size": 32, "patch_size": 8}
    config = {
        "variant": "tiny",
        "out": str(tmp_path / "study"),
        "results": str(tmp_path / "results"),
        "data": str(tmp_path / "data"),
        "device": "cpu",
        "sources": ["site=folder:site"],
        "prepare": {"image_size": 32, "workers": 1},
        "pretrain": {
            "model": model, "batch_size": 8, "max_steps": 3, "step_budget": 1, "workers": 0,
            "preview_every": 0, "progress": False, "tensorboard": False,
        },
        "tasks": [
            {
                "name": "tiny",
                "sources": ["site"],
                "labels": {"column": "label", "classes": ["normal", "abnormal"]},
                "budgets": ["all"],
            }
        ],
    }  # fmt: skip
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    pre = tmp_path / "study" / "pretrain"
    for step in (1, 2):
        assert main(["study", str(path)]) == 0
        out = capsys.readouterr().out
        assert f"pretraining stopped (step_budget spent) at step {step} of 3" in out
        assert "run the same command to continue" in out
        assert load_checkpoint(pre / "checkpoint.pt")["step"] == step
        assert not (pre / "encoder").exists() and not (tmp_path / "study" / "tasks").exists()

    stopped = engine.PretrainResult(
        run_dir=pre, steps=2, final_loss=0.0, losses=[], views_per_second=0.0,
        encoder_path=None, total_steps=3, budget_stop="SIGTERM",
    )  # fmt: skip
    monkeypatch.setattr(engine, "pretrain", lambda config: stopped)
    assert main(["study", str(path)]) == 143
    assert "pretraining stopped (SIGTERM) at step 2 of 3" in capsys.readouterr().err
    assert not (tmp_path / "study" / "tasks").exists()

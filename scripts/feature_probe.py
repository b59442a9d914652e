"""Frozen-feature check: are GMML features more linearly useful than a random ViT's?

Logistic regression (scikit-learn) on the concatenated CLS and mean-pooled tokens of a frozen
encoder, Kermany normal vs pneumonia, trained on 40 or 800 images of the store's train split and
scored (AUROC) on 300 images of its val split; one JSON line. Used in the CPU study's discussion:

    python scripts/feature_probe.py --store runs/study_cpu/store --pretrain runs/study_cpu/pretrain
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from spcxr.data.store import PreparedStore
from spcxr.models.init_from import load_init
from spcxr.tasks.classify import prepare_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--pretrain", required=True)
    ap.add_argument("--arch", default="vit_tiny")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--patch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    store = PreparedStore(args.store)
    m = store.manifest

    def rows(split: str, n: int) -> np.ndarray:
        r = store.indices(split, source="kermany_pediatric")
        return np.sort(np.random.default_rng(0).choice(r, n, replace=False))

    train, val = rows("train", 800), rows("val", 300)

    def labels(r: np.ndarray) -> np.ndarray:
        return (m["label"].iloc[r] == "pneumonia").to_numpy().astype(int)

    out: dict[str, float] = {}
    for name, init in (("gmml", args.pretrain), ("random", "scratch")):
        torch.manual_seed(0)
        encoder, _ = load_init(
            init, arch=args.arch, img_size=args.img_size, patch_size=args.patch_size
        )
        encoder.eval()

        def features(r: np.ndarray, encoder=encoder) -> np.ndarray:
            parts = []
            with torch.no_grad():
                for i in range(0, len(r), 100):
                    images = torch.from_numpy(store.images(r[i : i + 100])).unsqueeze(1)
                    t = encoder.forward_features(prepare_inputs(images, args.img_size, 1))
                    parts.append(torch.cat([t[:, 0], t[:, 1:].mean(1)], 1).numpy())
            return np.concatenate(parts)

        f_train, f_val = features(train), features(val)
        mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
        y = labels(train)
        for n in (40, 800):
            idx = np.concatenate([np.flatnonzero(y == c)[: n // 2] for c in (0, 1)])
            clf = LogisticRegression(max_iter=3000).fit((f_train[idx] - mu) / sd, y[idx])
            prob = clf.predict_proba((f_val - mu) / sd)[:, 1]
            out[f"{name}_{n}_labels_val_auroc"] = round(float(roc_auc_score(labels(val), prob)), 4)
        out[f"{name}_feature_std"] = round(float(f_train.std(0).mean()), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

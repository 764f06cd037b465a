"""Linear probes: is a frozen backbone's feature better than the raw pixels it starts from?

Both probes see the same split: standardised inputs, multinomial logistic regression (L-BFGS), the
inverse regularisation C chosen on the last 20 % of a seeded shuffle of the training images, refit
on all of them, scored once on the test images. A backbone counts as pretrained for a benchmark
only if its probe beats the pixel probe there by at least ``PRETRAINED_MARGIN`` points.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

PROBE_C_GRID = (0.01, 0.1, 1.0)
PRETRAINED_MARGIN = 3.0  # accuracy points


@dataclass(frozen=True)
class ProbeResult:
    dataset: str
    backbone: str
    backbone_accuracy: float  # %
    pixel_accuracy: float  # %
    backbone_c: float
    pixel_c: float
    train_images: int
    test_images: int

    @property
    def margin(self) -> float:
        return self.backbone_accuracy - self.pixel_accuracy

    @property
    def pretrained(self) -> bool:
        return self.margin >= PRETRAINED_MARGIN

    def to_dict(self) -> dict:
        return {**asdict(self), "margin": round(self.margin, 2), "pretrained": self.pretrained}


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 *, seed: int = 0) -> tuple[float, float]:
    """(test accuracy in %, the C chosen on the held-out fifth of the training set). One BLAS thread:
    L-BFGS's path depends on how its matrix products are summed, so the figure does not move with
    the machine's core count."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    def fit(x, y, c):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)).fit(x, y)

    order = np.random.RandomState(seed).permutation(len(train_y))
    cut = int(len(order) * 0.8)
    fit_idx, val_idx = order[:cut], order[cut:]
    with threadpool_limits(limits=1):
        scores = [fit(train_x[fit_idx], train_y[fit_idx], c).score(train_x[val_idx], train_y[val_idx])
                  for c in PROBE_C_GRID]
        best_c = PROBE_C_GRID[int(np.argmax(scores))]
        return 100.0 * fit(train_x, train_y, best_c).score(test_x, test_y), best_c


PIXEL_PROBE_MAX_SIDE = 32  # larger inputs are area-pooled first (a 224-px pixel probe is not a baseline)


@torch.no_grad()
def probe_inputs(vit: torch.nn.Module, dataset, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frozen features, pixels, labels) of every image, un-augmented, streamed in batches. The
    feature is the one every method's head starts from: the [CLS] after the final norm."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from promptcl.core.backbone import encode

    features, pixels, labels = [], [], []
    for images, y in DataLoader(dataset, batch_size=batch_size):
        features.append(encode(vit, images).float().numpy())
        if max(images.shape[-2:]) > PIXEL_PROBE_MAX_SIDE:
            images = F.adaptive_avg_pool2d(images, PIXEL_PROBE_MAX_SIDE)
        pixels.append(images.flatten(1).numpy())
        labels.append(np.asarray(y))
    return np.concatenate(features), np.concatenate(pixels), np.concatenate(labels)


def probe(dataset: str, *, backbone: Optional[str] = None, checkpoint_file: Optional[Path] = None,
          data_dir: Optional[Path] = None) -> ProbeResult:
    """Linear probe of ``backbone``'s frozen features vs raw pixels on ``dataset``'s own split."""
    from promptcl.core.backbone import backbone_mean_std, build_backbone
    from promptcl.data.benchmarks import check_data_dir, dataset_spec, load_dataset
    from promptcl.data.preprocessing import common

    name = backbone or dataset_spec(dataset).default_backbone
    check_data_dir(dataset, data_dir)
    vit = build_backbone(name, pretrained=True, checkpoint_file=checkpoint_file)
    # a disk benchmark through the common pipeline's test-time view, normalised as the backbone was trained
    data = load_dataset(dataset, data_dir, common(*backbone_mean_std(name)))
    train_features, train_pixels, train_y = probe_inputs(vit, data.train)
    test_features, test_pixels, test_y = probe_inputs(vit, data.test)
    pixel_acc, pixel_c = linear_probe(train_pixels, train_y, test_pixels, test_y)
    backbone_acc, backbone_c = linear_probe(train_features, train_y, test_features, test_y)
    return ProbeResult(dataset=dataset, backbone=name, backbone_accuracy=round(backbone_acc, 2),
                       pixel_accuracy=round(pixel_acc, 2), backbone_c=backbone_c, pixel_c=pixel_c,
                       train_images=len(train_y), test_images=len(test_y))

"""Input pipelines of the 224-px benchmarks: each reference code base's own, or one common to all.

``--protocol reference`` follows the code base a method's published numbers come from:

- ``reference-hide`` (HiDe-Prompt / NoRGa, and the L2P/DualPrompt/S-Prompt runs in their tables):
  CIFAR images get RandomResizedCrop (bicubic) + flip + brightness jitter and CIFAR-100's mean/std;
  every other source gets RandomResizedCrop(scale 0.05-1) + flip and raw [0, 1] pixels; tests are
  Resize(256, bicubic) + CenterCrop(224).
- ``reference-hide-carryover``: the same, with that code's 5-Datasets bug: its loop over the
  sources sets the CIFAR transforms when it reaches CIFAR-10 and never resets them, so every source
  learned after CIFAR-10 gets the CIFAR pipeline too (what its published 5-Datasets numbers ran).
- ``reference-coda`` (CODA-Prompt, VQ-Prompt, SMoPE): [0, 1] pixels, RandomResizedCrop + flip;
  tests Resize(224) for CIFAR, Resize(256) + CenterCrop(224) otherwise; the last partial training
  batch is dropped.
- ``reference-ovor`` (OVOR, whose code rewrote CODA's loaders): the same transforms, every training
  batch kept.

``--protocol common`` gives every method one pipeline (fair comparisons): for every source
RandomResizedCrop (scale 0.08-1, bicubic) + flip, tests Resize(256, bicubic) + CenterCrop(224), and
the backbone's own pretraining mean/std. The offline tensor benchmarks have
no pipeline (``native``). Augmentation only ever reaches training passes (prompts, HiDe/NoRGa's
task-identity MLP): statistics passes (class Gaussians, task-identity statistics, expert usage) read
the test-time pipeline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

PROTOCOLS = ("reference", "reference-hide", "reference-hide-carryover", "reference-coda", "reference-ovor",
             "common")
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


@dataclass(frozen=True)
class Pipeline:
    """Train (augmented) and test transforms of one kind of source image."""

    size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_interpolation: str = "bilinear"
    brightness: float = 0.0  # ColorJitter brightness; 0: none
    test_resize: int = 256
    test_center_crop: bool = True  # False: Resize(test_resize) to a square-ish image, no crop
    test_interpolation: str = "bilinear"
    mean: Optional[tuple[float, float, float]] = None  # None: raw [0, 1] pixels
    std: Optional[tuple[float, float, float]] = None

    def transforms(self, *, augment: bool):
        from torchvision import transforms as T

        modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
        if augment:
            steps = [T.RandomResizedCrop(self.size, scale=self.crop_scale,
                                         interpolation=modes[self.crop_interpolation]),
                     T.RandomHorizontalFlip()]
            if self.brightness:
                steps.append(T.ColorJitter(brightness=self.brightness))
        else:
            steps = [T.Resize(self.test_resize, interpolation=modes[self.test_interpolation])]
            if self.test_center_crop:
                steps.append(T.CenterCrop(self.size))
        steps.append(T.ToTensor())
        if self.mean is not None:
            steps.append(T.Normalize(self.mean, self.std))
        return T.Compose(steps)


@dataclass(frozen=True)
class Preprocessing:
    """The resolved protocol of a run: one pipeline for CIFAR sources, one for the others."""

    name: str
    cifar: Pipeline
    other: Pipeline
    drop_last: bool = False  # drop the last partial training batch (the CODA code base)
    cifar_carryover: bool = False  # sources learned after a CIFAR one keep its pipeline (HiDe's 5-Datasets)

    def pipeline(self, source: str) -> Pipeline:
        return self.cifar if source == "cifar" else self.other

    def source_pipelines(self, kinds: Sequence[str], learned: Optional[Sequence[int]]) -> list[Pipeline]:
        """The pipeline of each source (``kinds``, in the dataset's order) of a multi-domain benchmark
        whose sources are learned in the order ``learned`` (indices into ``kinds``)."""
        pipelines = [self.pipeline(kind) for kind in kinds]
        if not self.cifar_carryover:
            return pipelines
        if learned is None or sorted(learned) != list(range(len(kinds))):
            raise ValueError(f"protocol {self.name} needs the order the sources are learned in, got {learned}")
        after_cifar = False
        for source in learned:
            after_cifar = after_cifar or kinds[source] == "cifar"
            if after_cifar:
                pipelines[source] = self.cifar
        return pipelines

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


HIDE = Preprocessing(
    "reference-hide",
    cifar=Pipeline(crop_interpolation="bicubic", brightness=63 / 255, test_interpolation="bicubic",
                   mean=CIFAR100_MEAN, std=CIFAR100_STD),
    other=Pipeline(crop_scale=(0.05, 1.0), test_interpolation="bicubic"),
)
HIDE_CARRYOVER = dataclasses.replace(HIDE, name="reference-hide-carryover", cifar_carryover=True)
CODA = Preprocessing(
    "reference-coda",
    cifar=Pipeline(test_resize=224, test_center_crop=False),
    other=Pipeline(),
    drop_last=True,
)
OVOR = dataclasses.replace(CODA, name="reference-ovor", drop_last=False)


def common(mean: tuple[float, float, float], std: tuple[float, float, float]) -> Preprocessing:
    pipeline = Pipeline(crop_interpolation="bicubic", test_interpolation="bicubic", mean=mean, std=std)
    return Preprocessing("common", cifar=pipeline, other=pipeline)


def resolve_preprocessing(protocol: str, *, code_base: Optional[str],
                          backbone_mean_std: tuple[tuple, tuple]) -> Preprocessing:
    """``protocol`` for a method whose published numbers come from ``code_base`` ("hide", "coda",
    "ovor" or None: no reference pipeline, so ``reference`` means ``common``)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "reference":
        protocol = f"reference-{code_base}" if code_base else "common"
    if protocol == "reference-hide":
        return HIDE
    if protocol == "reference-hide-carryover":
        return HIDE_CARRYOVER
    if protocol == "reference-coda":
        return CODA
    if protocol == "reference-ovor":
        return OVOR
    return common(*backbone_mean_std)

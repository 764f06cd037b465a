"""The seed papers' benchmarks, read from their documented on-disk formats under one data root.

Nothing is downloaded. ``--data-dir`` (or ``$PROMPTCL_DATA``) holds, as the reference code and
torchvision lay them out:

- ``cifar100``: ``cifar-100-python/{train,test,meta}`` (the python-version pickles);
- ``imagenet_r``: ``imagenet-r/<wnid>/<image>`` (the release tar extracted); the 80/20 split is the
  shipped list ``splits/imagenet_r.txt.gz`` (HiDe/NoRGa's, see :func:`imagenet_r_split`), or a split
  file given with ``--split-file`` (the same format, or CODA-Prompt's ``imagenet-r_train.yaml`` with its
  ``imagenet-r_test.yaml`` beside it: the split of CODA/OVOR/VQ-Prompt/SMoPE, with their class indices);
- ``cub200``: ``CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,images/}``;
- ``five_datasets``: ``train_32x32.mat``/``test_32x32.mat`` (SVHN), ``MNIST/raw/`` and
  ``FashionMNIST/raw/`` (idx files), ``cifar-10-batches-py/``, ``notMNIST/{Train,Test}/<A-J>/``.

Integrity is checked by structure (shapes, label ranges, every listed image present and its header readable),
not by the official releases' MD5 sums, so the same loaders run on small files in these formats.
Every check runs before any work starts and fails with one line naming the missing or damaged path.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
from importlib.resources import files
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from promptcl.data.benchmarks import ClassificationData, register_dataset
from promptcl.data.preprocessing import Pipeline, Preprocessing

IMAGE_SIZE = (3, 224, 224)


class ImageDataset(Dataset):
    """Images as uint8 arrays ``[N, H, W(, C)]`` or as files, each converted to RGB (grey sources
    too, as the references do) and passed through ``transform``."""

    def __init__(self, images: np.ndarray | Sequence[Path], labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        item = self.images[i]
        if isinstance(item, np.ndarray):
            image = Image.fromarray(item).convert("RGB")
        else:
            try:
                with Image.open(item) as f:
                    image = f.convert("RGB")
            except OSError as err:
                raise ValueError(f"image file {str(item)!r} is unreadable: {err}") from err
        return self.transform(image), int(self.labels[i])


def _split_data(pipeline: Pipeline, train: tuple, test: tuple, num_classes: int) -> ClassificationData:
    """Train (augmented and not) and test datasets of one source with its pipeline."""
    plain, augmented = pipeline.transforms(augment=False), pipeline.transforms(augment=True)
    return ClassificationData(
        train=ImageDataset(*train, plain), test=ImageDataset(*test, plain),
        train_labels=np.asarray(train[1]), test_labels=np.asarray(test[1]),
        num_classes=num_classes, image_shape=IMAGE_SIZE, train_augmented=ImageDataset(*train, augmented))


def _need(root: Path, dataset: str, relative: Sequence[str]) -> None:
    missing = [r for r in relative if not (root / r).exists()]
    if missing:
        raise ValueError(f"{dataset} files not found under {str(root)!r}: missing {', '.join(missing)}")


def _damaged(path: Path, what: str, detail: object) -> ValueError:
    detail = " ".join(str(detail).split())  # one line: parser errors (YAML's) span several
    return ValueError(f"{str(path)!r} is not a valid {what} ({detail})")


# --- CIFAR (torchvision's python-version pickles) ----------------------------------------------
def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle -> uint8 images ``[N, 32, 32, 3]`` and labels."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as err:  # unpickling a damaged file raises many types
        raise _damaged(path, "CIFAR batch file", err) from err
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise _damaged(path, "CIFAR batch file", f"data {data.shape}, {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_cifar(root: Path, folder: str, train_files: Sequence[str], label_key: str,
                num_classes: int) -> tuple[tuple, tuple]:
    parts = [read_cifar_batch(root / folder / f, label_key) for f in train_files]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = read_cifar_batch(root / folder / ("test" if folder.startswith("cifar-100") else "test_batch"), label_key)
    for split, (_, labels) in (("training", train), ("test", test)):
        if not len(labels):
            raise _damaged(root / folder, f"CIFAR-{num_classes} folder", f"its {split} file holds no images")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise _damaged(root / folder, f"CIFAR-{num_classes} folder", f"labels outside 0..{num_classes - 1}")
    return train, test


CIFAR100_FILES = ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta")


def check_cifar100(root: Path) -> None:
    _need(root, "cifar100", CIFAR100_FILES)
    _read_cifar(root, "cifar-100-python", ["train"], "fine_labels", 100)


@register_dataset("cifar100", default_backbone="sup1k", num_classes=100, default_increment=10,
                  needs_data_dir=True, check=check_cifar100)
def load_cifar100(root: Path, preprocessing: Preprocessing) -> ClassificationData:
    """Split CIFAR-100 (50,000 / 10,000 images of 32 px, shown at 224)."""
    _need(root, "cifar100", CIFAR100_FILES)
    train, test = _read_cifar(root, "cifar-100-python", ["train"], "fine_labels", 100)
    return _split_data(preprocessing.pipeline("cifar"), train, test, 100)


# --- ImageNet-R -------------------------------------------------------------------------------
IMAGENET_R_SPLIT_SEED = 42  # the first run's seed of the HiDe/NoRGa scripts, which made the split
IMAGENET_R_TRAIN_FRACTION = 0.8


def imagenet_r_split(listing: Sequence[str], seed: int = IMAGENET_R_SPLIT_SEED) -> dict[str, str]:
    """The HiDe/NoRGa reference's split of ImageNet-R: ``random_split`` of the ImageFolder order
    (``<wnid>/<file>`` sorted) into 80 % train / 20 % test with torch's generator seeded ``seed``."""
    ordered = sorted(listing)
    n_train = int(IMAGENET_R_TRAIN_FRACTION * len(ordered))
    order = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(seed)).tolist()
    split = {ordered[i]: "train" for i in order[:n_train]}
    split.update({ordered[i]: "test" for i in order[n_train:]})
    return split


def shipped_imagenet_r_split() -> Path:
    return Path(str(files("promptcl.data") / "splits" / "imagenet_r.txt.gz"))


def read_split_file(path: Path) -> dict[str, str]:
    """``<train|test> <wnid>/<file>`` per line (gzip when the name ends in .gz)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt") as f:
            rows = [line.split(" ", 1) for line in f.read().splitlines() if line]
    except (OSError, UnicodeDecodeError) as err:
        raise _damaged(Path(path), "split file", err) from err
    if not rows or any(len(r) != 2 or r[0] not in ("train", "test") for r in rows):
        raise _damaged(Path(path), "split file", "lines must be '<train|test> <wnid>/<file>'")
    return {name: part for part, name in rows}


def read_coda_split(train_yaml: Path) -> tuple[dict[str, str], dict[str, int]]:
    """CODA-Prompt's ImageNet-R split (``dataloaders/splits/imagenet-r_{train,test}.yaml``: lists
    ``data`` of ``.../imagenet-r/<wnid>/<file>`` paths and ``targets`` of class indices): the split, and
    each class's index in that code base, which its seeded class order permutes."""
    import yaml

    split: dict[str, str] = {}
    classes: dict[str, int] = {}
    for part, path in zip(("train", "test"), split_files(train_yaml)):
        try:
            with open(path) as f:
                config = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            data, targets = config["data"], config["targets"]
        except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
            raise _damaged(path, "CODA-Prompt split file", err) from err
        if (not isinstance(data, list) or not isinstance(targets, list) or not data or len(data) != len(targets)
                or not all("imagenet-r/" in str(d) for d in data) or not all(isinstance(t, int) for t in targets)):
            raise _damaged(path, "CODA-Prompt split file", "'data' must list .../imagenet-r/<wnid>/<file> paths, "
                           "one per integer of 'targets'")
        for entry, target in zip(data, targets):
            name = str(entry).rsplit("imagenet-r/", 1)[1]
            split[name] = part
            if classes.setdefault(name.split("/")[0], target) != target:
                raise _damaged(path, "CODA-Prompt split file", f"class {name.split('/')[0]} has two indices")
    if sorted(classes.values()) != list(range(len(classes))):
        raise _damaged(train_yaml, "CODA-Prompt split file", "class indices are not 0..C-1, one per class")
    return split, classes


def is_coda_split(path: Path) -> bool:
    return Path(path).name.endswith((".yaml", ".yml"))


def split_files(path: Path) -> list[Path]:
    """The files a split file stands for: itself, or CODA-Prompt's train yaml and its test yaml."""
    path = Path(path)
    if not is_coda_split(path):
        return [path]
    if "_train." not in path.name:
        raise ValueError(f"CODA-Prompt split file {str(path)!r} must be the *_train.yaml file "
                         "(its *_test.yaml is read from beside it)")
    return [path, path.with_name(path.name.replace("_train.", "_test."))]


def split_sha256(path: Path) -> str:
    """One hash over the bytes of every file of a split (its identity in a run's configuration)."""
    digest = hashlib.sha256()
    for file in split_files(path):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def read_imagenet_r_split(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    """A split file (promptcl's list or CODA-Prompt's yaml pair): ``<wnid>/<file>`` -> train/test,
    and ``wnid`` -> class index (promptcl's list: the sorted wnids, as an ImageFolder numbers them)."""
    if is_coda_split(path):
        return read_coda_split(path)
    split = read_split_file(path)
    return split, {wnid: i for i, wnid in enumerate(sorted({name.split("/")[0] for name in split}))}


def write_split_file(split: dict[str, str], path: Path) -> None:
    text = "".join(f"{split[name]} {name}\n" for name in sorted(split))
    with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same split gives the same bytes
        f.write(text.encode())


def _imagenet_r_items(root: Path, split_file: Path) -> tuple[tuple, tuple]:
    split, index = read_imagenet_r_split(split_file)
    folder = root / "imagenet-r"
    missing = [name for name in split if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"imagenet_r: {len(missing)} of the {len(split)} images in the split list "
                         f"{str(split_file)!r} are missing under {str(folder)!r}, e.g. {missing[0]}")
    parts = []
    for part in ("train", "test"):
        names = sorted(n for n, p in split.items() if p == part)
        parts.append(([folder / n for n in names], np.array([index[n.split("/")[0]] for n in names])))
    return parts[0], parts[1]


def _check_image_headers(dataset: str, paths: Sequence[Path]) -> None:
    """Every image opens (its header is read, not decoded): a damaged file fails now, not in a loader
    worker hours into a run."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path):
                pass
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"{dataset}: image file {str(path)!r} is unreadable: {err}") from err


IMAGENET_R_CLASSES = 200


def check_imagenet_r(root: Path, split_file: Optional[Path] = None) -> None:
    _need(root, "imagenet_r", ["imagenet-r"])
    split_file = split_file or shipped_imagenet_r_split()
    train, test = _imagenet_r_items(root, split_file)
    for part, (_, labels) in (("train", train), ("test", test)):
        if set(labels.tolist()) != set(range(IMAGENET_R_CLASSES)):
            raise _damaged(Path(split_file), "Split ImageNet-R split",
                           f"its {part} images cover {len(set(labels.tolist()))} classes, not all {IMAGENET_R_CLASSES}")
    _check_image_headers("imagenet_r", [*train[0], *test[0]])


@register_dataset("imagenet_r", default_backbone="sup1k", num_classes=IMAGENET_R_CLASSES, default_increment=20,
                  needs_data_dir=True, method_preset="imagenet-r", check=check_imagenet_r, takes_split_file=True)
def load_imagenet_r(root: Path, preprocessing: Preprocessing, split_file: Optional[Path] = None) -> ClassificationData:
    """Split ImageNet-R: 200 classes, 24,000 / 6,000 images with the shipped split list (or ``split_file``)."""
    _need(root, "imagenet_r", ["imagenet-r"])
    train, test = _imagenet_r_items(root, split_file or shipped_imagenet_r_split())
    num_classes = int(max(train[1].max(), test[1].max())) + 1
    return _split_data(preprocessing.pipeline("other"), train, test, num_classes)


# --- CUB-200-2011 -----------------------------------------------------------------------------
CUB_FILES = ("CUB_200_2011/images.txt", "CUB_200_2011/image_class_labels.txt",
             "CUB_200_2011/train_test_split.txt", "CUB_200_2011/images")


def _read_id_table(path: Path) -> dict[int, str]:
    try:
        rows = [line.split(" ", 1) for line in path.read_text().splitlines() if line.strip()]
        return {int(k): v.strip() for k, v in rows}
    except (ValueError, UnicodeDecodeError) as err:
        raise _damaged(path, "CUB-200-2011 table ('<image id> <value>' per line)", err) from err


def _cub_items(root: Path) -> tuple[tuple, tuple]:
    _need(root, "cub200", CUB_FILES)
    base = root / "CUB_200_2011"
    images = _read_id_table(base / "images.txt")
    labels = _read_id_table(base / "image_class_labels.txt")
    is_train = _read_id_table(base / "train_test_split.txt")
    if not images or set(images) != set(labels) or set(images) != set(is_train):
        raise _damaged(base, "CUB-200-2011 folder", "images.txt, image_class_labels.txt and "
                       "train_test_split.txt list different image ids")
    if not all(label.isdigit() for label in labels.values()):
        raise _damaged(base / "image_class_labels.txt", "CUB-200-2011 table", "class ids must be integers")
    if not set(is_train.values()) <= {"0", "1"}:
        raise _damaged(base / "train_test_split.txt", "CUB-200-2011 table", "the split flag of an image is 1 or 0")
    missing = [images[i] for i in images if not (base / "images" / images[i]).is_file()]
    if missing:
        raise ValueError(f"cub200: {len(missing)} of {len(images)} images listed in images.txt are missing under "
                         f"{str(base / 'images')!r}, e.g. {missing[0]}")
    parts = []
    for flag in ("1", "0"):  # the official split: 1 = train
        ids = sorted(i for i in images if is_train[i] == flag)
        parts.append(([base / "images" / images[i] for i in ids], np.array([int(labels[i]) - 1 for i in ids])))
    return parts[0], parts[1]


def check_cub200(root: Path) -> None:
    train, test = _cub_items(root)
    if min(train[1].min(), test[1].min()) < 0 or max(train[1].max(), test[1].max()) >= 200:
        raise _damaged(root / "CUB_200_2011", "CUB-200-2011 folder", "class ids outside 1..200")
    _check_image_headers("cub200", [*train[0], *test[0]])


@register_dataset("cub200", default_backbone="sup21k_augreg", num_classes=200, default_increment=20,
                  needs_data_dir=True, method_preset="cub200", check=check_cub200)
def load_cub200(root: Path, preprocessing: Preprocessing) -> ClassificationData:
    """Split CUB-200-2011 with the official train_test_split.txt (5,994 / 5,794 images)."""
    train, test = _cub_items(root)
    return _split_data(preprocessing.pipeline("other"), train, test, 200)


# --- 5-datasets -------------------------------------------------------------------------------
FIVE_DATASETS_SOURCES = ("svhn", "mnist", "cifar10", "notmnist", "fashion_mnist")  # labels offset by 10 each


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format; ``.gz`` too) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
        if zero != b"\x00\x00" or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(dims).copy()
    except (OSError, ValueError, IndexError, EOFError) as err:
        raise _damaged(path, "idx file", err) from err


def _read_mnist_like(root: Path, folder: str) -> tuple[tuple, tuple]:
    parts = []
    for prefix in ("train", "t10k"):
        images = read_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte")
        labels = read_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte").astype(np.int64)
        if images.ndim != 3 or len(images) != len(labels) or labels.max(initial=0) > 9:
            raise _damaged(root / folder / "raw", f"{folder} folder", f"images {images.shape}, {len(labels)} labels")
        parts.append((images, labels))
    return parts[0], parts[1]


def _read_svhn(root: Path) -> tuple[tuple, tuple]:
    from scipy.io import loadmat

    parts = []
    for name in ("train_32x32.mat", "test_32x32.mat"):
        try:
            mat = loadmat(str(root / name))
            images = np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2)  # [32, 32, 3, N] -> NHWC
            labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10  # the file writes digit 0 as 10
        except Exception as err:  # scipy raises many types for a damaged .mat
            raise _damaged(root / name, "SVHN .mat file", err) from err
        if images.shape[1:] != (32, 32, 3) or len(images) != len(labels):
            raise _damaged(root / name, "SVHN .mat file", f"X {images.shape}, {len(labels)} labels")
        parts.append((images, labels))
    return parts[0], parts[1]


def _read_notmnist(root: Path) -> tuple[tuple, tuple]:
    """Letters A-J as the reference reads them: folder letter = label; unreadable images skipped."""
    from PIL import Image, UnidentifiedImageError

    parts = []
    for subset in ("Train", "Test"):
        images, labels = [], []
        for letter in "ABCDEFGHIJ":
            folder = root / "notMNIST" / subset / letter
            if not folder.is_dir():
                raise ValueError(f"five_datasets files not found under {str(root)!r}: "
                                 f"missing notMNIST/{subset}/{letter}")
            for path in sorted(folder.iterdir()):
                try:
                    with Image.open(path) as f:
                        images.append(np.asarray(f.convert("L").resize((28, 28))))
                except (OSError, UnidentifiedImageError):
                    continue  # the release holds a few empty files; the reference skips them too
                labels.append(ord(letter) - ord("A"))
        if not images:
            raise _damaged(root / "notMNIST" / subset, "notMNIST folder", "no readable images")
        parts.append((np.stack(images), np.array(labels)))
    return parts[0], parts[1]


FIVE_DATASETS_FILES = ("train_32x32.mat", "test_32x32.mat",
                       *(f"{d}/raw/{p}-{k}-idx{n}-ubyte" for d in ("MNIST", "FashionMNIST")
                         for p in ("train", "t10k") for k, n in (("images", 3), ("labels", 1))),
                       *(f"cifar-10-batches-py/{f}" for f in ("data_batch_1", "data_batch_2", "data_batch_3",
                                                              "data_batch_4", "data_batch_5", "test_batch")),
                       "notMNIST/Train", "notMNIST/Test")


def _five_datasets_parts(root: Path) -> list[tuple[str, tuple, tuple]]:
    _need(root, "five_datasets", FIVE_DATASETS_FILES)
    cifar10 = _read_cifar(root, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "labels", 10)
    return [("other", *_read_svhn(root)), ("other", *_read_mnist_like(root, "MNIST")), ("cifar", *cifar10),
            ("other", *_read_notmnist(root)), ("other", *_read_mnist_like(root, "FashionMNIST"))]


def check_five_datasets(root: Path) -> None:
    _five_datasets_parts(root)


@register_dataset("five_datasets", default_backbone="sup21k", num_classes=50, default_increment=10,
                  needs_data_dir=True, method_preset="5datasets", domain_size=10, check=check_five_datasets)
def load_five_datasets(root: Path, preprocessing: Preprocessing,
                       sources_learned: Optional[Sequence[int]] = None) -> ClassificationData:
    """5-datasets: SVHN, MNIST, CIFAR-10, notMNIST, Fashion-MNIST, one 10-class task each (the class
    order permutes them; ``sources_learned`` is that order, for protocols whose pipelines depend on
    it), labels offset by 10 per source in that list's order; grey images to RGB."""
    sources = _five_datasets_parts(root)
    pipelines = preprocessing.source_pipelines([kind for kind, *_ in sources], sources_learned)
    parts = [_split_data(pipeline, (x, y + 10 * k), (xt, yt + 10 * k), 50)
             for k, (pipeline, (_, (x, y), (xt, yt))) in enumerate(zip(pipelines, sources))]
    return ClassificationData(
        train=ConcatDataset([p.train for p in parts]), test=ConcatDataset([p.test for p in parts]),
        train_labels=np.concatenate([p.train_labels for p in parts]),
        test_labels=np.concatenate([p.test_labels for p in parts]),
        num_classes=50, image_shape=IMAGE_SIZE, train_augmented=ConcatDataset([p.train_augmented for p in parts]))

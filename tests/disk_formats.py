"""Writers of the seed benchmarks' on-disk formats, for tests that run the real loaders on small files."""

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def solid_images(colours: np.ndarray, size: int = 32, channels: int = 3) -> np.ndarray:
    """One flat-coloured uint8 image per entry of ``colours``, ``[N, size, size(, channels)]``."""
    shape = (len(colours), size, size) + ((channels,) if channels > 1 else ())
    return np.broadcast_to(colours.reshape((-1,) + (1,) * (len(shape) - 1)), shape).astype(np.uint8).copy()


def write_cifar(root: Path, folder: str, files: dict, label_key: str, classes: int):
    """Pickles as the python-version releases: ``data`` [N, 3072] uint8 (channel planes), labels."""
    (root / folder).mkdir(parents=True)
    written = {}
    for name, count in files.items():
        labels = np.repeat(np.arange(classes), count)
        colours = (labels * 2 + (name != "test" and name != "test_batch")) % 256
        images = solid_images(colours)
        batch = {"data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1), label_key: labels.tolist(),
                 "filenames": [f"img_{i}.png" for i in range(len(labels))], "batch_label": name}
        with open(root / folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = (images, labels)
    meta_name = "meta" if folder.startswith("cifar-100") else "batches.meta"
    with open(root / folder / meta_name, "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(classes)]}, f, protocol=2)
    return written


def write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_jpegs(folder: Path, names: list[str], colour: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.full((40, 48, 3), colour, np.uint8)).save(folder / name)



"""A study-wide store of frozen, un-prompted backbone features (queries, task inference, statistics).

Every trial, seed and method of a study makes the same un-prompted passes of the same frozen
backbone over the same images: the query pass of query-based selection, HiDe/NoRGa's task-identity
features, SimpleCIL's prototypes. A :class:`FeatureStore` computes each once. Entries are keyed by
the exact bytes (and shape and dtype) of each input image, so any preprocessing, dataset or split is
part of the key by construction, and by a fingerprint of everything else that determines a feature
(the engine's: backbone name, a digest of its weights, precision, device (GPU model or CPU
instruction set) and matmul settings, torch and timm versions, a digest of the frozen pass's source;
and this format's version): one directory per fingerprint under the store's root (a local path or
any URI pyarrow reaches, e.g. the study's storage path on a cluster).

Files are Arrow IPC segments: a run appends what it computed as a new segment, written under a
temporary name and moved into place, so concurrent trials never write the same file and readers
never see a partial one. A segment that cannot be read, or whose schema or fingerprint is not this
store's (stale), is reported (logger ``promptcl.feature_store``), removed, and its features computed
again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.ipc
import torch

from promptcl.storage import check_writable_location

FORMAT_VERSION = 1
SEGMENT_SUFFIX = ".arrow"
log = logging.getLogger("promptcl.feature_store")


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of a module's state (names, shapes, dtypes and bytes of every tensor)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sample_keys(images: torch.Tensor) -> list[bytes]:
    """One 16-byte key per image: a digest of its exact bytes, shape and dtype."""
    cpu = images.detach().to("cpu").contiguous()
    prefix = f"{tuple(cpu.shape[1:])}:{cpu.dtype};".encode()
    flat = cpu.reshape(len(cpu), -1).view(torch.uint8).numpy()
    return [hashlib.blake2b(prefix + row.tobytes(), digest_size=16).digest() for row in flat]


def check_root(root: str | Path) -> None:
    """Raise ValueError, before a run starts, when the store root cannot be a directory."""
    check_writable_location("feature cache", root)


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(fingerprint, sort_keys=True).encode(), digest_size=12).hexdigest()


class FeatureStore:
    def __init__(self, root: str | Path, fingerprint: dict[str, Any]) -> None:
        self.fingerprint = {"format": FORMAT_VERSION, **fingerprint}
        self.digest = fingerprint_digest(self.fingerprint)
        location = str(root) if "://" in str(root) else str(Path(root).resolve())
        self.fs, base = pyarrow.fs.FileSystem.from_uri(location if "://" in location else Path(location).as_uri())
        self.dir = f"{base.rstrip('/')}/{self.digest}"
        self.fs.create_dir(self.dir, recursive=True)
        self._features: dict[bytes, np.ndarray] = {}
        self._pending: list[tuple[bytes, np.ndarray]] = []
        self._seen: set[str] = set()
        self.computed = self.reused = 0
        self.refresh()

    def __len__(self) -> int:
        return len(self._features)

    def features(self, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``compute(images)`` (float32, on the images' device), computing only the images not stored."""
        keys = sample_keys(images)
        missing = [i for i, k in enumerate(keys) if k not in self._features]
        if missing:
            fresh = compute(images[missing]).detach().float().cpu().numpy()
            for i, row in zip(missing, fresh):
                if keys[i] not in self._features:  # an image twice in one batch is stored once
                    self._pending.append((keys[i], row))
                self._features[keys[i]] = row
        self.computed += len(missing)
        self.reused += len(keys) - len(missing)
        return torch.from_numpy(np.stack([self._features[k] for k in keys])).to(images.device)

    def refresh(self) -> None:
        """Load the segments other runs have written since this store last looked."""
        selector = pyarrow.fs.FileSelector(self.dir, allow_not_found=True)
        for info in sorted(self.fs.get_file_info(selector), key=lambda i: i.path):
            if not info.path.endswith(SEGMENT_SUFFIX) or info.path in self._seen:
                continue
            self._seen.add(info.path)
            try:
                self._load(info.path)
            except Exception as err:  # pyarrow raises many types for a damaged file
                self._discard(info.path, f"corrupt ({str(err).splitlines()[0] if str(err) else type(err).__name__})")

    def flush(self) -> None:
        """Write what this run computed as a new segment (atomically: temporary name, then move)."""
        if not self._pending:
            return
        dim = len(self._pending[0][1])
        table = pa.table({
            "key": pa.array([k for k, _ in self._pending], type=pa.binary(16)),
            "feature": pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate([row for _, row in self._pending]), type=pa.float32()), dim),
        }).replace_schema_metadata({"fingerprint": json.dumps(self.fingerprint, sort_keys=True)})
        name = f"{self.dir}/{uuid.uuid4().hex}"
        with self.fs.open_output_stream(name + ".tmp") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        self.fs.move(name + ".tmp", name + SEGMENT_SUFFIX)
        self._seen.add(name + SEGMENT_SUFFIX)
        self._pending.clear()

    def _load(self, path: str) -> None:
        with self.fs.open_input_file(path) as f:
            table = pa.ipc.open_file(f).read_all()
        meta = table.schema.metadata or {}
        stored = json.loads(meta.get(b"fingerprint", b"{}"))
        if stored != self.fingerprint:
            self._discard(path, "stale (written for another backbone, weights, precision or format)")
            return
        if table.schema.names != ["key", "feature"] or not pa.types.is_fixed_size_list(table.schema.field(1).type):
            raise ValueError(f"unexpected schema {table.schema}")
        keys = table.column("key").to_pylist()
        features = table.column("feature").combine_chunks()
        rows = features.flatten().to_numpy(zero_copy_only=False).reshape(len(keys), features.type.list_size)
        for key, row in zip(keys, rows):
            self._features[key] = row

    def _discard(self, path: str, why: str) -> None:
        log.warning("feature store: segment %s is %s; removed, its features will be computed again", path, why)
        try:
            self.fs.delete_file(path)
        except (FileNotFoundError, OSError):  # another run removed it first
            pass

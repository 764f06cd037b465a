"""The study-wide store of un-prompted backbone features: hit, miss, stale, corrupt, concurrent writers."""

import json
import logging
import multiprocessing
import shutil

import numpy as np
import pytest
import torch

from promptcl.core.feature_store import FeatureStore, weights_digest
from promptcl.engine import RunSpec, resolve_run, run_sequence

FINGERPRINT = {"backbone": "toy", "weights": "w1", "precision": "fp32", "device": "cpu", "torch": "x"}


class Encoder:
    """A stand-in for the frozen pass that counts the images it is asked for."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(images))
        return torch.stack([images.flatten(1).sum(1), images.flatten(1).amax(1)], dim=1)


def images(seed: int, n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def segments(store: FeatureStore) -> list[str]:
    return sorted(p.name for p in (store_dir(store)).iterdir())


def store_dir(store: FeatureStore):
    from pathlib import Path

    return Path(store.dir)


def test_only_images_not_stored_are_computed_and_every_result_equals_the_pass(tmp_path):
    encoder, store = Encoder(), FeatureStore(tmp_path, FINGERPRINT)
    a, b = images(0), images(1)
    first = store.features(a, encoder)
    torch.testing.assert_close(first, encoder(a))
    encoder.calls.clear()
    mixed = torch.cat([b[:2], a[3:], a[:1]])  # new images, and stored ones in another batch
    torch.testing.assert_close(store.features(mixed, encoder), Encoder()(mixed))
    assert encoder.calls == [2]  # only b's two images went through the pass
    assert (store.computed, store.reused) == (6 + 2, 4)


def test_a_new_store_on_the_same_root_and_fingerprint_reads_what_was_flushed(tmp_path):
    encoder = Encoder()
    store = FeatureStore(tmp_path, FINGERPRINT)
    expected = store.features(images(0), encoder)
    store.flush()
    assert not any(name.endswith(".tmp") for name in segments(store))

    def never(_):
        raise AssertionError("a stored image was computed again")
    again = FeatureStore(tmp_path, FINGERPRINT)
    assert len(again) == 6
    torch.testing.assert_close(again.features(images(0), never), expected)
    assert (again.computed, again.reused) == (0, 6)
    # another backbone's weights: another fingerprint, nothing shared
    other = FeatureStore(tmp_path, {**FINGERPRINT, "weights": "w2"})
    assert len(other) == 0 and other.dir != again.dir


def test_a_stale_segment_is_reported_removed_and_computed_again(tmp_path, caplog):
    encoder = Encoder()
    old = FeatureStore(tmp_path, {**FINGERPRINT, "precision": "bf16"})
    old.features(images(0), encoder)
    old.flush()
    new = FeatureStore(tmp_path, FINGERPRINT)
    (stale,) = segments(old)
    shutil.copy(store_dir(old) / stale, store_dir(new) / stale)  # e.g. a directory copied by hand
    with caplog.at_level(logging.WARNING, logger="promptcl.feature_store"):
        fresh = FeatureStore(tmp_path, FINGERPRINT)
    assert "is stale" in caplog.text and stale in caplog.text
    assert len(fresh) == 0 and segments(fresh) == []
    fresh.features(images(0), encoder)
    assert fresh.computed == 6


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_schema"])
def test_a_corrupt_segment_is_reported_removed_and_computed_again(tmp_path, caplog, damage):
    import pyarrow as pa
    import pyarrow.ipc

    encoder = Encoder()
    store = FeatureStore(tmp_path, FINGERPRINT)
    store.features(images(0), encoder)
    store.flush()
    (name,) = segments(store)
    path = store_dir(store) / name
    if damage == "garbage":
        path.write_bytes(b"not an arrow file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:  # readable, this store's fingerprint, but not its columns
        table = pa.table({"x": [1]}).replace_schema_metadata(
            {"fingerprint": json.dumps({"format": 1, **FINGERPRINT}, sort_keys=True)})
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    with caplog.at_level(logging.WARNING, logger="promptcl.feature_store"):
        again = FeatureStore(tmp_path, FINGERPRINT)
    assert "is corrupt" in caplog.text and name in caplog.text
    assert len(again) == 0 and not path.exists()
    torch.testing.assert_close(again.features(images(0), encoder), encoder(images(0)))


def _writer(root: str, seed: int) -> None:
    store = FeatureStore(root, FINGERPRINT)
    for round_ in range(5):  # overlapping images across writers and rounds
        store.features(torch.cat([images(round_), images(100 + seed)]), Encoder())
        store.flush()


def test_concurrent_writers_never_clash_and_a_reader_sees_all_of_their_work(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(str(tmp_path), seed)) for seed in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    store = FeatureStore(tmp_path, FINGERPRINT)
    assert len(store) == 5 * 6 + 3 * 6  # the shared rounds once, each writer's own images
    assert all(name.endswith(".arrow") for name in segments(store))
    expected = Encoder()(torch.cat([images(r) for r in range(5)]))

    def never(_):
        raise AssertionError("a stored image was computed again")
    torch.testing.assert_close(store.features(torch.cat([images(r) for r in range(5)]), never), expected)


def test_weights_digest_sees_every_weight():
    a = torch.nn.Linear(3, 2)
    digest = weights_digest(a)
    assert weights_digest(a) == digest
    with torch.no_grad():
        a.bias[1] += 1e-7
    assert weights_digest(a) != digest


@pytest.mark.parametrize("method", ["hide", "simplecil"])
def test_a_second_run_makes_no_unprompted_pass_the_first_one_made_and_gets_the_same_results(tmp_path, method):
    """HiDe's task-identity features and SimpleCIL's prototypes and queries come from the store on
    the second run (another seed: another class order, the same images), with the accuracies of a
    run without a store."""
    overrides = {"epochs": 1, "tii_epochs": 2, "tap_epochs": 1} if method == "hide" else {}
    cache = str(tmp_path / "cache")
    runs = {}
    for name, seed, store in [("plain", 1, None), ("first", 0, cache), ("second", 1, cache)]:
        run = resolve_run(RunSpec(method=method, dataset="digits", seed=seed, overrides=overrides))
        runs[name] = run_sequence(run, tmp_path / name, feature_cache=store)
    assert runs["plain"]["frozen_images_computed"] > 0 and runs["plain"]["frozen_images_reused"] == 0
    assert runs["first"]["frozen_images_computed"] > 0
    assert runs["second"]["frozen_images_computed"] == 0 and runs["second"]["frozen_images_reused"] > 0
    assert runs["second"]["frozen_images_reused"] == runs["plain"]["frozen_images_computed"]
    np.testing.assert_allclose(runs["second"]["accuracy_matrix"], runs["plain"]["accuracy_matrix"], atol=1e-9)


def test_sample_keys_see_every_byte_the_shape_and_the_dtype():
    """Images with the same bytes but another shape or dtype are other images: their features differ."""
    from promptcl.core.feature_store import sample_keys

    x = torch.zeros(1, 1, 4, 4)
    key = sample_keys(x)[0]
    assert sample_keys(x.clone())[0] == key
    assert sample_keys(torch.zeros(1, 1, 2, 8))[0] != key
    assert sample_keys(torch.zeros(1, 1, 4, 4, dtype=torch.int32))[0] != key  # the same 64 zero bytes
    y = x.clone()
    y[0, 0, 3, 3] = 1e-30
    assert sample_keys(y)[0] != key


def test_a_runs_store_fingerprint_holds_what_changes_the_features(tmp_path):
    """The engine's store of a run: another precision, compiled pass or backbone weights is another
    store (bf16 features must never serve an fp32 run); the same run finds the same store."""
    from promptcl.engine import _feature_store, build_method

    def store(**spec):
        run = resolve_run(RunSpec(method="simplecil", dataset="digits", **spec))
        method = build_method(run, num_classes=10, num_tasks=5, device=torch.device("cpu"))
        return method, _feature_store(str(tmp_path), run, method, torch.device("cpu"))

    method, fp32 = store()
    assert store()[1].dir == fp32.dir
    assert store(precision="bf16")[1].dir != fp32.dir
    assert store(compile_backbone=True)[1].dir != fp32.dir
    with torch.no_grad():
        method.backbone.blocks[0].mlp.fc1.bias[0] += 1.0
    assert _feature_store(str(tmp_path), resolve_run(RunSpec(method="simplecil", dataset="digits")), method,
                          torch.device("cpu")).dir != fp32.dir
    # what else computes the feature: the library versions, the frozen pass's own code, the matmul precision
    assert {"torch", "timm", "code", "matmul_precision"} <= set(fp32.fingerprint)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert store()[1].dir != fp32.dir
    finally:
        torch.set_float32_matmul_precision(previous)


def test_a_cpu_with_another_instruction_set_opens_another_store(tmp_path, monkeypatch):
    """AVX2 and AVX-512 kernels round differently: a cluster node of another CPU kind must not
    serve its features to this one."""
    from promptcl.engine import _feature_store, build_method

    run = resolve_run(RunSpec(method="simplecil", dataset="digits"))
    method = build_method(run, num_classes=10, num_tasks=5, device=torch.device("cpu"))
    here = _feature_store(str(tmp_path), run, method, torch.device("cpu"))
    assert here.fingerprint["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    other = "AVX512" if here.fingerprint["cpu_capability"] != "AVX512" else "AVX2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    assert _feature_store(str(tmp_path), run, method, torch.device("cpu")).dir != here.dir

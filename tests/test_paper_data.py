"""The seed papers' benchmarks read from their on-disk formats, on small files these tests write:
loaders, the ImageNet-R split, data-root errors, the preprocessing protocols and the DataLoaders."""

import dataclasses
import gzip
import hashlib
import http.server
import json
import os
import pickle
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from disk_formats import solid_images, write_cifar, write_idx, write_jpegs
from promptcl.data import paper
from promptcl.data.benchmarks import (ClassIncremental, DATASETS, load_dataset, scenario_class_order,
                                      seeded_class_order, source_order)
from promptcl.data.preprocessing import CIFAR100_MEAN, CIFAR100_STD, CODA, HIDE, HIDE_CARRYOVER, OVOR, common
from promptcl.cli import main
from promptcl.engine import RunSpec, resolve_run

DISK_BENCHMARKS = ("cifar100", "imagenet_r", "cub200", "five_datasets")


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    monkeypatch.delenv("PROMPTCL_DATA", raising=False)


@pytest.fixture(scope="module")
def cifar_root(cifar100_files):
    return cifar100_files


@pytest.fixture(scope="module")
def five_root(tmp_path_factory):
    from scipy.io import savemat

    root = tmp_path_factory.mktemp("five")
    labels = np.arange(10)
    for name, count in (("train_32x32.mat", 2), ("test_32x32.mat", 1)):  # SVHN writes digit 0 as 10
        y = np.repeat(labels, count)
        savemat(str(root / name), {"X": solid_images(y * 20).transpose(1, 2, 3, 0),
                                   "y": np.where(y == 0, 10, y)[:, None]})
    for folder in ("MNIST", "FashionMNIST"):
        for prefix, count in (("train", 2), ("t10k", 1)):
            y = np.repeat(labels, count)
            write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", solid_images(y * 25, 28, 1))
            write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", y)
    write_cifar(root, "cifar-10-batches-py", {**{f"data_batch_{i}": 1 for i in range(1, 6)}, "test_batch": 1},
                "labels", 10)
    for subset, count in (("Train", 2), ("Test", 1)):
        for k, letter in enumerate("ABCDEFGHIJ"):
            folder = root / "notMNIST" / subset / letter
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((28, 28), 10 * k, np.uint8)).save(folder / f"{letter}{i}.png")
            (folder / "empty.png").write_bytes(b"")  # the release holds some; the reference skips them
    return root


# --- loaders ----------------------------------------------------------------------------------
def test_cifar100_reads_the_python_pickles_through_each_protocol(cifar_root):
    root, written = cifar_root
    data = load_dataset("cifar100", root, HIDE)
    assert len(data.train) == 200 and len(data.test) == 100 and data.num_classes == 100
    assert np.array_equal(data.train_labels, written["train"][1])
    image, label = data.test[7]
    assert image.shape == (3, 224, 224) and label == 7
    colour = written["test"][0][7, 0, 0, 0] / 255  # flat images: the test pipeline keeps the colour exactly
    expected = (colour - torch.tensor(CIFAR100_MEAN)) / torch.tensor(CIFAR100_STD)
    torch.testing.assert_close(image.mean((1, 2)), expected.float(), atol=1e-5, rtol=0)
    raw, _ = load_dataset("cifar100", root, CODA).test[7]  # SMoPE's: [0, 1] pixels, Resize(224), no crop
    assert raw.shape == (3, 224, 224)
    torch.testing.assert_close(raw, torch.full_like(raw, colour), atol=1e-6, rtol=0)


def test_five_datasets_offsets_labels_per_source_and_makes_grey_images_rgb(five_root):
    data = load_dataset("five_datasets", five_root, HIDE)
    assert data.num_classes == 50 and len(data.train) == 130 and len(data.test) == 50  # CIFAR-10: 5 batches
    assert sorted(set(data.train_labels.tolist())) == list(range(50))
    for k, source in enumerate(paper.FIVE_DATASETS_SOURCES):
        labels = data.test_labels[10 * k:10 * k + 10]
        assert labels.tolist() == list(range(10 * k, 10 * k + 10)), source
    svhn_zero, label = data.test[0]
    assert label == 0 and svhn_zero.shape == (3, 224, 224)  # SVHN's '10' is digit 0
    mnist_three, label = data.test[13]
    assert label == 13 and torch.allclose(mnist_three[0], mnist_three[2])  # grey to RGB
    torch.testing.assert_close(mnist_three.mean(), torch.tensor(75 / 255), atol=1e-5, rtol=0)  # no mean/std
    cifar10_image, _ = data.test[20]  # the CIFAR part takes the CIFAR pipeline (normalised)
    assert cifar10_image.min() < 0
    assert (data.train_labels // 10 == 3).sum() == 20  # notMNIST: the empty files skipped


def test_five_datasets_source_order_follows_the_reference_shuffle():
    sources = list(paper.FIVE_DATASETS_SOURCES)
    random.Random(42).shuffle(sources)  # the reference shuffles its dataset list with the run seed
    assert sources == ["notmnist", "mnist", "cifar10", "fashion_mnist", "svhn"]  # norga.md 5.2, seed 42
    order = scenario_class_order("five_datasets", 42)
    assert [order[10 * t] // 10 for t in range(5)] == [paper.FIVE_DATASETS_SOURCES.index(s) for s in sources]


def test_seeded_except_0_keeps_the_datasets_order_at_seed_0_only():
    """CODA-Prompt's trainer (and VQ-Prompt's, OVOR's loaders) shuffle only ``if seed > 0``."""
    assert scenario_class_order("cifar100", 0, "seeded-except-0") == list(range(100))
    assert scenario_class_order("cifar100", 0) != list(range(100))  # the plain rule shuffles seed 0 too
    for seed in (1, 3, 12):
        assert scenario_class_order("cifar100", seed, "seeded-except-0") == scenario_class_order("cifar100", seed)
    assert scenario_class_order("imagenet_r", 2, "seeded-except-0") == seeded_class_order(200, 2)
    run = resolve_run(RunSpec(method="simplecil", dataset="digits", seed=0, class_order="seeded-except-0"))
    assert run.spec.class_order == "seeded-except-0"


def test_natural_class_order_is_the_datasets_own_at_every_seed():
    """HiDe-Prompt's scripts never pass --shuffle: every seed learns the classes, or 5-Datasets' sources
    (its unshuffled list: SVHN, MNIST, CIFAR-10, notMNIST, Fashion-MNIST), in the dataset's order."""
    for seed in (0, 42):
        assert scenario_class_order("cifar100", seed, "natural") == list(range(100))
    assert scenario_class_order("cifar100", 42)[:3] == [42, 41, 91]  # seeded stays the default
    assert scenario_class_order("five_datasets", 40, "natural") == list(range(50))
    assert paper.FIVE_DATASETS_SOURCES == ("svhn", "mnist", "cifar10", "notmnist", "fashion_mnist")
    with pytest.raises(ValueError,
                       match="unknown class order 'sorted'; choose one of seeded, natural, seeded-except-0"):
        scenario_class_order("cifar100", 0, "sorted")
    with pytest.raises(ValueError, match="unknown class order 'sorted'"):
        resolve_run(RunSpec(method="simplecil", dataset="digits", class_order="sorted"))


def _normalised_sources(data) -> list[bool]:
    """Per 5-Datasets source (dataset order): do its test, statistics and augmented images take a
    mean/std normalisation (the CIFAR pipeline)? The three always agree."""
    from torchvision import transforms as T

    def normalised(part) -> bool:
        return any(isinstance(t, T.Normalize) for t in part.transform.transforms)

    kinds = [(normalised(a), normalised(b), normalised(c))
             for a, b, c in zip(data.test.datasets, data.train.datasets, data.train_augmented.datasets)]
    assert all(len(set(k)) == 1 for k in kinds)
    return [k[0] for k in kinds]


def test_hide_carryover_gives_the_cifar_pipeline_to_every_source_learned_after_cifar10(five_root):
    """The HiDe/NoRGa code's 5-Datasets loop sets the CIFAR transforms when it reaches CIFAR-10 and
    never resets them: ``reference-hide-carryover`` reproduces that, ``reference-hide`` does not."""
    learned = source_order("five_datasets", scenario_class_order("five_datasets", 42))
    assert learned == [3, 1, 2, 4, 0]  # notMNIST, MNIST, CIFAR-10, Fashion-MNIST, SVHN
    assert _normalised_sources(load_dataset("five_datasets", five_root, HIDE, sources_learned=learned)) == \
        [False, False, True, False, False]
    assert _normalised_sources(load_dataset("five_datasets", five_root, HIDE_CARRYOVER, sources_learned=learned)) == \
        [True, False, True, False, True]
    natural = source_order("five_datasets", scenario_class_order("five_datasets", 0, "natural"))
    assert _normalised_sources(load_dataset("five_datasets", five_root, HIDE_CARRYOVER, sources_learned=natural)) == \
        [False, False, True, True, True]
    with pytest.raises(ValueError, match="needs the order the sources are learned in"):
        load_dataset("five_datasets", five_root, HIDE_CARRYOVER)


@pytest.mark.parametrize("class_order, normalised", [("seeded", [True, False, True, False, True]),
                                                     ("natural", [False, False, True, True, True])])
def test_a_run_hands_its_source_order_to_the_carryover_protocol(five_root, class_order, normalised):
    """The engine loads 5-Datasets with the order its class order learns the sources in (seed 42:
    notMNIST, MNIST, CIFAR-10, Fashion-MNIST, SVHN; natural: the list's own order)."""
    from promptcl import engine

    run = resolve_run(RunSpec(method="simplecil", dataset="five_datasets", data_dir=str(five_root), seed=42,
                              class_order=class_order, backbone="vit_tiny_patch16_224", pretrained=False,
                              protocol="reference-hide-carryover", loader_workers=0))
    setup = engine._set_up(run)
    assert _normalised_sources(setup.scenario.data) == normalised


def test_carryover_changes_nothing_on_a_single_source_benchmark(cifar_root):
    root, _ = cifar_root
    carried, plain = (load_dataset("cifar100", root, p) for p in (HIDE_CARRYOVER, HIDE))
    for part in ("train", "test", "train_augmented"):
        assert repr(getattr(carried, part).transform) == repr(getattr(plain, part).transform)


def test_checkpoints_and_summaries_written_before_a_configuration_field_existed_still_match(cifar_root):
    """Fields added later (the class order, the carry-over switch, SMoPE's / VQ-Prompt's scheduler
    switches) are read at the value that gives what older versions ran; any other value is another
    configuration."""
    from promptcl.engine import _config_key, same_configuration

    root, _ = cifar_root
    run = resolve_run(RunSpec(method="simplecil", dataset="cifar100", data_dir=str(root), increment=50,
                              backbone="vit_tiny_patch16_224", pretrained=False, protocol="reference-hide"))
    stored = json.loads(_config_key(run))
    assert same_configuration(stored, run)
    del stored["run"]["class_order"], stored["preprocessing"]["cifar_carryover"]  # as b644e03 wrote it
    assert same_configuration(stored, run)
    natural = resolve_run(dataclasses.replace(run.spec, class_order="natural"))
    carried = resolve_run(dataclasses.replace(run.spec, protocol="reference-hide-carryover"))
    assert not same_configuration(stored, natural) and not same_configuration(stored, carried)
    stored["run"]["seed"] = 1
    assert not same_configuration(stored, run)
    # a method's added fields: read at their defaults where the run's method has them, and only there
    vq = resolve_run(RunSpec(method="vqprompt", dataset="digits"))
    stored = json.loads(_config_key(vq))
    for added in ("compat_schedule_iter_step", "compat_first_step_at_base_lr", "compat_population_variance"):
        del stored["method_config"][added]
    assert same_configuration(stored, vq)
    assert not same_configuration(stored, resolve_run(RunSpec(method="vqprompt", dataset="digits",
                                                             overrides={"compat_first_step_at_base_lr": True})))
    simple = resolve_run(RunSpec(method="simplecil", dataset="digits"))
    stored = json.loads(_config_key(simple))
    assert "compat_schedule_iter_step" not in stored["method_config"] and same_configuration(stored, simple)
    stored["method_config"]["compat_schedule_iter_step"] = 0
    assert not same_configuration(stored, simple)


@pytest.mark.parametrize("rule, seed, expected", [("natural", 3, list(range(10))),
                                                 ("seeded-except-0", 0, list(range(10))),
                                                 ("seeded-except-0", 3, seeded_class_order(10, 3))])
def test_a_run_learns_its_class_order_and_records_it(tmp_path, rule, seed, expected):
    out = tmp_path / "run"
    assert main(["run", "--method", "simplecil", "--dataset", "digits", "--seed", str(seed), "--class-order", rule,
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["class_order"] == expected and summary["config"]["run"]["class_order"] == rule


def test_cub200_follows_the_official_split_file(tmp_path):
    base = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images, labels, split, image_id = [], [], [], 0
    for c, name in enumerate(classes):
        files = [f"{name}/{name[4:]}_{i:04d}_1.jpg" for i in range(4)]
        write_jpegs(base / "images" / name, [f.split("/")[1] for f in files], 60 * c)
        for i, f in enumerate(files):
            image_id += 1
            images.append(f"{image_id} {f}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {int(i % 2 == 0)}")
    for name, rows in (("images.txt", images), ("image_class_labels.txt", labels), ("train_test_split.txt", split)):
        (base / name).write_text("\n".join(rows) + "\n")
    data = load_dataset("cub200", tmp_path, CODA)
    assert len(data.train) == 6 and len(data.test) == 6
    assert data.train_labels.tolist() == [0, 0, 1, 1, 2, 2]
    image, label = data.test[5]
    assert label == 2 and image.shape == (3, 224, 224)
    torch.testing.assert_close(image.mean(), torch.tensor(120 / 255), atol=1e-5, rtol=0)
    damaged = base / "images" / classes[1] / f"{classes[1][4:]}_0002_1.jpg"
    original = damaged.read_bytes()
    damaged.write_bytes(b"")  # an empty download: refused before any work, naming the file
    with pytest.raises(ValueError, match=r"cub200: image file .*_0002_1\.jpg' is unreadable"):
        paper.check_cub200(tmp_path)
    damaged.write_bytes(original)
    bad_tables = [("image_class_labels.txt", labels[:-1], "list different image ids"),
                  ("image_class_labels.txt", [*labels[:-1], f"{image_id} three"],
                   r"image_class_labels.txt' is not a valid CUB-200-2011 table \(class ids must be integers\)"),
                  ("train_test_split.txt", [*split[:-1], f"{image_id} 2"],
                   r"train_test_split.txt' is not a valid .* \(the split flag of an image is 1 or 0\)")]
    for name, rows, message in bad_tables:
        good = (base / name).read_text()
        (base / name).write_text("\n".join(rows) + "\n")
        with pytest.raises(ValueError, match=message):
            load_dataset("cub200", tmp_path, CODA)
        (base / name).write_text(good)


def test_imagenet_r_loader_reads_a_split_list_of_the_image_folder(tmp_path):
    wnids = ["n01443537", "n01484850", "n01494475"]
    listing = []
    for k, wnid in enumerate(wnids):
        names = [f"{style}_{i}.jpg" for style in ("art", "cartoon") for i in range(5)]
        write_jpegs(tmp_path / "imagenet-r" / wnid, names, 80 * k)
        listing += [f"{wnid}/{n}" for n in names]
    split_file = tmp_path / "split.txt.gz"
    paper.write_split_file(paper.imagenet_r_split(listing), split_file)
    data = paper.load_imagenet_r(tmp_path, HIDE, split_file=split_file)
    assert len(data.train) == 24 and len(data.test) == 6 and data.num_classes == 3
    assert sorted(set(data.train_labels.tolist())) == [0, 1, 2]
    image, label = data.train[len(data.train) - 1]
    assert label == 2 and image.shape == (3, 224, 224)
    # the shipped list names the release's 30,000 files: a folder without them fails in one line
    with pytest.raises(ValueError, match=r"^imagenet_r: 29979 of the 30000 images in the split list .* e\.g\. "):
        load_dataset("imagenet_r", tmp_path, HIDE)


def write_coda_split(folder, entries):
    """CODA-Prompt's imagenet-r_{train,test}.yaml: ``data`` paths and ``targets`` class indices."""
    for part in ("train", "test"):
        rows = [(name, target) for name, p, target in entries if p == part]
        text = "data:\n" + "".join(f"- data/imagenet-r/{name}\n" for name, _ in rows)
        text += "targets:\n" + "".join(f"- {target}\n" for _, target in rows)
        (folder / f"imagenet-r_{part}.yaml").write_text(text)
    return folder / "imagenet-r_train.yaml"


def test_imagenet_r_reads_coda_prompts_split_with_its_class_indices(tmp_path, capsys):
    """SMoPE/CODA/OVOR/VQ-Prompt's split and class numbering (not the sorted wnids): their seeded
    class order permutes those indices, so a seed gives their tasks only with their numbering."""
    wnids = {"n01443537": 2, "n01484850": 0, "n01494475": 1}  # CODA's index of each class
    entries = []
    for k, wnid in enumerate(wnids):
        names = [f"art_{i}.jpg" for i in range(5)]
        write_jpegs(tmp_path / "imagenet-r" / wnid, names, 80 * k)
        entries += [(f"{wnid}/{n}", "test" if i == 0 else "train", wnids[wnid]) for i, n in enumerate(names)]
    train_yaml = write_coda_split(tmp_path, entries)
    data = paper.load_imagenet_r(tmp_path, CODA, split_file=train_yaml)
    assert (len(data.train), len(data.test), data.num_classes) == (12, 3, 3)
    assert data.test_labels.tolist() == [2, 0, 1]  # by file name: n01443537, n01484850, n01494475
    assert data.train[0][1] == 2 and data.train[0][0].shape == (3, 224, 224)

    # a run needs all 200 classes in both parts (one image each here, in their own folder)
    full = tmp_path / "full"
    full_entries = [(f"n{c:08d}/{part}.jpg", part, (c * 7) % 200) for c in range(200) for part in ("train", "test")]
    for c in range(200):
        write_jpegs(full / "imagenet-r" / f"n{c:08d}", ["train.jpg", "test.jpg"], c)
    full_yaml = write_coda_split(full, full_entries)
    run = resolve_run(RunSpec(method="simplecil", dataset="imagenet_r", data_dir=full, split_file=full_yaml))
    recorded = run.to_dict()["run"]
    assert recorded["split_file_sha256"] == paper.split_sha256(full_yaml)
    (full / "imagenet-r_test.yaml").write_text((full / "imagenet-r_test.yaml").read_text() + "- x\n")
    assert paper.split_sha256(full_yaml) != recorded["split_file_sha256"]  # the test half counts too

    # bad split files fail before any work, in one line, nothing written
    with pytest.raises(ValueError, match="its train images cover 3 classes, not all 200"):
        resolve_run(RunSpec(method="simplecil", dataset="imagenet_r", data_dir=tmp_path, split_file=train_yaml))
    (tmp_path / "imagenet-r_test.yaml").unlink()
    (tmp_path / "bad").mkdir()  # one class listed under two indices
    two_indices = write_coda_split(tmp_path / "bad", [(n, p, i % 2) for i, (n, p, _) in enumerate(entries)])
    cases = [(train_yaml, "imagenet-r_test.yaml"), (tmp_path / "none.txt", "does not exist"),
             (two_indices, "has two indices"), (tmp_path / "bad" / "imagenet-r_test.yaml", "must be the *_train.yaml")]
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "broken").mkdir()
    for part in ("train", "test"):  # a YAML parser error spans several lines
        (tmp_path / "broken" / f"imagenet-r_{part}.yaml").write_text("data: [a, b\ntargets: {\n")
    cases += [(tmp_path / "binary.txt", "binary.txt' is not a valid split file"),
              (tmp_path / "broken" / "imagenet-r_train.yaml", "is not a valid CODA-Prompt split file")]
    for split_file, message in cases:
        out = tmp_path / "run"
        assert main(["run", "--method", "simplecil", "--dataset", "imagenet_r", "--data-dir", str(tmp_path),
                     "--split-file", str(split_file), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and not out.exists(), err
    with pytest.raises(ValueError, match="'cifar100' has a fixed train/test split; a split file applies to imagenet_r"):
        resolve_run(RunSpec(method="simplecil", dataset="cifar100", split_file=str(train_yaml)))


def test_offline_hub_weights_missing_from_the_cache_fail_before_the_data_is_read(cifar_root, tmp_path, capsys,
                                                                                   monkeypatch):
    """HF_HUB_OFFLINE (set for the tests) and an empty Hugging Face cache: `run` stops in one line
    before any work; a --checkpoint-file or --random-init run needs no hub weights."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    root, _ = cifar_root
    argv = ["run", "--method", "simplecil", "--dataset", "cifar100", "--data-dir", str(root), "--out"]
    assert main([*argv, str(tmp_path / "out"), "--backbone", "sup21k"]) == 2
    err = capsys.readouterr().err.strip()
    assert ("backbone 'sup21k': its weights (timm/vit_base_patch16_224.orig_in21k) are not in the local Hugging "
            "Face cache and HF_HUB_OFFLINE is set" in err and len(err.splitlines()) == 1), err
    assert main([*argv, str(tmp_path / "out"), "--backbone", "sup21k", "--num-workers", "2"]) == 2  # a local Ray
    assert "are not in the local Hugging Face cache" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    from promptcl.engine import check_local_resources

    check_local_resources(resolve_run(RunSpec(method="simplecil", dataset="cifar100", data_dir=root,
                                              backbone="sup21k", pretrained=False)))
    _cache_entry(tmp_path / "hub", "timm/vit_base_patch16_224.orig_in21k")
    check_local_resources(resolve_run(RunSpec(method="simplecil", dataset="cifar100", data_dir=root,
                                              backbone="sup21k")))
    # timm's old cache of a release URL (TIMM_USE_OLD_CACHE): timm loads from it, not from the hub
    import timm.models._builder

    dino = RunSpec(method="simplecil", dataset="cifar100", data_dir=root, backbone="dino1k")
    with pytest.raises(ValueError, match="timm/vit_base_patch16_224.dino"):
        check_local_resources(resolve_run(dino))
    monkeypatch.setattr(timm.models._builder, "_USE_OLD_CACHE", True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints" / "dino_vitbase16_pretrain.pth").write_bytes(b"")
    check_local_resources(resolve_run(dino))


def _cache_entry(hub: Path, repo: str) -> None:
    """An (empty) model.safetensors of ``repo`` in the Hugging Face cache's layout: found there."""
    cached = hub / f"models--{repo.replace('/', '--')}"
    (cached / "snapshots" / "abc").mkdir(parents=True)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("abc")
    (cached / "snapshots" / "abc" / "model.safetensors").write_bytes(b"")


class _HubFiles(http.server.BaseHTTPRequestHandler):
    """The Hugging Face hub's file protocol, as ``hf_hub_download`` speaks it, on this machine:
    ``/{repo}/resolve/{revision}/{file}``, HEAD for the commit, ETag and size, GET for the bytes."""

    commit = "0123456789abcdef0123456789abcdef01234567"

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        repo, _, path = self.path.lstrip("/").partition("/resolve/")
        self.server.requests.append(self.path)
        data = self.server.files.get((repo, path.rpartition("/")[2]))
        if data is None:
            known = any(r == repo for r, _ in self.server.files)
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if known else "RepoNotFound")
            self.send_header("X-Repo-Commit", self.commit)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", self.commit)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def local_hub():
    """A hub on a loopback port serving ``server.files[(repo, file)]``; yields the server."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubFiles)
    server.files, server.requests = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_online_hub_weights_are_fetched_before_any_work_and_a_missing_repository_fails_in_one_line(
        cifar_root, tmp_path, local_hub):
    """Online, against a hub on this machine: weights missing from the cache are fetched before any
    work, and timm then builds from the cache with the hub switched off; a repository the hub lacks
    stops `run` in one line before the data is read (exit 2, nothing written)."""
    import timm
    from safetensors.torch import save

    torch.manual_seed(0)
    served = timm.create_model("test_vit", num_classes=0).state_dict()
    local_hub.files[("timm/test_vit.r160_in1k", "model.safetensors")] = save(served)
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{local_hub.server_port}",
           "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_DISABLE_XET": "1"}
    fetch_then_build_offline = (
        "import huggingface_hub.constants as hub, torch\n"
        "from promptcl.core.backbone import build_backbone, cache_hub_weights\n"
        "cache_hub_weights('test_vit.r160_in1k')\n"
        "hub.HF_HUB_OFFLINE = True\n"
        "torch.save(build_backbone('test_vit.r160_in1k', pretrained=True).state_dict(), 'built.pt')\n")
    subprocess.run([sys.executable, "-c", fetch_then_build_offline], env=env, cwd=tmp_path, check=True)
    built = torch.load(tmp_path / "built.pt")
    assert served.keys() <= built.keys() and all(torch.equal(built[k], v) for k, v in served.items())
    assert local_hub.requests[-1] == "/timm/test_vit.r160_in1k/resolve/main/model.safetensors"

    root, _ = cifar_root
    out = tmp_path / "out"
    absent = "vit_tiny_patch16_224.augreg_in21k"
    failed = subprocess.run([sys.executable, "-m", "promptcl.cli", "run", "--method", "simplecil", "--dataset",
                             "cifar100", "--data-dir", str(root), "--backbone", absent, "--out", str(out)],
                            env=env, capture_output=True, text=True)
    err = failed.stderr.strip()
    assert failed.returncode == 2 and len(err.splitlines()) == 1, err
    assert (f"backbone '{absent}': its weights (timm/{absent}) could not be fetched from the Hugging Face hub "
            f"(http://127.0.0.1:{local_hub.server_port})" in err), err
    assert not out.exists() and local_hub.requests[-1].startswith(f"/timm/{absent}/")


def test_a_run_fetches_its_backbone_weights_before_it_reads_the_data(monkeypatch):
    """A Train worker (or any run) fetches hub weights first: an unreachable hub fails before the data."""
    from promptcl import engine

    order = []
    monkeypatch.setattr(engine, "cache_hub_weights", lambda name: order.append(("weights", name)))
    monkeypatch.setattr(engine, "load_dataset", lambda *a, **k: order.append(("data", a[0])) or 1 / 0)
    run = resolve_run(RunSpec(method="simplecil", dataset="digits", backbone="vit_digits"))
    with pytest.raises(ZeroDivisionError):
        engine._set_up(run)
    assert order == [("weights", "vit_digits"), ("data", "digits")]


def test_shipped_imagenet_r_split_is_the_reference_generator_output():
    """80/20, every class in both parts, and exactly what the seeded generator makes of its listing."""
    shipped = paper.read_split_file(paper.shipped_imagenet_r_split())
    assert len(shipped) == 30000 and sum(p == "train" for p in shipped.values()) == 24000
    assert len({n.split("/")[0] for n, p in shipped.items() if p == "test"}) == 200
    assert paper.imagenet_r_split(list(shipped)) == shipped
    assert paper.imagenet_r_split(list(shipped), seed=0) != shipped
    with gzip.open(paper.shipped_imagenet_r_split(), "rt") as f:
        assert f.readline().strip() in ("train n01443537/art_0.jpg", "test n01443537/art_0.jpg")


def test_imagenet_r_split_does_not_depend_on_the_listing_order():
    """The split follows ImageFolder's sorted order, however the files were listed (os.walk order)."""
    listing = [f"n0{c}/{style}_{i}.jpg" for c in range(3) for style in ("art", "toy") for i in range(5)]
    split = paper.imagenet_r_split(listing)
    assert paper.imagenet_r_split(listing[::-1]) == split
    assert paper.imagenet_r_split(random.Random(1).sample(listing, len(listing))) == split
    assert sum(p == "train" for p in split.values()) == 24  # 80 % of 30


# --- data roots and bad files -----------------------------------------------------------------
@pytest.mark.parametrize("name", DISK_BENCHMARKS)
def test_every_disk_benchmark_rejects_a_missing_or_empty_root_in_one_line(name, tmp_path, monkeypatch):
    cases = [(None, "needs --data-dir"), (tmp_path / "nope", "does not exist"), (tmp_path, "files not found under")]
    for root, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            resolve_run(RunSpec(method="simplecil", dataset=name, data_dir=root))
        assert "\n" not in str(err.value)
    monkeypatch.setenv("PROMPTCL_DATA", str(tmp_path / "gone"))  # the env root is named as the origin
    with pytest.raises(ValueError, match=r"from \$PROMPTCL_DATA"):
        resolve_run(RunSpec(method="simplecil", dataset=name))


def test_corrupt_files_are_named_before_any_work(cifar_root, five_root, tmp_path, capsys):
    root, _ = cifar_root
    bad = tmp_path / "cifar"
    (bad / "cifar-100-python").mkdir(parents=True)
    for f in ("train", "test", "meta"):
        (bad / "cifar-100-python" / f).write_bytes((root / "cifar-100-python" / f).read_bytes())
    (bad / "cifar-100-python" / "train").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="cifar-100-python/train' is not a valid CIFAR batch file"):
        resolve_run(RunSpec(method="simplecil", dataset="cifar100", data_dir=bad))
    # a test file of no images: named, not numpy's message
    (bad / "cifar-100-python" / "train").write_bytes((root / "cifar-100-python" / "train").read_bytes())
    test = pickle.loads((root / "cifar-100-python" / "test").read_bytes())
    empty = {**test, "data": test["data"][:0], "fine_labels": []}
    (bad / "cifar-100-python" / "test").write_bytes(pickle.dumps(empty, protocol=2))
    with pytest.raises(ValueError, match=r"cifar-100-python' is not a valid CIFAR-100 folder \(its test file holds no "
                                         r"images\)"):
        resolve_run(RunSpec(method="simplecil", dataset="cifar100", data_dir=bad))
    # test images of the first 10 classes only: the run finds it as it sets up, and says so in one line
    kept = [i for i, label in enumerate(test["fine_labels"]) if label < 10]
    part = {**test, "data": test["data"][kept], "fine_labels": [test["fine_labels"][i] for i in kept]}
    (bad / "cifar-100-python" / "test").write_bytes(pickle.dumps(part, protocol=2))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", "--method", "simplecil", "--dataset", "cifar100", "--data-dir", str(bad), "--backbone",
                 "vit_tiny_patch16_224", "--random-init", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "has no test images: the data hold only some of cifar100's classes" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    idx = tmp_path / "idx"
    write_idx(idx, np.zeros((3, 4), np.uint8))
    idx.write_bytes(idx.read_bytes()[:-2])  # truncated
    with pytest.raises(ValueError, match="is not a valid idx file"):
        paper.read_idx(idx)


def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    for extra, message in (([], "dataset 'cub200' needs --data-dir"),
                           (["--data-dir", str(tmp_path)], f"cub200 files not found under '{tmp_path}'")):
        proc = subprocess.run([sys.executable, "-m", "promptcl.cli", "run", "--method", "hide", "--dataset",
                               "cub200", "--out", str(out), *extra], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
        assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_a_bad_or_missing_release_checkpoint_in_one_line(cifar_root, tmp_path):
    root, _ = cifar_root
    corrupt = tmp_path / "checkpoint.pth"
    corrupt.write_bytes(b"not a checkpoint")
    dino = tmp_path / "dino.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 768)}, dino)
    cases = [(["--checkpoint-file", str(corrupt)], "corrupt or unreadable"),
             (["--checkpoint-file", str(dino)], "is not an iBOT release checkpoint"),
             ([], "has no timm hub weights: pass its release file checkpoint.pth")]
    for extra, message in cases:
        proc = subprocess.run([sys.executable, "-m", "promptcl.cli", "run", "--method", "norga", "--dataset",
                               "cifar100", "--data-dir", str(root), "--backbone", "ibot21k", *extra,
                               "--out", str(tmp_path / "run")], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


# --- protocols --------------------------------------------------------------------------------
def test_reference_protocol_follows_each_method_code_base(cifar_root):
    root, _ = cifar_root
    resolved = {m: resolve_run(RunSpec(method=m, dataset="cifar100", data_dir=root)).preprocessing.name
                for m in ("hide", "norga", "l2p", "smope", "coda", "ovor", "vqprompt", "simplecil")}
    assert resolved == {"hide": "reference-hide", "norga": "reference-hide", "l2p": "reference-hide",
                        "smope": "reference-coda", "coda": "reference-coda", "ovor": "reference-ovor",
                        "vqprompt": "reference-coda", "simplecil": "common"}
    # each code base's own Sup-1K: CODA-Prompt's and OVOR's timm 0.4.12 loads AugReg, SMoPE/VQ-Prompt AugReg2
    backbones = {m: resolve_run(RunSpec(method=m, dataset="cifar100", data_dir=root)).backbone
                 for m in ("smope", "coda", "ovor", "vqprompt")}
    assert backbones == {"smope": "sup1k", "coda": "sup1k_augreg", "ovor": "sup1k_augreg", "vqprompt": "sup1k"}
    fair = resolve_run(RunSpec(method="smope", dataset="cifar100", data_dir=root, protocol="common",
                               backbone="vit_base_patch16_224.dino"))
    assert fair.preprocessing == common((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # the backbone's own
    assert fair.to_dict()["run"]["protocol"] == "common"
    assert fair.to_dict()["preprocessing"]["other"]["mean"] == (0.485, 0.456, 0.406)
    with pytest.raises(ValueError, match="unknown protocol"):
        resolve_run(RunSpec(method="smope", dataset="cifar100", data_dir=root, protocol="nope"))
    with pytest.raises(ValueError, match="takes 1 x 28 x 28 inputs; cifar100 images are 3 x 224 x 224"):
        resolve_run(RunSpec(method="l2p", dataset="cifar100", data_dir=root, backbone="vit_glyphs28"))
    with pytest.raises(ValueError, match="offline tensor benchmark: it has no --protocol"):
        resolve_run(RunSpec(method="smope", dataset="digits", protocol="common"))
    assert resolve_run(RunSpec(method="smope", dataset="digits")).to_dict()["run"]["protocol"] == "native"


def test_hide_reference_pipeline_matches_the_reference_transforms():
    """HiDe's CIFAR training pipeline: RandomResizedCrop (bicubic), flip, brightness 63/255, CIFAR
    mean/std; other sources: crop scale from 0.05 and raw pixels; CODA drops the last batch."""
    from torchvision import transforms as T

    steps = HIDE.cifar.transforms(augment=True).transforms
    assert [type(s) for s in steps] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ColorJitter, T.ToTensor,
                                        T.Normalize]
    assert steps[0].interpolation == T.InterpolationMode.BICUBIC and steps[2].brightness == (1 - 63 / 255, 1 + 63 / 255)
    other = HIDE.other.transforms(augment=True).transforms
    assert other[0].scale == (0.05, 1.0) and not any(isinstance(s, T.Normalize) for s in other)
    test = HIDE.other.transforms(augment=False).transforms
    assert [type(s) for s in test] == [T.Resize, T.CenterCrop, T.ToTensor] and test[0].size == 256
    assert [type(s) for s in CODA.cifar.transforms(augment=False).transforms] == [T.Resize, T.ToTensor]
    assert CODA.drop_last and not HIDE.drop_last
    # OVOR's code rewrote CODA's loaders: the same transforms, the last partial batch kept
    assert (OVOR.cifar, OVOR.other, OVOR.drop_last) == (CODA.cifar, CODA.other, False)


# --- loaders: workers, seeding, augmentation kept out of statistics ----------------------------
def test_seeded_workers_give_the_same_augmented_batches_and_statistics_see_none(cifar_root):
    root, _ = cifar_root
    # HiDe's CIFAR pipeline: its brightness jitter shows on the fixture's solid-colour images (CODA's
    # crop and flip alone leave them bit-identical, so no check below could see an augmentation)
    data = load_dataset("cifar100", root, HIDE)

    def scenario(workers):
        return ClassIncremental(data, increments=10, seed=0, num_workers=workers, drop_last=True)

    first = [x for x, _ in scenario(2).train_loader(0, batch_size=8, seed=3)]
    again = [x for x, _ in scenario(2).train_loader(0, batch_size=8, seed=3)]
    other = [x for x, _ in scenario(2).train_loader(0, batch_size=8, seed=4)]
    assert len(first) == 20 // 8  # drop_last: the partial batch of 4 is left out
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    statistics = [x for x, _ in scenario(0).train_loader(0, batch_size=8, seed=3, shuffle=False)]
    assert sum(len(x) for x in statistics) == 20  # every image, no drop_last
    first_task = np.flatnonzero(np.isin(data.train_labels, scenario(0).class_order[:10]))
    plain = torch.stack([data.train[i][0] for i in first_task])
    torch.testing.assert_close(torch.cat(statistics), plain)  # the test-time pipeline, no augmentation
    # an augmented statistics-order loader (HiDe's stage A) draws new augmentations on every pass
    augmented = scenario(2).train_loader(0, batch_size=8, seed=3, shuffle=False, augmented=True)
    passes = [torch.cat([x for x, _ in augmented]) for _ in range(2)]
    assert passes[0].shape == plain.shape and not torch.equal(passes[0], passes[1])
    assert not torch.equal(passes[0], plain)  # (so the statistics check above could see an augmentation)


def test_augmentations_do_not_depend_on_the_rank_or_loader_worker_that_reads_an_image(cifar_root, monkeypatch):
    """Two ranks together see exactly the augmented batches of one process (0 or 2 loader workers),
    each image with its own crop, flip and jitter: the rank that reads it changes nothing."""
    import promptcl.data.benchmarks as benchmarks

    root, _ = cifar_root
    data = load_dataset("cifar100", root, HIDE)

    def epochs(workers, rank=0, world_size=1):
        monkeypatch.setattr(benchmarks, "world", lambda: (rank, world_size))
        loader = ClassIncremental(data, increments=10, seed=0, num_workers=workers).train_loader(0, batch_size=8, seed=3)
        return [[x for x, _ in loader] for _ in range(2)]

    single = epochs(0)
    for a, b in zip(single, epochs(2)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    ranks = [epochs(0, rank, 2) for rank in range(2)]
    for epoch, batches in enumerate(single):
        for step, batch in enumerate(batches):
            merged = torch.empty_like(batch)
            merged[0::2], merged[1::2] = ranks[0][epoch][step], ranks[1][epoch][step]
            torch.testing.assert_close(merged, batch, rtol=0, atol=0)
    # and every image its own draw: two copies of one image differ (a solid colour, not black, shows the jitter)
    k = int(np.argmax(data.train_labels))
    twice = torch.utils.data.ConcatDataset([data.train_augmented, data.train_augmented])
    seeds = benchmarks.AugmentationSeeds(torch.utils.data.SequentialSampler(range(2)), 0)
    first, second = (benchmarks._Relabelled(twice, np.array([k, len(data.train_augmented) + k]),
                                            np.arange(100))[pair][0] for pair in seeds)
    assert not torch.equal(first, second)
    # and reading one leaves the process's random streams as they were, a GPU's included
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: pytest.fail("an image read reseeded CUDA"))
    before = torch.get_rng_state()
    benchmarks._Relabelled(data.train_augmented, np.array([k]), np.arange(100))[0, 5]
    assert torch.equal(torch.get_rng_state(), before)


def test_a_run_on_a_disk_benchmark_records_its_protocol(cifar_root, tmp_path):
    """End to end through the CLI on the small CIFAR-100 files: a tiny random-init 224-px ViT,
    two loader workers; summary.json holds the resolved protocol and pipeline."""
    root, _ = cifar_root
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "promptcl.cli", "run", "--method", "simplecil", "--dataset",
                           "cifar100", "--increment", "50", "--data-dir", str(root), "--backbone",
                           "vit_tiny_patch16_224", "--random-init", "--loader-workers", "2", "--protocol",
                           "reference-hide", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["run"]["protocol"] == "reference-hide"
    assert summary["config"]["preprocessing"]["cifar"]["brightness"] == pytest.approx(63 / 255)
    assert summary["config"]["run"]["loader_workers"] == 2 and len(summary["accuracy_matrix"]) == 2


def test_every_disk_benchmark_is_registered_with_a_check():
    for name in DISK_BENCHMARKS:
        spec = DATASETS[name]
        assert spec.needs_data_dir and spec.check is not None and spec.has_pipeline


def test_a_study_passes_the_disk_benchmark_options_to_every_trial(cifar_root, tmp_path, monkeypatch):
    """`studies/*.py --dataset cifar100 --data-dir ... --protocol ... --backbone ...` reaches each
    trial's RunSpec, and a bad root fails the study before Ray starts."""
    import huggingface_hub

    from promptcl.study.tuner import spec_from_args, study_parser, validate_study

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _cache_entry(tmp_path / "hub", "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k")  # the trials' weights

    root, _ = cifar_root
    parser = study_parser("test", name="t", num_samples=2)
    args = parser.parse_args(["--dataset", "cifar100", "--data-dir", str(root), "--protocol", "common",
                              "--backbone", "vit_tiny_patch16_224", "--compile-backbone", "--class-order", "natural",
                              "--runs-dir", str(tmp_path)])
    spec = spec_from_args(args, method="smope", search_space=lambda trial: None, smoke_overrides={})
    run = validate_study(spec)
    assert (run.data_dir, run.protocol, run.backbone, run.compile_backbone, run.class_order) == (
        str(root.resolve()), "common", "vit_tiny_patch16_224", True, "natural")
    relative = parser.parse_args(["--dataset", "cifar100", "--runs-dir", str(tmp_path)])
    os.environ["PROMPTCL_DATA"] = os.path.relpath(root)  # trials run elsewhere: the driver pins an absolute root
    try:
        spec = spec_from_args(relative, method="smope", search_space=lambda trial: None, smoke_overrides={})
    finally:
        del os.environ["PROMPTCL_DATA"]
    assert spec.run_options == {"data_dir": str(root.resolve()), "validation_fraction": 0.1}
    bad = spec_from_args(parser.parse_args(["--dataset", "cifar100", "--data-dir", str(tmp_path / "none"),
                                            "--runs-dir", str(tmp_path)]),
                         method="smope", search_space=lambda trial: None, smoke_overrides={})
    with pytest.raises(ValueError, match="does not exist"):
        validate_study(bad)
    # a split file reaches the trials as an absolute path; on a dataset with a fixed split it fails the study
    split = tmp_path / "split.txt"
    split.write_text("train n01443537/art_0.jpg\n")
    with_split = spec_from_args(parser.parse_args(["--dataset", "cifar100", "--data-dir", str(root), "--split-file",
                                                   os.path.relpath(split), "--runs-dir", str(tmp_path)]),
                                method="smope", search_space=lambda trial: None, smoke_overrides={})
    assert with_split.run_options["split_file"] == str(split.resolve())
    with pytest.raises(ValueError, match="has a fixed train/test split"):
        validate_study(with_split)
    # offline, a local study's trials would find no weights: refused before Ray starts
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ValueError, match="its weights .* are not in the local Hugging Face cache"):
        validate_study(spec_from_args(args, method="smope", search_space=lambda trial: None, smoke_overrides={}))


def test_probe_reads_a_disk_benchmark(tmp_path):
    """`promptcl probe` on a disk benchmark: the test-time pipeline, normalised as the backbone was
    trained (5 classes of CIFAR-100's format keep the probe's fits small)."""
    import timm
    from safetensors.torch import save_file

    from promptcl.probe import probe

    root = tmp_path / "data"
    write_cifar(root, "cifar-100-python", {"train": 4, "test": 2}, "fine_labels", 5)
    weights = tmp_path / "vit_tiny.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict(), str(weights))
    result = probe("cifar100", backbone="vit_tiny_patch16_224", checkpoint_file=weights, data_dir=root)
    assert (result.train_images, result.test_images) == (20, 10)
    with pytest.raises(ValueError, match="is read from disk: give its preprocessing protocol"):
        load_dataset("cifar100", root)

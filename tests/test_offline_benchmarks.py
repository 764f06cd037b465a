"""The offline benchmarks on real images and the glyph-pretrained backbone they are measured on."""

import json
import shutil

import numpy as np
import pytest
import torch

from promptcl.cli import main
from promptcl.core import pretrain
from promptcl.core.backbone import build_backbone
from promptcl.data import glyphs
from promptcl.data.benchmarks import letters, load_dataset, scenario_class_order
from promptcl.engine import RunSpec, resolve_run, run_sequence
from promptcl.methods import method_names
from promptcl.probe import PRETRAINED_MARGIN, linear_probe, probe

OFFLINE_BENCHMARKS = ("mnist5k", "multidomain_lite")


def fonts_installed() -> bool:
    try:
        glyphs.pretraining_fonts()
        return True
    except ValueError:
        return False


needs_fonts = pytest.mark.skipif(not fonts_installed(), reason="the glyph-pretraining font packages are not "
                                 "installed (.ci/run installs them: apt-get install fonts-dejavu-core ...)")


@pytest.mark.parametrize("dataset", OFFLINE_BENCHMARKS)
def test_shipped_backbone_beats_raw_pixels_on_every_offline_benchmark(dataset):
    result = probe(dataset)
    assert result.backbone == "vit_glyphs28"
    assert result.margin >= PRETRAINED_MARGIN, result


def test_probe_cli_json(capsys):
    assert main(["probe", "--dataset", "digits", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"backbone_accuracy", "pixel_accuracy", "backbone", "dataset"} <= set(out)
    assert out["backbone"] == "vit_digits" and out["dataset"] == "digits"
    # the 8x8 fixture's micro ViT does not beat pixels: the reason the offline benchmarks exist
    assert out["pretrained"] is False


@pytest.mark.parametrize("argv, message", [
    (["probe", "--dataset", "nope"], "unknown dataset"),
    (["probe", "--dataset", "mnist5k", "--backbone", "vit_nope"], "unknown backbone"),
    (["pretrain", "vit_nope"], "unknown local backbone"),
    (["pretrain", "vit_glyphs28", "--steps", "0"], "--steps"),
])
def test_bad_probe_and_pretrain_arguments_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_linear_probe_selects_c_on_training_data_only():
    rng = np.random.RandomState(0)
    x = rng.randn(200, 5)
    y = (x[:, 0] > 0).astype(int)
    accuracy, c = linear_probe(x[:150], y[:150], x[150:], y[150:])
    assert accuracy > 90 and c in (0.01, 0.1, 1.0)
    # Scrambled test labels change the score but not the choice of C.
    _, same_c = linear_probe(x[:150], y[:150], x[150:], 1 - y[150:])
    assert same_c == c


def test_linear_probe_does_not_depend_on_the_blas_thread_count():
    """MNIST-5k's pixels are a case where L-BFGS's path moved with the summation order: two BLAS
    threads scored 90.60 where one scored 90.70 before the probe pinned one."""
    from threadpoolctl import threadpool_limits

    data = load_dataset("mnist5k")

    def arrays(split):
        return (torch.stack([x for x, _ in split]).flatten(1).numpy(), np.asarray([int(y) for _, y in split]))

    (train_x, train_y), (test_x, test_y) = arrays(data.train), arrays(data.test)
    results = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads):
            results.append(linear_probe(train_x, train_y, test_x, test_y))
    assert results[0] == results[1] and results[0][0] > 85


def test_pretraining_data_shares_no_class_with_the_benchmarks():
    classes = glyphs.PRETRAINING_GLYPHS
    assert not set(classes) & set("0123456789")
    assert not set(classes) & set(glyphs.LETTERS + glyphs.LETTERS.lower())
    # nothing that passes for a digit
    assert not set(classes) & set("OoIlSsZzbqgΘθОоЗзЧчБб∞○|")
    assert len(set(classes)) == len(classes)


def test_shipped_manifest_describes_how_the_weights_were_made():
    manifest = json.loads(pretrain.shipped_checkpoint("vit_glyphs28").with_suffix(".json").read_text())
    assert manifest["sha256"] == pretrain.file_sha256(pretrain.shipped_checkpoint("vit_glyphs28"))
    # the recipe the project declares for it, every field (a changed default would not match)
    assert manifest["recipe"] == pretrain.LOCAL_BACKBONES["vit_glyphs28"].recipe.__dict__
    assert manifest["data"]["num_classes"] == len(manifest["data"]["classes"]) >= 100
    assert manifest["images_seen"] == manifest["recipe"]["steps"] * manifest["recipe"]["batch_size"]
    assert manifest["architecture"] == pretrain.LOCAL_BACKBONES["vit_glyphs28"].architecture


@needs_fonts
def test_glyph_bank_is_the_one_the_shipped_weights_were_made_from():
    images, labels, data = pretrain.LOCAL_BACKBONES["vit_glyphs28"].bank()
    shipped = json.loads(pretrain.shipped_checkpoint("vit_glyphs28").with_suffix(".json").read_text())["data"]
    assert data == shipped
    assert images.shape[1:] == (1, 28, 28) and 0 <= float(images.min()) and float(images.max()) <= 1


@needs_fonts
def test_pretrain_cli_is_deterministic_and_loads_through_checkpoint_file(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["pretrain", "vit_glyphs28", "--steps", "2", "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    out = capsys.readouterr().out
    assert out.count("sha256") == 2 and "shipped" not in out  # a shortened run is not compared
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["sha256"] == b["sha256"] and a["recipe"]["steps"] == 2 and a["images_seen"] == 512
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    vit = build_backbone("vit_glyphs28", checkpoint_file=tmp_path / "a.safetensors")
    shipped = build_backbone("vit_glyphs28", pretrained=True)
    assert not torch.equal(vit.pos_embed, shipped.pos_embed)  # the file's weights, not the shipped ones
    assert main(["pretrain", "vit_glyphs28", "--steps", "2", "--out", str(tmp_path / "a.safetensors")]) == 2


def test_missing_font_packages_exit_2_naming_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(glyphs, "FONT_ROOT", tmp_path)
    assert main(["pretrain", "vit_glyphs28", "--steps", "1", "--out", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "apt-get install fonts-dejavu-core" in err and not (tmp_path / "w.safetensors").exists()


def test_corrupt_shipped_weights_are_refused_before_any_work(monkeypatch, tmp_path, capsys):
    shutil.copytree(pretrain.SHIPPED_DIR, tmp_path / "weights")
    monkeypatch.setattr(pretrain, "SHIPPED_DIR", tmp_path / "weights")
    weights = tmp_path / "weights" / "vit_glyphs28.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match the sha256"):
        resolve_run(RunSpec(method="smope", dataset="mnist5k"))
    assert main(["run", "--method", "smope", "--dataset", "mnist5k", "--out", str(tmp_path / "run")]) == 2
    assert "do not match" in capsys.readouterr().err and not (tmp_path / "run").exists()
    weights.unlink()
    with pytest.raises(ValueError, match="promptcl pretrain vit_glyphs28"):
        resolve_run(RunSpec(method="smope", dataset="mnist5k"))


@pytest.mark.parametrize("dataset", OFFLINE_BENCHMARKS)
def test_every_method_resolves_on_every_offline_benchmark(dataset):
    for method in method_names():
        run = resolve_run(RunSpec(method=method, dataset=dataset))
        assert run.backbone == "vit_glyphs28" and run.num_tasks == {"mnist5k": 5, "multidomain_lite": 3}[dataset]


def test_mnist5k_split():
    data = load_dataset("mnist5k")
    assert (len(data.train), len(data.test), data.image_shape) == (4000, 1000, (1, 28, 28))
    assert sorted(np.unique(data.train_labels)) == list(range(10))
    assert all(60 <= (data.test_labels == c).sum() <= 140 for c in range(10))
    x = data.train.tensors[0]
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    # no test image is a training image
    train_rows = {row.tobytes() for row in x.flatten(1).numpy()}
    assert not any(row.tobytes() in train_rows for row in data.test.tensors[0].flatten(1).numpy())


def test_multidomain_lite_keeps_each_source_whole_and_is_deterministic():
    data = load_dataset("multidomain_lite")
    assert data.num_classes == 30 and data.image_shape == (1, 28, 28)
    assert len(data.train) == 4000 + 1438 + 4000 and len(data.test) == 1000 + 359 + 1000
    for seed in range(4):
        order = scenario_class_order("multidomain_lite", seed)
        assert sorted(order) == list(range(30))
        assert all(order[10 * t:10 * t + 10] == list(range(order[10 * t], order[10 * t] + 10)) for t in range(3))
    assert len({tuple(scenario_class_order("multidomain_lite", s)) for s in range(6)}) > 1
    again = load_dataset("multidomain_lite")
    assert torch.equal(again.test.tensors[0], data.test.tensors[0])
    with pytest.raises(ValueError, match="increment must be 10"):
        resolve_run(RunSpec(method="smope", dataset="multidomain_lite", increment=5))


def test_letters_test_fonts_are_never_trained_on():
    ink, labels, train_idx, test_idx, fonts = letters(per_class=(30, 10))
    assert (len(train_idx), len(test_idx)) == (300, 100) and sorted(set(labels.tolist())) == list(range(10))
    assert not set(fonts[train_idx]) & set(fonts[test_idx])
    assert len(set(fonts[test_idx])) == 5 and len(set(fonts[train_idx])) == 16
    assert ink.shape[1:] == (1, 28, 28) and ink.min() >= 0 and ink.max() <= 1


@pytest.mark.slow
def test_finetune_forgets_and_joint_learns_on_mnist5k(tmp_path):
    short = {"epochs": 1}
    finetune = run_sequence(resolve_run(RunSpec(method="finetune", dataset="mnist5k", overrides=short)),
                            tmp_path / "f")
    joint = run_sequence(resolve_run(RunSpec(method="joint", dataset="mnist5k", overrides=short)), tmp_path / "j")
    assert finetune["forgetting"] >= 30
    assert joint["final_average_accuracy"] >= 85 > finetune["final_average_accuracy"] + 30


def test_a_shortened_pretraining_never_lands_where_runs_load_weights(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PROMPTCL_CACHE", str(tmp_path))
    assert main(["pretrain", "vit_digits", "--steps", "2"]) == 0
    assert not pretrain.cached_checkpoint("vit_digits").exists()
    assert "remade_steps2" in capsys.readouterr().out

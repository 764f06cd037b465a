"""`promptcl reproduce`: the packaged manifest of published numbers, its commands, and a real (tiny) row run."""

import json
import os
import shlex
from pathlib import Path

import pytest

from promptcl.cli import _parser, main
from promptcl.methods import get_method
from promptcl.study import reproduce

ROWS = reproduce.load_manifest()
ROW_IDS = [row["id"] for row in ROWS]


def _cli(capsys, *argv):
    code = main(["reproduce", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_prints_every_row_as_not_run_without_results(capsys, tmp_path):
    code, out, _ = _cli(capsys, "--list", "--results", str(tmp_path / "none.json"))
    assert code == 0
    lines = out.splitlines()
    for row_id in ROW_IDS:
        (line,) = [line for line in lines if line.split()[0] == row_id]
        assert line.endswith("not run")
    assert lines[-1].startswith(f"{len(ROWS)} rows: 0 reproduced, 0 gap, {len(ROWS)} not run")


def test_list_json_has_the_required_fields(capsys, tmp_path):
    code, out, _ = _cli(capsys, "--list", "--json", "--results", str(tmp_path / "none.json"))
    assert code == 0
    entries = json.loads(out)
    assert [e["id"] for e in entries] == ROW_IDS
    for e in entries:
        assert {"id", "method", "benchmark", "metric", "published", "command", "commands", "status"} <= set(e)
        assert e["command"] == e["commands"][0] and len(e["commands"]) == len(e["seeds"])
        assert "{seed}" not in e["command"] and e["status"] == "not run"


NORGA_METHODS = ["l2p", "dualprompt", "sprompt++", "coda", "hide", "norga"]
# the presets of NoRGa's code base's configs of its L2P and DualPrompt baselines (MoE_PromptCL configs/)
NORGA_BASELINE_PRESETS = {
    **{(m, "cifar100"): "norga-cifar100" for m in ("l2p", "dualprompt")},
    **{(m, "imagenet_r"): "norga-imagenet-r" for m in ("l2p", "dualprompt")},
    **{(m, "cub200"): "cub200" for m in ("l2p", "dualprompt")},
    ("l2p", "five_datasets"): "norga-5datasets", ("dualprompt", "five_datasets"): "5datasets"}


@pytest.mark.parametrize("benchmark", ["cifar100", "imagenet_r"])
@pytest.mark.parametrize("backbone", ["sup21k", "ibot21k", "ibot1k", "dino1k", "mocov3_1k"])
def test_norga_table_1_is_in_the_manifest(benchmark, backbone):
    """Every method x backbone x metric of NoRGa's Table 1 on Split CIFAR-100 and ImageNet-R."""
    for method in NORGA_METHODS:
        for metric in ("FA", "CA", "FM"):
            row = reproduce.find_row(ROWS, f"{method}-{benchmark}-{backbone}-{metric.lower()}")
            assert (row["method"], row["benchmark"], row["backbone"], row["metric"]) == (
                method, benchmark, backbone, metric)
            assert row["seeds"] == [42, 40, 44] and row["tasks"] == 10 and row["published_std"] is not None


@pytest.mark.parametrize("benchmark, tasks", [("cub200", 10), ("five_datasets", 5)])
@pytest.mark.parametrize("backbone", ["sup21k", "ibot21k"])
def test_norga_table_2_is_in_the_manifest_but_coda(benchmark, tasks, backbone):
    """CODA-Prompt's code has no CUB-200 or 5-Datasets config, so its numbers have no command."""
    for method in NORGA_METHODS:
        rows = [r for r in ROWS if r["id"] == f"{method}-{benchmark}-{backbone}-fa"]
        assert len(rows) == (method != "coda")
        # NoRGa's 5-Datasets scripts run seed 42 only (HiDe-Prompt's own, which made its rows, three)
        seeds = [42] if benchmark == "five_datasets" and method != "hide" else [42, 40, 44]
        assert all(r["tasks"] == tasks and r["seeds"] == seeds for r in rows)


def test_norga_activation_ablation_rows_change_only_the_gate():
    ablations = [r for r in ROWS if "activation ablation" in r["source"]]
    assert len(ablations) == 8
    for row in ablations:
        activation = row["id"].split("-")[-2]
        script_row = reproduce.find_row(ROWS, row["id"].replace(f"-{activation}-", "-"))
        assert row["command"].replace(f" --set gate_activation={activation}", "").replace(
            f"-{activation}/", "/") == script_row["command"]
        assert f"--set gate_activation={activation}" in row["command"]


def test_rows_of_one_run_share_its_command_and_output_directory():
    """FA, CA and FM of one run are read from one output directory, so `reproduce` runs it once."""
    commands = {}
    for row in ROWS:
        run = row["id"].removesuffix(f"-{row['metric'].lower()}")
        assert f"--out runs/reproduce/{run}/seed{{seed}}" in row["command"], row["id"]
        commands.setdefault(run, set()).add(row["command"])
    assert all(len(c) == 1 for c in commands.values())
    assert sum(len([r for r in ROWS if r["id"].startswith(run + "-")]) > 1 for run in commands) >= 60


@pytest.mark.parametrize("benchmark, published", [("cifar100", 89.23), ("imagenet_r", 79.32), ("cub200", 87.43)])
def test_smope_rows_are_in_the_manifest(benchmark, published):
    (row,) = [r for r in ROWS if r["method"] == "smope" and r["benchmark"] == benchmark]
    assert row["tasks"] == 10 and row["metric"] == "FA" and row["published"] == published
    assert row["seeds"] == [0, 1, 2, 3, 4]


def test_vqprompt_cub_row_runs_the_seeds_of_vqprompts_cub_script():
    (row,) = [r for r in ROWS if r["method"] == "vqprompt" and r["benchmark"] == "cub200"]
    assert row["seeds"] == [0, 12, 24, 36, 48]  # experiments/cub-200.sh: --seeds 0 12 24 36 48


def test_tolerance_follows_the_documented_rule():
    for row in ROWS:
        assert row["tolerance"] == pytest.approx(max(1.0, 2 * (row["published_std"] or 0.0))), row["id"]


@pytest.mark.parametrize("row_id", ROW_IDS)
def test_dry_run_prints_commands_that_promptcl_run_parses(capsys, monkeypatch, row_id):
    monkeypatch.delenv("PROMPTCL_DATA", raising=False)  # a dry run needs neither data nor checkpoints
    monkeypatch.delenv("PROMPTCL_CHECKPOINTS", raising=False)
    row = reproduce.find_row(ROWS, row_id)
    code, out, _ = _cli(capsys, row_id, "--dry-run")
    assert code == 0
    lines = out.splitlines()
    run = row_id.removesuffix(f"-{row['metric'].lower()}")
    assert lines[0] == f"mkdir -p runs/reproduce/{run}"
    commands = lines[1:]
    assert len(commands) == len(row["seeds"])
    for seed, command in zip(row["seeds"], commands):
        assert '--data-dir "$PROMPTCL_DATA"' in command  # left for the shell to expand
        args = _parser().parse_args(shlex.split(command)[1:])
        assert (args.command, args.method, args.dataset, args.backbone, args.preset, args.seed) == (
            "run", row["method"], row["benchmark"], row["backbone"], row["preset"], seed)
        # each table's numbers come from one code base's pipeline: NoRGa's (HiDe's) or SMoPE's (CODA's; OVOR's
        # own, which keeps the last partial batch, for OVOR) (on 5-Datasets with NoRGa's code's CIFAR
        # pipeline carried over to the sources after CIFAR-10)
        smope_table = row["source"].startswith("SMoPE")
        hide_protocol = "reference-hide-carryover" if row["benchmark"] == "five_datasets" else "reference-hide"
        coda_protocol = "reference-ovor" if row["method"] == "ovor" else "reference-coda"
        assert args.protocol == (coda_protocol if smope_table else hide_protocol)
        # SMoPE's code base fits its statistics on augmented images with np.var; its scheduler takes the
        # first step at the base rate and, held-then-cosine (not on CUB-200), spans iter_step x epochs updates
        vq_code_base = smope_table and row["method"] in ("smope", "vqprompt")
        assert ("compat_augmented_statistics=true" in args.overrides) == vq_code_base
        assert ("compat_first_step_at_base_lr=true" in args.overrides) == vq_code_base
        assert ("compat_population_variance=true" in args.overrides) == vq_code_base
        assert ("compat_schedule_iter_step=40" in args.overrides) == (vq_code_base and row["benchmark"] != "cub200")
        # the CODA lineage's baselines run only in code that pins timm 0.4.12 (AugReg in21k -> in1k)
        coda_lineage = smope_table and row["method"] in ("l2p", "dualprompt", "coda", "ovor")
        if coda_lineage and row["benchmark"] != "cub200":
            assert row["backbone"] == "sup1k_augreg"
        # NoRGa's code base ran its methods and baselines (not CODA) with the reference's quirks
        norga_code_base = row["source"].startswith("NoRGa") and row["method"] != "coda"
        prefix_gather = row["method"] in ("hide", "norga", "dualprompt", "sprompt++")
        assert ("compat_reference_gather=true" in args.overrides) == (norga_code_base and prefix_gather)
        assert ("compat_unmasked_test_logits=true" in args.overrides) == norga_code_base
        # both code bases' DualPrompts match every key of the pool at test time
        assert ("compat_match_all_keys=true" in args.overrides) == (row["method"] in ("dualprompt", "sprompt++"))
        # CODA's code base pulls every picked key toward every query (its Deep L2P++ rows)
        assert ("compat_batch_crossed_pull=true" in args.overrides) == (
            row["source"].startswith("SMoPE") and row["method"] == "l2p")
        # and projects new CODA components against each earlier one separately (the SMoPE table's CODA rows)
        assert ("compat_reference_gram_schmidt=true" in args.overrides) == (smope_table and row["method"] == "coda")
        if row["source"].startswith("SMoPE") and row["method"] in ("l2p", "dualprompt"):
            assert args.preset.startswith("deep-l2p++" if row["method"] == "l2p" else "coda-")
            assert args.preset.endswith("imagenet-r") == (row["benchmark"] == "imagenet_r")
        # with the compat gather (or a batch-wise vote) a prediction depends on its batch: evaluate
        # as the reference does (128; HiDe-Prompt's own scripts, which made the HiDe rows, one GPU's
        # batch: 24, on 5-Datasets 32)
        hide_upstream = row["preset"].startswith("upstream-")
        per_gpu = get_method("hide").PRESETS[row["preset"]].contrastive_group if hide_upstream else None
        assert args.eval_batch_size == (per_gpu if hide_upstream else 128 if norga_code_base else 256)
        assert hide_upstream == (row["method"] == "hide" and row["source"].startswith("NoRGa"))
        # HiDe-Prompt's scripts never shuffle the classes; NoRGa's and SMoPE's shuffle every seed; CODA-Prompt's,
        # VQ-Prompt's and OVOR's every seed but 0
        assert args.class_order == ("natural" if hide_upstream else "seeded-except-0"
                                    if coda_lineage or (smope_table and row["method"] == "vqprompt") else "seeded")
        if norga_code_base and row["method"] in ("l2p", "dualprompt"):
            assert row["preset"] == NORGA_BASELINE_PRESETS[row["method"], row["benchmark"]]
        # SMoPE's ImageNet-R numbers come from CODA-Prompt's split and class numbering
        smope_imagenet_r = row["source"].startswith("SMoPE") and row["benchmark"] == "imagenet_r"
        assert (args.split_file == "$PROMPTCL_DATA/coda-splits/imagenet-r_train.yaml") == smope_imagenet_r
        assert args.out == Path(f"runs/reproduce/{run}/seed{seed}")
        assert (args.checkpoint_file is not None) == (row["backbone"] in ("ibot21k", "ibot1k", "mocov3_1k"))


def test_every_row_names_a_registered_method_and_preset_and_its_settings_validate():
    """The preset, the reference script's settings for the dataset and backbone, and the row's --set
    overrides make a valid configuration (what `promptcl run` builds first), for every row."""
    from promptcl.cli import run_spec
    from promptcl.config import apply_overrides
    from promptcl.data.benchmarks import DATASETS

    for row in ROWS:
        method = get_method(row["method"])
        assert row["preset"] in method.PRESETS, row["id"]
        spec = run_spec(reproduce.parse_run_command(shlex.split(row["command"].replace("{seed}", "0"))))
        num_tasks = DATASETS[spec.dataset].num_classes // spec.increment
        config = apply_overrides(method.preset_for(spec.dataset, spec.backbone, spec.preset, num_tasks),
                                 spec.overrides)
        if "activation ablation" in row["source"]:
            assert config.gate_activation == row["id"].split("-")[-2]


def test_every_row_names_a_registered_dataset_split_and_backbone():
    from promptcl.core.backbone import SEED_BACKBONES
    from promptcl.data.benchmarks import DATASETS

    for row in ROWS:
        tokens = shlex.split(row["command"])
        increment = int(tokens[tokens.index("--increment") + 1])
        assert increment * row["tasks"] == DATASETS[row["benchmark"]].num_classes, row["id"]
        # Weights outside timm's hub come from a release file, which the command must name.
        needs_file = SEED_BACKBONES[row["backbone"]].tag is None
        assert ("--checkpoint-file" in tokens) == needs_file, row["id"]


def test_unknown_id_exits_2_with_one_line(capsys):
    code, out, err = _cli(capsys, "no-such-row")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "promptcl reproduce --list" in err


def _row(command, *, published, seeds=(0,), row_id="simplecil-digits-fa"):
    return {"id": row_id, "source": "test", "method": "simplecil", "benchmark": "digits", "tasks": 5,
            "backbone": "vit_digits", "metric": "FA", "published": published, "published_std": None,
            "tolerance": 1.0, "seeds": list(seeds), "preset": "small", "command": command, "status": "not run",
            "notes": ""}


def _write_manifest(path, *rows):
    path.write_text(json.dumps({"schema": 1, "rows": list(rows)}))
    return str(path)


@pytest.mark.parametrize("results, message", [("out", "--results 'OUT' is a directory"),
                                             ("out/file/r.json", "its directory 'OUT/file' exists and is not")])
def test_a_results_path_that_cannot_be_written_fails_before_any_run(capsys, tmp_path, results, message):
    command = f"promptcl run --method simplecil --dataset digits --seed {{seed}} --out {tmp_path}/s{{seed}}"
    manifest = _write_manifest(tmp_path / "m.json", _row(command, published=50.0))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("")
    code, out, err = _cli(capsys, "simplecil-digits-fa", "--manifest", manifest, "--results", str(tmp_path / results))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert message.replace("OUT", str(tmp_path / "out")) in err
    assert not (tmp_path / "s0").exists()


def test_a_manifest_of_the_wrong_shape_is_one_line(tmp_path):
    from promptcl.study.reproduce import load_manifest

    command = "promptcl run --method simplecil --dataset digits --seed {seed} --out runs/x/seed{seed}"
    row = _row(command, published=1.0)
    cases = [({"rows": 3}, r"must hold \{\"rows\": \[<row object>, ...\]\}"), ({"rows": [3]}, "must hold"),
             ({"rows": [{**row, "seeds": "0"}]}, r"seeds must be a non-empty list of integers"),
             ({"rows": [{**row, "seeds": [0, -1]}]}, r"seeds must be a non-empty list of integers in \[0, 2\*\*32 - 1\]"),
             ({"rows": [{**row, "seeds": [0, 0]}]}, r"seeds \[0, 0\] repeat a seed"),
             ({"rows": [{**row, "command": 7}]}, "the command must be a string with {seed}"),
             ({"rows": [{**row, "id": 7}]}, "manifest row id 7 must be a non-empty string"),
             ({"rows": [{**row, "id": ["a"]}]}, r"manifest row id \['a'\] must be a non-empty string"),
             ({"rows": [{**row, "published": None}]}, "published must be a number, got None"),
             ({"rows": [{**row, "published": "83.1"}]}, "published must be a number, got '83.1'"),
             ({"rows": [{**row, "tolerance": None}]}, "tolerance must be a number >= 0, got None"),
             ({"rows": [{**row, "published_std": -1}]}, "published_std must be a number >= 0 or null"),
             ({"rows": [{**row, "command": command.replace(" --out runs/x/seed{seed}", "")}]}, "has no --out value"),
             ({"rows": [{**row, "seeds": [0, 1], "command": command.replace("/seed{seed}", "")}]},
              "--out 'runs/x' lacks {seed}: every seed's run needs its own output directory")]
    for content, message in cases:
        (tmp_path / "m.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message) as err:
            load_manifest(tmp_path / "m.json")
        assert "\n" not in str(err.value)


def test_missing_data_or_checkpoint_fails_before_any_run(capsys, monkeypatch, tmp_path, cifar100_files):
    command = ('promptcl run --method simplecil --dataset cifar100 --checkpoint-file "$PROMPTCL_CHECKPOINTS/w.pth" '
               f'--seed {{seed}} --data-dir "$PROMPTCL_DATA" --out {tmp_path}/runs/seed{{seed}}')
    manifest = _write_manifest(tmp_path / "m.json", _row(command, published=50.0))
    results = tmp_path / "results.json"
    monkeypatch.setenv("PROMPTCL_CHECKPOINTS", str(tmp_path))

    def attempt():
        code, _, err = _cli(capsys, "simplecil-digits-fa", "--manifest", manifest, "--results", str(results))
        assert code == 2 and err.count("\n") == 1
        return err

    monkeypatch.delenv("PROMPTCL_DATA", raising=False)
    assert "$PROMPTCL_DATA" in attempt()
    monkeypatch.setenv("PROMPTCL_DATA", str(tmp_path / "absent"))
    assert "data directory" in attempt()
    monkeypatch.setenv("PROMPTCL_DATA", str(cifar100_files[0]))
    err = attempt()
    assert "checkpoint file" in err and "w.pth" in err and "does not exist" in err
    assert not results.exists() and not (tmp_path / "runs").exists()


def test_every_seed_of_a_row_is_resolved_before_any_run(tmp_path):
    """A row's seeds differ only in {seed}, which may reach a setting: the last seed's run is
    checked before the first one starts."""
    from promptcl.study.reproduce import plan_row

    command = f"promptcl run --method smope --dataset digits --set top_k={{seed}} --seed {{seed}} --out {tmp_path}/s{{seed}}"
    with pytest.raises(ValueError, match=r"seed 9: .*top_k=9 must be between 1 and num_experts=8"):
        plan_row({**_row(command, published=50.0, seeds=(1, 9))})
    assert [seed for seed, _, _ in plan_row(_row(command, published=50.0, seeds=(1, 2)))] == [1, 2]
    # every seed's command must run that seed (else one seed would be averaged with itself)
    fixed = command.replace("--seed {seed}", "--seed 1")
    with pytest.raises(ValueError, match=r"the command runs --seed 1, not the row's seed 2 \(give --seed \{seed\}\)"):
        plan_row(_row(fixed, published=50.0, seeds=(1, 2)))
    # --out=PATH is the same option as --out PATH
    equals = command.replace(f"--out {tmp_path}", f"--out={tmp_path}")
    assert [out for _, _, out in plan_row(_row(equals, published=50.0, seeds=(1, 2)))] == [tmp_path / "s1",
                                                                                           tmp_path / "s2"]
    assert not any(tmp_path.iterdir())


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc; the field after the command's ')')."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except OSError:  # a process that ended meanwhile
            continue
    return found


def test_a_terminated_row_stops_its_running_seed_which_leaves_nothing(tmp_path):
    """SIGTERM to `promptcl reproduce` reaches the seed's `promptcl run`: it stops (no orphan keeps
    computing) and removes its unfinished output; no result is recorded."""
    import os
    import signal
    import subprocess
    import sys
    import time

    command = (f"promptcl run --method smope --dataset digits --set epochs=200 --no-progress --seed {{seed}} "
               f"--out {tmp_path}/runs/s{{seed}}")
    manifest = _write_manifest(tmp_path / "m.json", _row(command, published=50.0))
    proc = subprocess.Popen([sys.executable, "-m", "promptcl.cli", "reproduce", "simplecil-digits-fa", "--manifest",
                             manifest, "--results", str(tmp_path / "results.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not list(tmp_path.glob("runs/.s0.*/checkpoints")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # the seed's run is under way
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    (child,) = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert not Path(f"/proc/{child}").exists()  # stopped, and waited for
    assert list((tmp_path / "runs").iterdir()) == [] and not (tmp_path / "results.json").exists()


def test_a_damaged_release_checkpoint_fails_the_row_before_any_run(capsys, monkeypatch, tmp_path, cifar100_files):
    """The row's first run is resolved as `promptcl run` would: a file that is not an iBOT checkpoint
    stops the row in one line, not hours later."""
    (tmp_path / "ibot.pth").write_bytes(b"truncated")
    command = ('promptcl run --method norga --dataset cifar100 --backbone ibot21k --checkpoint-file '
               f'"$PROMPTCL_CHECKPOINTS/ibot.pth" --seed {{seed}} --data-dir "$PROMPTCL_DATA" '
               f'--out {tmp_path}/r/s{{seed}}')
    manifest = _write_manifest(tmp_path / "m.json", _row(command, published=50.0, seeds=(42, 40)))
    monkeypatch.setenv("PROMPTCL_CHECKPOINTS", str(tmp_path))
    monkeypatch.setenv("PROMPTCL_DATA", str(cifar100_files[0]))
    code, _, err = _cli(capsys, "simplecil-digits-fa", "--manifest", manifest, "--results", str(tmp_path / "r.json"))
    assert code == 2 and err.count("\n") == 1 and "ibot.pth' is corrupt or unreadable" in err
    assert not (tmp_path / "r").exists()


def test_missing_benchmark_files_fail_before_any_run(capsys, monkeypatch, tmp_path):
    command = ('promptcl run --method norga --dataset cifar100 --increment 10 --backbone sup21k --preset paper '
               f'--seed {{seed}} --data-dir "$PROMPTCL_DATA" --out {tmp_path}/runs/seed{{seed}}')
    manifest = _write_manifest(tmp_path / "m.json", _row(command, published=50.0, seeds=(42, 40)))
    monkeypatch.setenv("PROMPTCL_DATA", str(tmp_path))  # exists, but holds no cifar-100-python/
    code, _, err = _cli(capsys, "simplecil-digits-fa", "--manifest", manifest, "--results", str(tmp_path / "r.json"))
    assert code == 2 and err.count("\n") == 1 and "cifar-100-python" in err
    assert not (tmp_path / "runs").exists()


def test_a_row_runs_each_seed_records_the_result_and_resumes(capsys, tmp_path):
    command = ("promptcl run --method simplecil --dataset digits --preset small --seed {seed} "
               f"--out {tmp_path}/r/s{{seed}}")
    manifest = tmp_path / "m.json"
    results = tmp_path / "out" / "results.json"
    argv = ("simplecil-digits-fa", "--manifest", str(manifest), "--results", str(results))

    # the FM row of the same run (same command) is recorded from the same seeds' summaries
    fm_row = {**_row(command, published=0.0, row_id="simplecil-digits-fm"), "metric": "FM", "tolerance": 100.0}
    _write_manifest(manifest, _row(command, published=-50.0), fm_row)  # FA far from any accuracy
    code, out, _ = _cli(capsys, *argv)
    assert code == 0 and out.splitlines()[0].endswith("-> gap") and out.splitlines()[1].endswith("-> reproduced")
    summary = json.loads((tmp_path / "r" / "s0" / "summary.json").read_text())  # written by the subprocess
    records = json.loads(results.read_text())["rows"]
    umask = os.umask(0)
    os.umask(umask)
    assert results.stat().st_mode & 0o777 == 0o666 & ~umask  # as open makes it, not private
    record = records["simplecil-digits-fa"]
    measured = summary["final_average_accuracy"]
    assert record["per_seed"] == {"0": measured} and record["measured"] == measured
    assert record["status"] == "gap" and record["versions"]["torch"]
    assert records["simplecil-digits-fm"]["per_seed"] == {"0": summary["forgetting"]}

    # Published near the measured value: the finished seed is reused (no second run), now reproduced.
    _write_manifest(manifest, _row(command, published=measured + 0.5))
    code, out, err = _cli(capsys, *argv)
    assert code == 0 and out.rstrip().endswith("-> reproduced") and "reusing" in err
    assert json.loads(results.read_text())["rows"]["simplecil-digits-fa"]["status"] == "reproduced"

    # A changed command never reuses a seed run with the old one: refused before any work.
    _write_manifest(manifest, _row(command.replace("--seed", "--set batch_size=16 --seed"), published=50.0))
    code, _, err = _cli(capsys, *argv)
    assert code == 2 and "holds a run of another configuration" in err and err.count("\n") == 1
    _write_manifest(manifest, _row(command, published=measured + 0.5))

    code, out, _ = _cli(capsys, "--list", "--json", "--manifest", str(manifest), "--results", str(results))
    (entry,) = json.loads(out)
    assert entry["status"] == "reproduced" and entry["measured"] == measured


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the device is missing only without CUDA")
def test_a_row_on_a_device_this_machine_lacks_fails_before_any_run(capsys, tmp_path):
    command = (f"promptcl run --method simplecil --dataset digits --seed {{seed}} --out {tmp_path}/s{{seed}} "
               "--device cuda")
    manifest = _write_manifest(tmp_path / "m.json", _row(command, published=50.0))
    code, out, err = _cli(capsys, "simplecil-digits-fa", "--manifest", manifest, "--results", str(tmp_path / "r.json"))
    assert code == 2 and out == "" and "seed 0: device 'cuda'" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_a_failing_seed_leaves_the_row_not_run(capsys, tmp_path):
    # the second seed's output is stale (no summary.json; `promptcl run` would refuse to overwrite
    # it): refused before the first seed runs, and nothing is recorded
    stale = f"promptcl run --method simplecil --dataset digits --seed {{seed}} --out {tmp_path}/stale/s{{seed}}"
    manifest = _write_manifest(tmp_path / "m.json", _row(stale, published=50.0, seeds=(0, 1)))
    (tmp_path / "stale" / "s1").mkdir(parents=True)
    results = tmp_path / "results.json"
    code, out, err = _cli(capsys, "simplecil-digits-fa", "--manifest", manifest, "--results", str(results))
    assert code == 2 and out == "" and f"seed 1: {tmp_path}/stale/s1 exists and holds no finished run" in err
    assert not results.exists() and not (tmp_path / "stale" / "s0").exists()
    # a seed whose command fails when it runs (a file where its feature store goes)
    (tmp_path / "file").write_text("")
    command = (f"promptcl run --method simplecil --dataset digits --seed {{seed}} --out {tmp_path}/s{{seed}} "
               f"--feature-cache {tmp_path}/file")
    manifest = _write_manifest(tmp_path / "m.json", _row(command, published=50.0))
    code, out, _ = _cli(capsys, "simplecil-digits-fa", "--manifest", manifest, "--results", str(results))
    assert code == 1 and "not run" in out
    record = json.loads(results.read_text())["rows"]["simplecil-digits-fa"]
    assert record["status"] == "not run" and record["measured"] is None and "seed 0" in record["error"]

"""Offline checks of ray_jobs/: the cluster launcher config and the KubeRay manifests pass Ray's own
validators, their resources fit the Train workers that the entrypoints' study flags ask for, and the
runtime environments ship the code with the pinned stack of pyproject.toml. No Ray cluster, no network.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

from promptcl.study.tuner import DRIVER_REQUEST  # what each trial driver asks for

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "ray_jobs"
DRIVER_RESOURCE = "promptcl_driver"  # what the entrypoints pass to --driver-resource
LAUNCHER, RAYCLUSTER, RAYJOB = "cluster-aws.yaml", "raycluster.yaml", "rayjob-smope-topk.yaml"
SHARED_URI_SCHEMES = ("s3://", "gs://", "abfs://", "abfss://")
RUNTIME_ENV_KEYS = {"working_dir", "excludes", "pip", "env_vars", "config", "py_modules"}


def load(name: str) -> dict:
    return yaml.safe_load((JOBS / name).read_text())


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dependency_pins() -> tuple[str, set[str]]:
    """(Ray's pinned version, the other pins as 'name==version') from pyproject.toml."""
    ray_version, pins = None, set()
    for dep in pyproject()["project"]["dependencies"]:
        name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", dep.replace(" ", "")).groups()
        if name == "ray":
            ray_version = version
        else:
            pins.add(f"{name}=={version}")
    assert ray_version, "pyproject.toml no longer pins ray"
    return ray_version, pins


# ----------------------------------------------------------------------------------------------
# Configs as the autoscalers see them


def launcher_config(raw: dict | None = None) -> dict:
    """The launcher config after Ray's own defaults are merged in (what `ray up` validates)."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(raw if raw is not None else load(LAUNCHER)))


def validate_launcher(raw: dict) -> dict:
    from ray.autoscaler._private.util import validate_config

    config = launcher_config(raw)
    validate_config(config)
    return config


def rayjob_cluster_cr(job: dict | None = None) -> dict:
    """The RayCluster CR that KubeRay makes from a RayJob's rayClusterSpec."""
    job = job if job is not None else load(RAYJOB)
    meta = job["metadata"]
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {k: meta[k] for k in ("name", "namespace") if k in meta},
            "spec": copy.deepcopy(job["spec"]["rayClusterSpec"])}


def kuberay_crs() -> dict[str, dict]:
    return {RAYCLUSTER: load(RAYCLUSTER), RAYJOB: rayjob_cluster_cr()}


def derive(cr: dict) -> dict:
    """What the in-tree KubeRay autoscaler derives from a RayCluster CR (it runs validate_config too)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    return _derive_autoscaling_config_from_ray_cr(copy.deepcopy(cr))


def worker_types(config: dict) -> dict[str, dict]:
    return {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}


def gpu_types(config: dict) -> dict[str, dict]:
    return {n: t for n, t in worker_types(config).items() if t["resources"].get("GPU", 0) > 0}


# ----------------------------------------------------------------------------------------------
# Entrypoints: the RayJob's and the commands in ray_jobs/README.md


def readme_commands() -> dict[str, list[str]]:
    """`python studies/...` commands in README.md's shell blocks, by the cluster its section targets."""
    text = (JOBS / "README.md").read_text()
    found: dict[str, list[str]] = {LAUNCHER: [], RAYCLUSTER: []}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0].lower()
        target = LAUNCHER if "launcher" in title else RAYCLUSTER if "kuberay" in title else None
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", section, flags=re.S):
            for command in block.replace("\\\n", " ").splitlines():
                if "python studies/" in command:
                    assert target, f"a study command outside the launcher/KubeRay sections: {command}"
                    found[target].append(command)
    return found


def entrypoints() -> list[tuple[str, str, str]]:
    """(where it is written, the command, the config file of the cluster it runs on)."""
    rows = [(f"{RAYJOB} spec.entrypoint", load(RAYJOB)["spec"]["entrypoint"], RAYJOB)]
    for target, commands in readme_commands().items():
        rows += [(f"README.md ({target})", c, target) for c in commands]
    return rows


def parse_study_command(command: str):
    """(script path, parsed flags) with the parser every study script uses."""
    from promptcl.study.tuner import study_parser

    tokens = shlex.split(command)
    starts = [i for i, t in enumerate(tokens) if t in ("python", "python3")]
    assert starts, f"no `python` in {command!r}"
    script, flags = tokens[starts[0] + 1], tokens[starts[0] + 2:]
    try:
        args = study_parser("x", name="n", num_samples=1).parse_args(flags)
    except SystemExit:
        pytest.fail(f"study_parser rejects the flags of {command!r}")
    return script, args


def cluster_of(config_file: str) -> dict:
    if config_file == LAUNCHER:
        return launcher_config()
    return derive(kuberay_crs()[config_file])


def pod_specs(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


# ----------------------------------------------------------------------------------------------
# 1. Cluster launcher


def test_launcher_config_passes_ray_validation():
    config = validate_launcher(load(LAUNCHER))
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("broken, error", [
    (lambda c: c.update(max_worker=c.pop("max_workers")), jsonschema.ValidationError),  # misspelled key
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=c["max_workers"] + 1), ValueError),
    (lambda c: c.update(head_node_type="cpu_head"), ValueError),
], ids=["misspelled-key", "fractional-gpu", "no-node-config", "min-over-max", "unknown-head-type"])
def test_launcher_validation_rejects_broken_configs(broken, error):
    raw = load(LAUNCHER)
    broken(raw)
    with pytest.raises(error):
        validate_launcher(raw)


def test_launcher_gpu_workers_autoscale_from_zero_and_declare_their_resources():
    raw_types = load(LAUNCHER)["available_node_types"]
    config = launcher_config()
    gpus = gpu_types(config)
    assert gpus, "no GPU worker type"
    for name, node_type in gpus.items():
        # declared in the file, not left to instance-type detection
        assert {"CPU", "GPU"} <= set(raw_types[name]["resources"]), name
        assert node_type["min_workers"] == 0 < node_type["max_workers"], name


# ----------------------------------------------------------------------------------------------
# 2. KubeRay


@pytest.mark.parametrize("name", [RAYCLUSTER, RAYJOB])
def test_kuberay_cluster_passes_autoscaler_derivation(name):
    cr = kuberay_crs()[name]
    assert cr["metadata"].get("namespace"), f"{name}: metadata.namespace"
    assert cr["spec"]["enableInTreeAutoscaling"] is True
    config = derive(cr)
    assert config["provider"]["namespace"] == cr["metadata"]["namespace"]
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and not head["resources"].get("GPU"), "head: no CPU/GPU for Ray work, drivers use promptcl_driver"
    gpus = gpu_types(config)
    assert gpus, f"{name}: no GPU worker group"
    for group in cr["spec"]["workerGroupSpecs"]:
        if group["groupName"] in gpus:
            assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0 < group["maxReplicas"]


def test_manifest_kinds_and_versions():
    ray_version, _ = dependency_pins()
    cluster, job = load(RAYCLUSTER), load(RAYJOB)
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"].get("namespace"), "RayJob metadata.namespace"
    image = f"rayproject/ray:{ray_version}-py311-gpu"
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == ray_version
        assert {c["image"] for pod in pod_specs(spec) for c in pod["containers"]} == {image}
    assert load(LAUNCHER)["docker"]["image"] == image


def _drop_namespace(cr):
    del cr["metadata"]["namespace"]


def _drop_max_replicas(cr):
    del cr["spec"]["workerGroupSpecs"][0]["maxReplicas"]


def _no_cpu_anywhere(cr):  # the autoscaler could not size the group
    group = cr["spec"]["workerGroupSpecs"][0]
    group["rayStartParams"].pop("num-cpus", None)
    for kind in ("limits", "requests"):
        group["template"]["spec"]["containers"][0]["resources"].get(kind, {}).pop("cpu", None)


def _unquoted_custom_resources(cr):  # KubeRay wants the JSON wrapped in an extra pair of quotes
    cr["spec"]["headGroupSpec"]["rayStartParams"]["resources"] = '{"promptcl_driver": 100}'


@pytest.mark.parametrize("name", [RAYCLUSTER, RAYJOB])
@pytest.mark.parametrize("broken, error", [
    (_drop_namespace, KeyError), (_drop_max_replicas, KeyError), (_no_cpu_anywhere, ValueError),
    (_unquoted_custom_resources, Exception),
], ids=["no-namespace", "no-maxReplicas", "no-cpu", "bad-custom-resources"])
def test_kuberay_derivation_rejects_broken_crs(name, broken, error):
    cr = kuberay_crs()[name]
    derive(cr)  # the unbroken CR passes, so the failure below is the breakage's
    broken(cr)
    with pytest.raises(error):
        derive(cr)


@pytest.mark.parametrize("name", [RAYCLUSTER, RAYJOB])
def test_the_head_declares_its_driver_resource_the_way_kuberay_reads_it(name):
    """The manifests' quoted JSON derives to 100 units on the head, so the unquoted case above (the
    same 100 units) fails for the quoting alone."""
    config = derive(kuberay_crs()[name])
    assert config["available_node_types"][config["head_node_type"]]["resources"][DRIVER_RESOURCE] == 100


def test_rayjob_cr_is_built_from_the_jobs_own_metadata():
    job = load(RAYJOB)
    del job["metadata"]["namespace"]
    with pytest.raises(KeyError):
        derive(rayjob_cluster_cr(job))


@pytest.mark.parametrize("name", [RAYCLUSTER, RAYJOB])
def test_kuberay_ray_resources_match_the_pods(name):
    """rayStartParams may not advertise CPUs or GPUs that the Ray container does not get."""
    from ray.autoscaler._private.kuberay.utils import parse_quantity

    spec = kuberay_crs()[name]["spec"]
    for group in spec["workerGroupSpecs"]:
        params = group.get("rayStartParams", {})
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        gpu_limit = int(next((v for k, v in limits.items() if k.endswith("/gpu")), 0))
        if "num-gpus" in params:
            assert int(params["num-gpus"]) == gpu_limit, group["groupName"]
        if "num-cpus" in params and "cpu" in limits:
            assert int(params["num-cpus"]) <= parse_quantity(limits["cpu"]), group["groupName"]
        if gpu_limit:
            assert "num-cpus" in params or "cpu" in limits, f"{group['groupName']}: GPU group without CPUs"


# ----------------------------------------------------------------------------------------------
# 3. Resources vs the study flags


@pytest.mark.parametrize("config_file", [LAUNCHER, RAYCLUSTER, RAYJOB])
def test_only_the_head_runs_trial_drivers(config_file):
    config = cluster_of(config_file)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get(DRIVER_RESOURCE, 0) >= 1
    for name, node_type in worker_types(config).items():
        assert DRIVER_RESOURCE not in node_type["resources"], f"{name}: drivers would die with scaled-down workers"


def test_readme_has_launcher_and_kuberay_commands():
    commands = readme_commands()
    assert commands[LAUNCHER] and commands[RAYCLUSTER], commands


@pytest.mark.parametrize("where, command, config_file", [pytest.param(*row, id=row[0]) for row in entrypoints()])
def test_entrypoint_parses_and_fits_its_cluster(where, command, config_file):
    script, args = parse_study_command(command)
    assert PurePosixPath(script).parent == PurePosixPath("studies") and (ROOT / script).is_file(), where
    assert args.resume and args.use_gpu, f"{where}: needs --resume and --use-gpu"
    assert args.driver_resource == DRIVER_RESOURCE, where
    assert args.max_failures >= 1, f"{where}: --max-failures"
    assert args.cpus_per_worker is not None, f"{where}: give --cpus-per-worker to fit the worker nodes"
    assert args.mlflow_uri and args.mlflow_uri.startswith(("http://", "https://")), f"{where}: a tracking server"

    config = cluster_of(config_file)
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    assert head[DRIVER_RESOURCE] >= args.max_concurrent * DRIVER_REQUEST, where
    gpus = gpu_types(config)
    assert gpus, where
    for name, node_type in gpus.items():  # every GPU node type can host one Train worker
        res = node_type["resources"]
        assert res.get("CPU", 0) >= args.cpus_per_worker and res["GPU"] >= args.gpus_per_worker, (where, name)
    # at full scale the cluster runs --max-concurrent trials at once (else trials wait, spinning)
    gpu_capacity = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpus.values())
    assert args.max_concurrent * args.workers_per_trial * args.gpus_per_worker <= gpu_capacity, where
    assert_shared_storage(where, args.storage_path, config_file)
    assert_optuna_study_survives(where, args, config_file)


def assert_shared_storage(where: str, storage_path: str | None, config_file: str) -> None:
    """Tune state and Train checkpoints must be where every node (and a later job) finds them."""
    assert storage_path, f"{where}: --storage-path"
    if storage_path.startswith(SHARED_URI_SCHEMES):
        return
    assert config_file != LAUNCHER, f"{where}: launcher nodes share no disk; use S3/GCS"
    assert_on_the_shared_volume(where, storage_path, config_file)


def assert_optuna_study_survives(where: str, args, config_file: str) -> None:
    """--resume continues the Optuna study too: its SQLite file (under --runs-dir unless
    --optuna-storage) must outlive the driver. A RayJob retry is a new cluster: the shared volume;
    the launcher's jobs share its head: an absolute path there (a relative one is in the job's
    uploaded working directory)."""
    from promptcl.storage import sqlite_file

    database = sqlite_file(args.optuna_storage or f"sqlite:///{args.runs_dir}/optuna.db")
    if database is None:  # a database server
        return
    if config_file == LAUNCHER:
        assert database.is_absolute(), f"{where}: the Optuna study {database} is not on the head's disk"
    else:
        assert_on_the_shared_volume(where, str(database), config_file)


def assert_on_the_shared_volume(where: str, location: str, config_file: str) -> None:
    path = PurePosixPath(location)
    assert path.is_absolute(), where
    spec = kuberay_crs()[config_file]["spec"]
    for pod in pod_specs(spec):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        mounts = [m for m in pod["containers"][0].get("volumeMounts", [])
                  if m["name"] in claims and path.is_relative_to(m["mountPath"])]
        assert mounts, f"{where}: {location} is not on a PVC mounted in every pod"
    claim_names = {v["persistentVolumeClaim"]["claimName"]
                   for pod in pod_specs(spec) for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
    assert len(claim_names) == 1, f"{where}: pods mount different claims {claim_names}"


def test_entrypoint_check_bites():
    """The checks above can fail: a misspelled flag, or a command without the cluster flags."""
    with pytest.raises(pytest.fail.Exception):
        parse_study_command("python studies/smope_topk.py --resume --driver-resources promptcl_driver")
    _, args = parse_study_command("python studies/smope_topk.py --storage-path runs/ray_results")
    assert not args.resume and not args.use_gpu and args.driver_resource is None and args.max_failures == 0
    with pytest.raises(AssertionError):
        assert_shared_storage("local", args.storage_path, LAUNCHER)
    with pytest.raises(AssertionError):
        assert_shared_storage("elsewhere", "/tmp/ray_results", RAYCLUSTER)
    _, args = parse_study_command("python studies/smope_topk.py --runs-dir runs")
    for config_file in (RAYJOB, LAUNCHER):  # the Optuna study would die with the driver's pod or job
        with pytest.raises(AssertionError):
            assert_optuna_study_survives("relative runs dir", args, config_file)
    _, args = parse_study_command("python studies/smope_topk.py --optuna-storage sqlite:////tmp/optuna.db")
    with pytest.raises(AssertionError):
        assert_optuna_study_survives("pod-local", args, RAYJOB)


# ----------------------------------------------------------------------------------------------
# 4. Runtime environments and pins


def setup_command_pins() -> set[str]:
    return {pin for cmd in load(LAUNCHER)["setup_commands"] for pin in re.findall(r"'([^' ]+==[^' ]+)'", cmd)}


def test_pins_match_pyproject():
    _, pins = dependency_pins()
    assert setup_command_pins() == pins, "cluster-aws.yaml setup_commands"
    assert set(load("runtime_env.yaml")["pip"]) == pins, "runtime_env.yaml pip"
    assert set(yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])["pip"]) == pins, "RayJob runtimeEnvYAML pip"


@pytest.mark.parametrize("source", ["runtime_env.yaml", "RayJob runtimeEnvYAML"])
def test_runtime_env_is_accepted_by_ray(source):
    from ray.runtime_env import RuntimeEnv

    if source == "runtime_env.yaml":
        env = load("runtime_env.yaml")
    else:
        env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    assert set(env) <= RUNTIME_ENV_KEYS, f"unknown runtime_env fields {set(env) - RUNTIME_ENV_KEYS}"
    RuntimeEnv(**env)  # raises on malformed pip/env_vars/working_dir
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())
    if source != "runtime_env.yaml":
        assert env["working_dir"].endswith(".zip") and "://" in env["working_dir"], "a remote zip the pods can fetch"


def uploaded(root: Path, excludes: list[str]) -> set[str]:
    """Relative paths Ray would pack for working_dir=root with these excludes (ignore files aside)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    seen: set[str] = set()
    _dir_travel(root, [_get_excludes(root, excludes)], lambda p: seen.add(p.relative_to(root).as_posix()),
                include_gitignore=False)
    return seen


def test_runtime_env_excludes_keep_local_state_out(tmp_path):
    env = load("runtime_env.yaml")
    assert env["working_dir"] == "."
    for rel in (".venv/lib/site.py", ".git/HEAD", "runs/ray_results/x.json", "runs/mlflow.db",
                "promptcl/study/tuner.py", "studies/smope_topk.py", "ray_jobs/runtime_env.yaml", "pyproject.toml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    everything = uploaded(tmp_path, [])
    assert ".venv/lib/site.py" in everything  # the traversal sees them without excludes
    shipped = uploaded(tmp_path, env["excludes"])
    assert not any(p.split("/")[0] in {".venv", ".git", "runs"} for p in shipped), shipped
    assert {"promptcl/study/tuner.py", "studies/smope_topk.py", "pyproject.toml"} <= shipped


import os

import pytest

# Offline, quiet, and never attached to a cluster named by the caller's environment.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train notices a dead worker within a fraction of a second instead of 2 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Under pytest-xdist the workers share the machine's cores: one compute thread each (and in the
# processes they start), else OpenMP threads spin against each other and every test runs slower.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


@pytest.fixture
def mlflow_uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for every test of this process that needs one (each xdist worker has its
    own). Logical CPUs exceed the 2 cores on purpose: studies bound their own concurrency, and Ray
    Train can keep the placement groups of stopped trials reserved for a while, which must not
    starve the tests after them. Yields the GCS address, for subprocess drivers."""
    import ray

    # The dashboard serves the State API, which Ray Train's placement-group cleaner needs to free
    # the workers' resources of a trial that a scheduler stopped or whose driver died.
    context = ray.init(address="local", num_cpus=16, include_dashboard=True, dashboard_host="127.0.0.1",
                       object_store_memory=256 * 2**20, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def cifar100_files(tmp_path_factory):
    """A data root with CIFAR-100's python pickles: 2 train and 1 test image per class. Returns
    (root, {file: (images, labels)})."""
    from disk_formats import write_cifar

    root = tmp_path_factory.mktemp("cifar100")
    return root, write_cifar(root, "cifar-100-python", {"train": 2, "test": 1}, "fine_labels", 100)

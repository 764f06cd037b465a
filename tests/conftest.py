import os

import pytest

# Offline, quiet, and never attached to a cluster named by the caller's environment.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def mlflow_uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"

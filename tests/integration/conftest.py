"""Integration fixtures. MLflow: one real tracking server on SQLite in a temp dir per session."""

import pytest

from draftsmith.mlflow_server import start_mlflow_server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real local MLflow server (SQLite backend, proxied artifacts); yields the handle (``.url``)."""
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server

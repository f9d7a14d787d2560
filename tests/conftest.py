"""Suite-wide setup: offline, quiet, CPU; one local Ray cluster per session for the tests that ask for it."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray reads its authentication mode when it is first imported: the whole session runs in token mode, as the
# clusters `pipelines/local_services.py` starts do (a process that imported Ray without it cannot join them).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process: the suite runs Ray workers, Serve replicas and MLflow beside pytest on
# two cores, and oversubscribed OpenMP threads spin-wait (small ops were ~15x slower with 2 threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (dashboard on loopback, so the Jobs API works), shared by the session.

    Logical CPUs exceed the 2 physical cores so that a Serve replica, the traffic logger and Ray Train
    workers can be scheduled together, as on a real node with spare capacity.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            # "local": always a fresh cluster, never one a developer or `draftsmith demo` left running.
            address="local",
            num_cpus=8,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            object_store_memory=300 * 1024 * 1024,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    if not ray.is_initialized():  # a test shut Ray down: serve.shutdown() would wait for a cluster that is gone
        return
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # Serve may never have started
        pass
    ray.shutdown()


"""Process-group checks for the tests that start services (`pipelines/local_services.py`) and stop them."""

import os


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is alive. The group's leader is reaped first when this process started
    it: a zombie would otherwise count as alive."""
    try:
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True

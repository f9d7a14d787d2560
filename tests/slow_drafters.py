"""A test seam for the promotion gate: make chosen drafters cost more without changing what they draft.

`slow_drafters(monkeypatch)` returns a dict {drafter version: seconds}; every drafter runner that
draftsmith.evaluation builds for a version in it sleeps that long on each forward. Acceptance is
unchanged, so a drafter that accepts more can be made to serve slower.
"""

from __future__ import annotations

import time


def slow_drafters(monkeypatch) -> dict[str, float]:
    from draftsmith import evaluation

    versions: dict[str, float] = {}
    real = evaluation.runner_for

    def runner_for(model, drafter=None, **kw):
        runner = real(model, drafter, **kw)
        if drafter is not None and drafter.version in versions:
            forward = runner.forward

            def slow_forward(*args, _delay=versions[drafter.version], **kwargs):
                time.sleep(_delay)
                return forward(*args, **kwargs)

            runner.forward = slow_forward
        return runner

    monkeypatch.setattr(evaluation, "runner_for", runner_for)
    return versions

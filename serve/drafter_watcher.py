"""The drafter hot swap of a SpecPair replica: poll the source, load in the background, refuse or swap.

What it does: `DrafterWatcher` holds the replica's drafter source (drafter_source.py) and asks it, every
`drafter_poll_interval_s` on a poller thread (and at once after `reconfigure`), which version is current.
A new version is loaded off the engine thread and handed to the engine to swap between decoding steps
(`install`); a drafter that fails to load, or that the engine or the layer-parallel plan does not accept,
is refused: its version and reason are kept in `refused` (never loaded again), counted, logged, and the
old drafter keeps serving.

Locking: checks run one at a time (`_check_lock`, held through download and load), so a check that
comes while another loads waits for it and then finds the version already serving: nothing is loaded
twice. `reconfigure` (Serve's user_config) only replaces the source under a short state lock and wakes
the poller, so it returns at once even while a load is in progress; a load from a source replaced
meanwhile is not swapped in, and the check then looks at the new source.

What it does not do: decide which version is current (drafter_source.py), build the engine's runner
(the replica passes `runner_for`), or swap inside the engine (engine_loop.py, draftsmith.specdec).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable

from serve.drafter_source import DrafterSource
from serve.metrics import ReplicaMetrics

logger = logging.getLogger(__name__)

SWAP_TIMEOUT_S = 120


class DrafterWatcher:
    def __init__(self, *, target, install: Callable[[Any, str], concurrent.futures.Future],
                 runner_for: Callable[[Any], Any], source_factory: Callable[..., DrafterSource | None],
                 source_options: dict, metrics: ReplicaMetrics, model_name: str, spec: str | None,
                 poll_interval_s: float):
        self.target = target
        self._install = install  # (runner or None, version) -> future done once the engine swapped
        self._runner_for = runner_for  # drafter -> the engine's runner (raises to refuse it)
        self._source_factory = source_factory
        self._source_options = source_options  # tracking_uri / registry_uri for a models:/ source
        self.metrics = metrics
        self.model_name = model_name
        self.version = "none"
        self.refused: dict[str, str] = {}
        self.swaps = 0
        self.poll_interval_s = poll_interval_s
        self._state_lock = threading.Lock()  # short: the source and its generation
        self._check_lock = threading.Lock()  # long: one check (download, load, swap) at a time
        self._generation = 0
        self.spec: str | None = None
        self._source: DrafterSource | None = None
        self._set_source(spec)
        self._wake = threading.Event()
        self._poller = threading.Thread(target=self._poll_forever, name="drafter-poller", daemon=True)

    def start(self) -> None:
        self._poller.start()

    def _tags(self, version: str) -> dict[str, str]:
        return {"model": self.model_name, "drafter_version": version}

    def _set_source(self, spec: str | None) -> None:
        source = self._source_factory(spec, **self._source_options)  # outside the lock: may build a client
        with self._state_lock:
            self.spec, self._source = spec, source
            self._generation += 1

    def reconfigure(self, user_config: dict | None) -> None:
        """Serve's user_config (drafter source, poll interval): takes effect at the next check, which it wakes."""
        user_config = user_config or {}
        self.poll_interval_s = float(user_config.get("drafter_poll_interval_s", self.poll_interval_s))
        if "drafter" in user_config and user_config["drafter"] != self.spec:
            self._set_source(user_config["drafter"])
        self._wake.set()

    def _poll_forever(self) -> None:
        while True:
            self._wake.wait(timeout=self.poll_interval_s)
            self._wake.clear()
            try:
                self.check()
            except Exception:  # noqa: BLE001  the poller must survive anything
                logger.exception("drafter check failed")

    def _current(self, generation: int) -> bool:
        with self._state_lock:
            return generation == self._generation

    def check(self) -> str:
        """Resolve the source; load and swap in a new version. Returns the version serving afterwards."""
        with self._check_lock:
            while True:
                with self._state_lock:
                    source, generation = self._source, self._generation
                version = self._check(source, generation)
                if self._current(generation):
                    return version

    def _swap(self, runner, version: str) -> None:
        """Install and wait. A swap still queued at the timeout is cancelled: the engine thread would otherwise
        run it later, serving a drafter this watcher recorded as refused."""
        future = self._install(runner, version)
        try:
            future.result(timeout=SWAP_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            if future.cancel():
                raise
            future.result()  # the engine thread already began it: it finishes, and then it is what serves

    def _check(self, source: DrafterSource | None, generation: int) -> str:
        if source is None:
            if self.version != "none":
                self._swap(None, "none")
                self.version = "none"
            return self.version
        try:
            ref = source.current()
        except Exception as error:  # noqa: BLE001
            logger.warning("drafter source %s: %s; keeping %s", source.spec, error, self.version)
            return self.version
        if ref.version == self.version or ref.version in self.refused:
            return self.version
        started = time.perf_counter()
        try:
            runner = self._runner_for(ref.load(self.target))
            if not self._current(generation):  # reconfigured while loading: check the new source instead
                return self.version
            self._swap(runner, ref.version)
        except Exception as error:  # noqa: BLE001  refuse, keep the old drafter
            reason = f"{type(error).__name__}: {error}"
            if ref.location and ref.location not in reason:  # e.g. a truncated safetensors file
                reason += f" (drafter at {ref.location})"
            self.refused[ref.version] = reason
            self.metrics.inc(self.metrics.refused, 1, {**self._tags(ref.version), "reason": type(error).__name__})
            logger.error("refused drafter %s from %s (%s); still serving %s", ref.version, source.spec,
                         reason, self.version)
            return self.version
        previous, self.version = self.version, ref.version
        self.swaps += 1
        self.metrics.inc(self.metrics.swaps, 1, self._tags(self.version))
        logger.info("drafter %s -> %s (%.1f s to load)", previous, ref.version, time.perf_counter() - started)
        return self.version

"""Where a SpecPair replica gets its drafter: a local directory, a derivation, or an MLflow alias.

What it does: `make_source(spec, ...)` turns the configured drafter spec into a source whose
`current()` says, cheaply, which version is current now (a `DrafterRef`: a version string plus a
blocking `load(target)` that builds the `Drafter`). The replica compares versions to decide whether
to load and swap.

- a local directory (or a symlink to one): the version is the resolved directory's name plus a
  fingerprint of its files, so re-pointing a symlink or overwriting the directory is a new version;
- `derived:<layers>` / `feature:<layers>`: derived from the target at start (`derived:first2+last1`,
  `feature:last1` for a drafter that reads the target's features), never changes;
- `models:/<name>@<alias>` (or `/<version>`): resolved through `draftsmith.registry.DrafterRegistry`
  (or any object with the same `resolve`/`download`, injected for tests); the version is the
  registry's version number, downloaded once into a cache folder.

What it does not do: swap drafters or decide what to refuse (drafter_watcher.py), talk to MLflow directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Protocol

from draftsmith import models

logger = logging.getLogger(__name__)


class DrafterSourceError(RuntimeError):
    """The source cannot say which drafter is current (missing directory, registry unreachable...)."""


@dataclasses.dataclass(frozen=True)
class DrafterRef:
    version: str
    load: Callable[[models.LoadedModel], models.Drafter]  # blocking: reads files, may download
    location: str = ""  # where the files are (a refusal names it, whatever the loader's own message says)


class DrafterSource(Protocol):
    spec: str

    def current(self) -> DrafterRef: ...


def _fingerprint(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:8]


@dataclasses.dataclass
class LocalDirSource:
    spec: str

    def current(self) -> DrafterRef:
        real = Path(os.path.realpath(Path(self.spec).expanduser()))
        if not real.is_dir():
            raise DrafterSourceError(f"drafter directory {self.spec} does not exist (resolved to {real})")
        version = f"{real.name}-{_fingerprint(real)}"
        return DrafterRef(version, lambda target: models.load_drafter(real, target, version=version), str(real))


@dataclasses.dataclass
class DerivedSource:
    spec: str

    def current(self) -> DrafterRef:
        version = self.spec.replace(":", "-", 1)  # derived-first1, feature-last1

        def load(target: models.LoadedModel) -> models.Drafter:
            drafter = models.derive_from_spec(target, self.spec)
            drafter.version = version
            return drafter

        return DrafterRef(version, load, self.spec)


class Resolver(Protocol):
    def resolve(self, uri: str): ...  # -> DrafterVersion (.version)

    def download(self, version_or_alias, dst_dir) -> Path: ...


@dataclasses.dataclass
class RegistrySource:
    spec: str
    registry: Resolver
    cache_dir: Path

    def current(self) -> DrafterRef:
        try:
            found = self.registry.resolve(self.spec)
        except Exception as error:  # noqa: BLE001  registry errors, network errors: all mean "unknown now"
            raise DrafterSourceError(f"cannot resolve {self.spec}: {error}") from error
        version = str(found.version)

        def load(target: models.LoadedModel) -> models.Drafter:
            local = self.registry.download(version, self.cache_dir / f"v{version}")
            return models.load_drafter(local, target, version=version)

        return DrafterRef(version, load, f"{self.spec} (version {version}, cached in {self.cache_dir / f'v{version}'})")


def make_source(spec: str | None, *, tracking_uri: str | None = None, registry_uri: str | None = None,
                registry_factory: Callable[..., Resolver] | None = None,
                cache_dir: str | Path | None = None) -> DrafterSource | None:
    """The source for a drafter spec (None: serve without a drafter)."""
    if spec is None:
        return None
    if spec.startswith(models.DERIVATION_PREFIXES):
        return DerivedSource(spec)
    if spec.startswith("models:/"):
        from draftsmith.registry import DrafterRegistry, parse_models_uri

        name, _, _ = parse_models_uri(spec)
        if registry_factory is None:
            registry_factory = DrafterRegistry
        registry = registry_factory(tracking_uri, registry_uri=registry_uri, model_name=name)
        cache = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="draftsmith-drafters-"))
        return RegistrySource(spec, registry, cache)
    return LocalDirSource(spec)

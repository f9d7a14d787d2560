"""Which config values name a local path relative to the working directory, and the absolute form of one.

What it does: the one rule the jobs (which refuse relative paths when they run as a Ray Job, whose working
directory is an uploaded copy of the working_dir without `.state`) and the trigger (which hands the jobs
absolute paths) share. Kinds: `uri` (a traffic log root, read by `draftsmith.traffic.resolve_uri`: anything
with `://` is a URI, a path is taken against the working directory as it stands), `dir` (a local directory,
`~` expanded) and `tracking` (an MLflow tracking or registry URI: a plain path, `file:<path>`,
`file://<path>`, `sqlite:///<path>`; servers and remote stores name no path).

What it does not do: check that a path exists, or read the environment to tell whether this is a Ray Job.
"""

from __future__ import annotations

import os
from typing import Literal

PathKind = Literal["uri", "dir", "tracking"]
# MLflow tracking URIs that name no path and have no "://".
_REMOTE_TRACKING = ("databricks", "databricks-uc", "uc")


def tracking_uri_path(uri: str) -> str | None:
    """The local path an MLflow tracking or registry URI names, or None when it names a server or a remote store."""
    if uri.startswith("file:"):
        rest = uri[len("file:"):]
        return rest[2:] if rest.startswith("//") else rest
    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///"):]
    if "://" in uri or uri.split(":", 1)[0] in _REMOTE_TRACKING:
        return None
    return uri


def relative_local_path(value: str | None, kind: PathKind) -> bool:
    """Whether a job would read `value` (of `kind`) as a local path relative to its working directory."""
    if not value:
        return False
    if kind == "uri":
        return "://" not in value and not os.path.isabs(value)
    if kind == "dir":
        return not os.path.isabs(os.path.expanduser(value))
    path = tracking_uri_path(value)
    return path is not None and path != ":memory:" and not os.path.isabs(path)


def absolute_local(value: str, kind: PathKind) -> str:
    """`value` with a relative local path made absolute against this process's working directory, the way a job
    would have read it here; URIs and absolute paths unchanged."""
    if not relative_local_path(value, kind):
        return value
    if kind in ("uri", "dir"):
        return os.path.abspath(os.path.expanduser(value) if kind == "dir" else value)
    path = tracking_uri_path(value)
    if value.startswith("file:"):
        return "file://" + os.path.abspath(path)
    if value.startswith("sqlite:///"):
        return "sqlite:///" + os.path.abspath(path)
    return os.path.abspath(path)

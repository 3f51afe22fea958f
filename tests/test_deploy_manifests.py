"""The deployment files: KubeRay manifests (strictly valid against the v1.7 CRDs, the promised image, an
entrypoint that the configuration accepts and that fits the cluster, nothing exposed) and the Dockerfile.
No Ray, no Kubernetes: everything is read from deploy/, configs/ and the CRDs."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml

from orchestration.config import Config, ConfigError, config_dir, load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
RAY_KINDS = ("RayCluster", "RayJob")
GROUPS = ("algorithm", "model", "cluster")  # config groups: configs/<group>/<name>.yaml


def _load_validator():
    spec = importlib.util.spec_from_file_location("validate_manifests", DEPLOY / "validate_manifests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vm = _load_validator()
needs_crds = pytest.mark.skipif(vm.find_crd_dir() is None, reason="KubeRay CRDs not found (shared/schemas/kuberay)")


def _yaml_files() -> list[Path]:
    return sorted(p for pattern in ("*.yaml", "*.yml") for p in DEPLOY.rglob(pattern))


def _all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in _yaml_files() for d in yaml.safe_load_all(p.read_text()) if isinstance(d, dict)]


def _ray_docs(kind: str | None = None) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _all_docs() if d.get("kind") in ((kind,) if kind else RAY_KINDS)]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _version() -> str:
    project = re.search(r"^\[project\]$(.*?)(?=^\[|\Z)", (ROOT / "pyproject.toml").read_text(), re.M | re.S).group(1)
    return re.search(r'^version\s*=\s*"([^"]+)"', project, re.M).group(1)


def _dockerfile_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)", DOCKERFILE.read_text(), re.M).group(1)


def _walk(node, key: str):
    """Every value stored under `key` anywhere below `node`."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


# --- (a) every RayCluster / RayJob under deploy/ is valid ------------------------------------------------

def test_deploy_has_both_manifests():
    kinds = {d["kind"] for _, d in _ray_docs()}
    assert kinds == set(RAY_KINDS), f"expected a RayCluster and a RayJob under deploy/, found {kinds}"


@needs_crds
@pytest.mark.parametrize("path", sorted({p for p, _ in _ray_docs()}), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_validates(path):
    assert vm.validate_file(path) == []


@needs_crds
def test_cli_exit_codes(tmp_path, capsys):
    good = [str(p) for p in sorted({p for p, _ in _ray_docs()})]
    assert vm.main(good) == 0
    doc = copy.deepcopy(_ray_docs("RayCluster")[0][1])
    doc["spec"]["workerGroupSpecs"][0]["replicass"] = 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}, doc]))
    assert vm.main([str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}#1 (RayCluster selfreward): spec.workerGroupSpecs[0].replicass: unknown field" in err


# --- (b) planted errors are caught, naming the path --------------------------------------------------------

def _planted(kind: str, mutate) -> tuple[list[str], str]:
    doc = copy.deepcopy(_ray_docs(kind)[0][1])
    prefix = "spec." if kind == "RayCluster" else "spec.rayClusterSpec."
    mutate(_cluster_spec(doc))
    return vm.validate_document(doc), prefix


def _del(d: dict, key: str) -> None:
    del d[key]


PLANTED = {
    # name: (mutation of the cluster spec, path below the cluster spec, part of the reason)
    "unknown field": (lambda s: s["workerGroupSpecs"][0].update(replicass=2),
                      "workerGroupSpecs[0].replicass", "unknown field"),
    "wrong type": (lambda s: s["workerGroupSpecs"][1].update(replicas="two"),
                   "workerGroupSpecs[1].replicas", "expected integer, got string 'two'"),
    "container without name": (lambda s: _del(s["workerGroupSpecs"][2]["template"]["spec"]["containers"][0], "name"),
                               "workerGroupSpecs[2].template.spec.containers[0].name", "required field is missing"),
    "group without groupName": (lambda s: _del(s["workerGroupSpecs"][0], "groupName"),
                                "workerGroupSpecs[0].groupName", "required field is missing"),
    "head without template": (lambda s: _del(s["headGroupSpec"], "template"),
                              "headGroupSpec.template", "required field is missing"),
    "unquoted rayStartParams": (lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
                                "headGroupSpec.rayStartParams.num-gpus", "expected string, got integer"),
    "fractional GPU quantity": (
        lambda s: s["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
            {"nvidia.com/gpu": 1.5}),
        'workerGroupSpecs[1].template.spec.containers[0].resources.limits["nvidia.com/gpu"]',
        "expected an integer or a string"),
    "bad quantity string": (
        lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
            memory="64 GB"),
        "workerGroupSpecs[0].template.spec.containers[0].resources.limits.memory", "does not match the pattern"),
    "unknown pod field": (lambda s: s["workerGroupSpecs"][0]["template"]["spec"].update(nodeSelectors={}),
                          "workerGroupSpecs[0].template.spec.nodeSelectors", "unknown field"),
    "null value": (lambda s: s["headGroupSpec"].update(serviceType=None),
                   "headGroupSpec.serviceType", "null is not allowed"),
}


@needs_crds
@pytest.mark.parametrize("kind", RAY_KINDS)
@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_error_is_reported_with_its_path(kind, name):
    mutate, path, reason = PLANTED[name]
    errors, prefix = _planted(kind, mutate)
    assert any(e.startswith(f"{prefix}{path}: ") and reason in e for e in errors), errors
    assert len(errors) == 1, errors  # only the planted error: the rest of the manifest is still valid


@needs_crds
def test_top_level_errors():
    doc = copy.deepcopy(_ray_docs("RayJob")[0][1])
    assert vm.validate_document({**doc, "apiVersion": "ray.io/v1alpha1"}) == [
        "apiVersion: 'ray.io/v1alpha1' must be 'ray.io/v1' for RayJob"]
    assert any(e.startswith("kind: 'RayJobs'") for e in vm.validate_document({**doc, "kind": "RayJobs"}))
    no_name = {**doc, "metadata": {"labels": {"a": "b"}}}
    assert vm.validate_document(no_name) == ["metadata.name: required field is missing (a non-empty string)"]
    assert vm.validate_document({**doc, "spec": {**doc["spec"], "entrypoint": ["python"]}}) == [
        "spec.entrypoint: expected string, got array ['python']"]
    assert vm.validate_document({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}) is None


def test_validator_schema_rules_without_crds():
    """The rules themselves, on a small hand-written schema (runs even where the CRDs are absent)."""
    schema = {"type": "object", "required": ["name", "size"], "properties": {
        "name": {"type": "string", "enum": ["a", "b"]},
        "size": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
        "count": {"type": "integer", "default": 1, "format": "int32"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "items": {"type": "array", "items": {"type": "object", "required": ["k"], "properties": {"k": {"type": "boolean"}}}},
    }}

    def errors(value):
        out: list[str] = []
        vm.check(value, schema, "", out)
        return out

    assert errors({"name": "a", "size": "1Gi", "labels": {"x": "y"}, "free": {"any": [1, {"thing": None}]},
                   "items": [{"k": True}]}) == []
    assert errors({"name": "c", "size": 1.5, "count": True, "labels": {"x": 1}, "items": [{}], "zz": 0}) == [
        "name: 'c' is not one of ['a', 'b']",
        "size: expected an integer or a string, got number 1.5",
        "count: expected integer, got boolean True",
        "labels.x: expected string, got integer 1",
        "items[0].k: required field is missing",
        "zz: unknown field (not in the schema of the document)",
    ]
    assert errors({"size": 1, "count": 2**31}) == ["name: required field is missing",
                                                     "count: 2147483648 is out of the int32 range"]


# --- (c) the image --------------------------------------------------------------------------------------------

def test_the_image_copies_every_package_the_project_installs():
    import tomllib

    root = DOCKERFILE.parents[2]
    include = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    copied = set(re.findall(r"^COPY (\S+) \./\1$", DOCKERFILE.read_text(), flags=re.M))
    assert packages <= copied, f"the Dockerfile does not copy {sorted(packages - copied)}"
    assert all((root / p / "__init__.py").is_file() for p in packages)


def test_every_container_runs_the_promised_image():
    tag = f"selfreward:{_version()}"
    assert DOCKERFILE.is_file()
    assert f"-t {tag} ." in DOCKERFILE.read_text(), "the Dockerfile's build command names another tag"
    assert f"-t {tag} ." in (DEPLOY / "docker" / "README.md").read_text()
    images = []
    for path, doc in _ray_docs():
        for key in ("containers", "initContainers"):
            for containers in _walk(doc, key):
                images += [(path.name, c.get("image")) for c in containers]
    assert len(images) >= 2 * 4, images  # head + 3 worker groups in each manifest
    wrong = [(f, i) for f, i in images if not (i == tag or str(i).endswith("/" + tag))]
    assert not wrong, f"containers not on {tag} (a registry prefix is fine): {wrong}"


def test_ray_version_matches_the_image():
    ray_version = _dockerfile_arg("RAY_VERSION")
    for path, doc in _ray_docs():
        assert _cluster_spec(doc)["rayVersion"] == ray_version, f"{path.name}: rayVersion != Dockerfile RAY_VERSION"


def test_dockerfile_keeps_base_torch_and_defaults():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\$\{PYTORCH_TAG\}$", text, re.M)
    for arg in ("PYTORCH_TAG", "RAY_VERSION", "TRANSFORMERS_VERSION", "MEGATRON_CORE_VERSION", "TENSORRT_LLM_VERSION"):
        assert _dockerfile_arg(arg)
    assert _dockerfile_arg("INSTALL_MEGATRON") == "0" and _dockerfile_arg("INSTALL_TRTLLM") == "0"
    assert "pip install --no-deps ." in text and "PIP_CONSTRAINT" in text
    assert not re.search(r"pip install[^\n]*[\s\"']torch[\s=<>\"']", text), "the Dockerfile must not install torch"
    assert re.search(r"^WORKDIR /opt/selfreward$", text, re.M)
    assert re.search(r"^ENV RAY_USAGE_STATS_ENABLED=0", text, re.M)
    assert text.rstrip().endswith('CMD ["python", "-m", "orchestration.main", "--help"]')


# --- (d) the RayJob's entrypoint ---------------------------------------------------------------------------

def _is_config_key(key: str) -> bool:
    """`key` is a leaf of the Config dataclass tree (a whole section cannot be set from the command line)."""
    node = Config
    for part in key.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return False
        node = hints[part]
    return not dataclasses.is_dataclass(node)


def _overrides(doc: dict) -> list[str]:
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "orchestration.main"], argv[:3]
    return argv[3:]


def test_config_key_walk():
    assert _is_config_key("cluster.generators.num_gpus") and _is_config_key("output_dir")
    assert not _is_config_key("cluster.generators.num_gpu") and not _is_config_key("cluster.generators")
    assert not _is_config_key("cluster.learner.replicas")


@pytest.mark.parametrize("path,doc", _ray_docs("RayJob"), ids=lambda v: getattr(v, "name", ""))
def test_entrypoint_overrides_are_real_configuration(path, doc, tmp_path):
    assert importlib.util.find_spec("orchestration.main") is not None
    overrides = _overrides(doc)
    for item in overrides:
        key, sep, value = item.partition("=")
        assert sep and value and not key.startswith(("+", "~")), f"{item!r} is not a plain key=value override"
        if key in GROUPS:
            assert (config_dir() / key / f"{value}.yaml").is_file(), f"{item}: no configs/{key}/{value}.yaml"
        else:
            assert _is_config_key(key), f"{item}: {key} is not a configuration key (orchestration/config.py)"
    assert "cluster.address=auto" in overrides  # join the RayJob's cluster, never start a local one
    # The whole command line through the real loader (types, choices, batch divisibility), with model.path
    # pointed at a stand-in checkpoint: the real one lives on the cluster's PVC.
    (tmp_path / "config.json").write_text("{}")
    local = [f"model.path={tmp_path}" if o.startswith("model.path=") else o for o in overrides]
    try:
        load_config(local)
    except ConfigError as e:
        pytest.fail(f"{path.name}: the entrypoint's configuration is refused: {e}")


def _per_pod(group: dict, resource: str) -> float:
    """What one pod of a worker group gives Ray: its containers' limits ("8", "500m" or 4)."""
    total = 0.0
    for c in group["template"]["spec"]["containers"]:
        q = str(c.get("resources", {}).get("limits", {}).get(resource, 0))
        total += float(q[:-1]) / 1000 if q.endswith("m") else float(q)
    return total


@pytest.mark.parametrize("path,doc", _ray_docs("RayJob"), ids=lambda v: getattr(v, "name", ""))
def test_pools_fit_the_worker_groups(path, doc, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cfg = load_config([f"model.path={tmp_path}" if o.startswith("model.path=") else o for o in _overrides(doc)])
    spec = doc["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["rayStartParams"]
    assert head.get("num-gpus") == "0" and head.get("num-cpus") == "0", "no actor may land on the head"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    c = cfg.cluster
    pools = {"generators": (c.generators.replicas, c.generators.num_gpus, c.generators.num_cpus),
             "learner": (c.learner.workers, c.learner.num_gpus, c.learner.num_cpus)}
    if cfg.algorithm.name in ("self_rewarding", "meta_rewarding"):  # the algorithms with a judge pool
        pools["judges"] = (c.judges.replicas, c.judges.num_gpus, c.judges.num_cpus)
    assert all(p[1] > 0 for p in pools.values()), f"a pool without GPUs on a GPU cluster: {pools}"
    for name, (count, *per_actor) in pools.items():
        group = groups.get(name)
        assert group is not None, f"no worker group named {name!r} for cluster.{name}"
        assert group.get("minReplicas", 0) <= group["replicas"] <= group.get("maxReplicas", 2**31 - 1)
        pods = group["replicas"] * group.get("numOfHosts", 1)
        for resource, asked in zip(("nvidia.com/gpu", "cpu"), per_actor):
            per_pod = _per_pod(group, resource)
            assert asked <= per_pod, f"one {name} actor asks {asked} {resource}; a {name} pod has {per_pod}"
            assert count * asked <= pods * per_pod, f"{name}: {count} x {asked} {resource} > {pods} x {per_pod}"


def test_rayjob_cluster_is_the_raycluster_layout():
    (cluster,), (job,) = _ray_docs("RayCluster"), _ray_docs("RayJob")
    assert job[1]["spec"]["rayClusterSpec"] == cluster[1]["spec"], (
        "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml's spec: keep the two layouts equal")


def test_rayjob_lifecycle():
    (_, job), = _ray_docs("RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode" and spec["backoffLimit"] >= 1
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and all(isinstance(v, str) for v in env.values())


# --- (e) nothing exposed outside the cluster -------------------------------------------------------------------

def _exposure_problems(docs: list[tuple[str, dict]]) -> list[str]:
    problems = []
    for name, doc in docs:
        kind = doc.get("kind")
        if kind in ("Ingress", "Route", "Gateway", "HTTPRoute"):
            problems.append(f"{name}: a {kind}")
        if kind == "Service" and doc.get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"{name}: a Service of type {doc['spec']['type']}")
        if kind in RAY_KINDS:
            head = _cluster_spec(doc).get("headGroupSpec", {})
            if head.get("serviceType", "ClusterIP") != "ClusterIP":
                problems.append(f"{name}: headGroupSpec.serviceType {head['serviceType']}")
            if head.get("enableIngress"):
                problems.append(f"{name}: headGroupSpec.enableIngress")
            if (head.get("headService") or {}).get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
                problems.append(f"{name}: headGroupSpec.headService of type {head['headService']['spec']['type']}")
        if any(v is True for v in _walk(doc, "hostNetwork")) or any(True for _ in _walk(doc, "hostPort")):
            problems.append(f"{name}: hostNetwork / hostPort")
    return problems


def test_nothing_is_exposed():
    assert _exposure_problems([(p.name, d) for p, d in _all_docs()]) == []


def test_exposure_check_catches_planted_exposure():
    (_, cluster), = _ray_docs("RayCluster")
    lb = copy.deepcopy(cluster)
    lb["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    host = copy.deepcopy(cluster)
    host["spec"]["workerGroupSpecs"][0]["template"]["spec"]["hostNetwork"] = True
    planted = [("lb", lb), ("host", host),
               ("svc", {"kind": "Service", "spec": {"type": "NodePort"}}), ("ing", {"kind": "Ingress"})]
    assert _exposure_problems(planted) == ["lb: headGroupSpec.serviceType LoadBalancer", "host: hostNetwork / hostPort",
                                           "svc: a Service of type NodePort", "ing: a Ingress"]

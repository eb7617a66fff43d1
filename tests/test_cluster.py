"""Offline checks of everything under cluster/ (no cluster, no Docker, no network; a few seconds).

- KubeRay manifests (cluster/kuberay/*.yaml, multi-document aware) validate against the CRD
  schemas the API server applies (``spec.versions[].schema.openAPIV3Schema``, vendored in
  cluster/kuberay/schemas/), read the way a Kubernetes API server reads them: unknown fields are
  errors (kubectl's default ``--validate=strict``), ``nullable``, ``x-kubernetes-int-or-string``,
  ``x-kubernetes-list-type`` (map keys / set items unique), ``int32``/``int64`` ranges, and the CRDs'
  CEL rules (``x-kubernetes-validations``, the handful there are, transcribed);
- the checks the KubeRay operator and Pod validation add (names, cron schedule, TTL vs shutdown,
  requests <= limits, GPUs requests == limits, ...), and the project's own rules (CPU-only head,
  autoscaling GPU group, image and env consistent with cluster/Dockerfile, no inline credentials);
- the cluster-launcher YAML validates against Ray's own ``ray-schema.json`` (found in the
  installed ray package) and passes Ray's ``prepare_config``/``validate_config`` (what ``ray up``
  does before it calls the cloud);
- every ``python jobs/X.py ...`` named in cluster/ accepts the flags it is given (``--help`` of
  the real script), and a manifest's entrypoint gives every required flag;
- cluster/Dockerfile pins the torch/torchvision/ray/python versions of pyproject.toml;
- cluster/runtime_env.yaml is a valid Ray runtime env whose working_dir upload stays small.

Each validator is shown to reject a broken input, so a pass means something.
"""

from __future__ import annotations

import copy
import functools
import gzip
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import zoneinfo
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
from jsonschema import Draft4Validator, FormatChecker, ValidationError, validators  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
SCHEMAS = KUBERAY / "schemas"
LAUNCHER = CLUSTER / "launcher" / "lumbar-ray-gpu.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
DOCKERIGNORE = CLUSTER / "Dockerfile.dockerignore"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
CLUSTER_README = CLUSTER / "README.md"
# The original CRDs, when the checkout sits next to the shared folder (the vendored copies must match).
SHARED_CRDS = REPO.parent / "shared" / "kuberay_crds"

CRD_KINDS = ("RayCluster", "RayJob", "RayCronJob")
SECRET_NAME = "lumbar-ray-s3"
REQUIRED_ENV = ("YOLO_OFFLINE", "YOLO_CONFIG_DIR", "RAY_DISABLE_USAGE_STATS", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "LUMBAR_RAY_S3_ENDPOINT")
# Env vars that must come from a Secret: every AWS_* one, and anything that names a secret.
SECRET_ENV_RE = re.compile(r"^AWS_|SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
# Keys whose values are themselves secret (an example Secret may only hold placeholders for them).
SECRET_VALUE_RE = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
# An AWS access key id (long-term AKIA / temporary ASIA) anywhere in cluster/ is a leak.
AWS_KEY_ID_RE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_manifests() -> list[tuple[str, dict]]:
    """(label "file#index", document) for every non-empty YAML document in cluster/kuberay/*.y*ml."""
    out = []
    files = sorted([*KUBERAY.glob("*.yaml"), *KUBERAY.glob("*.yml")])
    for path in files:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append((f"{path.name}#{i}", doc))
    return out


@functools.lru_cache(maxsize=None)
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(name: str) -> str:
    """The exact ``==`` pin of a dependency in pyproject.toml."""
    for dep in pyproject()["project"]["dependencies"]:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(\[[^\]]*\])?\s*==\s*([^;\s,]+)", dep)
        if m and m.group(1).lower().replace("_", "-") == name.lower():
            return m.group(3)
    raise AssertionError(f"{name} is not pinned with == in pyproject.toml")


def expected_image() -> str:
    return f"lumbar-ray:{pyproject()['project']['version']}"


# --------------------------------------------------------------------------------------------
# The CRD schemas, read as an API server reads them
# --------------------------------------------------------------------------------------------

def _vendored_schema(kind: str) -> dict:
    return json.loads(gzip.decompress((SCHEMAS / f"{kind.lower()}.schema.json.gz").read_bytes()))


# CEL rules found in the KubeRay CRDs, transcribed (evaluated on object creation). A rule not in
# this table fails validation loudly instead of being skipped.
CEL_RULES: dict[str, Callable[[Any], bool]] = {
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))":
        lambda s: not ("jobStatus" in s and "jobDeploymentStatus" in s),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)":
        lambda s: "jobStatus" in s or "jobDeploymentStatus" in s,
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))":
        lambda s: not (("onSuccess" in s or "onFailure" in s) and "deletionRules" in s),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))":
        lambda s: ("onSuccess" in s and "onFailure" in s) or "deletionRules" in s,
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']":
        lambda s: s in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"),
}
# Transition rules compare with the previous object: they never apply to a create.
CEL_TRANSITION_RULES = {"self == oldSelf"}

DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# ObjectMeta as a manifest may carry it (the CRD only says `type: object`; the API server
# validates it as ObjectMeta).
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN},
        "namespace": {"type": "string", "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}


def k8s_to_jsonschema(node: Any) -> Any:
    """A CRD's structural OpenAPI v3 schema -> a JSON Schema (Draft 4 + our keywords) that rejects
    what the API server rejects: unknown fields (strict field validation, kubectl's default),
    null where not ``nullable``, non-int-or-string where ``x-kubernetes-int-or-string``."""
    if isinstance(node, list):
        return [k8s_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: k8s_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = k8s_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = k8s_to_jsonschema(value)
        else:
            out[key] = value
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _list_type(validator, list_type, instance, schema) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield ValidationError(f"duplicate item {item!r} in a list of type 'set'")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                yield ValidationError(f"duplicate entry for key {dict(zip(keys, key))} in a list of type 'map'")
            seen.add(key)


def _cel(validator, rules, instance, schema) -> Iterator[ValidationError]:
    for rule in rules:
        expr = rule["rule"]
        if expr in CEL_TRANSITION_RULES:
            continue
        check = CEL_RULES.get(expr)
        if check is None:
            yield ValidationError(f"CEL rule not transcribed in tests/test_cluster.py: {expr}")
        elif not check(instance):
            yield ValidationError(rule.get("message", f"failed CEL rule {expr}"))


KubeValidator = validators.extend(
    Draft4Validator, {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel}
)

K8S_FORMATS = FormatChecker(formats=())


@K8S_FORMATS.checks("int32")
def _int32(value: Any) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@K8S_FORMATS.checks("int64")
def _int64(value: Any) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str):
    entry = _vendored_schema(kind)
    schema = k8s_to_jsonschema(entry["openAPIV3Schema"])
    schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata", "spec"})
    props = schema["properties"]
    props["apiVersion"] = {"enum": [f"{entry['group']}/{entry['version']}"]}
    props["kind"] = {"enum": [entry["kind"]]}
    props["metadata"] = OBJECT_META
    props["status"] = {"not": {}}  # status is the operator's; a manifest that carries one is a copy of a live object
    return KubeValidator(schema, format_checker=K8S_FORMATS)


SECRET_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"enum": ["v1"]},
        "kind": {"enum": ["Secret"]},
        "metadata": OBJECT_META,
        "type": {"type": "string"},
        "immutable": {"type": "boolean"},
        "stringData": STRING_MAP,
        "data": {"type": "object", "additionalProperties": {"type": "string", "pattern": r"^[A-Za-z0-9+/=]*$"}},
    },
}


def schema_errors(doc: dict) -> list[str]:
    """Why the API server would refuse this manifest (empty list: it would admit it)."""
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind in CRD_KINDS:
        validator = crd_validator(kind)
    elif kind == "Secret":
        validator = KubeValidator(SECRET_SCHEMA)
    else:
        return [f"unexpected kind {kind!r}: cluster/kuberay holds {', '.join(CRD_KINDS)} and Secret manifests"]
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


# --------------------------------------------------------------------------------------------
# What the KubeRay operator and Pod validation add
# --------------------------------------------------------------------------------------------

DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# KubeRay: RayCluster names <= 53; a RayJob's cluster appends 6 characters; a RayCronJob's RayJobs
# append "-" + 5 random characters.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 41}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
RAY_START_RESOURCE_KEYS = ("num-cpus", "num-gpus", "memory", "resources")

_QUANTITY_SUFFIX = {
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60), "n": Decimal("1e-9"), "u": Decimal("1e-6"),
    "m": Decimal("1e-3"), "": Decimal(1), "k": Decimal(10**3), "M": Decimal(10**6),
    "G": Decimal(10**9), "T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18),
}


def quantity(value: Any) -> Decimal:
    """A Kubernetes resource quantity ("500m", "16Gi", 4, "1e3") as a number."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, (int, float)):
        return Decimal(str(value))
    m = re.fullmatch(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]))?", str(value))
    if not m:
        raise ValueError(f"not a quantity: {value!r}")
    number = Decimal(m.group(1) + (m.group(2) or ""))
    return number * _QUANTITY_SUFFIX[m.group(3) or ""]


def pod_specs(node: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every Pod spec (a mapping with a ``containers`` list) inside a manifest."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield path, node
            return
        for key, value in node.items():
            yield from pod_specs(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from pod_specs(value, f"{path}/{i}")


def pod_errors(path: str, spec: dict) -> list[str]:
    """What Pod validation would refuse when the operator creates these pods."""
    errors = []
    containers = [*spec.get("initContainers", []), *spec.get("containers", [])]
    names = [c.get("name") for c in containers]
    if len(set(names)) != len(names):
        errors.append(f"{path}: duplicate container names {names}")
    volumes = {v.get("name") for v in spec.get("volumes", [])}
    for c in containers:
        where = f"{path}/containers[{c.get('name')}]"
        for mount in c.get("volumeMounts", []):
            if mount.get("name") not in volumes:
                errors.append(f"{where}: volumeMount {mount.get('name')!r} has no volume")
        res = c.get("resources", {})
        requests, limits = res.get("requests", {}), res.get("limits", {})
        for name in {*requests, *limits}:
            try:
                req = quantity(requests[name]) if name in requests else None
                lim = quantity(limits[name]) if name in limits else None
            except ValueError as e:
                errors.append(f"{where}: {name}: {e}")
                continue
            extended = "/" in name and not name.startswith(("kubernetes.io/", "requests.", "hugepages-"))
            if extended and (req != lim or lim is None or lim != lim.to_integral_value()):
                errors.append(f"{where}: {name} (an extended resource) needs integer requests == limits, "
                              f"got {requests.get(name)!r} / {limits.get(name)!r}")
            elif req is not None and lim is not None and req > lim:
                errors.append(f"{where}: {name} request {requests[name]!r} exceeds limit {limits[name]!r}")
        for env in c.get("env", []):
            if not re.fullmatch(r"[-._a-zA-Z][-._a-zA-Z0-9]*", str(env.get("name", ""))):
                errors.append(f"{where}: invalid env var name {env.get('name')!r}")
            if "value" in env and "valueFrom" in env:
                errors.append(f"{where}: env {env['name']} has both value and valueFrom")
    return errors


_CRON_FIELDS = (  # (name, low, high, names)
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {m: i + 1 for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"])}),
    ("day of week", 0, 6, {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}),
)
_CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def cron_errors(schedule: str) -> list[str]:
    """robfig/cron's ParseStandard (what KubeRay uses): 5 fields, or a descriptor; TZ= prefix allowed."""
    spec = schedule.strip()
    if spec.startswith(("TZ=", "CRON_TZ=")):
        tz, _, spec = spec.partition(" ")
        try:
            zoneinfo.ZoneInfo(tz.split("=", 1)[1])
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            return [f"unknown time zone in {tz!r}"]
        spec = spec.strip()
    if spec.startswith("@"):
        if spec in _CRON_DESCRIPTORS or re.fullmatch(r"@every \d+(\.\d+)?(ns|us|ms|s|m|h)(\d+(\.\d+)?(ns|us|ms|s|m|h))*", spec):
            return []
        return [f"unknown cron descriptor {spec!r}"]
    fields = spec.split()
    if len(fields) != 5:
        return [f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}: {schedule!r}"]
    errors = []
    for text, (name, low, high, names) in zip(fields, _CRON_FIELDS):
        for part in text.split(","):
            m = re.fullmatch(r"(\*|\?|[A-Za-z0-9]+)(?:-([A-Za-z0-9]+))?(?:/(\d+))?", part)
            if not m or (m.group(1) == "?" and name not in ("day of month", "day of week")):
                errors.append(f"{name}: cannot parse {part!r}")
                continue

            def value(token: str) -> int | None:
                v = names.get(token.lower()) if not token.isdigit() else int(token)
                return v if v is not None and low <= v <= high else None

            start, end, step = m.group(1), m.group(2), m.group(3)
            if start not in ("*", "?"):
                if value(start) is None or (end is not None and value(end) is None):
                    errors.append(f"{name}: {part!r} outside {low}-{high}")
                elif end is not None and value(end) < value(start):
                    errors.append(f"{name}: empty range {part!r}")
            elif end is not None:
                errors.append(f"{name}: cannot parse {part!r}")
            if step is not None and int(step) == 0:
                errors.append(f"{name}: step 0 in {part!r}")
    return errors


def ray_cluster_spec_errors(where: str, spec: dict) -> list[str]:
    """utils.ValidateRayClusterSpec of the KubeRay operator (the parts that apply to a new object)."""
    errors = []
    groups = [("head", spec.get("headGroupSpec", {}))] + [
        (g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", [])]
    names = [name for name, _ in groups[1:]]
    if len(set(names)) != len(names):
        errors.append(f"{where}: duplicate worker groupName in {names}")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    v2 = autoscaling and spec.get("autoscalerOptions", {}).get("version") == "v2"
    for name, group in groups:
        pod = group.get("template", {}).get("spec", {})
        if not pod.get("containers"):
            errors.append(f"{where}: group {name} has no container")
        params = group.get("rayStartParams", {})
        if any(params.get(k) for k in RAY_START_RESOURCE_KEYS) and group.get("resources"):
            errors.append(f"{where}: group {name} sets resources in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{where}: group {name}: rayStartParams['labels'] is not supported (use labels)")
        if v2 and pod.get("restartPolicy") not in (None, "", "Never"):
            errors.append(f"{where}: group {name}: restartPolicy must be Never or unset with autoscaler v2")
        if name != "head":
            lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            if lo > hi:
                errors.append(f"{where}: group {name}: minReplicas {lo} > maxReplicas {hi}")
            if "replicas" in group and not lo <= group["replicas"] <= hi:
                errors.append(f"{where}: group {name}: replicas {group['replicas']} outside [{lo}, {hi}]")
            if autoscaling and group.get("suspend"):
                errors.append(f"{where}: group {name} cannot be suspended with the autoscaler on")
    return errors


def ray_job_spec_errors(where: str, spec: dict) -> list[str]:
    """utils.ValidateRayJobSpec of the KubeRay operator."""
    errors = []
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    if spec.get("suspend") and not shutdown:
        errors.append(f"{where}: suspend needs shutdownAfterJobFinishes")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        errors.append(f"{where}: ttlSecondsAfterFinished must be >= 0")
    if ttl > 0 and not shutdown:
        errors.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    selector = spec.get("clusterSelector") or {}
    if not spec.get("rayClusterSpec") and not selector:
        errors.append(f"{where}: one of rayClusterSpec or clusterSelector must be set")
    if selector and not selector.get("ray.io/cluster"):
        errors.append(f"{where}: clusterSelector needs the ray.io/cluster key")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        errors.append(f"{where}: unknown submissionMode {mode!r}")
    if selector and mode == "SidecarMode":
        errors.append(f"{where}: clusterSelector is not supported in SidecarMode")
    if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        errors.append(f"{where}: backoffLimit is incompatible with InteractiveMode")
    if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
        errors.append(f"{where}: activeDeadlineSeconds must be > 0")
    if spec.get("backoffLimit", 0) < 0:
        errors.append(f"{where}: backoffLimit must be >= 0")
    if not str(spec.get("entrypoint", "")).strip():
        errors.append(f"{where}: empty entrypoint")
    try:
        runtime_env = _yaml_load(spec.get("runtimeEnvYAML") or "{}")
        if not isinstance(runtime_env, dict):
            errors.append(f"{where}: runtimeEnvYAML is not a mapping")
    except yaml.YAMLError as e:
        errors.append(f"{where}: runtimeEnvYAML is not YAML: {e}")
    if spec.get("rayClusterSpec"):
        errors += ray_cluster_spec_errors(f"{where}/rayClusterSpec", spec["rayClusterSpec"])
    return errors


def operator_errors(doc: dict) -> list[str]:
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name", "")
    errors = []
    if kind in MAX_NAME:
        if not DNS1035_LABEL.match(name) or len(name) > MAX_NAME[kind]:
            errors.append(f"{kind} name {name!r} must be a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    spec = doc.get("spec", {})
    if kind == "RayCluster":
        errors += ray_cluster_spec_errors("spec", spec)
    elif kind == "RayJob":
        errors += ray_job_spec_errors("spec", spec)
    elif kind == "RayCronJob":
        schedule = spec.get("schedule", "")
        if spec.get("timeZone"):
            schedule = f"TZ={spec['timeZone']} {schedule}"
        errors += [f"spec/schedule: {e}" for e in cron_errors(schedule)]
        errors += ray_job_spec_errors("spec/jobTemplate", spec.get("jobTemplate") or {})
    for path, pod in pod_specs(doc):
        errors += pod_errors(path, pod)
    return errors


def credential_errors(doc: Any) -> list[str]:
    """Credentials must come from a Secret (env valueFrom.secretKeyRef), never inline."""
    errors = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            env = node.get("env")
            if isinstance(env, list):
                for var in env:
                    if not isinstance(var, dict):
                        continue
                    name = str(var.get("name", ""))
                    if SECRET_ENV_RE.search(name):
                        if "value" in var or "secretKeyRef" not in (var.get("valueFrom") or {}):
                            errors.append(f"{path}/env/{name}: a credential must use valueFrom.secretKeyRef")
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(doc, "")
    return errors


# --------------------------------------------------------------------------------------------
# KubeRay manifests
# --------------------------------------------------------------------------------------------

MANIFESTS = load_manifests()
MANIFEST_IDS = [label for label, _ in MANIFESTS]


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in MANIFESTS if doc.get("kind") == kind]


def cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) of every Ray cluster the manifests create."""
    out = []
    for label, doc in MANIFESTS:
        spec = doc.get("spec", {})
        if doc.get("kind") == "RayCluster":
            out.append((label, spec))
        elif doc.get("kind") == "RayJob" and spec.get("rayClusterSpec"):
            out.append((label, spec["rayClusterSpec"]))
        elif doc.get("kind") == "RayCronJob" and (spec.get("jobTemplate") or {}).get("rayClusterSpec"):
            out.append((label, spec["jobTemplate"]["rayClusterSpec"]))
    return out


def job_specs() -> list[tuple[str, dict]]:
    """(where, RayJob spec) of every job the manifests submit (RayJobs and RayCronJob templates)."""
    out = []
    for label, doc in MANIFESTS:
        if doc.get("kind") == "RayJob":
            out.append((label, doc["spec"]))
        elif doc.get("kind") == "RayCronJob":
            out.append((label, doc["spec"]["jobTemplate"]))
    return out


def test_every_kind_is_there():
    kinds = sorted(doc.get("kind") for _, doc in MANIFESTS)
    assert {*CRD_KINDS, "Secret"} <= set(kinds), kinds
    for label, doc in MANIFESTS:
        assert isinstance(doc, dict) and doc.get("kind") in (*CRD_KINDS, "Secret"), label


@pytest.mark.parametrize("label", MANIFEST_IDS)
def test_manifest_matches_crd_schema(label):
    doc = dict(MANIFESTS)[label]
    assert schema_errors(doc) == []


@pytest.mark.parametrize("label", MANIFEST_IDS)
def test_manifest_passes_operator_and_pod_validation(label):
    doc = dict(MANIFESTS)[label]
    assert operator_errors(doc) == []


@pytest.mark.parametrize("label", MANIFEST_IDS)
def test_no_inline_credentials(label):
    doc = dict(MANIFESTS)[label]
    assert credential_errors(doc) == []


def test_vendored_schemas_cover_every_cel_rule():
    """A CRD update that brings a new CEL rule must be transcribed (or the tests would pass blindly)."""
    found = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations", []):
                found.add(rule["rule"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for kind in CRD_KINDS:
        walk(_vendored_schema(kind)["openAPIV3Schema"])
    assert found, "no CEL rules found: the schema files are not what they should be"
    assert found <= set(CEL_RULES) | CEL_TRANSITION_RULES, found - set(CEL_RULES) - CEL_TRANSITION_RULES


@pytest.mark.skipif(not SHARED_CRDS.is_dir(), reason="../shared/kuberay_crds not next to this checkout")
def test_vendored_schemas_equal_the_crds():
    spec = importlib.util.spec_from_file_location("make_schemas", SCHEMAS / "make_schemas.py")
    make_schemas = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_schemas)
    for name in make_schemas.CRD_FILES:
        entry = make_schemas.extract(_yaml_load((SHARED_CRDS / name).read_text()))
        assert entry == _vendored_schema(entry["kind"]), f"{name}: re-run cluster/kuberay/schemas/make_schemas.py"


# The validation can fail: each broken copy of a real manifest is refused, for the stated reason.
def _doc(kind: str) -> dict:
    return copy.deepcopy(by_kind(kind)[0])


def _set(doc: dict, path: str, value: Any) -> dict:
    """Set (or with _DELETE remove) the value at a "/"-separated path ("~1" stands for a "/" in a key)."""
    *parents, last = [part.replace("~1", "/") for part in path.split("/")]
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DELETE:
        del node[int(last) if isinstance(node, list) else last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return doc


_DELETE = object()
_GPU = "spec/workerGroupSpecs/0"
_HEAD_C = "spec/headGroupSpec/template/spec/containers/0"
_JOB_HEAD_C = "spec/rayClusterSpec/headGroupSpec/template/spec/containers/0"

SCHEMA_BREAKS = [
    ("RayCluster", f"{_GPU}/minReplicas", "0", "is not of type 'integer'"),
    ("RayCluster", f"{_GPU}/maxReplicas", 2**31, "is not a 'int32'"),
    ("RayCluster", f"{_GPU}/groupName", _DELETE, "'groupName' is a required property"),
    ("RayCluster", f"{_GPU}/minReplica", 0, "Additional properties are not allowed"),
    ("RayCluster", "spec/headGroupSpec/rayStartParams/num-cpus", 0, "is not of type 'string'"),
    ("RayCluster", f"{_HEAD_C}/resources/limits/memory", "lots", "does not match"),
    ("RayCluster", f"{_HEAD_C}/env/0/value", None, "is not of type 'string'"),
    ("RayCluster", f"{_HEAD_C}/env/1", {"name": "YOLO_OFFLINE", "value": "0"}, "duplicate entry"),
    ("RayCluster", f"{_HEAD_C}/name", _DELETE, "'name' is a required property"),
    ("RayCluster", "spec/autoscalerOptions/version", "v3", "is not one of"),
    ("RayCluster", "metadata/name", "Lumbar_Ray", "does not match"),
    ("RayCluster", "metadata/labels/app.kubernetes.io~1name", 1, "is not of type 'string'"),
    ("RayCluster", "apiVersion", "ray.io/v1alpha1", "is not one of"),
    ("RayJob", "spec/shutdownAfterJobFinishes", "true", "is not of type 'boolean'"),
    ("RayJob", "spec/deletionStrategy", {"onSuccess": {"policy": "DeleteCluster"}}, "requires either BOTH"),
    ("RayJob", "spec/managedBy", "someone-else", "managedBy field value must be"),
    ("RayJob", "status", {"jobStatus": "SUCCEEDED"}, "should not be valid"),
    ("RayCronJob", "spec/schedule", _DELETE, "'schedule' is a required property"),
    ("RayCronJob", "spec/timeZone", "", "non-empty"),
    ("RayCronJob", "spec/jobTemplate/backoffLimit", "1", "is not of type 'integer'"),
    ("Secret", "stringData/AWS_ACCESS_KEY_ID", 12345, "is not of type 'string'"),
]


@pytest.mark.parametrize("kind,path,value,reason", SCHEMA_BREAKS,
                         ids=[f"{k}:{p.split('/')[-1]}" for k, p, _, _ in SCHEMA_BREAKS])
def test_schema_validation_rejects_broken_manifest(kind, path, value, reason):
    doc = _set(_doc(kind), path, value)
    errors = schema_errors(doc)
    assert errors, f"{kind} with {path}={value!r} was accepted"
    assert any(reason in e for e in errors), errors


OPERATOR_BREAKS = [
    ("RayJob", "spec/shutdownAfterJobFinishes", False, "needs shutdownAfterJobFinishes"),
    ("RayJob", "spec/rayClusterSpec", _DELETE, "one of rayClusterSpec or clusterSelector"),
    ("RayJob", "spec/submissionMode", "BatchMode", "unknown submissionMode"),
    ("RayJob", "spec/runtimeEnvYAML", "working_dir: [", "not YAML"),
    ("RayJob", "spec/activeDeadlineSeconds", 0, "activeDeadlineSeconds must be > 0"),
    ("RayJob", "metadata/name", "lumbar-ray-score-" + "x" * 40, "at most 47"),
    ("RayJob", f"{_JOB_HEAD_C}/resources/requests/cpu", "64", "exceeds limit"),
    ("RayJob", "spec/rayClusterSpec/workerGroupSpecs/0/template/spec/containers/0/resources/limits/nvidia.com~1gpu",
     2, "requests == limits"),
    ("RayJob", f"{_JOB_HEAD_C}/volumeMounts/0/name", "nope", "has no volume"),
    ("RayJob", "spec/rayClusterSpec/headGroupSpec/template/spec/restartPolicy", "Always", "restartPolicy"),
    ("RayCluster", f"{_GPU}/minReplicas", 9, "minReplicas 9 > maxReplicas"),
    ("RayCluster", "spec/headGroupSpec/rayStartParams/labels", "a=b", "not supported"),
    ("RayCronJob", "spec/schedule", "0 2 * *", "expected 5 fields"),
    ("RayCronJob", "spec/schedule", "0 25 * * 0", "outside 0-23"),
    ("RayCronJob", "spec/timeZone", "Mars/Olympus_Mons", "unknown time zone"),
    ("RayCronJob", "metadata/name", "lumbar-ray-retrain-every-sunday-at-two-utc", "at most 41"),
]


@pytest.mark.parametrize("kind,path,value,reason", OPERATOR_BREAKS,
                         ids=[f"{k}:{p.split('/')[-1]}={v!r}"[:60] for k, p, v, _ in OPERATOR_BREAKS])
def test_operator_validation_rejects_broken_manifest(kind, path, value, reason):
    doc = _set(_doc(kind), path, value)
    errors = operator_errors(doc)
    assert any(reason in e for e in errors), errors


def test_credential_check_rejects_inline_secret():
    doc = _doc("RayCluster")
    env = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env[:] = [e for e in env if e["name"] != "AWS_SECRET_ACCESS_KEY"] + [
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}]
    assert any("AWS_SECRET_ACCESS_KEY" in e for e in credential_errors(doc))
    doc = _doc("RayJob")
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "AWS_SESSION_TOKEN", "valueFrom": {"configMapKeyRef": {"name": "x", "key": "y"}}}]
    assert credential_errors(doc)


def test_cron_parser():
    for good in ("0 2 * * 0", "*/15 * * * *", "0 3 * * sun", "30 1 1,15 * ?", "0 0 * JAN-MAR MON-FRI",
                 "@weekly", "@every 1h30m", "TZ=Europe/Berlin 0 2 * * 0"):
        assert cron_errors(good) == [], good
    for bad in ("", "0 2 * * 7", "60 * * * *", "0 2 * * 0 2026", "@fortnightly", "0 5-1 * * *", "*/0 * * * *",
                "TZ=Nowhere/Land 0 2 * * 0"):
        assert cron_errors(bad), bad


def test_quantities():
    assert quantity("500m") == Decimal("0.5")
    assert quantity("16Gi") == 16 * 2**30
    assert quantity(4) == 4 and quantity("1e3") == 1000 and quantity("1.5k") == 1500
    with pytest.raises(ValueError):
        quantity("lots")


# --- the project's own rules ----------------------------------------------------------------

def test_secret_is_an_example_with_placeholders_only():
    (secret,) = by_kind("Secret")
    assert secret["metadata"]["name"] == SECRET_NAME
    assert "data" not in secret, "base64 data cannot be reviewed: use stringData placeholders"
    for key, value in secret.get("stringData", {}).items():
        if SECRET_VALUE_RE.search(key):
            assert "REPLACE" in value, f"{key} must be a placeholder in an example Secret"
    text = (KUBERAY / "secret-example.yaml").read_text()
    assert "EXAMPLE" in text.upper().split("APIVERSION")[0], "say in the header that this Secret is an example"


def test_every_secret_reference_exists_in_the_example_secret():
    (secret,) = by_kind("Secret")
    keys = set(secret.get("stringData", {}))
    text = (KUBERAY / "secret-example.yaml").read_text()
    keys |= set(re.findall(r"^\s*#\s*([A-Z][A-Z0-9_]+):", text, re.M))  # optional keys shown commented out
    for label, doc in MANIFESTS:
        for _, pod in pod_specs(doc):
            for c in pod["containers"]:
                for var in c.get("env", []):
                    ref = (var.get("valueFrom") or {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] == SECRET_NAME, (label, var)
                        assert ref["key"] in keys, (label, var)
                        assert ref.get("optional", False) or ref["key"] in secret["stringData"], (label, var)


def test_no_credentials_anywhere_in_cluster_folder():
    for path in CLUSTER.rglob("*"):
        if path.is_file() and path.suffix not in (".gz",) and path.name != "LICENSE":
            text = path.read_text(errors="replace")
            assert not AWS_KEY_ID_RE.search(text), f"{path}: looks like an AWS access key id"
            assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}", text), path


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_ray_cluster_shape(where, spec):
    """CPU-only head, an autoscaling GPU group from zero, a CPU group, the project's image and env."""
    assert spec.get("rayVersion") == pinned("ray")
    assert spec.get("enableInTreeAutoscaling") is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "no tasks/actors on the head"
    gpu_groups, cpu_groups = [], []
    for group in spec["workerGroupSpecs"]:
        res = group["template"]["spec"]["containers"][0].get("resources", {})
        (gpu_groups if "nvidia.com/gpu" in res.get("limits", {}) else cpu_groups).append(group)
    assert gpu_groups and cpu_groups, "one GPU worker group and one CPU worker group"
    for group in gpu_groups:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 2
        res = group["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == 1
    dockerfile = parse_dockerfile(DOCKERFILE.read_text())
    groups = [head, *spec["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            assert c["image"] == expected_image(), f"{c['image']} != {expected_image()} (pyproject version)"
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})) and {"cpu", "memory"} <= set(res.get("limits", {}))
            env = {e["name"]: e for e in c.get("env", [])}
            assert set(REQUIRED_ENV) <= set(env), set(REQUIRED_ENV) - set(env)
            assert env["YOLO_OFFLINE"].get("value") == dockerfile.env["YOLO_OFFLINE"] == "1"
            assert env["YOLO_CONFIG_DIR"].get("value") == dockerfile.env["YOLO_CONFIG_DIR"]
            assert env["RAY_DISABLE_USAGE_STATS"].get("value") == "1"
            assert env["LUMBAR_RAY_S3_ENDPOINT"]["valueFrom"]["secretKeyRef"].get("optional") is True
            shm = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            assert shm, "the object store needs a /dev/shm mount"
            assert volumes[shm[0]["name"]].get("emptyDir", {}).get("medium") == "Memory"


@pytest.mark.parametrize("where,spec", job_specs(), ids=[w for w, _ in job_specs()])
def test_ray_job_lifecycle(where, spec):
    assert spec.get("submissionMode") == "K8sJobMode"
    assert spec.get("rayClusterSpec"), "each job brings its own cluster (see the comment in rayjob-score.yaml)"
    assert spec.get("shutdownAfterJobFinishes") is True and spec.get("ttlSecondsAfterFinished", 0) > 0
    assert spec.get("activeDeadlineSeconds", 0) > 0
    runtime_env = _yaml_load(spec.get("runtimeEnvYAML", "{}"))
    assert runtime_env.get("working_dir") == parse_dockerfile(DOCKERFILE.read_text()).workdir, \
        "the job's working_dir must be where the image holds jobs/"


def test_retraining_is_weekly():
    (cron,) = by_kind("RayCronJob")
    minute, hour, dom, month, dow = cron["spec"]["schedule"].split()
    assert dom == "*" and month == "*" and re.fullmatch(r"[0-6]|sun|mon|tue|wed|thu|fri|sat", dow.lower())
    # A run must end before the next one starts (RayCronJob has no concurrency policy).
    assert cron["spec"]["jobTemplate"]["activeDeadlineSeconds"] < 7 * 24 * 3600
    assert "jobs/retrain.py" in cron["spec"]["jobTemplate"]["entrypoint"]


# --------------------------------------------------------------------------------------------
# Job entry points and their flags
# --------------------------------------------------------------------------------------------

# `python jobs/X.py ARGS` and `ray submit CONFIG jobs/X.py -- ARGS`.
_JOB_CMD = re.compile(r"(?:python3?|ray[ \t]+submit[ \t]+\S+)[ \t]+(?:\./)?jobs/(\w+)\.py"
                      r"(?:[ \t]+--(?=[ \t]|$))?((?:[ \t]+(?![|&;#])\S+)*)", re.M)


def _logical_lines(text: str) -> str:
    """Comment markers stripped, backslash continuations joined: a command written across lines
    (in a shell block or a YAML comment) becomes one line."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    return re.sub(r"\\\n\s*", " ", "\n".join(lines))


def job_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, argv) of every ``python jobs/X.py ...`` in a text."""
    return [(m.group(1), shlex.split(m.group(2), comments=False)) for m in _JOB_CMD.finditer(text)]


def flags_of(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2]


@functools.lru_cache(maxsize=None)
def job_help(script: str) -> str:
    path = REPO / "jobs" / f"{script}.py"
    if not path.exists():
        if script == "retrain":
            pytest.skip("jobs/retrain.py does not exist yet (the lead is writing it)")
        pytest.fail(f"jobs/{script}.py named in cluster/ does not exist")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "RAY_DISABLE_USAGE_STATS": "1"}
    proc = subprocess.run([sys.executable, str(path.relative_to(REPO)), "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"jobs/{script}.py --help failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def help_flags(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", help_text))


def required_flags(help_text: str) -> set[str]:
    """Options argparse's usage line shows outside [brackets]."""
    usage = help_text.split("\n\n", 1)[0]
    previous = None
    while previous != usage:
        previous, usage = usage, re.sub(r"\[[^\[\]]*\]", "", usage)
    return help_flags(usage) - {"--help"}


def flag_errors(script: str, argv: list[str], *, complete: bool) -> list[str]:
    text = job_help(script)
    known = help_flags(text)
    errors = [f"jobs/{script}.py has no flag {f}" for f in flags_of(argv) if f not in known]
    if complete:
        errors += [f"jobs/{script}.py needs {f}" for f in sorted(required_flags(text) - set(flags_of(argv)))]
    return errors


def manifest_commands() -> list[tuple[str, str, list[str]]]:
    out = []
    for where, spec in job_specs():
        commands = job_commands(" ".join(str(spec.get("entrypoint", "")).split()))
        assert commands, f"{where}: the entrypoint runs no jobs/X.py"
        out += [(where, script, argv) for script, argv in commands]
    return out


def doc_commands() -> list[tuple[str, str, list[str]]]:
    out = []
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file() and (path.suffix in (".md", ".yaml", ".yml") or path.name == "Dockerfile"):
            for script, argv in job_commands(_logical_lines(path.read_text())):
                out.append((str(path.relative_to(REPO)), script, argv))
    return out


@pytest.mark.parametrize("where,script,argv", manifest_commands(),
                         ids=[f"{w}:{s}" for w, s, _ in manifest_commands()])
def test_manifest_entrypoint_flags_exist(where, script, argv):
    assert flag_errors(script, argv, complete=True) == []


def test_documented_commands_use_real_flags():
    commands = doc_commands()
    assert len(commands) >= 3, "cluster/ should show how to run jobs/score.py, train.py and retrain.py"
    errors = []
    for where, script, argv in commands:
        if script == "retrain" and not (REPO / "jobs" / "retrain.py").exists():
            continue
        errors += [f"{where}: {e}" for e in flag_errors(script, argv, complete=False)]
    assert errors == []


def test_flag_check_catches_wrong_and_missing_flags():
    argv = shlex.split("--input s3://b/in --out s3://b/out --no-such-flag 3")
    errors = flag_errors("score", argv, complete=True)
    assert "jobs/score.py has no flag --no-such-flag" in errors
    assert "jobs/score.py needs --models" in errors
    assert job_commands(_logical_lines("ray job submit -- \\\n  python jobs/score.py --input x \\\n --split test | tee log")) == [
        ("score", ["--input", "x", "--split", "test"])]
    assert job_commands("ray submit c.yaml jobs/train.py -- --folds 5") == [("train", ["--folds", "5"])]


def markdown_code(text: str) -> list[str]:
    """Lines of the fenced code blocks (continuations joined) and the inline `code` spans."""
    fence = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
    lines = []
    for block in fence.findall(text):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    return lines + re.findall(r"`([^`\n]+)`", fence.sub("", text))


def test_documented_lumbar_ray_commands_exist():
    """`lumbar-ray champion --registry R --set VERSION` etc., as cluster/README.md shows them."""
    typer_testing = pytest.importorskip("typer.testing")
    from lumbar_ray.cli import app

    commands = []
    for line in markdown_code(CLUSTER_README.read_text()):
        m = re.match(r"^\s*lumbar-ray\s+([a-z][\w-]*)(.*)$", line)
        if m:
            commands.append((m.group(1), shlex.split(m.group(2), comments=True)))
    assert any(name == "champion" and "--set" in args for name, args in commands), \
        "cluster/README.md must show how to pin / roll back the champion"
    runner = typer_testing.CliRunner()
    for name, args in commands:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, f"`lumbar-ray {name}` is not a command: {result.output}"
        known = help_flags(result.output)
        for flag in flags_of(args):
            assert flag in known, f"`lumbar-ray {name}` has no {flag}"


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------

class Dockerfile:
    def __init__(self, args: dict[str, str], base: str, env: dict[str, str], workdir: str,
                 copies: list[str], runs: list[str], labels: dict[str, str]):
        self.args, self.base, self.env, self.workdir = args, base, env, workdir
        self.copies, self.runs, self.labels = copies, runs, labels


def parse_dockerfile(text: str) -> Dockerfile:
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    logical = re.sub(r"\\\n", " ", "\n".join(lines))
    args: dict[str, str] = {}
    base, workdir = "", ""
    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    copies: list[str] = []
    runs: list[str] = []

    def subst(value: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)

    for line in logical.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) < 2:
            continue
        op, rest = parts[0].upper(), parts[1]
        if op == "ARG":
            name, _, default = rest.partition("=")
            if default or name.strip() not in args:
                args[name.strip()] = default.strip()
        elif op == "FROM":
            base = subst(rest.split()[0])
        elif op in ("ENV", "LABEL"):
            target = env if op == "ENV" else labels
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                target[key] = subst(value)
        elif op == "WORKDIR":
            workdir = subst(rest.strip())
        elif op == "COPY":
            tokens = [t for t in shlex.split(rest) if not t.startswith("--")]
            copies += tokens[:-1]
        elif op == "RUN":
            runs.append(subst(rest))
    return Dockerfile(args, base, env, workdir, copies, runs, labels)


def dockerfile_errors(text: str) -> list[str]:
    """Pins of the image vs pyproject.toml, and what the image must set."""
    d = parse_dockerfile(text)
    errors = []
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)(?:-[\w.]+)?", d.base)
    if not m:
        return [f"base image {d.base!r} is not rayproject/ray:VERSION-pyXY[-gpu]"]
    if m.group(1) != pinned("ray"):
        errors.append(f"base image has ray {m.group(1)}, pyproject pins {pinned('ray')}")
    python = f"{m.group(2)}.{m.group(3)}"
    from packaging.specifiers import SpecifierSet

    if f"{python}.0" not in SpecifierSet(pyproject()["project"]["requires-python"]):
        errors.append(f"base image has python {python}, pyproject requires {pyproject()['project']['requires-python']}")
    install = " ".join(d.runs)
    for package, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        if d.args.get(arg) != pinned(package):
            errors.append(f"{arg}={d.args.get(arg)!r}, pyproject pins {package}=={pinned(package)}")
        if f"{package}=={pinned(package)}" not in install:
            errors.append(f"no `pip install {package}=={pinned(package)}` in the Dockerfile")
    if "pyproject.toml" not in d.copies or "pip install" not in install:
        errors.append("the image must install the pins of pyproject.toml")
    if d.labels.get("org.opencontainers.image.version") != pyproject()["project"]["version"]:
        errors.append("LABEL org.opencontainers.image.version != the pyproject version")
    for key, value in (("YOLO_OFFLINE", "1"), ("RAY_DISABLE_USAGE_STATS", "1")):
        if d.env.get(key) != value:
            errors.append(f"ENV {key} must be {value}")
    if not d.env.get("YOLO_CONFIG_DIR"):
        errors.append("ENV YOLO_CONFIG_DIR missing")
    if not d.workdir or d.env.get("PYTHONPATH") != d.workdir:
        errors.append("PYTHONPATH must point at the WORKDIR that holds lumbar_ray/ and jobs/")
    for needed in ("lumbar_ray/", "jobs/"):
        if needed not in d.copies:
            errors.append(f"the image must COPY {needed}")
    return errors


def test_dockerfile_matches_pyproject():
    assert dockerfile_errors(DOCKERFILE.read_text()) == []


def test_dockerfile_check_catches_drift():
    text = DOCKERFILE.read_text()
    assert any("torch" in e for e in dockerfile_errors(text.replace(f"TORCH_VERSION={pinned('torch')}", "TORCH_VERSION=2.0.0")))
    assert any("ray" in e for e in dockerfile_errors(text.replace(f"RAY_VERSION={pinned('ray')}", "RAY_VERSION=2.9.0")))
    assert any("python" in e for e in dockerfile_errors(text.replace("PYTHON_TAG=py311", "PYTHON_TAG=py310")))


def test_dockerfile_copies_exist_and_pass_the_dockerignore():
    d = parse_dockerfile(DOCKERFILE.read_text())
    allowed = {line.strip().lstrip("!") for line in DOCKERIGNORE.read_text().splitlines() if line.strip().startswith("!")}
    for source in d.copies:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository (the image build would fail)"
        assert source in allowed, f"COPY {source}: excluded by cluster/Dockerfile.dockerignore"


# --------------------------------------------------------------------------------------------
# Cluster launcher
# --------------------------------------------------------------------------------------------

def ray_schema_path() -> Path:
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations, "ray is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"


def launcher_errors(config: dict) -> list[str]:
    schema = json.loads(ray_schema_path().read_text())
    validator = validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(config)]
    if errors:
        return errors
    # What `ray up` does with the file before it talks to the cloud.
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:  # noqa: BLE001  (ray raises ValueError / jsonschema errors)
        errors.append(f"ray's validate_config: {e}")
    return errors


def test_launcher_yaml_validates_against_ray_schema():
    config = _yaml_load(LAUNCHER.read_text())
    assert launcher_errors(config) == []


def test_launcher_shape():
    config = _yaml_load(LAUNCHER.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "no tasks/actors on the head"
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    gpu = [t for t in types.values() if str(t["node_config"].get("InstanceType", "")).startswith(("g5.", "g6.", "p"))]
    assert gpu and all(t.get("min_workers", 0) == 0 and t["max_workers"] >= 2 for t in gpu)
    assert config["docker"]["image"] == expected_image()
    assert not config.get("initialization_commands")
    for remote, local in config.get("file_mounts", {}).items():
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} is not in the repository"
    assert {".venv", ".git"} <= set(config.get("rsync_exclude", []))
    assert parse_dockerfile(DOCKERFILE.read_text()).workdir in config.get("file_mounts", {})
    assert credential_errors(config) == [] and "aws_secret_access_key" not in LAUNCHER.read_text().lower()


@pytest.mark.parametrize("path,value,reason", [
    ("max_workers", -1, "less than the minimum"),
    ("idle_timeout_minutes", "five", "is not of type"),
    ("head_node_typ", "head", "Additional properties are not allowed"),
    ("available_node_types/gpu/resources/GPU", 0.5, "is not of type 'integer'"),
    ("available_node_types/gpu/node_config", _DELETE, "'node_config' is a required property"),
    ("head_node_type", "nope", "head_node_type"),
    ("available_node_types/gpu/min_workers", 20, "max_workers"),
])
def test_launcher_validation_rejects_broken_config(path, value, reason):
    config = _set(_yaml_load(LAUNCHER.read_text()), path, value)
    errors = launcher_errors(config)
    assert any(reason in e for e in errors), errors


# --------------------------------------------------------------------------------------------
# Runtime env for `ray job submit`
# --------------------------------------------------------------------------------------------

def test_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = _yaml_load(RUNTIME_ENV.read_text())
    RuntimeEnv(**env)  # raises on unknown fields and wrong types
    assert env["working_dir"] == "."
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env_vars values must be strings"
    assert env["env_vars"].get("YOLO_OFFLINE") == "1"
    assert not [k for k in env["env_vars"] if SECRET_ENV_RE.search(k)], "no credentials in a runtime env"
    assert set(env) <= set(RuntimeEnv.known_fields), set(env) - set(RuntimeEnv.known_fields)  # typos
    with pytest.raises(TypeError):
        RuntimeEnv(**{**env, "env_vars": {"YOLO_OFFLINE": 1}})


def test_runtime_env_upload_is_small_and_holds_the_code():
    """What `ray job submit --runtime-env cluster/runtime_env.yaml` would zip from the repo root."""
    from ray._private.runtime_env import packaging

    env = _yaml_load(RUNTIME_ENV.read_text())
    files: list[Path] = []
    packaging._dir_travel(REPO, [packaging._get_excludes(REPO, env.get("excludes", []))],
                          lambda p: files.append(p) if p.is_file() else None, include_gitignore=True)
    rel = {p.relative_to(REPO).as_posix() for p in files}
    assert {"jobs/score.py", "jobs/train.py", "lumbar_ray/__init__.py"} <= rel
    assert not [r for r in rel if r.split("/")[0] in (".venv", ".git", "work")]
    size = sum(p.stat().st_size for p in files)
    assert size < 50 * 2**20 < packaging.GCS_STORAGE_MAX_SIZE, f"working_dir upload would be {size / 2**20:.0f} MiB"

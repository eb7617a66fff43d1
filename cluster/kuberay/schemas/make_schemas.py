"""Regenerate the vendored KubeRay schemas from KubeRay CRD files (run from the repository root):

    python cluster/kuberay/schemas/make_schemas.py ../shared/kuberay_crds

Writes {kind}.schema.json.gz here: the served+storage version's spec.versions[].schema.openAPIV3Schema
of each CRD, unchanged, plus its group/version/kind. tests/test_cluster.py validates the manifests
against these (and checks they still equal the CRDs when the CRD folder is present).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_raycronjobs.yaml")


def extract(crd: dict) -> dict:
    """{group, kind, version, openAPIV3Schema} of the storage version of one CRD document."""
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return {
        "group": crd["spec"]["group"],
        "kind": crd["spec"]["names"]["kind"],
        "version": version["name"],
        "openAPIV3Schema": version["schema"]["openAPIV3Schema"],
    }


def dump(entry: dict) -> bytes:
    return gzip.compress(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode(), 9, mtime=0)


def main(crd_dir: str) -> None:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for name in CRD_FILES:
        entry = extract(yaml.load((Path(crd_dir) / name).read_text(), Loader=loader))
        out = HERE / f"{entry['kind'].lower()}.schema.json.gz"
        out.write_bytes(dump(entry))
        print(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/kuberay_crds")

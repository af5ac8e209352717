"""Write KubeRay's ray.io/v1 RayCluster and RayJob schemas as one JSON Schema, for the offline validation test.

    python tests/infra/kuberay/make_schema.py RAYCLUSTERS_CRD.yaml RAYJOBS_CRD.yaml \
        --source "ray-project/kuberay v1.7.0 (commit ...)" > tests/infra/kuberay/ray.io_v1.schema.json

Takes each CRD's ``spec.versions[name=v1].schema.openAPIV3Schema`` unchanged, and stores subtrees that
occur more than once (the pod template, RayJob's embedded RayCluster spec) once under ``$defs`` with a
``$ref`` where they were. That is the only change, and it is checked: expanding every ``$ref`` gives back
the CRDs' schemas exactly. The CRDs' own YAML is ~2.3 MB; the result is a fraction of that.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter
from typing import Any

import yaml

MIN_SIZE = 1500  # characters of canonical JSON: smaller repeats are not worth a $ref


def v1_schema(crd_path: str) -> tuple[str, dict]:
    crd = yaml.safe_load(open(crd_path))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return crd["spec"]["names"]["kind"], v1["schema"]["openAPIV3Schema"]


def _canon(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _subtrees(node: Any, path: tuple[str, ...], out: list) -> None:
    if isinstance(node, dict):
        if "$ref" not in node:
            out.append((path, node))
        for k, v in node.items():
            _subtrees(v, (*path, k), out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _subtrees(v, (*path, str(i)), out)


def _name(path: tuple[str, ...], taken: set[str]) -> str:
    # The property path of the first occurrence: RayCluster.spec.headGroupSpec.template
    parts = [p for i, p in enumerate(path) if i == 0 or path[i - 1] in ("properties", "$defs")]
    name = ".".join(parts[1:] if parts[0] == "$defs" else parts) or "root"
    base, n = name, 2
    while name in taken:
        name, n = f"{base}.{n}", n + 1
    return name


def _replace(node: Any, canon: str, ref: dict) -> Any:
    if isinstance(node, dict):
        if _canon(node) == canon:
            return copy.deepcopy(ref)
        return {k: _replace(v, canon, ref) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace(v, canon, ref) for v in node]
    return node


def dedupe(schemas: dict[str, dict]) -> dict[str, dict]:
    defs: dict[str, dict] = dict(schemas)
    shared: set[str] = set()
    while True:
        found: list = []
        _subtrees({"$defs": defs}, (), found)
        found = [(p, n, _canon(n)) for p, n in found if len(p) > 2]  # not the kinds themselves
        counts = Counter(c for _, _, c in found if len(c) >= MIN_SIZE)
        repeated = [(p, n, c) for p, n, c in found if counts[c] > 1]
        if not repeated:
            return defs
        biggest = max(len(c) for _, _, c in repeated)
        # Named after its first occurrence, RayCluster's before RayJob's (whose spec embeds a RayCluster's).
        path, node, canon = min((t for t in repeated if len(t[2]) == biggest),
                                key=lambda t: (t[0][1] != "RayCluster", len(t[0]), t[0]))
        name = _name(path, set(defs))
        ref = {"$ref": f"#/$defs/{name}"}
        defs = {k: _replace(v, canon, ref) for k, v in defs.items()}
        defs[name] = copy.deepcopy(node)
        shared.add(name)


def expand(node: Any, defs: dict[str, dict]) -> Any:
    if isinstance(node, dict):
        if set(node) == {"$ref"}:
            return expand(defs[node["$ref"].removeprefix("#/$defs/")], defs)
        return {k: expand(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [expand(v, defs) for v in node]
    return node


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("crds", nargs="+", help="ray.io_<kind>.yaml files of KubeRay's ray-operator/config/crd/bases")
    ap.add_argument("--source", required=True, help="where the CRDs came from: repository, release, commit")
    args = ap.parse_args(argv)
    schemas = dict(v1_schema(p) for p in args.crds)
    defs = dedupe(schemas)
    for kind, original in schemas.items():
        if expand(defs[kind], defs) != original:
            raise SystemExit(f"{kind}: the deduplicated schema does not expand back to the CRD's")
    doc = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"openAPIV3Schema of ray.io/v1 {', '.join(schemas)} from {args.source}; repeated subtrees "
                    "stored once under $defs (tests/infra/kuberay/make_schema.py), otherwise unchanged.",
        "kinds": sorted(schemas),
        "$defs": defs,
    }
    json.dump(doc, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Vendors the upstream data `kiln gitops check` embeds, from the collected upstream files
(../shared/upstream, see its PROVENANCE.md). Deterministic; run from the repository root:

    python3 tests/upstream/vendor-gitops.py /work/shared/upstream

Transformations (nothing else changes):
- CRDs: YAML -> JSON (indent 1), every `description` text removed (properties named
  `description` kept), as the CRD copies already here were made.
- Kubernetes 1.32: `_definitions.json` pruned to the definitions the seven kinds the check
  validates reach through `$ref` (Namespace, Service, Deployment, Ingress, ConfigMap, Secret,
  Job), `description` texts removed; and `served-kinds.json`, the sorted list of every
  `x-kubernetes-group-version-kind` entry of the whole `_definitions.json` (what a v1.32 API
  server serves built in). The seven kinds' own files (`deployment-apps-v1.json` …), with
  `description` texts removed; their `$ref`s still say `/api/_definitions.json#/$defs/…` and
  kiln points them at `definitions.json` when it loads them.
"""
import json
import sys

import yaml

UP = sys.argv[1]
KINDS = [
    "io.k8s.api.core.v1.Namespace",
    "io.k8s.api.core.v1.Service",
    "io.k8s.api.apps.v1.Deployment",
    "io.k8s.api.networking.v1.Ingress",
    "io.k8s.api.core.v1.ConfigMap",
    "io.k8s.api.core.v1.Secret",
    "io.k8s.api.batch.v1.Job",
]
KIND_FILES = {
    "io.k8s.api.core.v1.Namespace": "namespace-v1.json",
    "io.k8s.api.core.v1.Service": "service-v1.json",
    "io.k8s.api.apps.v1.Deployment": "deployment-apps-v1.json",
    "io.k8s.api.networking.v1.Ingress": "ingress-networking-v1.json",
    "io.k8s.api.core.v1.ConfigMap": "configmap-v1.json",
    "io.k8s.api.core.v1.Secret": "secret-v1.json",
    "io.k8s.api.batch.v1.Job": "job-batch-v1.json",
}


def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x


def write(path, obj):
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def crd(src, dst):
    with open(src) as f:
        write(dst, strip(yaml.safe_load(f)))


crd(UP + "/argo-cd-v3.4.7/crds/appproject-crd.yaml", "tests/upstream/argo-cd-v3.4.7/crds/appproject-crd.json")
# proxyclasses is already here (made the same way, keys in another order).
for name in ["connectors", "dnsconfigs", "peerrelays", "proxygrouppolicies",
             "proxygroups", "recorders", "tailnets"]:
    crd(UP + "/tailscale-operator-v1.102.3/crds/tailscale.com_%s.yaml" % name,
        "tests/upstream/tailscale-operator-v1.102.3/crds/tailscale.com_%s.json" % name)

with open(UP + "/kubernetes-1.32/_definitions.json") as f:
    full = json.load(f)
defs = full["$defs"]
for name, fname in KIND_FILES.items():
    with open(UP + "/kubernetes-1.32/" + fname) as f:
        top = json.load(f)
    write("tests/upstream/kubernetes-1.32/" + fname, strip(top))
    # The kind's file is its `$defs` entry, except that the top level must be an object.
    top = json.loads(json.dumps(top).replace("/api/_definitions.json#/$defs/", "#/$defs/"))
    for k in ("$id", "$schema"):
        top.pop(k)
    assert dict(top, type=["object", "null"]) == defs[name], fname
seen = set()


def walk(x):
    if isinstance(x, dict):
        for k, v in x.items():
            if k == "$ref":
                n = v.split("/")[-1]
                if n not in seen:
                    seen.add(n)
                    walk(defs[n])
            else:
                walk(v)
    elif isinstance(x, list):
        for v in x:
            walk(v)


for k in KINDS:
    seen.add(k)
    walk(defs[k])
write("tests/upstream/kubernetes-1.32/definitions.json",
      {"$schema": full["$schema"], "$id": full["$id"],
       "$defs": {k: strip(defs[k]) for k in sorted(seen)}})
served = sorted({"%s/%s/%s" % (g["group"], g["version"], g["kind"])
                 for d in defs.values() for g in d.get("x-kubernetes-group-version-kind", [])})
write("tests/upstream/kubernetes-1.32/served-kinds.json", served)
print("definitions: %d, served kinds: %d" % (len(seen), len(served)))

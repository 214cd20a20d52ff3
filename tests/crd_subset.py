"""Cut a CRD's OpenAPI schema down to the fields one manifest uses (for tests/test_launch.py).

    python tests/crd_subset.py ray.io_rayjobs.yaml launch/kuberay-job.yaml > tests/schemas/SUBSET.yaml

Keeps, along every path the manifest uses, the schema's types, enums, patterns, required lists and
maps (additionalProperties); drops descriptions and every field the manifest does not use, and adds
``additionalProperties: false`` where it dropped fields, so a misspelt field (which the API server
would silently drop) fails validation. A field newly added to the manifest needs a new cut.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

KEEP = ("type", "enum", "pattern", "format", "required", "anyOf", "x-kubernetes-int-or-string", "x-kubernetes-validations")


def merge(docs: list) -> object:
    """One document holding every key that any of docs has (list items are merged too)."""
    if all(isinstance(d, dict) for d in docs):
        keys = {k for d in docs for k in d}
        return {k: merge([d[k] for d in docs if k in d]) for k in keys}
    if all(isinstance(d, list) for d in docs):
        return [merge([item for d in docs for item in d])] if any(docs) else []
    return docs[0]


def cut(schema: dict, doc: object) -> dict:
    """schema restricted to what doc uses."""
    out = {k: v for k, v in schema.items() if k in KEEP}
    if isinstance(doc, dict) and "properties" in schema:
        out["properties"] = {k: cut(schema["properties"][k], v) for k, v in doc.items() if k in schema["properties"]}
        out["additionalProperties"] = False
    elif isinstance(doc, dict) and isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = cut(schema["additionalProperties"], merge(list(doc.values())) if doc else {})
    elif isinstance(doc, list) and "items" in schema:
        out["items"] = cut(schema["items"], merge(doc) if doc else {})
    for key in ("x-kubernetes-preserve-unknown-fields",):
        if key in schema:
            out[key] = schema[key]
    return out


def main(crd_path: str, manifest_path: str) -> None:
    crd = yaml.safe_load(Path(crd_path).read_text())
    manifest = yaml.safe_load(Path(manifest_path).read_text())
    version = next(v for v in crd["spec"]["versions"] if f"{crd['spec']['group']}/{v['name']}" == manifest["apiVersion"])
    yaml.safe_dump(cut(version["schema"]["openAPIV3Schema"], manifest), sys.stdout, sort_keys=True, width=120)


if __name__ == "__main__":
    main(*sys.argv[1:])

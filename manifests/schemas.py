"""Checking manifests against the upstream CRD schemas, unknown fields included.

``validate_manifest(obj, specs_dir)`` finds the CustomResourceDefinition under
``specs_dir`` whose group and kind match ``obj``'s ``apiVersion``/``kind``,
takes the schema of the version ``obj`` names, makes it stricter than the
apiserver and checks ``obj`` with ``jsonschema.Draft7Validator``:

- ``x-kubernetes-int-or-string`` nodes lose ``type`` (their ``anyOf`` of integer
  and string remains) and ``nullable`` nodes accept null, as the apiserver does;
- every object node with ``properties`` and no
  ``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties: false``
  (the root excepted: Knative's root declares only ``spec`` and ``status``).
  The apiserver would silently prune an unknown field, so a typo such as
  ``autoScalling`` would deploy and do nothing.

What no schema checks -- CEL rules (``x-kubernetes-validations``), object names,
webhook-only rules -- the code that builds the object must check itself.
Schemas are loaded once per folder and compiled once per kind.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator

from kfloop.errors import ManifestError

__all__ = ["validate_manifest"]

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the KServe CRD is 2 MB: libyaml reads it 5x faster


def validate_manifest(obj: dict[str, Any], specs_dir: str | Path) -> None:
    """Raise :class:`ManifestError` listing every schema error of ``obj`` by its JSON path.

    ``specs_dir`` is searched recursively for ``*.yaml`` files holding
    CustomResourceDefinitions (e.g. ``kserve/``, ``keda/``, ``knative-eventing/``).
    """
    api_version, kind = str(obj.get("apiVersion", "")), str(obj.get("kind", ""))
    validator = _validator(Path(specs_dir).resolve(), api_version, kind)
    errors = sorted(validator.iter_errors(obj), key=lambda error: error.json_path)
    if errors:
        name = obj.get("metadata", {}).get("name", "?")
        raise ManifestError(
            f"{kind}/{name} does not match its CRD: "
            + "; ".join(f"{error.json_path}: {error.message}" for error in errors)
        )


@functools.lru_cache(maxsize=None)
def _validator(specs_dir: Path, api_version: str, kind: str) -> Draft7Validator:
    group, _, version = api_version.rpartition("/")
    crd = _crds(specs_dir).get((group, kind))
    if crd is None:
        raise ManifestError(f"no CustomResourceDefinition for {kind} in group {group!r} under {specs_dir}")
    versions = {entry["name"]: entry for entry in crd["spec"]["versions"]}
    if version not in versions:
        raise ManifestError(f"{kind}: the CRD defines versions {sorted(versions)}, not {version!r}")
    schema = copy.deepcopy(versions[version]["schema"]["openAPIV3Schema"])
    _tighten(schema, root=True)
    return Draft7Validator(schema)


@functools.lru_cache(maxsize=None)
def _crds(specs_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(specs_dir.rglob("*.yaml")):
        with path.open() as stream:
            for document in yaml.load_all(stream, Loader=_Loader):
                if isinstance(document, dict) and document.get("kind") == "CustomResourceDefinition":
                    spec = document["spec"]
                    found[(spec["group"], spec["names"]["kind"])] = document
    return found


def _tighten(node: dict[str, Any], *, root: bool = False) -> None:
    """Rewrite one structural-schema node (and all below it) in place, as the module docstring says."""
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
    if node.get("nullable"):
        if "type" in node:
            node["type"] = [node["type"], "null"]
        if "anyOf" in node:
            node["anyOf"].append({"type": "null"})
        if "enum" in node:
            node["enum"] = [*node["enum"], None]
    if "properties" in node and not root and not node.get("x-kubernetes-preserve-unknown-fields"):
        node.setdefault("additionalProperties", False)
    children = [*node.get("properties", {}).values(), *node.get("anyOf", []), *node.get("allOf", []), *node.get("oneOf", [])]
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            children.append(node[key])
    for child in children:
        _tighten(child)

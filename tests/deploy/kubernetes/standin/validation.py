"""Validation in the Kubernetes API stand-in: object names, labels, built-in kinds against
the real OpenAPI schemas, and custom resources against their CRD's structural schema.

- Built-in kinds are checked with the JSON schemas of Kubernetes 1.30 that
  `kubernetes-validate` ships, in its strict flavour (unknown fields are errors). A real
  server, by default (`fieldValidation=Warn`), drops unknown fields of built-in kinds
  with a warning instead: the stand-in is stricter on purpose, so that a typo in a
  manifest fails a test. A validator is built once per kind and cached: building one
  costs about 15 ms, using it well under 1 ms (`BuiltinValidator.stats`).
- Custom resources follow the CRD's `openAPIV3Schema` as a real server does: unknown
  fields are pruned (unless `x-kubernetes-preserve-unknown-fields`), `default`s are
  applied, and then the object is validated (`type`, `properties`, `required`, `enum`,
  `minimum`/`maximum`, `items`, `additionalProperties`, `pattern`, lengths, `nullable`,
  `x-kubernetes-int-or-string`). `format` is not checked and CEL rules
  (`x-kubernetes-validations`) are ignored.
"""
from __future__ import annotations

import copy
import json
import re
import time

import jsonschema

from .store import Invalid, ResourceType

SCHEMA_VERSION = "1.30"

_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def cause(field: str, message: str, reason: str = "FieldValueInvalid") -> dict:
    return {"reason": reason, "message": message, "field": field}


def invalid(rt: ResourceType, name: str | None, causes: list[dict]) -> Invalid:
    """The 422 a real server answers: `Kind "name" is invalid: field: message`."""
    kind = f"{rt.kind}.{rt.group}" if rt.group else rt.kind
    parts = [f"{c['field']}: {c['message']}" if c.get("field") else c["message"] for c in causes]
    text = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    details = {"name": name or "", "kind": rt.kind, "causes": causes}
    if rt.group:
        details["group"] = rt.group
    return Invalid(f'{kind} "{name or ""}" is invalid: {text}', details=details)


def name_problem(name: str, rule: str) -> str | None:
    """Why `name` is not a valid name under `rule` (None if it is)."""
    if rule == "path":                       # RBAC objects: any path segment
        if name in (".", "..") or "/" in name or "%" in name:
            return f'Invalid value: "{name}": may not contain \'/\' or \'%\' or be \'.\' or \'..\''
        return None
    if rule == "label":
        ok, limit = _LABEL.match(name) and len(name) <= 63, 63
        what = ("a lowercase RFC 1123 label must consist of lower case alphanumeric "
                "characters or '-', and must start and end with an alphanumeric character")
    elif rule == "dns1035":
        ok, limit = _DNS1035.match(name) and len(name) <= 63, 63
        what = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', "
                "start with an alphabetic character, and end with an alphanumeric character")
    else:
        ok, limit = _SUBDOMAIN.match(name) and len(name) <= 253, 253
        what = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                "characters, '-' or '.', and must start and end with an alphanumeric character")
    if len(name) > limit:
        return f'Invalid value: "{name}": must be no more than {limit} characters'
    if not ok:
        return f'Invalid value: "{name}": {what}'
    return None


def label_problems(labels, field="metadata.labels") -> list[dict]:
    out = []
    if labels is None:
        return out
    for k, v in labels.items():
        prefix, _, name = k.rpartition("/")
        if (not name or len(name) > 63 or not _QUALIFIED.match(name)
                or (prefix and (not _SUBDOMAIN.match(prefix) or len(prefix) > 253))):
            out.append(cause(field, f'Invalid value: "{k}": name part must consist of '
                                    "alphanumeric characters, '-', '_' or '.'"))
        if not isinstance(v, str) or len(v) > 63 or not _LABEL_VALUE.match(v):
            out.append(cause(field, f'Invalid value: "{v}": a valid label must be an empty '
                                    "string or consist of alphanumeric characters, '-', '_' or "
                                    "'.', and must start and end with an alphanumeric character"))
    return out


def field_path(parts) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def _describe(err: jsonschema.ValidationError) -> dict:
    path = list(err.absolute_path)
    v = err.validator
    inst = err.instance
    if v == "required":
        missing = err.message.split("'")[1] if "'" in err.message else ""
        return cause(field_path(path + [missing]), "Required value", "FieldValueRequired")
    if v == "additionalProperties":
        props = set((err.schema or {}).get("properties") or {})
        extra = sorted(k for k in inst if k not in props) if isinstance(inst, dict) else []
        field = field_path(path + extra[:1])
        return cause(field, f'unknown field "{field}"', "FieldValueNotSupported")
    if v == "enum":
        allowed = ", ".join(json.dumps(x) for x in err.validator_value)
        return cause(field_path(path), f"Unsupported value: {json.dumps(inst)}: supported values: "
                                       f"{allowed}", "FieldValueNotSupported")
    shown = json.dumps(inst) if not isinstance(inst, (dict, list)) else "object"
    fp = field_path(path)
    if v == "type":
        t = err.validator_value
        t = t[0] if isinstance(t, list) else t
        return cause(fp, f"Invalid value: {shown}: {fp} in body must be of type {t}: {shown}",
                     "FieldValueTypeInvalid")
    if v == "minimum":
        return cause(fp, f"Invalid value: {shown}: {fp} in body should be greater than or equal "
                         f"to {err.validator_value}")
    if v == "maximum":
        return cause(fp, f"Invalid value: {shown}: {fp} in body should be less than or equal "
                         f"to {err.validator_value}")
    return cause(fp, f"Invalid value: {shown}: {err.message}")


def _causes(validator, obj, limit=10) -> list[dict]:
    out = []
    for err in sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path]):
        c = _describe(err)
        if c not in out:
            out.append(c)
        if len(out) >= limit:
            break
    return out


# ---------------------------------------------------------------------------------------------
# Built-in kinds
# ---------------------------------------------------------------------------------------------

class BuiltinValidator:
    """kubernetes-validate's strict schemas, one compiled validator per (apiVersion, kind)."""

    def __init__(self, version: str = SCHEMA_VERSION):
        self.version = version
        self._cache: dict[tuple[str, str], object] = {}
        self.stats = {"validations": 0, "seconds": 0.0, "compiles": 0, "compile_seconds": 0.0}

    def _compile(self, api_version: str, kind: str):
        """The validator kubernetes_validate.validate builds on each call, built once here."""
        from kubernetes_validate import utils
        from referencing import Registry, Resource

        version = [v for v in utils.all_versions()
                   if utils.major_minor(v) <= utils.major_minor(self.version)][-1]
        group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
        base = f"kubernetes-json-schema/v{version}-local-strict"
        try:
            schema = utils.schema_contents(f"{base}/{kind.lower()}-{group}.json", self.version)
        except FileNotFoundError:
            return None
        defs = utils.schema_contents(f"{base}/_definitions.json", self.version)
        registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
        return jsonschema.validators.Draft202012Validator(schema, registry=registry)

    def validator(self, api_version: str, kind: str):
        key = (api_version, kind)
        if key not in self._cache:
            t = time.perf_counter()
            self._cache[key] = self._compile(api_version, kind)
            self.stats["compiles"] += 1
            self.stats["compile_seconds"] += time.perf_counter() - t
        return self._cache[key]

    def problems(self, obj: dict) -> list[dict]:
        v = self.validator(obj["apiVersion"], obj["kind"])
        if v is None:
            return []
        t = time.perf_counter()
        try:
            return _causes(v, obj)
        finally:
            self.stats["validations"] += 1
            self.stats["seconds"] += time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# Custom resources
# ---------------------------------------------------------------------------------------------

def _to_jsonschema(s):
    """An OpenAPI v3 schema of a CRD as a draft-4 JSON schema (nullable, int-or-string)."""
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k.startswith("x-kubernetes-") or k in ("nullable", "description", "example",
                                                  "externalDocs", "format", "default"):
            continue
        if k == "properties":
            out[k] = {name: _to_jsonschema(sub) for name, sub in v.items()}
        elif k in ("items", "additionalProperties", "not"):
            out[k] = _to_jsonschema(v)
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [_to_jsonschema(sub) for sub in v]
        else:
            out[k] = copy.deepcopy(v)
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = list(out["enum"]) + [None]
    return out


class CustomSchema:
    """One served version's openAPIV3Schema: pruning, defaulting and validation."""

    def __init__(self, schema: dict):
        self.schema = schema
        self._validator = jsonschema.Draft4Validator(_to_jsonschema(schema))

    def prune_and_default(self, obj: dict) -> list[str]:
        """Prune unknown fields and apply defaults in place; returns the pruned paths."""
        pruned: list[str] = []
        keep = {"apiVersion", "kind", "metadata"}
        self._walk(obj, self.schema, [], pruned, keep)
        return pruned

    def _walk(self, value, s, path, pruned, keep=frozenset()):
        if not isinstance(s, dict):
            return
        if isinstance(value, dict):
            props = s.get("properties")
            addl = s.get("additionalProperties")
            preserve = s.get("x-kubernetes-preserve-unknown-fields")
            embedded = s.get("x-kubernetes-embedded-resource")
            for k in list(value):
                if props and k in props:
                    self._walk(value[k], props[k], path + [k], pruned)
                elif isinstance(addl, dict):
                    self._walk(value[k], addl, path + [k], pruned)
                elif (preserve or addl is True or k in keep
                      or (embedded and k in ("apiVersion", "kind", "metadata"))):
                    continue
                else:
                    pruned.append(field_path(path + [k]))
                    del value[k]
            for k, sub in (props or {}).items():
                if k not in value and isinstance(sub, dict) and "default" in sub:
                    value[k] = copy.deepcopy(sub["default"])
                    self._walk(value[k], sub, path + [k], pruned)
        elif isinstance(value, list) and isinstance(s.get("items"), dict):
            for i, item in enumerate(value):
                self._walk(item, s["items"], path + [i], pruned)

    def problems(self, obj: dict) -> list[dict]:
        return _causes(self._validator, obj)

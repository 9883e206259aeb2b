"""PATCH bodies for the Kubernetes API stand-in: JSON merge patch (RFC 7386), a strategic
merge patch that covers what clients send for pods and their templates, and JSON patch
(RFC 6902, by the `jsonpatch` package).

The strategic merge patch is a simplification of the real one: it is a merge patch in
which lists of objects are merged by their merge key (`name` for containers, env,
volumes and most lists; `containerPort` for container ports, `port` for service ports,
`mountPath` for volume mounts) and a list item `{"$patch": "delete", <key>: ...}` removes
that item. Other directives (`$retainKeys`, `$setElementOrder/...`, `$deleteFromPrimitiveList`)
are accepted and ignored, except `$patch: replace` on a map.
"""
from __future__ import annotations

import copy

import jsonpatch


class PatchError(Exception):
    """A patch that could not be applied (answered with 422, as a real server does)."""


def merge_patch(target, patch):
    """RFC 7386: objects merge recursively, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


# Merge keys by field name; lists not named here merge by "name" when every item has one.
_MERGE_KEYS = {"volumeMounts": "mountPath", "volumeDevices": "devicePath",
               "hostAliases": "ip", "imagePullSecrets": "name"}


def _merge_key(field: str, items: list) -> str | None:
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    if field in _MERGE_KEYS:
        key = _MERGE_KEYS[field]
    elif field == "ports":
        key = "containerPort" if any("containerPort" in i for i in items) else "port"
    else:
        key = "name"
    data = [i for i in items if i.get("$patch") != "delete" or key in i]
    return key if all(key in i for i in data) else None


def strategic_merge_patch(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if k.startswith("$"):          # directives ($retainKeys, $setElementOrder/...)
            continue
        if v is None:
            result.pop(k, None)
        elif isinstance(v, list) and isinstance(result.get(k), list):
            result[k] = _merge_list(k, result[k], v)
        elif isinstance(v, dict):
            merged = strategic_merge_patch(result.get(k), v)
            if merged is None:
                result.pop(k, None)
            else:
                result[k] = merged
        else:
            result[k] = copy.deepcopy(v)
    return result


def _merge_list(field: str, current: list, patch: list) -> list:
    key = _merge_key(field, current + patch)
    if key is None:
        return copy.deepcopy([i for i in patch if not (isinstance(i, dict) and "$patch" in i)])
    out = copy.deepcopy(current)
    for item in patch:
        idx = next((n for n, cur in enumerate(out) if cur.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                del out[idx]
        elif idx is None:
            out.append({k: v for k, v in copy.deepcopy(item).items() if not k.startswith("$")})
        else:
            out[idx] = strategic_merge_patch(out[idx], item)
    return out


# --- RFC 6902 ------------------------------------------------------------------------------

def json_patch(doc, ops):
    """RFC 6902, applied by the `jsonpatch` package (a test dependency)."""
    if not isinstance(ops, list):
        raise TypeError("a JSON patch is a list of operations")
    try:
        return jsonpatch.JsonPatch(ops).apply(doc)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
        raise PatchError(str(e)) from None
    except (KeyError, TypeError) as e:      # an operation without "path" or "value"
        raise PatchError(f"invalid operation: {e!r}") from None

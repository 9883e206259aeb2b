"""PATCH bodies for the Kubernetes API stand-in: JSON merge patch (RFC 7386), a strategic
merge patch that covers what clients send for pods and their templates, and JSON patch
(RFC 6902, via the `jsonpatch` package when it is installed).

The strategic merge patch is a simplification of the real one: it is a merge patch in
which lists of objects are merged by their merge key (`name` for containers, env,
volumes and most lists; `containerPort` for container ports, `port` for service ports,
`mountPath` for volume mounts) and a list item `{"$patch": "delete", <key>: ...}` removes
that item. Other directives (`$retainKeys`, `$setElementOrder/...`, `$deleteFromPrimitiveList`)
are accepted and ignored, except `$patch: replace` on a map.
"""
from __future__ import annotations

import copy

try:
    import jsonpatch
except ImportError:          # not a dependency: the operations below cover RFC 6902
    jsonpatch = None


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

def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: list, token: str, *, insert=False) -> int:
    if token == "-" and insert:
        return len(container)
    if not token.isdigit() or (len(token) > 1 and token.startswith("0")):
        raise PatchError(f"invalid array index {token!r}")
    i = int(token)
    if i > len(container) or (i == len(container) and not insert):
        raise PatchError(f"array index {i} out of range")
    return i


def _parent(doc, parts):
    cur = doc
    for p in parts[:-1]:
        if isinstance(cur, dict):
            if p not in cur:
                raise PatchError(f"missing path element {p!r}")
            cur = cur[p]
        elif isinstance(cur, list):
            cur = cur[_index(cur, p)]
        else:
            raise PatchError(f"cannot descend into {p!r}")
    return cur


def _get(doc, path):
    parts = _pointer(path)
    if not parts:
        return doc
    parent = _parent(doc, parts)
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"path {path!r} does not exist")
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last)]
    raise PatchError(f"path {path!r} does not exist")


def _add(doc, path, value):
    parts = _pointer(path)
    if not parts:
        return value
    parent = _parent(doc, parts)
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, insert=True), value)
    else:
        raise PatchError(f"cannot add at {path!r}")
    return doc


def _remove(doc, path):
    parts = _pointer(path)
    if not parts:
        raise PatchError("cannot remove the whole document")
    parent = _parent(doc, parts)
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"path {path!r} does not exist")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last))
    raise PatchError(f"path {path!r} does not exist")


def json_patch(doc, ops):
    if not isinstance(ops, list):
        raise TypeError("a JSON patch is a list of operations")
    if jsonpatch is not None:
        try:
            return jsonpatch.JsonPatch(ops).apply(doc)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
            raise PatchError(str(e)) from None
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid operation {op!r}")
        kind, path = op["op"], op["path"]
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"operation {kind} needs a value")
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)
            if _pointer(path):
                _remove(doc, path)
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "move":
            value = _remove(doc, op["from"])
            doc = _add(doc, path, value)
        elif kind == "copy":
            doc = _add(doc, path, copy.deepcopy(_get(doc, op["from"])))
        elif kind == "test":
            if _get(doc, path) != op["value"]:
                raise PatchError(f"testing value {path} failed")
        else:
            raise PatchError(f"unknown operation {kind!r}")
    return doc

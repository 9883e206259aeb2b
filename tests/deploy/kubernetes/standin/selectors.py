"""Label and field selectors of the Kubernetes API stand-in, parsed as a real server does.

Label selectors (`labelSelector=`): `a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`,
`a notin (x)`, `a>1`, `a<1`, comma-separated (all must hold). Field selectors
(`fieldSelector=`): `path=value`, `path==value`, `path!=value` on the fields each kind
supports (`metadata.name` and `metadata.namespace` everywhere, a few more per kind);
another field is a 400 "field label not supported", as on a real server.
"""
from __future__ import annotations

import re
from typing import Callable

from .store import BadRequest

_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                  r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not inside a set's parentheses."""
    terms, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    terms.append("".join(cur))
    return [t.strip() for t in terms if t.strip()]


def _bad(term: str, why: str) -> BadRequest:
    return BadRequest(f"unable to parse requirement: {why}: {term!r}")


def _check_key(term, key):
    if not _KEY.match(key) or len(key.split("/")[-1]) > 63:
        raise _bad(term, f"invalid label key {key!r}")


def _check_value(term, value):
    if not _VALUE.match(value) or len(value) > 63:
        raise _bad(term, f"invalid label value {value!r}")


_SET = re.compile(r"^(?P<key>[^\s!=<>()]+)\s+(?P<op>in|notin)\s*\((?P<vals>[^()]*)\)$")
_CMP = re.compile(r"^(?P<key>[^\s!=<>()]+)\s*(?P<op>==|=|!=|>|<)\s*(?P<val>[^\s!=<>()]*)$")


def parse_label_selector(text: str | None) -> Callable[[dict], bool]:
    """A predicate on label dicts; raises BadRequest for a malformed selector."""
    if not text or not text.strip():
        return lambda labels: True
    reqs = []
    for term in _split_terms(text):
        m = _SET.match(term)
        if m:
            key, op = m["key"], m["op"]
            vals = {v.strip() for v in m["vals"].split(",") if v.strip()}
            _check_key(term, key)
            for v in vals:
                _check_value(term, v)
            if op == "in":
                if not vals:
                    raise _bad(term, "for 'in' operator, values set can't be empty")
                reqs.append(lambda L, k=key, vs=vals: k in L and L[k] in vs)
            else:
                reqs.append(lambda L, k=key, vs=vals: k not in L or L[k] not in vs)
            continue
        m = _CMP.match(term)
        if m:
            key, op, val = m["key"], m["op"], m["val"]
            _check_key(term, key)
            if op in ("=", "=="):
                _check_value(term, val)
                reqs.append(lambda L, k=key, v=val: L.get(k) == v)
            elif op == "!=":
                _check_value(term, val)
                reqs.append(lambda L, k=key, v=val: L.get(k) != v)
            else:
                try:
                    num = int(val)
                except ValueError:
                    raise _bad(term, "for 'Gt', 'Lt' operators, the value must be an integer")
                if op == ">":
                    reqs.append(lambda L, k=key, n=num: k in L and _int(L[k]) is not None
                                and _int(L[k]) > n)
                else:
                    reqs.append(lambda L, k=key, n=num: k in L and _int(L[k]) is not None
                                and _int(L[k]) < n)
            continue
        if term.startswith("!"):
            key = term[1:].strip()
            _check_key(term, key)
            reqs.append(lambda L, k=key: k not in L)
            continue
        _check_key(term, term)
        reqs.append(lambda L, k=term: k in L)
    return lambda labels: all(r(labels or {}) for r in reqs)


def _int(s):
    try:
        return int(s)
    except (TypeError, ValueError):
        return None


def label_selector_object_matches(selector: dict | None, labels: dict | None) -> bool:
    """A metav1.LabelSelector ({matchLabels, matchExpressions}) against labels.
    An empty selector matches everything (as for a Deployment's selector)."""
    labels = labels or {}
    selector = selector or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def selector_string(selector: dict | None) -> str:
    """A LabelSelector written as the string form (the Scale subresource's status.selector)."""
    selector = selector or {}
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In":
            parts.append(f"{key} in ({','.join(sorted(values))})")
        elif op == "NotIn":
            parts.append(f"{key} notin ({','.join(sorted(values))})")
        elif op == "Exists":
            parts.append(key)
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
    return ",".join(parts)


# Field selectors each kind supports beyond metadata.name and metadata.namespace.
FIELDS = {
    ("", "pods"): {"spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
                   "spec.serviceAccountName", "spec.hostNetwork", "status.phase",
                   "status.podIP", "status.nominatedNodeName"},
    ("", "events"): {"involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                     "involvedObject.uid", "involvedObject.apiVersion",
                     "involvedObject.resourceVersion", "involvedObject.fieldPath", "reason",
                     "reportingComponent", "source", "type"},
    ("", "secrets"): {"type"},
    ("", "namespaces"): {"status.phase"},
    ("", "nodes"): {"spec.unschedulable"},
    ("", "replicationcontrollers"): {"status.replicas"},
}
_FIELD_TERM = re.compile(r"^(?P<path>[^=!]+?)\s*(?P<op>==|=|!=)\s*(?P<val>.*)$")


def _field_value(obj: dict, path: str) -> str:
    cur = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def parse_field_selector(text: str | None, key) -> Callable[[dict], bool]:
    """A predicate on whole objects; BadRequest for an unsupported field or bad syntax."""
    if not text or not text.strip():
        return lambda obj: True
    allowed = {"metadata.name", "metadata.namespace"} | FIELDS.get(key, set())
    reqs = []
    for term in (t.strip() for t in text.split(",") if t.strip()):
        m = _FIELD_TERM.match(term)
        if not m:
            raise BadRequest(f"invalid selector: '{text}'; can't understand '{term}'")
        path, op, val = m["path"].strip(), m["op"], m["val"].strip()
        if path not in allowed:
            raise BadRequest(f'field label not supported: {path}')
        if op == "!=":
            reqs.append(lambda o, p=path, v=val: _field_value(o, p) != v)
        else:
            reqs.append(lambda o, p=path, v=val: _field_value(o, p) == v)
    return lambda obj: all(r(obj) for r in reqs)

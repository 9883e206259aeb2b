"""The dashboard's link as a user should open it: `Client.dashboard_link` and
`Cluster.dashboard_link`.

The link comes from a template, so that it can point through whatever stands between
the user and the scheduler (an SSH tunnel, a port-forward, jupyter-server-proxy). The
template is `TASKCORE_DASHBOARD_LINK` when set, else `DEFAULT_TEMPLATE`; it may use
`{scheme}`, `{host}`, `{port}`, `{prefix}` (the scheduler's `--dashboard-prefix`, "" or
"/something") and any environment variable, such as `{JUPYTERHUB_SERVICE_PREFIX}` or
`{USER}`. For jupyter-server-proxy:

    TASKCORE_DASHBOARD_LINK='{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status'
"""
from __future__ import annotations

import os
import string

ENV_TEMPLATE = "TASKCORE_DASHBOARD_LINK"
DEFAULT_TEMPLATE = "{scheme}://{host}:{port}{prefix}/status"


class _Fields(dict):
    def __missing__(self, key):
        raise KeyError(f"the dashboard link template {self.template!r} uses {{{key}}}, "
                       f"which is neither scheme, host, port, prefix nor a set environment "
                       f"variable")


def format_link(host: str, port: int, prefix: str = "", scheme: str = "http",
                template: str | None = None) -> str:
    """Fill the template (`template`, else $TASKCORE_DASHBOARD_LINK, else the default)."""
    template = template or os.environ.get(ENV_TEMPLATE) or DEFAULT_TEMPLATE
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"                      # an IPv6 literal in a URL
    fields = _Fields(os.environ)
    fields.template = template
    fields.update(scheme=scheme, host=host, port=port, prefix=normalize_prefix(prefix))
    return string.Formatter().vformat(template, (), fields)


def normalize_prefix(prefix: str | None) -> str:
    """"" or "/a/b" (a leading slash, no trailing one) from "a/b", "/a/b/", None, "/"."""
    prefix = (prefix or "").strip("/")
    return f"/{prefix}" if prefix else ""


def link_from_info(info: dict, reach_host: str | None = None, template: str | None = None):
    """The link for a scheduler described by its info dict (`dashboard_port`,
    `dashboard_host`, `dashboard_prefix`), or None when it serves no dashboard.
    `reach_host` is the host this process reaches the scheduler at; it replaces a
    wildcard or loopback bind address, which says nothing about where to connect."""
    port = info.get("dashboard_port")
    if not port:
        return None
    host = info.get("dashboard_host") or ""
    if reach_host and host in ("", "0.0.0.0", "::", "127.0.0.1", "localhost", "::1"):
        host = reach_host
    return format_link(host or "127.0.0.1", int(port), info.get("dashboard_prefix") or "",
                       template=template)

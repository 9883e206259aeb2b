"""The scheduler's web dashboard: status pages, a JSON API and Prometheus metrics.

`taskcore.dashboard.server.DashboardServer` is the server; docs/dashboard.md describes its
pages, routes and metrics. Nothing is imported here, so that importing the package (for
`link.py`, say) never pulls in the HTTP stack.
"""

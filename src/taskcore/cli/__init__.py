"""Command-line programs: `core-scheduler` (cli/scheduler.py) and `core-worker` (cli/worker.py).

Both print exactly one JSON line on stdout when ready, log to stderr, and exit
with status 0 after SIGTERM or SIGINT. Shared option parsing is in cli/common.py.
"""

"""Site defaults for job queue clusters: one TOML file, one table per batch system.

    # ~/.config/taskcore/jobqueue.toml  (or $TASKCORE_JOBQUEUE_CONFIG)
    [slurm]
    queue = "normal"
    account = "proj-42"
    walltime = "01:00:00"
    job_directives_skip = ["--mem"]   # this site forbids --mem
    header_template = '''
    #SBATCH --job-name={job_name}
    #SBATCH --partition={queue}
    #SBATCH --time={walltime}
    '''

Keys are the cluster's own parameter names (dask-jobqueue's); an explicit
argument always wins over the file. An unknown key is an error that names
the file, so a typo does not silently fall back to a default.
"""
from __future__ import annotations

import os
import tomllib

__all__ = ["config_path", "load_section"]


def config_path() -> str:
    path = os.environ.get("TASKCORE_JOBQUEUE_CONFIG")
    if path:
        return path
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "taskcore", "jobqueue.toml")


def load_section(name: str, allowed) -> dict:
    """The `[name]` table of the config file ({} without file or table)."""
    path = config_path()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if os.environ.get("TASKCORE_JOBQUEUE_CONFIG"):
            raise FileNotFoundError(f"TASKCORE_JOBQUEUE_CONFIG names {path}, which does not "
                                    f"exist") from None
        return {}
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    section = data.get(name) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: [{name}] must be a table")
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ValueError(f"{path}: [{name}] has unknown key(s) {unknown}")
    return dict(section)

#!/usr/bin/env bash
# System packages for the real-component tests (run as root; Debian 12).
# Daemons are never started by the package install: the tests start and stop
# their own instances by PID.
set -euo pipefail
if [ ! -x /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
fi
# openssh-server: the SSHCluster tests run their own sshd (never the system service);
# openssh-client: ssh-keygen for their throwaway keys; util-linux: unshare (hostnames),
# setpriv (munged runs as munge); slurm-wlm, munge: the SLURM job-queue tests run their
# own single-node munged, slurmctld and slurmd (tests/deploy/jobqueue/slurm_server.py);
# gridengine-master, gridengine-exec, gridengine-client: the SGE job-queue tests run their
# own sge_qmaster and sge_execd (tests/deploy/jobqueue/sge_server.py).
PKGS="iproute2 procps openssh-server openssh-client util-linux slurm-wlm munge"
PKGS="$PKGS gridengine-master gridengine-exec gridengine-client"
# oar-server, oar-server-pgsql, oar-node, oar-user, oar-user-pgsql, postgresql-15: the OAR
# job-queue tests run OAR 2.5.9 on one node with its PostgreSQL database
# (tests/deploy/jobqueue/oar_server.py).
PKGS="$PKGS oar-server oar-server-pgsql oar-node oar-user oar-user-pgsql postgresql-15"
# chromium, fonts-dejavu-core: the dashboard's browser tests (playwright drives this binary,
# nothing is downloaded; the fonts give its screenshots text); nginx: the reverse-proxy
# tests (each runs its own instance by PID).
PKGS="$PKGS chromium fonts-dejavu-core nginx"
# python3: OAR refuses root's jobs, so its tests' jobs run as a plain user, who cannot
# enter /root where a pyenv interpreter (and so this venv's python) may live.
PKGS="$PKGS python3"
missing=""
for p in $PKGS; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    # gridengine asks (debconf) whether to configure itself, its cell and master host:
    # answer "yes, cell default, this host" so the postinst creates
    # /var/lib/gridengine/default without asking.
    case "$missing" in
    *gridengine*)
        H="$(hostname)"
        for p in gridengine-common gridengine-master gridengine-exec gridengine-client; do
            printf '%s shared/gridengineconfig boolean true\n' "$p"
            printf '%s shared/gridenginecell string default\n' "$p"
            printf '%s shared/gridenginemaster string %s\n' "$p" "$H"
        done | debconf-set-selections
        ;;
    esac
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
fi
# munge's postinst normally creates the key; SLURM's auth/munge needs it (owner munge, 600).
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
fi
if [ "$(stat -c '%U %a' /etc/munge/munge.key)" != "munge 600" ]; then
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
fi
# postgresql-common creates the cluster 15/main at install; OAR's database lives there.
if [ ! -f /etc/postgresql/15/main/postgresql.conf ]; then
    pg_createcluster 15 main >/dev/null
fi

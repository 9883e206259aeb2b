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
# own single-node munged, slurmctld and slurmd (tests/deploy/jobqueue/slurm_server.py).
PKGS="iproute2 procps openssh-server openssh-client util-linux slurm-wlm munge"
missing=""
for p in $PKGS; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
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

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
# openssh-client: ssh-keygen for their throwaway keys; util-linux: unshare (hostnames).
PKGS="iproute2 procps openssh-server openssh-client util-linux"
missing=""
for p in $PKGS; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
fi

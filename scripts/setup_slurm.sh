#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (slurmctld + slurmd on localhost) for tests/test_launchers.py.
#   sudo scripts/setup_slurm.sh
# Idempotent: installs Debian's slurm-wlm + munge when absent, writes the munge key and slurm.conf when
# missing, starts munged/slurmctld/slurmd when not running, then waits until `sinfo` shows the node idle.
# Fails loudly (never skips) when it cannot set the cluster up. The configuration is the one that worked
# on Debian bookworm / SLURM 22.05 (shared/FACTS.md): proctrack/linuxproc and task/none need no cgroups.
set -euo pipefail

node_state() { sinfo -h -N -o %t 2>/dev/null | head -n 1; }
if [[ $(node_state) == idle ]]; then
  exit 0
fi
if [[ $EUID -ne 0 ]]; then
  echo "setup_slurm.sh: no idle SLURM node and not root: cannot set up a cluster" >&2
  exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { echo "setup_slurm.sh: apt-get not found: install slurm-wlm and munge" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

if [[ ! -s /etc/munge/munge.key ]]; then
  mkdir -p /etc/munge
  mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- munged
fi

host=$(hostname -s)
if [[ ! -f /etc/slurm/slurm.conf ]]; then
  mkdir -p /etc/slurm
  # `slurmd -C` prints this machine's NodeName line (CPUs, sockets, RealMemory) as slurmd will detect them.
  node_line=$(slurmd -C | head -n 1)
  cat >/etc/slurm/slurm.conf <<EOF
# Written by resnest_train scripts/setup_slurm.sh: a one-node test cluster (addresses: no DNS needed).
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it starts again (slurm.conf(5)), then for a scheduler pass:
# with the defaults (120 s, 60 s) a requeue took 2 minutes here, with these 12 s.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
fi
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 60); do
  case $(node_state) in
    idle) sinfo; exit 0 ;;
    # A node left down or drained by an earlier run (e.g. killed daemons) is put back in service.
    down* | drain* | drng*) scontrol update NodeName="$host" State=RESUME || true ;;
  esac
  sleep 0.5
done
echo "setup_slurm.sh: node $host is not idle after 30 s (state: $(node_state)); see /var/log/slurm/" >&2
exit 1

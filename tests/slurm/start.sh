#!/usr/bin/env bash
# Start a single-node SLURM (slurmctld + slurmd + munge) on this machine for the tests, declared
# as a GPU cluster's node: 8 GPUs as `gres` (fake device files; SLURM hands each job its own and
# sets CUDA_VISIBLE_DEVICES to them), 64 CPUs and 512 GB (slurmd trusts these configured sizes over
# the machine's own: SlurmdParameters=config_overrides), a `cpu` partition (the default, 24 h) and
# a `gpu` partition (4 h), and requests beyond a partition's limits refused at submission
# (EnforcePartLimits), as on a real cluster. Memory and CPUs are counted, not enforced.
# Usage: tests/slurm/start.sh STATE_DIR   (prints `export SLURM_CONF=...` on success)
# Needs root and the Debian packages slurm-wlm and munge (installed when missing).
# NODE_GPUS, NODE_CPUS, NODE_MEM_MB, CPU_MAX_TIME, GPU_MAX_TIME override the node and partitions.
set -euo pipefail
STATE=${1:?usage: start.sh STATE_DIR}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >"$STATE/apt.log" 2>&1
fi
HOST=$(hostname -s)
GPUS=${NODE_GPUS:-8}
CPUS=${NODE_CPUS:-64}
MEM=${NODE_MEM_MB:-512000}

# munge: its own key and socket under STATE
mkdir -p "$STATE/munge" && chmod 700 "$STATE/munge"
[ -f "$STATE/munge/munge.key" ] || dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$STATE/munge/munge.key"
munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
  --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/seed"

mkdir -p "$STATE/spool/ctld" "$STATE/spool/d" "$STATE/log"
cat >"$STATE/slurm.conf" <<CONF
ClusterName=iisan-test
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MinJobAge=7200
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM Gres=gpu:$GPUS State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=${CPU_MAX_TIME:-24:00:00} State=UP
PartitionName=gpu Nodes=$HOST MaxTime=${GPU_MAX_TIME:-4:00:00} State=UP
CONF
# one fake device per card: a character device like /dev/null (gres.conf accepts only devices)
mkdir -p "$STATE/dev"
for i in $(seq 0 $((GPUS - 1))); do [ -c "$STATE/dev/nvidia$i" ] || mknod "$STATE/dev/nvidia$i" c 1 3; done
cat >"$STATE/gres.conf" <<CONF
NodeName=$HOST Name=gpu File=$STATE/dev/nvidia[0-$((GPUS - 1))]
CONF
export SLURM_CONF="$STATE/slurm.conf"
# Job steps (srun inside a batch job) read the default location, not SLURM_CONF: install the
# files there, keeping any existing ones (tests/slurm/stop.sh puts them back).
mkdir -p /etc/slurm
for f in slurm.conf gres.conf; do
  if [ -e "/etc/slurm/$f" ] && [ ! -e "$STATE/orig.$f" ]; then cp -p "/etc/slurm/$f" "$STATE/orig.$f"; fi
  cp "$STATE/$f" "/etc/slurm/$f"
done
echo "$STATE" >/etc/slurm/.iisan-test-state
slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 1 30); do
  if timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed"; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "SLURM did not come up; logs in $STATE/log" >&2
sinfo >&2 || true
exit 1

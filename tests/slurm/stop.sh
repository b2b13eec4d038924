#!/usr/bin/env bash
# Stop every daemon tests/slurm/start.sh started in STATE_DIR.
STATE=${1:?usage: stop.sh STATE_DIR}
for pid in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munge/munged.pid"; do
  [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null
done
sleep 1
for pid in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munge/munged.pid"; do
  [ -f "$pid" ] && kill -9 "$(cat "$pid")" 2>/dev/null
done
for f in slurm.conf gres.conf; do
  if [ -e "$STATE/orig.$f" ]; then cp -p "$STATE/orig.$f" "/etc/slurm/$f"; else rm -f "/etc/slurm/$f"; fi
done
rm -f /etc/slurm/.iisan-test-state
exit 0

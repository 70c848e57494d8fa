#!/usr/bin/env bash
# tests/slurm/stop.sh - stop only the daemons that tests/slurm/start.sh started (PIDs in $SLURM_CI_STATE),
# slurmd first, munged last, after cancelling the jobs still queued. Never kills by name.
set -uo pipefail
STATE=${SLURM_CI_STATE:-/run/slurm-ci}
log() { printf '[slurm/stop %(%T)T] %s\n' -1 "$*" >&2; }
declare -A COMM=([slurmd]=slurmd [slurmctld]=slurmctld [slurmdbd]=slurmdbd [mariadb]=mariadbd [munged]=munged)

# cancel remaining jobs first: with proctrack/linuxproc their processes would outlive slurmd
if [ -f "$STATE/slurmctld.pid" ] && scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"; scancel $jobs 2>/dev/null
    for ((i = 0; i < 60; i++)); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.25; done
  fi
fi

for name in slurmd slurmctld slurmdbd mariadb munged; do
  f=$STATE/$name.pid
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  if [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "${COMM[$name]}" ]; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid"
    for ((i = 0; i < 120; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then log "$name did not exit, SIGKILL"; kill -KILL "$pid"; fi
  else
    log "$name (pid ${pid:-?}) not running any more"
  fi
  rm -f "$f"
done

#!/usr/bin/env bash
# stop_local_slurm.sh (adapted for disttrain's tests) - stop what start_local_slurm.sh started, by PID (pid files), never by name.
#   --clean   also delete state, spool, logs and fake GPU nodes under $SLURM_LOCAL_DIR
# Order: cancel jobs (so no slurmstepd is left behind) -> slurmd's -> slurmctld -> munged
# (munged only if start_local_slurm.sh started it) -> remove the /etc/hosts line.
set -uo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/local-slurm}
HOSTS_MARK="# local-slurm-ci"
log() { echo "[local-slurm stop] $*"; }

alive() {  # alive PIDFILE COMM-PREFIX
  local p; p=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$p" ] && [ -r "/proc/$p/comm" ] && [[ "$(cat "/proc/$p/comm")" == "$2"* ]]
}
stop_pidfile() {  # SIGTERM the pid in PIDFILE if it is COMM, wait up to 15 s, then SIGKILL
  local f=$1 comm=$2 p
  if ! alive "$f" "$comm"; then rm -f "$f"; return 0; fi
  p=$(cat "$f"); log "stopping $comm pid $p"; kill "$p"
  for _ in $(seq 150); do alive "$f" "$comm" || break; sleep 0.1; done
  if alive "$f" "$comm"; then log "pid $p still alive, SIGKILL"; kill -9 "$p"; fi
  rm -f "$f"
}

# 1. cancel all jobs while slurmctld/slurmd are still up, wait until the queue is empty
if alive "$DIR/run/slurmctld.pid" slurmctld; then
  mapfile -t jobs < <(squeue -h -o %A 2>/dev/null)
  if [ "${#jobs[@]}" -gt 0 ]; then
    log "cancelling jobs: ${jobs[*]}"; scancel "${jobs[@]}" 2>/dev/null || true
    for _ in $(seq 300); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
  fi
fi
# slurmstepd processes linger ~1 s after a job leaves squeue; give them time to exit
for _ in $(seq 100); do
  # shellcheck disable=SC2009  # exact name match on comm, report-only
  ps -eo comm= | grep -qx slurmstepd || break; sleep 0.1
done

# 2. daemons, by pid file
for f in "$DIR"/run/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f" slurmd; done
stop_pidfile "$DIR/run/slurmctld.pid" slurmctld        # its child slurmscriptd exits with it
[ -e "$DIR/run/munged.pid" ] && stop_pidfile "$DIR/run/munged.pid" munged

# 3. /etc/hosts entry added by the start script (rewrite in place: may be a bind mount)
if grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
  tmp=$(grep -vF "$HOSTS_MARK" /etc/hosts); printf '%s\n' "$tmp" > /etc/hosts
  log "removed node names from /etc/hosts"
fi

# 4. optional cleanup of runtime data (config in /etc/slurm is kept)
if [ "${1:-}" = "--clean" ]; then
  rm -rf "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run" "$DIR/fakegpu" "$DIR"/smoke-*.out
  log "removed state/spool/log/run under $DIR"
fi

# 5. report anything slurm-ish still running (report only; nothing is killed by name)
left=$(ps -eo pid=,comm= | awk '$2 ~ /^(slurmctld|slurmd|slurmstepd|slurmscriptd)$/')
if [ -n "$left" ]; then log "WARNING, still running:"; echo "$left"; exit 1; fi
log "no slurm daemons left running"

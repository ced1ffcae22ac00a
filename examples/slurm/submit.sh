#!/usr/bin/env bash
# Submit a split boft-merge to Slurm: a job array with one task per unit (or N tasks), then the
# finalize job once every task has succeeded (docs/SCALE.md).
#
#   examples/slurm/submit.sh [--workers N] --base BASE --adapter ADAPTER -o OUT
#   examples/slurm/submit.sh --base BASE --batch jobs.json          # a fleet: a task per output file
#
# The arguments after --workers are boft-merge's, passed unchanged to every task. Prints the two
# job ids. Extra sbatch options (partition, account) go in SBATCH_* variables or the scripts.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
workers=""
if [[ "${1:-}" == "--workers" ]]; then
    workers="$2"
    shift 2
fi
if [[ -z "$workers" ]]; then
    # One task per unit: the plan says how many there are.
    plan="$(boft-merge "$@" --plan)"
    workers="$(printf '%s\n' "$plan" | sed -n 's/^  "units_total": \([0-9]*\),$/\1/p')"
    [[ -n "$workers" ]] || { echo "submit.sh: boft-merge --plan printed no units_total" >&2; exit 2; }
fi
array="$(sbatch --parsable --array="0-$((workers - 1))" "$here/unit.sbatch" "$@")"
array="${array%%;*}"
final="$(sbatch --parsable --dependency="afterok:$array" "$here/finalize.sbatch" "$@")"
echo "units: job array $array (${workers} tasks); finalize: job ${final%%;*}"

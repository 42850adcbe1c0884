#!/usr/bin/env bash
# The whole GPU check as one call of the device tool: bench/gpu.sh, then bench/gpu-sanitize.sh,
# within one budget. A lent machine goes back about 30 s after a call returns, so a second call
# would pay for a fresh start out of the session's 15 minutes; this one call does both.
#
#   bench/gpu-run.sh --bundle DIR [--budget 480] [--sanitize 150] [--steps 10] [--rounds 1]
#
# gpu.sh runs with --budget (BUDGET - SANITIZE) and prints its table even when steps are cut;
# the sanitizers (memcheck, then racecheck) share what is left, at least 30 s each, or are
# skipped and say so. Everything is also written under $OUT (default DIR/out): gpu.md (the
# tables and each run's output), gpu.log (all of gpu.sh's output), gpu-tests.log,
# programs-gpu.log and sanitize.log. The last lines printed are gpu.sh's tables and the
# sanitizers' verdicts, so the end of the output (all a device call returns of it) holds them.
# Exit status: 0 when gpu.sh and the sanitizers passed.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bundle="" budget=480 sanitize=150 steps=10 rounds=1
die() { echo "gpu-run.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bundle|--budget|--sanitize|--steps|--rounds)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      declare "${1#--}=$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n $bundle ]] || die "--bundle DIR is required (the folder bench/gpu-bundle.sh packed)"
[[ -d $bundle ]] || die "--bundle: no directory '$bundle'"
for k in budget sanitize steps rounds; do [[ "${!k}" =~ ^[1-9][0-9]*$ ]] || die "--$k must be a positive integer, got '${!k}'"; done
((budget > sanitize + 60)) || die "--budget ($budget s) must leave gpu.sh more than 60 s after --sanitize ($sanitize s)"
export OUT="${OUT:-$bundle/out}"
mkdir -p "$OUT" || die "cannot create OUT=$OUT"

bash "$here/gpu.sh" --bundle "$bundle" --steps "$steps" --rounds "$rounds" --budget $((budget - sanitize)) 2>&1 \
  | tee "$OUT/gpu.log"
gpu_rc=${PIPESTATUS[0]}

left=$((budget - SECONDS - 5))
sanitize_status="skipped: $((left > 0 ? left : 0)) s of the budget left"
san_rc=0
if ((left >= 60)); then
  echo "== compute-sanitizer (bench/gpu-sanitize.sh), $((left / 2)) s a tool"
  SANITIZE_TIMEOUT=$((left / 2)) bash "$here/gpu-sanitize.sh" --bundle "$bundle" >"$OUT/sanitize.log" 2>&1
  san_rc=$?
  sanitize_status="$(grep -E '^   (memcheck|racecheck|initcheck|synccheck): exit' "$OUT/sanitize.log" | sed 's/^ *//' | paste -sd ',' -)"
  [[ -n $sanitize_status ]] || sanitize_status="did not run (exit $san_rc; see sanitize.log)"
fi

echo
echo "== summary ($SECONDS s of a $budget s budget)"
[[ -f $OUT/gpu.md ]] && sed '/^```/,$d' "$OUT/gpu.md"
[[ -f $OUT/sanitize.log ]] && grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Hazard|error" "$OUT/sanitize.log" | head -12
echo "gpu.sh: exit $gpu_rc. compute-sanitizer: $sanitize_status."
((gpu_rc == 0 && san_rc == 0))

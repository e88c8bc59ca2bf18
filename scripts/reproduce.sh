#!/usr/bin/env bash
# Re-run every claim preset of docs/experiments.md on the embedded default (tiny policy, arith, CPU) and
# regenerate its plots and tables: each sweep into $ROOT/<preset>/, then `rewardlab report` (one curve per arm,
# the mean over seeds with their range) into docs/experiments/<preset>/, then the summary tables into
# docs/experiments/tables.md. Two jobs at a time, one thread each (the presets' hydra/launcher=parallel).
#   bash scripts/reproduce.sh                      # every preset
#   bash scripts/reproduce.sh label_free rest_em   # some of them
# Needs `make install` first. Prints each preset's wall time; the last line is the total.
set -euo pipefail
cd "$(dirname "$0")/.."
RL=${RL:-.venv/bin/rewardlab}
ROOT=${ROOT:-runs/reproduce}
DOCS=docs/experiments
PRESETS=("$@")
[ ${#PRESETS[@]} -gt 0 ] || PRESETS=(rest_em label_free pure_learned clip_delta overoptimization credit_assignment temporal_vs_self_rewarding)
mkdir -p "$DOCS" "$ROOT"
start=$(date +%s)
for preset in "${PRESETS[@]}"; do
  [ -f "conf/experiment/$preset.yaml" ] || { echo "error: no preset conf/experiment/$preset.yaml" >&2; exit 2; }
  began=$(date +%s)
  rm -rf "${ROOT:?}/$preset"
  "$RL" train -m "experiment=$preset" "hydra.sweep.dir=$ROOT/$preset" > "$ROOT.$preset.log" 2>&1 \
    || { echo "error: $preset failed; see $ROOT.$preset.log" >&2; exit 1; }
  "$RL" report "$ROOT/$preset" --out "$DOCS/$preset" > /dev/null
  if [ "$preset" = overoptimization ]; then  # the same reward's best-of-n curve (test-time over-optimization)
    rm -rf "${ROOT:?}/overoptimization_best_of_n"
    "$RL" bench-rm bench=best_of_n reward=prm bench.n=16 bench.prompts=64 \
      "hydra.run.dir=$ROOT/overoptimization_best_of_n" > "$DOCS/$preset/best_of_n.txt" 2>> "$ROOT.$preset.log"
    cp "$ROOT/overoptimization_best_of_n/best_of_n.png" "$DOCS/$preset/best_of_n.png"
  fi
  echo "$preset: $(( $(date +%s) - began )) s"
done
{
  echo "# Tables of the claim presets (written by scripts/reproduce.sh; mean ± sd over seeds)"
  for report in "$DOCS"/*/report.md; do  # every preset reproduced so far, not only this call's
    echo; echo "## $(basename "$(dirname "$report")")"; echo
    sed -n '/^| run |/,/^$/p' "$report"
  done
} > "$DOCS/tables.md"
echo "total: $(( $(date +%s) - start )) s"

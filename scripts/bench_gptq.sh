#!/usr/bin/env bash
# The GPTQ quality/speed table in the README: perplexity on the demo model's held-out text for
# float, RTN and GPTQ at 4 and 3 bits, with quantization time. Usage: bash scripts/bench_gptq.sh [OUTDIR]
set -euo pipefail
OUT=${1:-bench_results/gptq}
MODEL=tokenmill/demo_model
DATA=data/demo_heldout.txt
TM=${TM:-.venv/bin/tokenmill}
mkdir -p "$OUT"
$TM eval ppl $MODEL --data $DATA --seq-len 256 --json "$OUT/float.ppl.json"
run() {  # name, quantize flags...
  local name=$1; shift
  /usr/bin/time -f "%e" -o "$OUT/$name.seconds" $TM quantize $MODEL "$OUT/$name" "$@" | tail -1
  $TM eval ppl "$OUT/$name" --data $DATA --seq-len 256 --json "$OUT/$name.ppl.json"
}
run rtn4 --method rtn --bits 4 --group-size 128
run gptq4 --bits 4 --group-size 128
run gptq4-act --bits 4 --group-size 128 --desc-act
run rtn3 --method rtn --bits 3 --group-size 128
run gptq3 --bits 3 --group-size 128

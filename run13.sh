#!/bin/bash
# session 5, call 3: issue 13's Qwen3 rows, batch 8, serving at c=8 with a 50% budget; carry run13.sh and .whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=.:/tmp/site MOETANDEM_CACHE_DIR=/dev/shm/mt-cache PYTHONUNBUFFERED=1
T=$(date +%s); el() { echo "[t+$(( $(date +%s) - T ))s] $*"; }
CS="--new-tokens 128 --repeats 3 --temperature 1.0 --hf-new-tokens 0"
el q; timeout 290 python bench/committee_speed.py --shapes qwen3-30b-a3b-24l --budgets 0.5 0.75 --configs "exact (auto)" balanced $CS --out $OUT/cs_q 2>&1 | grep -v "^{\|^W1" | tail -7
el b8; timeout 130 python bench/committee_speed.py --shapes olmoe-1b-7b --budgets 0.5 --configs "exact (auto)" balanced --batch 8 $CS --out $OUT/cs_b8 2>&1 | grep -v "^{\|^W1" | tail -4
el serve; timeout 120 python bench/serve.py --model /dev/shm/moetandem-bench/olmoe-1b-7b --device cuda --token-prompt --concurrency 1 8 --max-tokens 64 --max-batch 16 --serve-args "--expert-budget 0.5" --out $OUT/serve 2>&1 | tail -6
find $OUT -name "*.png" -delete; find $OUT -name "*.md" -delete; el done

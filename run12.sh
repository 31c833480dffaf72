#!/bin/bash
# session 5, call 2 (fresh machine): the GPU tests cut last call, issue 13's OLMoE grid; carry run12.sh
export PYTHONPATH=. MOETANDEM_CACHE_DIR=/dev/shm/mt-cache PYTHONUNBUFFERED=1
T=$(date +%s); el() { echo "[t+$(( $(date +%s) - T ))s] $*"; }
CS="--new-tokens 128 --repeats 3 --temperature 1.0 --hf-new-tokens 0"
el tests; timeout 150 python -m pytest -v -p no:cacheprovider -m gpu -n 3 --tb=long -W ignore \
  "tests/test_gpu.py::test_exact_committee_tokens_equal_all_resident_in_one_graph" \
  tests/test_switch.py::test_cuda_grouped_path_and_committee > $OUT/t.log 2>&1
grep -E "FAILED|ERROR|passed|failed|Error" $OUT/t.log | tail -12
el grid; timeout 330 python bench/committee_speed.py --shapes olmoe-1b-7b --budgets 0.5 0.25 0.75 --configs "exact (auto)" balanced $CS --out $OUT/cs_o 2>&1 | grep -v "^{\|^W1" | tail -9
el lru; timeout 100 python bench/committee_speed.py --shapes olmoe-1b-7b --budgets 0.5 --configs lru --new-tokens 64 --repeats 1 --temperature 1.0 --hf-new-tokens 0 --out $OUT/cs_lru 2>&1 | grep -v "^{\|^W1" | tail -3
find $OUT -name "*.png" -delete; find $OUT -name "*.md" -delete; el done

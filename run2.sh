#!/bin/bash
# GPU call 2: kernels' GPU tests; decode (new vs the tree of 368fc64) with a profile; committee at 50% on OLMoE
export PYTHONPATH=. MOETANDEM_CACHE_DIR=$OUT/cache
T=$(date +%s); el() { echo "[t+$(( $(date +%s) - T ))s] $*"; }
el tests
timeout 100 python -m pytest -q -m gpu -p no:cacheprovider tests/test_router_kernel.py tests/test_serve_logprobs.py $EXTRA_TESTS 2>&1 | tail -6
el decode-new
timeout 170 python bench/decode.py --shapes olmoe-1b-7b qwen3-30b-a3b-24l --hf --repeats 3 \
  --variants "moetandem CUDA graph + torch.compile" --out $OUT/decode 2>&1 | grep "^|\|Error\|error" | tail -8
el decode-prev
(cd .prev && MOETANDEM_CACHE_DIR=$OUT/cache-prev timeout 80 python bench/decode.py --shapes olmoe-1b-7b --hf --repeats 3 \
  --variants "moetandem CUDA graph + torch.compile" --out $OUT/decode-prev 2>&1 | grep "^|" | tail -3)
el profile
timeout 70 python bench/profile_decode.py --shapes olmoe-1b-7b --graphs --steps 16 --out $OUT/profile 2>&1 | grep "^|\|^  " | head -34
el committee
timeout 200 python bench/committee_speed.py --shapes olmoe-1b-7b --budgets 0.5 --configs "exact (auto)" balanced lru \
  --new-tokens 64 --hf-new-tokens 0 --out $OUT/committee 2>&1 | grep "^|\|Error" | tail -10
el done

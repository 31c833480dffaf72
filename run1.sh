#!/bin/bash
# GPU call 1: verify GPU tests, profile the shipped decode path, family speed vs transformers
export PYTHONPATH=. MOETANDEM_CACHE_DIR=$OUT/cache
nvidia-smi --query-gpu=name,memory.used --format=csv
lscpu | grep -i "model name\|flags" | cut -c1-300 | head -3
(timeout 170 python -m pytest -q -m gpu tests/ -x -k "not every_candidate" -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1; echo "rc=$?" >> $OUT/gpu_tests.txt); tail -15 $OUT/gpu_tests.txt
timeout 120 python bench/profile_decode.py --shapes olmoe-1b-7b --graphs --steps 16 --out $OUT/profile 2>&1 | tail -45
timeout 240 python bench/decode.py --shapes gpt-oss-20b deepseek-v2-lite --new-tokens 64 --repeats 2 --cleanup \
  --variants "moetandem CUDA graph + torch.compile" --out $OUT/families 2>&1 | grep -v Warning | tail -12

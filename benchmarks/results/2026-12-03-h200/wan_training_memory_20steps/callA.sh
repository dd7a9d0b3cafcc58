cd .gpu_snap && mkdir -p /tmp/sf_pkg && ln -sfn "$PWD" /tmp/sf_pkg/self_forcing && export PYTHONPATH=/tmp/sf_pkg PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
B=benchmarks/train_wan_memory_gpu.py
timeout 290 python3 $B --configs 14b:ac,14b:plain --steps 20 --max-seconds 220 --export /tmp/e.safetensors --verbose --out $OUT/mem_14b_20.json > $OUT/mem_14b_20.log 2>&1; echo rc=$?; tail -8 $OUT/mem_14b_20.log
timeout 190 python3 $B --configs 1.3b:ac --steps 20 --max-seconds 170 --verbose --out $OUT/mem_13b_ac_20.json > $OUT/mem_13b_ac_20.log 2>&1; echo rc=$?; tail -4 $OUT/mem_13b_ac_20.log
timeout 80 python3 $B --configs 1.3b:plain --steps 20 --max-seconds 40 --verbose --out $OUT/mem_13b_plain.json > $OUT/mem_13b_plain.log 2>&1; echo rc=$?; tail -4 $OUT/mem_13b_plain.log

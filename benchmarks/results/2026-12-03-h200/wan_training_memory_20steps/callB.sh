cd .gpu_snap && mkdir -p /tmp/sf_pkg && ln -sfn "$PWD" /tmp/sf_pkg/self_forcing && export PYTHONPATH=/tmp/sf_pkg PYTHONUNBUFFERED=1
timeout 410 python3 benchmarks/train_wan_memory_gpu.py --configs 14b:ac+offload --steps 20 --max-seconds 320 --verbose --out $OUT/mem_14b_offload_20.json > $OUT/mem_14b_offload_20.log 2>&1; echo rc=$?; tail -6 $OUT/mem_14b_offload_20.log
timeout 150 python3 benchmarks/long_video_toy.py --device cuda --batch 32 --json $OUT/long_video_toy_b32.json > $OUT/long_video_toy_b32.log 2>&1; echo rc=$?; tail -22 $OUT/long_video_toy_b32.log

cd .gpu_snap && mkdir -p /tmp/sf_pkg && ln -sfn "$PWD" /tmp/sf_pkg/self_forcing && export PYTHONPATH=/tmp/sf_pkg PYTHONUNBUFFERED=1
timeout 575 python3 benchmarks/long_video_gpu.py --steps 1000 --fused --frames 10002 --out $OUT/long_video_gpu_10k.json > $OUT/long_video_gpu_10k.log 2>&1; echo rc=$?; tail -c 3000 $OUT/long_video_gpu_10k.log

# the fourth call (4 denoising steps, 600 latent frames), run inline:
cd .gpu_snap && mkdir -p /tmp/sf_pkg && ln -sfn "$PWD" /tmp/sf_pkg/self_forcing && export PYTHONPATH=/tmp/sf_pkg PYTHONUNBUFFERED=1 && timeout 200 python3 benchmarks/long_video_gpu.py --fused --frames 600 --at 300 --out $OUT/long_video_gpu_4step_600.json > $OUT/long_video_gpu_4step_600.log 2>&1

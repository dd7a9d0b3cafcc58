"""The causal Wan2.1 video model and its streaming sampler (no ComfyUI import anywhere below).

Reading order, top down:

- ``config``: model sizes (1.3B, 14B, tiny) and inferring a config from a state dict;
- ``rope``: Wan's 3-D rotary position embedding (frames, height, width);
- ``mask``: block-causal attention masks for the full-sequence view;
- ``attention``: the attention backends behind one function;
- ``cache``: the KV cache of block-by-block sampling and the prompt's cross-attention K/V;
- ``routing``: attending to the top-k most relevant cached frames;
- ``model``: the Wan2.1 DiT as a causal model (full-sequence forward and KV-cached block forward);
- ``schedule``: the flow-matching schedule (shifted sigmas, warped step lists, noising);
- ``noise``: per-chunk noise of the streaming sampler;
- ``window``: the KV-cache policy of a run (fixed cache, or rolling window + sink, routing);
- ``sampler``: the streaming chunk sampler (one block of frames at a time against the cache);
- ``resample``: self-resampling of history (re-noise its last frames, re-denoise them with the model);
- ``checkpoint``: loading any DiT checkpoint layout and saving one;
- ``latent_format``: raw VAE latents <-> the normalised space the DiT works in;
- ``pipeline``: sampler and streaming VAE decode, overlapped on the GPU;
- ``progress``: progress bars (tqdm when installed, else plain lines on stderr);
- ``text_embeds``: saved prompt embeddings;
- ``weights``: official file downloads/conversion;
- ``vae/``: the Wan2.1 video VAE (``model``: network and streaming encode/decode, ``layers``: its
  causal building blocks, ``checkpoint``: its weight files);
- ``speed/``: opt-in inference speed-ups switched on from outside the model (``kernels``: fused
  elementwise kernels, ``trunk``: the fused inference trunk, ``fp8``: FP8 linear layers, ``graphs``:
  CUDA-graph replay of block forwards).
"""

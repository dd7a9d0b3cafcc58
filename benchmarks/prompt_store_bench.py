"""Prompt store throughput: encode synthetic prompts with a RANDOM umT5 of the real XXL shape (no weights
needed; the numbers are the encoder's compute, not its quality), then read Wan-size batches as the trainer does.

    python benchmarks/prompt_store_bench.py --out $OUT/prompt_store_bench            # H200: umT5-XXL shape
    python benchmarks/prompt_store_bench.py --tiny --prompts 64 --out /tmp/psb       # CPU smoke test

Writes <out>/prompt_store_bench.json: encode prompts/s, store bytes per prompt, read ms per batch, bytes read
per batch, peak host RSS while reading, and the extrapolated encode time of 46k prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time

import torch


def build_encoder(tiny: bool, device: str, dtype: torch.dtype, tok_dir: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    from self_forcing.training.umt5 import UMT5TextEncoder

    vocab_size = 512 if tiny else 256384
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(vocab_size - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tok_dir)
    from transformers import AutoTokenizer

    shape = (dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2) if tiny else
             dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24))
    cfg = UMT5Config(vocab_size=vocab_size, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                     dropout_rate=0.0, **shape)
    with torch.device(device):
        model = UMT5EncoderModel(cfg).to(dtype)
    return UMT5TextEncoder(model, AutoTokenizer.from_pretrained(tok_dir), device=device,
                           name=f"random-umt5-{'tiny' if tiny else 'xxl'}"), vocab_size


def vm_hwm_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="a tiny random encoder (CPU smoke test)")
    p.add_argument("--prompts", type=int, default=2048)
    p.add_argument("--words", type=int, default=60, help="mean words per prompt (VidProM-like length)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--read-batches", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    from self_forcing.training.data import PromptOrder
    from self_forcing.training.prompt_store import PromptStore, encode_store

    os.makedirs(args.out, exist_ok=True)
    store_dir = os.path.join(args.out, "store")
    shutil.rmtree(store_dir, ignore_errors=True)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    encoder, vocab = build_encoder(args.tiny, args.device, dtype, os.path.join(args.out, "tokenizer"))
    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(vocab - 3)}" for _ in range(max(1, int(rng.gauss(args.words, 20)))))
               for _ in range(args.prompts)]
    encoder(prompts[: args.batch_size])  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    store = encode_store(prompts, store_dir, encoder, shard_size=args.shard_size, batch_size=args.batch_size,
                         progress=False)
    encode_s = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(store_dir, f)) for f in os.listdir(store_dir))
    del encoder
    store = PromptStore(store_dir)
    order = PromptOrder(len(store), seed=0)
    hwm0, t1, read = vm_hwm_kib(), time.perf_counter(), 0
    for step in range(args.read_batches):
        before = store.bytes_read
        store.batch(order(range(step, step + 1), "dmd"), args.text_len, "cpu", torch.float32)
        read += store.bytes_read - before
    read_s = time.perf_counter() - t1
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "encoder": store.encoder_id, "prompts": len(store), "tokens": store.manifest["tokens"],
        "encode_s": round(encode_s, 2), "encode_prompts_per_s": round(len(store) / encode_s, 1),
        "est_encode_46k_min": round(46000 / (len(store) / encode_s) / 60, 1),
        "store_bytes": size, "store_bytes_per_prompt": round(size / len(store)),
        "read_ms_per_batch1": round(1000 * read_s / args.read_batches, 2),
        "bytes_read_per_batch1": round(read / args.read_batches),
        "read_rss_growth_mib": round((vm_hwm_kib() - hwm0) / 1024, 1),
    }
    with open(os.path.join(args.out, "prompt_store_bench.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    shutil.rmtree(store_dir, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

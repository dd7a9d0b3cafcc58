"""``python -m self_forcing.training.encode_prompts PROMPTS --encoder WEIGHTS --out STORE``

Encode a prompt list (text, CSV/TSV or JSON Lines) once with umT5-XXL into a prompt store for the Wan trainer
(``world.prompt_store``): sharded bf16 safetensors, unpadded, with a manifest and Wan's negative prompt.
Rerun the same command to finish an interrupted encode. Needs ``transformers`` (the ``train`` extra).
"""

from __future__ import annotations

import argparse
import sys

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def build_parser() -> argparse.ArgumentParser:
    from .prompt_store import DEFAULT_SHARD_SIZE

    p = argparse.ArgumentParser(prog="python -m self_forcing.training.encode_prompts",
                                description="Encode a prompt list once with umT5-XXL into a prompt store "
                                            "for the Wan trainer (world.prompt_store).")
    p.add_argument("prompts", help="prompt list: .txt (one a line), .csv/.tsv (a prompt/text/caption column, "
                                   "else the first), .jsonl (a prompt/text/caption key)")
    p.add_argument("--encoder", required=True,
                   help="umT5 weights: Wan's models_t5_umt5-xxl-enc-bf16.pth, a transformers/diffusers folder, "
                        "or a .safetensors with transformers key names (ComfyUI's umt5_xxl_*.safetensors)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: found next to the weights, e.g. Wan's google/umt5-xxl)")
    p.add_argument("--out", required=True, help="the store folder (created; an unfinished one is resumed)")
    p.add_argument("--format", default=None, choices=["text", "csv", "tsv", "jsonl"],
                   help="prompt-list format (default: from the extension)")
    p.add_argument("--column", default=None, help="CSV/TSV column or JSON Lines key holding the prompt")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N prompts")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="prompts per shard file")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per encoder forward")
    p.add_argument("--max-tokens", type=int, default=512, help="tokenizer truncation (Wan: 512)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="encoder compute dtype")
    neg = p.add_mutually_exclusive_group()
    neg.add_argument("--negative-prompt", default=None,
                     help="unconditional text stored with the prompts (default: Wan's Chinese negative prompt)")
    neg.add_argument("--no-negative", action="store_true", help="store no negative prompt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store of other prompts or another encoder in --out")
    p.add_argument("--verify", action="store_true", help="check every file's sha256 after encoding")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None, encoder=None) -> int:
    """Run the command line; ``encoder`` (a callable list[str] -> [tokens, dim] tensors) replaces loading
    ``--encoder`` (tests, other encoders)."""
    args = build_parser().parse_args(argv)
    import torch

    from .prompt_store import NEGATIVE_PROMPT, PromptStore, encode_store
    from .prompts import read_prompts

    try:
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        prompts = read_prompts(args.prompts, args.format, args.column)[: args.limit]
        negative = None if args.no_negative else (args.negative_prompt if args.negative_prompt is not None
                                                  else NEGATIVE_PROMPT)
        if encoder is None:
            from .umt5 import load_umt5

            device = args.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            print(f"loading umT5 from {args.encoder} on {device} ...", file=sys.stderr)
            encoder = load_umt5(args.encoder, args.tokenizer, device=device, dtype=getattr(torch, DTYPES[args.dtype]),
                                max_tokens=args.max_tokens)
        store = encode_store(prompts, args.out, encoder, shard_size=args.shard_size, batch_size=args.batch_size,
                             negative=negative, max_tokens=args.max_tokens, overwrite=args.overwrite,
                             progress=not args.no_progress)
        if args.verify:
            PromptStore(args.out, verify=True)
    except (ValueError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = store.manifest
    print(f"{args.out}: {m['count']} prompts, {m['tokens']} tokens ({m['tokens'] / m['count']:.1f} per prompt), "
          f"dim {m['dim']}, {len(m['shards'])} shard(s), encoder {m['encoder']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

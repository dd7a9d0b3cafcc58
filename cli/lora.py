"""LoRAs on the command line: ``generate --lora FILE [--lora-strength S] [--lora-alpha A]`` (merged at load by the
one loader, ``sf_model.checkpoint.load_state_dict_file``) and ``self-forcing convert-lora SRC DST``.

``convert-lora`` rewrites a LoRA in any format the loader reads (LongLive's peft ``lora.pt``, diffusers names,
ComfyUI's own) as a safetensors file in ComfyUI core's key format (``diffusion_model.<linear>.lora_down.weight`` /
``lora_up.weight`` / ``alpha``), which core ``LoraLoaderModelOnly`` and the 'Load Self Forcing Model' node read::

    self-forcing convert-lora lora.pt ComfyUI/models/loras/longlive_lora.safetensors

peft files store no alpha: alpha = rank (LongLive's setting) unless ``--alpha`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """The LoRA flags of ``self-forcing generate``."""
    p.add_argument("--lora", default=None, metavar="FILE",
                   help="a LoRA merged into the model at load (ComfyUI, peft or diffusers keys, e.g. LongLive's "
                        "lora.pt next to longlive_base.pt)")
    p.add_argument("--lora-strength", type=float, default=None, metavar="S",
                   help="how much of the LoRA is merged (default 1; 0 = the model as it is; needs --lora)")
    p.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help="the LoRA's alpha where the file stores none (peft; default alpha = rank; needs --lora)")


def lora_options(args) -> dict:
    """``load_state_dict_file``'s LoRA arguments from the flags; a missing file or a strength/alpha without
    ``--lora`` is a ValueError naming the flag."""
    if args.lora is None:
        for flag, value in (("--lora-strength", args.lora_strength), ("--lora-alpha", args.lora_alpha)):
            if value is not None:
                raise ValueError(f"{flag} needs --lora FILE")
        return {}
    if not os.path.isfile(args.lora):
        raise ValueError(f"--lora: LoRA file not found: {args.lora}")
    strength = 1.0 if args.lora_strength is None else args.lora_strength
    if strength != strength or abs(strength) == float("inf"):
        raise ValueError(f"--lora-strength must be a finite number, got {strength}")
    return {"lora": args.lora, "lora_strength": strength, "lora_alpha": args.lora_alpha}


# -- self-forcing convert-lora --------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert-lora", help="rewrite a LoRA (e.g. LongLive's peft lora.pt) in ComfyUI "
                                                   "core's key format (safetensors)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="the LoRA: ComfyUI, peft (lora_A/lora_B) or diffusers keys, "
                                              ".safetensors or .pt")
    p.add_argument("dst", metavar="DST", help="the file to write (.safetensors; replaced atomically if it exists)")
    p.add_argument("--alpha", type=float, default=None,
                   help="alpha for files that store none (peft); default alpha = rank")
    p.set_defaults(run=run)
    return p


def summary(path: str) -> str:
    """Key count, linears, rank(s) and alpha(s) of a LoRA file in core's format (its header and alphas only)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        keys = list(f.keys())
        ranks = sorted({f.get_slice(k).get_shape()[0] for k in keys if k.endswith(".lora_down.weight")})
        alphas = sorted({float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")})
    linears = sum(k.endswith(".lora_down.weight") for k in keys)
    show = lambda xs: "/".join(f"{x:g}" for x in xs)  # noqa: E731
    return f"{len(keys)} keys ({linears} linears), rank {show(ranks)}, alpha {show(alphas)}"


def run(args) -> int:
    from ..sf_model.checkpoint import convert_lora

    try:
        if not os.path.isfile(args.src):
            raise ValueError(f"LoRA file not found: {args.src}")
        if not args.dst.endswith(".safetensors"):
            raise ValueError(f"DST {args.dst} must end in .safetensors (the file written is safetensors)")
        if os.path.exists(args.dst) and os.path.samefile(args.src, args.dst):
            raise ValueError(f"SRC and DST are the same file ({args.src}); give another DST")
        folder = os.path.dirname(os.path.abspath(args.dst))
        if not os.path.isdir(folder):
            raise ValueError(f"DST {args.dst}: the folder {folder} does not exist")
        dst = convert_lora(args.src, args.dst, args.alpha)
        print(f"wrote {dst}: {summary(dst)}")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

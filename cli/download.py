"""``self-forcing download``: fetch the official weights into ComfyUI's model folders.

    self-forcing download --models-dir ComfyUI/models                 # all three files
    self-forcing download --models-dir ComfyUI/models --only self-forcing vae
    self-forcing download --list                                      # what, from where, to where
    self-forcing download --models-dir ComfyUI/models --from-file ~/Downloads/self_forcing_dmd.pt

Files already present are skipped. Offline (or with HF_HUB_OFFLINE=1) it stops at once and prints, for
every missing file, the URL and the folder to put it in by hand.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..sf_model import weights

EXIT_OK, EXIT_FAILED, EXIT_OFFLINE = 0, 1, 2


def default_models_dir() -> Path | None:
    """ComfyUI's models folder when this package sits in ComfyUI/custom_nodes/<pack>; else None."""
    env = os.environ.get("COMFYUI_MODELS_DIR")
    if env:
        return Path(env)
    pack = Path(__file__).resolve().parent.parent
    if pack.parent.name == "custom_nodes":
        return pack.parent.parent / "models"
    return None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("download", help="download the official model files into ComfyUI's model folders",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=None,
                   help="ComfyUI's models folder (default: $COMFYUI_MODELS_DIR, or ../../models when installed in "
                        "ComfyUI/custom_nodes)")
    p.add_argument("--only", nargs="+", choices=[f.key for f in weights.OFFICIAL_FILES], metavar="FILE",
                   help=f"download only these ({', '.join(f.key for f in weights.OFFICIAL_FILES)})")
    p.add_argument("--list", action="store_true", help="print the files, their sources and target folders, then exit")
    p.add_argument("--from-file", type=Path, metavar="PT",
                   help="convert an already downloaded Self Forcing checkpoint (.pt) instead of downloading it")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="precision of the converted Self Forcing safetensors (default bf16, 2.8 GB)")
    p.add_argument("--keep-pt", action="store_true", help="keep the downloaded .pt next to the conversion")
    p.add_argument("--endpoint", default=None, help="Hugging Face endpoint or mirror (default: $HF_ENDPOINT or the Hub)")
    p.add_argument("--token", default=None, help="Hugging Face token (default: the logged-in one, if any)")
    p.set_defaults(func=run, run=run)
    return p


def _folder_of(models_dir: Path):
    return lambda f: str(models_dir / f.folder)


def run(args) -> int:
    files = [f for f in weights.OFFICIAL_FILES if not args.only or f.key in args.only]
    models_dir = args.models_dir or default_models_dir()
    if args.list:
        where = _folder_of(models_dir) if models_dir else (lambda f: f"<ComfyUI>/models/{f.folder}")
        for f in files:
            print(f"{f.key:13s} {f.name}\n{'':13s} from {f.url}\n{'':13s} into {where(f)}  ({f.description})")
        return EXIT_OK
    if models_dir is None:
        print("error: say where ComfyUI's models folder is: --models-dir PATH (or set COMFYUI_MODELS_DIR)",
              file=sys.stderr)
        return EXIT_FAILED
    folder_of = _folder_of(models_dir)
    try:
        if args.from_file is not None:
            src = args.from_file
            if not src.is_file():
                print(f"error: {src} does not exist", file=sys.stderr)
                return EXIT_FAILED
            dst = Path(folder_of(weights.SELF_FORCING)) / weights.SELF_FORCING.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            print(f"converting {src} -> {dst} ({args.dtype})")
            weights.convert_checkpoint(src, dst, dtype=args.dtype, source={"path": str(src)})
            files = [f for f in files if f is not weights.SELF_FORCING]
            if not files:
                return EXIT_OK
        weights.ensure_files(files, folder_of, endpoint=args.endpoint, token=args.token, dtype=args.dtype,
                             keep_source=args.keep_pt)
    except weights.WeightsUnavailable as e:
        print(str(e), file=sys.stderr)
        return EXIT_OFFLINE
    except (weights.WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv=None) -> int:
    """Standalone use: python -m self_forcing.cli.download ..."""
    parser = argparse.ArgumentParser(prog="self-forcing")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""What the in-process real-ComfyUI checks share (``tests/comfy_lora_e2e.py``, ``tests/comfy_core_model_e2e.py``;
not part of CI: CI has no ComfyUI): their command line, the Wan-shaped random model ComfyUI's detection accepts,
random LoRA adapters, running a script in ComfyUI's own Python (no server) and the PASS/FAIL report.

The scripts import it as a sibling module (``python tests/<script>.py`` puts ``tests/`` first on ``sys.path``).
Defaults of the command line: ``$COMFY_DIR``, else ``$COMFY_HARNESS_HOME/ComfyUI`` (``COMFY_HARNESS_HOME``
default ``~/comfy-harness``); the python of ``$COMFY_VENV`` (default ``$COMFY_HARNESS_HOME/venv``). Nothing is
written into ComfyUI (no bytecode).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# dim 256 = 2 heads of 128, which ComfyUI's Wan detection assumes; the text side as Wan's (umT5, 512 tokens)
WAN_SHAPED = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=4096, text_len=512, freq_dim=256)


def parse_args(description: str, work_prefix: str) -> tuple[argparse.Namespace, Path]:
    """(--comfy-dir, --comfy-python, --work), and the work folder made (a new temporary one by default)."""
    home = Path(os.environ.get("COMFY_HARNESS_HOME", Path.home() / "comfy-harness"))
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy-dir", default=os.environ.get("COMFY_DIR", str(home / "ComfyUI")))
    ap.add_argument("--comfy-python", default=str(Path(os.environ.get("COMFY_VENV", home / "venv")) / "bin" / "python"))
    ap.add_argument("--work", default=None, help="folder for the files (default: a new temporary folder)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix=work_prefix))
    work.mkdir(parents=True, exist_ok=True)
    return args, work


def wan_shaped_model(seed: int = 0):
    """(config, a float32 CPU model of ``WAN_SHAPED``) as the trainer builds it (``training.models.build_model``)."""
    import torch

    from self_forcing.sf_model.config import WanConfig
    from self_forcing.training.models import build_model

    cfg = WanConfig(**WAN_SHAPED)
    return cfg, build_model(cfg, seed, torch.device("cpu"))


def with_random_lora(base, scale: float, seed: int = 3, *, rank: int = 8, alpha: float = 4.0):
    """A copy of ``base`` with LoRA adapters (``training.lora.apply_lora``) whose up-projections (``lora_B``,
    zero after the init) are drawn N(0, scale^2), so the adapters change the weights."""
    import copy

    import torch

    from self_forcing.training.config import LoraConfig
    from self_forcing.training.lora import apply_lora

    model = apply_lora(copy.deepcopy(base), LoraConfig(rank=rank, alpha=alpha), seed=1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def run_in_comfy(args: argparse.Namespace, code: str, work: Path, *, with_package: bool = False) -> dict | None:
    """Run ``code`` (argv: the work folder) in ComfyUI's python with ComfyUI's folder as the working directory
    and on the path; ``with_package``: this repository importable there as ``self_forcing`` (a link in
    ``work/pkg``, nothing installed). Returns the JSON object of its last output line, or None (its output
    printed) when it failed."""
    paths = [args.comfy_dir]
    if with_package:
        pkg = work / "pkg"
        pkg.mkdir(exist_ok=True)
        if not (pkg / "self_forcing").exists():
            (pkg / "self_forcing").symlink_to(REPO, target_is_directory=True)
        paths.append(str(pkg))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([args.comfy_python, "-c", code, str(work)], cwd=args.comfy_dir, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, sep="\n")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(summary: dict, checks: dict[str, bool]) -> int:
    """Print ``summary`` (JSON) and one PASS/FAIL line per check; the exit status (0: all passed)."""
    print(json.dumps(summary, indent=1))
    for name, ok in checks.items():
        print(("PASS " if ok else "FAIL ") + name)
    return 0 if all(checks.values()) else 1

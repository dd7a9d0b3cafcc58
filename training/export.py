"""Export: the EMA generator to one safetensors file our loader, nodes, CLI and ComfyUI core read.

The file holds bare Wan keys, ``config = {"transformer": {"causal_ar": true}}`` (what core reads), and our
metadata: the architecture, frames per block, the step list and shift, and -- for the toy -- everything
needed to rebuild its text encoder and codec, whose weights are bundled (``extras``). The training config
summary and the measured drift (if the eval stage ran) go into the metadata and the model card.
``--push-to-hub REPO`` (``export.hub_repo``) uploads the file and a README model card with
``huggingface_hub``.

A generator trained with LoRA (``[lora] enabled``) is exported twice: merged (the file above, like any other
generator) and as ``<name>_lora.safetensors`` next to it, the adapters alone in the key format ComfyUI's
core LoRA loader reads (``training.lora``), to apply on the generator's starting checkpoint.
"""

from __future__ import annotations

import json
import os

import torch

from .config import TrainConfig
from .lora import lora_path, read_lora, save_lora

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_export_path(cfg: TrainConfig) -> str:
    return cfg.export.path or os.path.join(cfg.run.out_dir, f"self_forcing_{cfg.world.kind}.safetensors")


def eval_summary(cfg: TrainConfig) -> dict | None:
    path = os.path.join(cfg.run.out_dir, "eval.json")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        data = json.load(fh)
    return data.get("summary")


def trained_steps(cfg: TrainConfig) -> dict:
    """Steps each stage actually ran (time-boxed stages may stop early), read from the stage outputs."""
    from ..sf_model.checkpoint import FORMAT_KEY, read_file
    from .dmd import self_forcing_path
    from .ode_init import ode_init_path
    from .teacher import teacher_path

    out = {}
    for stage, path in (("teacher", teacher_path(cfg)), ("ode_init", ode_init_path(cfg)),
                        ("dmd", self_forcing_path(cfg))):
        if os.path.isfile(path):
            _, meta = read_file(path)
            out[stage] = json.loads(meta.get(FORMAT_KEY, "{}")).get("steps_trained")
    return out


def export_model(cfg: TrainConfig, world, source: str, path: str | None = None, *, role: str = "self_forcing",
                 publish: bool = True, extra_meta: dict | None = None) -> str:
    """Write the export of ``source`` (a stage output) to ``path`` (default from the config); ``role`` names
    the model (``self_forcing``, ``causal_init``, ``teacher_forcing``, ``diffusion_forcing``); ``publish``
    allows the Hub upload when configured; ``extra_meta`` is added to the metadata (e.g. the compute a
    baseline got)."""
    from ..toy.bundle import bundle_extras, bundle_meta
    from .models import load_dit, save_dit
    from .ode_init import sampling_meta

    path = path or default_export_path(cfg)
    lora_source = lora_path(cfg) if role == "self_forcing" and cfg.lora.enabled else None
    if lora_source and not os.path.isfile(lora_source):
        raise ValueError(f"lora.enabled but {lora_source} does not exist: the dmd stage did not train LoRA")
    model, src_meta = load_dit(source, torch.device("cpu"))
    drift = eval_summary(cfg)
    meta = {
        **sampling_meta(cfg),
        "steps_trained": trained_steps(cfg),
        "name": f"{role.replace('_', '-')}-{cfg.world.kind}",
        "training": {"summary": cfg.summary(), "steps_trained": src_meta.get("steps_trained")},
    }
    if drift is not None:
        meta["drift"] = drift
    meta.update(extra_meta or {})
    extras = None
    if world.kind == "toy":
        c, f, h, w = world.clip_shape
        meta["toy"] = bundle_meta(world.text_encoder, cfg.world.size, (h, w), f)
        extras = bundle_extras(world.text_encoder, world.codec)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_dit(path, model, cfg.model, role, meta, dtype=DTYPES[cfg.export.dtype], extras=extras)
    files = [path]
    if lora_source:
        files.append(export_lora(cfg, lora_source, lora_export_path(path), {"name": meta["name"] + "-lora"}))
    if cfg.export.hub_repo and publish:
        push_to_hub(files, cfg.export.hub_repo, model_card(cfg, meta), private=cfg.export.hub_private)
    return path


def lora_export_path(path: str) -> str:
    """The LoRA file next to the merged export ``path``: ``<stem>_lora.safetensors``."""
    stem, ext = os.path.splitext(path)
    return f"{stem}_lora{ext or '.safetensors'}"


def export_lora(cfg: TrainConfig, source: str, path: str, extra_meta: dict | None = None) -> str:
    """Rewrite the stage's LoRA file ``source`` as the export (``export.dtype``; alpha stays float32) with
    the sampling settings in its metadata; the stage's own metadata (its base checkpoint) is kept."""
    from .ode_init import sampling_meta

    weights, meta = read_lora(source)
    meta = {**meta, **sampling_meta(cfg), "steps_trained": trained_steps(cfg), **(extra_meta or {})}
    return save_lora(path, weights, meta, dtype=DTYPES[cfg.export.dtype])


def model_card(cfg: TrainConfig, meta: dict) -> str:
    """A README for the Hub: what the model is, how it was trained, and the drift that was measured."""
    s = cfg.sampling
    mc = cfg.model
    lines = [
        "---", "library_name: self-forcing-stream", "tags: [video-generation, self-forcing, causal, wan]", "---", "",
        f"# {meta.get('name', 'self-forcing')}", "",
        "A block-causal Wan-architecture video DiT trained with Self Forcing (DMD) by "
        "[self-forcing-stream](https://github.com/self-forcing-stream/self-forcing-stream).", "",
        "## Architecture", "",
        f"dim {mc.dim}, {mc.num_layers} layers, {mc.num_heads} heads, ffn {mc.ffn_dim}, text {mc.text_len}x{mc.text_dim}; "
        f"{s.frames_per_block} latent frames per block; steps {list(s.steps)} (shift {s.shift}, warped: {s.warp}).", "",
        "## Training", "",
        "| stage | steps | batch x accum | lr |", "|---|---|---|---|",
    ]
    if cfg.world.kind == "toy":
        lines.append(f"| teacher (flow matching) | {cfg.teacher.steps} | {cfg.teacher.batch_size} x "
                     f"{cfg.teacher.grad_accum} | {cfg.teacher.lr} |")
    lines += [
        f"| ODE pairs | {cfg.ode_pairs.count} pairs | {cfg.ode_pairs.batch_size} | CFG {cfg.ode_pairs.guidance} |",
        f"| ODE init | {cfg.ode_init.steps} | {cfg.ode_init.batch_size} x {cfg.ode_init.grad_accum} | {cfg.ode_init.lr} |",
        f"| Self Forcing DMD | {cfg.dmd.steps} (critic ratio {cfg.dmd.critic_ratio}) | {cfg.dmd.batch_size} x "
        f"{cfg.dmd.grad_accum} | {cfg.dmd.lr} / critic {cfg.dmd.lr_critic} |", "",
        f"World: {cfg.world.kind}, training clips of {cfg.world.frames} latent frames.", "",
    ]
    if cfg.lora.enabled:
        lc = cfg.lora
        lines += [f"Generator trained as LoRA: rank {lc.rank}, alpha {lc.alpha}, dropout {lc.dropout} on "
                  f"{', '.join(lc.targets)} of every block; this file has the adapters merged, and "
                  "`*_lora.safetensors` holds them alone (ComfyUI: LoraLoaderModelOnly on the generator's "
                  "starting checkpoint).", ""]
    drift = meta.get("drift")
    if drift:
        lines += ["## Measured drift", "", "```json", json.dumps(drift, indent=1, sort_keys=True), "```", ""]
    lines += ["## Training config", "", "```json", json.dumps(cfg.summary(), indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)


def push_to_hub(path, repo: str, card: str, private: bool = False, token: str | None = None) -> str:
    """Upload the export (a path, or a list of paths: the merged file and its LoRA) and its model card;
    returns the repo URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise ValueError("publishing needs huggingface-hub: pip install 'self-forcing-stream[hub]'") from e
    api = HfApi(token=token)
    url = api.create_repo(repo, private=private, exist_ok=True)
    for file in ([path] if isinstance(path, (str, os.PathLike)) else path):
        api.upload_file(path_or_fileobj=file, path_in_repo=os.path.basename(file), repo_id=repo,
                        commit_message="Upload Self Forcing export")
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo,
                    commit_message="Model card")
    return str(url)

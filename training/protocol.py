"""The evaluation protocol of the toy comparison: long videos from exported toy bundles, per-frame metrics,
bootstrap confidence intervals over prompts (and training seeds), paired differences between models.

    python -m self_forcing.training.protocol --models self_forcing=a.safetensors teacher_forcing=b.safetensors \\
        --out results/
    python -m self_forcing.training.protocol --runs runs/baselines/seed* --out results/   # every export found

Setup (``Protocol``; every model sees exactly the same prompts, seeds and batch layout):

- prompts: ``prompts`` (64) scenes of the toy world's own generator (``toy.world.sample_scene`` through
  ``training.data.toy_scene``, stream "protocol", seed ``prompt_seed``), the same for every model and run;
- sampling seeds: ``seeds`` (3); batch b of sampling seed s uses sampler seed ``s * 100003 + b`` (the noise
  of a batch depends on its layout, which is fixed: ``batch_size`` prompts in prompt order);
- lengths: ``lengths`` x the training clip length (1, 5, 10, 20), through a rolling KV cache of the training
  length with the checkpoint's attention sink (``CachePolicy.rolling(frames_per_block, train_frames, sink)``,
  the sink read as ``sf_model.window.default_policy`` reads it: ``checkpoint_sink``), each model with its own
  stored sampler settings (steps, shift, solver). The longest video is generated once and the shorter lengths are its prefixes:
  the sampler is causal and its noise is drawn per chunk, so a video of n frames *is* the first n frames
  of a longer one (``tests/test_protocol.py`` checks this);
- metrics: ``metrics_fn(videos [B, 3, T, H, W] in [-1, 1], prompts) -> {name: [B, T]}`` (default
  ``toy.metrics.video_metrics``, in prompt mode: the videos are generated from prompts alone), measured on the
  generation device unless ``metrics_device = "cpu"``; metrics undefined everywhere (all NaN) are left out;
  per video and length: the mean over its frames ("mean") and over its last training-length window ("last");
- units: one value per (training seed, prompt) -- the sampling seeds averaged within it; the point estimate
  is the mean over units and the 95 % CI the percentile bootstrap over units (``bootstrap`` resamples);
- paired differences A - B per (training seed, prompt) unit (runs of one index are paired: seed folders
  hold one model of each kind), with the same bootstrap;
- per-window curves: the mean of each training-length window of the longest videos, with CIs.

Outputs in ``--out``: ``results.json`` (setup, models with their training steps and compute, tables,
paired differences, curves), ``results.md`` (the tables), ``raw.npz`` (every per-frame value, per model:
[training seeds, prompts, sampling seeds, frames]) and ``plots/*.png`` when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

# file names of a run folder's exports -> model names
EXPORT_NAMES = {"self_forcing": "self_forcing_toy.safetensors", "causal_init": "causal_init_toy.safetensors",
                "teacher_forcing": "teacher_forcing_toy.safetensors",
                "diffusion_forcing": "diffusion_forcing_toy.safetensors",
                "resampling_forcing": "resampling_forcing_toy.safetensors",
                "self_forcing_continued": "self_forcing_continued_toy.safetensors", "sfpp": "sfpp_toy.safetensors"}
SUMMARIES = ("mean", "last")


@dataclass(frozen=True)
class Protocol:
    prompts: int = 64
    prompt_seed: int = 20240
    seeds: tuple[int, ...] = (0, 1, 2)
    lengths: tuple[int, ...] = (1, 5, 10, 20)
    batch_size: int = 64
    bootstrap: int = 2000
    ci: float = 0.95
    bootstrap_seed: int = 0
    max_objects: int | None = None
    paired: tuple[tuple[str, str], ...] = field(default=())  # empty: self_forcing - each other model
    metrics_device: str = "model"  # "model": measure on the generation device (toy.metrics runs on GPUs); "cpu"
    kv_fp8: tuple[str, ...] = ()  # models sampled with the FP8 K/V cache (StreamOptions.kv_fp8, opt-in, less exact)

    def __post_init__(self):
        if self.prompts < 1 or not self.seeds or not self.lengths or self.batch_size < 1:
            raise ValueError("the protocol needs >= 1 prompt, sampling seed, length and batch size")
        if any(int(n) < 1 for n in self.lengths):
            raise ValueError(f"lengths are multiples of the training clip length (>= 1), got {self.lengths}")
        if not 0 < self.ci < 1 or self.bootstrap < 1:
            raise ValueError("ci must be in (0, 1) and bootstrap >= 1")


def protocol_prompts(count: int, seed: int, max_objects: int | None = None) -> list[str]:
    """``count`` prompts of the toy world's scene generator (stream "protocol" of seed ``seed``)."""
    from .data import toy_scene

    return [toy_scene(seed, "protocol", i, max_objects)[0].prompt for i in range(count)]


def sampler_seed(sampling_seed: int, batch_index: int) -> int:
    return int(sampling_seed) * 100003 + int(batch_index)


# -- statistics -----------------------------------------------------------------------------------------
def bootstrap_ci(values, *, resamples: int = 2000, ci: float = 0.95, seed: int = 0) -> dict:
    """Mean and percentile-bootstrap CI of the mean of ``values`` [n] over its units (NaN units dropped), or
    for [n, K] of every column (one set of resampled units for all columns, NaNs ignored per column)."""
    v = np.asarray(values, dtype=np.float64)
    cols = v.ndim == 2
    if not cols:
        v = v[~np.isnan(v)][:, None]
    n = v.shape[0]
    counts = (~np.isnan(v)).sum(axis=0)
    if n == 0 or not counts.any():
        nan = [None] * v.shape[1] if cols else None
        return {"mean": nan, "lo": nan, "hi": nan, "n": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    means = _nanmean(v[idx], 1)  # [resamples, K]
    a = (1 - ci) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(means, a, axis=0), np.nanquantile(means, 1 - a, axis=0)
    mean = _nanmean(v, 0)
    if cols:
        return {"mean": mean.tolist(), "lo": lo.tolist(), "hi": hi.tolist(), "n": int(counts.min())}
    return {"mean": float(mean[0]), "lo": float(lo[0]), "hi": float(hi[0]), "n": int(n)}


def _nanmean(a: np.ndarray, axis) -> np.ndarray:
    with warnings.catch_warnings():  # an all-NaN slice (no measurable frame) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def video_summary(values: np.ndarray, frames: int, clip: int, kind: str) -> np.ndarray:
    """Per-video value of per-frame ``values`` [..., T] for a video of ``frames`` frames: "mean" over its
    frames, "last" over its last ``clip`` frames."""
    if kind == "mean":
        return _nanmean(values[..., :frames], -1)
    return _nanmean(values[..., frames - clip:frames], -1)


def windows(values: np.ndarray, window: int) -> np.ndarray:
    """Means of consecutive ``window``-frame windows of [..., T] -> [..., T // window] (NaN-aware)."""
    t = values.shape[-1] // window * window
    return _nanmean(values[..., :t].reshape(*values.shape[:-1], -1, window), -1)


def units(per_video: np.ndarray) -> np.ndarray:
    """[training seeds, prompts, sampling seeds, ...] -> one value per (training seed, prompt) unit:
    [units, ...] with the sampling seeds averaged."""
    u = _nanmean(per_video, 2)
    return u.reshape(-1, *u.shape[2:])


# -- generation -----------------------------------------------------------------------------------------
@dataclass
class Bundle:
    path: str
    model: object
    encode: Callable
    decode: Callable
    meta: dict
    clip: int
    frames_per_block: int
    latent_hw: tuple[int, int]


def load_bundle(path: str, device: torch.device) -> Bundle:
    from ..sf_model.checkpoint import load_model
    from ..sf_model.window import checkpoint_frames_per_block, trained_frames
    from ..toy.bundle import encode_prompt, is_toy_bundle, toy_parts
    from .data import codec_on

    lm = load_model(path, device=device, dtype=torch.float32)
    if not is_toy_bundle(lm):
        raise ValueError(f"{path} is not a self-contained toy checkpoint (no bundled text encoder/codec)")
    codec = codec_on(toy_parts(lm)[1], device)

    def decode(z):
        return codec.decode(z.float()).float().clamp(-1, 1)

    return Bundle(path, lm.model, lambda p: encode_prompt(lm, p, device), decode, lm.meta, trained_frames(lm.meta),
                  checkpoint_frames_per_block(lm.meta), tuple(lm.meta["toy"]["latent_size"]))


@torch.no_grad()
def generate_metrics(bundle: Bundle, prompts: Sequence[str], proto: Protocol, metrics_fn, *,
                     kv_fp8: bool = False) -> dict[str, np.ndarray]:
    """Per-frame metrics {name: [prompts, sampling seeds, T]} of the longest videos of one model (``kv_fp8``:
    sampled with the FP8 K/V cache)."""
    from ..sf_model.sampler import StreamOptions, generate
    from ..sf_model.window import CachePolicy, checkpoint_sink

    frames = max(proto.lengths) * bundle.clip
    cache = CachePolicy.rolling(bundle.frames_per_block, bundle.clip, checkpoint_sink(bundle.meta))
    opts = StreamOptions.from_meta(bundle.meta, cache)
    if kv_fp8:
        opts = dataclasses.replace(opts, kv_fp8=True)  # StreamOptions checks what it cannot do
    out: dict[str, np.ndarray] = {}
    bs = proto.batch_size
    for si, s in enumerate(proto.seeds):
        for b, start in enumerate(range(0, len(prompts), bs)):
            batch = list(prompts[start:start + bs])
            lat = generate(bundle.model, bundle.encode(batch), num_frames=frames, height=bundle.latent_hw[0],
                           width=bundle.latent_hw[1], seed=sampler_seed(s, b), options=opts)
            video = bundle.decode(lat)
            if proto.metrics_device == "cpu":
                video = video.cpu()
            for k, v in metrics_fn(video, batch).items():
                v = np.asarray(v, dtype=np.float32)
                if v.shape != (len(batch), frames):
                    raise ValueError(f"metric {k!r} has shape {v.shape}, expected [videos, frames] = "
                                     f"{(len(batch), frames)}")
                out.setdefault(k, np.full((len(prompts), len(proto.seeds), frames), np.nan, np.float32))
                out[k][start:start + len(batch), si] = v
    return out


# -- the whole protocol ---------------------------------------------------------------------------------
def default_metrics():
    """(metrics_fn, error metric names) of the toy world: ``toy.metrics``."""
    from ..toy import metrics as tm

    return tm.video_metrics, tuple(tm.ERRORS)


def default_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    if "self_forcing" not in names:
        return []
    return [("self_forcing", n) for n in names if n != "self_forcing"]


def evaluate_model(path: str, device: torch.device, prompts: Sequence[str], proto: Protocol, metrics_fn,
                   cache_file: str | None, kv_fp8: bool = False, expect: Sequence[str] = ()) -> dict:
    """{metrics: {name: [P, S, T]}, meta, setup, seconds, cached} of one bundle, read from ``cache_file`` when
    it was written for the same file (size, mtime), prompts, seeds, longest length, batch size and metric, and
    holds every name of ``expect`` (a cache from before a metric was added is computed anew)."""
    st = os.stat(path)
    key = json.dumps({"path": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime_ns,
                      "prompts": list(prompts), "seeds": list(proto.seeds), "frames": max(proto.lengths),
                      "batch": proto.batch_size, "metric": getattr(metrics_fn, "__qualname__", repr(metrics_fn)),
                      "module": getattr(metrics_fn, "__module__", ""), "cache": "rolling+sink" + ("+kv_fp8" if kv_fp8 else "")},
                     sort_keys=True)
    if cache_file and os.path.isfile(cache_file):
        with np.load(cache_file, allow_pickle=False) as z:
            if str(z["__key__"]) == key and set(expect) <= set(z.files):
                head = json.loads(str(z["__info__"]))
                return {"metrics": {k: z[k] for k in z.files if not k.startswith("__")}, "meta": head["meta"],
                        "setup": (head["setup"][0], head["setup"][1], tuple(head["setup"][2])),
                        "seconds": head["seconds"], "cached": True}
    t0 = time.time()
    bundle = load_bundle(path, device)
    metrics = generate_metrics(bundle, prompts, proto, metrics_fn, kv_fp8=kv_fp8)
    item = {"metrics": metrics, "meta": _model_meta(bundle.meta), "cached": False,
            "setup": (bundle.clip, bundle.frames_per_block, bundle.latent_hw), "seconds": round(time.time() - t0, 2)}
    if cache_file:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        info = json.dumps(_clean({"meta": item["meta"], "setup": [*item["setup"][:2], list(item["setup"][2])],
                                  "seconds": item["seconds"]}))
        tmp = cache_file + ".tmp.npz"
        np.savez_compressed(tmp, __key__=np.array(key), __info__=np.array(info), **metrics)
        os.replace(tmp, cache_file)
    return item


def run_protocol(models: Mapping[str, Sequence[str]], out_dir: str, proto: Protocol = Protocol(), *,
                 metrics_fn: Callable | None = None, errors: Sequence[str] | None = None, device: str = "auto",
                 plots: bool = True, log=print, cache: bool = True, deadline: float | None = None) -> dict | None:
    """Evaluate ``models`` ({name: [bundle path per training seed]}) and write results.json, results.md,
    raw.npz (and plots) to ``out_dir``; returns the results dict.

    Each model's per-frame metrics are cached in ``out_dir/cache`` (``cache``), so a run stopped at
    ``deadline`` (a ``time.time()`` value, checked before each model) returns None and a later call picks up
    where it stopped."""
    if not models:
        raise ValueError("no models to evaluate")
    if metrics_fn is None:
        metrics_fn, default_errors = default_metrics()
        errors = default_errors if errors is None else errors
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    prompts = protocol_prompts(proto.prompts, proto.prompt_seed, proto.max_objects)
    raw: dict[str, dict[str, np.ndarray]] = {}
    info: dict[str, dict] = {}
    setup = None
    for name, paths in models.items():
        paths = list(paths)
        if not paths:
            raise ValueError(f"model {name!r} has no files")
        per_seed, metas, seconds = [], [], []
        for i, path in enumerate(paths):
            if deadline is not None and time.time() > deadline:
                log("[protocol] out of time: the models evaluated so far are cached; run again to continue")
                return None
            item = evaluate_model(path, dev, prompts, proto, metrics_fn,
                                  os.path.join(out_dir, "cache", f"{name}.{i}.npz") if cache else None,
                                  kv_fp8=name in proto.kv_fp8, expect=errors or ())
            if setup is None:
                setup = item["setup"]
            elif item["setup"] != setup:
                raise ValueError(f"{path}: training length / frames per block / latent size {item['setup']} differ "
                                 f"from the first model's {setup}; compare models of one toy setup")
            per_seed.append(item["metrics"])
            seconds.append(item["seconds"])
            metas.append(item["meta"])
            log(f"[protocol] {name} ({i + 1}/{len(paths)}): {os.path.basename(path)} in {item['seconds']:.1f} s"
                + (" (cached)" if item["cached"] else ""))
        keys = sorted(set.intersection(*(set(d) for d in per_seed)))
        raw[name] = {k: np.stack([d[k] for d in per_seed]) for k in keys}  # [S_train, P, S_samp, T]
        info[name] = {"paths": paths, "training": metas, "eval_seconds": seconds}
    clip = setup[0]
    # metrics measured by every model and defined somewhere (e.g. toy.metrics' scene-only errors are all NaN)
    metric_names = sorted(k for k in set.intersection(*(set(r) for r in raw.values()))
                          if any(np.isfinite(r[k]).any() for r in raw.values()))
    errors = tuple(k for k in (errors if errors is not None else [m for m in metric_names if m.endswith("_error")])
                   if k in metric_names)
    pairs = list(proto.paired) or default_pairs(list(models))
    results = {
        "setup": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(proto).items()},
                  "paired": [list(p) for p in pairs], "train_frames": clip, "frames_per_block": setup[1],
                  "latent_size": list(setup[2]), "window": clip,
                  "cache": f"rolling window {clip} + each model's attention sink (models.*.training[].sink)",
                  "frames": [n * clip for n in proto.lengths], "prompt_list": prompts,
                  "units": "(training seed, prompt) pairs; sampling seeds averaged within a unit"},
        "models": info, "metrics": metric_names, "errors": list(errors),
        "table": summary_tables(raw, proto, clip, metric_names),
        "paired": paired_tables(raw, proto, clip, metric_names, pairs),
        "curves": window_curves(raw, proto, clip, metric_names),
    }
    os.makedirs(out_dir, exist_ok=True)
    _write_json(results, os.path.join(out_dir, "results.json"))
    np.savez_compressed(os.path.join(out_dir, "raw.npz"),
                        **{f"{name}/{k}": v for name, d in raw.items() for k, v in d.items()})
    from .protocol_report import markdown, plot_all

    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write(markdown(results))
    if plots:
        log(plot_all(results, os.path.join(out_dir, "plots")))
    return results


def _model_meta(meta: Mapping) -> dict:
    """What results.json reports of a model's training and sampling: the stored entries below (``method`` and
    ``solver`` name how a Resampling Forcing export is sampled), the attention sink it was evaluated with."""
    from ..sf_model.window import checkpoint_sink

    keep = ("role", "name", "method", "steps_trained", "steps", "shift", "solver", "frames_per_block", "compute",
            "shared_teacher")
    out = {k: meta[k] for k in keep if k in meta}
    out["sink"] = checkpoint_sink(meta)
    training = meta.get("training")
    if isinstance(training, Mapping):
        out["stage_steps"] = training.get("steps_trained")
    return out


def summary_tables(raw, proto: Protocol, clip: int, metric_names) -> dict:
    """{summary: {metric: {length: {model: {mean, lo, hi, n}}}}}."""
    out: dict = {}
    for kind in SUMMARIES:
        for k in metric_names:
            for n in proto.lengths:
                for name, d in raw.items():
                    u = units(video_summary(d[k], n * clip, clip, kind))
                    out.setdefault(kind, {}).setdefault(k, {}).setdefault(str(n), {})[name] = bootstrap_ci(
                        u, resamples=proto.bootstrap, ci=proto.ci, seed=proto.bootstrap_seed)
    return out


def paired_tables(raw, proto: Protocol, clip: int, metric_names, pairs) -> dict:
    """{"A - B": {summary: {metric: {length: {mean, lo, hi, n}}}}} over paired (training seed, prompt) units."""
    out: dict = {}
    for a, b in pairs:
        if a not in raw or b not in raw:
            raise ValueError(f"paired difference {a} - {b}: both must be evaluated (have {sorted(raw)})")
        sa, sb = next(iter(raw[a].values())).shape[0], next(iter(raw[b].values())).shape[0]
        if sa != sb:
            raise ValueError(f"paired difference {a} - {b}: {sa} vs {sb} training seeds; pair runs one to one")
        entry = out.setdefault(f"{a} - {b}", {})
        for kind in SUMMARIES:
            for k in metric_names:
                for n in proto.lengths:
                    ua = units(video_summary(raw[a][k], n * clip, clip, kind))
                    ub = units(video_summary(raw[b][k], n * clip, clip, kind))
                    entry.setdefault(kind, {}).setdefault(k, {})[str(n)] = bootstrap_ci(
                        ua - ub, resamples=proto.bootstrap, ci=proto.ci, seed=proto.bootstrap_seed)
    return out


def window_curves(raw, proto: Protocol, clip: int, metric_names) -> dict:
    """{metric: {model: {mean: [W], lo: [W], hi: [W], n}}} over the training-length windows of the longest
    videos."""
    out: dict = {}
    for k in metric_names:
        for name, d in raw.items():
            w = units(windows(d[k], clip))  # [units, W]
            out.setdefault(k, {})[name] = bootstrap_ci(w, resamples=proto.bootstrap, ci=proto.ci,
                                                       seed=proto.bootstrap_seed)
    return out


def _clean(obj):
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(_clean(obj), fh, indent=1)
    os.replace(tmp, path)


# -- command line ---------------------------------------------------------------------------------------
def collect_models(specs: Sequence[str] = (), runs: Sequence[str] = ()) -> dict[str, list[str]]:
    """``name=path[,path...]`` (repeated names add training seeds; globs expand) and run folders (one per
    training seed, holding the standard export names) -> {name: [paths]}."""
    models: dict[str, list[str]] = {}
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"give models as NAME=PATH[,PATH...], got {spec!r}")
        name, rest = spec.split("=", 1)
        for part in (p for p in rest.split(",") if p):
            found = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
            if not found or not all(os.path.isfile(f) for f in found):
                raise ValueError(f"{name}: no file {part}")
            models.setdefault(name.strip(), []).extend(found)
    folders = sorted({d for r in runs for d in (sorted(glob.glob(r)) or [r])})
    for folder in folders:
        if not os.path.isdir(folder):
            raise ValueError(f"run folder {folder} does not exist")
        for name, file in EXPORT_NAMES.items():
            path = os.path.join(folder, file)
            if os.path.isfile(path):
                models.setdefault(name, []).append(path)
    return models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m self_forcing.training.protocol",
                                description="Evaluation protocol of exported toy models (bootstrap CIs).")
    p.add_argument("--models", nargs="*", default=[], metavar="NAME=PATH[,PATH...]",
                   help="exported toy bundles; one path per training seed (repeat a name or separate by commas)")
    p.add_argument("--runs", nargs="*", default=[], metavar="DIR",
                   help="run folders (one per training seed) holding self_forcing_toy.safetensors, "
                        "causal_init_toy..., teacher_forcing_toy..., diffusion_forcing_toy...")
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, raw.npz, plots/)")
    d = Protocol()
    p.add_argument("--prompts", type=int, default=d.prompts)
    p.add_argument("--prompt-seed", type=int, default=d.prompt_seed)
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help="sampling seeds")
    p.add_argument("--lengths", type=int, nargs="+", default=list(d.lengths),
                   help="video lengths in training clip lengths")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--bootstrap", type=int, default=d.bootstrap)
    p.add_argument("--paired", nargs="*", default=[], metavar="A-B",
                   help="paired differences, e.g. self_forcing-teacher_forcing (default: self_forcing - each)")
    p.add_argument("--device", default="auto")
    p.add_argument("--metrics-on-cpu", action="store_true",
                   help="measure on the CPU (default: on the generation device)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--kv-fp8", nargs="*", default=[], metavar="NAME",
                   help="sample these models with the FP8 K/V cache (opt-in, less exact): e.g. the same file under "
                        "two names, one of them here, measures what the FP8 cache costs")
    return p


def parse_pair(text: str, names: Sequence[str]) -> tuple[str, str]:
    for a in names:
        if text.startswith(a + "-") and text[len(a) + 1:] in names:
            return a, text[len(a) + 1:]
    raise ValueError(f"paired difference {text!r} must be A-B of two evaluated models ({', '.join(names)})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        models = collect_models(args.models, args.runs)
        if not models:
            raise ValueError("no models: give --models NAME=PATH or --runs DIR")
        proto = Protocol(prompts=args.prompts, prompt_seed=args.prompt_seed, seeds=tuple(args.seeds),
                         lengths=tuple(args.lengths), batch_size=args.batch_size, bootstrap=args.bootstrap,
                         paired=tuple(parse_pair(p, list(models)) for p in args.paired),
                         metrics_device="cpu" if args.metrics_on_cpu else "model", kv_fp8=tuple(args.kv_fp8))
        unknown = sorted(set(proto.kv_fp8) - set(models))
        if unknown:
            raise ValueError(f"--kv-fp8 names models that are not evaluated: {', '.join(unknown)}")
        results = run_protocol(models, args.out, proto, device=args.device, plots=not args.no_plots)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .protocol_report import headline

    print(headline(results))
    print(f"wrote {os.path.join(args.out, 'results.md')} and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

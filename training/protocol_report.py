"""The protocol's human-readable outputs: the markdown tables and (when matplotlib is importable) the plots
of ``training.protocol``'s results dict."""

from __future__ import annotations

import os

KIND_TITLES = {"mean": "Mean over the whole video", "last": "Last training-length window of the video"}


def _num(x) -> str:
    if x is None:
        return "–"
    a = abs(x)
    if a != 0 and (a < 1e-3 or a >= 1e4):
        return f"{x:.2e}"
    return f"{x:.3f}" if a < 10 else f"{x:.1f}"


def _cell(entry: dict, bold: bool = False, units: int | None = None) -> str:
    """mean [lo, hi]; with the number of units behind it when fewer than ``units`` had a value."""
    if entry is None or entry.get("mean") is None:
        return "–"
    text = f"{_num(entry['mean'])} [{_num(entry['lo'])}, {_num(entry['hi'])}]"
    text = f"**{text}**" if bold else text
    return text + (f" (n={entry['n']})" if units is not None and entry.get("n", units) < units else "")


def _models_table(results: dict) -> list[str]:
    lines = ["| model | training seeds | steps (this model's stages) | budget s | training loop s | wall s | "
             "protocol s |", "|---|---|---|---|---|---|---|"]
    for name, info in results["models"].items():
        metas = info.get("training", [])
        steps = "; ".join(_steps(m) for m in metas) or "–"
        comp = [m.get("compute") or {} for m in metas]

        def agg(key, comp=comp):
            vals = [c.get(key) for c in comp if c.get(key) is not None]
            return " / ".join(_num(v) for v in vals) if vals else "–"

        lines.append(f"| {name} | {len(info['paths'])} | {steps} | {agg('budget_s')} | {agg('loop_s')} | "
                     f"{agg('wall_s')} | {' / '.join(_num(s) for s in info.get('eval_seconds', []))} |")
    return lines


def _steps(meta: dict) -> str:
    comp = meta.get("compute") or {}
    parts = []
    for stage, row in (comp.get("stages") or {}).items():
        if row.get("steps") is not None:
            parts.append(f"{stage} {row['steps']}")
        elif row.get("pairs") is not None:
            parts.append(f"{stage} {row['pairs']} pairs")
    if parts:
        return ", ".join(parts)
    st = meta.get("stage_steps")
    return str(st) if st is not None else "?"


def markdown(results: dict) -> str:
    s = results["setup"]
    errors = set(results["errors"])
    lengths = [str(n) for n in s["lengths"]]
    full = {name: s["prompts"] * len(info["paths"]) for name, info in results["models"].items()}
    clip = s["train_frames"]
    seeds_train = {len(i["paths"]) for i in results["models"].values()}
    head = [f"| metric | model | " + " | ".join(f"{n}x ({int(n) * clip} frames)" for n in lengths) + " |",
            "|---|---|" + "---|" * len(lengths)]
    lines = [
        "# Toy evaluation protocol", "",
        f"{s['prompts']} prompts (toy world generator, seed {s['prompt_seed']}) x {len(s['seeds'])} sampling seeds "
        f"x {'/'.join(str(n) for n in sorted(seeds_train))} training seed(s); lengths "
        f"{', '.join(lengths)} x the training clip ({clip} latent frames), rolling KV cache of {clip} frames. "
        f"Cells: mean [{int(s['ci'] * 100)} % percentile-bootstrap CI] over (training seed, prompt) units "
        f"({s['bootstrap']} resamples; sampling seeds averaged within a unit). "
        "Error metrics: lower is better, the best mean per column in bold. (n=k): only k units had a value "
        "(the metric is undefined -- NaN -- in the others' frames).", "",
        "## Models", "", *_models_table(results), "",
    ]
    for kind in ("mean", "last"):
        table = results["table"].get(kind, {})
        lines += [f"## {KIND_TITLES[kind]}", "", *head]
        for metric in results["metrics"]:
            rows = table.get(metric, {})
            best = {}
            if metric in errors:
                for n in lengths:
                    vals = {m: e["mean"] for m, e in rows.get(n, {}).items() if e.get("mean") is not None}
                    best[n] = min(vals, key=vals.get) if vals else None
            for i, model in enumerate(results["models"]):
                label = (metric + (" ↓" if metric in errors else "")) if i == 0 else ""
                cells = [_cell(rows.get(n, {}).get(model), best.get(n) == model, full[model]) for n in lengths]
                lines.append(f"| {label} | {model} | " + " | ".join(cells) + " |")
        lines.append("")
    if results.get("paired"):
        lines += ["## Paired differences", "",
                  "A - B per (training seed, prompt) unit, mean [CI]; * = the CI excludes 0. For error metrics a "
                  "negative difference favours A.", ""]
        for pair, kinds in results["paired"].items():
            units = min(full.get(m, 0) for m in pair.split(" - "))
            for kind in ("mean", "last"):
                lines += [f"### {pair} ({KIND_TITLES[kind].lower()})", "",
                          "| metric | " + " | ".join(f"{n}x" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
                for metric in results["metrics"]:
                    cells = []
                    for n in lengths:
                        e = kinds.get(kind, {}).get(metric, {}).get(n)
                        star = (" *" if e and e.get("lo") is not None and (e["lo"] > 0 or e["hi"] < 0) else "")
                        cells.append(_cell(e, units=units) + star)
                    lines.append(f"| {metric} | " + " | ".join(cells) + " |")
                lines.append("")
    lines += _curves_section(results)
    return "\n".join(lines) + "\n"


def _curves_section(results: dict) -> list[str]:
    curves = results.get("curves") or {}
    if not curves:
        return []
    clip = results["setup"]["train_frames"]
    any_metric = next(iter(curves.values()))
    count = len(next(iter(any_metric.values()))["mean"] or [])
    if count == 0:
        return []
    picks = sorted({round(i * (count - 1) / 7) for i in range(8)}) if count > 8 else list(range(count))
    lines = ["## Per-window curves (longest videos; full curves with CIs in results.json and plots/)", "",
             "| metric | model | " + " | ".join(f"frames {i * clip}-{(i + 1) * clip - 1}" for i in picks) + " |",
             "|---|---|" + "---|" * len(picks)]
    for metric, per_model in curves.items():
        for j, (model, c) in enumerate(per_model.items()):
            cells = [_num(c["mean"][i]) if c.get("mean") else "–" for i in picks]
            lines.append(f"| {metric if j == 0 else ''} | {model} | " + " | ".join(cells) + " |")
    return lines + [""]


def headline(results: dict) -> str:
    """A few lines for the terminal: each error metric's whole-video mean at the longest length."""
    s = results["setup"]
    n = str(max(s["lengths"]))
    out = [f"protocol: {s['prompts']} prompts x {len(s['seeds'])} seeds, longest {n}x"]
    table = results["table"]["mean"]
    for metric in results["errors"] or results["metrics"]:
        row = table.get(metric, {}).get(n, {})
        out.append(f"  {metric} @ {n}x: " + ", ".join(f"{m} {_cell(e)}" for m, e in row.items()))
    return "\n".join(out)


def plot_all(results: dict, folder: str) -> str:
    """One PNG per metric (per-window curves with CI bands; whole-video mean vs length with CI bars).
    Returns a message (also when matplotlib is missing: then nothing is drawn)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "[protocol] matplotlib is not installed: plots skipped (pip install matplotlib to draw them)"
    os.makedirs(folder, exist_ok=True)
    clip = results["setup"]["train_frames"]
    lengths = results["setup"]["lengths"]
    written = 0
    for metric in results["metrics"]:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
        for model, c in results["curves"].get(metric, {}).items():
            if not c.get("mean"):
                continue
            mean = [float("nan") if v is None else v for v in c["mean"]]
            lo = [float("nan") if v is None else v for v in c["lo"]]
            hi = [float("nan") if v is None else v for v in c["hi"]]
            x = [(i + 0.5) * clip for i in range(len(mean))]
            ax1.plot(x, mean, label=model)
            ax1.fill_between(x, lo, hi, alpha=0.2)
        ax1.set_xlabel("latent frame (window centre)")
        ax1.set_title(f"{metric}: per {clip}-frame window")
        ax1.legend(fontsize=8)
        rows = results["table"]["mean"].get(metric, {})
        models = list(results["models"])
        for j, model in enumerate(models):
            xs, ys, err = [], [], [[], []]
            for i, n in enumerate(lengths):
                e = rows.get(str(n), {}).get(model)
                if e and e.get("mean") is not None:
                    xs.append(i + (j - (len(models) - 1) / 2) * 0.12)
                    ys.append(e["mean"])
                    err[0].append(e["mean"] - e["lo"])
                    err[1].append(e["hi"] - e["mean"])
            ax2.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=model)
        ax2.set_xticks(range(len(lengths)), [f"{n}x" for n in lengths])
        ax2.set_title(f"{metric}: whole-video mean by length")
        fig.tight_layout()
        fig.savefig(os.path.join(folder, f"{metric}.png"), dpi=90)
        plt.close(fig)
        written += 1
    return f"[protocol] {written} plots in {folder}"

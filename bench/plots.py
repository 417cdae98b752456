"""Plots of the LDS benchmark (`bench/bench_lds.py`), from its results.

* ``lds_vs_k.png`` — per model, LDS against K (log scale) for every DAUNCE variant run as a
  curve (covariance solid, correlation dashed; ± s.e. bands), the baselines as horizontal lines.
* ``lds_vs_seconds.png`` — per model, LDS against wall-clock seconds (log scale) for every
  method: baselines as labelled markers, DAUNCE curves as lines through their K points, the
  other DAUNCE settings (K = 200) as grey dots, and the cost–accuracy frontier (the best LDS
  reachable within each time) as a black step line.

Usage: ``.venv/bin/python bench/plots.py [bench/results/lds.json]`` redraws the PNGs next to
the JSON without rerunning the benchmark.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _curves(results: list[dict]) -> list[dict]:
    return [r for r in results if r.get("family") == "daunce" and len(r["points"]) > 2]


def _baselines(results: list[dict]) -> list[dict]:
    return [r for r in results if r.get("family") == "baseline"]


def _short(label: str) -> str:
    return label.replace("DAUNCE ", "")


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points not beaten by a cheaper one: (seconds, LDS) with LDS rising in seconds."""
    best, kept = float("-inf"), []
    for seconds, lds in sorted(points):
        if lds > best:
            kept.append((seconds, lds))
            best = lds
    return kept


def _lds_vs_k(ax, name: str, results: list[dict]) -> None:
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, result in enumerate(_curves(results)):
        color = colors[i % len(colors)]
        for kind, style in (("covariance", "-"), ("correlation", "--")):
            points = sorted(
                (p for p in result["points"] if p["score"] == kind), key=lambda p: p["K"]
            )
            ks = [p["K"] for p in points]
            lds = [p["lds"] for p in points]
            err = [p["stderr"] for p in points]
            label = f"{_short(result['label'])}, {kind[:3]}"
            ax.plot(ks, lds, style, color=color, marker="o", markersize=3, label=label)
            ax.fill_between(
                ks,
                [a - e for a, e in zip(lds, err, strict=True)],
                [a + e for a, e in zip(lds, err, strict=True)],
                color=color,
                alpha=0.12,
                linewidth=0,
            )
    grey = ["0.15", "0.35", "0.55", "0.7"]
    ranked = sorted(_baselines(results), key=lambda r: -r["lds"])
    styles = [":", "-.", (0, (5, 2)), (0, (1, 3))]
    for i, result in enumerate(ranked[:4]):
        ax.axhline(
            result["lds"],
            color=grey[i],
            linestyle=styles[i],
            linewidth=1.2,
            label=f"{result['label']} ({result['seconds']:.1f}s)",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (perturbed copies)")
    ax.set_ylabel("LDS (loss, Spearman)")
    ax.set_title(f"{name}: DAUNCE LDS against K (4 best baselines as lines)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)


def _lds_vs_seconds(ax, name: str, results: list[dict], markers: dict, at: int) -> None:
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    everything = []
    singles = [r for r in results if r.get("family") == "daunce" and len(r["points"]) <= 2]
    for result in singles:
        for p in result["points"]:
            everything.append((p["seconds"], p["lds"]))
            ax.plot(p["seconds"], p["lds"], "o", color="0.6", markersize=3)
    ax.plot([], [], "o", color="0.6", markersize=3, label=f"other DAUNCE settings (K={at})")
    for i, result in enumerate(_curves(results)):
        color = colors[i % len(colors)]
        points = sorted(
            (p for p in result["points"] if p["score"] == "covariance"), key=lambda p: p["K"]
        )
        xs, ys = [p["seconds"] for p in points], [p["lds"] for p in points]
        everything += list(zip(xs, ys, strict=True))
        everything += [
            (p["seconds"], p["lds"]) for p in result["points"] if p["score"] == "correlation"
        ]
        ax.plot(xs, ys, "-o", color=color, markersize=3, label=f"{_short(result['label'])}, cov")
        ax.annotate(
            f"K={points[-1]['K']}",
            (xs[-1], ys[-1]),
            fontsize=6,
            color=color,
            xytext=(3, -8),
            textcoords="offset points",
        )
    for result in _baselines(results):
        everything.append((result["seconds"], result["lds"]))
        ax.plot(
            result["seconds"],
            result["lds"],
            marker=markers[result["label"]],
            linestyle="none",
            color="black",
            markersize=6,
            markerfacecolor="none",
            label=result["label"],
        )
    edge = frontier(everything)
    if edge:
        xs = [s for s, _ in edge] + [max(s for s, _ in everything) * 1.5]
        ys = [v for _, v in edge] + [edge[-1][1]]
        ax.step(
            xs,
            ys,
            where="post",
            color="black",
            linewidth=1.0,
            alpha=0.6,
            label="frontier (best LDS within the time)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("wall-clock seconds (base model's training excluded)")
    ax.set_ylabel("LDS (loss, Spearman)")
    ax.set_title(f"{name}: cost–accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)


def plot_lds(output: dict, folder: Path) -> list[Path]:
    """Write ``lds_vs_k.png`` and ``lds_vs_seconds.png`` for the models in ``output``."""
    models = output["models"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = sorted({r["label"] for info in models.values() for r in _baselines(info["results"])})
    shapes = ["s", "D", "^", "v", "P", "X", "*", "h", "<", ">", "p", "o", "8", "d"]
    markers = {label: shapes[i % len(shapes)] for i, label in enumerate(labels)}
    at = output.get("K_grid", 200)
    written = []
    for filename, draw in (
        ("lds_vs_k.png", _lds_vs_k),
        ("lds_vs_seconds.png", lambda ax, name, res: _lds_vs_seconds(ax, name, res, markers, at)),
    ):
        fig, axes = plt.subplots(1, len(models), figsize=(7.5 * len(models), 8), squeeze=False)
        for ax, (name, info) in zip(axes[0], models.items(), strict=True):
            draw(ax, name, info["results"])
        fig.tight_layout()
        path = folder / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results/lds.json")
    for path in plot_lds(json.loads(source.read_text()), source.parent):
        print(path)

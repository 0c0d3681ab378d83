"""PNG plots of a comparison run (eval.compare): quality vs size, bit allocation across layers, bits within weights.

All functions take the cells of results.json and write PNG files (matplotlib, Agg backend, no display needed).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def quality_vs_size(cells: list[dict], path: Path) -> Path | None:
    """Perplexity per text (one panel each) against checkpoint MB, one line per method, reference dashed."""
    done = [c for c in cells if c.get("status") == "ok" and c.get("ppl")]
    texts = sorted({t for c in done for t in c["ppl"]})
    if not texts:
        return None
    fig, axes = plt.subplots(1, len(texts), figsize=(5.5 * len(texts), 4.2), squeeze=False)
    for ax, text in zip(axes[0], texts):
        by_method = defaultdict(list)
        for c in done:
            if text not in c["ppl"]:
                continue
            if c["method"] == "reference":
                ax.axhline(c["ppl"][text]["ppl"], ls="--", color="gray",
                           label=f"reference ({c['checkpoint_bytes'] / 1e6:.0f} MB)")
            else:
                by_method[c["method"]].append((c["checkpoint_bytes"] / 1e6, c["ppl"][text]["ppl"]))
        for method, pts in sorted(by_method.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_yscale("log")
        ax.set_xlabel("checkpoint size (MB)")
        ax.set_ylabel("perplexity (log scale)")
        proto = next((c["ppl"][text].get("protocol") for c in done if text in c["ppl"]), "")
        ax.set_title(f"{text} ({proto})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _component(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _mean_bits(counts: list[int]) -> float:
    total = sum(counts)
    return sum(b * n for b, n in enumerate(counts)) / total if total else 0.0


def bit_allocation(cell: dict, path: Path) -> Path | None:
    """Mean bits per weight of every quantized layer, one bar chart per component type (q_proj, ...)."""
    layers = cell.get("layers") or {}
    if not layers:
        return None
    groups = defaultdict(list)
    for name, info in layers.items():
        m = _LAYER_INDEX.search(name)
        groups[_component(name)].append((int(m.group(1)) if m else 0, _mean_bits(info["counts"])))
    kinds = sorted(groups)
    cols = min(4, len(kinds))
    rows = -(-len(kinds) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(kinds):]:
        ax.axis("off")
    for ax, kind in zip(axes.flat, kinds):
        pts = sorted(groups[kind])
        ax.bar([p[0] for p in pts], [p[1] for p in pts], color="tab:blue")
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylim(0, 8.5)
    axes[0][0].set_ylabel("mean bits / weight")
    fig.suptitle(f"bit allocation: {cell['key']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bits_histogram(cell: dict, path: Path) -> Path | None:
    """Share of all quantized weights stored at each bit depth 0..8."""
    layers = cell.get("layers") or {}
    if not layers:
        return None
    weights = [0.0] * 9
    for info in layers.values():
        rows = info.get("out_features", 1)
        for b, n in enumerate(info["counts"]):
            weights[b] += n * rows
    total = sum(weights) or 1.0
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(range(9), [w / total for w in weights], color="tab:orange")
    ax.set_xticks(range(9))
    ax.set_xlabel("bits per weight (column bit depth)")
    ax.set_ylabel("share of weights")
    ax.set_title(f"bits within weights: {cell['key']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_all(cells: list[dict], out_dir: Path) -> list[Path]:
    """Every plot of a run into out_dir; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [quality_vs_size(cells, out_dir / "quality_vs_size.png")]
    for cell in cells:
        if cell.get("status") == "ok" and cell.get("layers"):
            written.append(bit_allocation(cell, out_dir / f"allocation_{_safe(cell['key'])}.png"))
            written.append(bits_histogram(cell, out_dir / f"bits_hist_{_safe(cell['key'])}.png"))
    return [p for p in written if p is not None]

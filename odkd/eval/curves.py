"""Training curves from a run's log.jsonl: every loss and val AP (or PCK, for a keypoint set without OKS
sigmas) against epoch, stage boundaries marked."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: a training box has no display
import matplotlib.pyplot as plt  # noqa: E402


def read_log(log_path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]


def stage_spans(records: list[dict]) -> list[tuple[str, int, int]]:
    """(stage name, first epoch, last epoch) of each run of equal `stage` fields, in order."""
    spans: list[tuple[str, int, int]] = []
    for r in records:
        name = r.get("stage")
        if name is None:
            continue
        if spans and spans[-1][0] == name and spans[-1][2] == r["epoch"] - 1:
            spans[-1] = (name, spans[-1][1], r["epoch"])
        else:
            spans.append((name, r["epoch"], r["epoch"]))
    return spans


def _draw_run(ax, records: list[dict]):
    """Losses (log scale) on `ax`, val AP (or PCK) on a twin axis, a dashed line where each stage ends, a
    legend; returns the val axis (None without val records)."""
    loss_keys = sorted({k for r in records for k in r if k == "loss" or k.endswith("_loss")})
    for key in loss_keys:
        points = [(r["epoch"], r[key]) for r in records if key in r and r[key] > 0]
        if points:  # markers: a loss of a one-epoch stage is a single point, which a line alone does not draw
            ax.plot(*zip(*points), label=key, lw=2 if key == "loss" else 1, marker="o", ms=3)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    stat = "AP" if any("AP" in r for r in records) else "PCK"  # a set without OKS sigmas logs PCK
    val = [(r["epoch"], r[stat]) for r in records if stat in r]
    handles, labels = ax.get_legend_handles_labels()
    ax2 = None
    if val:
        ax2 = ax.twinx()
        (line,) = ax2.plot(*zip(*val), "k-o", ms=3, label=f"val {stat}")
        ax2.set_ylabel(f"val {stat}")
        handles, labels = handles + [line], labels + [f"val {stat}"]
    for name, first, last in stage_spans(records):
        ax.axvline(last + 0.5, color="grey", ls="--", lw=0.8)
        ax.text((first + last) / 2, 1.0, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8)
    ax.legend(handles, labels, fontsize=7, loc="upper right")
    return ax2


def _save(fig, png_path: str | Path, title: str | None) -> Path:
    if title:
        fig.suptitle(title, fontsize=9, y=0.995)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def plot_training_curves(log_path: str | Path, png_path: str | Path, title: str | None = None) -> Path:
    """Losses (log scale, left) and val AP or PCK (right) per epoch; a dashed line where each stage ends."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    _draw_run(ax, read_log(log_path))
    return _save(fig, png_path, title)


def plot_runs_side_by_side(logs: dict[str, str | Path], png_path: str | Path, title: str | None = None) -> Path:
    """One panel per run, named by its key, in a row; the panels share the loss scale and the val AP
    scale, so runs compare by eye (odkd report: the GT-only and the ODKD student)."""
    fig, axes = plt.subplots(1, len(logs), figsize=(6 * len(logs), 4.5), dpi=100, sharey=True, squeeze=False)
    ap_axes = []
    for ax, (name, log_path) in zip(axes[0], logs.items()):
        ap_axes.append(_draw_run(ax, read_log(log_path)))
        ax.set_title(name, fontsize=9, pad=14)  # above the stage names
    ap_axes = [a for a in ap_axes if a is not None]
    if ap_axes:
        low = min(a.get_ylim()[0] for a in ap_axes)
        high = max(a.get_ylim()[1] for a in ap_axes)
        for a in ap_axes:
            a.set_ylim(low, high)
    return _save(fig, png_path, title)

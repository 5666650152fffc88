"""Draw docs/img/dataflow.png: the hook driver, the providers, the step record, instruments, sinks.

python demos/make_design_figure.py --out docs/img/dataflow.png
"""

from __future__ import annotations

import argparse

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

COLUMNS = [
    ("PyTorch hooks", "#e8eef7", [
        "model forward pre-hook", "loss module forward hook", "tensor hook: backward reaches the loss",
        "autograd callback: end of backward", "optimizer step pre-hook", "optimizer step post-hook",
    ]),
    ("lifecycle events\n(Cockpit, lifecycle.Step)", "#eef5e8", [
        "begin_step", "on_loss", "on_backward_begin", "on_backward_end", "on_before_step", "on_after_step",
    ]),
    ("providers: one per need\n(only those asked for)", "#f7f0e4", [
        "loss: L, B, reduction, l_i", "indices: dataset positions", "grad_norms: ||p.grad||",
        "update: theta_{t+1} - theta_t", "learning_rates, param_norms",
        "persample: ||g_i||^2, g_i.gbar,\nGram, projections, views",
    ]),
    ("StepRecord\n(sealed for instruments)", "#f4e8f2", [
        "loss, per_sample_loss", "indices", "grad_norms", "update", "lrs, get(need)", "per_sample_*, projections",
    ]),
    ("instruments\n(needs in, records out)", "#e6f3f3", [
        "Loss, GradNorm", "UpdateSize, Distance", "GradientTests", "Alpha", "Clipping", "TracIn, your plugin",
    ]),
    ("emitter -> sinks", "#f3f3e6", [
        "records {tag | (step, tag): value}", "note/<instrument>", "history (in memory)", "JSON lines",
        "TensorBoard", "dashboard PNG",
    ]),
]  # fmt: skip


def draw(out: str) -> None:
    fig = Figure(figsize=(17, 7.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 6)
    ax.set_ylim(0, 7.6)
    ax.axis("off")
    width, height = 0.86, 0.78
    centers = []
    for c, (title, color, items) in enumerate(COLUMNS):
        x0 = c + 0.07
        ax.add_patch(FancyBboxPatch((x0 - 0.03, 0.2), width + 0.06, 6.6, boxstyle="round,pad=0.02", fc=color, ec="0.6"))
        ax.text(x0 + width / 2, 7.2, title, ha="center", va="center", fontsize=11.5, weight="bold")
        col = []
        for r, item in enumerate(items):
            y = 6.1 - r * 1.05
            ax.add_patch(
                FancyBboxPatch((x0, y - height / 2), width, height, boxstyle="round,pad=0.01", fc="white", ec="0.45")
            )
            ax.text(x0 + width / 2, y, item, ha="center", va="center", fontsize=8.6, wrap=True)
            col.append((x0, y))
        centers.append(col)
    for r in range(6):  # each hook fires one event
        (x0, y0), (x1, y1) = centers[0][r], centers[1][r]
        ax.add_patch(FancyArrowPatch((x0 + width, y0), (x1, y1), arrowstyle="-|>", mutation_scale=10, color="0.35"))
    for c in range(1, len(COLUMNS) - 1):  # then whole columns feed the next
        x0, x1 = centers[c][0][0] + width + 0.03, centers[c + 1][0][0] - 0.03
        ax.add_patch(FancyArrowPatch((x0, 3.5), (x1, 3.5), arrowstyle="simple", mutation_scale=28, color="0.3"))
    caption = (
        "one direction: hooks -> events -> providers -> step record -> instruments -> records -> sinks; "
        "a need nobody asked for this step gets no event and costs nothing"
    )
    ax.text(3.0, 0.05, caption, ha="center", fontsize=10, color="0.25")
    fig.savefig(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/img/dataflow.png")
    draw(ap.parse_args().out)

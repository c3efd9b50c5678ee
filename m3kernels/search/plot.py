"""The search's plot: the objective and each task's score against λ (the first model's M³
ratio), one PNG. One colour per method (and scale / density when they vary): fixed-ratio grids
as lines, M³ draws as crosses, candidates without M³ as dotted horizontal lines; the base and the
experts as dashed horizontal lines. matplotlib is imported here only (the ``plot`` extra).
"""

from __future__ import annotations

from pathlib import Path


def _group(c: dict) -> str:
    label = c["method"]
    if c["scale"] is not None:
        label += f" s={c['scale']:g}"
    if c["density"] is not None:
        label += f" d={c['density']:g}"
    return label


def plot_results(rows: list, references: dict, panels: list, path, title: str = "") -> Path:
    """Write the PNG to ``path``. ``panels``: [(score name or "objective", axis label)]."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(_group(r["candidate"]) for r in rows))
    colors = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (score, label) in zip(axes[0], panels):

        def value(r, score=score):
            return r["objective"] if score == "objective" else r["scores"].get(score)

        for g in groups:
            mine = [r for r in rows if _group(r["candidate"]) == g and value(r) is not None]
            grid = sorted(
                (
                    (r["candidate"]["ratios"][0], value(r))
                    for r in mine
                    if r["candidate"]["mix"] in ("lambda", "ratios")
                ),
            )
            if grid:
                ax.plot(
                    [x for x, _ in grid], [y for _, y in grid], "o-", color=colors[g], ms=3, label=f"{g} grid"
                )
            draws = [(r["candidate"]["ratios"][0], value(r)) for r in mine if r["candidate"]["mix"] == "draw"]
            if draws:
                ax.plot(
                    [x for x, _ in draws],
                    [y for _, y in draws],
                    "x",
                    color=colors[g],
                    ms=7,
                    label=f"{g} M³ draws",
                )
            for r in mine:
                c = r["candidate"]
                if c["mix"] in ("plain", "config") and c["ratios"] is None:
                    ax.axhline(value(r), color=colors[g], ls=":", lw=1.2, label=f"{g} no M³")
                elif c["mix"] == "config":
                    ax.plot([c["ratios"][0]], [value(r)], "s", color=colors[g], ms=5, label=f"{g} config")
        if score != "objective":
            for name, ref in references.items():
                v = ref["scores"].get(score)
                if v is None:
                    continue
                if name == "base":
                    ax.axhline(v, color="0.35", ls="--", lw=1, label="base")
                else:
                    i = int(name.split(":")[1])
                    dashes = ((0, (6, 2, 1, 2)), (0, (2, 2)), (0, (8, 2)), (0, (1, 3)))[i % 4]
                    ax.axhline(v, color="black", ls=dashes, lw=1, label=f"expert: model {i + 1}")
        else:
            ax.axhline(0.0, color="0.4", ls="--", lw=1)
        ax.set_xlabel("λ (ratio of model 1)")
        ax.set_ylabel(label)
        ax.set_xlim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(
        handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8, frameon=False
    )
    if title:
        fig.suptitle(title, fontsize=10)
    rows_of_legend = (len(labels) + 3) // 4
    fig.tight_layout(rect=(0, min(0.45, 0.06 * rows_of_legend + 0.02), 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["plot_results"]

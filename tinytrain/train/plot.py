"""The curves of one or several runs in one picture: `tinytrain plot RUN [RUN ...] [--out FILE.png]`.

Reads each run's CSV logs (every `logs/version_*/metrics.csv`, so resumed runs join up) and draws,
runs overlaid: training and validation loss against steps and against tokens, validation bits per
byte, the learning rate, tokens/s and the gradient norm. `tinytrain fit` writes `plot.png` into the
run folder at the end (needs matplotlib: the `plot` extra).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

from tinytrain.errors import TinyTrainError
from tinytrain.train.metrics import GRAD_NORM, LR, TOKENS, TOKENS_PER_SEC, TRAIN_LOSS, VAL_BPB, VAL_LOSS

PANELS = [  # (title, x key, y keys)
    ("loss", "step", [TRAIN_LOSS, VAL_LOSS]),
    ("loss against tokens", TOKENS, [TRAIN_LOSS]),
    ("validation bits per byte", "step", [VAL_BPB]),
    ("learning rate", "step", [LR]),
    ("tokens/s", "step", [TOKENS_PER_SEC]),
    ("gradient norm", "step", [GRAD_NORM]),
]


def read_run(run: Path) -> dict[str, dict[int, float]]:
    """key -> {step: value} over every version of a run's CSV logs (a later version wins a step)."""
    files = sorted(Path(run).glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not files:
        raise TinyTrainError(f"{run}: no logs/version_*/metrics.csv (a run folder of `tinytrain fit` with its CSV logger)")
    series: dict[str, dict[int, float]] = {}
    for path in files:
        with open(path) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key != "step" and value not in ("", None):
                        series.setdefault(key, {})[int(row["step"])] = float(value)
    return series


def _labels(runs: list[Path]) -> list[str]:
    names = [Path(r).resolve().name for r in runs]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


def plot_runs(runs: list[Path], out: Path, title: Optional[str] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [read_run(Path(r)) for r in runs]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, x_key, y_keys) in zip(axes.flat, PANELS):
        drawn = False
        for i, (label, series) in enumerate(zip(_labels(runs), data)):
            color = colors[i % len(colors)]
            for y_key in y_keys:
                ys = series.get(y_key, {})
                if x_key == "step":
                    points = sorted(ys.items())
                else:  # against another logged quantity, where both were logged at a step
                    xs = series.get(x_key, {})
                    points = sorted((xs[s], v) for s, v in ys.items() if s in xs)
                if not points:
                    continue
                validation = y_key.startswith("val/")
                ax.plot(*zip(*points), color=color, marker="o" if validation else None, markersize=4,
                        linestyle="--" if validation else "-", linewidth=1.2,
                        label=f"{label} {y_key}" if len(y_keys) > 1 or len(runs) > 1 else None)
                drawn = True
        ax.set_title(name)
        ax.set_xlabel("tokens" if x_key == TOKENS else "optimizer step")
        ax.grid(alpha=0.3)
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if drawn and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(title or " vs ".join(_labels(runs)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out



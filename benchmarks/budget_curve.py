"""Validation accuracy against training budget of the RPN recipes (docs/accuracy.md §16).

``python -m benchmarks.budget_curve --out docs/figures/rpn_accuracy_budget.png
[--curve NAME=LOG.csv ...] [--step-s NAME=SECONDS ...]``

Each logged run of ``docs/experiments.csv`` is a point at its optimiser steps times the step cost
of its configuration measured on the quiet machine (``python -m igrpn.experiment steptime``):
runs that trained side by side have wall-clock seconds that say nothing about their cost. A
``--curve`` adds the validations a run's own ``log.csv`` holds (its epoch rows with a ``val_d_mean_mm``),
labelled with the seed its path names (the runner's ``NAME/seedS/log.csv``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

#: configuration name -> (label, quiet step seconds on the non-AMX machine, from steptime)
RECIPES = {
    "cubes_focal_atss_e12": ("recipe, paper's backbone", 0.855),
    "recipe_e22": ("recipe, paper's backbone", 0.855),
    "lean_e22": ("recipe, lean backbone", 0.416),
    "lean_e44": ("recipe, lean backbone", 0.416),
}


def _pairs(items: list[str], convert) -> dict:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: expected NAME=VALUE")
        pairs[name] = convert(value)
    return pairs


def budget_points(log: pd.DataFrame, step_s: dict[str, float]) -> pd.DataFrame:
    """Rows of ``log`` (the experiments table) of the configurations in ``step_s``, with their
    ``minutes`` = steps × step seconds / 60."""
    rows = log[log["name"].isin(step_s)].copy()
    rows["minutes"] = rows["steps"] * rows["name"].map(step_s) / 60
    return rows


def curve_label(label: str, log_path: Path) -> str:
    """``label`` of a ``--curve`` with the seed of its path (``…/seed1/log.csv``) where it names one."""
    seed = re.fullmatch(r"seed(\d+)", Path(log_path).parent.name)
    return f"{label}, {f'seed {seed.group(1)}, ' if seed else ''}during training"


def plot(points: pd.DataFrame, curves: dict[str, tuple[pd.DataFrame, Path]], step_s: dict[str, float],
         labels: dict[str, str]):
    """Figure: validation d-mean (mm) against estimated quiet minutes, marker per seed; ``curves``
    maps a configuration to (its run's epoch validations, that ``log.csv``'s path)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = figure.add_subplot()
    colours = {}
    for name, group in points.groupby("name", sort=False):
        label = labels.get(name, name)
        colour = colours.setdefault(label, f"C{len(colours)}")
        for seed, run in group.groupby("seed"):
            ax.scatter(run["minutes"], run["val_d_mean"], color=colour, marker="o" if seed == 0 else "s", s=28,
                       label=f"{label}, seed {seed}")
    for name, (curve, path) in curves.items():
        label = labels.get(name, name)
        colour = colours.setdefault(label, f"C{len(colours)}")
        ax.plot(curve["step"] * step_s[name] / 60, curve["val_d_mean_mm"], color=colour, linewidth=1,
                label=curve_label(label, path))
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.set_xlabel("training minutes on the 2-core non-AMX machine (steps × quiet step time)")
    ax.set_ylabel("validation d-mean (mm)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return figure


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=Path, default=Path("docs/experiments.csv"))
    parser.add_argument("--curve", nargs="*", default=[], help="NAME=path of a run's log.csv")
    parser.add_argument("--step-s", nargs="*", default=[], help="NAME=quiet seconds per step (adds a configuration)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    step_s = {name: seconds for name, (_, seconds) in RECIPES.items()} | _pairs(args.step_s, float)
    labels = {name: label for name, (label, _) in RECIPES.items()}
    curves = {name: ((lambda log: log[(log["kind"] == "epoch") & log["val_d_mean_mm"].notna()])(pd.read_csv(path)),
                     path) for name, path in _pairs(args.curve, Path).items()}
    unknown = sorted(set(curves) - set(step_s))
    if unknown:
        raise ValueError(f"--curve {unknown}: no step time; give it with --step-s NAME=SECONDS")
    figure = plot(budget_points(pd.read_csv(args.log), step_s), curves, step_s, labels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

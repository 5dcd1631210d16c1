"""Experiments at a fixed wall-clock budget, scored on validation data, logged one row per run.

    python -m igrpn.experiment --name focal_all --set classification_anchors=all --seeds 0 1 --minutes 4
    python -m igrpn.experiment plot --names baseline focal_all --out docs/figures/curves.png
    python -m igrpn.experiment score --name reproduce_rpn_ib report/runs/rpn_ib/checkpoint.pt
    python -m igrpn.experiment --name cubes --set anchor_shapes=cubes --epochs 6
    python -m igrpn.experiment steptime --configs "" "anchor_shapes=cubes" "head_convs=4"

trains the named configuration (the ``cpu`` profile with the ``--set`` fields changed) once per
seed for the same wall-clock budget, scores each run on the *validation* part of the training
split (held out by the seed, never the test split) and appends one row per run to
``docs/experiments.csv``. Decisions are taken on these rows, with at least two seeds per setting
(docs/design.md §8); the test split is scored by ``make reproduce`` alone.

On a machine whose cores other jobs share, ``--epochs`` gives a step budget instead, and
``steptime`` measures the configurations' step costs interleaved, so that equal wall-clock can be
set as epochs in proportion (docs/accuracy.md §13).

``--method monai_retinanet`` trains the peer (MONAI's 3D RetinaNet, :mod:`igrpn.training.peer`) the same
way, on the same volumes and hold-out, for the same minutes.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import datetime as dt
import functools
import io
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from igrpn import config
from igrpn.checkpoint import load_checkpoint
from igrpn.config import LANDMARKS, PEER_METHOD, Profile, get_profile
from igrpn.data import collate, LandmarkDataset, load_cases, read_manifest
from igrpn.detect import Detector, predict_cases
from igrpn.evaluation.answers import answers, ground_truth
from igrpn.evaluation.metrics import evaluate, eye_pair, per_landmark
from igrpn.io import atomic_write_files
from igrpn.models import build_model
from igrpn.phantom import command_manifest
from igrpn.prior import GraphPrior, landmarks_from_manifest
from igrpn.training import peer
from igrpn.training.loop import LOG_NAME, make_optimizer, optimiser_step, read_log, split_train_val, train

#: Columns of ``docs/experiments.csv``; distances in mm, hit50 and eye counts as given.
LOG_COLUMNS = (
    "date", "name", "change", "method", "iou_balance", "seed", "budget_s", "train_s", "steps", "epochs",
    "val_cases", "val_d_mean", *(f"val_{name}" for name in LANDMARKS), "val_d_median", "val_hit50",
    "val_eyes_found", "val_prior_d_mean", "val_prior_hit50", "val_prior_eyes_found", "note",
)
DEFAULT_LOG = Path("docs/experiments.csv")


def parse_overrides(items: list[str], base: Profile) -> dict:
    """``["lr=0.01", "optimizer=sgd"]`` -> ``{"lr": 0.01, "optimizer": "sgd"}``, checked against
    the :class:`Profile` fields (a typo is an error, not a silently ignored setting)."""
    fields = {f.name for f in dataclasses.fields(Profile)}
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        if key not in fields:
            raise ValueError(f"--set {item!r}: Profile has no field {key!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: a string field such as optimizer=sgd
        current = getattr(base, key)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if current is not None and not isinstance(value, type(current)) and not (
                isinstance(current, float) and isinstance(value, float)):
            raise ValueError(f"--set {item!r}: {key} is a {type(current).__name__}, got {value!r}")
        overrides[key] = value
    return overrides


def change_text(overrides: dict) -> str:
    """The configuration difference as one cell: ``optimizer=sgd; lr=0.01`` (``baseline`` if none)."""
    return "; ".join(f"{k}={v}" for k, v in overrides.items()) or "baseline"


def score_answers(chosen: pd.DataFrame, gt: pd.DataFrame) -> dict:
    """The validation columns of a log row from selected answers and their ground truth."""

    result = evaluate(chosen, gt)
    landmarks = per_landmark(chosen, gt).set_index("landmark")["d_mean"]
    eyes = eye_pair(chosen, gt)
    row = {"val_cases": result["n_cases"], "val_d_mean": result["d_mean"], "val_d_median": result["d_median"],
           "val_hit50": result["hit50"], "val_eyes_found": f"{eyes['found']}/{eyes['n_cases']}"}
    row.update({f"val_{name}": float(landmarks.get(name, np.nan)) for name in LANDMARKS})
    return row


def validation_answers(checkpoint: Path, cases, prior=None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Selected answers of a trained igrpn model on ``cases``: without the prior, and with
    ``prior`` (a fitted ``GraphPrior``) as ``make reproduce`` applies it (``None`` without one)."""

    plain, with_prior, _ = predict_cases(Detector.from_checkpoint(checkpoint), cases, prior=prior, progress=False)
    return answers(plain), (answers(with_prior) if with_prior is not None else None)


def peer_validation_answers(result: dict, cases, prior=None) -> tuple[pd.DataFrame, None]:
    """The peer's selected answers on ``cases``; the graph prior is igrpn's and not applied to it."""

    return peer.validation_answers(result, cases), None


def validation_prior(train_table: pd.DataFrame):
    """The graph prior fitted on the landmarks of the volumes a run trained on (never the
    validation hold-out's)."""

    return GraphPrior().fit(landmarks_from_manifest(train_table))


def summary(row: dict) -> str:
    """One line of a logged row's validation scores, with the prior's where it was applied."""
    text = f"val d-mean {row['val_d_mean']:.2f} mm, hit50 {row['val_hit50']:.2f}, eyes found {row['val_eyes_found']}"
    if "val_prior_d_mean" in row:
        text += f"; with the prior {row['val_prior_d_mean']:.2f} mm, hit50 {row['val_prior_hit50']:.2f}"
    return text


def append_row(row: dict, path: Path) -> None:
    """Append one row to the log (header written when the file is new; a log written with fewer
    columns is rewritten with today's, its old rows' new cells empty); never a half-written file."""

    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    reader = csv.DictReader(io.StringIO(text if text.strip() else "", newline=""))
    unknown = [c for c in (reader.fieldnames or []) if c not in LOG_COLUMNS]
    if unknown:
        raise ValueError(f"{path}: columns {unknown} are not experiment-log columns {list(LOG_COLUMNS)}")
    old_rows = list(reader)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(old_rows)
    writer.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_files({path: buffer.getvalue()})


def run_profile(base: str, method: str, overrides: dict) -> Profile:
    """The profile a run trains: ``base`` with ``method``'s own settings, then ``overrides`` (last,
    so that ``--set lr=…`` also changes a field the method's settings give)."""
    profile = get_profile(base)
    if method != PEER_METHOD:
        profile = profile.for_method(method)
    return dataclasses.replace(profile, **overrides)


def run_one(name: str, overrides: dict, method: str, iou_balance: bool, seed: int, budget_s: float | None,
            manifest: Path, out_root: Path, log_path: Path, base: str = "cpu", note: str = "",
            validate_every: int = 2, progress: bool = True) -> dict:
    """Train one configuration for ``budget_s`` seconds, score it on validation, log the row.

    ``budget_s=None``: train the profile's epochs instead (``overrides`` may set ``epochs``), a
    budget in optimiser steps that other jobs on the machine cannot shorten; its row's
    ``budget_s`` is empty.
    """

    profile = run_profile(base, method, overrides)
    if budget_s is None and method == PEER_METHOD:
        raise ValueError("the peer trains for a wall-clock budget only (--minutes)")
    out_dir = out_root / name / f"seed{seed}"
    if method == PEER_METHOD:
        result = peer.train_peer(profile, seed, out_dir, manifest, budget_s, progress=progress)
        answer = functools.partial(peer_validation_answers, result)
        steps, train_s = result["steps"], result["train_seconds"]
    else:
        checkpoint = train(profile, method=method, iou_balance=iou_balance, seed=seed, out_dir=out_dir,
                           manifest=manifest, resume=False, progress=progress, max_seconds=budget_s,
                           validate_every=validate_every)
        answer = functools.partial(validation_answers, checkpoint)
        steps, train_s = _logged_steps(checkpoint)
    return _log_run(name, overrides, method, iou_balance, seed, profile, manifest,
                    float("nan") if budget_s is None else float(budget_s), steps, train_s, answer, log_path, note)


def _logged_steps(checkpoint: Path) -> tuple[int, float]:
    """Optimiser steps of an igrpn training and the seconds they took, from its ``log.csv``."""

    log = pd.DataFrame(read_log(Path(checkpoint).parent / LOG_NAME))
    if log.empty:
        return 0, float("nan")
    steps = log[log["kind"] == "step"]
    return len(steps), float(steps["seconds"].astype(float).sum())


def _log_run(name: str, overrides: dict, method: str, iou_balance: bool, seed: int, profile: Profile,
             manifest: Path, budget_s: float, steps: int, train_s: float, answer, log_path: Path,
             note: str) -> dict:
    """Score a trained run on the seed's validation hold-out and append its row to the log.

    ``answer(cases, prior)`` returns the run's selected answers on the validation cases, without
    and with the graph prior fitted on the run's training volumes (``None`` where not applied).
    """

    table = read_manifest(manifest)
    train_table = table[table["split"] == "train"]
    train_ids, val_ids = split_train_val(list(train_table["case_id"]), profile.val_fraction, seed)
    cases = load_cases(train_table[train_table["case_id"].isin(val_ids)], profile.spacing_mm, progress=False)
    row = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "name": name, "change": change_text(overrides),
           "method": method, "iou_balance": iou_balance, "seed": seed, "budget_s": budget_s,
           "train_s": train_s, "steps": int(steps),
           "epochs": float(steps * profile.batch_size / max(1, len(train_ids))), "note": note}
    plain, with_prior = answer(cases, validation_prior(train_table[train_table["case_id"].isin(train_ids)]))
    gt = ground_truth(cases)
    row.update(score_answers(plain, gt))
    if with_prior is not None:
        scored = score_answers(with_prior, gt)
        row.update({"val_prior_d_mean": scored["val_d_mean"], "val_prior_hit50": scored["val_hit50"],
                    "val_prior_eyes_found": scored["val_eyes_found"]})
    append_row(row, log_path)
    return row


def validation_curves(out_root: Path, names: list[str]) -> pd.DataFrame:
    """The per-epoch validation rows of the runs ``out_root/NAME/seedS/log.csv``.

    Returns:
        rows ``name, seed, train_s`` (seconds of optimiser steps up to that epoch) ``,
        val_d_mean_mm, val_hit50``.
    """

    frames = []
    for name in names:
        for run_dir in sorted((Path(out_root) / name).glob("seed*")):
            log = pd.DataFrame(read_log(run_dir / LOG_NAME))
            if log.empty:
                continue
            steps = log[log["kind"] == "step"]["seconds"].astype(float)
            elapsed = steps.cumsum().to_numpy()
            epochs = log[(log["kind"] == "epoch") & (log["val_d_mean_mm"] != "")]
            for _, row in epochs.iterrows():
                done = int(row["step"]) - int(log["step"].astype(int).min()) + 1
                frames.append({"name": name, "seed": int(run_dir.name[4:]),
                               "train_s": float(elapsed[min(done, len(elapsed)) - 1]),
                               "val_d_mean_mm": float(row["val_d_mean_mm"]), "val_hit50": float(row["val_hit50"])})
    return pd.DataFrame(frames, columns=["name", "seed", "train_s", "val_d_mean_mm", "val_hit50"])


def plot_validation_curves(curves: pd.DataFrame, reference_mm: float | None = None):
    """Validation d-mean against training minutes, one line per run (a matplotlib Figure)."""
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = figure.add_subplot()
    colours = {}
    for (name, seed), run in curves.groupby(["name", "seed"], sort=True):
        colour = colours.setdefault(name, f"C{len(colours)}")
        ax.plot(run["train_s"] / 60, run["val_d_mean_mm"], color=colour, marker="o", markersize=3,
                linestyle="-" if seed % 2 == 0 else "--", label=f"{name} (seed {seed})")
    if reference_mm is not None:
        ax.axhline(reference_mm, color="grey", linestyle=":", label="image-blind reference")
    ax.set_xlabel("training time (min, optimiser steps)")
    ax.set_ylabel("validation d-mean (mm)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m igrpn.experiment", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the configuration's name in the log")
    parser.add_argument("--method", default="rpn", choices=(*config.METHODS, PEER_METHOD))
    parser.add_argument("--no-iou-balance", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a Profile field changed from the base profile (repeatable)")
    parser.add_argument("--base", default="cpu", choices=sorted(config.PROFILES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-clock budget of each training")
    budget.add_argument("--epochs", type=int,
                        help="train this many epochs instead (a step budget, which other jobs on the machine "
                             "cannot shorten; compare configurations at equal wall-clock by giving each the "
                             "epochs its quiet step time allows)")
    parser.add_argument("--manifest", default=None, help="default: the base profile's own data set")
    parser.add_argument("--out", default="build/experiments", help="checkpoints and logs (not committed)")
    parser.add_argument("--log", default=str(DEFAULT_LOG), help="the experiments table (default: %(default)s)")
    parser.add_argument("--validate-every", type=int, default=2, help="epochs between validations")
    parser.add_argument("--note", default="")
    return parser


def profile_difference(profile: Profile, base: Profile) -> dict:
    """The fields in which ``profile`` differs from ``base`` (both resolved for one method)."""
    mine, theirs = profile.to_dict(), base.to_dict()
    return {k: v for k, v in mine.items() if k != "name" and theirs.get(k) != v}


def score_checkpoint(name: str, checkpoint: Path, manifest: Path, log_path: Path, base: str = "cpu",
                     note: str = "") -> dict:
    """Score a finished igrpn training (e.g. one of ``make reproduce``) on its own validation
    hold-out exactly as :func:`run_one` scores a budgeted run, and log the row; the budget is the
    time its optimiser steps took (its ``log.csv``)."""

    ckpt = load_checkpoint(checkpoint)
    profile = Profile.from_dict(ckpt["config"]["profile"])
    method, seed = ckpt["method"], int(ckpt["config"]["seed"])
    steps, train_s = _logged_steps(checkpoint)
    return _log_run(name, profile_difference(profile, get_profile(base).for_method(method)), method,
                    bool(ckpt["iou_balance"]), seed, profile, manifest, train_s, steps, train_s,
                    functools.partial(validation_answers, Path(checkpoint)), log_path, note)


def score_main(argv: list[str]) -> int:
    """``python -m igrpn.experiment score --name NAME CHECKPOINT...``."""
    parser = argparse.ArgumentParser(prog="python -m igrpn.experiment score",
                                     description="Score finished trainings on their validation hold-out and log them.")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--name", required=True)
    parser.add_argument("--manifest", default="data_manifest.csv")
    parser.add_argument("--log", default=str(DEFAULT_LOG))
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    for checkpoint in args.checkpoints:
        row = score_checkpoint(args.name, Path(checkpoint), Path(args.manifest).resolve(), Path(args.log),
                               note=args.note)
        print(f"{checkpoint}: {summary(row)}, {row['steps']} steps in {row['train_s']:.0f} s")
    return 0


def plot_main(argv: list[str]) -> int:
    """``python -m igrpn.experiment plot --names sgd baseline --out docs/figures/x.png``."""
    parser = argparse.ArgumentParser(prog="python -m igrpn.experiment plot",
                                     description="Validation d-mean against training minutes of logged runs.")
    parser.add_argument("--names", nargs="+", required=True, help="configurations under --runs")
    parser.add_argument("--runs", default="build/experiments", help="the runner's --out (default: %(default)s)")
    parser.add_argument("--reference-mm", type=float, default=None, help="draw the image-blind reference")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    curves = validation_curves(Path(args.runs), args.names)
    if curves.empty:
        parser.error(f"no validation rows under {args.runs} for {args.names}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_validation_curves(curves, args.reference_mm).savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


def step_seconds(profiles: list[Profile], method: str, manifest: Path, rounds: int = 3, steps: int = 4,
                 seed: int = 0) -> list[list[float]]:
    """Seconds of one training step (forward, loss, backward, optimiser; no data loading) of each
    profile, measured in ``rounds`` interleaved rounds of ``steps`` steps on the same two training
    volumes, after one warm-up step each. Interleaving puts every profile under the same drift of
    a shared machine's load, so the ratios hold even where the seconds do not.

    Returns:
        per profile, the mean seconds per step of each round.
    """

    table = read_manifest(manifest)
    cases = load_cases(table[table["split"] == "train"].head(2), profiles[0].spacing_mm, progress=False)
    batch = collate([LandmarkDataset(cases, augment=False)[i] for i in range(len(cases))])
    device = torch.device("cpu")
    setups = []
    for profile in profiles:
        torch.manual_seed(seed)
        model = build_model(method, profile).train()
        setups.append((model, make_optimizer(model.parameters(), profile), profile))

    def one_step(model, optimizer, profile):
        optimiser_step(model, model, optimizer, batch["volume"], batch["landmarks_vox"], device,
                       profile.mixed_precision)

    for setup in setups:
        one_step(*setup)
    seconds = [[] for _ in setups]
    for _ in range(rounds):
        for index, setup in enumerate(setups):
            start = time.perf_counter()
            for _ in range(steps):
                one_step(*setup)
            seconds[index].append((time.perf_counter() - start) / steps)
    return seconds


def steptime_main(argv: list[str]) -> int:
    """``python -m igrpn.experiment steptime --configs "" "anchor_shapes=cubes" ...``."""
    parser = argparse.ArgumentParser(prog="python -m igrpn.experiment steptime",
                                     description="Interleaved step-time measurement of configurations.")
    parser.add_argument("--configs", nargs="+", required=True,
                        help='each a ";"-separated list of FIELD=VALUE ("" = the base profile)')
    parser.add_argument("--method", default="rpn", choices=config.METHODS)
    parser.add_argument("--base", default="cpu", choices=sorted(config.PROFILES))
    parser.add_argument("--manifest", default="data_manifest.csv")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        overrides = [parse_overrides([item for item in text.split(";") if item.strip()], get_profile(args.base))
                     for text in args.configs]
        profiles = [run_profile(args.base, args.method, o) for o in overrides]
    except ValueError as error:
        parser.error(str(error))
    seconds = step_seconds(profiles, args.method, Path(args.manifest).resolve(), args.rounds, args.steps)
    reference = float(np.median(seconds[0]))
    for o, rounds in zip(overrides, seconds):
        median = float(np.median(rounds))
        print(f"{change_text(o):60s} {median:.3f} s/step (rounds {', '.join(f'{r:.3f}' for r in rounds)}) "
              f"x{median / reference:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])
    if argv[:1] == ["score"]:
        return score_main(argv[1:])
    if argv[:1] == ["steptime"]:
        return steptime_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.minutes is not None and not args.minutes > 0:
        parser.error(f"--minutes must be > 0, got {args.minutes}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    try:
        overrides = parse_overrides(args.set, get_profile(args.base))
        if args.epochs is not None:
            overrides["epochs"] = args.epochs
        dataclasses.replace(get_profile(args.base), **overrides)  # the profile's own checks, before training
    except ValueError as error:
        parser.error(str(error))

    # The profile's own data set is generated when missing; a user's --manifest never is.
    manifest = command_manifest(args.base, args.manifest).resolve()
    for seed in args.seeds:
        budget_s = None if args.minutes is None else args.minutes * 60
        row = run_one(args.name, overrides, args.method, not args.no_iou_balance, seed, budget_s, manifest,
                      Path(args.out), Path(args.log), base=args.base, note=args.note,
                      validate_every=args.validate_every)
        print(f"{args.name} seed {seed}: {summary(row)}, {row['steps']} steps in {row['train_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

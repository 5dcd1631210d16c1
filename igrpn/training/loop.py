"""Train one model (IG-RPN or a baseline) on the training split of a manifest.

    python -m igrpn.train --profile cpu --method rpn [--no-iou-balance] --seed 0 --out DIR

writes ``DIR/checkpoint.pt`` (after every epoch, atomically) and ``DIR/log.csv`` (one row per
optimiser step and one per epoch). A run whose ``DIR/checkpoint.pt`` already exists for the same
configuration resumes after the last finished epoch and ends with the same number of optimiser
steps as an uninterrupted run.

Data-parallel training on several GPUs (or CPU processes) is started with torchrun, e.g.
``torchrun --nproc_per_node=4 -m igrpn.train --profile paper --method rpn --out DIR``: each process
trains on a disjoint shard of the training set with DistributedDataParallel, the learning rate is
scaled linearly with the number of processes (the global batch is ``batch_size × world_size``), and
rank 0 alone validates and writes the log and the checkpoints (see :mod:`igrpn.training.distributed`).

Optimiser: the profile's, AdamW or SGD with Nesterov momentum (docs/design.md §10.12), with a short
linear warm-up and a cosine decay: the cosine schedule ends every run at a small learning rate
whatever the epoch budget, which matters when a profile gives only a dozen epochs.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from igrpn import config
from igrpn.anchors import make_anchors
from igrpn.boxes import box_iou, centre_to_corner, landmark_boxes
from igrpn.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAME, CheckpointError, load_checkpoint
from igrpn.config import Profile, get_profile
from igrpn.data import collate, LandmarkDataset, load_cases, read_manifest
from igrpn.detect import Detector
from igrpn.evaluation.answers import answers, ground_truth
from igrpn.evaluation.metrics import evaluate
from igrpn.io import atomic_torch_save, atomic_write_files
from igrpn.models import build_model
from igrpn.models.backbone import detection_stride
from igrpn.phantom import command_manifest
from igrpn.prior import fit_handedness
from igrpn.training import distributed

LOG_NAME = "log.csv"
LOG_FIELDS = (
    "kind", "epoch", "step", "lr", "loss", "loss_cls", "loss_reg", "num_pos", "mean_pos_iou",
    "val_d_mean_mm", "val_hit50", "seconds",
)


def run_name(method: str, iou_balance: bool) -> str:
    """Name of a training configuration, e.g. ``rpn_ib``; the baselines without the switch use the
    method alone (Faster R-CNN and heatmap have no IoU-balanced variant in the paper)."""
    if method in ("rpn", "ssd"):
        return f"{method}_{'ib' if iou_balance else 'noib'}"
    return method


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_train_val(case_ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic hold-out of the training split for validation (never the test split)."""
    if len(case_ids) < 2:
        raise ValueError(f"need at least 2 training cases to hold one out, got {len(case_ids)}")
    order = np.random.default_rng(seed).permutation(len(case_ids))
    n_val = min(len(case_ids) - 1, max(1, round(val_fraction * len(case_ids))))
    val = sorted(case_ids[i] for i in order[:n_val])
    train = sorted(case_ids[i] for i in order[n_val:])
    return train, val


def learning_rate(step: int, total_steps: int, base_lr: float, warmup_fraction: float = 0.05) -> float:
    """Linear warm-up over the first steps, then cosine decay to 5 % of ``base_lr``."""
    warmup = max(1, int(warmup_fraction * total_steps))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def learning_rate_at(fraction: float, base_lr: float, warmup_fraction: float = 0.05) -> float:
    """:func:`learning_rate` as a function of the fraction of a wall-clock budget spent, in [0, 1]
    (time-budgeted runs, where the number of steps is not known in advance)."""
    fraction = min(1.0, max(0.0, fraction))
    if fraction < warmup_fraction:
        return base_lr * max(fraction / warmup_fraction, 1e-3)
    progress = (fraction - warmup_fraction) / max(1e-9, 1.0 - warmup_fraction)
    return base_lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def optimiser_step(model, net, optimizer: torch.optim.Optimizer, volumes: torch.Tensor, landmarks_vox: torch.Tensor,
                   device: torch.device, use_bf16: bool) -> dict:
    """One training step: forward (through ``net``, the model or its DDP wrapper) and loss under
    :func:`distributed.autocast`, backward, gradient clipping, optimiser step. Returns the losses."""
    with distributed.autocast(device, enabled=use_bf16):
        losses = model.loss(net(volumes), landmarks_vox)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    # Clipping keeps the first steps of the untuned heads from blowing up the BN statistics.
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
    optimizer.step()
    return losses


def make_optimizer(parameters, profile: Profile) -> torch.optim.Optimizer:
    """The profile's optimiser (``profile.optimizer``) at ``profile.lr``."""
    if profile.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=profile.lr, momentum=0.9, nesterov=True,
                               weight_decay=profile.weight_decay)
    return torch.optim.AdamW(parameters, lr=profile.lr, weight_decay=profile.weight_decay)


def write_log(rows: list[dict], path: Path) -> None:
    """Write the log CSV atomically."""

    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_files({path: text.getvalue()})


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _run_config(profile: Profile, method: str, iou_balance: bool, seed: int, manifest: Path,
                world_size: int = 1, max_steps_per_epoch: int | None = None,
                max_seconds: float | None = None) -> dict:
    """Everything that defines a training run, as plain data (stored in the checkpoint)."""
    return {
        "max_seconds": max_seconds,
        "profile": profile.to_dict(),
        "method": method,
        "iou_balance": bool(iou_balance),
        "seed": int(seed),
        "manifest": str(manifest),
        "world_size": int(world_size),
        "max_steps_per_epoch": max_steps_per_epoch,
    }


#: Run-config keys that must match to resume, with the value a checkpoint without the key had.
_RESUME_KEYS = {"profile": None, "method": None, "iou_balance": None, "seed": None,
                "world_size": 1, "max_steps_per_epoch": None, "max_seconds": None}


def _run_differences(a: dict, b: dict) -> list[str]:
    """The resume-relevant keys on which two run configs differ."""
    return [k for k, default in _RESUME_KEYS.items() if a.get(k, default) != b.get(k, default)]


def _same_run(a: dict, b: dict) -> bool:
    return not _run_differences(a, b)


@torch.no_grad()
def validate(model, cases, profile: Profile, handedness: int | None = None) -> dict:
    """Mean landmark distance (mm) and hit rate at IoU 0.5 of the answers without the prior on
    ``cases``, selected as :class:`igrpn.detect.Detector` selects them and scored as the report's
    tables are (:func:`igrpn.evaluation.metrics.evaluate`)."""
    detector = Detector(model, profile, handedness=handedness)  # puts the model in eval mode
    rows = []
    for case in cases:
        chosen = answers(detector.predict_grid(case.volume, case.affine))
        rows.append(chosen.assign(case_id=case.case_id))
    model.train()
    result = evaluate(pd.concat(rows, ignore_index=True), ground_truth(cases))
    return {"val_d_mean_mm": result["d_mean"], "val_hit50": result["hit50"]}


def train(
    profile: Profile | str,
    method: str = "rpn",
    iou_balance: bool = True,
    seed: int = 0,
    out_dir: str | Path = "runs/rpn_ib",
    manifest: str | Path = "data_manifest.csv",
    resume: bool = True,
    progress: bool = True,
    max_epochs: int | None = None,
    device: str = "cpu",
    max_steps_per_epoch: int | None = None,
    max_seconds: float | None = None,
    validate_every: int = 1,
) -> Path:
    """Train one model and return the path of its checkpoint.

    Args:
        profile: a :class:`Profile` or its name.
        method: one of ``config.METHODS``.
        iou_balance: IoU-balanced classification loss (Eq. 2-3) on or off (ablation).
        seed: seeds the weights, the validation hold-out, the augmentation and the sampling.
        out_dir: receives ``checkpoint.pt`` and ``log.csv``.
        manifest: the data set (train split used; a part held out for validation).
        resume: continue from ``out_dir/checkpoint.pt`` when it is of the same configuration.
        max_epochs: stop after this many epochs in total (for tests of interruption); the learning
            rate schedule still follows the method's epochs (``profile.for_method(method).epochs``).
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA when available). Forward and loss run under
            bf16 autocast where the device computes bf16 natively (``profile.mixed_precision``).
            Under torchrun (``WORLD_SIZE`` > 1) the run is data-parallel, see
            :mod:`igrpn.training.distributed`; the checkpoint is the same as a single process's.
        max_steps_per_epoch: cut every epoch to at most this many optimiser steps (benchmarks and
            quick checks; part of the run's configuration, the schedule follows the cut epochs).
        max_seconds: a wall-clock budget for the training loop (each optimiser step and the
            loading of its batch; validation and checkpoints not counted) instead of an epoch count: the run trains until it is spent, the learning rate
            follows the fraction of it spent (:func:`learning_rate_at`) and the epoch in progress
            ends early. Such a run always starts afresh (a resumed clock would change the schedule)
            and runs in one process (ranks with their own clocks could stop at different steps).
        validate_every: validate (and checkpoint) after every this many epochs, and after the last.
    """
    profile = get_profile(profile) if isinstance(profile, str) else profile
    if method not in config.METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {config.METHODS}")
    profile = profile.for_method(method)
    if max_steps_per_epoch is not None and max_steps_per_epoch < 1:
        raise ValueError(f"max_steps_per_epoch must be >= 1, got {max_steps_per_epoch}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    if validate_every < 1:
        raise ValueError(f"validate_every must be >= 1, got {validate_every}")
    context = distributed.init_distributed(device)
    if max_seconds is not None and context.distributed:
        if context.created_group:
            distributed.cleanup()
        raise ValueError("max_seconds: a time-budgeted run trains in one process (each rank's clock would "
                         "stop it at another step); give torchrun runs an epoch count")
    try:
        return _train(profile, method, iou_balance, seed, Path(out_dir), Path(manifest).resolve(),
                      resume and max_seconds is None, progress and context.is_main, max_epochs,
                      max_steps_per_epoch, context, max_seconds, validate_every)
    finally:
        if context.created_group:
            distributed.cleanup()


def _train(profile: Profile, method: str, iou_balance: bool, seed: int, out_dir: Path, manifest: Path,
           resume: bool, progress: bool, max_epochs: int | None, max_steps_per_epoch: int | None,
           context: distributed.DistributedContext, max_seconds: float | None = None,
           validate_every: int = 1) -> Path:
    """The body of :func:`train` in one process of a (possibly one-process) group."""
    run_config = _run_config(profile, method, iou_balance, seed, manifest, context.world_size, max_steps_per_epoch,
                             max_seconds)
    # For the record only (not a resume key): the arithmetic this machine trains in.
    use_bf16 = profile.mixed_precision and distributed.mixed_precision(context.device)
    run_config["precision"] = "bf16 autocast" if use_bf16 else "fp32"
    ckpt_path, log_path = out_dir / CHECKPOINT_NAME, out_dir / LOG_NAME

    seed_everything(seed)
    table = read_manifest(manifest)
    train_table = table[table["split"] == "train"]
    train_ids, val_ids = split_train_val(list(train_table["case_id"]), profile.val_fraction, seed)
    cases = load_cases(train_table, profile.spacing_mm, progress=progress)
    by_id = {case.case_id: case for case in cases}
    train_cases = [by_id[i] for i in train_ids]
    val_cases = [by_id[i] for i in val_ids]
    handedness = None
    if profile.merge_mirror_pairs:
        # The sign that names the two eyes at inference, measured on the training annotations.
        handedness, agreement = fit_handedness(np.stack([case.landmarks_mm for case in train_cases]))
        if agreement < 0.95:
            warnings.warn(f"{manifest}: only {agreement:.0%} of the training landmark sets share one handedness "
                          "(left and right eye swapped in some annotations?)", stacklevel=2)

    model = distributed.place_model(build_model(method, profile, iou_balance=iou_balance), context)
    optimizer = make_optimizer(model.parameters(), profile)
    dataset = LandmarkDataset(train_cases, augment=True, rotation_deg=profile.rotation_deg,
                              flip_prob=profile.flip_prob, seed=seed,
                              crop_size=None if profile.crop_mm is None else round(profile.crop_mm / profile.spacing_mm),
                              crop_margin=max(profile.mm_to_vox(profile.gt_box_mm)) / 2)
    sampler = distributed.shard_sampler(dataset, context, seed) if context.distributed else None
    steps_per_epoch = math.ceil((len(dataset) if sampler is None else len(sampler)) / profile.batch_size)
    steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch or steps_per_epoch)
    total_steps = steps_per_epoch * profile.epochs
    # Linear scaling rule (Goyal et al. 2017): the global batch is batch_size × world_size, so the
    # step size grows with it; the schedule's warm-up eases the larger early steps.
    base_lr = profile.lr * context.world_size

    start_epoch, global_step, log_rows = 0, 0, []
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, method=method)
        if not _same_run(ckpt["config"], run_config):
            raise CheckpointError(
                f"{ckpt_path}: holds a run of another configuration (differs in "
                f"{', '.join(_run_differences(ckpt['config'], run_config))}); use another --out or delete it"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_epoch, global_step = ckpt["epoch"] + 1, ckpt["global_step"]
        # The anchor sampler is seeded by the number of loss calls: continue its sequence.
        model._sampling_calls = global_step
        # Rows logged after the last checkpoint belong to an epoch that is redone.
        log_rows = [r for r in read_log(log_path) if int(r["step"]) <= global_step]
    # Every rank reads the same checkpoint: a multi-node run needs out_dir on a shared file system.
    if not distributed.all_ranks_equal(start_epoch):
        raise CheckpointError(f"{ckpt_path}: not visible alike to every process; put --out on a shared file system")
    last_epoch = profile.epochs if max_epochs is None else min(profile.epochs, max_epochs)
    if max_seconds is not None:
        last_epoch = max_epochs or 1_000_000  # the clock ends the run
    train_seconds = 0.0  # the budget's clock: steps and the loading of their batches
    net = distributed.wrap_model(model, context)  # DDP in a group, else the model itself
    on_cuda = context.device.type == "cuda"
    if on_cuda:
        # Cropped profiles give every batch the same shape: let cuDNN pick its fastest kernels once.
        torch.backends.cudnn.benchmark = profile.crop_mm is not None

    model.train()
    for epoch in range(start_epoch, last_epoch):
        dataset.set_epoch(epoch)
        if sampler is None:
            loader = DataLoader(dataset, batch_size=profile.batch_size, shuffle=True, collate_fn=collate,
                                generator=torch.Generator().manual_seed(seed * 1000 + epoch), pin_memory=on_cuda)
        else:
            sampler.set_epoch(epoch)  # the permutation of this epoch, the same on every rank
            loader = DataLoader(dataset, batch_size=profile.batch_size, sampler=sampler, collate_fn=collate,
                                pin_memory=on_cuda)
        epoch_start, epoch_first_step, sums = time.perf_counter(), global_step, {}
        bar = tqdm(itertools.islice(loader, steps_per_epoch), total=steps_per_epoch,
                   desc=f"{run_name(method, iou_balance)} epoch {epoch + 1}" + (
                       f"/{profile.epochs}" if max_seconds is None else f" ({train_seconds:.0f}/{max_seconds:.0f} s)"),
                   disable=not progress, leave=False)
        loop_mark = time.perf_counter()
        for batch in bar:
            if max_seconds is not None:
                if train_seconds >= max_seconds:
                    break
                lr = learning_rate_at(train_seconds / max_seconds, base_lr)
            else:
                lr = learning_rate(global_step, total_steps, base_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_start = time.perf_counter()
            volumes = batch["volume"].to(context.device, non_blocking=True)
            losses = optimiser_step(model, net, optimizer, volumes, batch["landmarks_vox"].to(context.device),
                                    context.device, use_bf16)
            global_step += 1
            values = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}
            values = distributed.all_reduce_mean(values)  # means over the global batch (unchanged in one process)
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            now = time.perf_counter()
            train_seconds += now - loop_mark  # the step and the loading of its batch
            loop_mark = now
            log_rows.append({"kind": "step", "epoch": epoch, "step": global_step, "lr": lr,
                             "seconds": now - step_start, **values})
            bar.set_postfix(loss=f"{values['loss']:.3f}")
        # A time-budgeted epoch may end early: average over the steps it took.
        n_steps = max(1, global_step - epoch_first_step)
        out_of_time = max_seconds is not None and train_seconds >= max_seconds
        row = {"kind": "epoch", "epoch": epoch, "step": global_step, "lr": lr,
               "seconds": time.perf_counter() - epoch_start,
               **{k: v / n_steps for k, v in sums.items()}}
        if not context.is_main:
            distributed.barrier()  # wait for rank 0's validation and checkpoint
            continue
        last = out_of_time or epoch + 1 == last_epoch
        if (epoch + 1) % validate_every and not last:
            log_rows.append(row)
            continue
        row.update(validate(model, val_cases, profile, handedness))
        log_rows.append(row)
        if progress:
            tqdm.write(f"epoch {epoch + 1}: loss {row['loss']:.4f}  val d-mean {row['val_d_mean_mm']:.2f} mm"
                       f"  val hit50 {row['val_hit50']:.2f}  ({row['seconds']:.0f} s)")
        atomic_torch_save({
            "format_version": CHECKPOINT_FORMAT,
            "igrpn_version": __import__("igrpn").__version__,
            "method": method,
            "iou_balance": bool(iou_balance),
            "config": run_config,
            "epoch": epoch,
            "global_step": global_step,
            "val_ids": val_ids,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "world_size": context.world_size,
            "handedness": handedness,
        }, ckpt_path)
        write_log(log_rows, log_path)
        distributed.barrier()
        if out_of_time:
            break
    return ckpt_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m igrpn.train",
        description="Train one landmark detector (IG-RPN or a baseline) on a manifest's train split.",
        epilog="example: python -m igrpn.train --profile cpu --method rpn --seed 0 --out report/runs/rpn_ib\n"
               "on 4 GPUs: torchrun --nproc_per_node=4 -m igrpn.train --profile paper --method rpn --out runs/rpn_ib",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--profile", default="cpu", choices=sorted(config.PROFILES))
    parser.add_argument("--method", default="rpn", choices=config.METHODS)
    parser.add_argument("--no-iou-balance", action="store_true", help="plain cross-entropy (ablation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--manifest", default=None,
                        help="data set (default: the profile's own, generated when missing, as make reproduce does)")
    parser.add_argument("--out", required=True, help="folder for checkpoint.pt and log.csv")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    parser.add_argument("--device", default="auto", choices=distributed.DEVICE_CHOICES,
                        help="auto: CUDA when available (bf16 autocast), else CPU (default: %(default)s)")
    parser.add_argument("--epochs", type=_positive_int, default=None,
                        help="override the profile's number of epochs (part of the run's configuration)")
    parser.add_argument("--max-epochs", type=_positive_int, default=None,
                        help="stop after this many epochs in total; the command without it later resumes the run")
    parser.add_argument("--max-steps-per-epoch", type=_positive_int, default=None,
                        help="cut every epoch to this many optimiser steps (benchmarks, quick checks)")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m igrpn.train``; returns the exit status. Without ``--manifest`` the profile's own
    data set is used, generated first when missing (``phantom.command_manifest``)."""

    args = build_parser().parse_args(argv)
    profile = get_profile(args.profile)
    if args.epochs is not None:
        profile = profile.with_epochs(args.epochs)
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone shows progress
    manifest = command_manifest(args.profile, args.manifest, progress=is_main)
    path = train(profile, method=args.method, iou_balance=not args.no_iou_balance, seed=args.seed,
                 out_dir=args.out, manifest=manifest, resume=not args.no_resume,
                 max_epochs=args.max_epochs, device=args.device, max_steps_per_epoch=args.max_steps_per_epoch)
    if is_main:
        print(f"checkpoint: {path}")
    return 0


def anchor_coverage(cases, profile: Profile) -> pd.DataFrame:
    """How well the profile's anchors cover each landmark's GT box (no augmentation).

    For every case and landmark: the best IoU of any anchor with the GT box and the number of
    anchors that the matcher makes positive for it (IoU > ``profile.pos_iou``, or the best
    anchor). A landmark whose best IoU stays low is missed whatever the training does.

    Returns:
        DataFrame with columns ``case_id, landmark, best_iou, num_positive``.
    """
    stride = detection_stride(profile)
    box_vox = torch.tensor([profile.mm_to_vox(b) for b in profile.gt_box_mm], dtype=torch.float32)
    sizes_vox = [profile.mm_to_vox(s) for s in profile.anchor_sizes_mm]
    anchors_by_shape, records = {}, []
    for case in cases:
        # The backbone works on volumes padded to a multiple of 8.
        padded = tuple(int(math.ceil(n / 8) * 8) for n in case.volume.shape)
        grid = tuple(n // stride for n in padded)
        if grid not in anchors_by_shape:
            anchors_by_shape[grid] = centre_to_corner(make_anchors(grid, stride, sizes_vox, profile.anchor_shapes))
        gt = centre_to_corner(landmark_boxes(torch.as_tensor(case.landmarks_vox, dtype=torch.float32), box_vox))
        iou = box_iou(anchors_by_shape[grid], gt)  # (A, 5)
        best = iou.max(dim=0).values
        positive = (iou > profile.pos_iou) | (iou == best[None, :])
        for index, name in enumerate(config.LANDMARKS):
            records.append({"case_id": case.case_id, "landmark": name, "best_iou": float(best[index]),
                            "num_positive": int(positive[:, index].sum())})
    return pd.DataFrame.from_records(records)


if __name__ == "__main__":
    raise SystemExit(main())

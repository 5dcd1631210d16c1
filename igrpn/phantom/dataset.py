"""The phantom data set: per-volume seeds and splits, NIfTI volumes and their manifest, and the
command line (``python -m igrpn.phantom``, ``igrpn phantom``).

``generate_dataset`` writes every file atomically (``igrpn.io``), so an interrupted run leaves only
whole files; ``ensure_dataset`` generates a profile's data set when it is missing and checks a
regenerated manifest against an existing one; ``command_manifest`` is the manifest a command
reads when the user names none (the profile's own, :func:`default_manifest`).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from igrpn.config import LANDMARKS, NUM_LANDMARKS, REPO_ROOT, get_profile
from igrpn.io import atomic_write_files
from igrpn.phantom.scene import check_arguments, make_phantom_with_info

__all__ = [
    "MANIFEST_COLUMNS", "MAX_VOLUMES", "REPO_ROOT", "default_manifest", "case_seeds", "split_labels",
    "generate_dataset", "ensure_dataset", "command_manifest", "add_arguments", "check_manifest_path", "main",
]

#: The repository's root, which the profiles' manifests (``Profile.manifest``) are relative to.
#: Most volumes one data set may have (the seeds and the manifest are built in memory).
MAX_VOLUMES = 100_000
#: Manifest columns, in order.
MANIFEST_COLUMNS: tuple[str, ...] = (
    ("case_id", "image", "split")
    + tuple(f"{name}_{axis}" for name in LANDMARKS for axis in "xyz")
    + ("source", "seed", "notes")
)

#: What ``python -m igrpn.phantom --help`` says the command is.
DESCRIPTION = "Synthetic fetal-face 3D ultrasound phantom: the default data set (docs/design.md §4, §9)."


def default_manifest(profile_name: str) -> Path:
    """The profile's data set: the committed manifest for `cpu` and `paper`, build/ for `smoke`."""
    return REPO_ROOT / get_profile(profile_name).manifest


def case_seeds(seed: int, n: int) -> np.ndarray:
    """(n,) int64 per-volume seeds derived from ``seed``; the first k do not depend on n."""
    return np.random.SeedSequence(int(seed)).generate_state(n, dtype=np.uint32).astype(np.int64)


def split_labels(seed: int, n: int, n_test: int) -> list[str]:
    """``"train"``/``"test"`` for n volumes: a random but deterministic choice of n_test test cases."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 1])))
    labels = np.full(n, "train", dtype=object)
    labels[rng.permutation(n)[:n_test]] = "test"
    return labels.tolist()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never half-written;
    ``igrpn.io.atomic_write_files``), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_files({path: data})


def _nifti_bytes(volume: np.ndarray, affine: np.ndarray, description: str) -> bytes:
    """Gzipped NIfTI-1 bytes (mtime 0, so the same volume gives the same file)."""
    image = nib.Nifti1Image(volume, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = description.encode()[:79]
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _manifest_bytes(rows: list[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def generate_dataset(out_dir, n: int = 152, seed: int = 0, n_test: int = 32, grid: int = 128,
                     spacing_mm: float = 1.3, manifest_path=None, progress: bool = True) -> Path:
    """Write n phantom volumes ``<out_dir>/<case_id>.nii.gz`` and their manifest.

    Every file is written atomically, so an interrupted run leaves only whole files and simply
    runs again. The manifest (default ``<out_dir>/data_manifest.csv``) has the columns
    ``MANIFEST_COLUMNS``; ``image`` is relative to the manifest's folder, landmarks in world mm.

    Returns:
        The manifest's path.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_VOLUMES:
        raise ValueError(f"generate_dataset: n must be a positive integer up to {MAX_VOLUMES}, got {n!r}")
    if not 0 <= n_test <= n:
        raise ValueError(f"generate_dataset: n_test must be in [0, n={n}], got {n_test!r}")
    check_arguments(seed, grid, spacing_mm, {})  # before any folder or file is made
    out_dir = Path(out_dir)
    manifest = Path(manifest_path) if manifest_path is not None else out_dir / "data_manifest.csv"
    seeds, splits = case_seeds(seed, n), split_labels(seed, n, n_test)
    width = max(3, len(str(n - 1)))
    rows = []
    for index in tqdm(range(n), desc="phantom volumes", disable=not progress):
        case_id = f"phantom_{index:0{width}d}"
        volume, affine, landmarks, info = make_phantom_with_info(int(seeds[index]), grid, spacing_mm)
        image_path = out_dir / f"{case_id}.nii.gz"
        _atomic_write(image_path, _nifti_bytes(volume, affine, f"igrpn phantom seed={seeds[index]}"))
        row = {"case_id": case_id,
               "image": Path(os.path.relpath(image_path.resolve(), manifest.parent.resolve())).as_posix(),
               "split": splits[index]}
        for name, point in zip(LANDMARKS, landmarks):
            row.update({f"{name}_{axis}": f"{value:.4f}" for axis, value in zip("xyz", point)})
        row.update({"source": "phantom", "seed": int(seeds[index]), "notes": info.notes})
        rows.append(row)
    _atomic_write(manifest, _manifest_bytes(rows))
    return manifest


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = [c for c in MANIFEST_COLUMNS[:3 + 3 * NUM_LANDMARKS] if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: manifest lacks columns {missing}")
        return list(reader)


def _compare_manifests(old_path: Path, new_path: Path) -> None:
    """``ValueError`` naming the first difference between two phantom manifests."""
    old, new = _read_rows(old_path), _read_rows(new_path)
    if len(old) != len(new):
        raise ValueError(f"{old_path}: lists {len(old)} volumes but the profile's phantom has {len(new)}; "
                         "delete the manifest (or pass another path) to regenerate")
    for a, b in zip(old, new):
        for column in ("case_id", "split", "seed"):
            if str(a.get(column, "")).strip() != str(b.get(column, "")).strip():
                raise ValueError(f"{old_path}: case {a['case_id']}: {column} {a.get(column)!r} differs from the "
                                 f"regenerated {b.get(column)!r}; delete the manifest to regenerate")
        old_image = (old_path.parent / a["image"]).resolve()
        new_image = (new_path.parent / b["image"]).resolve()
        if old_image != new_image:
            raise ValueError(f"{old_path}: case {a['case_id']}: image {old_image} is not where the profile "
                             f"generates it ({new_image}); pass data_dir or delete the manifest")
        for column in MANIFEST_COLUMNS[3:3 + 3 * NUM_LANDMARKS]:
            if abs(float(a[column]) - float(b[column])) > 1e-3:
                raise ValueError(f"{old_path}: case {a['case_id']}: {column} {a[column]} != regenerated "
                                 f"{b[column]}; the phantom generator changed since the manifest was written")


def ensure_dataset(manifest_path, profile, data_dir=None, progress: bool = True) -> Path:
    """Return ``manifest_path`` once it and every image it lists exist, generating them if needed.

    Generates the profile's phantom (``phantom_n``, ``phantom_n_test``, ``phantom_grid``,
    ``phantom_spacing_mm``; seed 0) into ``data_dir``. By default that is ``profile.data_dir``
    relative to the manifest's folder, or the manifest's folder itself when it already is that
    folder (e.g. ``build/smoke/data/data_manifest.csv`` for ``data_dir="build/smoke/data"``).
    When a manifest already existed (e.g. the committed one with its images missing), the
    regenerated rows must equal it, else ``ValueError``; it is then kept as it was.

    Args:
        manifest_path: the manifest to return (written when missing).
        profile: a ``config.Profile``.
        data_dir: folder of the volumes; see above for the default.
        progress: show a tqdm progress bar while generating.

    Returns:
        ``manifest_path`` as a ``Path``.
    """
    manifest = Path(manifest_path)
    existed = manifest.exists()
    if existed:
        rows = _read_rows(manifest)
        if rows and all((manifest.parent / row["image"]).exists() for row in rows):
            return manifest
    if data_dir is None:
        relative = Path(profile.data_dir)
        folder = manifest.parent.resolve()
        inside = not relative.is_absolute() and folder.parts[-len(relative.parts):] == relative.parts
        data_dir = folder if inside else manifest.parent / relative
    data_dir = Path(data_dir)
    target = manifest.with_name(f".{manifest.name}.regenerated.tmp") if existed else manifest
    try:
        generate_dataset(data_dir, n=profile.phantom_n, seed=0, n_test=profile.phantom_n_test,
                         grid=profile.phantom_grid, spacing_mm=profile.phantom_spacing_mm,
                         manifest_path=target, progress=progress)
        if existed:
            _compare_manifests(manifest, target)
    finally:
        if existed:
            target.unlink(missing_ok=True)
    return manifest


def command_manifest(profile_name: str, manifest=None, progress: bool = True) -> Path:
    """The manifest a command reads (``igrpn train``, ``igrpn evaluate``).

    A user's own ``manifest`` is returned as given: it is never generated over (reading it names
    what is missing). Without one, the profile's own data set (:func:`default_manifest`) is
    returned, generated with a progress bar when missing, as ``make reproduce`` does
    (:func:`ensure_dataset`), so every command works from a fresh clone.
    """
    if manifest is not None:
        return Path(manifest)
    return ensure_dataset(default_manifest(profile_name), get_profile(profile_name), progress=progress)



# ------------------------------------------------------------------------------ command line

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The generator's command-line options (shared by ``python -m igrpn.phantom`` and
    ``igrpn phantom``)."""
    parser.add_argument("--out", default="data/phantom", help="folder of the volumes (default: %(default)s)")
    parser.add_argument("--n", type=int, default=152, help="number of volumes (default: %(default)s)")
    parser.add_argument("--n-test", type=int, default=32, help="test volumes among them (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default: %(default)s)")
    parser.add_argument("--grid", type=int, default=128, help="voxels per edge (default: %(default)s)")
    parser.add_argument("--spacing", type=float, default=1.3, help="voxel edge in mm (default: %(default)s)")
    parser.add_argument("--manifest", default=None, help="manifest path (default: OUT/data_manifest.csv)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def check_manifest_path(out_dir, manifest_path) -> None:
    """Refuse a ``--manifest`` whose folder does not exist (unless it is ``--out``, which is created).

    As in every igrpn command, a folder given as a folder (``--out``) is created, but the folder
    of an output file is not: a mistyped path fails instead of scattering files.

    Raises:
        ValueError naming the manifest and the missing folder.
    """
    if manifest_path is None:
        return
    manifest = Path(manifest_path)
    folder = manifest.absolute().parent
    if manifest.is_dir():
        raise ValueError(f"{manifest}: cannot write the manifest: it is a directory")
    if not folder.is_dir() and folder != Path(out_dir).absolute():
        raise ValueError(f"{manifest}: cannot write the manifest: directory {folder} does not exist "
                         "(the folder of an output file is not created; create it first)")


def main(argv=None) -> None:
    """``python -m igrpn.phantom --out data/phantom --n 152 --seed 0``."""
    parser = add_arguments(argparse.ArgumentParser(prog="python -m igrpn.phantom",
                                                   description=DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        check_manifest_path(args.out, args.manifest)
        path = generate_dataset(args.out, n=args.n, seed=args.seed, n_test=args.n_test, grid=args.grid,
                                spacing_mm=args.spacing, manifest_path=args.manifest, progress=not args.quiet)
    except ValueError as error:
        parser.error(str(error))
    print(path)

#!/usr/bin/env bash
# GPU check of igrpn's training (issue 7): one epoch of the `paper` profile on the phantom data,
# cut to a few optimiser steps, for each method, on one GPU (bf16 autocast); then, when the
# machine has two GPUs or more, the same for IG-RPN under torchrun with DistributedDataParallel.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default OUT_DIR: build/gpu_check)
#
# Environment:
#   GPU_CHECK_STEPS=20                               optimiser steps per run (the epoch is cut there)
#   GPU_CHECK_METHODS="rpn ssd faster_rcnn heatmap"  methods trained on one GPU
#   GPU_CHECK_PROFILE=paper  GPU_CHECK_DEVICE=cuda   (smoke/cpu: a dry run of this script on a CPU)
#   PYTHON=.venv/bin/python                          the interpreter (default: .venv's, else python3)
#
# The phantom data set of the profile is generated first when missing (152 volumes of 128³ at
# 1.3 mm: a few minutes, once). Prints the GPU, then per method the median step time (from the
# steps' wall times in log.csv, the first 3 left out as warm-up: cuDNN autotuning), the time the
# steps waited for data (augmentation runs on the CPU in the training process), volumes per second,
# the peak GPU memory (torch.cuda.max_memory_allocated, training and rank 0's validation on whole
# volumes) and the validation distance after the cut epoch (meaningless after so few steps). A
# JSON summary is written to OUT_DIR/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${1:-build/gpu_check}
STEPS=${GPU_CHECK_STEPS:-20}
METHODS=${GPU_CHECK_METHODS:-rpn ssd faster_rcnn heatmap}
PROFILE=${GPU_CHECK_PROFILE:-paper}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

# One process for every single-GPU run: the loaded volumes are cached between them.
"$PYTHON" - "$OUT" "$STEPS" "$PROFILE" "$DEVICE" $METHODS <<'PY'
import dataclasses
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from igrpn import distributed, train
from igrpn.config import get_profile
from igrpn.detect import Detector
from igrpn.models import build_model
from igrpn.phantom import ensure_dataset
from igrpn.reproduce import default_manifest

out, steps, profile_name, device_name, methods = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
device = distributed.resolve_device(device_name)  # ValueError when CUDA is missing
on_cuda = device.type == "cuda"
print(f"torch {torch.__version__}  CUDA {torch.version.cuda}  device {device}", flush=True)
if on_cuda:
    props = torch.cuda.get_device_properties(device)
    print(f"GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} visible, "
          f"bf16 {'native' if torch.cuda.is_bf16_supported(including_emulation=False) else 'NOT native: fp32'}")

profile = dataclasses.replace(get_profile(profile_name), epochs=1)
start = time.perf_counter()
manifest = ensure_dataset(default_manifest(profile_name), profile)
print(f"data: {manifest} ({time.perf_counter() - start:.0f} s to check or generate)", flush=True)

# Mixed precision really is on: the RPN's logits come out in bf16 under the autocast context.
probe = build_model("rpn", profile).to(device)
edge = round((profile.crop_mm or 64 * profile.spacing_mm) / profile.spacing_mm)
with torch.no_grad(), distributed.autocast(device):
    logits_dtype = probe(torch.zeros(1, 1, edge, edge, edge, device=device))["cls_logits"].dtype
print(f"forward under distributed.autocast: cls_logits {logits_dtype}  (input 1x{edge}^3)")
del probe

results = []
for method in methods:
    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    path = train.train(profile, method=method, seed=0, out_dir=out / method, manifest=manifest, resume=False,
                       progress=False, device=device_name, max_steps_per_epoch=steps)
    wall = time.perf_counter() - start
    log = pd.read_csv(out / method / "log.csv")
    step_seconds = log.loc[log["kind"] == "step", "seconds"].to_numpy()
    epoch = log[log["kind"] == "epoch"].iloc[-1]
    timed = step_seconds[3:] if len(step_seconds) > 4 else step_seconds
    median = float(pd.Series(timed).median())
    Detector.from_checkpoint(path)  # the checkpoint loads in a CPU process
    row = {
        "method": method, "steps": int(len(step_seconds)), "batch_size": profile.batch_size,
        "median_step_s": median, "volumes_per_s": profile.batch_size / median,
        "data_wait_s_per_step": float((epoch["seconds"] - step_seconds.sum()) / len(step_seconds)),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else float("nan"),
        "final_loss": float(epoch["loss"]), "val_d_mean_mm": float(epoch["val_d_mean_mm"]),
        "wall_s": wall,
    }
    results.append(row)
    print(f"{method:12s} {row['steps']} steps  median step {median * 1e3:7.1f} ms  "
          f"({row['volumes_per_s']:.1f} volumes/s)  data wait {row['data_wait_s_per_step'] * 1e3:6.1f} ms/step  "
          f"peak {row['peak_mem_gib']:.2f} GiB  loss {row['final_loss']:.3f}  wall {wall:.0f} s", flush=True)

summary = {"device": torch.cuda.get_device_name(device) if on_cuda else "cpu", "profile": profile_name,
           "torch": torch.__version__, "manifest": str(manifest), "runs": results}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(f"summary: {out / 'gpu_check.json'}")
PY

# Several GPUs: IG-RPN data-parallel over all of them (NCCL, SyncBatchNorm, lr x world size).
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$DEVICE" = cuda ] && [ "$NGPU" -ge 2 ]; then
    MANIFEST=$("$PYTHON" -c "from igrpn.reproduce import default_manifest; print(default_manifest('$PROFILE'))")
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m igrpn.train \
        --profile "$PROFILE" --epochs 1 --max-steps-per-epoch "$STEPS" --method rpn --device cuda \
        --manifest "$MANIFEST" --out "$OUT/ddp_rpn" --no-resume
    "$PYTHON" - "$OUT" "$NGPU" "$PROFILE" <<'PY'
import json
import sys
from pathlib import Path

import pandas as pd

from igrpn.config import get_profile

out, ngpu, batch = Path(sys.argv[1]), int(sys.argv[2]), get_profile(sys.argv[3]).batch_size
log = pd.read_csv(out / "ddp_rpn" / "log.csv")
seconds = log.loc[log["kind"] == "step", "seconds"]
median = float(seconds.iloc[3:].median() if len(seconds) > 4 else seconds.median())
single = {r["method"]: r for r in json.loads((out / "gpu_check.json").read_text())["runs"]}.get("rpn")
line = f"rpn on {ngpu} GPUs (DDP): median step {median * 1e3:.1f} ms, {batch * ngpu / median:.1f} volumes/s"
if single:
    line += f"; scaling efficiency vs 1 GPU {single['median_step_s'] / median:.2f}"
print(line)
PY
else
    echo "multi-GPU check skipped: $NGPU CUDA device(s) visible (needs 2 or more)"
fi

"""Speed and memory benchmarks of the four methods and a MONAI peer (issue 8).

Run from the repository root::

    python -m benchmarks.bench                       # cpu and paper input sizes, writes report/
    python benchmarks/bench.py --quick --sizes smoke --out-dir build/bench

Everything is measured in ONE process, and within a group of rows round-robin (each round calls
every measurement once, after a warm-up), so that the ratios between rows hold on a noisy, shared
machine; a row gives the median, min and max over the rounds. Rows (``what``):

* ``conv3d_<layout>`` and ``conv3d_peak``: a plain 64→64-channel 3×3×3 convolution, batch 1, at
  32³ and 48³, in the default (NCDHW) and channels-last layouts and through oneDNN's fused op (the
  one the model's inference fast path uses); ``conv3d_peak`` repeats the fastest of them, the
  machine's practical peak that the models' GFLOP/s are compared against.
* ``<method>_inference``: the model's forward on one volume as ``igrpn.detect.Detector.predict_grid``
  times it (``ig_rpn``, ``ssd``, ``faster_rcnn``, ``heatmap``); ``<method>_postprocess``: the rest of
  ``predict_grid`` (softmax, decode, NMS, top-k, the candidate table and the graph prior's choice
  among the 2⁵ combinations); for IG-RPN also ``ig_rpn_decode_nms`` (``model.candidates`` alone) and
  ``ig_rpn_prior`` (``select_answers`` with the prior alone).
* ``ig_rpn_postprocess_trained`` (and ``ig_rpn_inference_trained``): the same ``predict_grid``
  timing with a TRAINED IG-RPN checkpoint (default ``report/runs/rpn_ib/checkpoint.pt``, made by
  ``make reproduce``; skipped when absent) on test volumes of its data set, its graph prior when
  one lies beside it. The untrained rows see near-uniform scores, the worst case for the
  post-processing's pruning (``igrpn.models.postprocess.top_anchors_per_class``); this row is what a user's
  detector costs.
* ``<method>_train_step``: one optimiser step as ``igrpn.train`` makes it (forward, loss, backward,
  gradient clipping, AdamW) on a batch of 2 training crops (input ``2x48^3``) and of 2 whole
  volumes (``2x64^3``) at the cpu profile.
* ``monai_retinanet_inference`` / ``_postprocess``: MONAI's 3D RetinaNet (ResNet-50-FPN) built as
  MONAI's detection tutorial builds it, on the same input as the IG-RPN rows.

``gflop`` counts the forward's convolutions and linear layers analytically with forward hooks
(2·k³·Cin/groups·Cout per output voxel; 2·in·out per linear row); a training step is counted as
3× its forward (backward ≈ 2× forward). ``peak_mem_mb`` on a CPU is the growth of the process's
peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after returning freed heap
memory with ``malloc_trim``) over its resident set just before ONE extra call of the measurement:
the transient memory of the call (activations, outputs, workspaces), not the weights already
loaded. On CUDA it is ``torch.cuda.max_memory_allocated`` growth over the allocation before the
call.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime
import gc
import itertools
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__" and "torch" not in sys.modules:
    # OpenMP's default wait policy spins idle threads; on a CPU shared with other busy processes
    # the spinning thread competes with the working one and small operations slow down 10-100×
    # (benchmarks/NOTES.md). Passive waiting, unless the caller chose a policy. It must be set
    # before torch (and its OpenMP runtime) is loaded.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from torch import nn

from igrpn.training import distributed
from igrpn.models import fast_cpu
from igrpn.config import LANDMARKS, METHODS, Profile, get_profile
from igrpn.models import build_model

#: CSV columns, in order.
COLUMNS = ("what", "input", "median_ms", "min_ms", "max_ms", "gflop", "gflops_per_s", "peak_mem_mb",
           "device", "repeats", "note")
#: Row-name prefix of each method.
ROW_PREFIX = {"rpn": "ig_rpn", "ssd": "ssd", "faster_rcnn": "faster_rcnn", "heatmap": "heatmap"}
#: Input edge (voxels) of each named size: the profile's phantom grid resampled to its spacing.
DEFAULT_EDGE = {"smoke": 32, "cpu": 64, "paper": 128}
#: Post-processing budget of the targets, ms per volume.
POSTPROCESS_TARGET_MS = 20.0


# --- sizes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    """An input size: a profile (spacing, width) and the edge of the cubic input volume, voxels."""

    profile: Profile
    edge: int

    @property
    def label(self) -> str:
        return f"{self.edge}^3"

    def train_edges(self) -> list[int]:
        """Training inputs: the profile's random crop (``crop_mm`` at its spacing) and the whole
        volume, smallest first; only the volume when the profile does not crop."""
        edges = {self.edge}
        if self.profile.crop_mm is not None:
            edges.add(int(round(self.profile.crop_mm / self.profile.spacing_mm)))
        return sorted(edges)


def parse_sizes(text: str) -> list[Size]:
    """``"cpu,paper"`` or ``"smoke"`` or ``"cpu:48"`` -> sizes (profile name, optional edge)."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, edge = item.partition(":")
        profile = get_profile(name)  # ValueError naming the known profiles
        if edge and (not edge.isdigit() or int(edge) < 8 or int(edge) % 8):
            raise ValueError(f"--sizes: edge of {item!r} must be a multiple of 8, at least 8")
        sizes.append(Size(profile, int(edge) if edge else DEFAULT_EDGE.get(name, 64)))
    if not sizes:
        raise ValueError("--sizes: no size given (e.g. cpu,paper)")
    return sizes


# --- device, timing and memory -----------------------------------------------------------------
def device_name(device: torch.device) -> str:
    """The CPU model (and thread count) or the GPU's name."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    return f"cpu: {model}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY {policy}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of ``fn()`` in ms (the device synchronised before and after)."""
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _status_kb(field_name: str) -> float:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return float(line.split()[1])
    raise OSError(f"/proc/self/status has no {field_name}")


def _release_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so that the resident set
    before a memory measurement holds no memory a call would merely reuse."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> tuple[float, str]:
    """Transient peak memory of one call of ``fn`` in MB (see the module docstring), and a note
    when it could not be measured (NaN then)."""
    if device.type == "cuda":
        _release_heap()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, ""
    try:
        _release_heap()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
        before = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - before) / 1024, ""
    except OSError as error:  # no procfs (not Linux) or clear_refs not writable
        return math.nan, f"peak memory not measured: {error}"


# --- FLOPs ---------------------------------------------------------------------------------------
def count_forward_gflop_parts(module: nn.Module, call: Callable[[], object]) -> tuple[float, float]:
    """GFLOP of the Conv3d layers and of the Linear layers that ``call()`` runs through
    ``module``, counted analytically with forward hooks: a convolution costs
    2·k³·(Cin/groups)·Cout per output voxel, a linear layer 2·in·out per output row (one multiply
    and one add each).

    The hooks fire only for layers called as modules, so the count runs with igrpn's inference
    fast path switched off (its fused calls bypass the modules; the arithmetic is the same)."""
    totals = {"conv": 0.0, "linear": 0.0}

    def conv_hook(layer: nn.Conv3d, _inputs, output: torch.Tensor) -> None:
        kernel = math.prod(layer.kernel_size)
        totals["conv"] += 2.0 * kernel * (layer.in_channels // layer.groups) * layer.out_channels * (
            output.numel() // layer.out_channels)

    def linear_hook(layer: nn.Linear, _inputs, output: torch.Tensor) -> None:
        totals["linear"] += 2.0 * layer.in_features * output.numel()

    handles = [m.register_forward_hook(conv_hook) for m in module.modules() if isinstance(m, nn.Conv3d)]
    handles += [m.register_forward_hook(linear_hook) for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad(), fast_cpu.fast_inference(False):
            call()
    finally:
        for handle in handles:
            handle.remove()
    return totals["conv"] / 1e9, totals["linear"] / 1e9


def count_forward_gflop(module: nn.Module, call: Callable[[], object]) -> float:
    """Total GFLOP of :func:`count_forward_gflop_parts`."""
    return sum(count_forward_gflop_parts(module, call))


def volume_forward_gflop(module: nn.Module, run: Callable[[torch.Tensor], object], batch: int, edge: int,
                         device: torch.device, count_edge: int = 64) -> float:
    """Forward GFLOP of ``run`` on a (batch, 1, edge³) volume, counted on a smaller volume when
    ``edge`` exceeds ``count_edge`` (the plain path the hooks need is slow at 128³): every
    convolution of these networks keeps a fixed stride, so its output grid, and its cost, scales
    with the input's volume, while the linear layers (Faster R-CNN's RoI head, on a fixed number
    of RoIs) do not scale."""
    small = edge
    while small > count_edge and small % 32 == 0:
        small //= 2
    volume = torch.randn(batch, 1, small, small, small, generator=torch.Generator().manual_seed(0)).to(device)
    conv, linear = count_forward_gflop_parts(module, lambda: run(volume))
    return conv * (edge / small) ** 3 + linear


# --- measurements and the round-robin runner -----------------------------------------------------
@dataclass
class Measurement:
    """A callable timed once per round. ``fn`` returns ``{row name: ms}`` when it times itself
    (several rows from one call), or ``None`` to be timed whole as the row ``what``."""

    what: str
    input: str
    fn: Callable[[], dict[str, float] | None]
    gflop: dict[str, float] = field(default_factory=dict)  # row name -> GFLOP of one call
    note: dict[str, str] = field(default_factory=dict)  # row name -> note
    memory_row: str | None = None  # the row that receives the peak memory of one call (default what)
    times: dict[str, list[float]] = field(default_factory=dict)
    peak_mem_mb: float = math.nan
    mem_note: str = ""


def run_group(measurements: list[Measurement], device: torch.device, warmup: int, repeats: int,
              log: Callable[[str], None]) -> None:
    """Warm every measurement up, then run ``repeats`` rounds calling each once in turn, then one
    more call of each for its peak memory. Fills ``times``, ``peak_mem_mb`` and ``mem_note``."""
    for m in measurements:
        for _ in range(warmup):
            m.fn()
    for round_index in range(repeats):
        for m in measurements:
            elapsed: dict[str, float] = {}

            def call(m=m, elapsed=elapsed):
                result = m.fn()
                if result:
                    elapsed.update(result)

            total = timed_ms(call, device)
            if not elapsed:
                elapsed[m.what] = total
            for row, ms in elapsed.items():
                m.times.setdefault(row, []).append(ms)
        log(f"  round {round_index + 1}/{repeats} done")
    for m in measurements:
        m.peak_mem_mb, m.mem_note = peak_memory_mb(m.fn, device)


def rows_of(measurements: list[Measurement], device_label: str) -> list[dict]:
    """CSV rows (COLUMNS) of measured ``measurements``."""
    rows = []
    for m in measurements:
        for what, times in m.times.items():
            median = statistics.median(times)
            gflop = m.gflop.get(what, math.nan)
            notes = [m.note.get(what, "")]
            is_memory_row = what == (m.memory_row or m.what)
            if is_memory_row and m.mem_note:
                notes.append(m.mem_note)
            rows.append({
                "what": what, "input": m.input, "median_ms": median, "min_ms": min(times),
                "max_ms": max(times), "gflop": gflop,
                "gflops_per_s": gflop / (median / 1e3) if median > 0 else math.nan,
                "peak_mem_mb": m.peak_mem_mb if is_memory_row else math.nan,
                "device": device_label, "repeats": len(times), "note": "; ".join(n for n in notes if n),
            })
    return rows


# --- what is measured ----------------------------------------------------------------------------
def conv_peak_measurements(device: torch.device, edges=(32, 48), channels: int = 64) -> list[Measurement]:
    """A plain ``channels``→``channels`` 3×3×3 convolution (batch 1, no bias) at each edge, in the
    default layout, channels-last, and (CPU) through oneDNN's fused op on packed weights."""
    torch.manual_seed(0)
    conv = nn.Conv3d(channels, channels, 3, padding=1, bias=False).to(device).eval()
    measurements = []
    for edge in edges:
        x = torch.randn(1, channels, edge, edge, edge, device=device)
        gflop = 2.0 * 27 * channels * channels * edge**3 / 1e9
        layouts = {
            "conv3d_ncdhw": (conv, x),
            "conv3d_channels_last": (nn.Conv3d(channels, channels, 3, padding=1, bias=False).to(device)
                                     .to(memory_format=torch.channels_last_3d).eval(),
                                     x.contiguous(memory_format=torch.channels_last_3d)),
        }
        for what, (layer, tensor) in layouts.items():
            def run(layer=layer, tensor=tensor):
                with torch.no_grad():
                    layer(tensor)
            measurements.append(Measurement(what, f"{edge}^3", run, gflop={what: gflop},
                                            note={what: f"F.conv3d {channels}->{channels} 3^3, batch 1"}))
        if device.type == "cpu":
            folded = fast_cpu._FoldedConv3d(conv, None)

            def run_fused(folded=folded, tensor=x.contiguous(memory_format=torch.channels_last_3d)):
                with torch.no_grad():
                    folded(tensor, relu=False)
            what = "conv3d_onednn_fused"
            note = ("oneDNN convolution on packed weights, channels-last (the op of igrpn's inference "
                    "fast path)" if fast_cpu._ONEDNN_FUSED_OK is not False else "oneDNN op unavailable: F.conv3d")
            measurements.append(Measurement(what, f"{edge}^3", run_fused, gflop={what: gflop}, note={what: note}))
    return measurements


def peak_row(rows: list[dict]) -> dict | None:
    """The conv row with the highest GFLOP/s (by median), renamed ``conv3d_peak``."""
    convs = [r for r in rows if r["what"].startswith("conv3d_") and not math.isnan(r["gflops_per_s"])]
    if not convs:
        return None
    best = max(convs, key=lambda r: r["gflops_per_s"])
    return dict(best, what="conv3d_peak", note=f"fastest conv row: {best['what']}", peak_mem_mb=math.nan)


def fitted_prior(seed: int = 0):
    """A GraphPrior fitted on 60 jittered copies of a plausible face (mm); enough for timing."""
    from igrpn.prior import GraphPrior

    face = np.array([[-17.0, 0.0, 0.0], [0.0, 8.0, 4.0], [17.0, 0.0, 0.0], [0.0, -22.0, 14.0],
                     [0.0, -48.0, 6.0]])
    rng = np.random.default_rng(seed)
    return GraphPrior().fit(face[None] + rng.normal(scale=1.5, size=(60, len(LANDMARKS), 3)))


def inference_measurements(size: Size, methods, device: torch.device, prior) -> list[Measurement]:
    """Per method: forward and post-processing of one volume through ``Detector.predict_grid``
    (model_ms and postprocess_ms of its ``last_timing``), plus IG-RPN's decode/NMS and prior alone."""
    from igrpn.detect import Detector, select_answers

    edge, profile = size.edge, size.profile
    generator = torch.Generator().manual_seed(0)
    volume = torch.randn(edge, edge, edge, generator=generator).numpy()
    affine = np.diag([profile.spacing_mm] * 3 + [1.0])
    measurements = []
    for method in methods:
        torch.manual_seed(0)
        detector = Detector(build_model(method, profile).to(device), profile, prior=prior)
        prefix = ROW_PREFIX[method]
        tensor = torch.as_tensor(volume, device=device)[None, None]
        gflop = volume_forward_gflop(detector.model, detector.model, 1, edge, device)

        if device.type == "cpu":
            def predict(detector=detector, prefix=prefix):
                detector.predict_grid(volume, affine)
                return {f"{prefix}_inference": detector.last_timing["model_ms"],
                        f"{prefix}_postprocess": detector.last_timing["postprocess_ms"]}
            notes = {f"{prefix}_inference": "Detector.predict_grid model_ms; peak mem: whole predict_grid",
                     f"{prefix}_postprocess": "Detector.predict_grid postprocess_ms: decode, NMS, top-k, "
                                              "candidate table, graph prior"}
            measurements.append(Measurement(f"{prefix}_inference", size.label, predict,
                                            gflop={f"{prefix}_inference": gflop}, note=notes))
        else:  # predict_grid builds its input on the CPU: time the model on the device directly
            def forward(detector=detector, tensor=tensor):
                with torch.no_grad():
                    detector.model(tensor)
            measurements.append(Measurement(f"{prefix}_inference", size.label, forward,
                                            gflop={f"{prefix}_inference": gflop},
                                            note={f"{prefix}_inference": "model forward on the device"}))
        if method == "rpn" or device.type != "cpu":
            with torch.no_grad():
                outputs = detector.model(tensor)

            def decode(detector=detector, outputs=outputs):
                detector.model.candidates(outputs, top_k=profile.top_k)
            what = f"{prefix}_decode_nms" if device.type == "cpu" else f"{prefix}_postprocess"
            measurements.append(Measurement(what, size.label, decode,
                                            note={what: "model.candidates: softmax, decode, per-class NMS, top-k"}))
        if method == "rpn" and device.type == "cpu":
            saved_prior, detector.prior = detector.prior, None
            rows = detector.predict_grid(volume, affine)
            detector.prior = saved_prior

            def choose(rows=rows):
                select_answers(rows, prior)
            measurements.append(Measurement("ig_rpn_prior", size.label, choose,
                                            note={"ig_rpn_prior": "select_answers with the fitted GraphPrior "
                                                                  "(2^5 combinations)"}))
    return measurements


def trained_measurements(checkpoint: Path, volumes: int, device: torch.device) -> tuple[list[Measurement], str]:
    """IG-RPN's ``predict_grid`` timing with a trained checkpoint on ``volumes`` test volumes of the
    data set its profile names (one volume per call, in turn). Returns ([], reason) when it cannot."""
    from igrpn.data import load_cases, read_manifest
    from igrpn.detect import Detector
    from igrpn.prior import GraphPrior

    if not checkpoint.is_file():
        return [], f"no trained checkpoint at {checkpoint} (make reproduce writes one)"
    detector = Detector.from_checkpoint(checkpoint)
    if detector.method != "rpn":
        return [], f"{checkpoint} is a {detector.method} checkpoint, not an IG-RPN one"
    detector.model.to(device)
    prior_path = checkpoint.parent.parent / "graph_prior.json"
    detector.prior = GraphPrior.load(prior_path) if prior_path.is_file() else fitted_prior()
    manifest = Path(detector.profile.manifest)
    if not manifest.is_file():
        return [], f"the checkpoint's data manifest {manifest} is missing"
    table = read_manifest(manifest)
    try:
        cases = load_cases(table[table["split"] == "test"].head(volumes), detector.profile.spacing_mm,
                           progress=False)
    except (OSError, ValueError) as error:  # volumes not generated here
        return [], f"test volumes of {manifest} not readable ({error})"
    if not cases:
        return [], f"{manifest} lists no test volumes"
    in_turn = itertools.cycle(cases)

    def predict() -> dict[str, float]:
        case = next(in_turn)
        detector.predict_grid(case.volume, case.affine)
        return {"ig_rpn_inference_trained": detector.last_timing["model_ms"],
                "ig_rpn_postprocess_trained": detector.last_timing["postprocess_ms"]}

    shape = cases[0].volume.shape
    label = f"{shape[0]}^3" if len(set(shape)) == 1 else "x".join(map(str, shape))
    source = f"{checkpoint} on {len(cases)} test volumes of {manifest}, graph prior " + (
        str(prior_path) if prior_path.is_file() else "fitted for timing")
    note = {"ig_rpn_inference_trained": f"trained: {source}",
            "ig_rpn_postprocess_trained": f"trained: {source}; decode, NMS, top-k, candidate table, graph prior"}
    return [Measurement("ig_rpn_inference_trained", label, predict, note=note)], ""


def train_measurements(size: Size, methods, device: torch.device, batch: int = 2) -> list[Measurement]:
    """Per method and training input: one optimiser step as ``igrpn.train`` makes it."""
    measurements = []
    for edge in size.train_edges():
        generator = torch.Generator().manual_seed(1)
        volumes = torch.randn(batch, 1, edge, edge, edge, generator=generator).to(device)
        margin = edge / 4  # landmarks well inside the volume
        landmarks = margin + (edge - 2 * margin) * torch.rand(batch, len(LANDMARKS), 3, generator=generator)
        landmarks = landmarks.to(device)
        for method in methods:
            torch.manual_seed(0)
            model = build_model(method, size.profile).to(device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=size.profile.lr,
                                          weight_decay=size.profile.weight_decay)
            model.eval()
            gflop = 3.0 * count_forward_gflop(model, lambda: model(volumes))
            model.train()

            mixed = size.profile.mixed_precision and distributed.mixed_precision(device)

            def step(model=model, optimizer=optimizer, volumes=volumes, landmarks=landmarks):
                with distributed.autocast(device, enabled=mixed):  # as igrpn.train does
                    losses = model.loss(model(volumes), landmarks)
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
                optimizer.step()
            what = f"{ROW_PREFIX[method]}_train_step"
            measurements.append(Measurement(
                what, f"{batch}x{edge}^3", step, gflop={what: gflop},
                note={what: "forward, loss, backward, clip, AdamW" + ("; bf16 autocast" if mixed else "; fp32")
                      + "; gflop = 3x forward"}))
    return measurements


def build_monai_retinanet(profile: Profile, num_classes: int = len(LANDMARKS)):
    """MONAI's RetinaNetDetector as MONAI's 3D detection tutorial builds it: a ResNet-50 (bottleneck
    blocks [3, 4, 6, 3]) with an FPN on layers 1-2 (``resnet_fpn_feature_extractor``), ``RetinaNet``
    and ``AnchorGeneratorWithAnchorShape``. Changes for this data: isotropic stem stride (2, 2, 2)
    (the tutorial's (2, 2, 1) is for LUNA16's thick slices), our four anchor sizes as cubic base
    shapes, five classes, no TorchScript, and score threshold 0 (at the tutorial's 0.02 an
    untrained net's scores, all near its 0.01 prior, would leave post-processing nothing to do).

    Returns the detector (eval mode) and a note on how it was built ("" when exactly as MONAI)."""
    from monai.networks.nets import resnet

    from igrpn.training.peer import assemble_retinanet, fpn_feature_extractor

    returned_layers = [1, 2]
    stem_stride = [2, 2, 2]
    sizes = [s / profile.spacing_mm for s in profile.anchor_sizes_mm]
    backbone = resnet.ResNet(
        block=resnet.ResNetBottleneck, layers=[3, 4, 6, 3], block_inplanes=resnet.get_inplanes(),
        n_input_channels=1, conv1_t_stride=stem_stride, conv1_t_size=[max(7, 2 * s + 1) for s in stem_stride],
    )
    # resnet_fpn_feature_extractor's 256 FPN channels (igrpn.peer's builder, which also stands in
    # for torchvision's layer getter where torchvision does not import).
    feature_extractor, note = fpn_feature_extractor(backbone, returned_layers, out_channels=256)
    detector = assemble_retinanet(feature_extractor, backbone, returned_layers, [[s, s, s] for s in sizes],
                                  num_classes)
    detector.set_box_selector_parameters(score_thresh=0.0, topk_candidates_per_level=1000, nms_thresh=0.22,
                                         detections_per_img=100)
    return detector.eval(), note


def monai_measurements(size: Size, device: torch.device) -> tuple[list[Measurement], str]:
    """MONAI RetinaNet rows at ``size`` (network forward; anchors + box selection + NMS), or no
    rows and the reason."""
    try:
        import monai  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure skips the optional row
        return [], f"monai not importable ({type(error).__name__}: {error}); pip install monai (optional extra)"
    try:
        torch.manual_seed(0)
        detector, build_note = build_monai_retinanet(size.profile)
        detector = detector.to(device)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(1, 1, size.edge, size.edge, size.edge, generator=generator).to(device)
        network = detector.network
        gflop = volume_forward_gflop(network, network, 1, size.edge, device)
        with torch.no_grad():
            head_outputs = network(images)

        def forward():
            with torch.no_grad():
                network(images)

        def postprocess():
            # What RetinaNetDetector.forward does after the network in eval mode (steps 4-6).
            with torch.no_grad():
                outputs = {k: list(v) for k, v in head_outputs.items()}
                detector.generate_anchors(images, outputs)
                locations = [x.shape[2:].numel() for x in outputs[detector.cls_key]]
                reshaped = {k: detector._reshape_maps(outputs[k]) for k in (detector.cls_key, detector.box_reg_key)}
                detector.postprocess_detections(reshaped, detector.anchors, [list(images.shape[2:])], locations)

        postprocess()  # fails here, not in the timed rounds, if MONAI's internals changed
    except Exception as error:  # noqa: BLE001 - report why the peer row is missing, go on
        return [], f"MONAI RetinaNet could not run: {type(error).__name__}: {error}"
    note = "MONAI RetinaNet ResNet-50-FPN (tutorial build), network forward" + (f"; {build_note}" if build_note else "")
    return [
        Measurement("monai_retinanet_inference", size.label, forward, gflop={"monai_retinanet_inference": gflop},
                    note={"monai_retinanet_inference": note}),
        Measurement("monai_retinanet_postprocess", size.label, postprocess,
                    note={"monai_retinanet_postprocess": "anchors, box decode, score top-k per level, NMS"}),
    ], ""


# --- report ----------------------------------------------------------------------------------------
def _median(rows: list[dict], what: str, input_label: str) -> float:
    for row in rows:
        if row["what"] == what and row["input"] == input_label:
            return row["median_ms"]
    return math.nan


def _gflops(rows: list[dict], what: str, input_label: str) -> float:
    for row in rows:
        if row["what"] == what and row["input"] == input_label:
            return row["gflops_per_s"]
    return math.nan


def target_sentences(rows: list[dict], sizes: list[Size]) -> list[str]:
    """One sentence per target of issue 8, computed from the rows: met, not met, or not measured."""
    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    sentences = []
    peak = next((r for r in rows if r["what"] == "conv3d_peak"), None)
    for size in sizes:
        label = size.label
        post = _median(rows, "ig_rpn_postprocess", label)
        trained = _median(rows, "ig_rpn_postprocess_trained", label)
        if not math.isnan(trained):
            # A trained detector's scores are what users post-process; untrained ones are the worst case.
            sentences.append(f"At {label}, IG-RPN's post-processing (decode, NMS, top-k, graph prior) takes "
                             f"{trained:.1f} ms per volume with the trained checkpoint "
                             f"({post:.1f} ms with untrained weights, whose near-uniform scores leave the "
                             f"top-k nothing to prune): target < {POSTPROCESS_TARGET_MS:.0f} ms "
                             f"{verdict(trained < POSTPROCESS_TARGET_MS)} (trained).")
        elif not math.isnan(post):
            sentences.append(f"At {label}, IG-RPN's post-processing (decode, NMS, top-k, graph prior) takes "
                             f"{post:.1f} ms per volume (untrained weights): target < "
                             f"{POSTPROCESS_TARGET_MS:.0f} ms {verdict(post < POSTPROCESS_TARGET_MS)}.")
        rate = _gflops(rows, "ig_rpn_inference", label)
        if peak is not None and not math.isnan(rate):
            share = rate / peak["gflops_per_s"]
            sentences.append(f"Its forward runs at {rate:.0f} GFLOP/s, {100 * share:.0f} % of the measured "
                             f"conv3d peak ({peak['gflops_per_s']:.0f} GFLOP/s, {peak['note'].split(': ')[-1]} at "
                             f"{peak['input']}): target ≥ 50 % {verdict(share >= 0.5)}.")
        rpn = _median(rows, "ig_rpn_inference", label) + _median(rows, "ig_rpn_postprocess", label)
        heat = _median(rows, "heatmap_inference", label) + _median(rows, "heatmap_postprocess", label)
        if not math.isnan(rpn) and not math.isnan(heat):
            sentences.append(f"IG-RPN inference (forward + post-processing) takes {rpn:.0f} ms against the "
                             f"heatmap baseline's {heat:.0f} ms (ratio {rpn / heat:.2f}): target ≤ 0.5 "
                             f"{verdict(rpn <= 0.5 * heat)}.")
        monai = _median(rows, "monai_retinanet_inference", label) + _median(rows, "monai_retinanet_postprocess", label)
        if not math.isnan(rpn) and not math.isnan(monai):
            sentences.append(f"MONAI's RetinaNet takes {monai:.0f} ms on the same input: IG-RPN faster "
                             f"{verdict(rpn < monai)} ({monai / rpn:.1f}× faster).")
    return sentences


def _fmt(value, digits: int = 1) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def write_outputs(rows: list[dict], sizes: list[Size], out_dir: Path, command: str,
                  skipped: list[str]) -> tuple[Path, Path]:
    """``benchmarks.csv`` (COLUMNS) and ``benchmarks.md`` (heading, targets paragraph, table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "benchmarks.csv", out_dir / "benchmarks.md"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) and not math.isnan(v) else
                                 ("" if isinstance(v, float) else v)) for k, v in row.items()})
    devices = sorted({r["device"] for r in rows})
    repeats = sorted({r["repeats"] for r in rows})
    lines = [
        "## Benchmarks",
        "",
        " ".join(target_sentences(rows, sizes)) or "_No target could be evaluated from these rows._",
        "",
        f"Measured with `{command}` on {datetime.date.today().isoformat()}, device {', '.join(devices)}, "
        f"torch {torch.__version__}; every row in one run, round-robin within each group, median (min–max) "
        f"over {'/'.join(map(str, repeats))} rounds after a warm-up; models untrained (random weights, so NMS "
        "sees near-uniform scores) except the `*_trained` rows (a trained checkpoint on real test volumes, "
        "one volume per round). GFLOP: convolutions and linear layers counted analytically (training: "
        "3× forward). Peak memory: growth of the resident set's high-water mark during one call, over the "
        "resident set before it (CPU; weights excluded).",
        "",
        "| what | input | median ms | min ms | max ms | GFLOP | GFLOP/s | peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['what']} | {row['input']} | {_fmt(row['median_ms'])} | {_fmt(row['min_ms'])} | "
                     f"{_fmt(row['max_ms'])} | {_fmt(row['gflop'], 2)} | {_fmt(row['gflops_per_s'], 0)} | "
                     f"{_fmt(row['peak_mem_mb'], 0)} |")
    peer_notes = sorted({r["note"] for r in rows if r["what"] == "monai_retinanet_inference" and r["note"]})
    if peer_notes:
        lines += ["", "MONAI peer: " + "; ".join(peer_notes) + " (benchmarks/bench.py: build_monai_retinanet)."]
    if skipped:
        lines += ["", "Not measured: " + "; ".join(skipped) + "."]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


# --- command line -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Inference, post-processing and training speed, FLOPs and peak memory of igrpn's methods, "
                    "against a plain conv3d peak and MONAI's RetinaNet; writes benchmarks.csv and benchmarks.md.")
    parser.add_argument("--out-dir", type=Path, default=Path("report"), help="output folder (default: report/)")
    parser.add_argument("--quick", action="store_true",
                        help="1 warm-up, 2 rounds, conv peak at 24^3 only (a smoke test, not a measurement)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", default="cpu,paper",
                        help="comma-separated profile names, each optionally :EDGE (default cpu,paper = 64^3 "
                             "width 16 and 128^3 width 32; smoke = 32^3 width 4)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds per group (default: inference 7 up to 64^3 and 3 above, training 5; --quick 2)")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    parser.add_argument("--no-monai", action="store_true", help="skip the MONAI RetinaNet rows")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--trained-checkpoint", type=Path, default=Path("report/runs/rpn_ib/checkpoint.pt"),
                        help="IG-RPN checkpoint for the ig_rpn_*_trained rows (default: the cpu run's; "
                             "skipped when missing)")
    parser.add_argument("--trained-volumes", type=int, default=8,
                        help="test volumes for the trained rows (each timed twice; default 8)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; expected a subset of {list(METHODS)}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device")
        if args.repeats is not None and args.repeats < 1:
            raise ValueError("--repeats must be >= 1")
    except ValueError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    label = device_name(device)
    command = " ".join(["python -m benchmarks.bench", *(argv if argv is not None else sys.argv[1:])])
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    def schedule(edge: int) -> tuple[int, int]:
        if args.quick:
            return 1, args.repeats or 2
        return (2, args.repeats or 7) if edge <= 64 else (1, args.repeats or 3)

    rows: list[dict] = []
    skipped: list[str] = []
    log(f"device {label}; sizes {', '.join(f'{s.profile.name} {s.label}' for s in sizes)}")
    conv = conv_peak_measurements(device, edges=(24,) if args.quick else (32, 48))
    run_group(conv, device, *schedule(32), log=log)
    conv_rows = rows_of(conv, label)
    rows += conv_rows + [r for r in [peak_row(conv_rows)] if r]
    log("conv3d peak measured")

    prior = fitted_prior()
    for size in sizes:
        group = inference_measurements(size, methods, device, prior)
        if not args.no_monai:
            peer, reason = monai_measurements(size, device)
            if reason:
                print(f"bench: skipping MONAI RetinaNet at {size.label}: {reason}", flush=True)
                skipped.append(f"MONAI RetinaNet at {size.label} ({reason})")
            group += peer
        log(f"inference at {size.profile.name} {size.label} (width {size.profile.width}) ...")
        run_group(group, device, *schedule(size.edge), log=log)
        rows += rows_of(group, label)
        del group

    if "rpn" in methods:
        group, reason = trained_measurements(args.trained_checkpoint, args.trained_volumes, device)
        if reason:
            print(f"bench: skipping the trained IG-RPN rows: {reason}", flush=True)
            skipped.append(f"trained IG-RPN rows ({reason})")
        else:
            log(f"IG-RPN with {args.trained_checkpoint} on {args.trained_volumes} test volumes ...")
            run_group(group, device, 1, 2 if args.quick else 2 * args.trained_volumes, log=log)
            rows += rows_of(group, label)
        del group

    if not args.no_train:
        for size in sizes:
            if size.profile.name == "paper" and device.type == "cpu":
                reason = ("training steps at the paper profile on a CPU (tens of seconds and GB per step; "
                          "use --device cuda)")
                print(f"bench: skipping {reason}", flush=True)
                skipped.append(reason)
                continue
            group = train_measurements(size, methods, device)
            log(f"training steps at {size.profile.name} {', '.join(f'2x{e}^3' for e in size.train_edges())} ...")
            run_group(group, device, *((1, args.repeats or 2) if args.quick else (1, args.repeats or 5)), log=log)
            rows += rows_of(group, label)
            del group

    csv_path, md_path = write_outputs(rows, sizes, args.out_dir, command, skipped)
    print()
    print(md_path.read_text(encoding="utf-8"))
    log(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

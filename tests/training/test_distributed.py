"""Data-parallel training: the process-group helpers in one process, two Gloo processes under
torchrun (collectives, and a smoke training that is cut, resumed and checked against an
uninterrupted one)."""

import dataclasses
import json
import math
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
from torch import nn

from igrpn.checkpoint import CheckpointError
from igrpn.training import distributed, loop as train
from igrpn.config import Profile, get_profile

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def torchrun(*args, timeout=120):
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node=2 ARGS`` (a free port is
    picked by the standalone rendezvous); fail the test with its output on a non-zero exit."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_without_torchrun_the_context_is_a_group_of_one(no_torchrun_env):
    context = distributed.init_distributed("cpu")
    assert (context.rank, context.world_size, context.backend) == (0, 1, None)
    assert context.device == torch.device("cpu") and context.is_main and not context.distributed
    assert not context.created_group and not distributed.is_distributed() and distributed.is_main()
    distributed.barrier()  # returns at once
    assert distributed.all_reduce_mean(2.5) == 2.5
    assert distributed.all_reduce_mean({"loss": 1.25, "num_pos": 3.0}) == {"loss": 1.25, "num_pos": 3.0}
    values = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(distributed.all_reduce_mean(values), values)
    assert distributed.all_ranks_equal(7)
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2))
    placed = distributed.place_model(model, context)
    assert isinstance(placed[1], nn.BatchNorm3d) and not isinstance(placed[1], nn.SyncBatchNorm)
    assert distributed.wrap_model(placed, context) is placed and distributed.unwrap(placed) is placed
    expected = torch.bfloat16 if distributed.mixed_precision(context.device) else torch.float32
    with distributed.autocast(context.device):  # bf16 only on a CPU with native bf16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == expected
    with distributed.autocast(context.device, enabled=False):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_sync_batchnorm_weights_load_into_a_plain_model():
    # What place_model does on several GPUs; the conversion itself needs no GPU.
    from igrpn.models import build_model

    synced = nn.SyncBatchNorm.convert_sync_batchnorm(build_model("rpn", "smoke"))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    plain = build_model("rpn", "smoke")
    plain.load_state_dict(synced.state_dict(), strict=True)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())


def test_malformed_torchrun_variables_are_refused(no_torchrun_env):
    no_torchrun_env.setenv("WORLD_SIZE", "2")
    no_torchrun_env.setenv("RANK", "0")
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT not set"):
        distributed.init_distributed("cpu")
    no_torchrun_env.setenv("RANK", "2")
    with pytest.raises(ValueError, match="inconsistent torchrun variables: RANK=2, WORLD_SIZE=2"):
        distributed.init_distributed("cpu")
    no_torchrun_env.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        distributed.init_distributed("cpu")


def test_device_names_are_resolved_or_refused():
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="device must be one of"):
        distributed.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            distributed.resolve_device("cuda")


def test_cpu_bf16_needs_amx_or_the_environment(monkeypatch):
    # AVX512-BF16 without AMX computed 3D convolutions slower in bf16 than in fp32: fp32 there.
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.delenv("IGRPN_CPU_BF16", raising=False)
    monkeypatch.setattr(distributed, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert not distributed.cpu_computes_bf16() and not distributed.mixed_precision(torch.device("cpu"))
    monkeypatch.setattr(distributed, "_cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16", "amx_tile"}))
    assert distributed.cpu_computes_bf16()
    monkeypatch.setenv("IGRPN_CPU_BF16", "0")
    assert not distributed.cpu_computes_bf16()
    monkeypatch.setattr(distributed, "_cpu_flags", lambda: frozenset())
    monkeypatch.setenv("IGRPN_CPU_BF16", "1")
    assert distributed.cpu_computes_bf16()


def test_shard_sampler_gives_each_rank_a_disjoint_seeded_shard():
    dataset = list(range(7))
    contexts = [distributed.DistributedContext(rank=r, world_size=2) for r in range(2)]
    shards = [list(distributed.shard_sampler(dataset, c, seed=3)) for c in contexts]
    assert [len(s) for s in shards] == [3, 3]  # 7 // 2: the odd one out is dropped
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) <= set(dataset)
    again = distributed.shard_sampler(dataset, contexts[0], seed=3)
    assert list(again) == shards[0]  # seeded
    epochs = []
    for epoch in range(4):
        again.set_epoch(epoch)
        epochs.append(list(again))
    assert len({tuple(e) for e in epochs}) > 1  # a new permutation each epoch
    with pytest.raises(ValueError, match="2 volumes, fewer than the 3 processes"):
        distributed.shard_sampler([0, 1], distributed.DistributedContext(rank=0, world_size=3), seed=0)


def test_collectives_over_two_gloo_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import json, torch
        from igrpn.training import distributed
        context = distributed.init_distributed("cpu")
        rank = context.rank
        result = {{
            "backend": context.backend, "world_size": context.world_size, "is_main": distributed.is_main(),
            "scalar": distributed.all_reduce_mean(float(rank + 1)),
            "tensor": distributed.all_reduce_mean(torch.tensor([rank, 10.0 * rank])).tolist(),
            "dict": distributed.all_reduce_mean({{"loss": 2.0 * rank, "num_pos": 4.0}}),
            "ranks_equal": distributed.all_ranks_equal(rank),
            "same_equal": distributed.all_ranks_equal(5),
        }}
        distributed.barrier()
        with open(r"{tmp_path}/rank" + str(rank) + ".json", "w") as handle:
            json.dump(result, handle)
        distributed.cleanup()
    """))
    torchrun(script)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        assert result["backend"] == "gloo" and result["world_size"] == 2 and result["is_main"] == (rank == 0)
        assert result["scalar"] == 1.5
        assert result["tensor"] == [0.5, 5.0]
        assert result["dict"] == {"loss": 1.0, "num_pos": 4.0}
        assert result["ranks_equal"] is False and result["same_equal"] is True


def test_two_process_training_shards_data_resumes_and_writes_one_loadable_checkpoint(smoke_manifest, tmp_path):
    from igrpn.data import read_manifest
    from igrpn.detect import Detector
    from igrpn.models import build_model

    epochs = 6
    profile = get_profile("smoke")
    common = ["-m", "igrpn.train", "--profile", "smoke", "--epochs", epochs, "--method", "rpn", "--seed", 0,
              "--device", "cpu", "--manifest", smoke_manifest]
    torchrun(*common, "--out", tmp_path / "whole")
    # "Killed" after 3 epochs, then started again without the cap: every rank loads the checkpoint.
    torchrun(*common, "--out", tmp_path / "cut", "--max-epochs", 3)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    torchrun(*common, "--out", tmp_path / "cut")

    # Each of the 2 ranks trains on its own half of the training volumes (the rest held out).
    table = read_manifest(smoke_manifest)
    train_ids, _ = train.split_train_val(list(table.loc[table["split"] == "train", "case_id"]),
                                         profile.val_fraction, seed=0)
    steps_per_epoch = math.ceil((len(train_ids) // 2) / profile.batch_size)

    for run in ("whole", "cut"):
        folder = tmp_path / run
        assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "log.csv"]  # rank 0 only, no temp files
        log = pd.read_csv(folder / "log.csv")
        steps = log.loc[log["kind"] == "step", "step"]
        assert steps.is_unique and steps.max() == epochs * steps_per_epoch
        assert (log["kind"] == "epoch").sum() == epochs

    log = pd.read_csv(tmp_path / "whole" / "log.csv")
    epochs_log = log[log["kind"] == "epoch"]
    # Two steps of 2 × 2 volumes per epoch make single epochs noisy: compare the first epoch with
    # the mean of the second half. Rank 0 validates every epoch; a smoke model's distances are
    # noise (they rose or fell with the CPU's number format), so only their presence is checked.
    epoch_loss = epochs_log["loss"].to_numpy()
    assert epoch_loss[epochs // 2:].mean() < epoch_loss[0]
    assert epochs_log["val_d_mean_mm"].notna().all() and (epochs_log["val_d_mean_mm"] > 0).all()
    # Linear scaling: the first step (warm-up of one step) runs at lr × world_size.
    assert log.loc[log["kind"] == "step", "lr"].iloc[0] == pytest.approx(2 * profile.lr)

    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", map_location="cpu", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert whole["world_size"] == 2 and whole["config"]["world_size"] == 2
    assert whole["global_step"] == resumed["global_step"] == epochs * steps_per_epoch
    for name, tensor in whole["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, msg=f"{name} differs after resume")

    # The unwrapped weights load into a single-process model and detector.
    model = build_model("rpn", Profile.from_dict(whole["config"]["profile"]))
    model.load_state_dict(whole["model"], strict=True)
    detector = Detector.from_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    assert detector.method == "rpn"

    # Resuming the 2-process run in one process is refused: the schedule would differ.
    with pytest.raises(CheckpointError, match="differs in world_size"):
        train.train(dataclasses.replace(profile, epochs=epochs), method="rpn", seed=0, out_dir=tmp_path / "whole",
                    manifest=smoke_manifest, progress=False)

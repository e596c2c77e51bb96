"""Runtime plumbing (util/distributed.py, precision.py, metrics.py, cli.py) and util/datasets.py determinism."""
import argparse
import os

import pytest
import torch

from util import datasets
from util.cli import add_runtime_args
from util.crop import RandomResizedCrop
from util.errors import UsageError
from util.distributed import _read_launcher_env, all_reduce_mean, get_world_size, init_distributed_mode, is_main_process
from util.metrics import MetricLogger
from util.precision import NativeScalerWithGradNormCount, autocast


def runtime_parser():
    parser = argparse.ArgumentParser()
    add_runtime_args(parser)
    return parser


@pytest.mark.parametrize("flag", ["--local_rank=1", "--local-rank=1"])
def test_old_launcher_local_rank_flag_is_accepted(flag):
    args = runtime_parser().parse_args([flag])
    assert args.local_rank == 1 and args.dist_url == "env://" and args.pin_mem
    assert runtime_parser().parse_args(["--no-pin_mem"]).pin_mem is False


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (3, 4, 1)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "node1"}, (5, 8, 1)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}, (0, 1, 0)),
])
def test_launcher_environment_gives_rank_and_world_size(monkeypatch, env, expected):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = runtime_parser().parse_args([])
    assert _read_launcher_env(args) == expected


def test_dist_on_itp_reads_openmpi_or_says_what_is_missing(monkeypatch):
    for key in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "MASTER_ADDR",
                "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    args = runtime_parser().parse_args(["--dist_on_itp"])
    with pytest.raises(UsageError, match="OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK "
                                         "is not set: start the script with mpirun"):
        _read_launcher_env(args)
    for key, value in {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16",
                       "OMPI_COMM_WORLD_LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UsageError, match="needs MASTER_ADDR and MASTER_PORT"):
        _read_launcher_env(args)
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert _read_launcher_env(args) == (5, 16, 1)
    assert _read_launcher_env(runtime_parser().parse_args([])) == (0, 1, 0)  # OpenMPI only with the flag


def test_single_process_init_needs_no_launcher(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    args = runtime_parser().parse_args(["--device", "cpu"])
    init_distributed_mode(args)
    assert (args.rank, args.world_size, args.distributed, args.device) == (0, 1, False, torch.device("cpu"))
    assert get_world_size() == 1 and is_main_process() and all_reduce_mean(2.5) == 2.5


def test_autocast_and_scaler_follow_amp_choice():
    layer = torch.nn.Linear(4, 4)
    with autocast("cpu", "bf16"):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast("cpu", "none"):
        assert layer(torch.randn(2, 4)).dtype == torch.float32

    scaler = NativeScalerWithGradNormCount("fp16", "cpu")
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    norm = scaler(layer(torch.randn(3, 4)).pow(2).sum(), optimizer, clip_grad=1e-3, parameters=layer.parameters())
    total = torch.nn.utils.get_total_norm([p.grad for p in layer.parameters()])
    assert norm > 1e-3 and total == pytest.approx(1e-3, rel=1e-3)  # returns the norm before clipping
    assert scaler.state_dict()["scale"] > 1  # fp16 uses a real GradScaler
    assert NativeScalerWithGradNormCount("bf16", "cpu").state_dict() == {}


def test_metric_logger_prints_progress_and_eta(capsys):
    logger = MetricLogger()
    for step in logger.log_every(range(3), 2, "Epoch: [0]"):
        logger.update(loss=float(step))
    out = capsys.readouterr().out
    assert "Epoch: [0]  [0/3]  eta: 0:00:00  loss: 0.0000 (0.0000)" in out and "[2/3]" in out
    assert logger.loss.global_avg == 1.0


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path, image_folder):
    transform = datasets.pretrain_transform(32)
    dataset = datasets.SeededImageFolder(os.path.join(image_folder, "train"), transform, seed=3)
    first = dataset[5][0]
    torch.rand(10)  # whatever else happened to the global RNG
    assert torch.equal(dataset[5][0], first)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    assert torch.equal(next(iter(loader))[0][1], dataset[1][0])  # same crops in worker processes
    dataset.set_epoch(1)
    assert not torch.equal(dataset[5][0], first)


def test_tf_style_random_resized_crop_stays_inside_the_image():
    torch.manual_seed(0)
    image = torch.zeros(3, 40, 60)
    for _ in range(200):
        top, left, height, width = RandomResizedCrop.get_params(image, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top <= 40 - height and 0 <= left <= 60 - width and height > 0 and width > 0

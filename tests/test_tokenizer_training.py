"""Tokenizer training: a tiny run writes a tokenizer that loads strictly into VQModel and MAGE, resumes from its
checkpoint, restarts dead codes and switches the discriminator on at --disc_start."""
import json
import os

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

import main_tokenizer
from engine_tokenizer import CodebookMonitor
from models_mage import MaskedGenerativeEncoderViT
from taming.models.vqgan import VQModel, load_vqgan_config
from taming.modules.losses import PerceptualLoss, VQGANLoss
from train_support import run_torchrun
from util.checkpoint import CheckpointError, load_checkpoint
from util.errors import UsageError
from util.synthetic_data import generate, load_split_arrays

TINY_CONFIG = {"model": {"params": {"embed_dim": 16, "n_embed": 64, "ddconfig": {
    "double_z": False, "z_channels": 16, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}}
STEPS_PER_EPOCH = 4  # 8 classes x 4 images / batch 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]


def run_training(data, output_dir, config, *extra):
    args = main_tokenizer.get_args_parser().parse_args([
        "--data_path", str(data), "--output_dir", str(output_dir), "--vqgan_config", str(config),
        "--batch_size", "8", "--epochs", "2", "--num_workers", "0", "--device", "cpu", "--print_freq", "2",
        "--restart_every", "2", "--dead_code_steps", "2", "--disc_start", str(STEPS_PER_EPOCH),
        "--disc_ndf", "16", "--disc_layers", "2", *extra])
    return main_tokenizer.main(args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer")
    data = root / "data"
    generate(data, num_train=4, num_val=2, size=16, seed=0)
    config = root / "tiny.yaml"
    OmegaConf.save(OmegaConf.create(TINY_CONFIG), config)
    torch.manual_seed(0)
    metrics = run_training(data, root / "out", config)
    return {"data": data, "config": config, "out": root / "out", "metrics": metrics}


def test_outputs_and_metrics(trained):
    out = trained["out"]
    for name in ("tokenizer.ckpt", "tokenizer.yaml", "tokenizer_metrics.json", "reconstructions.png",
                 "checkpoint-last.pth", "log.txt"):
        assert (out / name).is_file(), name
    assert trained["metrics"]["steps"] == 2 * STEPS_PER_EPOCH
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))


def test_reported_metrics_are_those_of_the_written_tokenizer_on_the_val_split(trained):
    """PSNR (mean over images) and codebook usage recomputed here from tokenizer.ckpt and the val images."""
    out, metrics = trained["out"], trained["metrics"]
    vqmodel = VQModel(**load_vqgan_config(out / "tokenizer.yaml"), ckpt_path=str(out / "tokenizer.ckpt")).eval()
    pixels, _ = load_split_arrays(trained["data"], "val")
    images = pixels.view(-1, 16, 16, 3).permute(0, 3, 1, 2)  # the val images are already 16 pixels
    psnrs, codes = [], []
    with torch.no_grad():
        for batch in images.split(8):  # the run's --batch_size
            quant, _, (_, _, indices) = vqmodel.encode(batch)
            mse = (vqmodel.decode(quant).clamp(0, 1) - batch).pow(2).mean(dim=(1, 2, 3))
            psnrs.append(-10 * torch.log10(mse))
            codes.append(indices)
    assert metrics["psnr"] == pytest.approx(torch.cat(psnrs).mean().item(), abs=1e-3)
    assert metrics["codebook_usage"] == pytest.approx(100 * len(torch.cat(codes).unique()) / 64)
    assert json.loads((out / "tokenizer_metrics.json").read_text())["psnr"] == pytest.approx(metrics["psnr"])


def test_tokenizer_file_loads_strictly_into_vqmodel(trained):
    out = trained["out"]
    checkpoint = load_checkpoint(out / "tokenizer.ckpt")
    assert set(checkpoint["state_dict"]) == set(VQModel(**load_vqgan_config(trained["config"])).state_dict())
    settings = load_vqgan_config(out / "tokenizer.yaml")
    assert settings == load_vqgan_config(trained["config"])
    vqmodel = VQModel(**settings, ckpt_path=str(out / "tokenizer.ckpt"))
    for key, value in vqmodel.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][key]), key
    assert checkpoint["psnr"] == pytest.approx(trained["metrics"]["psnr"])


def test_tokenizer_file_loads_into_mage(trained):
    out = trained["out"]
    mage = MaskedGenerativeEncoderViT(img_size=16, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                                      decoder_depth=1, decoder_num_heads=2, vqgan_config=str(out / "tokenizer.yaml"),
                                      vqgan_ckpt_path=str(out / "tokenizer.ckpt"))
    assert mage.grid_size == 8 and mage.seq_len == 64 and mage.codebook_size == 64
    vqmodel = VQModel(**load_vqgan_config(out / "tokenizer.yaml"), ckpt_path=str(out / "tokenizer.ckpt")).eval()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = vqmodel.encode(images)[2][2].view(2, -1)
    assert torch.equal(mage.tokenize(images), expected)
    loss, _, _ = mage(images)
    assert torch.isfinite(loss)


def test_discriminator_switches_on_at_disc_start(trained):
    first, second = read_log(trained["out"])
    assert "train_d_loss" not in first and "train_g_loss" not in first
    assert second["train_d_loss"] > 0 and second["train_d_weight"] > 0 and "train_g_loss" in second
    checkpoint = load_checkpoint(trained["out"] / "checkpoint-last.pth")
    assert "discriminator" in checkpoint and checkpoint["optimizer_disc"]["state"]


def test_generator_loss_adds_the_adaptive_gan_term():
    torch.manual_seed(0)
    loss_fn = VQGANLoss(disc_start=5, disc_ndf=8, disc_layers=2)
    last_layer = nn.Parameter(torch.randn(3, 4, 1, 1))
    x = torch.rand(2, 3, 16, 16)
    x_rec = torch.nn.functional.conv2d(torch.rand(2, 4, 16, 16), last_layer)
    q_loss = torch.tensor(0.1)
    before, logs_before = loss_fn.generator_loss(x, x_rec, q_loss, step=4, last_layer=last_layer)
    after, logs_after = loss_fn.generator_loss(x, x_rec, q_loss, step=5, last_layer=last_layer)
    assert "g_loss" not in logs_before and before.item() == pytest.approx((x - x_rec).abs().mean().item() + 0.1)
    assert logs_after["d_weight"] > 0
    assert after.item() == pytest.approx(before.item() + (logs_after["d_weight"] * logs_after["g_loss"]).item(),
                                         rel=1e-5)
    d_loss, _ = loss_fn.discriminator_loss(x, x_rec)
    d_loss.backward()
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())


def test_resume_continues_from_the_saved_epoch(trained, tmp_path):
    out = tmp_path / "out"
    run_training(trained["data"], out, trained["config"], "--epochs", "1")
    assert [entry["epoch"] for entry in read_log(out)] == [0]
    first = load_checkpoint(out / "checkpoint-last.pth")
    assert first["step"] == STEPS_PER_EPOCH
    metrics = run_training(trained["data"], out, trained["config"], "--epochs", "2", "--auto_resume")
    log = read_log(out)
    assert [entry["epoch"] for entry in log] == [0, 1]  # epoch 0 was not trained again
    second = load_checkpoint(out / "checkpoint-last.pth")
    assert second["epoch"] == 1 and second["step"] == 2 * STEPS_PER_EPOCH
    adam_steps = {int(state["step"]) for state in second["optimizer"]["state"].values()}
    assert adam_steps == {2 * STEPS_PER_EPOCH}  # the optimizer state carried over
    assert metrics["steps"] == 2 * STEPS_PER_EPOCH


def test_dead_codes_are_restarted_from_encoder_outputs():
    torch.manual_seed(0)
    codebook = nn.Embedding(16, 4)
    optimizer = torch.optim.Adam(codebook.parameters())
    codebook.weight.sum().backward()
    optimizer.step()  # creates Adam moments
    before = codebook.weight.detach().clone()
    monitor = CodebookMonitor(codebook, dead_after=10, buffer_size=64)
    z = torch.randn(2, 4, 3, 3) + 5.0  # far from every initial code
    used = torch.tensor([0, 1] * 9)
    for step in range(10):
        monitor.observe(used, z)
    usage, _ = monitor.flush(step=9)
    assert usage == pytest.approx(2 / 16)
    assert monitor.restart_dead(step=9, optimizer=optimizer) == 14
    after = codebook.weight.detach()
    assert torch.equal(after[:2], before[:2])
    encoder_outputs = z.permute(0, 2, 3, 1).reshape(-1, 4)
    distances = torch.cdist(after[2:], encoder_outputs).min(dim=1).values
    assert (distances < 0.1).all()  # each restarted code sits on a recent encoder output
    moments = optimizer.state[codebook.weight]
    assert moments["exp_avg"][2:].abs().sum() == 0 and moments["exp_avg"][:2].abs().sum() > 0
    assert monitor.restart_dead(step=10, optimizer=optimizer) == 0  # just restarted: not dead again yet


def test_training_run_restarts_codes(trained):
    assert read_log(trained["out"])[0]["train_restarted"] > 0


def test_perceptual_loss_from_user_weights(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers
    features = make_layers(cfgs["D"])
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    loss = PerceptualLoss(str(path))
    x = torch.rand(2, 3, 32, 32)
    y = torch.rand(2, 3, 32, 32, requires_grad=True)
    assert torch.allclose(loss(x, x), torch.zeros(2), atol=1e-6)
    distance = loss(x, y)
    assert distance.shape == (2,) and (distance > 0).all()
    distance.sum().backward()
    assert y.grad.abs().sum() > 0
    torch.save({"something": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="vgg16"):
        PerceptualLoss(str(tmp_path / "bad.pth"))


@pytest.mark.slow
def test_torchrun_two_processes_gloo(trained, tmp_path):
    """DDP on CPU: two processes train, share restarts and write one tokenizer."""
    result = run_torchrun("main_tokenizer.py", [
        "--data_path", trained["data"], "--output_dir", tmp_path, "--vqgan_config", trained["config"],
        "--batch_size", 4, "--epochs", 1, "--num_workers", 0, "--device", "cpu", "--restart_every", 2,
        "--dead_code_steps", 2, "--disc_start", 2, "--disc_ndf", 16, "--disc_layers", 2], cwd=tmp_path)
    assert "distributed init (rank 1/2, gloo)" in result.stdout + result.stderr
    checkpoint = load_checkpoint(tmp_path / "tokenizer.ckpt")
    assert checkpoint["steps"] == STEPS_PER_EPOCH  # 32 images / (4 per process x 2 processes)
    VQModel(**load_vqgan_config(tmp_path / "tokenizer.yaml"), ckpt_path=str(tmp_path / "tokenizer.ckpt"))


@pytest.mark.parametrize("flags, message", [
    (("--batch_size", "0"), "--batch_size must be at least 1, got 0"),
    (("--epochs", "0"), "--epochs must be at least 1, got 0"),  # would write an untrained tokenizer.ckpt
    (("--batch_size", "64"), "is larger than the 32 training images"),
])
def test_impossible_flags_are_refused_before_anything_is_written(trained, tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        run_training(trained["data"], tmp_path / "out", trained["config"], *flags)
    assert not os.path.exists(tmp_path / "out")

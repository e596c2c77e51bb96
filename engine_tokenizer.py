"""One epoch of VQGAN tokenizer training, validation (PSNR, codebook usage) and the tokenizer export."""
import os
from collections import deque

import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import OmegaConf
from torchvision.utils import make_grid, save_image

from util.checkpoint import save_checkpoint_atomic, save_json_atomic, write_atomic
from util.distributed import all_reduce_mean, get_rank, is_dist_avail_and_initialized, unwrap
from util.errors import check_finite
from util.lr_sched import adjust_learning_rate
from util.metrics import MetricLogger
from util.precision import autocast
from util.seeding import derive_seed

TOKENIZER_FILE = "tokenizer.ckpt"
TOKENIZER_CONFIG_FILE = "tokenizer.yaml"
METRICS_FILE = "tokenizer_metrics.json"
RECONSTRUCTIONS_FILE = "reconstructions.png"


class TokenizerForward(nn.Module):
    """The VQModel's forward that also returns the code indices and the encoder outputs z (for dead-code
    restarts), as one module call so that DDP sees every parameter used in the step."""

    def __init__(self, vqmodel):
        super().__init__()
        self.vqmodel = vqmodel

    def forward(self, x):
        # x (B, 3, H, W) in [0, 1] -> x_rec (B, 3, H, W), q_loss, indices (B*h*w,), z (B, C, h, w)
        z = self.vqmodel.encoder(x)
        quant, q_loss, (_, _, indices) = self.vqmodel.quantize(z)
        return self.vqmodel.decoder(quant), q_loss, indices, z


def usage_stats(counts):
    """(fraction of codes used, perplexity) of a code histogram."""
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    probs = counts.double() / total
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return (counts > 0).double().mean().item(), entropy.exp().item()


class CodebookMonitor:
    """Counts code usage and re-initialises dead codes from recent encoder outputs.

    A code is dead when no process has selected it for `dead_after` steps (codes never selected count as dead
    from the start, so the first restart initialises the codebook from data). Dead codes get random
    vectors from a buffer of the last `buffer_size` encoder outputs, chosen on rank 0 and broadcast; their
    Adam moments are zeroed so that stale momentum does not pull them away again.
    """

    def __init__(self, codebook, dead_after=100, buffer_size=8192, seed=0):
        self.codebook = codebook
        device = codebook.weight.device
        self.counts = torch.zeros(codebook.num_embeddings, dtype=torch.long, device=device)
        self.last_used = torch.full((codebook.num_embeddings,), -dead_after, dtype=torch.long, device=device)
        self.dead_after = dead_after
        self.buffer = deque()
        self.buffer_size = buffer_size
        self.seed = seed

    @torch.no_grad()
    def observe(self, indices, z):
        self.counts += torch.bincount(indices, minlength=self.counts.numel())
        vectors = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        self.buffer.append(vectors)
        while sum(len(v) for v in self.buffer) - len(self.buffer[0]) >= self.buffer_size:
            self.buffer.popleft()

    @torch.no_grad()
    def flush(self, step):
        """Sum the window's counts over processes, mark used codes, reset. Returns (usage, perplexity)."""
        counts = self.counts.clone()
        if is_dist_avail_and_initialized():
            dist.all_reduce(counts)
        self.last_used[counts > 0] = step
        self.counts.zero_()
        return usage_stats(counts)

    @torch.no_grad()
    def restart_dead(self, step, optimizer=None):
        """Re-initialise codes unused for `dead_after` steps (as of the last flush). Returns how many."""
        dead = (step - self.last_used) >= self.dead_after
        num_dead = int(dead.sum())
        if num_dead == 0 or not self.buffer:
            return 0
        weight = self.codebook.weight
        if get_rank() == 0:
            pool = torch.cat(list(self.buffer))
            generator = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, step))
            if len(pool) >= num_dead:
                choice = torch.randperm(len(pool), generator=generator)[:num_dead]
            else:
                choice = torch.randint(len(pool), (num_dead,), generator=generator)
            noise = torch.randn(num_dead, pool.shape[1], generator=generator) * 0.01 * pool.std()
            weight.data[dead] = (pool[choice.to(pool.device)] + noise.to(pool.device)).to(weight.dtype)
        if is_dist_avail_and_initialized():
            dist.broadcast(weight.data, src=0)
        if optimizer is not None:
            for moment in optimizer.state.get(weight, {}).values():
                if torch.is_tensor(moment) and moment.shape == weight.shape:
                    moment[dead] = 0
        self.last_used[dead] = step
        return num_dead

    def state_dict(self):
        return {"last_used": self.last_used.cpu()}

    def load_state_dict(self, state):
        self.last_used.copy_(state["last_used"])


def train_one_epoch(model, loss_fn, disc_model, optimizer, optimizer_d, scaler, scaler_d, monitor, data_loader,
                    epoch, args, log_writer=None):
    """model: TokenizerForward (maybe DDP-wrapped); disc_model: the (maybe DDP-wrapped) discriminator or None.
    Returns the epoch's averaged stats."""
    model.train()
    loss_fn.train()
    vqmodel = unwrap(model).vqmodel
    last_layer = vqmodel.decoder.conv_out.weight
    metric_logger = MetricLogger(delimiter="  ")
    steps_per_epoch = len(data_loader)
    for i, (images, _) in enumerate(metric_logger.log_every(data_loader, args.print_freq, f"Epoch: [{epoch}]")):
        step = epoch * steps_per_epoch + i
        lr = adjust_learning_rate(optimizer, epoch + i / steps_per_epoch, args)
        images = images.to(args.device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        with autocast(args.device, args.amp):
            x_rec, q_loss, indices, z = model(images)
            loss, logs = loss_fn.generator_loss(images, x_rec, q_loss, step, last_layer)
        check_finite(all_reduce_mean(loss.item()), epoch, i)
        optimizer.zero_grad(set_to_none=True)
        scaler(loss, optimizer, clip_grad=args.clip_grad, parameters=model.parameters())

        if loss_fn.disc_active(step):
            adjust_learning_rate(optimizer_d, epoch + i / steps_per_epoch, args)
            with autocast(args.device, args.amp):
                d_loss, d_logs = loss_fn.discriminator_loss(images, x_rec, disc_model)
            optimizer_d.zero_grad(set_to_none=True)
            scaler_d(d_loss, optimizer_d, clip_grad=args.clip_grad, parameters=disc_model.parameters())
            logs.update(d_logs)

        monitor.observe(indices, z)
        if (step + 1) % args.restart_every == 0:
            usage, perplexity = monitor.flush(step)
            restarted = monitor.restart_dead(step, optimizer) if args.restart_dead_codes else 0
            metric_logger.update(usage=usage, perplexity=perplexity, restarted=restarted)
        metric_logger.update(loss=loss.item(), lr=lr, **{k: v.item() for k, v in logs.items()})

        if log_writer is not None and (step + 1) % args.print_freq == 0:
            for name, meter in metric_logger.meters.items():
                log_writer.add_scalar(f"train/{name}", meter.value, step + 1)

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}


def psnr(x, x_rec):
    """Per-image PSNR in dB of images in [0, 1]: (B,)."""
    mse = (x - x_rec.clamp(0, 1)).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate(vqmodel, data_loader, device):
    """Float32 reconstruction metrics on a (rank-sharded) loader: PSNR (dB, mean over images), L1, codebook
    usage (% of codes selected at least once) and perplexity of the code histogram."""
    vqmodel.eval()
    n_embed = vqmodel.quantize.n_e
    counts = torch.zeros(n_embed, dtype=torch.float64, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # psnr sum, l1 sum, images
    for images, _ in data_loader:
        images = images.to(device, non_blocking=True)
        quant, _, (_, _, indices) = vqmodel.encode(images)
        x_rec = vqmodel.decode(quant).float()
        counts += torch.bincount(indices, minlength=n_embed).double()
        sums += torch.stack([psnr(images, x_rec).sum().double(), (images - x_rec).abs().mean(dim=(1, 2, 3)).sum(),
                             torch.tensor(float(len(images)), dtype=torch.float64, device=device)])
    if is_dist_avail_and_initialized():
        packed = torch.cat([counts, sums])
        dist.all_reduce(packed)
        counts, sums = packed[:n_embed], packed[n_embed:]
    usage, perplexity = usage_stats(counts)
    return {"psnr": (sums[0] / sums[2]).item(), "l1": (sums[1] / sums[2]).item(),
            "codebook_usage": 100 * usage, "perplexity": perplexity}


@torch.no_grad()
def reconstruction_grid(vqmodel, images):
    """Originals (top row) above their reconstructions: (3, H', W') in [0, 1]."""
    vqmodel.eval()
    x_rec = vqmodel(images)[0].float().clamp(0, 1)
    return make_grid(torch.cat([images, x_rec]), nrow=len(images), padding=1)


def tokenizer_config(settings):
    """The YAML content (shape of config/vqgan.yaml) for tokenizer settings {'ddconfig','n_embed','embed_dim'}."""
    return {"model": {"target": "taming.models.vqgan.VQModel",
                      "params": {"embed_dim": settings["embed_dim"], "n_embed": settings["n_embed"],
                                 "ddconfig": dict(settings["ddconfig"])}}}


def export_tokenizer(vqmodel, settings, output_dir, metrics, grid=None):
    """Write output_dir/tokenizer.ckpt ({'state_dict': ...} like vqgan_jax_strongaug.ckpt, plus plain metric
    entries), tokenizer.yaml, tokenizer_metrics.json and the reconstruction grid. Returns the ckpt path."""
    path = os.path.join(output_dir, TOKENIZER_FILE)
    state = {k: v.detach().float().cpu() for k, v in vqmodel.state_dict().items()}
    save_checkpoint_atomic({"state_dict": state, **metrics}, path)
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(tokenizer_config(settings)))
    write_atomic(os.path.join(output_dir, TOKENIZER_CONFIG_FILE), lambda f: f.write(config_yaml.encode()))
    save_json_atomic(os.path.join(output_dir, METRICS_FILE), metrics, indent=1)
    if grid is not None:
        write_atomic(os.path.join(output_dir, RECONSTRUCTIONS_FILE), lambda f: save_image(grid, f, format="png"))
    return path

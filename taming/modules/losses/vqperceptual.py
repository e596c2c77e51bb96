"""Losses for training the VQGAN tokenizer: L1 reconstruction, codebook + commitment (from the quantizer),
an optional perceptual distance from user-supplied VGG16 weights, and a PatchGAN discriminator with hinge
loss whose weight is balanced adaptively against the reconstruction loss (Esser et al., "Taming
Transformers", eq. 7: the ratio of gradient norms at the decoder's last layer).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vgg import cfgs, make_layers

from util.checkpoint import CheckpointError, load_checkpoint


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix): 4x4 convolutions, one logit per overlapping image patch."""

    def __init__(self, in_channels=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = ndf
        for n in range(1, n_layers + 1):
            previous, width = width, ndf * min(2 ** n, 8)
            stride = 1 if n == n_layers else 2
            layers += [nn.Conv2d(previous, width, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x, fake=None):
        # x: (B, 3, H, W) -> patch logits (B, 1, h, w). With `fake`, (logits of x, logits of fake) from two
        # separate passes (BatchNorm statistics are not mixed) inside one call, so one DDP forward covers both.
        if fake is None:
            return self.main(x)
        return self.main(x), self.main(fake)


def _init_weights(module):
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_disc_weight(nll_loss, g_loss, last_layer, max_weight=1e4):
    """||d nll / d w|| / ||d g_loss / d w|| at the decoder's last layer w, detached, clamped to [0, max]."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grads.float().norm() / (g_grads.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# LPIPS input scaling for [-1, 1] images (ImageNet statistics in that range).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16.features
VGG16_WIDTHS = (64, 128, 256, 512, 512)


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on frozen VGG16 features: unit-normalise channels at five ReLU taps, square the
    difference, weight channels (LPIPS's learned 1x1 weights when the file has them, else uniformly) and
    average over space; the sum over taps is returned per image (B,).

    `weights_path`: a torchvision vgg16 state dict (`features.*` keys; the classifier is ignored), optionally
    with the LPIPS linear layers merged in as `lin{k}.model.1.weight` (shape (1, C_k, 1, 1)). Nothing is
    downloaded.
    """

    def __init__(self, weights_path):
        super().__init__()
        state = load_checkpoint(weights_path)
        state = state.get("state_dict", state)
        features = make_layers(cfgs["D"])[:VGG16_TAPS[-1] + 1]  # the layers of torchvision's vgg16().features
        feature_state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        expected = set(features.state_dict())
        if not expected.issubset(feature_state):
            raise CheckpointError(f"--perceptual_weights '{weights_path}' is not a torchvision vgg16 state dict "
                                  f"(missing {sorted(expected - set(feature_state))[:4]})")
        features.load_state_dict({k: feature_state[k] for k in expected})
        self.features = features.eval().requires_grad_(False)
        lin = [state.get(f"lin{k}.model.1.weight") for k in range(len(VGG16_TAPS))]
        lin = [w if w is not None else torch.full((1, c, 1, 1), 1.0 / c) for w, c in zip(lin, VGG16_WIDTHS)]
        for k, weight in enumerate(lin):
            self.register_buffer(f"lin{k}", weight.float().reshape(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))

    def train(self, mode=True):
        super().train(mode)
        self.features.eval()
        return self

    def _taps(self, x):
        h = ((2 * x - 1) - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in VGG16_TAPS:
                taps.append(h / (h.float().norm(dim=1, keepdim=True).to(h.dtype) + 1e-10))
        return taps

    def forward(self, x, y):
        # x, y: (B, 3, H, W) in [0, 1] -> (B,)
        distance = 0.0
        for k, (fx, fy) in enumerate(zip(self._taps(x), self._taps(y))):
            diff = (fx.float() - fy.float()).pow(2)
            distance = distance + (diff * getattr(self, f"lin{k}")).sum(dim=1).mean(dim=(1, 2))
        return distance


class VQGANLoss(nn.Module):
    """Generator and discriminator objectives of the tokenizer.

    Generator: mean(|x - x_rec| + perceptual_weight * P(x, x_rec)) + codebook_weight * q_loss
               + [step >= disc_start] * lambda * disc_weight * (-mean D(x_rec)),
    with lambda the adaptive weight. Discriminator: [step >= disc_start] * hinge(D(x), D(x_rec)).
    disc_start < 0 disables the discriminator entirely.
    """

    def __init__(self, disc_start=-1, disc_weight=0.8, codebook_weight=1.0, perceptual_weights=None,
                 perceptual_weight=1.0, disc_ndf=64, disc_layers=3):
        super().__init__()
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.codebook_weight = codebook_weight
        self.perceptual = PerceptualLoss(perceptual_weights) if perceptual_weights else None
        self.perceptual_weight = perceptual_weight
        self.discriminator = NLayerDiscriminator(ndf=disc_ndf, n_layers=disc_layers) if disc_start >= 0 else None

    def disc_active(self, step):
        return self.discriminator is not None and step >= self.disc_start

    def generator_loss(self, x, x_rec, q_loss, step, last_layer):
        """Returns (loss, {name: float tensor}) for the tokenizer's update."""
        rec = (x - x_rec.float()).abs().mean(dim=(1, 2, 3))
        logs = {"rec_loss": rec.mean().detach(), "q_loss": q_loss.detach()}
        nll = rec
        if self.perceptual is not None:
            perceptual = self.perceptual(x, x_rec)
            nll = nll + self.perceptual_weight * perceptual
            logs["p_loss"] = perceptual.mean().detach()
        nll = nll.mean()
        loss = nll + self.codebook_weight * q_loss
        if self.disc_active(step):
            self.discriminator.requires_grad_(False)
            g_loss = -self.discriminator(x_rec).float().mean()
            self.discriminator.requires_grad_(True)
            weight = adaptive_disc_weight(nll, g_loss, last_layer) * self.disc_weight
            loss = loss + weight * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=weight)
        return loss, logs

    def discriminator_loss(self, x, x_rec, disc_forward=None):
        """Hinge loss of the discriminator on real x and detached x_rec. `disc_forward` is the (DDP-wrapped)
        discriminator to call; defaults to self.discriminator."""
        disc_forward = disc_forward or self.discriminator
        logits_real, logits_fake = disc_forward(x, x_rec.detach())
        logits_real, logits_fake = logits_real.float(), logits_fake.float()
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {"d_loss": loss.detach(), "logits_real": logits_real.mean().detach(),
                      "logits_fake": logits_fake.mean().detach()}

"""A judge for generated images: a small CNN trained on the real labelled images tells which class each sample
looks like. demo.py histograms the classes of unconditional samples with it (a generator that has collapsed
onto a few classes shows it at once); for class-conditional samples, per_class_accuracy() says how often a
sample of class c is recognised as c.

The judge only sees the real train split, so its val accuracy (the ceiling of what it can tell) is reported
next to what it says about the samples.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from util.images import open_rgb


def small_cnn(num_classes):
    """Three conv-BN-ReLU-maxpool blocks (32, 64, 96 channels), global average pooling and a linear layer."""
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(96, num_classes))


def train_judge(images, labels, num_classes, epochs, batch_size, device, lr=3e-3):
    """small_cnn trained on (N, 3, H, W) images in [0, 1] with random horizontal and vertical flips, Adam with
    a one-cycle schedule. Draws from torch's global RNG (seed it for a reproducible judge). Returns the model
    in eval mode."""
    model = small_cnn(num_classes).to(device)
    steps = epochs * math.ceil(len(images) / batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images))
        total = 0.0
        for batch in order.split(batch_size):
            x, y = images[batch].to(device), labels[batch].to(device)
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(2), x)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        print(f"sample classifier: epoch {epoch + 1}/{epochs}, train loss {total / len(images):.3f}")
    return model.eval()


@torch.no_grad()
def predict(model, images, device, batch_size=256):
    """The predicted class (N,) of (N, 3, H, W) images in [0, 1], on the CPU."""
    return torch.cat([model(batch.to(device)).argmax(1).cpu() for batch in images.split(batch_size)])


def load_images(paths):
    """(N, 3, H, W) float images in [0, 1] from image files of one size."""
    arrays = []
    for path in paths:
        arrays.append(np.asarray(open_rgb(path)))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)


def class_fractions(predicted, num_classes):
    """The fraction of the predictions that falls in each class (a list summing to 1)."""
    return (torch.bincount(predicted, minlength=num_classes).float() / len(predicted)).tolist()


def per_class_accuracy(predicted, intended, num_classes):
    """For each class c, the fraction of the images meant to be c that the judge calls c (None for a class
    without images)."""
    return [(predicted[intended == c] == c).float().mean().item() if (intended == c).any() else None
            for c in range(num_classes)]

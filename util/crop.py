"""RandomResizedCrop without torchvision's rejection loop (the TF/TPU variant used by the linear probe).

One area fraction and one log-uniform aspect ratio are drawn; the crop is clipped to the image instead of
re-drawing, as the reference's TPU input pipeline does.
"""
import math

import torch
from torchvision import transforms
from torchvision.transforms import functional as F


class RandomResizedCrop(transforms.RandomResizedCrop):
    @staticmethod
    def get_params(img, scale, ratio):
        width, height = F.get_image_size(img)
        target_area = width * height * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
        aspect_ratio = math.exp(torch.empty(1).uniform_(log_low, log_high).item())
        w = min(int(round(math.sqrt(target_area * aspect_ratio))), width)
        h = min(int(round(math.sqrt(target_area / aspect_ratio))), height)
        top = torch.randint(0, height - h + 1, size=(1,)).item()
        left = torch.randint(0, width - w + 1, size=(1,)).item()
        return top, left, h, w

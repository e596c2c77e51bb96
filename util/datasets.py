"""ImageFolder data for the training scripts: transforms, bad-image handling, deterministic augmentation.

Augmentation randomness is seeded per (seed, epoch, sample index), so a sample gets the same crop whatever
the number of processes, data workers or restarts. Together with DistributedSampler's (seed, epoch) order
this makes data exactly reproducible across resumes and world sizes. Datasets that yield several views of an
image (MAGE-C) seed view v by (seed, epoch, sample index, v), view 0 as a single-view dataset does.
"""
import contextlib
import logging
import os
import random

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from util.crop import RandomResizedCrop
from util.distributed import get_rank, get_world_size
from util.errors import TrainingError, UsageError
from util.images import open_rgb
from util.seeding import derive_seed

logger = logging.getLogger(__name__)

# The reference evaluates with Resize(292) + CenterCrop(256); the same ratio for other input sizes.
EVAL_RESIZE_RATIO = 292 / 256


class BadImageError(TrainingError):
    """An image file that cannot be decoded."""


@contextlib.contextmanager
def seeded_rng(seed):
    """Run a block with python/numpy/torch-CPU RNGs seeded from `seed`, restoring their state afterwards."""
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


def empty_folder_message(root, err):
    """One line for torchvision's FileNotFoundError on an ImageFolder root: which class folders have no images."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir()) if os.path.isdir(root) else []
    empty = [c for c in classes if not any(datasets.folder.has_file_allowed_extension(n, datasets.folder.IMG_EXTENSIONS)
                                           for _, _, names in os.walk(os.path.join(root, c)) for n in names)]
    extensions = ", ".join(datasets.folder.IMG_EXTENSIONS[:4]) + ", ..."
    if empty:
        shown = ", ".join(f"'{c}'" for c in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        return f"'{root}': the class folders {shown} hold no images ({extensions}); remove them or add images"
    if not classes:
        return f"'{root}' has no class folders (expected {root}/<class>/<image>)"
    return f"'{root}': {str(err).splitlines()[0]}"


class SeededImageFolder(datasets.ImageFolder):
    """torchvision ImageFolder whose transform is seeded per (seed, epoch, index).

    An unreadable image raises BadImageError naming the file; with skip_bad_images it is logged and the
    next readable image is used instead (batch shapes stay the same).
    """

    def __init__(self, root, transform, seed=0, skip_bad_images=False, views_per_sample=1):
        try:
            super().__init__(root, transform=transform)
        except FileNotFoundError as err:  # torchvision's error for a class folder without images
            raise UsageError(empty_folder_message(root, err)) from None
        self.seed = seed
        self.epoch = 0
        self.skip_bad_images = skip_bad_images
        self.views_per_sample = views_per_sample

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _read(self, path):
        try:
            return open_rgb(path)  # 16-bit images scaled to 8 bits, not clipped
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise BadImageError(f"cannot read image '{path}': {err}") from None

    def load_image(self, index):
        """(PIL image, target) of `index`, or of the next readable image when skipping bad ones."""
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                return self._read(path), target
            except BadImageError as err:
                if not self.skip_bad_images:
                    raise
                logger.warning("--skip_bad_images: %s; using the next image instead", err)
        raise BadImageError(f"no readable image in '{self.root}'")

    def __getitem__(self, index):
        """(transformed image, target); with views_per_sample V > 1, (V, ...) stacked views, view v seeded by
        view_seed(seed, epoch, index, v)."""
        image, target = self.load_image(index)
        if self.transform is None:
            return image, target
        if self.views_per_sample == 1:
            with seeded_rng(derive_seed(self.seed, self.epoch, index)):
                return self.transform(image), target
        views = []
        for view in range(self.views_per_sample):
            with seeded_rng(view_seed(self.seed, self.epoch, index, view)):
                views.append(self.transform(image))
        return torch.stack(views), target


def view_seed(seed, epoch, index, view):
    """Seed of view `view` of sample `index`: view 0 is the single-view seed (seed, epoch, index), so the first
    view of a two-view dataset is the sample a one-view dataset gives."""
    return derive_seed(seed, epoch, index, *([view] if view else []))


def interpolation_mode(name):
    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[name]


def pretrain_transform(input_size):
    """RandomResizedCrop(scale 0.2-1) + flip, pixels in [0, 1] (the tokenizer's input range)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor()])


def blur_kernel_size(input_size):
    """SimCLR's Gaussian blur kernel: about 10 % of the image side, odd (23 at 224 pixels, CAN's value)."""
    return max(3, int(0.1 * input_size) // 2 * 2 + 1)


def simclr_transform(input_size):
    """SimCLR's views, as CAN uses them (the MAGE-C fallback recipe, docs/mage_c_recipe.md): RandomResizedCrop
    (scale 0.08-1), colour jitter (0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale p 0.2, Gaussian blur (sigma 0.1-2)
    p 0.5, horizontal flip; pixels in [0, 1] without normalisation (the tokenizer's input range)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.08, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([transforms.GaussianBlur(blur_kernel_size(input_size), sigma=(0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor()])


def eval_transform(input_size, interpolation="bicubic", mean=None, std=None):
    """Resize(input_size * 292/256) + CenterCrop(input_size), [0, 1] pixels, optionally normalised."""
    steps = [transforms.Resize(round(input_size * EVAL_RESIZE_RATIO), interpolation=interpolation_mode(interpolation)),
             transforms.CenterCrop(input_size),
             transforms.ToTensor()]
    if mean is not None:
        steps.append(transforms.Normalize(mean, std))
    return transforms.Compose(steps)


def linprobe_train_transform(input_size):
    """TF-style RandomResizedCrop(scale 0.2-1, bicubic) + flip, [0, 1] pixels."""
    return transforms.Compose([
        RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor()])


def finetune_mean_std(args):
    """ImageNet mean/std (the reference) or identity with --no-normalize."""
    if not args.normalize:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def auto_augment_policy(aa):
    """timm's auto_augment argument for --aa: None (off) for 'none' or an empty string."""
    return None if aa.strip().lower() in ("", "none") else aa


def _posterize_0_bits_black(img, bits_to_keep, **kwargs):
    # 0 bits: Pillow <= 12 returned `pixel & 0` per channel (a black image), what the reference trained on;
    # Pillow 13 raises "bits must be between or equal to 1 and 8" instead.
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def keep_reference_posterize(transform):
    """Make timm's posterize ops in `transform` give the reference's black image for 0 bits (in place).

    RandAugment 'inc1' keeps 4 - int(m / 10 * 4) bits, so magnitude 10, which the mstd noise reaches in ~2 %
    of draws at m9, keeps 0 bits: about 1 image in 660 with rand-m9-mstd0.5-inc1, so with Pillow 13 a
    1,000-image epoch crashed 4 times in 5. AutoAugment v0's ('Posterize', 0.8, 2) keeps 0 bits too.
    Only these op instances change, not timm.
    """
    for step in getattr(transform, "transforms", ()):
        ops = list(getattr(step, "ops", ()))  # RandAugment, AugMix
        for sub_policy in getattr(step, "policy", ()):  # AutoAugment
            ops.extend(sub_policy)
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize_0_bits_black
    return transform


def finetune_train_transform(args):
    """timm's ImageNet training transform: RandomResizedCrop(0.2-1), flip, RandAugment, normalise, erasing.

    The arguments are the reference's (timm 0.3.2), and timm 1.0 builds the same steps from them. Pillow 13
    differs from older Pillow twice: posterize at 0 bits raises (see keep_reference_posterize), and a crop
    that the resize widens but shortens is resampled in the other pass order (a grey level or so; left as is).
    """
    mean, std = finetune_mean_std(args)
    transform = create_transform(input_size=args.input_size, is_training=True, scale=(0.2, 1.0),
                                 color_jitter=args.color_jitter, auto_augment=auto_augment_policy(args.aa),
                                 interpolation=args.interpolation, re_prob=args.reprob, re_mode=args.remode,
                                 re_count=args.recount, mean=mean, std=std)
    return keep_reference_posterize(transform)


def denormalize(images, mean, std):
    """Undo Normalize(mean, std) on a (B, 3, H, W) batch (in place), giving [0, 1] pixels back."""
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return images.mul_(std).add_(mean)


def check_split(data_path, split):
    """UsageError unless data_path/split is a folder (checked before any work starts)."""
    folder = os.path.join(data_path, split)
    if not os.path.isdir(folder):
        raise UsageError(f"--data_path '{data_path}' has no '{split}' folder (expected ImageFolder layout "
                         f"{folder}/<class>/<image>)")
    return folder


def build_image_folder(args, split, transform, views_per_sample=1):
    folder = check_split(args.data_path, split)
    dataset = SeededImageFolder(folder, transform, seed=args.seed, skip_bad_images=args.skip_bad_images,
                                views_per_sample=views_per_sample)
    print(f"{split}: {len(dataset)} images in {len(dataset.classes)} classes from {folder}")
    return dataset


def check_num_classes(dataset, nb_classes):
    """UsageError when the folder has more classes than the classifier's --nb_classes."""
    if len(dataset.classes) > nb_classes:
        raise UsageError(f"'{dataset.root}' has {len(dataset.classes)} classes but --nb_classes is {nb_classes}")


def build_loader(dataset, args, train, distributed=True, batch_size=None):
    """DataLoader over a DistributedSampler (rank-sharded; shuffled per (seed, epoch) when training).

    distributed=False gives the full dataset in order on every process (evaluation without --dist_eval).
    """
    if distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(),
                                                      shuffle=train, seed=args.seed, drop_last=False)
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_size or args.batch_size,
                                       num_workers=args.num_workers, drop_last=train,
                                       pin_memory=args.pin_mem and torch.device(args.device).type == "cuda")


def set_epoch(data_loader, epoch):
    """Make the next pass over `data_loader` use epoch `epoch`'s order and augmentation."""
    if hasattr(data_loader.sampler, "set_epoch"):
        data_loader.sampler.set_epoch(epoch)
    if hasattr(data_loader.dataset, "set_epoch"):
        data_loader.dataset.set_epoch(epoch)

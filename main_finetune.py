"""Fine-tuning the MAGE ViT classifier: layer-wise lr decay, drop path, RandAugment, Mixup/CutMix, label smoothing.

As in the reference, the training transform normalises by ImageNet mean/std (so random erasing and its noise
work in that space) and the batch is mapped back to [0, 1] pixels right before the tokenizer, after Mixup.
--no-normalize skips both.
"""
import util.env_setup  # noqa: F401  (sets GOMP_SPINCOUNT before torch is imported)

import argparse

import torch
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models_vit
import util.datasets as data
import util.lr_decay as lrd
from engine_finetune import evaluate, fit_classifier
from models_mage import check_input_size, tokenizer_kwargs
from util.checkpoint import expected_checkpoint_size, load_model, resolve_resume_path
from util.cli import (add_checkpoint_args, add_random_tokenizer_arg, add_runtime_args, check_tokenizer_source,
                      run_script)
from util.distributed import cleanup_distributed, get_world_size, unwrap, wrap_ddp
from util.errors import UsageError
from util.lr_sched import effective_lr
from util.output_dir import open_output_dir
from util.perf import adamw_kwargs, add_perf_args, apply_perf_settings
from util.precision import NativeScalerWithGradNormCount
from util.run import releases_output_dir, setup_run


def get_args_parser():
    parser = argparse.ArgumentParser("MAGE fine-tuning for image classification")
    group = parser.add_argument_group("training")
    group.add_argument("--batch_size", default=64, type=int,
                       help="batch size per process (effective batch = batch_size * accum_iter * processes)")
    group.add_argument("--epochs", default=50, type=int)
    group.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")

    group = parser.add_argument_group("model")
    group.add_argument("--model", default="vit_large_patch16", choices=sorted(models_vit.MODELS))
    group.add_argument("--input_size", default=256, type=int, help="image side fed to the tokenizer")
    group.add_argument("--vqgan_config", default="", help="tokenizer YAML (default: the model preset's)")
    group.add_argument("--vqgan_ckpt", default="",
                       help="tokenizer weights; needed unless the --finetune or --resume checkpoint holds them "
                            "(vqgan.*), as the project's and the released MAGE checkpoints do")
    add_random_tokenizer_arg(group)
    group.add_argument("--drop_path", type=float, default=0.1, help="drop path rate")
    group.add_argument("--finetune", default="", help="MAGE pre-training checkpoint to start from")
    group.add_argument("--global_pool", action="store_true", default=True, help="mean-pool the image tokens")
    group.add_argument("--cls_token", action="store_false", dest="global_pool", help="use the class token")
    group.add_argument("--nb_classes", default=1000, type=int)

    group = parser.add_argument_group("optimizer")
    group.add_argument("--clip_grad", type=float, default=None, help="gradient norm clip (default: none)")
    group.add_argument("--weight_decay", type=float, default=0.05)
    group.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * effective batch / 256)")
    group.add_argument("--blr", type=float, default=1e-3, help="base lr")
    group.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay")
    group.add_argument("--min_lr", type=float, default=1e-6)
    group.add_argument("--warmup_epochs", type=int, default=5)
    group.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2")

    group = parser.add_argument_group("augmentation")
    group.add_argument("--color_jitter", type=float, default=None, help="colour jitter (only without --aa)")
    group.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1",
                       help="timm RandAugment/AutoAugment policy; 'none' (or '') turns it off")
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group.add_argument("--interpolation", default="bicubic", choices=("bilinear", "bicubic"))
    group.add_argument("--reprob", type=float, default=0.25, help="random erase probability")
    group.add_argument("--remode", type=str, default="pixel", help="random erase mode")
    group.add_argument("--recount", type=int, default=1, help="random erase count")
    group.add_argument("--mixup", type=float, default=0, help="mixup alpha (on when > 0)")
    group.add_argument("--cutmix", type=float, default=0, help="cutmix alpha (on when > 0)")
    group.add_argument("--cutmix_minmax", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                       help="cutmix min/max area ratio; overrides --cutmix and turns cutmix on")
    group.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    group.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of cutmix when both are on")
    group.add_argument("--mixup_mode", type=str, default="batch", choices=("batch", "pair", "elem"))
    group.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                       help="ImageNet mean/std normalisation in the transforms, mapped back to [0, 1] before the "
                            "tokenizer (the reference); --no-normalize skips both")

    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default="./data/imagenet", help="ImageFolder root with train/ and val/")
    group.add_argument("--skip_bad_images", action="store_true",
                       help="log unreadable images and use the next one instead of stopping")

    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval", action="store_true", help="only evaluate (weights from --resume)")
    group.add_argument("--dist_eval", action="store_true", help="shard evaluation over the processes")

    add_checkpoint_args(parser, save_every=10)
    add_runtime_args(parser)
    add_perf_args(parser)
    return parser


def mixup_active(args):
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def check_args(args):
    if args.batch_size < 1 or args.accum_iter < 1 or args.epochs < 1:
        raise UsageError("--batch_size, --accum_iter and --epochs must be at least 1")
    if mixup_active(args) and args.batch_size % 2:
        raise UsageError(f"Mixup/CutMix pairs up samples, so --batch_size must be even (got {args.batch_size})")
    if args.cutmix_minmax is not None and not 0 < args.cutmix_minmax[0] < args.cutmix_minmax[1] <= 1:
        raise UsageError(f"--cutmix_minmax needs 0 < MIN < MAX <= 1, got {args.cutmix_minmax}")
    if args.eval and not args.resume:
        raise UsageError("--eval needs weights: pass --resume (a fine-tuned checkpoint)")
    if not 0 < args.layer_decay <= 1:
        raise UsageError(f"--layer_decay must be in (0, 1], got {args.layer_decay}")
    data.check_split(args.data_path, "val")
    if not args.eval:
        data.check_split(args.data_path, "train")
        try:  # timm rejects an unknown policy with a bare assert, and only once the model is built
            data.finetune_train_transform(args)
        except (AssertionError, KeyError, ValueError) as err:
            raise UsageError(f"--aa '{args.aa}' is not a timm augmentation policy ({err or type(err).__name__}); "
                         f"'none' turns it off") from None
    check_tokenizer_source(args, ["" if args.eval else args.finetune, resolve_resume_path(args)])


def build_model(args):
    model = models_vit.MODELS[args.model](num_classes=args.nb_classes, drop_path_rate=args.drop_path,
                                          global_pool=args.global_pool, **tokenizer_kwargs(args))
    check_input_size(model, args.input_size)
    if args.finetune and not args.eval:
        print(f"Load pre-trained checkpoint from: {args.finetune}")
        print(models_vit.load_mage_checkpoint_into_classifier(model, args.finetune))
        trunc_normal_(model.head.weight, std=2e-5)
    return model


def build_mixup(args):
    if not mixup_active(args):
        return None
    print("Mixup is activated")
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.nb_classes)


def build_criterion(args, mixup_fn):
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # label smoothing is part of the mixed targets
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def pixel_fn(args):
    """Maps a normalised batch back to the [0, 1] pixels the tokenizer takes (None with --no-normalize)."""
    if not args.normalize:
        return None
    mean, std = data.finetune_mean_std(args)
    return lambda images: data.denormalize(images, mean, std)


@releases_output_dir
def main(args):
    """Fine-tune; returns engine_finetune.classifier_result() (acc1, acc5, loss, max_acc1, max_acc5, epochs,
    history, checkpoint, output_dir). With --eval: acc1, acc5 and loss of the --resume weights."""
    setup_run(args, check_args, create_output_dir=False)
    device = args.device
    model = build_model(args)
    mean, std = data.finetune_mean_std(args)
    dataset_val = data.build_image_folder(args, "val", data.eval_transform(args.input_size, args.interpolation, mean, std))
    data.check_num_classes(dataset_val, args.nb_classes)
    loader_val = data.build_loader(dataset_val, args, train=False, distributed=args.dist_eval)
    if not args.eval:
        dataset_train = data.build_image_folder(args, "train", data.finetune_train_transform(args))
        data.check_num_classes(dataset_train, args.nb_classes)
        loader_train = data.build_loader(dataset_train, args, train=True)
        if len(loader_train) == 0:
            raise UsageError(f"the training set ({len(dataset_train)} images over {get_world_size()} "
                             f"processes) is smaller than one batch of --batch_size {args.batch_size}")

    open_output_dir(args, expected_bytes=expected_checkpoint_size(model))  # the usage checks are done
    model.to(device)
    apply_perf_settings(model, args, device)
    print(f"number of params (M): {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}")
    effective_lr(args)
    # patch_embed, cls_token and pos_embed exist only for checkpoint compatibility
    model = wrap_ddp(model, args, find_unused_parameters=True)
    model_without_ddp = unwrap(model)

    param_groups = lrd.param_groups_lrd(model_without_ddp, args.weight_decay,
                                        no_weight_decay_list=model_without_ddp.no_weight_decay(),
                                        layer_decay=args.layer_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, args.beta2), **adamw_kwargs(args, device))
    loss_scaler = NativeScalerWithGradNormCount(args.amp, device)
    mixup_fn = build_mixup(args)
    criterion = build_criterion(args, mixup_fn)
    print(f"criterion = {criterion}")
    progress = {"max_accuracy": 0.0}  # the best top-1 so far: saved in every checkpoint, restored on a resume
    load_model(args, model_without_ddp, optimizer, loss_scaler, progress=progress)
    input_fn = pixel_fn(args)

    if args.eval:
        test_stats = evaluate(loader_val, model_without_ddp, device, args, input_fn)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        cleanup_distributed()
        return test_stats

    return fit_classifier(args, model, criterion, loader_train, loader_val, optimizer, loss_scaler, device,
                          input_fn=input_fn, mixup_fn=mixup_fn, max_norm=args.clip_grad, progress=progress)


if __name__ == "__main__":
    run_script(get_args_parser(), main)

"""Linear probe of MAGE features: frozen backbone, BatchNorm (no affine) + linear head trained with LARS.

Without a cache the backbone runs every epoch on fresh crops (the reference). --cache_views K runs it K times
over the training set, once per augmented view (view v = the crop the uncached probe draws in epoch v), stores
the features in OUTPUT_DIR/features (util/feature_cache.py) and trains epoch e on view e mod K; the validation
features (one centre crop) are then computed once too.
"""
import util.env_setup  # noqa: F401  (sets GOMP_SPINCOUNT before torch is imported)

import argparse
import os

import torch
from timm.layers import trunc_normal_

import models_vit
import util.datasets as data
import util.feature_cache as feature_cache
from engine_finetune import evaluate, fit_classifier
from models_mage import check_input_size, tokenizer_kwargs
from util.checkpoint import expected_checkpoint_size, load_model, resolve_resume_path
from util.cli import (add_checkpoint_args, add_random_tokenizer_arg, add_runtime_args, check_tokenizer_source,
                      run_script)
from util.contrastive import GlobalBatchNorm1d
from util.distributed import cleanup_distributed, get_world_size, wrap_ddp
from util.errors import UsageError
from util.lars import LARS
from util.lr_sched import effective_lr
from util.output_dir import open_output_dir
from util.perf import INFERENCE_FLAGS, add_perf_args, apply_perf_settings
from util.precision import NativeScalerWithGradNormCount, autocast
from util.run import releases_output_dir, setup_run


def get_args_parser():
    parser = argparse.ArgumentParser("MAGE linear probing for image classification")
    group = parser.add_argument_group("training")
    group.add_argument("--batch_size", default=512, type=int,
                       help="batch size per process (effective batch = batch_size * accum_iter * processes)")
    group.add_argument("--epochs", default=90, type=int)
    group.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")

    group = parser.add_argument_group("model")
    group.add_argument("--model", default="vit_large_patch16", choices=sorted(models_vit.MODELS))
    group.add_argument("--input_size", default=256, type=int, help="image side fed to the tokenizer")
    group.add_argument("--vqgan_config", default="", help="tokenizer YAML (default: the model preset's)")
    group.add_argument("--vqgan_ckpt", default="",
                       help="tokenizer weights; needed unless the --finetune or --resume checkpoint holds them "
                            "(vqgan.*), as the project's and the released MAGE checkpoints do")
    add_random_tokenizer_arg(group)
    group.add_argument("--finetune", default="", help="MAGE pre-training checkpoint to probe")
    group.add_argument("--global_pool", action="store_true", default=False, help="mean-pool the image tokens")
    group.add_argument("--cls_token", action="store_false", dest="global_pool", help="use the class token")
    group.add_argument("--nb_classes", default=1000, type=int)
    group.add_argument("--sync_bn", action="store_true",
                       help="under torchrun, the head's BatchNorm uses the statistics of the global batch, so N "
                            "processes x batch b train as 1 x N*b (default: per process, as the reference); "
                            "works on CPU (gloo) and GPU")

    group = parser.add_argument_group("optimizer")
    group.add_argument("--weight_decay", type=float, default=0.0)
    group.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * effective batch / 256)")
    group.add_argument("--blr", type=float, default=0.1, help="base lr")
    group.add_argument("--min_lr", type=float, default=0.0)
    group.add_argument("--warmup_epochs", type=int, default=10)

    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default="./data/imagenet", help="ImageFolder root with train/ and val/")
    group.add_argument("--skip_bad_images", action="store_true",
                       help="log unreadable images and use the next one instead of stopping")
    group.add_argument("--cache_views", default=0, type=int, metavar="K",
                       help="run the frozen backbone on K augmented views of every training image (view v: the "
                            "crop of epoch v) and train epoch e on view e mod K, so crops repeat every K epochs; "
                            "the features are stored in OUTPUT_DIR/features (float32, K x images x dim; in memory "
                            "without --output_dir) and reused by a rerun with the same settings. 0 (default): "
                            "new crops every epoch, as the reference; K = --epochs trains as 0 does")
    group.add_argument("--cache_features", action="store_true",
                       help="the same as --cache_views 1 (one crop per training image for all epochs)")
    group.add_argument("--train_aug", action=argparse.BooleanOptionalAction, default=True,
                       help="random crops and flips for training (the reference); --no-train_aug trains on the "
                            "evaluation transform (Resize + CenterCrop)")

    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval", action="store_true", help="only evaluate (weights from --resume)")
    group.add_argument("--dist_eval", action="store_true", help="shard evaluation over the processes")

    add_checkpoint_args(parser, save_every=10)
    add_runtime_args(parser)
    add_perf_args(parser, INFERENCE_FLAGS)  # LARS has no fused kernel; no backward through the backbone
    return parser


def check_args(args):
    if args.batch_size < 1 or args.accum_iter < 1 or args.epochs < 1:
        raise UsageError("--batch_size, --accum_iter and --epochs must be at least 1")
    if args.eval and not args.resume:
        raise UsageError("--eval needs weights: pass --resume (a linear-probe checkpoint)")
    if args.cache_features:
        if args.cache_views not in (0, 1):
            raise UsageError(f"--cache_features is --cache_views 1; it cannot go with --cache_views "
                             f"{args.cache_views}")
        args.cache_views = 1
    if args.cache_views < 0:
        raise UsageError(f"--cache_views must be 0 (no cache) or a number of views; got {args.cache_views}")
    if args.cache_views > args.epochs and not args.eval:
        raise UsageError(f"--cache_views {args.cache_views} is more than --epochs {args.epochs}: views after "
                         f"the {args.epochs}th would never be used")
    if args.cache_views > 1 and not args.train_aug:
        raise UsageError(f"--no-train_aug has one view per image (the centre crop); --cache_views "
                         f"{args.cache_views} would store {args.cache_views} copies of it")
    data.check_split(args.data_path, "val")
    if not args.eval:
        data.check_split(args.data_path, "train")
    check_tokenizer_source(args, ["" if args.eval else args.finetune, resolve_resume_path(args)])


def build_model(args):
    """The classifier with head = BatchNorm1d(affine=False) + Linear (trunc-normal std 0.01); only the head
    trains. With --sync_bn the BatchNorm is util.contrastive.GlobalBatchNorm1d (global-batch statistics;
    torch's SyncBatchNorm refuses CPU tensors)."""
    model = models_vit.MODELS[args.model](num_classes=args.nb_classes, global_pool=args.global_pool,
                                          **tokenizer_kwargs(args))
    check_input_size(model, args.input_size)
    if args.finetune and not args.eval:
        print(f"Load pre-trained checkpoint from: {args.finetune}")
        print(models_vit.load_mage_checkpoint_into_classifier(model, args.finetune))
    trunc_normal_(model.head.weight, std=0.01)
    batch_norm = GlobalBatchNorm1d if args.sync_bn else torch.nn.BatchNorm1d  # the same state dict keys
    model.head = torch.nn.Sequential(batch_norm(model.head.in_features, affine=False, eps=1e-6), model.head)
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    return model


def feature_fn(model, args):
    """Frozen backbone features (float32) of a batch of [0, 1] images; the backbone stays in eval mode."""
    @torch.no_grad()
    def features(images):
        with autocast(args.device, args.amp):
            return model.forward_features(images).float()
    return features


def cache_settings(model, dataset, args):
    """What the cached training features depend on (util.feature_cache's meta.json)."""
    return {"backbone_sha256": feature_cache.state_fingerprint(model.state_dict(), skip_prefixes=("head.",)),
            "model": args.model, "global_pool": args.global_pool, "feature_dim": model.head[1].in_features,
            "input_size": args.input_size, "train_aug": args.train_aug, "seed": args.seed,
            "num_images": len(dataset), "samples_sha256": feature_cache.samples_fingerprint(dataset),
            "device": args.device.type, **{flag: getattr(args, flag) for flag in INFERENCE_FLAGS}}


def build_data(args):
    """(train dataset, val dataset) of images; UsageError for data that does not fit the flags."""
    val_transform = data.eval_transform(args.input_size)
    train_transform = data.linprobe_train_transform(args.input_size) if args.train_aug else val_transform
    dataset_val = data.build_image_folder(args, "val", val_transform)
    dataset_train = None if args.eval else data.build_image_folder(args, "train", train_transform)
    for dataset in (dataset_val, dataset_train):
        if dataset is not None:
            data.check_num_classes(dataset, args.nb_classes)
    if dataset_train is not None and len(data.build_loader(dataset_train, args, train=True)) == 0:
        raise UsageError(f"the training set ({len(dataset_train)} images over {get_world_size()} "
                         f"processes) is smaller than one batch of --batch_size {args.batch_size}")
    return dataset_train, dataset_val


def build_loaders(model, args, dataset_train, dataset_val):
    """(train loader, val loader, input_fn): loaders of images and the feature extractor, or, with --cache_views,
    of cached features (computed here, or read back from OUTPUT_DIR/features) and None."""
    features = feature_fn(model, args)
    input_fn = features
    if args.cache_views:
        dataset_val = feature_cache.extract_features(features, dataset_val, args)
        if dataset_train is not None:
            folder = os.path.join(args.output_dir, feature_cache.FOLDER) if args.output_dir else ""
            settings = cache_settings(model, dataset_train, args) if folder else None
            dataset_train = feature_cache.cache_train_views(features, dataset_train, args, args.cache_views,
                                                            folder, settings)
        input_fn = None
    loader_val = data.build_loader(dataset_val, args, train=False, distributed=args.dist_eval)
    loader_train = None if args.eval else data.build_loader(dataset_train, args, train=True)
    return loader_train, loader_val, input_fn


@releases_output_dir
def main(args):
    """Linear-probe; returns engine_finetune.classifier_result() (acc1, acc5, loss, max_acc1, max_acc5, epochs,
    history, checkpoint, output_dir). With --eval: acc1, acc5 and loss of the --resume weights."""
    setup_run(args, check_args, create_output_dir=False)
    device = args.device
    model = apply_perf_settings(build_model(args).to(device), args, device)
    model.eval()  # the frozen backbone never trains (no dropout); train_one_epoch switches the head to train
    head = wrap_ddp(model.head, args)
    print(f"number of trained params: {sum(p.numel() for p in model.parameters() if p.requires_grad)}")
    effective_lr(args)
    optimizer = LARS(model.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss_scaler = NativeScalerWithGradNormCount(args.amp, device)
    progress = {"max_accuracy": 0.0}  # the best top-1 so far: saved in every checkpoint, restored on a resume
    load_model(args, model, optimizer, loss_scaler, progress=progress)
    dataset_train, dataset_val = build_data(args)
    open_output_dir(args, subfolders=(feature_cache.FOLDER,),  # usage checks done
                    expected_bytes=expected_checkpoint_size(model, optimizer_moments=1))
    loader_train, loader_val, input_fn = build_loaders(model, args, dataset_train, dataset_val)

    if args.eval:
        test_stats = evaluate(loader_val, model.head, device, args, input_fn)
        print(f"Accuracy of the network on the {len(loader_val.dataset)} test images: {test_stats['acc1']:.1f}%")
        cleanup_distributed()
        return test_stats

    return fit_classifier(args, head, torch.nn.CrossEntropyLoss(), loader_train, loader_val, optimizer, loss_scaler,
                          device, input_fn=input_fn, checkpoint_model=model, eval_model=model.head,
                          progress=progress)


if __name__ == "__main__":
    run_script(get_args_parser(), main)

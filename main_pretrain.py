"""MAGE pre-training: masked token modelling over a frozen VQGAN tokenizer, under torchrun DDP or alone."""
import util.env_setup  # noqa: F401  (sets GOMP_SPINCOUNT before torch is imported)

import argparse

import torch
from timm.optim import param_groups_weight_decay
from torchvision.datasets.folder import find_classes

import models_mage
import util.datasets as data
from engine_pretrain import train_one_epoch
from models_mage import check_input_size, tokenizer_kwargs
from util.checkpoint import (checkpoint_path, expected_checkpoint_size, extract_model_state, load_checkpoint,
                             load_mage_weights, load_model, resolve_resume_path)
from util.cli import (add_checkpoint_args, add_random_tokenizer_arg, add_runtime_args, check_tokenizer_source,
                      run_script)
from util.contrastive import DEFAULT_HIDDEN_DIM, DEFAULT_NUM_LAYERS, DEFAULT_OUT_DIM, DEFAULT_TEMPERATURE
from util.distributed import get_world_size, unwrap, wrap_ddp
from util.errors import UsageError
from util.lr_sched import effective_lr
from util.output_dir import open_output_dir
from util.perf import adamw_kwargs, add_perf_args, apply_perf_settings
from util.precision import NativeScalerWithGradNormCount
from util.run import releases_output_dir, setup_run
from util.token_cache import CachedTokenDataset, read_meta
from util.token_cache import num_classes as token_cache_num_classes
from util.train_loop import fit


CONTRASTIVE_AUGS = {"simclr": data.simclr_transform, "mage": data.pretrain_transform}


def get_args_parser():
    parser = argparse.ArgumentParser("MAGE pre-training")
    group = parser.add_argument_group("training")
    group.add_argument("--batch_size", default=64, type=int,
                       help="batch size per process (effective batch = batch_size * accum_iter * processes)")
    group.add_argument("--epochs", default=400, type=int)
    group.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")

    group = parser.add_argument_group("model")
    group.add_argument("--model", default="mage_vit_large_patch16", choices=sorted(models_mage.MODELS))
    group.add_argument("--input_size", default=256, type=int, help="image side fed to the tokenizer")
    group.add_argument("--vqgan_config", default="", help="tokenizer YAML (default: the model preset's)")
    group.add_argument("--vqgan_ckpt", default="",
                       help="tokenizer weights, e.g. vqgan_jax_strongaug.ckpt; needed unless --finetune or the "
                            "checkpoint resumed from holds them (vqgan.*)")
    add_random_tokenizer_arg(group)
    group.add_argument("--mask_ratio_min", type=float, default=0.5)
    group.add_argument("--mask_ratio_max", type=float, default=1.0)
    group.add_argument("--mask_ratio_mu", type=float, default=0.55)
    group.add_argument("--mask_ratio_std", type=float, default=0.25)
    group.add_argument("--mask_ratio_group", type=int, default=64,
                       help="one mask ratio per group of this many consecutive samples of the global batch (per "
                            "micro-batch), as the reference draws one per GPU for its 64 images; the same groups "
                            "for any number of processes")
    group.add_argument("--dropout", type=float, default=0.1, help="dropout in embeddings, attention and MLPs")
    group.add_argument("--code_emb_init", default="random", choices=("random", "codebook"),
                       help="codebook: a fresh model's code embeddings start as the tokenizer's codes through a "
                            "fixed random projection (models_mage: init_code_embeddings_from_codebook; --finetune "
                            "and --resume weights replace them); random: N(0, 0.02), the reference. On the demo (30 "
                            "epochs) codebook gave 54.7-61.7 %% class-conditional sample accuracy against "
                            "44.5-46.9 %% (docs/demo.md)")
    group.add_argument("--finetune", default="",
                       help="start from this MAGE checkpoint (released or ours); a class embedding it lacks starts "
                            "from its initialisation N(0, 0.02). --resume / --auto_resume take precedence")

    group = parser.add_argument_group("class-conditional MAGE")
    group.add_argument("--class_cond", action="store_true",
                       help="feed the image's class at position 0 (models_mage: a separate class embedding; the "
                            "'no class' token stays the unconditional one)")
    group.add_argument("--num_classes", type=int, default=None,
                       help="rows of the class embedding (default: the classes of the training data)")
    group.add_argument("--label_drop_prob", type=float, default=0.1,
                       help="probability that a sample's class is replaced by the 'no class' token, so one model "
                            "also samples unconditionally and supports classifier-free guidance")

    # MAGE-C. The MAGE paper adds "a contrastive loss to the encoder output"; the head, temperature, weight and
    # views are not in the paper text that could be read, so the defaults are CAN's (arXiv 2210.16870, the
    # same group's recipe, as the fallback) unless a comment says otherwise; docs/mage_c_recipe.md names each
    # source.
    group = parser.add_argument_group("MAGE-C (contrastive pre-training, docs/mage_c_recipe.md)")
    # 0: plain MAGE (the release's pre-training), unchanged. MAGE-C's weight: not retrievable from the paper.
    group.add_argument("--contrastive_weight", type=float, default=0.0,
                       help="lambda of MAGE-C: loss = reconstruction (mean of two views) + lambda * InfoNCE over "
                            "the global batch; 0 is plain MAGE")
    group.add_argument("--contrastive_temperature", type=float, default=DEFAULT_TEMPERATURE,  # CAN: 0.1
                       help="InfoNCE temperature (cosine similarity / temperature)")
    group.add_argument("--projector_dim", type=int, default=DEFAULT_OUT_DIM,  # CAN: 128
                       help="output width of the projection head")
    group.add_argument("--projector_hidden_dim", type=int, default=DEFAULT_HIDDEN_DIM,  # CAN: 4096
                       help="hidden width of the projection head")
    group.add_argument("--projector_layers", type=int, default=DEFAULT_NUM_LAYERS,  # CAN: 3
                       help="Linear layers of the projection head (BatchNorm + ReLU between them)")
    group.add_argument("--contrastive_aug", default="simclr", choices=CONTRASTIVE_AUGS,  # CAN: SimCLR's views
                       help="augmentation of the two views: simclr (crop 0.08-1, colour jitter, grayscale, blur, "
                            "flip) or mage (MAGE's crop 0.2-1 + flip); with --cached_tokens the cache's views")

    group = parser.add_argument_group("optimizer")
    group.add_argument("--weight_decay", type=float, default=0.05)
    group.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * effective batch / 256)")
    group.add_argument("--blr", type=float, default=1e-3, help="base lr")
    group.add_argument("--min_lr", type=float, default=0.0)
    group.add_argument("--warmup_epochs", type=int, default=40)
    group.add_argument("--grad_clip", type=float, default=3.0, help="gradient norm clip (0: none)")

    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default="./data/imagenet", help="ImageFolder root with a train/ folder")
    group.add_argument("--skip_bad_images", action="store_true",
                       help="log unreadable images and use the next one instead of stopping")
    group.add_argument("--cached_tokens", default="",
                       help="pre-train from a token cache written by main_cache_tokens.py (one of its K stored "
                            "views per image and epoch) instead of tokenizing --data_path on the fly")

    group = parser.add_argument_group("tensorboard images")
    group.add_argument("--vis_every", type=int, default=20, help="image grid every N epochs (0: never)")
    group.add_argument("--vis_num", type=int, default=8, help="images in the grid")

    add_checkpoint_args(parser, save_every=40)
    add_runtime_args(parser)
    add_perf_args(parser)
    return parser


def check_args(args):
    """Reject impossible flag combinations before any work starts."""
    if not 0.0 < args.mask_ratio_min <= args.mask_ratio_max <= 1.0:
        raise UsageError(f"need 0 < --mask_ratio_min <= --mask_ratio_max <= 1, got "
                         f"{args.mask_ratio_min} and {args.mask_ratio_max}")
    if args.mask_ratio_std <= 0:
        raise UsageError(f"--mask_ratio_std must be positive, got {args.mask_ratio_std}")
    if args.mask_ratio_group < 1:
        raise UsageError(f"--mask_ratio_group must be at least 1, got {args.mask_ratio_group}")
    if args.batch_size < 1 or args.accum_iter < 1 or args.epochs < 1:
        raise UsageError("--batch_size, --accum_iter and --epochs must be at least 1")
    if args.warmup_epochs < 0:
        raise UsageError("--warmup_epochs must not be negative")
    if not 0.0 <= args.label_drop_prob <= 1.0:
        raise UsageError(f"--label_drop_prob must be in [0, 1], got {args.label_drop_prob}")
    check_contrastive_args(args)
    check_tokenizer_source(args, [args.finetune, resolve_resume_path(args)])
    if args.cached_tokens:
        meta = read_meta(args.cached_tokens)
        if args.contrastive_weight > 0 and meta["num_views"] < 2:
            raise UsageError(f"--contrastive_weight needs two different views per image, but --cached_tokens "
                             f"'{args.cached_tokens}' holds {meta['num_views']}; write it with --num_views 2 or more")
    else:
        data.check_split(args.data_path, "train")
    if args.class_cond:
        resolve_num_classes(args)


def check_contrastive_args(args):
    if args.contrastive_weight < 0:
        raise UsageError(f"--contrastive_weight must not be negative, got {args.contrastive_weight}")
    if args.contrastive_weight > 0:
        if not args.contrastive_temperature > 0:
            raise UsageError(f"--contrastive_temperature must be positive, got {args.contrastive_temperature}")
        if min(args.projector_dim, args.projector_hidden_dim, args.projector_layers) < 1:
            raise UsageError("--projector_dim, --projector_hidden_dim and --projector_layers must be at least 1")


def contrastive_head_dims(args):
    """The model's contrastive_head argument: None for plain MAGE, else (hidden, out, layers)."""
    if args.contrastive_weight <= 0:
        return None
    return args.projector_hidden_dim, args.projector_dim, args.projector_layers


def resolve_num_classes(args):
    """--num_classes, by default the number of classes of the training data; never fewer than the data has."""
    if args.cached_tokens:
        found = token_cache_num_classes(args.cached_tokens)
    else:
        found = len(find_classes(data.check_split(args.data_path, "train"))[0])
    source = args.cached_tokens or args.data_path
    if args.num_classes is None:
        args.num_classes = found
    elif args.num_classes < found:
        raise UsageError(f"--num_classes {args.num_classes} is smaller than the {found} classes of '{source}'")
    print(f"class-conditional: {args.num_classes} classes, label drop probability {args.label_drop_prob}")


def build_train_dataset(args, model):
    """Plain MAGE: one view per sample; MAGE-C: two (samples (2, ...), each view seeded on its own)."""
    if args.contrastive_weight <= 0:
        transform, views = data.pretrain_transform(args.input_size), 1
    else:
        transform, views = CONTRASTIVE_AUGS[args.contrastive_aug](args.input_size), 2
    if not args.cached_tokens:
        return data.build_image_folder(args, "train", transform, views_per_sample=views)
    dataset = CachedTokenDataset(args.cached_tokens, seed=args.seed, views_per_sample=views)
    meta = dataset.meta
    if views > 1:
        print(f"MAGE-C views: two different cached views of each image per epoch, augmentation "
              f"'{meta.get('views', 'random_crops')}' of the cache (--contrastive_aug applies to images only)")
    if (meta["grid_size"], meta["codebook_size"]) != (model.grid_size, model.codebook_size):
        raise UsageError(
            f"--cached_tokens '{args.cached_tokens}' holds {meta['grid_size']}x{meta['grid_size']} tokens from a "
            f"{meta['codebook_size']}-code tokenizer, but the model expects {model.grid_size}x{model.grid_size} "
            f"and {model.codebook_size} codes")
    print(f"train: {len(dataset)} images x {meta['num_views']} cached views from {args.cached_tokens}")
    return dataset


def build_model(args):
    class_kwargs = {"class_cond": True, "num_classes": args.num_classes} if args.class_cond else {}
    model = models_mage.MODELS[args.model](
        mask_ratio_min=args.mask_ratio_min, mask_ratio_max=args.mask_ratio_max, mask_ratio_mu=args.mask_ratio_mu,
        mask_ratio_std=args.mask_ratio_std, dropout=args.dropout, contrastive_head=contrastive_head_dims(args),
        **class_kwargs, **tokenizer_kwargs(args))
    check_input_size(model, args.input_size)
    if args.code_emb_init == "codebook":
        model.init_code_embeddings_from_codebook(seed=args.seed)
    if args.finetune:
        load_finetune_weights(model, args)
    return model


def load_finetune_weights(model, args):
    """--finetune: a MAGE checkpoint's weights (an unconditional one leaves only the class embedding as it was
    initialised, a MAGE one in MAGE-C only the contrastive head; a MAGE-C one in MAGE has its head ignored); the
    optimizer and schedule start afresh."""
    state_dict = extract_model_state(load_checkpoint(args.finetune), source=args.finetune)
    fresh = {}
    if args.class_cond and "class_emb.weight" not in state_dict:
        fresh["class_emb."] = "class embedding"
    if model.contrastive_head is not None and not any(k.startswith("contrastive_head.") for k in state_dict):
        fresh["contrastive_head."] = "contrastive head"
    load_mage_weights(model, state_dict, source=args.finetune, tokenizer_given=bool(args.vqgan_ckpt),
                      allowed_missing=tuple(fresh))
    print(f"weights from {args.finetune}" + (f" ({' and '.join(fresh.values())} initialised)" if fresh else ""))


@releases_output_dir
def main(args):
    """Pre-train; returns the run's result (rank 0; other ranks: the same keys, `history` holding only the
    epochs they ran):
        final_loss       train loss of the last epoch (None when a resumed run finds no epoch in its log); MAGE-C:
                         the total, reconstruction + contrastive_weight * contrastive
        final_recon_loss           the reconstruction part of final_loss (MAGE: final_loss)
        final_contrastive_loss     MAGE-C's InfoNCE of the last epoch (None for MAGE)
        final_contrastive_acc      fraction of anchors whose positive ranks first among the 2N - 1 others
                                   (None for MAGE)
        epochs           the --epochs the run trained to
        steps_per_epoch  batches per epoch and process (optimizer steps: this / --accum_iter)
        history          per-epoch stats (log.txt's lines: train_loss, train_lr, train_mask_ratio,
                         train_grad_norm, epoch; MAGE-C adds train_recon_loss, train_contrastive_loss,
                         train_contrastive_acc), including the epochs of an earlier process of a resumed run
        checkpoint       output_dir/checkpoint-last.pth ('' without --output_dir)
        output_dir       --output_dir
    """
    setup_run(args, check_args, create_output_dir=False)
    device = args.device
    model = build_model(args)
    dataset_train = build_train_dataset(args, model)
    data_loader_train = data.build_loader(dataset_train, args, train=True)
    if len(data_loader_train) == 0:
        raise UsageError(f"the training set ({len(dataset_train)} images over {get_world_size()} "
                         f"processes) is smaller than one batch of --batch_size {args.batch_size}")
    open_output_dir(args, expected_bytes=expected_checkpoint_size(model))  # the usage checks are done

    model.to(device)
    apply_perf_settings(model, args, device)
    print(f"Model = {model}")
    effective_lr(args)
    # patch_embed, cls_token, mask_token and decoder_pred exist only for checkpoint compatibility
    model = wrap_ddp(model, args, find_unused_parameters=True)
    model_without_ddp = unwrap(model)

    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), **adamw_kwargs(args, device))
    print(optimizer)
    loss_scaler = NativeScalerWithGradNormCount(args.amp, device)
    load_model(args, model_without_ddp, optimizer, loss_scaler)

    def train_epoch(epoch, log_writer):
        return train_one_epoch(model, data_loader_train, optimizer, device, epoch, loss_scaler, log_writer=log_writer,
                               args=args)

    history, _ = fit(args, train_epoch, data_loader_train, model_without_ddp, optimizer, loss_scaler)
    last = history[-1] if history else {}
    return {"final_loss": last.get("train_loss"),
            "final_recon_loss": last.get("train_recon_loss", last.get("train_loss")),
            "final_contrastive_loss": last.get("train_contrastive_loss"),
            "final_contrastive_acc": last.get("train_contrastive_acc"), "epochs": args.epochs,
            "steps_per_epoch": len(data_loader_train), "history": history,
            "checkpoint": checkpoint_path(args), "output_dir": args.output_dir}


if __name__ == "__main__":
    run_script(get_args_parser(), main)

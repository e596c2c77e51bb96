"""One epoch of MAGE pre-training, plus the periodic tensorboard image grid.

Masks are drawn for the whole global batch, and each process takes the rows of its own samples
(DistributedSampler deals samples out round-robin, so process r holds global rows r, r + world, ...). The
masked positions come from a generator seeded by (seed, epoch, step); the mask ratio is drawn once per group of
--mask_ratio_group consecutive global rows, from (seed, epoch, step, group), as the reference draws one per GPU
for its 64 images. A run on N processes with batch b therefore sees exactly the data and masks of one process
with batch N*b, and a resumed run sees exactly those of an uninterrupted one.

MAGE-C (--contrastive_weight > 0): every sample is two views; each view has its own masks (view 1's are
plain MAGE's, view 2's positions and ratios come from other seed streams); the loss is the mean of the two
views' reconstruction losses plus contrastive_weight x InfoNCE over the global batch (util.contrastive).
"""
import numpy as np
import torch
import torchvision

import util.lr_sched as lr_sched
from util.contrastive import info_nce
from util.distributed import all_reduce_mean, get_rank, get_world_size, no_sync_if, unwrap
from util.errors import check_finite
from util.metrics import MetricLogger, SmoothedValue
from util.precision import autocast
from util.sampling import generate_images
from util.seeding import derive_seed

PRINT_FREQ = 20
VIS_STREAM = 2 ** 31  # seeds the grid's masks apart from the training masks
LABEL_DROP_STREAM = 2 ** 31 + 1  # seeds the label dropout apart from the masks (which stay as without labels)
MASK_RATIO_STREAM = 2 ** 31 + 2  # seeds the per-group mask ratios apart from the masked positions
VIEW_MASK_STREAM = 2 ** 31 + 3  # seeds the masks of MAGE-C's second view apart from the first view's


def split_batch(batch, device):
    """(images, token ids, labels) of a batch, images or token ids None.

    Image datasets yield (images float (B, 3, H, W) in [0, 1], labels). A token cache yields integer token ids
    (B, seq_len) in place of the images; they go to the model as gt_indices and the tokenizer is skipped.
    """
    samples, labels = batch if isinstance(batch, (list, tuple)) else (batch, None)
    samples = samples.to(device, non_blocking=True)
    labels = None if labels is None else labels.to(device, non_blocking=True)
    if samples.dtype.is_floating_point:
        return samples, None, labels
    return None, samples.long(), labels


def group_mask_rates(ratio_distribution, global_bsz, group_size, seed, epoch, step, view=0):
    """(global_bsz,) float64 mask ratios, one per group of `group_size` consecutive global rows (a last partial
    group draws its own). Group g's ratio depends on (seed, epoch, step, g) only (and MAGE-C's view v > 0): the
    g-th word of one SeedSequence, turned into a uniform and through the distribution's inverse CDF."""
    groups = -(-global_bsz // group_size)
    entropy = [int(seed), int(epoch), int(step), MASK_RATIO_STREAM] + ([int(view)] if view else [])
    words = np.random.SeedSequence(entropy).generate_state(groups, dtype=np.uint64)
    uniform = torch.from_numpy((words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)  # [0, 1)
    return ratio_distribution.quantile(uniform).repeat_interleave(group_size)[:global_bsz]


def global_batch_masks(model_without_ddp, local_bsz, device, seed, epoch, step, group_size, rank=None,
                       world=None, view=0):
    """Rows rank, rank + world, ... (this process's by default) of the (token_drop_mask, token_all_mask) of
    the global batch of local_bsz * world rows: positions from (seed, epoch, step), one ratio per group of
    `group_size` global rows (group_mask_rates). view: MAGE-C's view index; view 0 draws plain MAGE's masks,
    view v > 0 its own from other seed streams."""
    world = get_world_size() if world is None else world
    rank = get_rank() if rank is None else rank
    global_bsz = local_bsz * world
    rates = group_mask_rates(model_without_ddp.mask_ratio_generator, global_bsz, group_size, seed, epoch, step,
                             view)
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, epoch, step, *([VIEW_MASK_STREAM + view] if view else [])))
    token_drop_mask, token_all_mask = model_without_ddp.sample_masks(global_bsz, device, generator, rates)
    return token_drop_mask[rank::world], token_all_mask[rank::world]


def group_loss_weights(token_all_mask, group_size, rank=None, world=None):
    """(B,) loss weights of the rows rank, rank + world, ... of the global batch (token_all_mask: their masks).

    The reference averages each GPU's masked-token mean loss over GPUs, so each mask-ratio group counts the
    same whatever its ratio. Row i of group g (|g| rows, k_i masked tokens) gets world / (groups * |g| * k_i):
    the weighted sums of all processes add up, times world, to the mean over groups of each group's masked-token
    mean, and DDP's average of the gradients is that loss's gradient for any number of processes."""
    world = get_world_size() if world is None else world
    rank = get_rank() if rank is None else rank
    local_bsz = token_all_mask.shape[0]
    global_bsz = local_bsz * world
    groups = -(-global_bsz // group_size)
    group = torch.arange(rank, global_bsz, world, device=token_all_mask.device) // group_size
    group_rows = (global_bsz - group * group_size).clamp(max=group_size)
    masked = token_all_mask[:, 1:].sum(1)
    return world / (groups * group_rows * masked)


def global_label_drop(local_bsz, device, seed, epoch, step, prob):
    """This process's rows of the label-drop flags (B,) bool of the global batch: each global row drops its
    label with probability `prob`, drawn from (seed, epoch, step) like the masks."""
    world, rank = get_world_size(), get_rank()
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, epoch, step, LABEL_DROP_STREAM))
    return (torch.rand(local_bsz * world, generator=generator, device=device) < prob)[rank::world]


def conditioning_labels(model_without_ddp, labels, local_bsz, device, epoch, step, args):
    """The labels the model sees: None for unconditional training, else the classes with the dropped ones set to
    the model's NO_CLASS."""
    if not getattr(args, "class_cond", False):
        return None
    drop = global_label_drop(local_bsz, device, args.seed, epoch, step, args.label_drop_prob)
    return labels.long().masked_fill(drop, model_without_ddp.NO_CLASS)


def views_first(batch_of_views):
    """(B, V, ...) samples of V views -> (V*B, ...), view-major (rows [v*B, (v+1)*B) are view v); None stays."""
    return None if batch_of_views is None else batch_of_views.transpose(0, 1).flatten(0, 1)


def mage_c_loss(model, images, tokens, masks, labels, loss_weights, args):
    """MAGE-C's step loss: both views through one forward of the (DDP) model, then InfoNCE on the head's
    embeddings. images / tokens: (B, 2, ...); masks: one (drop, all) pair per view; loss_weights: one (B,)
    per view (group_loss_weights).
    Returns (total loss, reconstruction loss, contrastive loss, contrastive accuracy, token_all_mask)."""
    masks = tuple(torch.cat(per_view) for per_view in zip(*masks))
    labels = None if labels is None else labels.repeat(2)
    recon_loss, _, token_all_mask, embeddings = model(views_first(images), gt_indices=views_first(tokens),
                                                      masks=masks, labels=labels, loss_weights=torch.cat(loss_weights),
                                                      num_views=2)
    first, second = embeddings.chunk(2)
    contrastive_loss, accuracy = info_nce(first, second, args.contrastive_temperature)
    loss = recon_loss + args.contrastive_weight * contrastive_loss
    return loss, recon_loss, contrastive_loss, accuracy, token_all_mask


def train_one_epoch(model, data_loader, optimizer, device, epoch, loss_scaler, log_writer=None, args=None):
    model.train(True)
    contrastive = getattr(args, "contrastive_weight", 0) > 0
    num_views = 2 if contrastive else 1
    model_without_ddp = unwrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    accum_iter = args.accum_iter
    steps = len(data_loader)
    vis_batch = None

    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(metric_logger.log_every(data_loader, PRINT_FREQ, f"Epoch: [{epoch}]")):
        if step % accum_iter == 0:
            lr = lr_sched.adjust_learning_rate(optimizer, step / steps + epoch, args)
        images, tokens, labels = split_batch(batch, device)
        local_bsz = (images if tokens is None else tokens).shape[0]
        labels = conditioning_labels(model_without_ddp, labels, local_bsz, device, epoch, step, args)
        if vis_batch is None and log_writer is not None:
            vis_batch = (images, tokens, labels) if not contrastive else (
                None if images is None else images[:, 0], None if tokens is None else tokens[:, 0], labels)
        masks = [global_batch_masks(model_without_ddp, local_bsz, device, args.seed, epoch, step,
                                    args.mask_ratio_group, view=view) for view in range(num_views)]
        loss_weights = [group_loss_weights(view_masks[1], args.mask_ratio_group) for view_masks in masks]
        update = (step + 1) % accum_iter == 0

        with no_sync_if(model, not update):
            with autocast(device, args.amp):
                if contrastive:
                    loss, *parts, token_all_mask = mage_c_loss(model, images, tokens, masks, labels, loss_weights,
                                                               args)
                else:
                    loss, _, token_all_mask = model(images, gt_indices=tokens, masks=masks[0], labels=labels,
                                                    loss_weights=loss_weights[0])
            loss_value = all_reduce_mean(loss.item())
            check_finite(loss_value, epoch, step)
            if contrastive:
                contrastive_stats = dict(zip(("recon_loss", "contrastive_loss", "contrastive_acc"),
                                             (all_reduce_mean(part.item()) for part in parts)))
            grad_norm = loss_scaler(loss / accum_iter, optimizer, clip_grad=args.grad_clip, parameters=params,
                                    update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)

        mask_ratio = token_all_mask[:, 1:].float().mean().item()
        metric_logger.update(loss=loss_value, lr=lr, mask_ratio=mask_ratio)
        if contrastive:
            metric_logger.update(**contrastive_stats)
        if grad_norm is not None:
            grad_norm = float(grad_norm)  # identical on every process: gradients are already synchronised
            metric_logger.update(grad_norm=grad_norm)
        if log_writer is not None and update:
            epoch_1000x = int((step / steps + epoch) * 1000)  # x axis comparable across batch sizes
            log_writer.add_scalar("train_loss", loss_value, epoch_1000x)
            log_writer.add_scalar("lr", lr, epoch_1000x)
            log_writer.add_scalar("grad_norm", grad_norm, epoch_1000x)
            log_writer.add_scalar("mask_ratio", mask_ratio, epoch_1000x)
            if contrastive:
                for name, value in contrastive_stats.items():
                    log_writer.add_scalar(f"train_{name}", value, epoch_1000x)

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    if vis_batch is not None and args.vis_every > 0 and (epoch % args.vis_every == 0 or epoch + 1 == args.epochs):
        log_image_grid(model_without_ddp, *vis_batch, log_writer, epoch, args)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def log_image_grid(model, images, tokens, labels, log_writer, epoch, args):
    """Rows: inputs | tokenizer reconstruction | reconstruction with the masked tokens replaced by the
    model's argmax prediction | samples (12 steps, temperature 4.5; of the inputs' classes without guidance
    for a class-conditional model, the dropped ones unconditional).
    Runs in eval mode with its own generators: training RNG is untouched."""
    was_training = model.training
    model.eval()
    count = args.vis_num
    images = images[:count] if images is not None else None
    with autocast(args.device, args.amp):
        tokens = model.tokenize(images) if tokens is None else tokens[:count]
        device = tokens.device
        generator = torch.Generator(device=device)
        generator.manual_seed(derive_seed(args.seed, epoch, VIS_STREAM))
        drop_mask, all_mask = model.sample_masks(tokens.shape[0], device, generator)
        labels = None if labels is None else labels[:count]
        latent, _, _, _ = model.forward_encoder(None, gt_indices=tokens, masks=(drop_mask, all_mask), labels=labels)
        logits = model.forward_decoder(latent, drop_mask, all_mask)
        predicted = logits[:, 1:, :model.codebook_size].argmax(dim=-1)
        predicted = torch.where(all_mask[:, 1:].bool(), predicted, tokens)
        reconstruction = model.vqgan.decode_code(tokens, model.grid_size).float()
        prediction = model.vqgan.decode_code(predicted, model.grid_size).float()
        samples = generate_images(model, tokens.shape[0], num_iter=12, temperature=4.5, generator=generator,
                                  labels=labels)
    inputs = images.float() if images is not None else reconstruction
    rows = torch.cat([inputs, reconstruction, prediction, samples]).clamp(0, 1).cpu()
    grid = torchvision.utils.make_grid(rows, nrow=tokens.shape[0])
    log_writer.add_image("inputs | reconstruction | prediction of masked tokens | samples", grid, epoch)
    model.train(was_training)

"""Training and evaluation epochs for the classifier (fine-tuning and linear probe).

`input_fn` maps a loaded batch to what `model` takes: undoing the mean/std normalisation for fine-tuning,
or frozen backbone features for the linear probe (where `model` is only the trained head).
"""
import torch
from timm.utils import accuracy

import util.lr_sched as lr_sched
from util.checkpoint import checkpoint_path
from util.distributed import all_reduce_mean, no_sync_if, unwrap
from util.errors import check_finite
from util.metrics import MetricLogger, SmoothedValue
from util.precision import autocast
from util.train_loop import fit

PRINT_FREQ = 20


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, loss_scaler, max_norm=None,
                    mixup_fn=None, log_writer=None, args=None, input_fn=None):
    model.train(True)
    params = [p for p in model.parameters() if p.requires_grad]
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    accum_iter = args.accum_iter
    steps = len(data_loader)

    optimizer.zero_grad(set_to_none=True)
    for step, (samples, targets) in enumerate(metric_logger.log_every(data_loader, PRINT_FREQ, f"Epoch: [{epoch}]")):
        if step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, step / steps + epoch, args)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        if input_fn is not None:
            samples = input_fn(samples)
        update = (step + 1) % accum_iter == 0

        with no_sync_if(model, not update):
            with autocast(device, args.amp):
                loss = criterion(model(samples), targets)
            loss_value = all_reduce_mean(loss.item())
            check_finite(loss_value, epoch, step)
            grad_norm = loss_scaler(loss / accum_iter, optimizer, clip_grad=max_norm, parameters=params,
                                    update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)

        max_lr = max(group["lr"] for group in optimizer.param_groups)
        metric_logger.update(loss=loss_value, lr=max_lr)
        if grad_norm is not None:
            metric_logger.update(grad_norm=float(grad_norm))
        if log_writer is not None and update:
            epoch_1000x = int((step / steps + epoch) * 1000)  # x axis comparable across batch sizes
            log_writer.add_scalar("loss", loss_value, epoch_1000x)
            log_writer.add_scalar("lr", max_lr, epoch_1000x)
            if grad_norm is not None:
                log_writer.add_scalar("grad_norm", float(grad_norm), epoch_1000x)

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(data_loader, model, device, args, input_fn=None):
    """Cross-entropy, top-1 and top-5 accuracy (top-k with k capped at the number of classes)."""
    criterion = torch.nn.CrossEntropyLoss()
    metric_logger = MetricLogger(delimiter="  ")
    model.eval()
    for samples, targets in metric_logger.log_every(data_loader, PRINT_FREQ, "Test:"):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if input_fn is not None:
            samples = input_fn(samples)
        with autocast(device, args.amp):
            output = model(samples)
        output = output.float()
        loss = criterion(output, targets)
        acc1, acc5 = accuracy(output, targets, topk=(1, min(5, output.shape[1])))
        batch_size = samples.shape[0]
        metric_logger.meters["loss"].update(loss.item(), n=batch_size)
        metric_logger.meters["acc1"].update(acc1.item(), n=batch_size)
        metric_logger.meters["acc5"].update(acc5.item(), n=batch_size)
    metric_logger.synchronize_between_processes()
    print(f"* Acc@1 {metric_logger.acc1.global_avg:.3f} Acc@5 {metric_logger.acc5.global_avg:.3f} "
          f"loss {metric_logger.loss.global_avg:.3f}")
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


def fit_classifier(args, model, criterion, loader_train, loader_val, optimizer, loss_scaler, device, input_fn=None,
                   mixup_fn=None, max_norm=None, checkpoint_model=None, eval_model=None, progress=None):
    """Train for args.start_epoch..args.epochs with util.train_loop.fit, evaluating after every epoch.

    `model` is what trains (possibly DDP-wrapped); `checkpoint_model` what is saved and `eval_model` what is
    evaluated (default: the unwrapped model). `progress` ({"max_accuracy": ...}, restored by
    util.checkpoint.load_model on a resume) holds the best top-1 accuracy so far and is saved in every
    checkpoint. Returns classifier_result(): the last evaluation (of the loaded weights when a resumed run has
    no epoch left) and the per-epoch history.
    """
    eval_model = eval_model or unwrap(model)
    num_val = len(loader_val.dataset)
    progress = {"max_accuracy": 0.0} if progress is None else progress

    def train_epoch(epoch, log_writer):
        return train_one_epoch(model, criterion, loader_train, optimizer, device, epoch, loss_scaler,
                               max_norm=max_norm, mixup_fn=mixup_fn, log_writer=log_writer, args=args,
                               input_fn=input_fn)

    def evaluate_epoch(epoch, log_writer):
        test_stats = evaluate(loader_val, eval_model, device, args, input_fn)
        progress["max_accuracy"] = max(progress.get("max_accuracy", 0.0), test_stats["acc1"])
        print(f"Accuracy on the {num_val} test images: {test_stats['acc1']:.1f}%  "
              f"(max {progress['max_accuracy']:.2f}%)")
        if log_writer is not None:
            for key in ("acc1", "acc5", "loss"):
                log_writer.add_scalar(f"perf/test_{key}", test_stats[key], epoch)
        return test_stats

    final_stats = None
    if args.start_epoch >= args.epochs:  # resumed after the last epoch: evaluate the loaded weights
        final_stats = evaluate(loader_val, eval_model, device, args, input_fn)
    history, test_stats = fit(args, train_epoch, loader_train, checkpoint_model or unwrap(model), optimizer,
                              loss_scaler, evaluate_epoch, progress=progress)
    return classifier_result(args, final_stats or test_stats, history)


def classifier_result(args, test_stats, history):
    """The result of main_linprobe.py / main_finetune.py training (rank 0; other ranks: the same keys,
    `history` holding only the epochs they ran):
        acc1, acc5, loss    top-1 / top-5 accuracy (%) and cross-entropy of the final weights on the val split
        max_acc1, max_acc5  the best of each over the epochs (and the final evaluation)
        epochs              the --epochs the run trained to
        history             per-epoch stats (log.txt's lines: train_loss, train_lr, ..., test_acc1, test_acc5,
                            test_loss, epoch), including the epochs of an earlier process of a resumed run
        checkpoint          output_dir/checkpoint-last.pth ('' without --output_dir)
        output_dir          --output_dir
    """
    return {"acc1": test_stats["acc1"], "acc5": test_stats["acc5"], "loss": test_stats["loss"],
            "max_acc1": max([test_stats["acc1"]] + [stats["test_acc1"] for stats in history]),
            "max_acc5": max([test_stats["acc5"]] + [stats["test_acc5"] for stats in history]),
            "epochs": args.epochs, "history": history, "checkpoint": checkpoint_path(args),
            "output_dir": args.output_dir}

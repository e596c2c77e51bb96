"""MAGE's iterative decoding: the one sampler used by generation, editing and the pre-training image grid.

Randomness comes only from the torch.Generator(s) passed in (no global RNG, no NumPy), and the loop never
reads a value back to the host. Passing one generator per row makes every row depend only on its own
generator, so an image does not change with the batch it was generated in (see `image_generators`).
"""
import math

import torch

from util.seeding import derive_seed

CFG_SCHEDULES = ("constant", "linear")


def mask_len_table(num_iter, seq_len, device):
    """(num_iter, seq_len + 1) long: entry [t, n] = floor(n * cos(pi/2 * (t+1)/num_iter)).

    Computed in float64 on the host, as the reference does with NumPy, so the schedule is exact on any device.
    """
    rows = []
    for step in range(num_iter):
        mask_ratio = math.cos(math.pi / 2.0 * (step + 1) / num_iter)
        rows.append([math.floor(n * mask_ratio) for n in range(seq_len + 1)])
    return torch.tensor(rows, dtype=torch.long, device=device)


def image_generators(seed, indices, device):
    """One generator per image index k, seeded from (seed, k): image k is the same whatever the batch."""
    if not 0 <= seed < 2 ** 31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    generators = []
    for index in indices:
        generator = torch.Generator(device=device)
        generator.manual_seed((seed << 32) + int(index))
        generators.append(generator)
    return generators


def class_image_generators(seed, class_ids, indices, device):
    """One generator per (class c, image k) pair, seeded from (seed, c, k): image k of class c is the same
    whatever the batch, the other classes asked for or the number of processes."""
    if not 0 <= seed < 2 ** 31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    generators = []
    for class_id, index in zip(class_ids, indices):
        generator = torch.Generator(device=device)
        generator.manual_seed(derive_seed(seed, class_id, index))
        generators.append(generator)
    return generators


def guidance_scale(cfg, cfg_schedule, step, num_iter):
    """Guidance weight of decoding step `step`: cfg, or cfg * (step + 1) / num_iter for the linear ramp of
    MUSE / MAR / RCG (weak guidance while the layout is decided, full guidance for the last tokens)."""
    if cfg_schedule == "constant":
        return cfg
    if cfg_schedule == "linear":
        return cfg * (step + 1) / num_iter
    raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got '{cfg_schedule}'")


def guided_logits(model, ids, labels=None, cfg=0.0):
    """Codebook logits (B, L, K) in float32 for token ids (B, L).

    Without labels: the model's unconditional logits. With labels (B,) and cfg = 0: the conditional logits.
    With cfg != 0: conditional and unconditional (NO_CLASS) rows go through ONE forward of 2B rows, and
    logits = cond + cfg * (cond - uncond) (classifier-free guidance as in MUSE/MAR; Halton-MaskGIT's
    (1 + w) cond - w uncond is the same formula).
    """
    if labels is None:
        return model.predict_logits(ids).float()
    if cfg == 0:
        return model.predict_logits(ids, labels).float()
    no_class = torch.full_like(labels, model.NO_CLASS)
    both = model.predict_logits(torch.cat([ids, ids]), torch.cat([labels, no_class])).float()  # (2B, L, K)
    cond, uncond = both.chunk(2)
    return cond + cfg * (cond - uncond)


def _uniform(generator, bsz, shape, device):
    """Uniform [tiny, 1) noise of (bsz, *shape): one draw per row from its own generator, or one batched draw."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != bsz:
            raise ValueError(f"got {len(generator)} generators for a batch of {bsz}")
        noise = torch.stack([torch.rand(shape, generator=g, device=g.device) for g in generator]).to(device)
    else:
        noise_device = device if generator is None else generator.device
        noise = torch.rand((bsz, *shape), generator=generator, device=noise_device).to(device)
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def _gumbel(uniform):
    return -torch.log(-torch.log(uniform))


@torch.no_grad()
def iterative_decode(model, token_ids, num_iter=12, temperature=4.5, generator=None, return_history=False,
                     labels=None, cfg=0.0, cfg_schedule="constant"):
    """MAGE iterative decoding (SPEC "Unconditional generation"), starting from `token_ids`.

    token_ids: (B, L) long; positions holding `model.mask_token_label` are unknown (all of them for
    unconditional generation, the edited region for editing). Known tokens are never changed.
    generator: a torch.Generator for the whole batch, or a list with one generator per row.
    Each step samples every unknown position from Categorical(logits) (Gumbel-max), keeps its log-probability
    as confidence (+inf on known positions), and masks again the mask_len least confident positions after
    adding Gumbel noise scaled by temperature * (1 - ratio), where per row
    mask_len = clamp(floor(N * cos(pi/2 * ratio)), 1, #unknown - 1) and N is the row's initial unknown count.
    labels: (B,) long class labels (NO_CLASS for none) for a class-conditional model; cfg the guidance scale
    w, constant or ramped by cfg_schedule (see guidance_scale and guided_logits). The sampling noise is the
    same with and without guidance: only the logits change.
    Returns the final token ids (B, L); with return_history also the list of token ids after each step.
    The model runs in eval mode (restored afterwards); wrap the call in autocast for mixed precision.
    """
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    try:
        return _decode(model, token_ids, num_iter, temperature, generator, return_history, labels, cfg,
                       cfg_schedule)
    finally:
        model.train(was_training)


def _decode(model, token_ids, num_iter, temperature, generator, return_history, labels, cfg, cfg_schedule):
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got '{cfg_schedule}'")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long, device=token_ids.device)
        if labels.shape != token_ids.shape[:1]:
            raise ValueError(f"need one label per row: {tuple(labels.shape)} labels for {token_ids.shape[0]} rows")
    mask_id = model.mask_token_label
    ids = token_ids.long().clone()
    bsz, seq_len = ids.shape
    device = ids.device
    num_unknown_init = (ids == mask_id).sum(dim=1)  # (B,)
    schedule = mask_len_table(num_iter, seq_len, device)
    history = []
    for step in range(num_iter):
        unknown = ids == mask_id
        logits = guided_logits(model, ids, labels, guidance_scale(cfg, cfg_schedule, step, num_iter))  # (B, L, K)
        noise = _uniform(generator, bsz, (seq_len, logits.shape[-1] + 1), device)
        sampled = (logits + _gumbel(noise[..., :-1])).argmax(dim=-1)
        sampled = torch.where(unknown, sampled, ids)
        if step == num_iter - 1:
            ids = sampled
        else:
            ratio = (step + 1) / num_iter
            confidence = logits.log_softmax(dim=-1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
            confidence = torch.where(unknown, confidence, torch.full_like(confidence, math.inf))
            confidence = confidence + temperature * (1.0 - ratio) * _gumbel(noise[..., -1])
            mask_len = torch.minimum(schedule[step][num_unknown_init], unknown.sum(dim=1) - 1).clamp(min=1)
            cut_off = confidence.sort(dim=-1).values.gather(1, (mask_len - 1).unsqueeze(1))  # (B, 1)
            # `& unknown` only matters for rows without unknown tokens, whose cut-off would be +inf.
            remask = (confidence <= cut_off) & unknown
            ids = torch.where(remask, torch.full_like(sampled, mask_id), sampled)
        if return_history:
            history.append(ids.clone())
    return (ids, history) if return_history else ids


@torch.no_grad()
def decode_tokens(model, token_ids):
    """Token ids (B, L) -> images (B, 3, H, W) in [0, 1] (float32) through the frozen tokenizer."""
    model = getattr(model, "module", model)
    return model.vqgan.decode_code(token_ids, model.grid_size).float().clamp(0.0, 1.0)


def generate_images(model, num_images, num_iter=12, temperature=4.5, generator=None, labels=None, cfg=0.0,
                    cfg_schedule="constant"):
    """Samples (num_images, 3, H, W) in [0, 1], e.g. for the pre-training image grid: unconditional, or of
    the given labels (num_images,) with guidance cfg (class-conditional models)."""
    model = getattr(model, "module", model)
    device = next(model.parameters()).device
    ids = torch.full((num_images, model.seq_len), model.mask_token_label, dtype=torch.long, device=device)
    ids = iterative_decode(model, ids, num_iter=num_iter, temperature=temperature, generator=generator,
                           labels=labels, cfg=cfg, cfg_schedule=cfg_schedule)
    return decode_tokens(model, ids)

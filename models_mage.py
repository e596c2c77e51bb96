"""MAGE: the masked generative encoder ViT over VQGAN tokens.

Submodule names follow the reference implementation so that the released checkpoints
(mage-vitb-1600.pth, mage-vitl-1600.pth) load strictly.
"""
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from taming.models.vqgan import build_vqgan, token_grid_size
from util.contrastive import ProjectionHead, pooled_features
from util.errors import UsageError
from util.pos_embed import get_2d_sincos_pos_embed

NUM_CLASS_SLOTS = 1000  # MaskGIT's ImageNet class ids; unconditional MAGE trains only the "no class" one
NO_CLASS_SLOT = 1100 - 1024  # MaskGIT's "no class" id 1100 with 1024 codes: class slot 76


@dataclass(frozen=True)
class TokenVocab:
    """The ids of the token embedding table, in MaskGIT's layout (the released checkpoints have it):

        [0, codebook_size)                       tokenizer codes
        [codebook_size, codebook_size + 1000)    class slots; "no class" is slot NO_CLASS_SLOT
        codebook_size + 1000                     the mask token

    With the release's 1024 codes: "no class" = 1100, mask = 2024, 2025 rows.
    """
    codebook_size: int
    num_class_slots: int = NUM_CLASS_SLOTS

    @property
    def fake_class_label(self):
        """The "no class" id, always at position 0 of an unconditional sequence."""
        return self.codebook_size + NO_CLASS_SLOT

    @property
    def mask_token_label(self):
        return self.codebook_size + self.num_class_slots

    @property
    def size(self):
        """Rows of the embedding table (and logits of the MLM layer)."""
        return self.mask_token_label + 1

    def with_class_token(self, token_ids):
        """(B, L) token ids -> (B, L + 1) with the "no class" id in front."""
        class_ids = torch.full((token_ids.shape[0], 1), self.fake_class_label, dtype=torch.long,
                               device=token_ids.device)
        return torch.cat([class_ids, token_ids.long()], dim=1)


def tokenizer_kwargs(args):
    """Tokenizer keyword arguments of the model factories (here and in models_vit): --vqgan_ckpt, and
    --vqgan_config when given (else the preset's)."""
    kwargs = {"vqgan_ckpt_path": args.vqgan_ckpt or None}
    if args.vqgan_config:
        kwargs["vqgan_config"] = args.vqgan_config
    return kwargs


def check_input_size(model, input_size):
    """UsageError unless --input_size gives the token grid the model (and its tokenizer config) expects."""
    factor = model.vqgan.downsample_factor
    if input_size % factor or input_size // factor != model.grid_size:
        raise UsageError(f"--input_size {input_size} does not fit the tokenizer: it downsamples by {factor} and the "
                         f"model expects a {model.grid_size}x{model.grid_size} token grid, so use --input_size "
                         f"{model.grid_size * factor} (or a --vqgan_config with that resolution)")


NO_CLASS = -1  # label of a row without a class: its position 0 holds the unconditional token fake_class_label


class MageAttention(nn.Module):
    """Multi-head self-attention whose logits and softmax are computed in float32 even under autocast
    (the reference does this; ViT-L pre-training diverges to NaN in fp16 otherwise).

    `fused` selects torch's scaled_dot_product_attention; `fused=False` is the reference's explicit
    float32 computation. Under fp16 the fused path runs on float32 inputs to keep that guarantee.
    Accepts timm's attention keyword arguments so it plugs into timm's Block via `attn_layer`.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0, **timm_kwargs):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused = True
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_mask=None, is_causal=False):
        # x: (B, N, C)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if self.fused:
            out = self._fused(q, k, v)
        else:
            out = self._explicit(q, k, v)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))

    def _fused(self, q, k, v):
        dropout_p = self.attn_drop.p if self.training else 0.0
        if q.dtype == torch.float16:
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p)
            return out.to(v.dtype)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)

    def _explicit(self, q, k, v):
        with torch.autocast(q.device.type, enabled=False):
            attn = (q.float() @ k.float().transpose(-2, -1)) * self.scale
            attn = attn - attn.amax(dim=-1, keepdim=True)
            attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        if torch.is_autocast_enabled(q.device.type):
            return attn @ v  # autocast casts to the autocast dtype, as the reference does
        return attn.to(v.dtype) @ v


def set_fused_attention(model, enabled):
    """Switch every MageAttention in `model` between SDPA (True) and the reference's explicit path (False)."""
    for module in model.modules():
        if isinstance(module, MageAttention):
            module.fused = enabled


def mage_block(dim, num_heads, mlp_ratio, norm_layer, dropout=0.1, drop_path=0.0):
    """Pre-norm transformer block (timm's Block) with MAGE's float32-softmax attention."""
    return Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout,
                 drop_path=drop_path, norm_layer=norm_layer, attn_layer=MageAttention)


class BertEmbeddings(nn.Module):
    """Token + learned position embeddings, LayerNorm, dropout (BERT-style)."""

    def __init__(self, vocab_size, hidden_size, max_position_embeddings, dropout=0.1):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(max_position_embeddings).expand((1, -1)))
        nn.init.normal_(self.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.position_embeddings.weight, std=0.02)

    def forward(self, input_ids, class_embeddings=None):
        # input_ids: (B, L), optional class_embeddings (B, D) in place of position 0's word -> (B, L, D)
        words = self.word_embeddings(input_ids)
        if class_embeddings is not None:
            words = torch.cat([class_embeddings.unsqueeze(1).to(words.dtype), words[:, 1:]], dim=1)
        position_embeddings = self.position_embeddings(self.position_ids[:, :input_ids.shape[1]])
        return self.dropout(self.LayerNorm(words + position_embeddings))


class MlmLayer(nn.Module):
    """Projects decoder features back onto the (detached) token embedding matrix."""

    def __init__(self, feat_emb_dim, word_emb_dim, vocab_size):
        super().__init__()
        self.fc = nn.Linear(feat_emb_dim, word_emb_dim)
        self.gelu = nn.GELU()
        self.ln = nn.LayerNorm(word_emb_dim)
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))

    def forward(self, x, word_embeddings):
        # x: (B, L, D_dec), word_embeddings: (vocab, D) -> logits (B, L, vocab)
        hidden = self.ln(self.gelu(self.fc(x)))
        return hidden @ word_embeddings.t() + self.bias


class TruncatedNormal:
    """Normal(mu, std) truncated to [low, high], sampled by inverting the CDF with torch's RNG."""

    def __init__(self, low, high, mu, std):
        self.mu, self.std = mu, std
        self.cdf_low = 0.5 * math.erfc(-(low - mu) / std / math.sqrt(2))
        self.cdf_high = 0.5 * math.erfc(-(high - mu) / std / math.sqrt(2))
        self.low, self.high = low, high

    def sample(self, n=1, generator=None):
        u = torch.rand(n, dtype=torch.float64, generator=generator,
                       device="cpu" if generator is None else generator.device).cpu()
        return self.quantile(u)

    def quantile(self, u):
        """float64 uniforms in [0, 1) -> samples (the inverse CDF)."""
        u = self.cdf_low + u * (self.cdf_high - self.cdf_low)
        return (self.mu + self.std * torch.special.ndtri(u)).clamp(self.low, self.high)

    def mean(self):
        a, b = (self.low - self.mu) / self.std, (self.high - self.mu) / self.std
        pdf = lambda t: math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
        return self.mu + self.std * (pdf(a) - pdf(b)) / (self.cdf_high - self.cdf_low)


class MaskedGenerativeEncoderViT(nn.Module):
    """MAGE; with class_cond=True also a class-conditional generator (labels in at position 0).

    Class-conditional layout. MaskGIT puts label c at position 0 as vocabulary id codebook_size + c, but MAGE
    trained one of those rows, fake_class_label = 1100 = 1024 + 76, as its "no class" token, so ImageNet label
    76 would collide with it, and 1000 labels plus "no class" do not fit the 1000 spare rows. Labels therefore
    get their own table `class_emb` (num_classes x D, initialised N(0, .02) like the word embeddings), used at
    position 0 instead of the word embedding; NO_CLASS keeps word_embeddings[fake_class_label]. The released
    keys are untouched: an unconditional checkpoint loads with only class_emb.weight missing, and without
    labels (or with NO_CLASS) the model computes exactly what the unconditional model computes. The logits
    still span the whole vocabulary (the decoder projects onto word_embeddings), as in the release.

    MAGE-C: contrastive_head=(hidden_dim, out_dim, num_layers) adds `contrastive_head`, a
    util.contrastive.ProjectionHead on the pooled encoder output, used by forward(..., num_views=2). Like
    class_emb it is created last and only when asked for, so the other weights and keys stay MAGE's.
    """
    NO_CLASS = NO_CLASS

    def __init__(self, img_size=256, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=False,
                 mask_ratio_min=0.5, mask_ratio_max=1.0, mask_ratio_mu=0.55, mask_ratio_std=0.25,
                 vqgan_config="config/vqgan.yaml", vqgan_ckpt_path=None, dropout=0.1, drop_path=0.0,
                 class_cond=False, num_classes=1000, contrastive_head=None):
        super().__init__()
        if not 0.0 < mask_ratio_min <= mask_ratio_max <= 1.0:
            raise ValueError(f"need 0 < mask_ratio_min <= mask_ratio_max <= 1, got {mask_ratio_min}, {mask_ratio_max}")

        # Tokenizer: frozen, always in eval mode.
        self.vqgan, vqgan_settings = build_vqgan(vqgan_config, vqgan_ckpt_path)
        self.grid_size = token_grid_size(vqgan_settings)
        self.seq_len = self.grid_size ** 2
        self.vocab = TokenVocab(vqgan_settings["n_embed"])
        self.codebook_size = self.vocab.codebook_size
        self.fake_class_label = self.vocab.fake_class_label
        self.mask_token_label = self.vocab.mask_token_label
        self.token_emb = BertEmbeddings(self.vocab.size, embed_dim, self.seq_len + 1, dropout=dropout)

        self.mask_ratio_min = mask_ratio_min
        self.mask_ratio_generator = TruncatedNormal(mask_ratio_min, mask_ratio_max, mask_ratio_mu, mask_ratio_std)

        # Encoder. patch_embed, cls_token and pos_embed are unused by the forward pass but are part of the
        # released checkpoints; they are kept so those load strictly.
        self.patch_embed = PatchEmbed(self.grid_size * patch_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.seq_len + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([mage_block(embed_dim, num_heads, mlp_ratio, norm_layer, dropout, drop_path)
                                     for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # Decoder. mask_token, decoder_pos_embed and decoder_pred are likewise unused checkpoint entries.
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.seq_len + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + 1, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([
            mage_block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_layer, dropout, drop_path)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)

        self.mlm_layer = MlmLayer(decoder_embed_dim, embed_dim, self.vocab.size)
        self.criterion = nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)
        self.grad_checkpointing = False
        self.initialize_weights()

        # Created last, so the other weights are those of the unconditional model under the same seed; absent
        # without class_cond, so the released checkpoints and their key list stay as they are.
        self.class_cond = class_cond
        self.num_classes = num_classes if class_cond else 0
        if class_cond:
            if num_classes < 1:
                raise ValueError(f"a class-conditional MAGE needs num_classes >= 1, got {num_classes}")
            self.class_emb = nn.Embedding(num_classes, embed_dim)
            nn.init.normal_(self.class_emb.weight, std=0.02)
        # MAGE-C's projection head keeps torch's default Linear initialisation, as CAN's projector does.
        self.contrastive_head = None if contrastive_head is None else ProjectionHead(embed_dim, *contrastive_head)

    def initialize_weights(self):
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size, True)[None])
        self.decoder_pos_embed.data.copy_(
            get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid_size, True)[None])
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        for param in (self.cls_token, self.mask_token, self.decoder_pos_embed_learned):
            nn.init.normal_(param, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("vqgan") or name.startswith("token_emb"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.no_grad()
    def init_code_embeddings_from_codebook(self, seed=0, std=0.02):
        """Start the codebook rows of the word embeddings as the tokenizer's (centred) codes through a fixed
        random projection (seeded), scaled to std: codes close in the tokenizer start close in MAGE's input and in
        its output layer (which scores against these rows). The reference starts them at random."""
        codes = self.vqgan.quantize.embedding.weight.float()  # (K, e_dim)
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(codes.shape[1], self.token_emb.word_embeddings.embedding_dim, generator=generator)
        embeddings = (codes - codes.mean(dim=0)).cpu() @ projection  # (K, D)
        embeddings *= std / embeddings.std()
        weight = self.token_emb.word_embeddings.weight
        weight[:self.codebook_size] = embeddings.to(weight.device, weight.dtype)

    def train(self, mode=True):
        super().train(mode)
        self.vqgan.eval()
        return self

    def set_fused_attention(self, enabled):
        set_fused_attention(self, enabled)

    def set_grad_checkpointing(self, enable=True):
        """Recompute block activations in the backward pass: less memory, about one more forward of compute."""
        self.grad_checkpointing = enable

    def run_blocks(self, blocks, x):
        for block in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    @torch.no_grad()
    def tokenize(self, imgs):
        """imgs (B, 3, H, W) in [0, 1] -> token ids (B, seq_len), row-major over the grid."""
        _, _, (_, _, indices) = self.vqgan.encode(imgs)
        return indices.reshape(imgs.shape[0], -1).long()

    def sample_masks(self, bsz, device, generator=None, mask_rates=None):
        """Random positions per sample; one mask ratio per call drawn from `generator`, or the given
        mask_rates (B,) float64, one per row (pre-training draws one per group of rows, engine_pretrain).

        Returns float (token_drop_mask, token_all_mask), each (B, seq_len + 1) with the class column 0:
        the ceil(L * mask_ratio_min) lowest-noise positions are dropped, the ceil(L * r) lowest are masked.
        """
        if mask_rates is None:
            mask_rates = self.mask_ratio_generator.sample(1, generator=generator).expand(bsz)
        num_dropped = math.ceil(self.seq_len * self.mask_ratio_min)
        num_masked = (self.seq_len * mask_rates.double()).ceil().long().to(device).unsqueeze(1)  # (B, 1)
        noise_device = device if generator is None else generator.device
        noise = torch.rand(bsz, self.seq_len, generator=generator, device=noise_device).to(device)
        rank = noise.argsort(dim=1).argsort(dim=1)  # rank 0 = smallest noise; exact counts even with ties
        class_column = torch.zeros(bsz, 1, device=device)
        token_drop_mask = torch.cat([class_column, (rank < num_dropped).float()], dim=1)
        token_all_mask = torch.cat([class_column, (rank < num_masked).float()], dim=1)
        return token_drop_mask, token_all_mask

    def with_class_token(self, token_ids):
        """(B, L) token ids -> (B, L + 1) with the class id in front."""
        return self.vocab.with_class_token(token_ids)

    def class_embeddings(self, labels):
        """labels (B,) long in [0, num_classes) or NO_CLASS -> (B, D) embeddings of position 0, or None for
        labels=None (every row gets fake_class_label's word embedding through the usual path)."""
        if labels is None:
            return None
        if not self.class_cond:
            raise ValueError("labels were given to an unconditional MAGE (build it with class_cond=True)")
        labels = labels.long()
        own = self.class_emb(labels.clamp(min=0))  # (B, D)
        no_class = self.token_emb.word_embeddings.weight[self.fake_class_label].expand_as(own)
        return torch.where((labels >= 0).unsqueeze(1), own, no_class)

    def encode_tokens(self, token_indices, token_drop_mask=None, labels=None):
        """token_indices (B, L+1) incl. class id and mask ids -> encoder output (B, kept, D).
        labels (B,) replace the class id's embedding for a class-conditional model (see class_embeddings)."""
        x = self.token_emb(token_indices, self.class_embeddings(labels))  # (B, L+1, D)
        if token_drop_mask is not None:
            bsz, _, dim = x.shape
            x = x[(1 - token_drop_mask).nonzero(as_tuple=True)].reshape(bsz, -1, dim)  # (B, kept, D)
        return self.norm(self.run_blocks(self.blocks, x))

    def forward_encoder(self, imgs, gt_indices=None, masks=None, generator=None, labels=None):
        """labels: (B,) class labels or NO_CLASS (class-conditional models only).
        Returns (encoder output (B, kept, D), gt_indices (B, L), token_drop_mask, token_all_mask)."""
        if gt_indices is None:
            gt_indices = self.tokenize(imgs)
        bsz = gt_indices.shape[0]
        if masks is None:
            masks = self.sample_masks(bsz, gt_indices.device, generator)
        token_drop_mask, token_all_mask = masks
        token_indices = self.with_class_token(gt_indices)
        token_indices = token_indices.masked_fill(token_all_mask.bool(), self.mask_token_label)
        x = self.encode_tokens(token_indices, token_drop_mask, labels)
        return x, gt_indices, token_drop_mask, token_all_mask

    def forward_decoder(self, x, token_drop_mask, token_all_mask):
        # x: (B, kept, D); masks: (B, L+1) -> logits (B, L+1, vocab)
        x = self.decoder_embed(x)  # (B, kept, D_dec)
        bsz, seq_len = token_all_mask.shape
        # Every position starts as the embedded class-token output; kept outputs go back to their positions;
        # every masked position (dropped or not) is then reset to that padding vector.
        padding = x[:, :1].expand(bsz, seq_len, x.shape[-1])
        x_full = padding.clone()
        x_full[(1 - token_drop_mask).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[-1]).to(x_full.dtype)
        x_full = torch.where(token_all_mask.unsqueeze(-1).bool(), padding, x_full)
        x = self.decoder_norm(self.run_blocks(self.decoder_blocks, x_full + self.decoder_pos_embed_learned))
        return self.mlm_layer(x, self.token_emb.word_embeddings.weight.detach())

    def forward_loss(self, gt_indices, logits, mask, row_weights=None):
        """Label-smoothed cross-entropy over the codebook at the masked positions: their mean, or with
        row_weights (B,) the weighted sum of each row's summed loss (pre-training weighs its mask-ratio groups
        equally, engine_pretrain.group_loss_weights)."""
        bsz, seq_len = gt_indices.shape
        logits = logits[:, 1:, :self.codebook_size].reshape(bsz * seq_len, -1).float()
        loss = self.criterion(logits, gt_indices.reshape(-1)).reshape(bsz, seq_len)
        mask = mask[:, 1:]
        if row_weights is None:
            return (loss * mask).sum() / mask.sum()
        return ((loss * mask).sum(1) * row_weights).sum()

    def forward(self, imgs, gt_indices=None, masks=None, generator=None, labels=None, loss_weights=None,
                num_views=1):
        """-> (reconstruction loss, imgs, token_all_mask).

        loss_weights (B,): forward_loss's row weights (pre-training's mask-ratio groups); None: the masked mean.
        num_views=2 (MAGE-C, needs contrastive_head): the batch holds two views of the same B images, view-major
        (rows [0, B) view 1, [B, 2B) view 2, each with its own masks and loss weights). The loss is the mean of
        the two views' reconstruction losses, and a fourth entry is added: the head's embeddings (2B, out_dim) of
        the pooled encoder outputs (util.contrastive.pooled_features: the encoder's output on the masked input,
        class position excluded), for util.contrastive.info_nce. Both views go through one encoder/decoder pass
        and one head call, so the head's BatchNorm normalises over all 2B rows.
        """
        latent, gt_indices, token_drop_mask, token_all_mask = self.forward_encoder(
            imgs, gt_indices=gt_indices, masks=masks, generator=generator, labels=labels)
        logits = self.forward_decoder(latent, token_drop_mask, token_all_mask)
        if num_views == 1:
            loss = self.forward_loss(gt_indices, logits, token_all_mask, loss_weights)
            return loss, imgs, token_all_mask
        if num_views != 2 or self.contrastive_head is None:
            raise ValueError(f"num_views={num_views}: only 2 views, with a contrastive head, are supported")
        weights = (None, None) if loss_weights is None else loss_weights.chunk(2)
        views = zip(gt_indices.chunk(2), logits.chunk(2), token_all_mask.chunk(2), weights)
        loss = torch.stack([self.forward_loss(*view) for view in views]).mean()
        embeddings = self.contrastive_head(pooled_features(latent))
        return loss, imgs, token_all_mask, embeddings

    def predict_logits(self, token_ids, labels=None):
        """Generation step: token_ids (B, L) with mask ids at unknown positions, optional labels (B,) (class or
        NO_CLASS; class-conditional models) -> codebook logits (B, L, K)."""
        token_indices = self.with_class_token(token_ids)
        token_all_mask = (token_indices == self.mask_token_label).float()
        x = self.encode_tokens(token_indices, labels=labels)
        logits = self.forward_decoder(x, torch.zeros_like(token_all_mask), token_all_mask)
        return logits[:, 1:, :self.codebook_size]


def _mage(embed_dim, depth, num_heads, **kwargs):
    kwargs.setdefault("decoder_embed_dim", embed_dim)
    kwargs.setdefault("decoder_depth", 8)
    kwargs.setdefault("decoder_num_heads", 16)
    return MaskedGenerativeEncoderViT(patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                      mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def mage_vit_base_patch16(**kwargs):
    return _mage(768, 12, 12, **kwargs)


def mage_vit_large_patch16(**kwargs):
    return _mage(1024, 24, 16, **kwargs)


def mage_vit_tiny_patch16(**kwargs):
    """CPU preset: the configuration of tests/data/mage_tiny_golden.pt."""
    kwargs.setdefault("vqgan_config", "config/vqgan_tiny.yaml")
    kwargs.setdefault("decoder_depth", 2)
    kwargs.setdefault("decoder_num_heads", 4)
    return _mage(64, 2, 4, **kwargs)


def mage_vit_demo(**kwargs):
    """Preset of the built-in demo (demo.py): a small ViT over config/vqgan_demo.yaml's tokens."""
    kwargs.setdefault("vqgan_config", "config/vqgan_demo.yaml")
    kwargs.setdefault("decoder_depth", 2)
    kwargs.setdefault("decoder_num_heads", 4)
    return _mage(128, 6, 4, **kwargs)


MODELS = {
    "mage_vit_base_patch16": mage_vit_base_patch16,
    "mage_vit_large_patch16": mage_vit_large_patch16,
    "mage_vit_tiny_patch16": mage_vit_tiny_patch16,
    "mage_vit_demo": mage_vit_demo,
}

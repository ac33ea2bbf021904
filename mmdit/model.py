"""The MM-DiT of Stable Diffusion 3 / 3.5: two token streams with separate weights and one joint attention.

Attribute names equal Stability's checkpoint keys (x_embedder, joint_blocks.i.context_block.attn.qkv, ...), so a
Stability single file loads by stripping its prefix; `mmdit.checkpoint` maps the diffusers layout onto these names.
Exact behaviour, pitfalls included, follows shared/docs/sd3-reference.md sections 1 and 6.

Shapes: B batch, h hidden, H/W latent height/width, Lx = (H/p)(W/p) image tokens, Lc text tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmdit.config import MMDiTConfig

NORM_EPS = 1e-6  # every LayerNorm and RMSNorm of the DiT uses 1e-6 (CLIP's 1e-5 must not leak in here)


def modulate(z: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: z * (1 + scale) + shift, per sample. One fused kernel instead of three element-wise passes."""
    return torch.addcmul(shift.unsqueeze(1), z, 1 + scale.unsqueeze(1))


def gated_residual(z: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """z + gate * update, per sample, as one kernel."""
    return torch.addcmul(z, gate.unsqueeze(1), update)


def layer_norm(z: torch.Tensor) -> torch.Tensor:
    """The DiT's LayerNorm: no affine parameters (adaLN supplies them)."""
    return F.layer_norm(z, z.shape[-1:], eps=NORM_EPS)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] sinusoidal embedding of t (B,) -> (B, dim), always in fp32 (t = sigma * 1000 needs the precision)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_position_table(grid_size: int, dim: int, base_size: int = 64) -> torch.Tensor:
    """2-D sin-cos table (1, grid_size**2, dim) for training from scratch; released checkpoints store their own.

    Coordinates are arange(grid) * base_size / grid_size, as diffusers initialises SD3's table, so the centre
    crop for a base_size x base_size token grid spans one unit per token.
    """
    if dim % 4:
        raise ValueError(f"hidden size must be divisible by 4 for a 2-D sin-cos table, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64) * (base_size / grid_size)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed_1d(pos):  # (N,) -> (N, dim/2) as [sin | cos]
        args = pos[:, None] * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    # The first half of the channels encodes the column (w) coordinate, the second half the row (h), as SAI does.
    table = torch.cat([embed_1d(cols.reshape(-1)), embed_1d(rows.reshape(-1))], dim=1)
    return table.float().unsqueeze(0)


class RMSNorm(nn.Module):
    """Per-head QK normalisation over the head dimension, weights shared across heads (SD3.5)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as diffusers does; in low precision the mean of squares loses too much.
        return F.rms_norm(z.float(), z.shape[-1:], eps=NORM_EPS).to(z.dtype) * self.weight.to(z.dtype)


class Attention(nn.Module):
    """Fused qkv projection (+ optional per-head QK RMSNorm) and the output projection of one stream."""

    def __init__(self, config: MMDiTConfig, pre_only: bool = False):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(h, 3 * h)
        if config.qk_norm:
            self.ln_q = RMSNorm(config.head_dim)
            self.ln_k = RMSNorm(config.head_dim)
        self.proj = None if pre_only else nn.Linear(h, h)

    def qkv_heads(self, z: torch.Tensor, need_q: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(B, L, h) -> q, k, v each (B, L, heads, head_dim); q is None when need_q is False (saves a third)."""
        B, L, _ = z.shape
        if need_q or not isinstance(self.qkv, nn.Linear):   # an adapted qkv (LoRA) is called whole
            q, k, v = self.qkv(z).view(B, L, 3, self.num_heads, -1).unbind(2)
            q = q if need_q else None
        else:
            h = self.qkv.in_features
            kv = F.linear(z, self.qkv.weight[h:], self.qkv.bias[h:])
            q, (k, v) = None, kv.view(B, L, 2, self.num_heads, -1).unbind(2)
        if hasattr(self, "ln_q"):
            q = self.ln_q(q) if q is not None else None
            k = self.ln_k(k)
        return q, k, v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA over (B, L, heads, head_dim) inputs; returns (B, Lq, heads * head_dim). No mask, no causality."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def joint_attention(x_qkv, context_qkv) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One attention over the concatenated [image; text] tokens, split back per stream.

    A missing text query (the pre-only last block, whose text output is discarded) drops the text rows of the
    attention matrix instead of computing and throwing them away.
    """
    (xq, xk, xv), (cq, ck, cv) = x_qkv, context_qkv
    Lx = xq.shape[1]
    k = torch.cat([xk, ck], dim=1)
    v = torch.cat([xv, cv], dim=1)
    if cq is None:
        return attention(xq, k, v), None
    out = attention(torch.cat([xq, cq], dim=1), k, v)
    return out[:, :Lx], out[:, Lx:]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(z), approximate="tanh"))


class StreamBlock(nn.Module):
    """One stream (image or text) of a joint block.

    adaLN chunks, in checkpoint order: shift/scale/gate for attention, shift/scale/gate for the MLP, and for
    MMDiT-X blocks shift/scale/gate for the extra self-attention (9 chunks). A pre-only stream (the text stream of
    the last block) has only shift/scale and no output projection or MLP.
    """

    def __init__(self, config: MMDiTConfig, pre_only: bool = False, self_attn: bool = False):
        super().__init__()
        h = config.hidden_size
        self.pre_only, self.self_attn = pre_only, self_attn
        self.num_chunks = 2 if pre_only else 9 if self_attn else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, self.num_chunks * h))
        self.attn = Attention(config, pre_only=pre_only)
        if self_attn:
            self.attn2 = Attention(config)
        if not pre_only:
            self.mlp = Mlp(h, config.mlp_hidden)

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.adaLN_modulation(c).chunk(self.num_chunks, dim=1)

    def post_attention(self, z, z_normed, attn_out, mod):
        """Residual updates after the joint attention: attention output, MMDiT-X self-attention, then MLP."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        z = gated_residual(z, gate_msa, self.attn.proj(attn_out))
        if self.self_attn:
            shift_msa2, scale_msa2, gate_msa2 = mod[6:]
            # The extra self-attention reads the same normalised input as the joint attention, modulated anew.
            out2 = attention(*self.attn2.qkv_heads(modulate(z_normed, shift_msa2, scale_msa2)))
            z = gated_residual(z, gate_msa2, self.attn2.proj(out2))
        return gated_residual(z, gate_mlp, self.mlp(modulate(layer_norm(z), shift_mlp, scale_mlp)))


class JointBlock(nn.Module):
    """Image and text streams with separate weights, joined only inside one attention."""

    def __init__(self, config: MMDiTConfig, index: int):
        super().__init__()
        last = index == config.depth - 1
        self.context_block = StreamBlock(config, pre_only=last)
        self.x_block = StreamBlock(config, self_attn=index in config.x_self_attn_layers)

    def forward(self, x: torch.Tensor, context: torch.Tensor, c: torch.Tensor):
        """x: image tokens, context: text tokens, c: the conditioning vector (timestep + pooled text)."""
        # 1. adaLN parameters from the conditioning vector, one set per stream
        x_mod = self.x_block.modulation(c)
        context_mod = self.context_block.modulation(c)

        # 2. normalise, modulate and project both streams to per-head q, k, v
        x_normed, context_normed = layer_norm(x), layer_norm(context)
        x_qkv = self.x_block.attn.qkv_heads(modulate(x_normed, x_mod[0], x_mod[1]))
        context_qkv = self.context_block.attn.qkv_heads(modulate(context_normed, context_mod[0], context_mod[1]),
                                                        need_q=not self.context_block.pre_only)

        # 3. one attention over both streams
        x_attn, context_attn = joint_attention(x_qkv, context_qkv)

        # 4. per-stream residual updates; the last block's text stream ends here
        x = self.x_block.post_attention(x, x_normed, x_attn, x_mod)
        if not self.context_block.pre_only:
            context = self.context_block.post_attention(context, context_normed, context_attn, context_mod)
        return x, context


class PatchEmbed(nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h, H/p, W/p) -> (B, Lx, h), row-major


class MlpEmbedder(nn.Module):
    """Linear -> SiLU -> Linear; the timestep and pooled-text embedders (keys mlp.0 and mlp.2)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(z)


class FinalLayer(nn.Module):
    """adaLN (shift, scale: Stability's order) then a linear map to p*p*C values per token."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        h, p = config.hidden_size, config.patch_size
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))
        self.linear = nn.Linear(h, p * p * config.out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(layer_norm(x), shift, scale))


class MMDiT(nn.Module):
    """SD3 / SD3.5 MM-DiT. `model(x, sigma, context, pooled)` returns the velocity noise - x0, shaped like x."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = config
        h, P = config.hidden_size, config.pos_embed_max_size
        self.x_embedder = PatchEmbed(config)
        self.t_embedder = MlpEmbedder(config.frequency_dim, h)
        self.y_embedder = MlpEmbedder(config.pooled_dim, h)
        self.context_embedder = nn.Linear(config.context_dim, h)
        # A buffer stored in every checkpoint: released models carry their own table, so it is loaded, not rebuilt.
        self.register_buffer("pos_embed", torch.zeros(1, P * P, h))
        self.joint_blocks = nn.ModuleList(JointBlock(config, i) for i in range(config.depth))
        self.final_layer = FinalLayer(config)
        self.activation_checkpointing = False  # recompute each block in backward: less memory, ~1/3 more compute
        self.init_weights()
        # The last text stream's query is dead weight (its output is discarded, so the query is never computed).
        # Its norm weight is kept for strict loading but frozen, so data-parallel wrappers see no unused parameter.
        last = self.joint_blocks[-1].context_block.attn
        if config.qk_norm:
            last.ln_q.weight.requires_grad_(False)

    @torch.no_grad()
    def init_weights(self):
        """adaLN-Zero initialisation for training from scratch, all in one place (after DiT)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # The patch embedding is a linear map of flattened patches: initialise it like one.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for embedder in (self.t_embedder, self.y_embedder):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        # Zero every modulation and the output layer: each block starts as the identity and the model outputs 0.
        for block in self.joint_blocks:
            for stream in (block.x_block, block.context_block):
                nn.init.zeros_(stream.adaLN_modulation[1].weight)
                nn.init.zeros_(stream.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        P = self.config.pos_embed_max_size
        self.pos_embed.copy_(sincos_position_table(P, self.config.hidden_size))

    def check_inputs(self, x, sigma, context, pooled):
        """Shape checks with one-line messages; no data is read, so this costs no device sync."""
        cfg = self.config
        p, P = cfg.patch_size, cfg.pos_embed_max_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"latent must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"latent height and width must be multiples of the patch size {p} "
                             f"(image sides multiples of {8 * p} for SD3's VAE), got {H}x{W}")
        if H // p > P or W // p > P:
            raise ValueError(f"latent {H}x{W} exceeds this model's {P}x{P} position table "
                             f"(latent sides up to {P * p}, images up to {P * p * 8} px)")
        B = x.shape[0]
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must be (B={B}, L, {cfg.context_dim}), got {tuple(context.shape)}")
        if pooled.shape != (B, cfg.pooled_dim):
            raise ValueError(f"pooled must be (B={B}, {cfg.pooled_dim}), got {tuple(pooled.shape)}")
        if sigma.shape not in ((B,), ()):
            raise ValueError(f"sigma must be (B={B},) or a scalar, got {tuple(sigma.shape)}")

    def cropped_pos_embed(self, hp: int, wp: int) -> torch.Tensor:
        """The centre hp x wp window of the stored table, flattened row-major: (1, hp * wp, h)."""
        P = self.config.pos_embed_max_size
        top, left = (P - hp) // 2, (P - wp) // 2
        table = self.pos_embed.view(1, P, P, -1)
        return table[:, top:top + hp, left:left + wp].reshape(1, hp * wp, -1)

    def unpatchify(self, x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        """(B, hp * wp, p * p * C) -> (B, C, hp * p, wp * p); each token holds (row, col, channel), channel fastest."""
        p, C = self.config.patch_size, self.config.out_channels
        x = x.view(x.shape[0], hp, wp, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, hp * p, wp * p)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                skip_layers: tuple[int, ...] = ()) -> torch.Tensor:
        """x (B, C, H, W) noisy latent, sigma (B,) in [0, 1], context (B, Lc, context_dim), pooled (B, pooled_dim).

        skip_layers: joint blocks to bypass entirely (both streams unchanged), for skip-layer guidance.
        """
        self.check_inputs(x, sigma, context, pooled)
        p = self.config.patch_size
        hp, wp = x.shape[-2] // p, x.shape[-1] // p
        dtype = self.context_embedder.weight.dtype

        t_freq = timestep_embedding((sigma * 1000).expand(x.shape[0]), self.config.frequency_dim)
        c = self.t_embedder(t_freq.to(dtype)) + self.y_embedder(pooled)           # (B, h)
        x = self.x_embedder(x)                                                      # (B, Lx, h)
        # Under autocast the patches come out in low precision; keep the image stream in that dtype as diffusers
        # does (the text stream is in it already), rather than promoting it to fp32 through the table.
        x = (x + self.cropped_pos_embed(hp, wp)).to(x.dtype)
        context = self.context_embedder(context)                                    # (B, Lc, h)

        for i, block in enumerate(self.joint_blocks):
            if i in skip_layers:
                continue
            if self.activation_checkpointing and torch.is_grad_enabled():
                x, context = checkpoint(block, x, context, c, use_reentrant=False)
            else:
                x, context = block(x, context, c)

        return self.unpatchify(self.final_layer(x, c), hp, wp)                      # (B, C, H, W)


def forward_flops(config: MMDiTConfig, image_tokens: int, text_tokens: int) -> dict[str, int]:
    """Matmul FLOPs (2 per multiply-add) of one sample's forward pass, as this implementation computes it.

    "embed": the layers that read the inputs (patch, context, timestep and pooled embedders), whose backward needs
    only weight gradients; "linear": every other weight matmul; "attention": QK^T and PV. A training step costs
    2 * embed + 3 * (linear + attention), recomputation not counted.
    """
    h, m = config.hidden_size, config.mlp_hidden
    p2c = config.patch_size ** 2 * config.in_channels
    Lx, Lc = image_tokens, text_tokens
    embed = Lx * p2c * h + Lc * config.context_dim * h + (config.frequency_dim + config.pooled_dim) * h
    linear = 2 * h * h                                      # second layers of the timestep and pooled embedders
    attn = 0
    stream = lambda L: L * (4 * h * h + 2 * h * m)          # qkv, proj, fc1, fc2
    for i in range(config.depth):
        last, extra = i == config.depth - 1, i in config.x_self_attn_layers
        linear += stream(Lx) + (9 if extra else 6) * h * h + (2 if last else 6) * h * h   # + adaLN of both
        if last:   # text keys and values only; image queries only
            linear += Lc * 2 * h * h
            attn += 2 * Lx * (Lx + Lc) * h
        else:
            linear += stream(Lc)
            attn += 2 * (Lx + Lc) ** 2 * h
        if extra:
            linear += Lx * 4 * h * h
            attn += 2 * Lx * Lx * h
    linear += 2 * h * h + Lx * h * p2c                      # final adaLN and linear
    return {"embed": 2 * embed, "linear": 2 * linear, "attention": 2 * attn}


def train_step_flops(config: MMDiTConfig, batch: int, image_tokens: int, text_tokens: int) -> int:
    """Forward + backward matmul FLOPs of one training step (no recomputation counted)."""
    f = forward_flops(config, image_tokens, text_tokens)
    return batch * (2 * f["embed"] + 3 * (f["linear"] + f["attention"]))

"""Ulysses sequence parallelism: one sample's spacetime tokens split over the ranks of an sp group.

Applied from outside to an unmodified DiT with hooks: the patch embedding's output is cut into
equal, contiguous token chunks (whole latent frames, so per-frame conditioning stays aligned),
every block and the final layer get the matching slice of the rotary table and per-frame
conditioning, and the final layer's output chunks are gathered back. Inside self-attention an
all-to-all trades the token split for a head split, so each rank attends over the whole sequence
with 1/sp of the heads, then trades back. Cross-attention and the MLP work on local tokens
alone.

Every rank of the group computes the same loss on the gathered output; the gather's backward hands
each rank the gradient of its own chunk, so a rank's parameter gradients are its tokens' share and
they sum to the full gradient over the group (the data-parallel reduction takes care of that).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.attention import attention


class _AllToAll(torch.autograd.Function):
    """Split `x` along scatter_dim over the group, concatenate what arrives along gather_dim."""

    @staticmethod
    def forward(ctx, x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def _all_to_all(x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
    inputs = [chunk.contiguous() for chunk in x.chunk(dist.get_world_size(group), scatter_dim)]
    outputs = [torch.empty_like(chunk) for chunk in inputs]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _GatherTokens(torch.autograd.Function):
    """All-gather token chunks (dim 1); the backward keeps this rank's chunk of the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        chunks = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(chunks, x.contiguous(), group=group)
        return torch.cat(chunks, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rank, size = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(size, dim=1)[rank].contiguous(), None


class UlyssesAttention:
    """`attention` over the whole sequence for local tokens (B, N/sp, H, D)."""

    def __init__(self, group):
        self.group = group

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        if key_mask is not None:
            raise ValueError("sequence-parallel self-attention takes no key mask")
        # (B, N/sp, H, D) -> (B, N, H/sp, D): scatter heads, gather tokens.
        q, k, v = (_AllToAll.apply(x, self.group, 2, 1) for x in (q, k, v))
        out = attention(q, k, v)
        return _AllToAll.apply(out, self.group, 1, 2)


def apply_sequence_parallel(model: nn.Module, group) -> None:
    """Split the DiT's tokens over `group` (Ulysses); call before FSDP/DDP wrap the model."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)

    def local_chunk(x: Tensor, what: str, dim: int = 1) -> Tensor:
        if x.shape[dim] % size:
            raise ValueError(
                f"sequence parallelism over {size} ranks needs the {what} ({x.shape[dim]}) to be "
                f"divisible by {size}; choose latent shapes (buckets) that split evenly"
            )
        return x.chunk(size, dim)[rank]

    def shard_tokens(module, args, output: Tensor) -> Tensor:
        return local_chunk(output, "number of spacetime tokens")

    def local_cond(cond: Tensor) -> Tensor:
        if cond.shape[1] == 1:
            return cond
        return local_chunk(cond, "number of token frames")  # per-frame: whole local frames

    def shard_block_inputs(module, args):
        x, cond, context, context_mask, (cos, sin) = args
        rope = (local_chunk(cos, "rope table", 0), local_chunk(sin, "rope table", 0))
        return x, local_cond(cond), context, context_mask, rope

    def shard_final_inputs(module, args):
        x, cond = args
        return x, local_cond(cond)

    def gather_tokens(module, args, output: Tensor) -> Tensor:
        return _GatherTokens.apply(output, group)

    model.patch_embed.register_forward_hook(shard_tokens)
    for block in model.blocks:
        block.register_forward_pre_hook(shard_block_inputs)
        block.self_attn.attend = UlyssesAttention(group)
    # The final layer runs on local tokens too: every parameter then sees only this rank's
    # tokens, and the gathered output is what all ranks share.
    model.final_layer.register_forward_pre_hook(shard_final_inputs)
    model.final_layer.register_forward_hook(gather_tokens)

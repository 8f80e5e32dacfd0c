"""Sequence and context parallelism: a sample's or a pack's tokens split over a sequence group.

Applied from outside to an unmodified DiT with hooks: the patch embedding's output is cut into
equal, contiguous token chunks (whole latent frames, so per-frame conditioning stays aligned),
every block and the final layer get the matching slice of the token layout (the rotary table)
and of the per-frame conditioning, and the final layer's output chunks are gathered back.
Cross-attention and the MLP work on local tokens alone. Self-attention sees the whole sequence
through `sequence_attention`, as configured:

- Ulysses (sp): an all-to-all trades the token split for a head split, so each rank attends over
  the whole sequence with 1/sp of the heads, then trades back. Its degree is capped by the heads.
- Ring attention (cp, ring.py): key/value chunks travel round the ring. Its degree is not capped.
- Both (USP): the tokens split over cp x sp ranks, sp innermost; Ulysses gathers an sp group's
  chunks (one contiguous cp chunk) with 1/sp of the heads, and the ring runs across sp groups.

A packed sequence (several samples, model/dit.py) splits the same way, anywhere: a sample may
straddle chunks. Each rank keeps its chunk of the layout (each token's adaLN row, rotary table,
its samples' local token counts for cross-attention) and all the adaLN rows; self-attention keeps
the whole sequence's segments, since it sees the whole sequence.

Every rank of the group computes the same loss on the gathered output; the gather's backward hands
each rank the gradient of its own chunk, so a rank's parameter gradients are its tokens' share and
they sum to the full gradient over the group (the data-parallel reduction takes care of that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.attention import Segments, attention
from model.dit import TokenLayout
from train.parallel.ring import RingAttention


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


class _Gather(torch.autograd.Function):
    """All-gather chunks along `dim`. Its backward hands this rank its chunk of the gradient:
    as it is where every rank computed the same thing from the whole (the gathered output and its
    loss), or summed over the ranks first (`summed`) where each rank used the whole for its own
    share of the work further on (the caption's heads of a joint attention)."""

    @staticmethod
    def forward(ctx, x: Tensor, group, dim: int, summed: bool) -> Tensor:
        ctx.group, ctx.dim, ctx.summed = group, dim, summed
        chunks = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(chunks, x.contiguous(), group=group)
        return torch.cat(chunks, dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        if ctx.summed:
            dist.all_reduce(grad, group=ctx.group)
        rank, size = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(size, dim=ctx.dim)[rank].contiguous(), None, None, None


class UlyssesAttention:
    """`attention` over the whole sequence for local tokens (B, N/sp, H, D); `inner` attends the
    gathered tokens (B, N, H/sp, D): plain attention, or a ring when they are one cp chunk."""

    def __init__(self, group, inner: Callable[..., Tensor] = attention):
        self.group, self.inner = group, inner

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_mask: Tensor | None = None,
        segments: Segments | None = None,
    ) -> Tensor:
        if key_mask is not None:
            raise ValueError("sequence-parallel self-attention takes no key mask")
        # (B, N/sp, H, D) -> (B, N, H/sp, D): scatter heads, gather tokens.
        q, k, v = (_AllToAll.apply(x, self.group, 2, 1) for x in (q, k, v))
        out = self.inner(q, k, v, segments=segments)
        return _AllToAll.apply(out, self.group, 1, 2)


def sequence_attention(sp_group, cp_group) -> Callable[..., Tensor]:
    """Self-attention over the whole sequence for local tokens, with the sp and/or cp groups
    (None where the degree is 1)."""
    ring = RingAttention(cp_group) if cp_group is not None else attention
    return UlyssesAttention(sp_group, ring) if sp_group is not None else ring


def apply_sequence_parallel(model: nn.Module, group, attend: Callable[..., Tensor]) -> None:
    """Split the DiT's tokens over `group` (its cp x sp ranks, sp innermost), with `attend`
    (`sequence_attention`) as self-attention; call before FSDP/DDP wrap the model."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)

    def local_chunk(x: Tensor, what: str, dim: int = 1) -> Tensor:
        if x.shape[dim] % size:
            raise ValueError(
                f"sequence parallelism over {size} ranks needs the {what} ({x.shape[dim]}) to be "
                f"divisible by {size}; choose latent shapes (buckets) that split evenly, and for "
                f"packed sequences a sequence_length (packing.sequence_tokens) divisible by {size}"
            )
        return x.chunk(size, dim)[rank]

    def shard_tokens(module, args, output: Tensor) -> Tensor:
        return local_chunk(output, "number of spacetime tokens")

    def local_cond(cond: Tensor, layout: TokenLayout) -> Tensor:
        # A packed sequence's rows are gathered by its local tokens' row index: keep them all.
        if layout.rows is not None or cond.shape[1] == 1:
            return cond
        return local_chunk(cond, "number of token frames")  # per-frame: whole local frames

    def local_layout(layout: TokenLayout) -> TokenLayout:
        chunk = len(layout.rope[0]) // size  # the tokens were checked to split evenly
        return layout.tokens(rank * chunk, (rank + 1) * chunk)

    def shard_block_inputs(module, args):
        x, cond, context, context_mask, layout = args
        if len(layout.rope[0]) == x.shape[1]:
            # Split already: activation checkpointing recomputes the block by calling it again
            # with the inputs this hook gave it.
            return None
        return x, local_cond(cond, layout), context, context_mask, local_layout(layout)

    def shard_final_inputs(module, args):
        x, cond, layout = args
        return x, local_cond(cond, layout), local_layout(layout)

    def gather_tokens(module, args, output: Tensor) -> Tensor:
        return _Gather.apply(output, group, 1, False)

    model.patch_embed.register_forward_hook(shard_tokens)
    for block in model.blocks:
        block.register_forward_pre_hook(shard_block_inputs)
        block.self_attn.attend = attend
    # The final layer runs on local tokens too: every parameter then sees only this rank's
    # tokens, and the gathered output is what all ranks share.
    model.final_layer.register_forward_pre_hook(shard_final_inputs)
    model.final_layer.register_forward_hook(gather_tokens)


class SplitSelfAttention:
    """The attention processor of a pretrained block's self-attention (attn1) with its tokens
    split: the family's own projections, norms across heads and rotary embedding on local tokens
    (`project`), the attention itself over the whole sequence (`attend`: Ulysses, the ring, or
    both)."""

    def __init__(
        self,
        attend: Callable[..., Tensor],
        project: Callable[[nn.Module, Tensor, tuple[Tensor, Tensor]], tuple[Tensor, ...]],
    ):
        self.attend, self.project = attend, project

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SplitSelfAttention serves self-attention without a mask")
        query, key, value = self.project(attn, hidden_states, rotary)
        out = self.attend(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_projections(attn: nn.Module, x: Tensor, rotary: tuple[Tensor, Tensor]):
    """WanAttnProcessor's (B, N, H, D) query, key and value: RMS norms across heads, then Wan's
    pairwise rotary embedding."""
    query = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))
    value = attn.to_v(x).unflatten(2, (attn.heads, -1))
    return _rotate_pairs(query, *rotary), _rotate_pairs(key, *rotary), value


def _rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's rotary embedding: dims (2i, 2i + 1) rotate as a pair; cos and sin hold each angle
    twice, once per dim of its pair."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def _ltx_projections(attn: nn.Module, x: Tensor, rotary: tuple[Tensor, Tensor]):
    """LTXVideoAttnProcessor's: RMS norms across heads and LTX's rotary embedding, applied before
    the heads are split out."""
    from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

    query = apply_rotary_emb(attn.norm_q(attn.to_q(x)), rotary)
    key = apply_rotary_emb(attn.norm_k(attn.to_k(x)), rotary)
    return tuple(t.unflatten(2, (attn.heads, -1)) for t in (query, key, attn.to_v(x)))


class SplitJointAttention:
    """A joint attention over the caption and the video (HunyuanVideo's double- and single-stream
    processors, CogVideoX's) with the video's tokens split over a Ulysses group and the caption's
    on every rank: each rank attends the whole video and the whole caption with its share of the
    heads (the caption's padding masked where the model masks it), the video's outputs go back
    by all-to-all and the caption's are gathered by head. The caption's own output projection
    applies to it where there is one, else the shared one (CogVideoX's)."""

    def __init__(self, group):
        self.group = group

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        video, text = self._projections(attn, hidden_states, encoder_hidden_states)
        if image_rotary_emb is not None:
            video[:2] = [apply_rotary_emb(x, image_rotary_emb, sequence_dim=1) for x in video[:2]]
        rank, size = dist.get_rank(self.group), dist.get_world_size(self.group)
        video = [_AllToAll.apply(x, self.group, 2, 1) for x in video]  # (B, N, H/sp, D)
        text = [x.chunk(size, dim=2)[rank] for x in text]  # (B, L, H/sp, D)
        frames, length = video[0].shape[1], text[0].shape[1]
        key_mask = None
        if attention_mask is not None:  # (B, 1, 1, local video + caption), the caption's last
            caption_mask = attention_mask[:, 0, 0, -length:]
            key_mask = torch.cat(
                [caption_mask.new_ones(len(caption_mask), frames), caption_mask], 1
            )
        joint = [torch.cat(pair, dim=1) for pair in zip(video, text, strict=True)]
        out = attention(*joint, key_mask=key_mask)
        video_out, text_out = out.split([frames, length], dim=1)
        video_out = _AllToAll.apply(video_out, self.group, 1, 2).flatten(2, 3).type_as(out)
        text_out = _Gather.apply(text_out, self.group, 2, True).flatten(2, 3).type_as(out)
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        elif getattr(attn, "to_out", None) is not None:
            text_out = attn.to_out[1](attn.to_out[0](text_out))
        return video_out, text_out

    @staticmethod
    def _projections(attn: nn.Module, video: Tensor, text: Tensor):
        """(query, key, value) of the video's and of the caption's tokens, (B, N, H, D) each:
        one projection for both (single-stream) or the caption's own (double-stream)."""

        def heads(x: Tensor) -> Tensor:
            return x.unflatten(2, (attn.heads, -1))

        if attn.add_q_proj is None:
            joint = torch.cat([video, text], dim=1)
            q, k, v = heads(attn.to_q(joint)), heads(attn.to_k(joint)), heads(attn.to_v(joint))
            q, k = attn.norm_q(q), attn.norm_k(k)
            pairs = [x.split([video.shape[1], text.shape[1]], dim=1) for x in (q, k, v)]
            return [pair[0] for pair in pairs], [pair[1] for pair in pairs]
        q, k, v = heads(attn.to_q(video)), heads(attn.to_k(video)), heads(attn.to_v(video))
        text_q, text_k = heads(attn.add_q_proj(text)), heads(attn.add_k_proj(text))
        text_v = heads(attn.add_v_proj(text))
        return (
            [attn.norm_q(q), attn.norm_k(k), v],
            [attn.norm_added_q(text_q), attn.norm_added_k(text_k), text_v],
        )


@dataclass(frozen=True)
class TokenSplit:
    """Where a family's tokens split: the cut diffusers' own context-parallel plans make."""

    blocks: tuple[str, ...]  # the block lists whose self-attention is replaced
    attention: str  # the attribute of a block that holds its self-attention
    # Where the tokens first exist whole: "input" (the call's hidden_states), "first_block" (the
    # first block's input) or the name of the module whose output they are (after the caption's
    # tokens when `caption_first`).
    tokens: str
    # The rotary table: the module that makes it, or the call's argument that brings it; and the
    # dimension of its tokens.
    rope: str
    rope_tokens_dim: int
    processor: Callable[[Callable[..., Tensor], object], object]  # (attend, group) -> processor
    caption_first: bool = False


# model/pretrained.py `Family.sequence_split` -> how that family's tokens split
PRETRAINED_SPLITS = {
    "wan": TokenSplit(("blocks",), "attn1", "first_block", "rope", 1,
                      lambda attend, group: SplitSelfAttention(attend, _wan_projections)),
    "ltx": TokenSplit(("transformer_blocks",), "attn1", "input", "rope", 1,
                      lambda attend, group: SplitSelfAttention(attend, _ltx_projections)),
    "hunyuan": TokenSplit(("transformer_blocks", "single_transformer_blocks"), "attn",
                          "x_embedder", "rope", 0, lambda attend, group: SplitJointAttention(group)),
    "cogvideox": TokenSplit(("transformer_blocks",), "attn1", "patch_embed", "image_rotary_emb", 0,
                            lambda attend, group: SplitJointAttention(group), caption_first=True),
}  # fmt: skip


def apply_pretrained_sequence_parallel(
    model: nn.Module, group, attend: Callable[..., Tensor]
) -> None:
    """Split a pretrained model's tokens over `group` in each of its experts: per-token timesteps
    and the rotary table (made from the grid the call names) are split on their way in, the
    tokens where they first exist whole, and the output projection's tokens are gathered.
    Cross-attention (to the whole caption) and the MLPs work on local tokens; the self-attention
    sees the whole sequence through `attend` (`sequence_attention`), or (joint attention) through
    its own Ulysses exchange over `group`."""
    split = PRETRAINED_SPLITS[model.family.sequence_split]
    size, rank = dist.get_world_size(group), dist.get_rank(group)

    def local_chunk(x: Tensor, dim: int = 1) -> Tensor:
        if x.shape[dim] % size:
            raise ValueError(
                f"sequence parallelism over {size} ranks needs the number of spacetime tokens "
                f"({x.shape[dim]}) to be divisible by {size}; choose buckets that split evenly"
            )
        return x.chunk(size, dim)[rank]

    def shard_rope(tables: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(local_chunk(table, split.rope_tokens_dim) for table in tables)

    def shard_inputs(module, args, kwargs):
        if kwargs["timestep"].ndim == 2:  # one per token
            kwargs["timestep"] = local_chunk(kwargs["timestep"])
        if split.tokens == "input":
            kwargs["hidden_states"] = local_chunk(kwargs["hidden_states"])
        if kwargs.get(split.rope) is not None:
            kwargs[split.rope] = shard_rope(kwargs[split.rope])
        return args, kwargs

    def shard_first_block_tokens(module, args):
        hidden_states, rotary_emb = args[0], args[3]
        if hidden_states.shape[1] == rotary_emb[0].shape[1]:
            return None  # split already: activation checkpointing recomputes the block
        return (local_chunk(hidden_states), *args[1:])

    def shard_tokens(module, args, output: Tensor) -> Tensor:
        if not split.caption_first:
            return local_chunk(output)
        caption = args[0].shape[1]  # patch_embed(caption, video)
        return torch.cat([output[:, :caption], local_chunk(output[:, caption:])], dim=1)

    def gather_tokens(module, args, output: Tensor) -> Tensor:
        return _Gather.apply(output, group, 1, False)

    for transformer in model.experts:
        blocks = [block for name in split.blocks for block in getattr(transformer, name)]
        transformer.register_forward_pre_hook(shard_inputs, with_kwargs=True)
        if hasattr(transformer, split.rope):
            getattr(transformer, split.rope).register_forward_hook(
                lambda module, args, output: shard_rope(output)
            )
        if split.tokens == "first_block":
            blocks[0].register_forward_pre_hook(shard_first_block_tokens)
        elif split.tokens != "input":
            getattr(transformer, split.tokens).register_forward_hook(shard_tokens)
        for block in blocks:
            getattr(block, split.attention).set_processor(split.processor(attend, group))
        transformer.proj_out.register_forward_hook(gather_tokens)

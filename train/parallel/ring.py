"""Ring attention: self-attention over a sequence whose tokens are split over a `cp` group.

Each rank holds one contiguous chunk of the queries, keys and values. Over cp steps the key/value
chunks travel round the ring (rank r sends to r + 1), each rank attends its queries to the chunk
it holds, and the partial results merge exactly by their log-sum-exp. The next chunk is in
flight while the current one is attended. Only this rank's chunk and the one arriving are held:
memory per rank falls as 1/cp, and so does the work, which is balanced as it is, since DiT
attention is bidirectional (every query chunk meets every key chunk; a causal mask would need a
zigzag split instead).

The backward pass goes round the ring again: the key/value chunks travel, and behind each the
gradients accumulated for it, each rank adding its queries' share; after cp passes every
gradient reaches the chunk's owner. It recomputes each block's probabilities from the saved output and
log-sum-exp (as flash attention does), so only q, k, v, the output and the log-sum-exp are kept.

A packed sequence (`Segments`) attends block-diagonally: a block of queries and keys that share
no sample is skipped, a shared one is masked to its samples, and padding attends to nothing.

Blocks run PyTorch's fused CPU flash-attention kernel on the CPU (it returns the log-sum-exp the
merge needs), and an exact fp32 computation elsewhere.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from model.attention import Segments

aten = torch.ops.aten


class RingAttention:
    """`attention` over the whole sequence for this rank's chunk of tokens (B, N/cp, H, D)."""

    def __init__(self, group):
        self.group = group

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_mask: Tensor | None = None,
        segments: Segments | None = None,
    ) -> Tensor:
        if key_mask is not None:
            raise ValueError("ring self-attention takes no key mask")
        ids = None if segments is None else _segment_ids(segments, q.shape[1], self.group)
        return _Ring.apply(q, k, v, ids, self.group)


def _segment_ids(segments: Segments, local_tokens: int, group) -> Tensor:
    """(N,) int64: each token's segment, the padding after them -1."""
    if segments.tokens != local_tokens * dist.get_world_size(group):
        raise ValueError(
            f"a packed sequence of {segments.tokens} tokens does not split into "
            f"{dist.get_world_size(group)} ring chunks of {local_tokens} tokens"
        )
    counts = torch.tensor([*segments.lengths, segments.padding])
    ids = torch.arange(len(counts)).repeat_interleave(counts)
    return torch.where(ids == len(segments.lengths), -1, ids)


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, ids: Tensor | None, group) -> Tensor:
        ring = _Neighbours(group)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
        kv = torch.cat([k.flatten(), v.flatten()])
        for step in range(ring.size):
            arriving = ring.pass_on(kv) if step < ring.size - 1 else None
            mask = _block_mask(ids, ring.rank, ring.source(step), q.shape[1])
            if mask is not False:
                chunk_k, chunk_v = kv.split(k.numel())
                block_out, block_lse = _block_forward(
                    q, chunk_k.view_as(k), chunk_v.view_as(v), mask
                )
                out, lse = _merge(out, lse, block_out, block_lse)
            if arriving is not None:
                kv = arriving.wait()
        ctx.save_for_backward(q, k, v, out, lse, ids)
        ctx.group = group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse, ids = ctx.saved_tensors
        ring = _Neighbours(ctx.group)
        grad_out = grad_out.float()
        grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.cat([k.float().flatten(), v.float().flatten()])
        grad_kv = torch.zeros_like(kv)  # the gradients of the chunk held, travelling with it
        for step in range(ring.size):
            arriving = ring.pass_on(kv) if step < ring.size - 1 else None
            mask = _block_mask(ids, ring.rank, ring.source(step), q.shape[1])
            if mask is not False:
                chunk_k, chunk_v = (x.view(k.shape) for x in kv.split(k.numel()))
                dq, dk, dv = _block_backward(grad_out, q, chunk_k, chunk_v, out, lse, mask)
                grad_q += dq
                grad_kv += torch.cat([dk.flatten(), dv.flatten()])
            # After the last step's pass each chunk's gradients are back with its owner.
            grad_kv = ring.pass_on(grad_kv).wait()
            if arriving is not None:
                kv = arriving.wait()
        grad_k, grad_v = grad_kv.split(k.numel())
        return (
            grad_q.to(q.dtype),
            grad_k.view(k.shape).to(k.dtype),
            grad_v.view(v.shape).to(v.dtype),
            None,
            None,
        )


class _Neighbours:
    """This rank's place in the ring and the sends to the next rank."""

    def __init__(self, group):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.previous = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def source(self, step: int) -> int:
        """The rank whose key/value chunk this rank holds at `step`."""
        return (self.rank - step) % self.size

    def pass_on(self, buffer: Tensor) -> _Arriving:
        received = torch.empty_like(buffer)
        requests = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, buffer.contiguous(), self.next, self.group),
                dist.P2POp(dist.irecv, received, self.previous, self.group),
            ]
        )
        return _Arriving(received, requests)


class _Arriving:
    def __init__(self, buffer: Tensor, requests: list):
        self.buffer, self.requests = buffer, requests

    def wait(self) -> Tensor:
        for request in self.requests:
            request.wait()
        return self.buffer


def _block_mask(ids: Tensor | None, rank: int, source: int, chunk: int) -> Tensor | None | bool:
    """Which of this rank's queries may attend which keys of `source`'s chunk: None for all,
    False for none (the block is skipped), else a (queries, keys) bool mask."""
    if ids is None:
        return None
    query_ids = ids[rank * chunk : (rank + 1) * chunk]
    key_ids = ids[source * chunk : (source + 1) * chunk]
    mask = (query_ids[:, None] == key_ids[None, :]) & (query_ids[:, None] >= 0)
    return mask if bool(mask.any()) else False


def _block_forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Attention of q to one key/value chunk: the output (B, Nq, H, D) and log-sum-exp (B, Nq, H),
    -inf for queries that may attend none of these keys."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if _fused_kernel_applies(q):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=_bias(mask, q.dtype)
        )
        if mask is not None:  # the kernel gives a query without keys lse 0, not -inf
            lse = lse.masked_fill(~mask.any(dim=1), -math.inf)
    else:
        scores = _scores(q.float(), k.float(), mask)
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.exp(scores - _finite(lse)[..., None]) @ v.float()
    return out.transpose(1, 2).float(), lse.transpose(1, 2).float()


def _block_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of one block, from the merged output and log-sum-exp (both fp32)."""
    lse = _finite(lse)
    if _fused_kernel_applies(q):
        grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *(x.transpose(1, 2).float() for x in (grad_out, q, k, v, out)),
            lse.transpose(1, 2).contiguous(),
            0.0,
            False,
            attn_mask=_bias(mask, torch.float32),
        )
        return tuple(g.transpose(1, 2) for g in grads)
    q, k, v, grad_out, out = (x.transpose(1, 2).float() for x in (q, k, v, grad_out, out))
    scale = q.shape[-1] ** -0.5
    probs = torch.exp(_scores(q, k, mask) - lse.transpose(1, 2)[..., None])
    grad_v = probs.transpose(-1, -2) @ grad_out
    grad_probs = grad_out @ v.transpose(-1, -2)
    grad_scores = probs * (grad_probs - (grad_out * out).sum(-1, keepdim=True))
    grad_q, grad_k = grad_scores @ k * scale, grad_scores.transpose(-1, -2) @ q * scale
    return tuple(g.transpose(1, 2) for g in (grad_q, grad_k, grad_v))


def _fused_kernel_applies(q: Tensor) -> bool:
    return q.device.type == "cpu"


def _scores(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return scores if mask is None else scores.masked_fill(~mask, -math.inf)


def _bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf)


def _merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Two softmax-normalised partial results combined as one softmax over both key sets."""
    merged = torch.logaddexp(lse, block_lse)
    safe = _finite(merged)[..., None]
    out = out * torch.exp(lse[..., None] - safe) + block_out * torch.exp(
        block_lse[..., None] - safe
    )
    return out, merged


def _finite(lse: Tensor) -> Tensor:
    """-inf (no key at all) as 0, so exp(scores - lse) stays 0 rather than NaN."""
    return lse.masked_fill(torch.isinf(lse), 0.0)

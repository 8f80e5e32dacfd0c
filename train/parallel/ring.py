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
gradient reaches the chunk's owner. It recomputes each block's probabilities from the saved
output and log-sum-exp (as flash attention does), so only q, k, v, the output and the
log-sum-exp are kept.

A packed sequence (`Segments`) attends block-diagonally. Samples are contiguous, so a block of
queries and keys is a few rectangles, one per sample the two chunks share, each attended
without a mask; a block that shares no sample is skipped, and padding attends to nothing.

Each rectangle runs PyTorch's fused CPU flash-attention kernel on the CPU (it returns the
log-sum-exp the merge needs); elsewhere an exact fp32 computation, QUERY_SLICE queries at a
time so that its scores stay small (a fused CUDA kernel is not built yet).
"""

from __future__ import annotations

import itertools
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
        if segments is not None and segments.tokens != q.shape[1] * dist.get_world_size(self.group):
            raise ValueError(
                f"a packed sequence of {segments.tokens} tokens does not split into "
                f"{dist.get_world_size(self.group)} ring chunks of {q.shape[1]} tokens"
            )
        return _Ring.apply(q, k, v, segments, self.group)


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, segments: Segments | None, group) -> Tensor:
        ring = _Neighbours(group)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
        kv = torch.cat([k.flatten(), v.flatten()])
        for step in range(ring.size):
            arriving = ring.pass_on(kv) if step < ring.size - 1 else None
            shared = _shared_samples(segments, ring.rank, ring.source(step), q.shape[1])
            if shared:
                chunk_k, chunk_v = kv.split(k.numel())
                block_out, block_lse = _block_forward(
                    q, chunk_k.view_as(k), chunk_v.view_as(v), shared
                )
                out, lse = _merge(out, lse, block_out, block_lse)
            if arriving is not None:
                kv = arriving.wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.segments, ctx.group = segments, group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Neighbours(ctx.group)
        grad_out = grad_out.float()
        grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.cat([k.float().flatten(), v.float().flatten()])
        grad_kv = torch.zeros_like(kv)  # the gradients of the chunk held, travelling with it
        for step in range(ring.size):
            arriving = ring.pass_on(kv) if step < ring.size - 1 else None
            shared = _shared_samples(ctx.segments, ring.rank, ring.source(step), q.shape[1])
            if shared:
                chunk_k, chunk_v = (x.view(k.shape) for x in kv.split(k.numel()))
                dq, dk, dv = _block_backward(grad_out, q, chunk_k, chunk_v, out, lse, shared)
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


Rectangles = list[tuple[slice, slice]]
WHOLE_BLOCK = (slice(None), slice(None))


def _shared_samples(segments: Segments | None, rank: int, source: int, chunk: int) -> Rectangles:
    """The (queries, keys) rectangles of the block of this rank's queries and `source`'s keys
    that attend each other: the whole block for a dense sequence, one per sample both chunks
    hold for a packed one (none: the block is skipped)."""
    if segments is None:
        return [WHOLE_BLOCK]
    rectangles = []
    bounds = itertools.pairwise(itertools.accumulate(segments.lengths, initial=0))
    for begin, end in bounds:
        queries = _within(begin, end, rank * chunk, chunk)
        keys = _within(begin, end, source * chunk, chunk)
        if queries and keys:
            rectangles.append((queries, keys))
    return rectangles


def _within(begin: int, end: int, start: int, chunk: int) -> slice | None:
    """Tokens begin:end of the sequence that fall in the chunk at `start`, in chunk positions."""
    first, last = max(begin, start), min(end, start + chunk)
    return slice(first - start, last - start) if first < last else None


def _block_forward(q: Tensor, k: Tensor, v: Tensor, shared: Rectangles) -> tuple[Tensor, Tensor]:
    """Attention of q to one key/value chunk: the output (B, Nq, H, D) and log-sum-exp (B, Nq, H),
    both fp32, -inf for queries that attend none of these keys."""
    if shared == [WHOLE_BLOCK]:
        return _attend(q, k, v)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
    for queries, keys in shared:
        out[:, queries], lse[:, queries] = _attend(q[:, queries], k[:, keys], v[:, keys])
    return out, lse


def _block_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, shared: Rectangles
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of one block, from the merged output and log-sum-exp (both fp32)."""
    grads = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v)]
    lse = _finite(lse)
    for queries, keys in shared:
        dq, dk, dv = _attend_backward(
            grad_out[:, queries],
            q[:, queries],
            k[:, keys],
            v[:, keys],
            out[:, queries],
            lse[:, queries],
        )
        grads[0][:, queries] += dq
        grads[1][:, keys] += dk
        grads[2][:, keys] += dv
    return tuple(grads)


QUERY_SLICE = 1024  # queries the exact kernel scores at a time


def _attend(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Every query to every key, (B, N, H, D) layout: the output and log-sum-exp, fp32."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if _fused_kernel_applies(q):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    else:
        q, k, v = q.float(), k.float(), v.float()
        outs, lses = [], []
        for rows in q.split(QUERY_SLICE, dim=2):
            scores = rows @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
            lses.append(torch.logsumexp(scores, dim=-1))
            outs.append(torch.exp(scores - lses[-1][..., None]) @ v)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    return out.transpose(1, 2).float(), lse.transpose(1, 2).float()


def _attend_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of `_attend`'s rectangle, with the merged output and log-sum-exp (fp32)."""
    grad_out, q, k, v, out = (x.transpose(1, 2).float() for x in (grad_out, q, k, v, out))
    lse = lse.transpose(1, 2).contiguous()
    if _fused_kernel_applies(q):
        grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False
        )
        return tuple(g.transpose(1, 2) for g in grads)
    scale = q.shape[-1] ** -0.5
    grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rows in range(0, q.shape[2], QUERY_SLICE):
        part = slice(rows, rows + QUERY_SLICE)
        probs = torch.exp(q[:, :, part] @ k.transpose(-1, -2) * scale - lse[:, :, part, None])
        grad_v += probs.transpose(-1, -2) @ grad_out[:, :, part]
        grad_probs = grad_out[:, :, part] @ v.transpose(-1, -2)
        row_terms = (grad_out[:, :, part] * out[:, :, part]).sum(-1, keepdim=True)
        grad_scores = probs * (grad_probs - row_terms) * scale
        grad_q[:, :, part] = grad_scores @ k
        grad_k += grad_scores.transpose(-1, -2) @ q[:, :, part]
    return tuple(g.transpose(1, 2) for g in (grad_q, grad_k, grad_v))


def _fused_kernel_applies(q: Tensor) -> bool:
    return q.device.type == "cpu"


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

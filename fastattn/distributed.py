"""Attention over a sequence sharded across processes (context parallelism): ring attention on torch.distributed.

Every rank of a process group holds a shard of the sequence, (B, H, L / world, D). The K/V shards travel
the ring (rank r sends to r + 1 and receives from r - 1, ``batch_isend_irecv``) while the block in hand
is computed, and the blocks' (out, lse) merge exactly in float32 (float64 for float64 inputs). The
backward recomputes each block from the saved (out, lse), sends dK/dV around the ring together with
the K/V they belong to, and leaves each rank the gradient of its own shard. No rank ever holds more than
two K/V shards. The output gate multiplies the merged output once (a per-row factor, so it commutes with
the merge).

Path: ring_attention -> _RingAttention -> Backend.attention_block / attention_block_bwd (backends.py)
-> torch.ops.fastattn.attention_fwd / attention_bwd, the same kernels as ``fastattn.attention``.

Causal attention depends on which positions a rank holds, its ``layout``:
- "zigzag" (the default, torch's context-parallel head-tail load balancing): the sequence cut into
  2·world chunks, rank r holding chunks r and 2·world - 1 - r, so every rank does the same work: after
  its own diagonal block, a rank needs either the first half of a visiting K/V shard (all its queries)
  or all of it (its second half of queries), never both nor nothing;
- "contiguous": rank r holds the r-th 1 / world of the sequence; blocks wholly in the future are skipped,
  so late ranks do most of the work.
:func:`shard_sequence` and :func:`unshard_sequence` convert between a whole sequence and either layout.

Torch's context parallelism (``torch.distributed.tensor.experimental``) reaches this ring through
``fastattn.attention``, which every fastattn entry point (``scaled_dot_product_attention``, ``fastattn.nn``)
goes through (:func:`over_shards`): when q is a DTensor sharded along the sequence (dim 2), as torch's
context-parallel module wrapper passes attention its inputs, or when the call is inside torch's
``context_parallel()``, which shards the model's buffers along the sequence and has
``F.scaled_dot_product_attention`` treat every call as sharded (fastattn treats its own calls so too, over
the same mesh). The layout is the one torch sharded with: "zigzag" (its head-tail load balancer) while its
``_cp_options.enable_load_balance`` is set, else "contiguous". Torch's other hook, custom-op handlers in the
DTensor dispatcher, is private and replaced whenever its context parallelism is switched on or off.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _checks
from .backends import Problem, select
from .contract import CAUSAL_NONE, CAUSAL_TOP_LEFT, LN2, causal_code, stat_dtype
from .functional import _maybe_dtensor, _maybe_zero, default_scale

__all__ = ["ring_attention", "shard_sequence", "unshard_sequence"]

LAYOUTS = ("zigzag", "contiguous")


def ring_attention(q, k, v, *, group=None, causal=False, gate=None, scale=None, return_lse=False, backend="auto",
                   layout="zigzag", deterministic=None):
    """:func:`fastattn.attention` over a sequence sharded across the ranks of ``group``.

    Args:
        q: this rank's queries (B, Hq, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv): the rank's shard of
            the sequence, every rank with the same shapes. GQA as in :func:`fastattn.attention` (K/V are
            never repeated); any strides.
        group: the process group the sequence is sharded over (default: the world).
        causal: False, or True / "top_left" / "bottom_right" (the same here: causal needs Lq == Lk): query
            position i sees key positions j <= i of the whole sequence, positions as ``layout`` places them.
        gate: None, or output-gate logits of this rank's rows, broadcastable to (B, Hq, Lq, Dv).
        scale: multiplies q·k; default 1/sqrt(D).
        return_lse: also return lse (B, Hq, Lq), natural log, float32 (float64 for float64 inputs).
        backend: the backend running the blocks, as in :func:`fastattn.attention`.
        layout: "zigzag" or "contiguous" (module docstring): which positions the shard holds; it matters
            only when causal ("zigzag" needs an even shard length).
        deterministic: as in :func:`fastattn.attention` (the ring itself sums in a fixed order).

    Returns this rank's rows of the output (B, Hq, Lq, Dv) in q's dtype, and lse if asked; differentiable
    (every rank of the group must then run the backward too, as with any collective).
    """
    B, Hq, Hkv, Lq, Lk, D, Dv = _checks.attention_inputs(q, k, v, None, gate, scale, 0.0)
    _checks.require(layout in LAYOUTS, ValueError, f"layout: expected one of {LAYOUTS}, got {layout!r}")
    _checks.require(dist.is_available() and dist.is_initialized(), RuntimeError,
                    "ring_attention: torch.distributed is not initialized (call dist.init_process_group first)")
    code = causal_code(causal)
    if code != CAUSAL_NONE:
        _checks.require(Lq == Lk, ValueError, f"causal: the q and k shards must have the same length, got {Lq} and {Lk}")
        _checks.require(layout != "zigzag" or Lq % 2 == 0, ValueError,
                        f"layout='zigzag': a shard holds two chunks of equal length, so its length must be even, "
                        f"got {Lq}")
        code = CAUSAL_TOP_LEFT  # equal lengths: every causal mode is the same
    scale = default_scale(D) if scale is None else float(scale)
    deterministic = _checks.deterministic(deterministic)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, gate))
    problem = Problem("attention", q.device.type, q.dtype, D=D, Dv=Dv, causal=code != 0, grad=grad)
    impl = select("reference" if _maybe_zero(B, Hq, Lq, Lk, D, Dv) else backend, problem)
    group = dist.group.WORLD if group is None else group
    out, lse2 = _RingAttention.apply(q, k, v, gate, impl, group, scale, code, layout, deterministic)
    return (out, lse2 * LN2) if return_lse else out


class _Ring:
    """This rank's place in ``group``'s ring and the one exchange it makes: send to the next rank, receive
    from the previous one, asynchronously (the caller computes meanwhile)."""

    def __init__(self, group):
        self.group, self.rank, self.world = group, dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def pass_on(self, tensors):
        """Posts sends of ``tensors`` to the next rank and receives of tensors like them from the previous
        one; returns a function that waits and returns the received ones."""
        received = [torch.empty_like(t) for t in tensors]
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors] +
                                       [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in received])

        def wait():
            for w in works:
                w.wait()
            return received
        return wait

    def visiting(self, tensors):
        """Yields (step, source rank, tensors of that rank) for step 0 .. world - 1, starting with
        ``tensors`` themselves; the next rank's arrive while the caller works on the current ones."""
        for step in range(self.world):
            wait = self.pass_on(tensors) if step < self.world - 1 else None
            yield step, (self.rank - step) % self.world, tensors
            if wait is not None:
                tensors = wait()


def _block(rank, src, L, causal, layout):
    """(query rows, key rows, causal code) of the block this rank computes with the K/V shard of rank ``src``,
    or None when every pair of it is masked."""
    every = slice(None)
    if causal == CAUSAL_NONE:
        return every, every, CAUSAL_NONE
    if src == rank:  # the diagonal: positions increase along the shard in both layouts
        return every, every, causal
    if layout == "contiguous":
        return (every, every, CAUSAL_NONE) if src < rank else None
    # zigzag: rank r holds chunks (r, 2w-1-r). An earlier source's first chunk precedes all of this rank's
    # positions and its second follows them; a later source's two chunks both fall between this rank's two.
    half = L // 2
    return (every, slice(0, half), CAUSAL_NONE) if src < rank else (slice(half, None), every, CAUSAL_NONE)


def _merge(out, lse2, out_b, lse2_b):
    """Merges a block's (out_b, lse2_b) into the rows' running (out, lse2) in place (log2 units). Rows with no
    key in either stay 0 / -inf; a NaN in either makes the row NaN."""
    m = torch.maximum(lse2, lse2_b)
    m = torch.where(m == float("-inf"), 0.0, m)
    wa, wb = torch.exp2(lse2 - m), torch.exp2(lse2_b - m)
    total = wa + wb
    merged = (out * wa.unsqueeze(-1) + out_b * wb.unsqueeze(-1)) / total.unsqueeze(-1)
    out.copy_(torch.where((total == 0).unsqueeze(-1), 0.0, merged))
    lse2.copy_(m + torch.log2(total))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate, impl, group, scale, causal, layout, deterministic):
        ring = _Ring(group)
        k, v = k.contiguous(), v.contiguous()  # they are sent whole
        B, Hq, Lq, _ = q.shape
        acc = stat_dtype(q.dtype)
        out = q.new_zeros((B, Hq, Lq, v.shape[-1]), dtype=acc)
        lse2 = q.new_full((B, Hq, Lq), float("-inf"), dtype=acc)
        for _, src, (kb, vb) in ring.visiting([k, v]):
            blk = _block(ring.rank, src, Lq, causal, layout)
            if blk is None:
                continue
            rows, cols, code = blk
            out_b, lse2_b = impl.attention_block(q[:, :, rows], kb[:, :, cols], vb[:, :, cols], scale, code)
            _merge(out[:, :, rows], lse2[:, :, rows], out_b.to(acc), lse2_b.to(acc))
        ctx.save_for_backward(q, k, v, out, lse2, gate)
        ctx.args = impl, ring, scale, causal, layout, deterministic
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None, not zeros
        if gate is None:
            return out.to(q.dtype), lse2
        return (out * torch.sigmoid(gate.to(acc))).to(q.dtype), lse2

    @staticmethod
    def backward(ctx, dres, dlse2):
        q, k, v, out, lse2, gate = ctx.saved_tensors
        impl, ring, scale, causal, layout, deterministic = ctx.args
        acc = out.dtype
        if dres is None:  # only lse was used
            dres = torch.zeros(out.shape, dtype=q.dtype, device=q.device)
        dgate = None
        if gate is not None:
            sig = torch.sigmoid(gate.to(acc))
            dres = dres.to(acc)
            dgate = (dres * out * sig * (1 - sig)).sum_to_size(gate.shape).to(gate.dtype)
            dres = dres * sig
        dout = dres.to(q.dtype)
        Lq = q.shape[2]
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        wait_dkv = None
        for step, src, (kb, vb) in ring.visiting([k, v]):
            dk_b = torch.zeros(k.shape, dtype=acc, device=k.device)
            dv_b = torch.zeros(v.shape, dtype=acc, device=v.device)
            blk = _block(ring.rank, src, Lq, causal, layout)
            if blk is not None:
                rows, cols, code = blk
                dq_r, dk_c, dv_c = impl.attention_block_bwd(
                    dout[:, :, rows], q[:, :, rows], kb[:, :, cols], vb[:, :, cols], out[:, :, rows],
                    lse2[:, :, rows], None if dlse2 is None else dlse2[:, :, rows], scale, code, deterministic)
                dq[:, :, rows] += dq_r
                dk_b[:, :, cols] += dk_c
                dv_b[:, :, cols] += dv_c
            if wait_dkv is not None:  # the gradient of this K/V shard from the ranks it visited before
                dk_in, dv_in = wait_dkv()
                dk_b += dk_in
                dv_b += dv_in
            # on to the rank that computes with this K/V shard next; after the last step, to its owner
            wait_dkv = ring.pass_on([dk_b, dv_b]) if ring.world > 1 else (lambda d=(dk_b, dv_b): d)
        dk, dv = wait_dkv()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dgate, None, None, None, None, None, None


def _chunks(n, world, layout, what):
    parts = 2 * world if layout == "zigzag" else world
    _checks.require(layout in LAYOUTS, ValueError, f"layout: expected one of {LAYOUTS}, got {layout!r}")
    _checks.require(n % parts == 0, ValueError,
                    f"{what}: layout={layout!r} over {world} ranks cuts the sequence into {parts} equal chunks, "
                    f"but its length is {n}")
    return parts


def shard_sequence(x, *, group=None, dim=2, layout="zigzag"):
    """This rank's shard of the whole sequence ``x`` (the same on every rank) along ``dim``, as ``layout``
    places it (module docstring); a copy. The length must divide into 2·world ("zigzag") or world
    ("contiguous") equal chunks."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    chunks = x.chunk(_chunks(x.shape[dim], world, layout, "x"), dim)
    if layout == "contiguous":
        return chunks[rank].clone()
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim)


def unshard_sequence(x, *, group=None, dim=2, layout="zigzag"):
    """The whole sequence from every rank's shard ``x`` along ``dim`` (gathered on every rank; the inverse of
    :func:`shard_sequence`). A collective; not differentiable."""
    world = dist.get_world_size(group)
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.detach().contiguous(), group=group)
    _chunks(x.shape[dim] * world, world, layout, "x")
    if layout == "contiguous":
        return torch.cat(shards, dim)
    halves = [s.chunk(2, dim) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


# ------------------------------------------------------------------------ torch's context parallelism
def _torch_cp():
    """torch's context-parallel module, or None where this torch has none."""
    try:
        from torch.distributed.tensor.experimental._context_parallel import _attention
    except ImportError:
        return None
    return _attention


def _torch_cp_layout(cp):
    return "zigzag" if cp is not None and cp._cp_options.enable_load_balance else "contiguous"


def _torch_cp_mesh():
    """The device mesh of torch's ``context_parallel()`` while it is active, else None. Inside it,
    ``F.scaled_dot_product_attention`` is a wrapper torch records in ``_replaced_functions``, holding the mesh."""
    cp = _torch_cp()
    fn = F.scaled_dot_product_attention
    if cp is None or fn not in getattr(cp, "_replaced_functions", {}) or not fn.__closure__:
        return None
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__))
    return cells["device_mesh"].cell_contents if "device_mesh" in cells else None


def over_shards(q, k, v, attn_mask, causal, scale, gate, dropout_p, return_lse, backend, score_mods=frozenset(),
                deterministic=None):
    """``fastattn.attention`` on a sequence torch's context parallelism shards (module docstring), or None when
    the call is not such: q, k, v and gate DTensors of one 1-D mesh, sharded along dim 2 (the ring) or not
    along it (batch or heads: each rank computes its part); or plain tensors inside ``context_parallel()``.
    ``score_mods``: the names of the score modifiers the call uses (none are sharded yet)."""
    cp = _torch_cp()
    sharded = any(_maybe_dtensor(t) for t in (q, k, v, gate, attn_mask))
    _checks.require(not (score_mods and (sharded or _torch_cp_mesh() is not None)), NotImplementedError,
                    f"window_size, softcap, alibi_slopes: {sorted(score_mods)} over sharded sequences are not "
                    "supported yet")
    if sharded:
        from torch.distributed.tensor import DTensor, Replicate, Shard
        mesh, placements = q.device_mesh, q.placements
        for name, t in (("k", k), ("v", v), ("gate", gate)):
            _checks.require(t is None or (_maybe_dtensor(t) and t.device_mesh == mesh and t.placements == placements),
                            ValueError, f"{name}: expected a DTensor on q's mesh with q's placements {placements}")
        _checks.require(len(placements) == 1 and placements[0] in (Shard(0), Shard(1), Shard(2), Replicate()),
                        NotImplementedError, f"q: DTensors on a 1-D mesh, sharded along batch, heads or sequence "
                        f"(dims 0-2) or replicated, got placements {placements}")
        local = [t.to_local() if t is not None else None for t in (q, k, v, gate)]
        if placements[0] == Shard(2):
            out, lse = _sharded_call(*local, attn_mask, causal, scale, dropout_p, True, backend, mesh.get_group(),
                                     _torch_cp_layout(cp), deterministic)
        else:
            _checks.require(not _maybe_dtensor(attn_mask), NotImplementedError, "attn_mask: a DTensor mask")
            from .functional import attention
            out, lse = attention(*local[:3], attn_mask=attn_mask, causal=causal, scale=scale, gate=local[3],
                                 dropout_p=dropout_p, return_lse=True, backend=backend, deterministic=deterministic)
        out, lse = (DTensor.from_local(t, mesh, placements, run_check=False) for t in (out, lse))
        return (out, lse) if return_lse else out
    mesh = _torch_cp_mesh()
    if mesh is None:
        return None
    return _sharded_call(q, k, v, gate, attn_mask, causal, scale, dropout_p, return_lse, backend, mesh.get_group(),
                         _torch_cp_layout(cp), deterministic)


def _sharded_call(q, k, v, gate, attn_mask, causal, scale, dropout_p, return_lse, backend, group, layout,
                  deterministic):
    _checks.require(attn_mask is None, NotImplementedError,
                    "attn_mask: masks over a sequence sharded by context parallelism are not supported (causal is)")
    _checks.require(dropout_p == 0.0, NotImplementedError,
                    "dropout_p: dropout over a sequence sharded by context parallelism is not supported")
    return ring_attention(q, k, v, group=group, causal=causal, gate=gate, scale=scale, return_lse=return_lse,
                          backend=backend, layout=layout, deterministic=deterministic)

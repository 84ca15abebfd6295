"""Correctness of every row: FlashAttention's error rule against a float64 reference.

For each checked tensor (the output, and ``dq``, ``dk``, ``dv`` in the backward modes)::

    max|backend - ref_fp64| <= 2 * max|torch - ref_fp64| + 1e-5

The rule, its constants and its error measure are those of :mod:`aigc_ext.testing`, which the
test suite applies too. Here a non-finite value of torch's (the yardstick) makes the bound
infinite, where the test suite leaves such entries out.

``ref_fp64`` is plain float64 math on the same (rounded) inputs, computed in blocks of query
rows so that its score matrix stays small (:func:`reference64`; the tests check it against
:func:`aigc_ext.backends.reference.ops.sdpa_reference` in float64). ``torch`` is
``torch.nn.functional.scaled_dot_product_attention`` in the row's dtype with torch's own choice
of kernel, as the test suite does (``tests/sdpa_testing.py``): on the CPU, torch's math backend
computes reduced precisions in float32, and its gradients are then more accurate than any fused
bf16 kernel's, torch's own flash kernel included, so it would be no same-dtype yardstick.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from aigc_ext.bench.problem import Problem
from aigc_ext.testing import ERROR_ATOL, ERROR_FACTOR, error_bound, max_abs_error, within_bound

__all__ = [
    "ERROR_ATOL",
    "ERROR_FACTOR",
    "TENSOR_NAMES",
    "ErrorCheck",
    "ErrorRule",
    "reference64",
    "torch_baseline",
]

TENSOR_NAMES = ("out", "dq", "dk", "dv")
_SCORE_BLOCK_BYTES = (
    2 * 2**20
)  # fp64 scores per block: larger ones run far slower here (page faults)


def run_with_grads(
    attn, p: Problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> list[torch.Tensor]:
    """``[out]`` in the forward modes, ``[out, dq, dk, dv]`` in the backward ones."""
    if not p.case.backward:
        with torch.no_grad():
            return [attn(q, k, v)]
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = attn(*leaves)
    grads = torch.autograd.grad(out, leaves, p.grad_out.to(out.dtype))
    return [out.detach(), *grads]


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread for the block (CPU only), restored after.

    The reference is a long series of small operations: with several threads each one ends in
    a barrier, and on a busy machine a barrier waits for a descheduled thread. Measured on a
    loaded 2-core VM: the references of the ``--quick`` sweep took 16 s on 2 threads and
    1.2-1.5 s on one (about the same on an idle machine).
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference64(p: Problem) -> list[torch.Tensor]:
    """The float64 reference result (and gradients in the backward modes) of ``p``.

    Plain float64 math, ``softmax(Q K^T * scale + mask) V``, with the textbook backward
    (``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``, ``dQ = dS K * scale``,
    ``dK = dS^T Q * scale``). It runs per (batch, KV head) with the whole GQA group at once and
    in blocks of query rows, so the score matrix of a block stays near 2 MiB whatever ``L`` and
    ``S``; causal masking uses the global query index. Rows always keep key 0 (see
    :class:`~aigc_ext.bench.problem.Problem`), so no softmax row is empty. Runs on one CPU
    thread (see :func:`_one_cpu_thread`).
    """
    with _one_cpu_thread(p.device):
        return _reference64(p)


def _reference64(p: Problem) -> list[torch.Tensor]:
    c = p.case
    f64 = torch.float64
    q64, k64, v64 = (t.detach().to(f64) for t in (p.query, p.key, p.value))
    go = p.grad_out.to(f64) if p.grad_out is not None else None
    group = c.heads // c.kv_heads
    dev = p.device
    mask = None
    if p.mask is not None:
        mask = p.mask.expand(c.batch, c.heads, c.seq_q, c.seq_kv)
    rows = max(1, _SCORE_BLOCK_BYTES // (8 * group * max(1, c.seq_kv)))
    out = torch.empty(c.batch, c.heads, c.seq_q, c.head_dim_v, dtype=f64, device=dev)
    dq, dk, dv = (torch.zeros_like(t) for t in (q64, k64, v64))
    keys = torch.arange(c.seq_kv, device=dev)
    for b in range(c.batch):
        for g in range(c.kv_heads):
            heads = slice(g * group, (g + 1) * group)
            k, v = k64[b, g], v64[b, g]  # (S, E), (S, Ev)
            for r0 in range(0, c.seq_q, rows):
                r1 = min(c.seq_q, r0 + rows)
                q = q64[b, heads, r0:r1]  # (G, R, E)
                s = torch.matmul(q, k.T).mul_(p.scale)  # (G, R, S)
                if mask is not None:
                    s.masked_fill_(~mask[b, heads, r0:r1], -math.inf)
                if p.causal:
                    hidden = torch.arange(r0, r1, device=dev)[:, None] < keys[None, :]
                    s.masked_fill_(hidden, -math.inf)
                prob = torch.softmax(s, dim=-1)
                del s
                o = torch.matmul(prob, v)  # (G, R, Ev)
                out[b, heads, r0:r1] = o
                if go is None:
                    continue
                g_o = go[b, heads, r0:r1]
                dv[b, g] += torch.matmul(prob.transpose(-1, -2), g_o).sum(0)
                delta = (g_o * o).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
                ds = torch.matmul(g_o, v.T).sub_(delta).mul_(prob)  # (G, R, S)
                dq[b, heads, r0:r1] = torch.matmul(ds, k).mul_(p.scale)
                dk[b, g] += torch.matmul(ds.transpose(-1, -2), q).sum(0).mul_(p.scale)
    return [out, dq, dk, dv] if c.backward else [out]


def torch_baseline(p: Problem) -> list[torch.Tensor]:
    """torch's SDPA in the row's dtype, with torch's own kernel choice (the yardstick).

    Query/key and value head dims that differ are zero-padded to a common width (zero columns
    leave the scores unchanged; those of the value are cut from the output) so that torch can
    use its fused kernel, as the test suite does.
    """
    mask, causal = p.folded_mask()
    e, ev = p.case.head_dim, p.case.head_dim_v
    width = max(e, ev)

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k = F.pad(q, (0, width - e)), F.pad(k, (0, width - e))
        out = F.scaled_dot_product_attention(
            q,
            k,
            F.pad(v, (0, width - ev)),
            attn_mask=mask,
            is_causal=causal,
            scale=p.scale,
            enable_gqa=p.gqa,
        )
        return out[..., :ev]

    return run_with_grads(attn, p, p.query, p.key, p.value)


@dataclass
class ErrorCheck:
    """Per-tensor errors and bounds of one backend on one row."""

    errors: dict[str, float] = field(default_factory=dict)
    bounds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(within_bound(err, self.bounds[name]) for name, err in self.errors.items())

    @property
    def max_err(self) -> float:
        return max(self.errors.values(), default=0.0)

    def describe_failure(self) -> str | None:
        """The failing tensors as ``name: err > bound``, or None when every one passes."""
        bad = [
            f"{name}: max err {err:.2e} > bound {self.bounds[name]:.2e}"
            for name, err in self.errors.items()
            if not within_bound(err, self.bounds[name])
        ]
        return "; ".join(bad) or None


def _max_abs_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref|; infinite when ``a`` has a non-finite value (the reference has none) or
    another shape than ``ref`` (a wrong result, marked as a failure of the row)."""
    if a.shape != ref.shape:
        return math.inf
    return max_abs_error(a, ref)


class ErrorRule:
    """The error rule of one case: bounds from torch's error, then :meth:`check` per backend.

    ``reference`` and ``baseline`` are ``[out]`` or ``[out, dq, dk, dv]``; torch's errors are
    computed once here, each backend's in :meth:`check` (on one CPU thread, as
    :func:`reference64`: these are many small reductions).
    """

    def __init__(
        self,
        reference: list[torch.Tensor],
        baseline: list[torch.Tensor],
        *,
        factor: float = ERROR_FACTOR,
        atol: float = ERROR_ATOL,
    ) -> None:
        self.reference = reference
        with _one_cpu_thread(reference[0].device):
            self.bounds = {
                name: error_bound(_max_abs_diff(base, ref), factor=factor, atol=atol)
                for name, base, ref in zip(TENSOR_NAMES, baseline, reference, strict=False)
            }

    def check(self, results: list[torch.Tensor]) -> ErrorCheck:
        """Each tensor of ``results`` against the reference and its bound."""
        check = ErrorCheck()
        with _one_cpu_thread(self.reference[0].device):
            for name, res, ref in zip(TENSOR_NAMES, results, self.reference, strict=False):
                check.errors[name] = _max_abs_diff(res, ref)
                check.bounds[name] = self.bounds[name]
        return check

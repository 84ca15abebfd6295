"""Built-in recipes: complete training configurations, run with ``aigc-ext train --recipe NAME``.

Each recipe is sized to finish within about a minute and a half on a 2-core CPU with its loss
going down; ``--max-steps``, ``--set section.key=value`` or a TOML file with
``recipe = "NAME"`` change any value. Outputs go to ``runs/NAME`` (relative to the working
directory) unless ``--output`` says otherwise. They run on the CPU, for which they are sized
(``run.device = "cpu"``; ``--device auto`` uses a GPU when there is one).

* ``clm-pretrain``: a small GPT-2 learns next-token prediction on standard-library docstrings.
* ``mlm-pretrain``: a small BERT learns masked-token prediction on the same text, with random
  token swaps as augmentation.
* ``span-pretrain``: a small T5 learns T5's span-corruption objective on the same text.
* ``sft-lora``: LoRA fine-tuning of the ``clm-pretrain`` model on prompt/response tasks
  (reverse a word, add two numbers) with the loss on the response only. It starts from
  ``runs/clm-pretrain`` when that run exists (``--set model.init_from=DIR`` names another
  output directory) and from a random initialisation otherwise, with a warning; its model
  options are ``clm-pretrain``'s so that the weights fit. The run's ``model.safetensors`` holds
  the adapted model (base weights and adapters under PEFT's names); the runner also writes the
  adapter alone to ``<output_dir>/adapter`` (:func:`save_lora_adapter` does the same for a
  model trained elsewhere).
* ``transfer-minilm``: the pretrained MiniLM encoder with a new head classifies template
  sentences as positive or negative (a quarter of them negated: "not good" is negative),
  unfreezing one layer group per epoch from the top with smaller learning rates for lower
  groups; held-out sentences use other templates and other sentiment words, evaluated after
  every epoch (``eval/accuracy``).
* ``sft-jsonl``: LoRA fine-tuning of a local causal-LM checkpoint (``--set model.path=DIR``,
  the ``hf`` model family) on a JSONL file of prompt/response rows (``--set data.path=FILE``;
  the field names are ``data.prompt_field`` / ``data.response_field``), loss on the response
  only; the merged model and the tokenizer land in ``<output_dir>/hf``, loadable with
  ``AutoModelForCausalLM.from_pretrained``, the adapter alone in ``<output_dir>/adapter``.
* ``vision-augment``: a small vision transformer classifies 8x8 handwritten digits with mild
  rotations, random resized crops and MixUp; ``eval/accuracy`` on a stratified held-out split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CLM_MODEL", "save_lora_adapter"]

CLM_MODEL: dict[str, Any] = {
    "name": "gpt",
    "arch": "gpt2",
    "n_layer": 4,
    "n_embd": 128,
    "n_head": 4,
    "n_positions": 128,
    "dropout": 0.0,
}
"""The model of ``clm-pretrain``; ``sft-lora`` uses the same options to load its weights."""

_TEXT = {"name": "text-corpus", "seq_len": 128, "eval_fraction": 0.05, "max_eval_examples": 64}


def _run(name: str, **values: Any) -> dict[str, Any]:
    run = {
        "seed": 0,
        "output_dir": f"runs/{name}",
        "batch_size": 16,
        "eval_batch_size": 32,
        "grad_accum": 1,
        "weight_decay": 0.01,
        "min_lr_ratio": 0.1,
        "clip_grad_norm": 1.0,
        "precision": "fp32",
        "save_every": 0,
        "keep_checkpoints": 1,
        "log_every": 10,
        "device": "cpu",
    }
    run.update(values)
    return run


def save_lora_adapter(model: Any, output_dir: str | Path) -> Path:
    """Saves the LoRA adapter of a trained ``sft-lora`` model to ``<output_dir>/adapter``.

    Uses ``save_adapter`` of ``aigc_ext.default_plugins.strategies.finetuning`` (the adapter
    weights only, as safetensors); ``load_adapter(base_model, path)`` puts them back on a model built with
    :data:`CLM_MODEL`'s options. Returns the adapter directory.
    """
    from aigc_ext.default_plugins.strategies.finetuning import save_adapter

    directory = Path(output_dir) / "adapter"
    save_adapter(model, directory)
    return directory


RECIPES_CONFIG: dict[str, tuple[str, dict[str, Any]]] = {
    "clm-pretrain": (
        "GPT-2 (4 layers, 128 wide) pretrained with next-token prediction on "
        "standard-library docstrings (character tokens)",
        {
            "run": _run(
                "clm-pretrain",
                max_steps=300,
                lr=2e-3,
                warmup_steps=30,
                eval_every=100,
            ),
            "model": dict(CLM_MODEL),
            "data": dict(_TEXT),
            "objective": {"name": "causal-lm"},
        },
    ),
    "mlm-pretrain": (
        "BERT (4 layers, 128 wide) pretrained with masked-token prediction on "
        "standard-library docstrings, random token swaps as augmentation",
        {
            "run": _run("mlm-pretrain", max_steps=300, lr=2e-3, warmup_steps=30, eval_every=100),
            "model": {"name": "bert-mlm", "n_layer": 4, "n_embd": 128, "n_head": 4, "dropout": 0.0},
            "data": dict(_TEXT),
            "objective": {"name": "masked-lm", "mlm_probability": 0.15},
            "augmentations": [{"name": "random-swap", "p": 0.05}],
        },
    ),
    "span-pretrain": (
        "T5 (3+3 layers, 128 wide) pretrained with span corruption on standard-library docstrings",
        {
            "run": _run("span-pretrain", max_steps=300, lr=2e-3, warmup_steps=30, eval_every=100),
            "model": {"name": "t5", "n_layer": 3, "n_embd": 128, "n_head": 4},
            "data": dict(_TEXT),
            "objective": {
                "name": "span-corruption",
                "noise_density": 0.15,
                "mean_noise_span_length": 3.0,
            },
        },
    ),
    "sft-lora": (
        "LoRA fine-tuning of the clm-pretrain GPT-2 (from runs/clm-pretrain when present) on "
        "prompt/response tasks, loss on the response only",
        {
            "run": _run("sft-lora", max_steps=1000, lr=5e-3, warmup_steps=50, eval_every=250),
            "model": dict(CLM_MODEL, init_from="runs/clm-pretrain", init_optional=True),
            "data": {"name": "prompt-response", "tasks": ["reverse", "add"], "num_train": 3000},
            "objective": {"name": "causal-lm"},
            "finetune": {
                "name": "lora",
                "r": 16,
                "alpha": 32,
                "dropout": 0.0,
                "target_modules": ["c_attn", "c_proj", "c_fc"],
            },
        },
    ),
    "sft-jsonl": (
        "LoRA fine-tuning of a local causal-LM checkpoint (model.path) on prompt/response rows "
        "of a JSONL file (data.path), loss on the response only; the merged model in RUN/hf",
        {
            "run": _run(
                "sft-jsonl",
                epochs=3,
                batch_size=8,
                eval_batch_size=16,
                lr=2e-4,
                warmup_steps=0,
                weight_decay=0.0,
                log_every=1,
                merge_lora=True,
            ),
            "model": {"name": "hf", "task": "causal-lm"},
            "data": {
                "name": "files",
                "kind": "prompt-response",
                "prompt_field": "prompt",
                "response_field": "response",
                "seq_len": 512,
                "eval_fraction": 0.05,
            },
            "objective": {"name": "causal-lm"},
            "finetune": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        },
    ),
    "transfer-minilm": (
        "Pretrained MiniLM with a new head classifies template sentences by sentiment; "
        "gradual unfreezing with discriminative learning rates, held-out accuracy",
        {
            "run": _run(
                "transfer-minilm",
                epochs=6,
                batch_size=32,
                eval_batch_size=64,
                lr=1e-3,
                warmup_steps=0,
                eval_every=16,  # once per epoch
                weight_decay=0.0,
            ),
            "model": {"name": "minilm-classifier"},
            "data": {"name": "sentiment", "num_train": 512, "num_eval": 256, "negation": 0.25},
            "objective": {"name": "classification"},
            "transfer": {"name": "gradual-unfreezing", "discriminative": True, "factor": 2.6},
        },
    ),
    "vision-augment": (
        "Small vision transformer classifies 8x8 handwritten digits with rotation, random "
        "resized crops and MixUp; held-out accuracy",
        {
            "run": _run(
                "vision-augment",
                epochs=40,
                batch_size=64,
                eval_batch_size=256,
                lr=2e-3,
                warmup_steps=20,
                eval_every=220,  # every 10 epochs
                weight_decay=0.05,
            ),
            "model": {"name": "vit", "dim": 64, "depth": 4, "heads": 4, "patch_size": 2},
            "data": {"name": "digits", "eval_fraction": 0.2},
            "objective": {"name": "classification"},
            "augmentations": [
                # Mild geometry: an 8x8 image loses much of its shape to stronger warps.
                {"name": "rotation", "degrees": 8.0, "p": 0.5},
                {"name": "random-resized-crop", "scale": [0.9, 1.0], "ratio": [0.9, 1.1]},
                {"name": "mixup", "alpha": 0.2},
            ],
        },
    ),
}

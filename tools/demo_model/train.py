"""Rebuild the shipped demo model from scratch: corpus -> tokenizer -> Qwen3-MoE -> resources/demo-model.

    python -m tools.demo_model.train [--steps N] [--out DIR]

Everything is seeded, so a run on the same machine and thread count rebuilds the same files. At the end
it evaluates the model on the held-out split and writes manifest.json and the README.md model card.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from engine.paths import DEMO_MODEL_DIR
from tools.demo_model.corpus import SEED, Example, TrainStream, held_out_examples
from tools.demo_model.tokenizer import build_tokenizer

THREADS = 2
STEPS = 3000
ROWS = 24          # rows per batch
ROW_LEN = 128      # tokens per row, filled with whole exchanges
PEAK_LR = 3e-3
WARMUP = 150
AUX_COEF = 0.01

MODEL_KWARGS = dict(
    hidden_size=192,
    intermediate_size=384,          # unused: every layer is an MoE layer
    moe_intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    decoder_sparse_step=1,
    norm_topk_prob=True,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    router_aux_loss_coef=AUX_COEF,
)


def make_model(tokenizer):
    """A fresh Qwen3-MoE sized for CPU training: 4 MoE layers of 8 experts, top-2 routing."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        output_router_logits=True,
        **MODEL_KWARGS,
    )
    return Qwen3MoeForCausalLM(config)


def encode(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """Token ids of one exchange as the chat template renders it, with labels only on the reply."""
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    prompt = ids("<|user|>") + ids(ex.prompt) + ids("<|end|><|assistant|>")
    reply = ids(ex.reply) + [tokenizer.eos_token_id]
    return prompt + reply, [-100] * len(prompt) + reply


class Batches:
    """Rows of up to ROW_LEN tokens packed with whole exchanges, so a row also reads like a chat history."""

    def __init__(self, tokenizer, seed: int = SEED) -> None:
        self.tokenizer = tokenizer
        self.stream = TrainStream(seed)
        self.pending: tuple[list[int], list[int]] | None = None

    def _next(self) -> tuple[list[int], list[int]]:
        item, self.pending = self.pending or encode(self.tokenizer, self.stream.example()), None
        return item

    def row(self) -> tuple[list[int], list[int]]:
        ids, labels = self._next()
        while True:
            nxt = self._next()
            if len(ids) + len(nxt[0]) > ROW_LEN:
                self.pending = nxt
                return ids, labels
            ids, labels = ids + nxt[0], labels + nxt[1]

    def batch(self) -> dict[str, torch.Tensor]:
        rows = [self.row() for _ in range(ROWS)]
        width = max(len(r[0]) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
        labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
        mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
        return dict(input_ids=input_ids, labels=labels, attention_mask=mask)


def lr_at(step: int, steps: int) -> float:
    """Linear warmup, then cosine decay to 5% of the peak."""
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return PEAK_LR * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(steps: int = STEPS, out_dir: Path = DEMO_MODEL_DIR, eval_every: int = 600, threads: int = THREADS) -> dict:
    """Train and save the model plus tokenizer into out_dir; return a summary of the run."""
    from tqdm import tqdm

    from tools.demo_model.evaluate import greedy_batch

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    random.seed(SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    model = make_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, vocab {len(tokenizer)}", file=sys.stderr)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "gate.weight" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "gate.weight" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR, betas=(0.9, 0.98), eps=1e-8,
    )
    batches = Batches(tokenizer)
    probe = held_out_examples()[:80]
    start = time.time()
    bar = tqdm(range(steps), desc="train", file=sys.stderr, mininterval=5)
    ema = None
    for step in bar:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        out = model(**batches.batch())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lm = out.loss.item() - AUX_COEF * out.aux_loss.item()
        ema = lm if ema is None else 0.98 * ema + 0.02 * lm
        bar.set_postfix(loss=f"{ema:.4f}", aux=f"{out.aux_loss.item():.3f}", lr=f"{lr_at(step, steps):.1e}")
        if (step + 1) % 200 == 0:
            bar.write(f"step {step + 1}: loss {ema:.4f} aux {out.aux_loss.item():.3f}", file=sys.stderr)
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            model.eval()
            replies = greedy_batch(model, tokenizer, [ex.prompt for ex in probe])
            acc = sum(r == ex.reply for r, ex in zip(replies, probe)) / len(probe)
            bar.write(f"step {step + 1}: held-out probe accuracy {acc:.3f} ({time.time() - start:.0f}s)", file=sys.stderr)
    wall = time.time() - start

    model.eval()
    model.config.output_router_logits = False  # only needed for the training loss
    model.save_pretrained(out_dir, safe_serialization=True)
    model.generation_config.save_pretrained(out_dir)
    summary = dict(steps=steps, rows=ROWS, row_len=ROW_LEN, peak_lr=PEAK_LR, threads=threads,
                train_seconds=round(wall), parameters=n_params, final_loss=round(ema, 4), seed=SEED)
    (out_dir / "manifest.json").write_text(json.dumps({"training": summary}, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--eval-every", type=int, default=600)
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="CPU threads; 1 is faster when other jobs share the cores")
    parser.add_argument("--no-card", action="store_true", help="skip the final evaluation and model card")
    args = parser.parse_args(argv)
    for stale in ("model.safetensors", "config.json", "generation_config.json"):
        (args.out / stale).unlink(missing_ok=True)
    summary = train(args.steps, args.out, args.eval_every, args.threads)
    print(f"trained in {summary['train_seconds']} s", file=sys.stderr)
    if not args.no_card:
        from tools.demo_model.card import write_card

        write_card(args.out)
    shutil.rmtree(args.out / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()

"""Score the demo model's greedy replies on the held-out split, and measure how its experts are used.

    python -m tools.demo_model.evaluate [--json] [--model DIR] [--per-family N]

With --json exactly one JSON object goes to stdout:
{"accuracy", "per_family", "n", "routing"}; everything else is logged to stderr. Replies go through
the engine's Session when the engine is importable (the same path the app uses), otherwise through
plain transformers generation. Routing is recorded with forward hooks on each layer's router, so it
does not depend on engine internals.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Callable

import torch

from engine.paths import DEMO_MODEL_DIR
from tools.demo_model.corpus import FAMILIES, held_out_examples

MAX_NEW_TOKENS = 64
CACHE_FRACTION = 0.25


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


@torch.no_grad()
def greedy_batch(model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy replies to single-turn prompts, batched with left padding (fast, for progress checks)."""
    tokenizer.padding_side = "left"
    chats = [[{"role": "user", "content": p}] for p in prompts]
    inputs = tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(
        **inputs, do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, output_router_logits=False,
    )
    new = out[:, inputs["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def stock_replier(model_dir: Path) -> tuple[Callable[[str], str], object]:
    """reply(prompt) with plain transformers greedy generation; also returns the model for hooks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def reply(prompt: str) -> str:
        return greedy_batch(model, tokenizer, [prompt])[0]

    return reply, model


def engine_replier(model_dir: Path, fmt: str = "source") -> tuple[Callable[[str], str], object, object]:
    """reply(prompt) through the engine's Session, the path the app uses; also returns model and runtime.
    `fmt`: the weight format of the experts and dense layers."""
    from engine.model.loader import load_model
    from engine.model.session import GenerationParams, Session

    loaded = load_model(str(model_dir), device="cpu", budget=CACHE_FRACTION, policy="lru", profile=None,
                        experts=fmt, dense=fmt)
    session = Session(loaded)
    # plain argmax: the engine's default repetition penalty would also apply to greedy decoding
    params = GenerationParams(max_new_tokens=MAX_NEW_TOKENS, greedy=True, repetition_penalty=1.0)

    def reply(prompt: str) -> str:
        session.reset()
        return "".join(ev.text for ev in session.chat([{"role": "user", "content": prompt}], params)).strip()

    return reply, loaded.model, getattr(loaded, "runtime", None)


class RouterRecorder:
    """Forward hooks on every MoE router: the top-k experts each processed token was sent to, per layer."""

    def __init__(self, model) -> None:
        self.calls: list[list[torch.Tensor]] = []
        self.handles = []
        layers = model.model.layers
        self.gates = [layer.mlp.gate for layer in layers if hasattr(layer.mlp, "gate")]
        self.calls = [[] for _ in self.gates]
        for i, gate in enumerate(self.gates):
            self.handles.append(gate.register_forward_hook(self._hook(i)))
        self.num_experts = model.config.num_experts

    def _hook(self, i: int):
        def hook(_module, _inputs, output):
            self.calls[i].append(output[2].detach().reshape(-1, output[2].shape[-1]).cpu())
        return hook

    def take(self) -> list[torch.Tensor]:
        """Routing since the last take: one (tokens, top_k) tensor per layer."""
        out = [torch.cat(c) if c else torch.empty(0, 2, dtype=torch.long) for c in self.calls]
        self.calls = [[] for _ in self.gates]
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def lru_hit_rate(routing: list[torch.Tensor], capacity: int) -> float:
    """Replay an LRU cache of `capacity` experts over a token stream of top-k choices."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    for chosen in routing:
        for expert in chosen.tolist():
            total += 1
            if expert in cache:
                hits += 1
                cache.move_to_end(expert)
            else:
                cache[expert] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits / max(1, total)


def routing_stats(per_prompt: list[tuple[str, list[torch.Tensor]]], num_experts: int) -> dict:
    """Expert shares per layer (overall and per family) and the hit rates of quarter-size caches."""
    n_layers = len(per_prompt[0][1])
    capacity = max(1, round(num_experts * CACHE_FRACTION))
    layers = []
    for layer in range(n_layers):
        stream = torch.cat([r[layer] for _, r in per_prompt])
        counts = torch.bincount(stream.reshape(-1), minlength=num_experts).float()
        share = counts / counts.sum()
        fam_share = {}
        for family in FAMILIES:
            idx = [r[layer] for f, r in per_prompt if f == family]
            if idx:
                c = torch.bincount(torch.cat(idx).reshape(-1), minlength=num_experts).float()
                fam_share[family] = [round(x, 4) for x in (c / c.sum()).tolist()]
        top = share.topk(capacity).values.sum().item()
        layers.append({
            "layer": layer,
            "share": [round(x, 4) for x in share.tolist()],
            "per_family": fam_share,
            "max_share": round(share.max().item(), 4),
            "lru_hit_rate": round(lru_hit_rate(list(stream), capacity), 4),
            "static_hit_rate": round(top, 4),
        })
    mean = lambda key: round(sum(entry[key] for entry in layers) / len(layers), 4)  # noqa: E731
    return {
        "cache_experts_per_layer": capacity,
        "num_experts": num_experts,
        "uniform_hit_rate": round(capacity / num_experts, 4),
        "lru_hit_rate": mean("lru_hit_rate"),
        "static_hit_rate": mean("static_hit_rate"),
        "tokens": int(sum(r[0].shape[0] for _, r in per_prompt)),
        "layers": layers,
    }


def evaluate(model_dir: Path = DEMO_MODEL_DIR, per_family: int = 60, use_engine: bool | None = None,
             fmt: str = "source") -> dict:
    """Greedy exact-match accuracy on the held-out split, per family, plus routing statistics."""
    torch.set_num_threads(2)
    runtime = None
    if use_engine is None:
        try:
            import engine.model.session  # noqa: F401
            use_engine = True
        except ImportError:
            use_engine = False
    if use_engine:
        reply, model, runtime = engine_replier(model_dir, fmt)
    else:
        reply, model = stock_replier(model_dir)
    log(f"generating through {'the engine Session' if use_engine else 'stock transformers'}")
    recorder = RouterRecorder(model)
    examples = held_out_examples(per_family)
    right: dict[str, list[bool]] = defaultdict(list)
    per_prompt = []
    failures = []
    for i, ex in enumerate(examples):
        got = reply(ex.prompt)
        ok = got == ex.reply
        right[ex.family].append(ok)
        per_prompt.append((ex.family, recorder.take()))
        if not ok:
            failures.append({"family": ex.family, "prompt": ex.prompt, "want": ex.reply, "got": got})
        if (i + 1) % 50 == 0:
            log(f"{i + 1}/{len(examples)} scored")
    recorder.close()
    for f in failures[:25]:
        log(f"MISS [{f['family']}] {f['prompt']!r}\n  want {f['want']!r}\n  got  {f['got']!r}")
    n = len(examples)
    result = {
        "accuracy": round(sum(sum(v) for v in right.values()) / n, 4),
        "per_family": {f: round(sum(right[f]) / len(right[f]), 4) for f in FAMILIES if right[f]},
        "n": n,
        "n_per_family": {f: len(right[f]) for f in FAMILIES if right[f]},
        "generation": "engine" if use_engine else "transformers",
        "routing": routing_stats(per_prompt, model.config.num_experts),
    }
    if runtime is not None and hasattr(runtime, "snapshot"):
        try:
            result["routing"]["engine_hit_rate"] = round(float(runtime.snapshot()["hit_rate"]), 4)
        except Exception as exc:  # the engine's snapshot is informative only
            log(f"engine snapshot unavailable: {exc}")
    return result


def top1_agreement(model_dir: Path, fmt: str, per_family: int = 60) -> float:
    """Share of the held-out replies' tokens where the `fmt` model's greedy choice is the source model's,
    both fed the same text (the prompt and the right reply)."""
    from engine.model.loader import load_model

    models = [load_model(str(model_dir), device="cpu", budget=1.0, profile=None, experts=f, dense=f)
              for f in ("source", fmt)]
    tokenizer = models[0].tokenizer
    same = total = 0
    for ex in held_out_examples(per_family):
        chat = [{"role": "user", "content": ex.prompt}]
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        ids = torch.tensor([prompt + tokenizer.encode(ex.reply, add_special_tokens=False)])
        with torch.no_grad():
            picks = [m.model(ids).logits[0, len(prompt) - 1:-1].argmax(-1) for m in models]
        same += int((picks[0] == picks[1]).sum())
        total += picks[0].numel()
    return same / max(1, total)


def compare_formats(model_dir: Path = DEMO_MODEL_DIR, formats=("source", "int8", "int4"), per_family: int = 60) -> dict:
    """Held-out accuracy per weight format, its loss against source, and the top-1 agreement with source."""
    rows = {f: {"accuracy": evaluate(model_dir, per_family, use_engine=True, fmt=f)["accuracy"]} for f in formats}
    for f in formats:
        rows[f]["points_lost"] = round(100 * (rows["source"]["accuracy"] - rows[f]["accuracy"]), 2) if "source" in rows else None
        rows[f]["top1_agreement"] = 1.0 if f == "source" else round(top1_agreement(model_dir, f, per_family), 4)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--per-family", type=int, default=60)
    parser.add_argument("--stock", action="store_true", help="use plain transformers even if the engine exists")
    parser.add_argument("--formats", help="compare weight formats through the engine, e.g. source,int8,int4")
    args = parser.parse_args(argv)
    if args.formats:
        rows = compare_formats(args.model, tuple(args.formats.split(",")), args.per_family)
        print(json.dumps(rows) if args.json else json.dumps(rows, indent=2))
        return
    result = evaluate(args.model, args.per_family, use_engine=False if args.stock else None)
    if args.json:
        print(json.dumps(result))
    else:
        log(json.dumps({k: v for k, v in result.items() if k != "routing"}, indent=2))
        log(f"LRU hit rate {result['routing']['lru_hit_rate']}, static {result['routing']['static_hit_rate']}, "
            f"uniform {result['routing']['uniform_hit_rate']}")


if __name__ == "__main__":
    main()

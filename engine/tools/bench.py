"""Decode speed of the hybrid engine against stock transformers, same model, same process, same loop.

Both sides run through `Session`, so sampling and KV handling cost the same; the difference is the
experts implementation (and the engine's bookkeeping). Rounds alternate between the two so that a
noisy neighbour on the machine slows both alike; the best round of each is reported.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..model.loader import LoadedModel, inspect_model, load_model
from ..model.session import GenerationParams, Session
from ..moe.quantize import FORMATS, QuantLinear, check_format

SYNTHETIC = dict(  # >= 8 layers, 32 experts, top-4, hidden 512: the shape the performance goal names
    vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
    num_experts=32, num_experts_per_tok=4, decoder_sparse_step=1, max_position_embeddings=2048,
)


def synthetic_model(out_dir: str | Path) -> Path:
    """A random Qwen3-MoE checkpoint of the benchmark's shape (no tokenizer: the bench uses token ids)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    out = Path(out_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**SYNTHETIC), dtype=torch.float32)
    model.save_pretrained(out)
    return out


def stock_model(path: str | Path, experts_implementation: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation=experts_implementation)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=None, info=inspect_model(path), runtime=None,
                       device=torch.device("cpu"))


def decode_rate(session: Session, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """Tokens/s of the decode phase (the prompt's prefill is timed apart and excluded)."""
    session.reset()
    session.eos_ids = set()
    params = GenerationParams(max_new_tokens=new_tokens, greedy=True, repetition_penalty=1.0)
    it = session.generate(prompt, params)
    ids = [next(it).token_id]  # first token comes from the prefill
    t = time.perf_counter()
    ids += [e.token_id for e in it]
    return (len(ids) - 1) / (time.perf_counter() - t), ids


ROUNDING_SHARE = 0.02  # of the largest logit: what bf16's 8-bit mantissa, accumulated, can move


@torch.inference_mode()
def logit_agreement(engine: LoadedModel, stock: LoadedModel, ids: list[int], prompt_len: int) -> dict:
    """Both models teacher-forced over the same tokens: the largest logit difference, and where their
    greedy choices first part, stock's margin between its top two there. Rounding (accumulation order,
    e.g. in bf16) explains a parting when the difference is a small share of the logits' scale and the
    margin lies inside it; a wrong expert moves logits by far more."""
    x = torch.tensor([ids], dtype=torch.long)
    a = engine.model(input_ids=x).logits[0, prompt_len - 1:].float()
    b = stock.model(input_ids=x).logits[0, prompt_len - 1:].float()
    diff = float((a - b).abs().max())
    small = diff <= ROUNDING_SHARE * float(b.abs().max())
    parted = (a.argmax(-1) != b.argmax(-1)).nonzero()
    if not len(parted):
        return {"max_logit_diff": diff, "first_divergence": None, "margin_at_divergence": None,
                "explained_by_rounding": small}
    at = int(parted[0])
    top2 = b[at].topk(2).values
    margin = float(top2[0] - top2[1])
    return {"max_logit_diff": diff, "first_divergence": at, "margin_at_divergence": margin,
            "explained_by_rounding": small and margin <= 2 * diff}


def memory_read_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a large tensor reduction: what this machine's memory delivers to torch."""
    big = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def miss_path_bandwidth(loaded: LoadedModel, tokens: int = 40) -> float:
    """Expert bytes read per second by the CPU miss path for decode tokens (random routing, every layer).

    Runs as a decode step does: spread over the cores when the runtime splits, one intra-op thread each.
    """
    rt = loaded.runtime
    g = torch.Generator().manual_seed(0)
    top_k = loaded.info.top_k
    hidden = loaded.model.config.get_text_config().hidden_size
    steps = [[torch.randperm(rt.num_experts, generator=g)[:top_k].sort().values.numpy() for _ in rt.modules]
             for _ in range(tokens)]
    x = torch.randn(1, hidden, dtype=getattr(rt.modules[0], rt.names[0]).dtype)
    best = float("inf")
    with rt.cpu.decode_threads():
        for _ in range(3):
            t = time.perf_counter()
            for step in steps:
                for layer, (module, ids) in enumerate(zip(rt.modules, step)):
                    rt.cpu.ffn(module, x, ids, layer)
            best = min(best, time.perf_counter() - t)
    return tokens * len(rt.modules) * top_k * rt.expert_bytes / best


def scheduler_overhead(loaded: LoadedModel, prompt: list[int], new_tokens: int = 24, repeats: int = 5) -> dict:
    """Time per MoE layer and decode step spent outside the expert matmuls: routing bookkeeping, policy,
    cache decisions, telemetry, activation and the weighted sum.

    Replays the experts calls of a real decode run: through the runtime; as bare matmuls (one `x @ w`
    per routed expert and matrix, nothing else), whose difference is `overhead_us`; as the experts'
    arithmetic alone (matmuls, activation, weighted sum); and through the runtime with that arithmetic
    answered at once, which is `bookkeeping_us`, the scheduler's own share. All run on one core (the
    runtime's split off).
    """
    rt = loaded.runtime
    with rt.cpu.one_core():
        return _overhead(rt, loaded, prompt, new_tokens, repeats)


def _overhead(rt, loaded: LoadedModel, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    calls = []

    def capture(event):  # the decode steps' experts calls, replayed below
        if event.hidden_states.shape[0] == 1:
            calls.append((event.module, event.hidden_states.clone(), event.top_k_index.clone(),
                          event.top_k_weights.clone()))

    rt.add_observer(capture)
    try:
        decode_rate(Session(loaded), prompt, new_tokens)
    finally:
        rt.remove_observer(capture)
    bare = []
    for module, h, idx, _ in calls:
        own = rt.cpu.weights[module._moe_layer]
        x2 = torch.randn(1, own.mats2[0].shape[0], dtype=h.dtype)
        x1, x2 = (h.numpy(), x2.numpy()) if own.backend == "numpy" else (h, x2)
        bare += [(x1, own.mats1[e], x2, own.mats2[e]) for e in idx.reshape(-1).tolist()]
    mm = {"numpy": np.matmul, "torch-mv": lambda x, b: torch.mv(b.T, x[0])}.get(rt.cpu_matmul, torch.mm)
    math = [(module, h, idx.reshape(-1).numpy(), w, module._moe_layer) for module, h, idx, w in calls]

    def through_runtime():
        for call in calls:
            rt.experts_forward(*call)

    def matmuls_only():
        for x1, w1, x2, w2 in bare:
            mm(x1, w1)
            mm(x2, w2)

    def expert_math():  # the experts' own arithmetic, nothing of the scheduler
        for call in math:
            rt.cpu.decode_token(*call)

    def bookkeeping_only():  # the runtime with the experts' arithmetic replaced by a ready result
        with _no_expert_math(rt.cpu, math[0][1]):
            through_runtime()

    best = {"runtime": float("inf"), "matmuls": float("inf"), "math": float("inf"), "bookkeeping": float("inf")}
    for _ in range(repeats):
        for name, fn in (("runtime", through_runtime), ("matmuls", matmuls_only), ("math", expert_math),
                         ("bookkeeping", bookkeeping_only)):
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    us = {name: seconds / max(1, len(calls)) * 1e6 for name, seconds in best.items()}
    return {
        "calls": len(calls),
        "experts_forward_us": us["runtime"],
        "matmuls_us": us["matmuls"],
        "expert_math_us": us["math"],
        "overhead_us": us["runtime"] - us["matmuls"],
        # routing, cache, policy and telemetry alone, timed directly: a difference of two memory-bound
        # timings (forward minus math) is mostly the noise of the bandwidth
        "bookkeeping_us": us["bookkeeping"],
    }


@contextlib.contextmanager
def _no_expert_math(cpu, hidden_states: torch.Tensor) -> Iterator[None]:
    """The CPU experts answer at once with zeros of the shape and dtype they would return (instance
    attributes shadow the methods)."""
    out = torch.zeros(1, hidden_states.shape[-1], dtype=hidden_states.dtype)
    cpu.decode_token = lambda *args: out
    try:
        yield
    finally:
        del cpu.decode_token


def run_bench(model: str | None, *, budget="0.25", policy="lru", new_tokens=64, rounds=3,
              prompt_len=32, threads: int | None = None, log=print) -> dict:
    tmp = None
    if model is None:
        tmp = tempfile.TemporaryDirectory()
        log("building a synthetic model (8 layers, 32 experts, top-4, hidden 512)…")
        model = str(synthetic_model(tmp.name))
    if threads:
        torch.set_num_threads(threads)
    engine = load_model(model, device="cpu", budget=budget, policy=policy, threads=threads, profile=None)
    vocab = engine.model.config.get_text_config().vocab_size
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    contenders = {"engine": Session(engine)}
    stock = {impl: stock_model(model, impl) for impl in ("grouped_mm", "eager")}
    for impl, loaded in stock.items():
        contenders[f"transformers[{impl}]"] = Session(loaded)
    best = {name: 0.0 for name in contenders}
    tokens = {}
    for r in range(rounds + 1):  # round 0 warms up
        for name, session in contenders.items():
            rate, ids = decode_rate(session, prompt, new_tokens)
            tokens[name] = ids
            if r:
                best[name] = max(best[name], rate)
        log(f"round {r}: " + ", ".join(f"{n} {best[n]:.1f} tok/s" for n in contenders) if r else "warm-up done")
    baseline = max(v for k, v in best.items() if k != "engine")
    # alternated, best of each: the machine's bandwidth drifts with its neighbours (36-58 GB/s seen here)
    pairs = [(miss_path_bandwidth(engine), memory_read_bandwidth()) for _ in range(3)]
    miss_bw, mem_bw = max(p[0] for p in pairs), max(p[1] for p in pairs)
    overhead = scheduler_overhead(engine, prompt) if engine.runtime else {}
    agreement = logit_agreement(engine, stock["eager"], prompt + tokens["transformers[eager]"][:-1], len(prompt))
    snap = engine.runtime.snapshot() if engine.runtime else {}
    result = {
        "model": engine.info.name,
        "threads": torch.get_num_threads(),
        "cpu_matmul": engine.runtime.cpu_matmul if engine.runtime else "torch",
        "kernel_choice": snap.get("kernel_choice", {}),
        "budget_bytes": snap.get("budget_bytes", 0),
        "policy": policy,
        "new_tokens": new_tokens,
        "decode_tokens_per_s": best,
        "ratio_vs_best_stock": best["engine"] / baseline if baseline else 0.0,
        "same_tokens": all(t == tokens["engine"] for t in tokens.values()),
        "logits_vs_eager": agreement,
        "hit_rate": snap.get("hit_rate", 0.0),
        "miss_path_bytes_per_s": miss_bw,
        "memory_read_bytes_per_s": mem_bw,
        "miss_path_bandwidth_share": miss_bw / mem_bw,
        "overhead_per_layer_step_us": overhead.get("overhead_us", 0.0),
        "overhead": overhead,
    }
    if tmp is not None:
        tmp.cleanup()
    return result


# -- weight formats ------------------------------------------------------------------------------------
LARGE = dict(SYNTHETIC, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512, num_experts=48,
             num_attention_heads=16, num_key_value_heads=4)  # 2.25 GiB of fp32 experts: far past any L3


def bytes_per_decode_token(loaded: LoadedModel) -> int:
    """Weight bytes one decode token reads: its routed experts in every MoE layer and every dense matrix
    (the embedding table is a lookup of one row, not read)."""
    info, dense = loaded.info, loaded.dense
    embed = loaded.model.get_input_embeddings().weight
    experts = info.top_k * info.num_moe_layers * info.expert_bytes_in(loaded.experts)
    return experts + info.dense_bytes_in(dense) - embed.numel() * embed.element_size()


def run_format_bench(model: str | None, formats: list[str], *, new_tokens: int = 32, rounds: int = 2,
                     prompt_len: int = 16, threads: int | None = None, log=print) -> dict:
    """Decode tok/s per weight format (experts and dense layers in it), bytes read per token and the
    share of the memory-bandwidth roofline, all on the CPU, in one process."""
    for fmt in formats:
        check_format(fmt, FORMATS)
    tmp = None
    if model is None:
        tmp = tempfile.TemporaryDirectory()
        log("building a synthetic model (8 layers, 48 experts of 1024x512, top-4: 2.25 GiB of fp32 experts)…")
        from transformers import AutoModelForCausalLM, Qwen3MoeConfig

        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(Qwen3MoeConfig(**LARGE), dtype=torch.float32).save_pretrained(tmp.name)
        model = tmp.name
    bandwidth = max(memory_read_bandwidth() for _ in range(3))
    rows = {}
    for fmt in formats:
        log(f"{fmt}: loading…")
        loaded = load_model(model, device="cpu", budget=0, threads=threads, profile=None, experts=fmt, dense=fmt)
        vocab = loaded.model.config.get_text_config().vocab_size
        prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
        session = Session(loaded)
        rate = max(decode_rate(session, prompt, new_tokens)[0] for _ in range(rounds + 1))
        per_token = bytes_per_decode_token(loaded)
        rows[fmt] = {"decode_tokens_per_s": rate, "bytes_per_token": per_token,
                     "roofline_share": per_token * rate / bandwidth, "cpu_matmul": loaded.runtime.cpu_matmul,
                     "dense_matmul": next((f"{m.fmt}-{m.act}" for m in loaded.model.modules() if isinstance(m, QuantLinear)),
                                          "torch")}
        log(f"{fmt}: {rate:.1f} tok/s, {per_token / 2**20:.0f} MiB a token, "
            f"{rows[fmt]['roofline_share']:.0%} of the roofline (experts {rows[fmt]['cpu_matmul']}, "
            f"dense {rows[fmt]['dense_matmul']})")
        loaded.runtime.close()
        del loaded, session
    base = rows.get("source", {}).get("decode_tokens_per_s")
    for row in rows.values():
        row["speedup_vs_source"] = row["decode_tokens_per_s"] / base if base else None
    if tmp is not None:
        tmp.cleanup()
    return {"model": Path(model).name, "threads": torch.get_num_threads(), "memory_read_bytes_per_s": bandwidth,
            "formats": rows}

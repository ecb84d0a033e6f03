"""`python -m engine ...`: the engine's headless face. With --json, exactly one JSON object on stdout."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from ..errors import Cancelled, EngineError, InsufficientMemoryError, ModelError, UsageError
from ..moe.cost_model import DEVICE_PROFILES
from ..cache.policies import POLICIES
from ..moe.quantize import CHOICES

log = logging.getLogger("engine")


def _default_model() -> str:
    from ..paths import DEMO_MODEL_DIR

    if not (DEMO_MODEL_DIR / "config.json").exists():
        raise EngineError(f"no --model given and the embedded demo model is missing at {DEMO_MODEL_DIR}")
    return str(DEMO_MODEL_DIR)


def _progress(fraction: float, message: str) -> None:
    print(f"\r[{fraction * 100:5.1f}%] {message:<40}", end="" if fraction < 1 else "\n", file=sys.stderr, flush=True)


def _add_model_args(p: argparse.ArgumentParser, runtime: bool = True) -> None:
    p.add_argument("--model", help="model folder or a model id in the local Hugging Face cache (default: the demo model)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model folder's own Python code (config.json's auto_map) instead of "
                        "the built-in implementation; only for folders you trust. Off unless given, every time "
                        "(the app's per-folder choice does not apply here)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    if not runtime:
        return
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--budget", default="0.25", help="cache size: bytes (512MiB, 2GiB) or a fraction of all expert bytes (0.25)")
    p.add_argument("--policy", default="auto", choices=sorted(POLICIES))
    p.add_argument("--scope", default="per_layer", choices=["per_layer", "pooled"])
    p.add_argument("--threads", type=int, help="CPU threads for the miss path (default: physical cores)")
    p.add_argument("--force-slots", action="store_true", help="real cache slots even when the fast device is the CPU")
    p.add_argument("--profile", default="auto", help="warm-start profile file, 'auto' (the saved one) or 'none'")
    p.add_argument("--experts", default="auto", choices=CHOICES,
                   help="routed experts' format: the checkpoint's precision, int8, int4, or auto (the most "
                        "precise that fits the free RAM)")
    p.add_argument("--dense", default="auto", choices=CHOICES,
                   help="dense linear layers' format (auto: the experts' on the CPU, source on a GPU)")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting, so `main` reports a
    mistake on the command line like any other failure: one JSON object with --json."""

    def error(self, message: str):
        raise UsageError(message, hint=f"run {self.prog} --help for the accepted options")


def _at_least(args, name: str, low: int, hint: str) -> None:
    value = getattr(args, name, None)
    if value is not None and value < low:
        flag = "--" + name.replace("_", "-")
        raise UsageError(f"{flag} {value}: must be {low} or more", hint=hint)


def check_args(args) -> None:
    """Refuse values that cannot work before anything loads, each with what to write instead."""
    from ..units import parse_budget

    if getattr(args, "budget", None) is not None:
        try:
            parse_budget(args.budget)
        except UsageError as e:
            raise UsageError(f"--budget {args.budget}: {e}", hint=e.hint) from None
    _at_least(args, "threads", 1, "leave --threads out to use one thread per physical core")
    _at_least(args, "max_new_tokens", 1, "ask for at least one new token, e.g. --max-new-tokens 128")
    _at_least(args, "top_k", 0, "0 turns top-k off; 40 is a common choice")
    _at_least(args, "rounds", 1, "measure at least one round, e.g. --rounds 3")
    temperature = getattr(args, "temperature", None)
    if temperature is not None and not temperature >= 0:  # `not >=` also refuses nan
        raise UsageError(f"--temperature {temperature}: must be 0 or more",
                         hint="0 always picks the most likely token (like --greedy); 0.7 is a common choice")
    top_p = getattr(args, "top_p", None)
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"--top-p {top_p}: must lie in (0, 1]", hint="1 keeps every token; 0.9 is a common choice")
    penalty = getattr(args, "repetition_penalty", None)
    if penalty is not None and not penalty > 0:
        raise UsageError(f"--repetition-penalty {penalty}: must be above 0", hint="1 turns the penalty off")
    if getattr(args, "prompt", None) is not None and not args.prompt.strip():
        raise UsageError("the prompt is empty", hint="give some text with --prompt, or token ids with --prompt-ids 1,2,3")
    if getattr(args, "prompt_ids", None) is not None:
        ids = [t.strip() for t in args.prompt_ids.split(",") if t.strip()]
        if not ids or not all(t.isdigit() for t in ids):
            raise UsageError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated token ids",
                             hint="for example --prompt-ids 1,2,3")


def _load(args):
    from ..model.loader import load_model
    from ..units import format_bytes, resolve_budget

    loaded = load_model(
        args.model or _default_model(), device=args.device, budget=args.budget, policy=args.policy,
        scope=args.scope, threads=args.threads, force_slots=args.force_slots,
        profile=None if args.profile == "none" else args.profile, trust_remote_code=args.trust_remote_code,
        progress=_progress, experts=args.experts, dense=args.dense,
    )
    rt = loaded.runtime
    if rt is not None and resolve_budget(args.budget, rt.expert_bytes_total) > rt.budget_bytes:
        log.warning("--budget %s is more than this model can use here; the cache holds %s (all experts, or what "
                    "the fast device has room for)", args.budget, format_bytes(rt.budget_bytes))
    return loaded


def _params(args):
    from ..model.sampling import GenerationParams

    sampling = any(v is not None for v in (args.temperature, args.top_p, args.top_k, args.seed))
    return GenerationParams(
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy or not sampling,
        temperature=0.7 if args.temperature is None else args.temperature,
        top_p=0.9 if args.top_p is None else args.top_p,
        top_k=40 if args.top_k is None else args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or [],
    )


def _stats(loaded, session_stats: dict) -> dict:
    snap = loaded.runtime.snapshot() if loaded.runtime else {}
    return {
        "experts": loaded.experts,
        "dense": loaded.dense,
        "experts_paged": bool(getattr(loaded, "experts_paged", False)),  # paging in from the saved copy on the disk
        **getattr(loaded, "paging", {}),
        "hit_rate": snap.get("hit_rate", 0.0),
        "hits": snap.get("hits", 0),
        "misses": snap.get("misses", 0),
        "fetches": snap.get("fetches", 0),
        "per_layer": snap.get("per_layer", []),
        "prefill_tokens_per_s": session_stats.get("prefill_tokens_per_s", 0.0),
        "decode_tokens_per_s": session_stats.get("decode_tokens_per_s", 0.0),
        "peak_fast_device_bytes": snap.get("peak_fast_device_bytes", 0),
        "peak_rss_bytes": snap.get("peak_rss_bytes", 0),
        "budget_bytes": snap.get("budget_bytes", 0),
        "policy": snap.get("policy"),
        "active_policy": snap.get("active_policy"),
        "auto_verdict": snap.get("auto_verdict"),
        "finish_reason": session_stats.get("finish_reason"),
        "prompt_tokens": session_stats.get("prompt_tokens", 0),
        "new_tokens": session_stats.get("new_tokens", 0),
    }


def remembered_kernel_choices(info) -> dict:
    """"<format>, <n> threads" -> the CPU experts' kernel choice remembered on this machine for this
    model's expert shapes (measured at a first load; absent until then)."""
    from ..moe.kernel_choices import entries

    return {f"{shape['format']}, {shape['threads']} threads": choice for shape, choice in entries("cpu-experts")
            if shape.get("matrices") == info.expert_matrices and shape.get("experts") == info.num_experts
            and (shape["format"] != "source" or shape.get("dtype") == info.dtype)}


def cmd_info(args) -> dict:
    from ..model.loader import inspect_model

    info = inspect_model(args.model or _default_model(), trust_remote_code=args.trust_remote_code)
    d = info.to_dict()
    d["memory_estimate"] = {dev: info.memory_estimate(dev) for dev in ("cpu", "cuda")}
    if d.get("experts_paged"):  # `auto` pages the experts in from the disk: the estimate says what that needs
        fmt = d["auto_experts"]
        d["memory_estimate"] = {dev: info.memory_estimate(dev, experts=fmt, dense=fmt if dev == "cpu" else "source",
                                                          paged=True) for dev in ("cpu", "cuda")}
    d["kernel_choices"] = remembered_kernel_choices(info)
    if not args.json:
        for k, v in d.items():
            print(f"{k:>20}: {v}")
    return d


def cmd_generate(args) -> dict:
    from ..model.session import Session

    loaded = _load(args)
    session = Session(loaded)
    params = _params(args)
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        events = session.generate(prompt, params)
    elif args.chat:
        events = session.chat([{"role": "user", "content": args.prompt}], params)
    else:
        events = session.generate(args.prompt, params)
    ids, text = [], []
    for ev in events:
        ids.append(ev.token_id)
        text.append(ev.text)
        if not args.json:
            print(ev.text, end="", flush=True)
    if not args.json:
        print()
    return {"token_ids": ids, "text": "".join(text), "stats": _stats(loaded, session.last_stats)}


def cmd_chat(args) -> None:
    from ..model.session import Session
    from ..units import format_bytes

    loaded = _load(args)
    session = Session(loaded)
    params = _params(args)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    cancel = threading.Event()
    generating = threading.Event()

    def on_sigint(signum, frame):
        if generating.is_set():
            cancel.set()
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    print(f"Chatting with {loaded.info.name}. Ctrl-C stops a reply; /budget X, /policy NAME, /stats, /reset, /quit.",
          file=sys.stderr)
    rt = loaded.runtime
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd in ("/quit", "/exit"):
                return
            if cmd == "/reset":
                messages, _ = messages[:1 if args.system else 0], session.reset()
                continue
            if cmd == "/budget" and rt:
                from ..units import parse_budget

                print(f"cache budget: {format_bytes(rt.set_budget(parse_budget(arg)))}", file=sys.stderr)
                continue
            if cmd == "/policy" and rt:
                rt.set_policy(arg)
                continue
            if cmd == "/stats":
                print(json.dumps(_stats(loaded, session.last_stats), indent=1), file=sys.stderr)
                continue
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        cancel.clear()
        generating.set()
        reply = []
        try:
            for ev in session.chat(messages, params, cancel):
                reply.append(ev.text)
                print(ev.text, end="", flush=True)
        finally:
            generating.clear()
        messages.append({"role": "assistant", "content": "".join(reply)})
        s = session.last_stats
        hit = f", cache hit rate {rt.snapshot()['hit_rate']:.0%}" if rt else ""
        print(f"\n[{s['new_tokens']} tokens, {s['decode_tokens_per_s']:.1f} tok/s, {s['finish_reason']}{hit}]",
              file=sys.stderr)


def cmd_quantize(args) -> dict:
    """Quantize a model's experts now and save the copy that later loads read (see quantized_copy)."""
    import time

    from ..model import quantized_copy
    from ..model.loader import inspect_model, load_model

    source = args.model or _default_model()
    info = inspect_model(source, trust_remote_code=args.trust_remote_code)
    fmt = args.experts
    if fmt not in ("int8", "int4"):
        raise EngineError(f"quantize needs --experts int8 or int4, not {fmt!r}")
    folder = quantized_copy.copy_dir(info.path, fmt)
    t = time.perf_counter()
    loaded = load_model(source, device="cpu", budget=0, profile=None, experts=fmt, dense="source",
                        trust_remote_code=args.trust_remote_code, progress=_progress)
    result = {"model": info.name, "experts": fmt, "copy": str(folder) if folder.exists() else None,
              "seconds": round(time.perf_counter() - t, 2),
              "expert_bytes_total": int(loaded.runtime.expert_bytes_total) if loaded.runtime else 0}
    if not args.json:
        print(f"{info.name}: {fmt} experts saved to {result['copy']} in {result['seconds']} s"
              if result["copy"] else f"{info.name}: the copy could not be saved (see the message above)")
    return result


def cmd_profile(args) -> dict:
    from pathlib import Path

    import numpy as np

    from ..cache.profiles import DEFAULT_PROMPTS, save_profile
    from ..model.session import Session

    args.budget, args.policy = "0", "lru"
    loaded = _load(args)
    if loaded.runtime is None:
        raise EngineError(f"{loaded.info.name} has no MoE layers: there is nothing to profile")
    prompts = Path(args.prompts).read_text().splitlines() if args.prompts else DEFAULT_PROMPTS
    prompts = [p for p in prompts if p.strip()]
    session = Session(loaded)
    params = _params(args)
    tokens = 0
    for i, p in enumerate(prompts):
        _progress(i / len(prompts), f"profiling prompt {i + 1}/{len(prompts)}")
        session.reset()
        if loaded.tokenizer is not None:
            events = session.chat([{"role": "user", "content": p}], params)
        else:
            events = session.generate([int(t) for t in p.split(",")], params)
        tokens += sum(1 for _ in events)
    _progress(1.0, "profile done")
    usage = loaded.runtime.usage
    path = save_profile(loaded.info, usage, tokens, len(prompts), args.out)
    quarter = max(1, usage.shape[1] // 4)
    top = np.sort(usage, axis=1)[:, -quarter:].sum(axis=1) / usage.sum(axis=1).clip(min=1)
    return {"profile": str(path), "prompts": len(prompts), "tokens": tokens,
            "top_quarter_token_share": float(top.mean())}


def cmd_bench(args) -> dict:
    log_err = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.suite == "seed":
        from ..units import parse_budget
        from .seed_bench import format_table, run_seed_suite, save_chart

        budget = float(args.budget) if isinstance(parse_budget(args.budget), float) else None
        if budget is None:
            raise UsageError(f"--budget {args.budget}: the seed suite takes a share of all expert bytes",
                             hint="for example --budget 0.25")
        result = run_seed_suite(args.model, budget=budget, policies=tuple(args.policies.split(",")),
                                device_profile=args.device_profile, new_tokens=args.max_new_tokens, log=log_err)
        result["chart"] = args.chart if save_chart(result, args.chart) else None
        if result["chart"] is None:
            log_err("matplotlib is not installed: no chart (pip install matplotlib)")
        print(format_table(result), file=sys.stderr if args.json else sys.stdout)
        return result
    if args.suite == "server":
        from ..server.overhead import server_overhead

        result = server_overhead(_load(args), new_tokens=args.max_new_tokens, rounds=args.rounds)
        if not args.json:
            print(f"streamed through the API: {result['api_tokens_per_s']:.1f} tok/s, in-process: "
                  f"{result['in_process_tokens_per_s']:.1f} tok/s, ratio {result['ratio']:.3f}")
        return result
    if args.formats:
        from .bench import run_format_bench

        result = run_format_bench(args.model, args.formats.split(","), new_tokens=args.max_new_tokens,
                                  rounds=args.rounds, threads=args.threads, log=log_err)
        if not args.json:
            for fmt, row in result["formats"].items():
                print(f"{fmt:>8}: {row['decode_tokens_per_s']:8.1f} tok/s  {row['bytes_per_token'] / 2**20:7.1f} MiB/token  "
                      f"{row['roofline_share']:5.0%} of roofline  {row['speedup_vs_source'] or 0:5.2f}x source")
        return result
    from .bench import run_bench

    result = run_bench(args.model, budget=args.budget, policy=args.policy, new_tokens=args.max_new_tokens,
                       rounds=args.rounds, threads=args.threads, log=log_err)
    if not args.json:
        for name, rate in result["decode_tokens_per_s"].items():
            print(f"{name:>26}: {rate:8.1f} tok/s")
        print(f"{'engine / best stock':>26}: {result['ratio_vs_best_stock']:8.2f}x  (same tokens: {result['same_tokens']})")
        agree = result["logits_vs_eager"]
        if agree["first_divergence"] is not None:
            verdict = ("within rounding: accumulation order, not a bug" if agree["explained_by_rounding"]
                       else "larger than rounding explains: a bug")
            print(f"{'tokens part at step':>26}: {agree['first_divergence']:8d}  (stock's top-two margin "
                  f"{agree['margin_at_divergence']:.4f}, max logit difference {agree['max_logit_diff']:.4f}: {verdict})")
        print(f"{'CPU miss path':>26}: {result['miss_path_bytes_per_s'] / 1e9:8.1f} GB/s = "
              f"{result['miss_path_bandwidth_share']:.0%} of memory read bandwidth "
              f"({result['memory_read_bytes_per_s'] / 1e9:.1f} GB/s, {result['threads']} threads, "
              f"{result['cpu_matmul']} matmuls)")
        print(f"{'kernel choice':>26}: {describe_choice(result['kernel_choice'])}")
        o = result["overhead"]
        print(f"{'scheduler overhead':>26}: {o['overhead_us']:8.1f} us per MoE layer and decode step "
              f"(experts forward {o['experts_forward_us']:.0f} us, bare matmuls {o['matmuls_us']:.0f} us; "
              f"routing, cache, policy and telemetry alone {o['bookkeeping_us']:.0f} us)")
    return result


def describe_choice(choice: dict) -> str:
    """One line: the CPU experts' backend and split, measured now or remembered from an earlier load."""
    if not choice:
        return "none (no MoE layers)"
    how = "remembered from an earlier load" if choice.get("remembered") else "measured at load"
    times = ", ".join(f"{k} {v:.0f} us" for k, v in choice.get("us_per_step", {}).items())
    split = "split over the cores" if choice.get("split") else "not split"
    threads = choice.get("threads")
    split += f", {threads} intra-op thread{'s' if threads != 1 else ''} a decode step" if threads else ""
    return f"{choice.get('backend')}, {split} ({how}{'; per step: ' + times if times else ''})"


def cmd_trace(args) -> dict:
    """Record the routing of a real run into a trace file (ARCHITECTURE.md's format)."""
    from pathlib import Path

    from .trace import record_trace, save_trace

    prompts = ([line for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
               if args.prompts else [args.prompt])
    if not prompts:
        raise EngineError(f"{args.prompts} holds no prompts (one per line)")
    loaded = _load(args)
    if loaded.tokenizer is None:  # a folder without a tokenizer: prompts are comma-separated token ids
        prompts = [[int(t) for t in p.split(",") if t.strip()] for p in prompts]
    trace = record_trace(loaded, prompts, _params(args), chat=args.chat, progress=_progress)
    path = save_trace(args.out, trace)
    result = {"trace": str(path), "model": trace.model, "prompts": len(prompts), "rows": len(trace),
              "moe_layers": trace.num_layers, "num_experts": trace.num_experts, "top_k": trace.top_k,
              "prefill_tokens": trace.prefill_tokens, "expert_bytes": trace.expert_bytes}
    if not args.json:
        print(f"{path}: {len(trace)} rows x {trace.num_layers} MoE layers x top-{trace.top_k} "
              f"of {trace.num_experts} experts ({len(prompts)} prompt(s))")
    return result


def _simulation_profile(path: str, trace):
    """Counts for the static policy / preload: a profile JSON or another trace (never the replayed one)."""
    from pathlib import Path

    import numpy as np

    from .trace import load_trace

    if path.endswith(".npz"):
        counts = load_trace(path).usage().astype(np.float64)
    else:
        counts = np.asarray(json.loads(Path(path).read_text())["counts"], dtype=np.float64)
    if counts.shape != (trace.num_layers, trace.num_experts):
        raise ValueError(f"{path} has shape {counts.shape}, the trace needs {(trace.num_layers, trace.num_experts)}")
    return counts


def cmd_simulate(args) -> dict | None:
    """Replay a trace under a policy and budget; compare with the offline optimum."""
    from .simulator import calibrate_cpu_bytes_per_s, simulate
    from .trace import load_trace
    from ..units import parse_size

    if args.policy == "list":
        for name, description in POLICIES.items():
            print(f"{name}\t{description}")
        return None
    if not args.trace:
        raise ValueError("simulate needs --trace FILE.npz")
    if args.slots_per_layer is None and args.total_slots is None:
        raise ValueError("simulate needs --slots-per-layer N or --total-slots N")
    trace = load_trace(args.trace)
    expert_bytes = parse_size(args.expert_bytes) if args.expert_bytes else None
    cpu = args.cpu_bytes_per_s
    if cpu == "calibrate":
        from .simulator import DEFAULT_EXPERT_BYTES

        cpu_rate = calibrate_cpu_bytes_per_s(expert_bytes or trace.expert_bytes or DEFAULT_EXPERT_BYTES)
    else:
        cpu_rate = float(cpu)
    result = simulate(
        trace, args.policy, slots_per_layer=args.slots_per_layer, total_slots=args.total_slots,
        skip_prefill=args.skip_prefill, profile=_simulation_profile(args.profile, trace) if args.profile else None,
        device_profile=args.device_profile, expert_bytes=expert_bytes, cpu_bytes_per_s=cpu_rate,
        dense_bytes=parse_size(args.dense_bytes) if args.dense_bytes else 0, overlap_copies=args.overlap_copies,
    )
    if not args.json:
        print(f"{result['policy']} ({result['scope']}, {result['capacity']} slots): hit rate {result['hit_rate']:.3f} "
              f"({result['hits']}/{result['accesses']}), optimum {result['optimal_hit_rate']:.3f}, "
              f"{result['admissions']} copies")
        if "modelled_tokens_per_s" in result:
            print(f"modelled on {result['device_profile']}: {result['modelled_tokens_per_s']:.1f} tokens/s")
    return result


def cmd_serve(args) -> None:
    from ..server.serve import api_key_from, serve

    serve(_load(args), host=args.host, port=args.port, api_key=api_key_from(args.api_key),
          model_id=args.model_name, max_waiting=args.max_queue)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m engine", description="MoE Chat's hybrid CPU-GPU MoE engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="architecture, sizes and memory estimate of a model (no weights loaded)")
    _add_model_args(p, runtime=False)
    p.set_defaults(func=cmd_info)

    def sampling(p, max_new=128):
        p.add_argument("--max-new-tokens", type=int, default=max_new)
        p.add_argument("--greedy", action="store_true", help="pick the most likely token (the default without sampling options)")
        p.add_argument("--temperature", type=float)
        p.add_argument("--top-p", type=float)
        p.add_argument("--top-k", type=int)
        p.add_argument("--seed", type=int)
        p.add_argument("--repetition-penalty", type=float, default=1.0)
        p.add_argument("--stop", action="append", help="stop string (repeatable)")

    p = sub.add_parser("generate", help="one reply to one prompt")
    _add_model_args(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt")
    group.add_argument("--prompt-ids", help="comma-separated token ids")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal")
    _add_model_args(p)
    p.add_argument("--system", help="system prompt")
    sampling(p, 512)
    p.set_defaults(func=cmd_chat, temperature=None)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for the model (loopback by default)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (anything but loopback is "
                                                       "reachable from other machines)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $MOE_CHAT_API_KEY, else none)")
    p.add_argument("--model-name", help="the model id clients use (default: the model folder's name)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; past it, 429")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("profile", help="count expert use on representative prompts and save a warm-start profile")
    _add_model_args(p)
    p.add_argument("--prompts", help="text file, one prompt per line (default: a built-in varied set)")
    p.add_argument("--out", help="where to write the profile (default: next to the user's data)")
    sampling(p, 48)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("quantize", help="quantize a model's experts ahead of time (--experts int8|int4)")
    _add_model_args(p)
    p.set_defaults(func=cmd_quantize, experts="int8")

    p = sub.add_parser("bench", help="decode: engine vs stock transformers on the CPU; seed: the paper's four "
                                       "configurations; server: the HTTP API's cost per token")
    _add_model_args(p)
    p.add_argument("--suite", default="decode", choices=["decode", "seed", "server"])
    p.add_argument("--rounds", type=int, default=3, help="decode suite: measured rounds (best is kept)")
    p.add_argument("--formats", help="decode suite: compare weight formats instead, e.g. source,int8,int4 "
                                     "(experts and dense layers in each; default model: a 2.25 GiB synthetic one)")
    p.add_argument("--policies", default="lru,predictive",
                   help="seed suite: comma-separated hybrid policies (default: the paper's LRU and our best)")
    p.add_argument("--device-profile", default="rtx3060-12gb", choices=sorted(DEVICE_PROFILES),
                   help="seed suite without a GPU: the GPU to model")
    p.add_argument("--chart", default="seed-bench.png", help="seed suite: where to save the PNG chart")
    sampling(p, 64)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("trace", help="record the expert routing of a real run into a trace file (.npz)")
    _add_model_args(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt")
    group.add_argument("--prompts", help="text file, one prompt per line (rows are concatenated)")
    p.add_argument("--out", required=True, help="trace file to write (.npz)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    sampling(p, 64)
    p.set_defaults(func=cmd_trace, budget="0", profile="none")

    p = sub.add_parser("simulate", help="replay a routing trace under a cache policy and budget; report the optimum")
    p.add_argument("--trace", help="trace file (.npz) from `trace` or any tool writing the format")
    p.add_argument("--policy", required=True, help="a policy name, or 'list' to print them")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--slots-per-layer", type=int, help="equal slots per MoE layer (per_layer scope)")
    size.add_argument("--total-slots", type=int, help="one pool of slots shared by all layers (pooled scope)")
    p.add_argument("--skip-prefill", action="store_true",
                   help="count decode rows only (prefill rows still warm the cache)")
    p.add_argument("--profile", help="profile JSON or another trace (.npz): preloaded, and the static policy's set")
    p.add_argument("--device-profile", choices=sorted(DEVICE_PROFILES), help="model tokens/s on this GPU")
    p.add_argument("--expert-bytes", help="bytes of one expert (default: the trace's, else 4MiB)")
    p.add_argument("--cpu-bytes-per-s", default="20e9", help="CPU read bandwidth of the miss path, or 'calibrate'")
    p.add_argument("--dense-bytes", help="dense bytes read per token on the device (default 0: experts only)")
    p.add_argument("--overlap-copies", action="store_true",
                   help="model copies as fully hidden behind compute (default: added in series)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_simulate)
    return parser


def _hint(e: BaseException) -> str:
    """What to do, where the error does not say it itself."""
    if getattr(e, "hint", None):
        return e.hint
    if isinstance(e, InsufficientMemoryError):
        return "close other programs, try --experts int4, or pick a smaller model"
    if isinstance(e, ModelError):
        return "check the folder named above, or pick another model with --model"
    if isinstance(e, PermissionError):
        return "check the file's permissions (ls -l), or copy the model somewhere you can read"
    if isinstance(e, OSError):
        return "check that the path exists and can be read"
    if isinstance(e, Cancelled):
        return "run the command again"
    return "see python -m engine COMMAND --help"


def _fail(e: BaseException, as_json: bool, code: int = 2) -> int:
    """One error: a JSON object on stdout with --json, and always a line (and its hint) on stderr."""
    message = str(e)
    if isinstance(e, OSError) and e.filename is not None:  # name the path, not errno's wording alone
        message = f"cannot read {e.filename}: {e.strerror or e}"
    hint = _hint(e)
    if as_json:
        print(json.dumps({"error": message, "hint": hint}))
    print(f"error: {message}\nhint: {hint}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 2 on any failure a person can fix (with --json, one error object on stdout)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        check_args(args)
        result = args.func(args)
    except (EngineError, ValueError, OSError) as e:
        return _fail(e, as_json)
    except KeyboardInterrupt:
        return _fail(Cancelled("interrupted"), as_json, 130)
    if as_json and result is not None:
        print(json.dumps(result))
    return 0

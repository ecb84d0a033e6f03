"""Generation: streaming text, stop strings, cancellation, sampling, KV reuse across turns."""

from __future__ import annotations

import threading
import time

import pytest

from engine import GenerationParams, Session, load_model
from engine.model.session import _Detokenizer, _StopFilter


@pytest.fixture(scope="module")
def session(tiny_model_factory):
    return Session(load_model(tiny_model_factory("qwen3_moe"), device="cpu", profile=None))


GREEDY = GenerationParams(max_new_tokens=12, greedy=True, repetition_penalty=1.0)


def test_streamed_text_never_splits_a_utf8_character(session):
    tok = session.tokenizer
    text = "café naïve 日本語 ✓ ok"
    ids = tok.encode(text)
    detok = _Detokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) > 3  # it did stream


def test_stop_filter_holds_back_a_possible_stop_and_cuts_at_it():
    f = _StopFilter(["</s>", "STOP"])
    out = f.feed("Hello </") + f.feed("s> never")
    assert out == "Hello " and f.stopped
    g = _StopFilter(["STOP"])
    assert g.feed("ST") == "" and g.feed("ART") == "START" and not g.stopped
    assert g.feed(" S") == " " and g.flush() == "S"


def test_stop_string_ends_the_reply(session):
    full = "".join(e.text for e in session.generate("Hello", GREEDY))
    session.reset()
    assert len(full) > 2
    stop = full[len(full) // 2: len(full) // 2 + 2]
    params = GenerationParams(max_new_tokens=12, greedy=True, repetition_penalty=1.0, stop=[stop])
    cut = "".join(e.text for e in session.generate("Hello", params))
    assert stop not in cut and full.startswith(cut)
    assert session.last_stats["finish_reason"] == "stop"


def test_cancel_from_another_thread_stops_within_one_token(session):
    cancel = threading.Event()
    params = GenerationParams(max_new_tokens=200, greedy=True)
    n = 0
    for _ in session.generate("Hello", params, cancel):
        n += 1
        if n == 3:
            threading.Thread(target=cancel.set).start()
            time.sleep(0.05)
    assert n == 4  # the token in flight when the stop landed, then nothing
    assert session.last_stats["finish_reason"] == "cancelled"


def test_cancel_before_start_runs_nothing(session):
    cancel = threading.Event()
    cancel.set()
    assert list(session.generate("Hello", GREEDY, cancel)) == []
    assert session.last_stats["finish_reason"] == "cancelled"


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(session):
    sample = GenerationParams(max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    a = [e.token_id for e in session.generate("Hello", sample)]
    session.reset()
    b = [e.token_id for e in session.generate("Hello", sample)]
    assert a == b
    session.reset()
    greedy = [e.token_id for e in session.generate("Hello", GREEDY)]
    session.reset()
    k1 = GenerationParams(max_new_tokens=12, temperature=1.0, top_k=1, seed=3, repetition_penalty=1.0)
    assert [e.token_id for e in session.generate("Hello", k1)] == greedy


def test_kv_cache_is_reused_across_turns_without_changing_the_reply(session):
    session.eos_ids = set()
    try:
        turn1 = [{"role": "user", "content": "Hello there"}]
        reply = "".join(e.text for e in session.chat(turn1, GREEDY))
        turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
        warm = [e.token_id for e in session.chat(turn2, GREEDY)]
        assert session.last_stats["reused_prompt_tokens"] > 5
        session.reset()
        cold = [e.token_id for e in session.chat(turn2, GREEDY)]
        assert session.last_stats["reused_prompt_tokens"] == 0
        assert warm == cold
    finally:
        session.eos_ids = Session(session.loaded).eos_ids


def test_stats_after_a_reply(session):
    list(session.generate("Hello", GREEDY))
    s = session.last_stats
    assert s["new_tokens"] >= 1 and s["prompt_tokens"] > 0
    assert s["finish_reason"] in ("eos", "length")
    assert s["prefill_tokens_per_s"] > 0


def test_a_conversation_longer_than_the_context_is_a_clear_error(session):
    with pytest.raises(Exception, match="no longer fits the model's context of 256 tokens"):
        list(session.generate(list(range(5, 300)), GREEDY))
    list(session.generate(list(range(5, 250)), GenerationParams(max_new_tokens=50, greedy=True)))
    assert session.last_stats["new_tokens"] <= 256 - 245 and session.last_stats["finish_reason"] in ("length", "eos")


def test_chat_leaves_out_the_oldest_turns_to_fit_the_context(session):
    long = "The cache keeps the hottest experts on the GPU. " * 6
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(12):
        messages += [{"role": "user", "content": long}, {"role": "assistant", "content": long}]
    messages.append({"role": "user", "content": "And now?"})
    params = GenerationParams(max_new_tokens=8, greedy=True)
    assert len(list(session.chat(messages, params))) >= 1
    assert session.last_stats["dropped_messages"] > 0
    assert session.last_stats["prompt_tokens"] + 8 <= 256

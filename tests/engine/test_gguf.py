"""GGUF files written here (with the gguf package's writer, llama.cpp's conventions) from tiny random
transformers models load through the engine: same greedy tokens as the safetensors folder (F32),
experts kept in their bits (Q4_0 exact, Q4_K within float32 rounding, Q8_0 re-rounded per channel)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from engine.errors import ModelError  # noqa: E402
from engine.model.loader import inspect_model, load_model  # noqa: E402
from engine.moe.interface import expert_tensors, is_experts_module  # noqa: E402
from engine.moe.quantize import dequantize, quantize  # noqa: E402

GGUF_ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama", "olmoe": "olmoe",
             "gpt_oss": "gpt-oss"}
Q = gguf.GGMLQuantizationType


def _hf_state(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.config, {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K permutation for the llama architecture (rotary pairs adjacent)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_kv(writer, folder: Path) -> None:
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = [None] * (max([*vocab.values(), *added.values()]) + 1)
    for t, i in {**vocab, **added}.items():
        tokens[i] = t
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in added else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_eos_token_id(added["<|end|>"])
    writer.add_pad_token_id(added["<|pad|>"])
    writer.add_chat_template(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
                             or (folder / "chat_template.jinja").read_text())


def _add(writer, name: str, w: np.ndarray, qtype) -> None:
    if w.ndim < 2 or qtype in (Q.F32,) or w.shape[-1] % 32:
        writer.add_tensor(name, w.astype(np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, w.astype(np.float16))
    elif qtype == Q.Q4_K and w.shape[-1] % 256:
        writer.add_tensor(name, w.astype(np.float32))
    elif qtype == Q.Q4_K:
        writer.add_tensor(name, _random_q4_k(w), raw_dtype=Q.Q4_K)
    else:
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)


def _random_q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K blocks (the gguf package only dequantizes K-quants): random codes, scales and mins sized to w."""
    rng = np.random.default_rng(0)
    blocks = w.size // 256
    out = rng.integers(0, 256, size=(blocks, 144), dtype=np.uint8)
    amax = np.float16(np.abs(w).max() / 15 / 40)
    out[:, 0:2] = np.full((blocks, 1), amax, dtype=np.float16).view(np.uint8)
    out[:, 2:4] = np.full((blocks, 1), amax / 2, dtype=np.float16).view(np.uint8)
    return out.reshape(*w.shape[:-1], w.shape[-1] // 256 * 144)


def write_gguf(folder: Path, out: Path, qtype=Q.F32, experts_qtype=None, split_max_tensors: int = 0,
               per_expert: bool = False) -> Path:
    """A GGUF of the tiny model in `folder`, as llama.cpp's converter lays it out: stacked experts
    `ffn_{gate,up,down}_exps` (`per_expert`: `ffn_gate.E`, as Mixtral files before April 2024), Q/K permuted
    for llama; 2-D tensors in `qtype` (experts in `experts_qtype`)."""
    config, state = _hf_state(folder)
    arch = GGUF_ARCH[config.model_type]
    n = config.num_hidden_layers
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n)
    writer = gguf.GGUFWriter(out, arch, split_max_tensors=split_max_tensors)
    writer.add_name("tiny " + config.model_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    writer.add_expert_count(experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_feed_forward_length(config.intermediate_size)
    if hasattr(config, "moe_intermediate_size"):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if hasattr(config, "shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    if config.model_type == "gpt_oss":
        writer.add_sliding_window(config.sliding_window)
        rope = config.rope_parameters
        writer.add_string(f"{arch}.rope.scaling.type", rope["rope_type"])
        writer.add_float32(f"{arch}.rope.scaling.factor", float(rope["factor"]))
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length", rope["original_max_position_embeddings"])
    _tokenizer_kv(writer, folder)
    eq = experts_qtype if experts_qtype is not None else qtype
    add = _add
    if per_expert:
        def add(writer, name, w, qtype):
            for e in range(w.shape[0]):
                _add(writer, name.replace("_exps.", f".{e}."), np.ascontiguousarray(w[e]), qtype)
    for key, w in state.items():
        base, _, suffix = key.rpartition(".")
        if ".experts." in key:
            layer = key.split(".")[2]
            stem = f"blk.{layer}.ffn_"
            if config.model_type == "gpt_oss":  # [E, in, out], gate/up interleaved along out
                if key.endswith("gate_up_proj"):
                    _add(writer, stem + "gate_exps.weight", w[..., 0::2].transpose(0, 2, 1).copy(), eq)
                    _add(writer, stem + "up_exps.weight", w[..., 1::2].transpose(0, 2, 1).copy(), eq)
                elif key.endswith("gate_up_proj_bias"):
                    writer.add_tensor(stem + "gate_exps.bias", w[:, 0::2].copy())
                    writer.add_tensor(stem + "up_exps.bias", w[:, 1::2].copy())
                elif key.endswith("down_proj"):
                    _add(writer, stem + "down_exps.weight", w.transpose(0, 2, 1).copy(), eq)
                else:
                    writer.add_tensor(stem + "down_exps.bias", w.copy())
            elif key.endswith("gate_up_proj"):  # [E, 2*ff, hidden], gate first
                ff = w.shape[1] // 2
                add(writer, stem + "gate_exps.weight", w[:, :ff].copy(), eq)
                add(writer, stem + "up_exps.weight", w[:, ff:].copy(), eq)
            else:
                add(writer, stem + "down_exps.weight", w, eq)
            continue
        name = names.get_name(base if suffix in ("weight", "bias") else key)
        assert name is not None, key
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            w = _permute(w, config.num_attention_heads if "q_proj" in key else config.num_key_value_heads)
        if key.endswith("shared_expert_gate.weight"):
            w = w.reshape(-1)
        full = name + ("." + suffix if suffix in ("weight", "bias") else "")
        dense_type = Q.BF16 if qtype == Q.BF16 else Q.F32  # llama.cpp keeps embeddings and output at 16/32 bits
        _add(writer, full, w, qtype if ("token_embd" not in full and "output." not in full) else dense_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def greedy(loaded, ids: list[int], steps: int = 8) -> list[int]:
    x = torch.tensor([ids], device=loaded.device)
    with torch.no_grad():
        out = loaded.model.generate(x, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


PROMPT = [5, 17, 42, 99, 7, 250, 3]
KW = dict(device="cpu", budget=0.5, profile=None, check_memory=False, dense="source")


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss"])
def test_f32_gguf_matches_safetensors(arch, tiny_model_factory, tmp_path):
    folder = tiny_model_factory(arch)
    file = write_gguf(folder, tmp_path / f"{arch}-f32.gguf")
    ref = load_model(folder, experts="source", **KW)
    got = load_model(file, experts="auto", **KW)
    assert got.experts == "source" and got.info.num_experts == 8
    assert greedy(got, PROMPT) == greedy(ref, PROMPT)
    with torch.no_grad():  # the config read back is the folder's: same logits, not just the same argmax
        diff = (got.model(torch.tensor([PROMPT])).logits - ref.model(torch.tensor([PROMPT])).logits).abs().max()
    assert diff < 1e-4
    text = "Mixture of experts models route each token"
    assert got.tokenizer(text)["input_ids"] == ref.tokenizer(text)["input_ids"]
    chat = [{"role": "user", "content": "Hello!"}]
    assert got.info.has_chat_template and got.tokenizer.eos_token == ref.tokenizer.eos_token
    assert (got.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            == ref.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))


def test_mixtral_with_one_tensor_per_expert(tiny_model_factory, tmp_path):
    """Mixtral GGUFs converted before llama.cpp stacked the experts hold `blk.N.ffn_gate.E.weight`."""
    folder = tiny_model_factory("mixtral")
    file = write_gguf(folder, tmp_path / "old.gguf", Q.F32, experts_qtype=Q.Q4_0, per_expert=True)
    assert "blk.0.ffn_gate.7.weight" in {t.name for t in gguf.GGUFReader(file).tensors}
    stacked = write_gguf(folder, tmp_path / "new.gguf", Q.F32, experts_qtype=Q.Q4_0)
    old, new = (load_model(f, experts="auto", **KW) for f in (file, stacked))
    assert old.experts == "int4" and old.info.quant == "Q4_0"
    assert all(torch.equal(a, b) for a, b in zip(_held_experts(old, 2).values(), _held_experts(new, 2).values()))
    assert greedy(old, PROMPT) == greedy(new, PROMPT)


def test_bf16_gguf_matches_the_bf16_folder(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("qwen3_moe", dtype=torch.bfloat16)
    file = write_gguf(folder, tmp_path / "bf16.gguf", Q.BF16)
    got = load_model(file, experts="auto", **KW)
    assert got.info.dtype == "bfloat16" and got.experts == "source"
    assert greedy(got, PROMPT) == greedy(load_model(folder, experts="source", **KW), PROMPT)


def _reference_experts(file: Path, layer: int) -> dict[str, torch.Tensor]:
    """The experts' values as the gguf package dequantizes them: gate_up [E, 2*ff, hidden], down."""
    reader = gguf.GGUFReader(file)
    t = {x.name: x for x in reader.tensors}

    def values(name):
        x = t[f"blk.{layer}.ffn_{name}_exps.weight"]
        return torch.from_numpy(np.array(gguf.quants.dequantize(x.data, x.tensor_type), dtype=np.float32))

    return {"gate_up_proj": torch.cat([values("gate"), values("up")], dim=1), "down_proj": values("down")}


def _held_experts(loaded, layer: int) -> dict[str, torch.Tensor]:
    module = [m for m in loaded.model.modules() if is_experts_module(m)][layer]
    t = expert_tensors(module)
    return {n: torch.stack([dequantize(q, s, loaded.experts) for q, s in zip(t[n + ".q"], t[n + ".scale"])])
            for n in ("gate_up_proj", "down_proj")}


def test_q4_0_experts_are_the_engines_int4_exactly(tiny_model_factory, tmp_path):
    file = write_gguf(tiny_model_factory("qwen3_moe"), tmp_path / "q4_0.gguf", Q.F32, experts_qtype=Q.Q4_0)
    loaded = load_model(file, experts="auto", **KW)
    assert loaded.experts == "int4"
    for layer in range(3):
        held, ref = _held_experts(loaded, layer), _reference_experts(file, layer)
        for name in held:
            assert torch.equal(held[name], ref[name]), name  # bit-exact weights
    slots = load_model(file, experts="auto", force_slots=True, **{**KW, "budget": 0.3})
    assert greedy(slots, PROMPT) == greedy(loaded, PROMPT)  # the cache never changes tokens
    # with real slots `auto` is predictive, and a GGUF model's routers give it hints as a folder's do
    assert slots.runtime.policy.name == "predictive" and all(r is not None for r in slots.runtime.routers[1:])


def test_q4_0_int4_with_float32_activations_computes_the_files_values(tiny_model_factory, tmp_path, monkeypatch):
    """With float32 activations the int4 kernel computes exactly what float32 experts holding the Q4_0
    values compute (bfloat16 activations, the engine's other choice, round the scales to 8 bits)."""
    file = write_gguf(tiny_model_factory("mixtral"), tmp_path / "q4_0.gguf", Q.F32, experts_qtype=Q.Q4_0)
    exact = load_model(file, experts="source", **KW)  # float32: Q4_0's values exactly
    monkeypatch.setenv("MOE_CHAT_CPU_MATMUL", "int4-fp32")
    int4 = load_model(file, experts="int4", **KW)
    with torch.no_grad():
        a, b = (m.model(torch.tensor([PROMPT])).logits for m in (exact, int4))
    assert (a - b).abs().max() < 1e-5


def test_q8_0_experts_are_the_engines_int8_of_the_same_values(tiny_model_factory, tmp_path):
    """Q8_0 has a scale per 32 values, the engine's int8 one per output channel: the values are re-rounded
    (not bit-exact), but they are exactly the engine's int8 of the Q8_0 values, within half a step."""
    file = write_gguf(tiny_model_factory("mixtral"), tmp_path / "q8_0.gguf", Q.F32, experts_qtype=Q.Q8_0)
    loaded = load_model(file, experts="auto", **KW)
    assert loaded.experts == "int8"
    held, ref = _held_experts(loaded, 1), _reference_experts(file, 1)
    for name in held:
        again = torch.stack([dequantize(*quantize(m, "int8"), "int8") for m in ref[name]])
        assert torch.equal(held[name], again), name
        step = ref[name].abs().amax(dim=-1, keepdim=True) / 127
        assert ((held[name] - ref[name]).abs() <= step * 0.51 + 1e-7).all(), name


def test_q4_k_experts_become_int4_groups_of_32(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("qwen3_moe", hidden=256, layers=2)
    file = write_gguf(folder, tmp_path / "q4_k.gguf", Q.F32, experts_qtype=Q.Q4_K)
    assert gguf.GGUFReader(file).tensors[0] is not None
    loaded = load_model(file, experts="int4", **KW)
    module = [m for m in loaded.model.modules() if is_experts_module(m)][0]
    q, s = expert_tensors(module)["gate_up_proj.q"], expert_tensors(module)["gate_up_proj.scale"]
    assert s.shape[1] == 256 // 32  # one scale and zero per 32 values, as Q4_K's sub-blocks
    ref = _reference_experts(file, 0)["gate_up_proj"]
    held = torch.stack([dequantize(a, b, "int4") for a, b in zip(q, s)])
    assert (held - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert greedy(loaded, PROMPT) == greedy(loaded, PROMPT)


# -- files a person can get wrong ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    from tiny_models import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("src"), "qwen3_moe", layers=2)
    return write_gguf(folder, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def test_truncated_file_is_named(small_gguf, tmp_path):
    file = _copy(small_gguf, tmp_path / "cut.gguf")
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size - 1000)
    with pytest.raises(ModelError, match="truncated"):
        inspect_model(file)


def test_bad_magic_is_named(small_gguf, tmp_path):
    file = _copy(small_gguf, tmp_path / "bad.gguf")
    with open(file, "r+b") as f:
        f.write(b"GGUX")
    with pytest.raises(ModelError, match="not a GGUF file"):
        inspect_model(file)


def test_unknown_tensor_type_is_named(small_gguf, tmp_path):
    file = _copy(small_gguf, tmp_path / "odd.gguf")
    reader = gguf.GGUFReader(file, "r+")
    reader.tensors[0].field.parts[4][0] = 250  # the tensor's GGML type
    reader.data.flush()
    del reader
    with pytest.raises(ModelError, match="GGML type 250"):
        inspect_model(file)


def test_type_the_gguf_package_cannot_dequantize_is_named(small_gguf, tmp_path):
    file = _copy(small_gguf, tmp_path / "q8_1.gguf")
    reader = gguf.GGUFReader(file, "r+")
    big = next(t for t in reader.tensors if t.tensor_type == Q.F32 and len(t.shape) == 2)
    big.field.parts[4][0] = Q.Q8_1  # known to ggml, but only as an activation type: no dequantizer
    reader.data.flush()
    del reader
    with pytest.raises(ModelError, match=f"{big.name}.*Q8_1"):
        inspect_model(file)


def test_split_file_with_a_missing_part_is_named(tiny_model_factory, tmp_path):
    write_gguf(tiny_model_factory("qwen3_moe"), tmp_path / "split.gguf", split_max_tensors=12)
    parts = sorted(tmp_path.glob("split-*.gguf"))
    assert len(parts) >= 3 and parts[0].name.endswith("-00001-of-%05d.gguf" % len(parts))
    assert inspect_model(parts[0]).num_experts == 8  # whole: loads from the first part or the folder
    assert inspect_model(tmp_path).weight_files == [p.name for p in parts]
    parts[1].unlink()
    with pytest.raises(ModelError, match=f"{parts[1].name}.*incomplete"):
        inspect_model(parts[0])


def test_unknown_architecture_is_named(tmp_path):
    file = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(file, "deepseek2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="'deepseek2' is not supported yet"):
        inspect_model(file)


def test_folder_of_gguf_files(small_gguf, tmp_path):
    """A folder holding one GGUF model loads like the file (with progress); two models must be chosen from."""
    folder = tmp_path / "lmstudio-style"
    folder.mkdir()
    _copy(small_gguf, folder / "tiny-F32.gguf")
    seen = []
    loaded = load_model(folder, experts="int8", progress=lambda f, m: seen.append(f), **{**KW, "profile": "auto"})
    assert loaded.info.quant == "F32" and loaded.info.weight_files == ["tiny-F32.gguf"]
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 10
    _copy(small_gguf, folder / "tiny-Q8_0.gguf")
    with pytest.raises(ModelError, match="holds 2 GGUF models"):
        inspect_model(folder)


def test_gguf_repo_in_the_hugging_face_cache_loads_by_its_id(small_gguf, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    snapshot = tmp_path / "hub" / "models--someone--Tiny-MoE-GGUF" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    _copy(small_gguf, snapshot / "tiny-Q8_0.gguf")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    info = inspect_model("someone/Tiny-MoE-GGUF")
    assert info.path == str(snapshot / "tiny-Q8_0.gguf") and info.num_experts == 8


def test_q4_0_memory_estimate_counts_its_float32_scales(tiny_model_factory, tmp_path):
    file = write_gguf(tiny_model_factory("qwen3_moe"), tmp_path / "q4.gguf", Q.F32, experts_qtype=Q.Q4_0)
    info = inspect_model(file)
    assert info.quant == "Q4_0" and info.to_dict()["auto_experts"] == "int4"  # the model picker's choice
    assert info.native_format("cuda") == "int8"  # the int4 kernel is the CPU's
    loaded = load_model(file, experts="int4", **KW)
    module = [m for m in loaded.model.modules() if is_experts_module(m)][0]
    held = sum(t.numel() * t.element_size() for t in expert_tensors(module).values())
    assert info.expert_bytes_in("int4") * info.num_experts == held


@pytest.mark.parametrize("qtype, nbytes, scale_at", [(Q.Q5_K, 176, (0, 2)), (Q.Q6_K, 210, (208,))])
def test_other_k_quants_are_re_quantized_at_a_bounded_cost(qtype, nbytes, scale_at):
    """Q5_K and Q6_K have no engine twin: dequantized with the gguf package, then the engine's int8
    (within half a per-channel step of the file's values) or int4 (within half a group step)."""
    from engine.gguf.tensors import expert_matrix

    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, size=(32 * 2, nbytes), dtype=np.uint8)  # 32 rows of 512 values
    for off in scale_at:
        rows[:, off:off + 2] = np.full((len(rows), 1), 1e-3, dtype=np.float16).view(np.uint8)
    rows = rows.reshape(32, 2 * nbytes)
    ref = torch.from_numpy(np.array(gguf.quants.dequantize(rows, qtype)))
    q, s = expert_matrix(rows, qtype, "int8", torch.float32)
    err8 = (dequantize(q, s, "int8") - ref).abs()
    assert (err8 <= ref.abs().amax(dim=1, keepdim=True) / 127 * 0.51 + 1e-7).all()
    q, s = expert_matrix(rows, qtype, "int4", torch.float32)
    err4 = (dequantize(q, s, "int4") - ref).abs()
    groups = ref.view(32, -1, 128)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(128, dim=1)
    assert (err4 <= step * 0.51 + 1e-3 * step.max()).all() and err4.max() > err8.max()


def test_a_profile_can_be_saved_for_a_gguf_and_follows_the_file(tiny_model_factory, tmp_path):
    import numpy as np

    from engine.cache.profiles import fingerprint, save_profile
    from engine.model.loader import inspect_model

    out = tmp_path / "m.gguf"
    write_gguf(tiny_model_factory("qwen3_moe"), out)
    info = inspect_model(out)
    path = save_profile(info, np.ones((info.num_moe_layers, info.num_experts)), tokens=4, prompts=1)
    before = fingerprint(info)
    assert path.is_file() and before in path.name
    with open(out, "ab") as f:  # a changed file is another model
        f.write(b"\0" * 64)
    assert fingerprint(info) != before

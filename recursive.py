"""
recursive.py: an MoE checkpoint's experts converted in turn, for hierarchical sparsity (CMoE's
recursive application to existing MoE models, arXiv 2502.04416). Each routed expert's GLU, and the
shared expert's where there is one, is split into shared and routed sub-experts by any method of
weaver.py; the outer router stays as it is, and a token computes the inner top-k of each of its
outer top-k experts (model.py, SplitExperts).

    python convert.py MOE_CHECKPOINT --experts 8 --active 0.5 --out DIR   # the CLI over this file

Imports model.py (the MoE layer) and weaver.py (the methods, one GLU at a time). Each routed expert
is profiled on the calibration tokens its outer router sends to it, the shared expert on all of
them. A weaver method reads its calibration as samples of a task; here an expert's tokens of each
task, in order, are cut into samples of SAMPLE_TOKENS (the last partial one dropped). An expert
sent fewer than MIN_TOKENS tokens has too little to profile, cluster and fit a router on: its
tokens are topped up with those the outer router came nearest to sending it (the smallest gap
between the expert's score and the token's k-th chosen score), and the report lists it. Every
expert of a layer is split into the same shape (so the layer stays stacked): the allocation must
be uniform or --n-shared fixed. Read top to bottom: the checks, the tokens of each expert, one
layer, the converter convert.py calls.
"""
import torch

import weaver
from model import MLP, MoEMLP, SplitExperts

SAMPLE_TOKENS = 32  # tokens per calibration sample of one expert
MIN_TOKENS = 4 * SAMPLE_TOKENS  # fewer routed tokens than this: topped up with the nearest

# -----------------------------------------------------------------------------
# the checks, before any calibration work


def check_spec(spec: weaver.ConvertSpec, moe: dict, cfg) -> None:
    """What a recursive conversion needs of the spec and the MoE, in one line each."""
    if spec.method not in weaver.METHODS:
        raise ValueError(f"--method {spec.method} converts dense checkpoints only; an MoE's "
                         f"experts are split by one of {', '.join(weaver.METHODS)}")
    if spec.compensate:
        raise ValueError("--compensate is for a one-level conversion: a split expert's parts have "
                         "no place for its bias")
    if spec.budget != "uniform":
        raise ValueError("--budget global is for a one-level conversion: a recursive one keeps "
                         "the outer top-k and splits every expert alike")
    if spec.first_dense:
        raise ValueError("--first-dense is for a one-level conversion: a recursive one keeps the "
                         "outer layout, and --dense-layers leaves whole layers unsplit")
    if spec.selection != "topk":
        raise ValueError("--selection threshold is for a one-level conversion: a split expert's "
                         "parts are chosen top-k within it")
    if any(layer and layer.get("threshold") is not None for layer in moe["layers"]):
        raise ValueError("this MoE selects its experts by threshold, which a split would not keep: "
                         "convert the dense model it came from, or one with --selection topk")
    if moe.get("compensated"):
        raise ValueError("this MoE's experts carry a compensation bias, which splitting them "
                         "would not keep: convert the dense model it came from")
    if spec.allocation == "cv" and spec.n_shared is None:
        raise ValueError("a recursive conversion splits every expert of a layer alike: use "
                         "--allocation uniform or --n-shared (the cv rule sizes each expert's "
                         "shared part apart)")
    if moe["router"] in ("gate", "oracle"):
        raise ValueError(f"an MoE routed by the {moe['router']!r} router cannot be split "
                         f"further: its router reads the whole experts")
    if moe.get("pruned_experts") or any(layer and layer.get("split") for layer in moe["layers"]):
        raise ValueError("this MoE's experts are already split (or pruned by DIVE): convert the "
                         "MoE they came from")
    sizes = {"expert": moe["expert_dim"]} | {
        f"shared expert of layer {i}": layer["shared_neurons"]
        for i, layer in enumerate(moe["layers"]) if layer and layer["shared_neurons"]}
    for what, size in sizes.items():
        if size % spec.n_experts:
            raise ValueError(f"--experts {spec.n_experts} does not divide the {what}'s "
                             f"{size} neurons: sub-experts must have equal size")
    spec.check_dense_layers(cfg.n_layers)

# -----------------------------------------------------------------------------
# the tokens of each expert


@torch.no_grad()
def routed_to(mlp: MoEMLP, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The outer top-k of each token, as the layer chooses it, and how near each expert came to
    it: flat (N, D) -> (N, K) expert ids, and (N, E) float32 each expert's score less the token's
    k-th chosen score (scores with the selection bias), in batches. The gap leaves out the
    expert's own bias: a constant per expert, it would only drown the scores of one it keeps
    out."""
    ids, gaps = [], []
    bias = mlp.router.select_bias
    for i in range(0, len(flat), weaver.BATCH_TOKENS):
        scores = mlp.router(flat[i: i + weaver.BATCH_TOKENS], mlp.experts).float()  # (n, E)
        idx = mlp.choose(scores)[0]  # (n, K)
        biased = scores if bias is None else scores + bias
        ids.append(idx)
        gaps.append(scores - biased.gather(1, idx).min(dim=-1, keepdim=True).values)
    return torch.cat(ids), torch.cat(gaps)


def nearest_tokens(routed: torch.Tensor, gap: torch.Tensor, need: int) -> torch.Tensor:
    """The ids (ascending) of an expert's tokens, routed (N,) bool, topped up to `need` with the
    others it came nearest to (the largest gap (N,))."""
    mine = routed.nonzero().squeeze(-1)
    if len(mine) >= need:
        return mine
    rest = (~routed).nonzero().squeeze(-1)
    nearest = rest[gap[rest].argsort(descending=True, stable=True)[:need - len(mine)]]
    return torch.cat([mine, nearest]).sort().values


def samples_of(flat: torch.Tensor, token_task: torch.Tensor,
               chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen tokens (ids into flat (N, D)) of each task, in order, cut into samples of
    SAMPLE_TOKENS -> (S_e, SAMPLE_TOKENS, D) and their tasks (S_e,)."""
    xs, tasks = [], []
    for t in token_task.unique().tolist():
        mine = chosen[token_task[chosen] == t]
        n = len(mine) // SAMPLE_TOKENS * SAMPLE_TOKENS
        if n:
            xs.append(flat[mine[:n]].view(-1, SAMPLE_TOKENS, flat.shape[-1]))
            tasks += [t] * (n // SAMPLE_TOKENS)
    D = flat.shape[-1]
    x = torch.cat(xs) if xs else flat.new_empty(0, SAMPLE_TOKENS, D)
    return x, torch.tensor(tasks, dtype=torch.int64, device=flat.device)


def expert_glu(mlp: MoEMLP, e: int) -> MLP:
    """Routed expert e of an MoE layer as the dense GLU weaver converts (views, no copies)."""
    experts = mlp.experts
    F_, D = experts.expert_dim, experts.gate_up_proj.shape[-1]
    with torch.device("meta"):
        glu = MLP(D, F_, experts.act)
    w13 = experts.gate_up_proj[e]  # (2F, D)
    glu.load_state_dict({"gate_proj.weight": w13[:F_], "up_proj.weight": w13[F_:],
                         "down_proj.weight": experts.down_proj[e].T}, assign=True)
    return glu.eval()

# -----------------------------------------------------------------------------
# one layer


def nested_entry(moe: MoEMLP, spec: weaver.ConvertSpec, row: dict) -> dict:
    """A converted GLU's section: its own moe options and layer entry in one dict."""
    return {"method": spec.method, "router": spec.router, "router_bias": spec.router_bias,
            "expert_dim": spec.expert_dim(len(moe.neuron_index)), **row["moe"]}


def stacked(parts: list[MoEMLP], entry: dict, n_experts: int, dim: int, act: str) -> SplitExperts:
    """The experts' one-level conversions, all of one shape, stacked into a SplitExperts."""
    with torch.device("meta"):
        split = SplitExperts(n_experts, dim, entry, act)
    state = {"neuron_index": torch.stack([p.neuron_index for p in parts])}  # (E, F)
    if split.whole is not None:  # each expert's shared GLU: (S, D) gate and up rows, (D, S) down
        state["whole.gate_up_proj"] = torch.stack([torch.cat([p.shared.gate_proj.weight,
                                                              p.shared.up_proj.weight])
                                                   for p in parts])  # (E, 2S, D)
        state["whole.down_proj"] = torch.stack([p.shared.down_proj.weight.T for p in parts])
    if split.parts is not None:  # (E J, 2F_in, D), (E J, F_in, D)
        state["parts.gate_up_proj"] = torch.cat([p.experts.gate_up_proj for p in parts])
        state["parts.down_proj"] = torch.cat([p.experts.down_proj for p in parts])
    if split.router is not None:
        for name, _ in split.router.named_parameters():
            state[f"router.{name}"] = torch.cat([p.router.get_parameter(name) for p in parts])
    split.load_state_dict({n: t.contiguous() for n, t in state.items()}, strict=True, assign=True)
    return split.eval()


@torch.no_grad()
def split_layer(mlp: MoEMLP, x: torch.Tensor, task: torch.Tensor, spec: weaver.ConvertSpec,
                seed: int, timings: dict) -> tuple[MoEMLP, dict]:
    """One MoE layer and its calibration inputs x (S, T, D) -> (the layer with every routed
    expert, and the shared one, converted by the spec's method, the report's row)."""
    S, T, D = x.shape
    flat, token_task = x.reshape(-1, D), task.repeat_interleave(T)  # (N, D), (N,)
    E = mlp.experts.gate_up_proj.shape[0]
    with weaver.timed(timings, "route"):
        idx, gap = routed_to(mlp, flat)  # (N, K), (N, E)
    # enough to keep MIN_TOKENS once samples_of drops each task's partial sample
    need = MIN_TOKENS + len(token_task.unique()) * (SAMPLE_TOKENS - 1)
    parts, topped_up, tokens = [], [], []
    for e in range(E):
        routed = (idx == e).any(dim=-1)  # (N,)
        chosen = routed.nonzero().squeeze(-1)
        tokens.append(len(chosen))
        if len(chosen) < MIN_TOKENS:  # too few to learn from: with those it came nearest to
            topped_up.append(e)
            chosen = nearest_tokens(routed, gap[:, e], need)
        xe, te = samples_of(flat, token_task, chosen)
        markers = weaver.marker_tokens(spec, xe.shape[0] * xe.shape[1], x.device)
        moe_e, row_e = weaver.convert_ffn(expert_glu(mlp, e), xe, te, spec, seed + e, markers,
                                          timings)
        parts.append(moe_e)
    entry = nested_entry(parts[0], spec, row_e)
    shapes = {(p.shared.gate_proj.weight.shape[0] if p.shared else 0, p.top_k) for p in parts}
    assert len(shapes) == 1, f"the experts were split into different shapes {shapes}"
    outer_shared = 0 if mlp.shared is None else mlp.shared.gate_proj.weight.shape[0]
    layer = {"shared_neurons": outer_shared, "routed_experts": E, "top_k": mlp.top_k,
             "split": entry}
    with weaver.timed(timings, "build"):
        split = stacked(parts, entry, E, D, mlp.act)
    row = {"experts_split": E, "split": {k: entry[k] for k in ("shared_neurons", "routed_experts",
                                                               "top_k", "expert_dim")},
           "tokens_per_expert": tokens, "topped_up": topped_up}
    shared = mlp.shared
    if isinstance(shared, MLP):  # the shared expert, on every token
        shared, row_s = weaver.convert_ffn(shared, x, task, spec, seed + E,
                                           weaver.marker_tokens(spec, S * T, x.device), timings)
        layer["shared_split"] = nested_entry(shared, spec, row_s)
        row["shared_split"] = row_s["moe"]
    mlp.experts, mlp.shared = split, shared
    return mlp, {**row, "moe": layer}


def layer_converter(spec: weaver.ConvertSpec, task: torch.Tensor, h: torch.Tensor, timings: dict):
    """For weaver.layer_loop: (an MoE layer or, between them, a dense FFN, its inputs x, layer) ->
    (the layer converted, report row). A dense FFN of an MoE (Qwen's mlp_only_layers) stays as it
    is."""
    def convert_layer(mlp, x, i):
        if not isinstance(mlp, MoEMLP):
            return mlp, {"moe": None, "kept_dense": True}
        return split_layer(mlp, x, task, spec, spec.seed + 1000 * i, timings)
    return convert_layer

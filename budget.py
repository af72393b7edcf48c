"""
budget.py: a compute budget shared across layers (beyond the papers). A conversion gives every
layer the same k active experts; `--budget global` keeps the model's total and moves routed experts
to the layers where, in the converted model, one more expert lowers the calibration loss most.

    python convert.py --budget global       # RESULTS.md, "A budget shared across layers"

How much a layer's top-k matters is measured in context, on the converted model: one forward and
backward pass over the calibration windows gives, for each layer, the loss's gradient g_t with
respect to the FFN's output at every token t (L = mean next-token loss). Changing the layer's top-k
from k to m changes that output by d_t(m) = the sum of the experts ranked k+1..m by the token's
router (negative for m < k), so to second order

    L(m) - L(k) ~ sum_t g_t . d_t(m) + (N / 2) sum_t (g_t . d_t(m))^2

(N tokens; the second term is the empirical Fisher's, with N g_t the token's own gradient). Only
scalars are needed: a_te = g_t . (expert e's output at t), summed in the router's order. The m_l
minimising the sum over layers with sum_l m_l = sum_l k_l are found exactly by dynamic programming.
The expansion is local, so a layer's top-k moves by at most TRUST of its own (and keeps at least
one expert, so its router stays). Measures that looked at each layer alone (its output error
against the residual stream's, its dropped output energy, the dense model's Fisher, its loss
converted alone) all lost to the uniform budget on held-out text (RESULTS.md).

Only top_k changes. The shared experts, the partition and the router (which scores every routed
expert whatever k is) stay, and the experts of a layer are equal, so the FFN FLOPs per token,
router included, and the parameters equal the uniform budget's exactly. The router is not refitted
for the new k. Imports model.py's MoEMLP and ACTIVATIONS.
"""
import torch
import torch.nn.functional as F

from model import ACTIVATIONS, MoEMLP

BUDGETS = ("uniform", "global")
TRUST = 0.125  # a layer's top-k moves by at most this share of its uniform k
ELEMENTS = 1 << 25  # floats per (tokens, experts, neurons) batch in expert_terms: 128 MiB
LOGITS = 1 << 26  # logits per forward batch of the gradient pass


def expert_terms(moe: MoEMLP, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """a (N, E) float32: g_t . (routed expert e's output at x_t), without forming the outputs.
    x, g: (N, D) the FFN's inputs and the loss's gradient at its output."""
    experts = moe.experts
    w13, w2 = experts.gate_up_proj.float(), experts.down_proj.float()  # (E, 2F, D), (E, F, D)
    E, F2, _ = w13.shape
    act = ACTIVATIONS[moe.act]
    batch = max(1, ELEMENTS // (E * F2))
    out = []
    for i in range(0, len(x), batch):
        xb, gb = x[i: i + batch].float(), g[i: i + batch].float()
        gate, up = torch.einsum("nd,efd->nef", xb, w13).chunk(2, dim=-1)  # (n, E, F) each
        pulled = torch.einsum("nd,efd->nef", gb, w2)  # (n, E, F): each neuron's direction . g
        out.append((act(gate) * up * pulled).sum(dim=-1))
    return torch.cat(out)


def curve_terms(moe: MoEMLP, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Over tokens x, g (N, D): (sum_t g_t . d_t(m), sum_t (g_t . d_t(m))^2), each (E+1,) float64
    for m = 0 .. E routed experts active, d_t(m) the change of the layer's output from its top_k."""
    a = expert_terms(moe, x, g)  # (N, E)
    order = moe.router(x, moe.experts).argsort(dim=-1, descending=True)  # (N, E): top-k's order
    ranked = a.gather(1, order).double()
    partial = torch.cat([ranked.new_zeros(len(a), 1), ranked.cumsum(dim=1)], dim=1)  # (N, E+1)
    change = partial - partial[:, moe.top_k: moe.top_k + 1]
    return change.sum(dim=0), change.pow(2).sum(dim=0)


def loss_curves(model, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """{layer: (E+1,) float64 the estimated change of the mean next-token loss on tokens (S, T)
    with m = 0 .. E routed experts active} for every MoE layer of model (model.Transformer) that
    routes; one forward and backward pass, windows batched to LOGITS logits."""
    layers = [i for i, b in enumerate(model.layers) if isinstance(b.mlp, MoEMLP) and b.mlp.top_k]
    first = {i: 0.0 for i in layers}
    second = {i: 0.0 for i in layers}
    seen = {}

    def keep(i):
        def hook(module, args, out):
            out.retain_grad()
            seen[i] = (args[0].detach(), out)
        return hook
    handles = [model.layers[i].mlp.register_forward_hook(keep(i)) for i in layers]
    # the embedding's output is where the graph starts: no parameter needs a gradient
    handles.append(model.embed_tokens.register_forward_hook(
        lambda module, args, out: out.detach().requires_grad_()))
    wanted = {p: p.requires_grad for p in model.parameters()}
    S, T = tokens.shape
    n = S * (T - 1)  # tokens predicted
    step = max(1, LOGITS // (T * model.lm_head.weight.shape[0]))
    try:
        for p in wanted:
            p.requires_grad_(False)
        with torch.enable_grad():
            for j in range(0, S, step):
                window = tokens[j: j + step]
                logits = model(window)[:, :-1].float()  # (b, T-1, V)
                loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten(),
                                       reduction="sum") / n
                loss.backward()
                with torch.no_grad():
                    for i in layers:
                        x, out = seen[i]
                        f1, f2 = curve_terms(model.layers[i].mlp, x.reshape(-1, x.shape[-1]),
                                             out.grad.reshape(-1, out.shape[-1]))
                        first[i], second[i] = first[i] + f1, second[i] + f2
                seen.clear()
    finally:
        for h in handles:
            h.remove()
        for p, flag in wanted.items():
            p.requires_grad_(flag)
    return {i: first[i] + n / 2 * second[i] for i in layers}


def allocate(curves: list[torch.Tensor], lowest: list[int], total: int) -> list[int]:
    """m_l in [lowest_l, len(curves_l) - 1] with sum_l m_l = total that minimise sum_l
    curves_l[m_l]: exact, by dynamic programming over the layers (cost[b] = the least sum over the
    layers so far with b experts active among them)."""
    assert len(curves) == len(lowest), f"{len(curves)} curves for {len(lowest)} layers"
    assert sum(lowest) <= total <= sum(len(c) - 1 for c in curves), \
        f"total {total} outside [{sum(lowest)}, {sum(len(c) - 1 for c in curves)}]"
    cost = torch.zeros(1, dtype=torch.float64)
    picks = []  # per layer: (budgets,) the m that reaches each budget at least cost
    for curve, low in zip(curves, lowest):
        width = len(cost) + len(curve) - 1
        new = torch.full((width,), float("inf"), dtype=torch.float64)
        pick = torch.zeros(width, dtype=torch.int64)
        for m in range(low, len(curve)):
            candidate = cost + curve[m].item()  # budgets m .. m + len(cost) - 1
            better = candidate < new[m: m + len(cost)]
            new[m: m + len(cost)][better] = candidate[better]
            pick[m: m + len(cost)][better] = m
        cost = new
        picks.append(pick)
    assert torch.isfinite(cost[total]), f"no allocation reaches {total} experts"
    chosen, b = [], total
    for pick in reversed(picks):
        chosen.append(int(pick[b]))
        b -= chosen[-1]
    assert b == 0, f"backtracking left {b} experts"
    return chosen[::-1]


@torch.no_grad()
def spread(model, tokens: torch.Tensor, trust: float = TRUST) -> dict:
    """budget global on a converted model, in place: each routing layer's top_k moved within
    trust of its own, at the same total, to minimise the estimated calibration loss on tokens
    (S, T). Sets the layers' top_k and model.cfg.moe's entries; returns the report's section."""
    curves = loss_curves(model, tokens)
    layers = sorted(curves)
    old = [model.layers[i].mlp.top_k for i in layers]
    radius = [max(1, round(trust * k)) for k in old]
    new = allocate([curves[i][: min(len(curves[i]) - 1, k + r) + 1] for i, k, r in
                    zip(layers, old, radius)],
                   [max(1, k - r) for k, r in zip(old, radius)], sum(old))
    for i, k in zip(layers, new):
        model.layers[i].mlp.top_k = k
        model.cfg.moe["layers"][i]["top_k"] = k
        if model.cfg.moe.get("topk_spread"):  # measured at the old top-k (the export's scale)
            model.cfg.moe["topk_spread"][i] = None
    return {"layers": layers, "uniform_top_k": old, "top_k": new,
            "estimated_loss_change": sum(curves[i][k].item() for i, k in zip(layers, new))}

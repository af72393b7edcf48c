"""
weaver.py: dense GLU FFNs -> MoE FFNs with no training, by ExpertWeaver (arXiv 2602.15521); CMoE
(arXiv 2502.04416), static pruning and a random partition beside it. DIVE is in dive.py.

    python convert.py            # the CLI over this file; python convert.py --help

Imports MoEMLP and ACTIVATIONS from model.py. convert_ffn works on any FFN module with gate_proj /
up_proj / down_proj Linear weights and `act`, its gate's nonlinearity by name (model.py's MLP),
given its calibration inputs. ExpertWeaver, one layer at a time (silu below is the model's act:
SiLU in the papers, tanh-GELU in Gemma):
  1. profile   a[i, j] = mean over sample j's tokens of |silu(x W_gate)_i|, x = the FFN input
  2. allocate  the paper ("cv"): per neuron CV = std / mean of its task-averaged activation; r =
               share of neurons with CV > tau; alpha = alpha_max - (alpha_max - alpha_min) * r of
               the experts are shared. By default here ("uniform"): half of the k active experts
               in every layer, which keeps more and exports as Qwen2-MoE
  3. shared    the n_shared * d_e most important neurons, one dense GLU. The paper ranks neurons
               by mean |silu(x W_gate)|; by default here by mean |silu(x W_gate) * (x W_up)|
  4. partition the rest into equal experts of d_e neurons by balanced k-means on their profiles
  5. route     the paper: an expert's router row = the mean gate row of its neurons ("centroid");
               by default here a linear router fitted in closed form to each expert's output norm
               ("lsq"). Top-k per token, outputs summed unweighted.
Optionally (--compensate, beyond the papers): each routed expert's mean output over the calibration
tokens that skip it is added for the tokens that skip it. Optionally (--selection threshold, beyond
the papers): a token takes every routed expert scoring above a per-layer threshold instead of its
top-k, at least half of k, the threshold the least at which the calibration tokens, run through the
converted model, take at most k on average. Read top to bottom: the settings; the paper's steps
(profile, allocate and share, partition, the centroid router), ExpertWeaver's plan and the MoE
layer built from it; this repository's changes (the uniform allocation in step 2, the contribution
ranking in step 3, the lsq router, 128 experts rather than the paper's 64, the compensation, the
threshold selection); the methods beside it (random, CMoE, static); the per-layer loop.
"""
import itertools
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from budget import BUDGETS
from flags import setting
from model import ACTIVATIONS, MoEMLP, glu

# -----------------------------------------------------------------------------
# the settings: what to convert into


METHODS = ("expertweaver", "cmoe", "static", "random")
ROUTERS = ("centroid", "lsq", "cmoe", "gate", "oracle", "none")  # model.Router's kinds, as here
# what makes a neuron important enough to be shared (expertweaver, random, static; CMoE ranks by its
# own activation rates): the paper's mean |silu(x W_gate)| ("activation"), or mean
# |silu(x W_gate) * (x W_up)| ("contribution"), which also counts the up projection
SHARED_BY = ("contribution", "activation")
# how many experts each layer shares (expertweaver, random): the same share of the k active experts
# in every layer ("uniform"), or the paper's rule, alpha from the layer's specialisation ("cv")
ALLOCATIONS = ("uniform", "cv")
# how a token's routed experts are picked from the router's scores (model.MoEMLP.choose)
SELECTIONS = ("topk", "threshold")
MIN_K_SHARE = 0.5  # selection threshold: every token takes at least this share of k
# the settings a method takes unless told: the paper's 64 experts, its cv rule and lsq with its
# bias, which every method but expertweaver was measured with; then each method's router, and
# expertweaver's own. lsq, not the paper's centroid router: at the same cost per token it keeps much
# more quality (RESULTS.md, "Routers"). 128 experts, half of the active ones shared and no bias:
# this repository's frontier (RESULTS.md, "Quality without training"), which also exports as
# Qwen2-MoE. --router centroid, --experts 64 --allocation cv give the paper's
PAPER_SETTINGS = {"n_experts": 64, "allocation": "cv", "router_bias": True}
METHOD_DEFAULTS = {
    "expertweaver": {"router": "lsq", "n_experts": 128, "allocation": "uniform",
                     "router_bias": False},
    "random": {"router": "lsq"}, "cmoe": {"router": "cmoe"}, "static": {"router": "none"}}
BATCH_TOKENS = 8192  # tokens per batch wherever calibration inputs are streamed through a layer
# a router's cost per token in multiply-adds x 2, for D model dims, E routed experts and n routed
# neurons. gate and oracle compute projections of every routed neuron, so they cost what those
# neurons would; lsq's bias adds E
ROUTER_FLOPS = {"centroid": lambda D, E, n: 2 * D * E, "lsq": lambda D, E, n: 2 * D * E + E,
                "cmoe": lambda D, E, n: 4 * D * E, "gate": lambda D, E, n: 2 * D * n,
                "oracle": lambda D, E, n: 6 * D * n, "trained": lambda D, E, n: 2 * D * E,
                "none": lambda D, E, n: 0}


@dataclass
class ConvertSpec:
    method: str = setting("expertweaver", "expertweaver: a shared expert of the neurons that "
                          "contribute most (sized by --allocation), balanced k-means for the "
                          "rest; cmoe: CMoE, with its own router; static: keep the most "
                          "important neurons, no routing; random: expertweaver with a random "
                          "partition", choices=METHODS)
    n_experts: int | None = setting(None, "N_e: experts per layer, shared ones included; must "
                                    "divide d_ff (default: 128 for expertweaver, 64 for the other "
                                    "methods)", flag="--experts")
    active: float = setting(0.75, "fraction of the experts (= FFN neurons) each token uses")
    router: str | None = setting(None, "override the method's router (expertweaver, random: lsq; "
                                 "cmoe: cmoe). centroid: the mean gate row (the paper's); lsq: a "
                                 "ridge fit to the norm of each expert's output, same cost; cmoe: "
                                 "CMoE's representative neurons; gate: the full gate projection "
                                 "(costly); oracle: each expert's output norm (a diagnostic upper "
                                 "bound that costs every routed expert)", choices=ROUTERS[:-1])
    router_bias: bool | None = setting(None, "lsq: fit a per-expert bias too. Qwen2-MoE's gate has "
                                       "none, so --format qwen2_moe needs --no-router-bias "
                                       "(default: without for expertweaver, with for the other "
                                       "methods)")
    allocation: str | None = setting(None, "expertweaver, random: how many experts each layer "
                                     "shares. uniform: --shared-fraction of the k active ones in "
                                     "every layer (exportable as Qwen2-MoE); cv: the paper's rule, "
                                     "alpha from the layer's specialisation (--tau, --alpha-min, "
                                     "--alpha-max) (default: uniform for expertweaver, cv for "
                                     "random)", choices=ALLOCATIONS)
    shared_fraction: float = setting(0.5, "allocation uniform: the share of the k active experts "
                                     "that is shared, rounded")
    tau: float = setting(0.6, "allocation cv: CV threshold above which a neuron is specialised")
    alpha_min: float = setting(0.2, "allocation cv: shared fraction of the most specialised layer")
    alpha_max: float = setting(0.7, "allocation cv: shared fraction of the least specialised "
                               "layer")
    n_shared: int | None = setting(None, "shared experts in every layer, overriding the method's "
                                   "rule (cmoe default: half of k)")
    shared_by: str = setting("contribution", "expertweaver, random, static: which neurons are "
                             "shared (kept). activation: the paper's mean |silu(x W_gate)|; "
                             "contribution: mean |silu(x W_gate) * (x W_up)|", choices=SHARED_BY)
    kmeans_iters: int = setting(50, "max balanced k-means iterations")
    k_act: int = setting(10, "cmoe: neurons marked per token (K_a)")
    marker_tokens: int = 16384        # CMoE: tokens whose markers are kept (CMoE uses 8 x 2048)
    dense_layers: tuple = setting((), "layer indices to leave dense, on top of --active's "
                                  "compute", type=int)
    first_dense: int = setting(0, "leave the first N layers dense and pay for them: every other "
                               "layer takes the largest k at which the model's FFN FLOPs, "
                               "routers included, stay at most those of every layer at --active "
                               "(DeepSeek's first_k_dense_replace; exports as Qwen2-MoE's "
                               "mlp_only_layers)", metavar="N")
    sequential: bool = setting(False, "profile each layer on the outputs of the already-converted "
                               "layers (CMoE's carving) instead of the dense ones")
    budget: str = setting("uniform", "how the active experts are spread over the layers. uniform: "
                          "k in every layer; global: the same total, moved "
                          "between layers to lower the converted model's calibration loss "
                          "(budget.py: one gradient pass; equal FLOPs; not exportable as "
                          "Qwen2-MoE)", choices=BUDGETS)
    selection: str = setting("topk", "how a token's routed experts are chosen. topk: the k with "
                             "the best router scores; threshold: every expert scoring above a "
                             "per-layer threshold, at least half of k, the threshold set so that "
                             "the calibration tokens take at most k on average (per-token compute "
                             "varies; not exportable as Qwen2-MoE)", choices=SELECTIONS)
    compensate: bool = setting(False, "each routed expert's mean output over the calibration "
                               "tokens that skip it is added for every token that skips it (one "
                               "bias per layer and one per expert, FLAP's compensation applied to "
                               "routing; not exportable as Qwen2-MoE)")
    seed: int = setting(0, "seeds calibration sampling, k-means and the partition")
    paid_k: int | None = None  # first_dense: the converted layers' k, set by check_layers

    # the methods and routers this spec takes (dive.DiveSpec takes its own)
    METHODS: ClassVar[tuple] = METHODS
    ROUTERS: ClassVar[tuple] = ROUTERS

    def __post_init__(self):
        self.dense_layers = tuple(self.dense_layers)
        if self.method not in self.METHODS:
            raise ValueError(f"method {self.method!r} is not one of {self.METHODS}")
        for name, value in (PAPER_SETTINGS | METHOD_DEFAULTS.get(self.method, {})).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation {self.allocation!r} is not one of {ALLOCATIONS}")
        if not 0 <= self.shared_fraction <= 1:
            raise ValueError(f"shared_fraction {self.shared_fraction} must be in [0, 1]: the share "
                             f"of the active experts that is shared")
        if self.n_experts < 1:
            raise ValueError(f"experts {self.n_experts} must be at least 1")
        if not 0 < self.active <= 1:
            raise ValueError(f"active {self.active} must be in (0, 1]: the fraction of FFN neurons "
                             f"a token uses")
        if self.shared_by not in SHARED_BY:
            raise ValueError(f"shared_by {self.shared_by!r} is not one of {SHARED_BY}")
        if not 0 <= self.alpha_min <= self.alpha_max <= 1:
            raise ValueError(f"need 0 <= alpha_min {self.alpha_min} <= alpha_max {self.alpha_max} "
                             f"<= 1")
        self.router = self.router or self.ROUTERS[0]  # a method outside the table (DIVE)
        if (self.method == "static") != (self.router == "none"):
            raise ValueError(f"router {self.router!r} does not go with method {self.method!r}: "
                             f"static pruning has no router, every other method needs one")
        if self.compensate and self.method in ("static", "dive"):
            raise ValueError(f"compensate: method {self.method} has no skipped routed experts to "
                             f"stand in for (DIVE's experts carry FLAP's own bias)")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget {self.budget!r} is not one of {BUDGETS}")
        if self.budget == "global" and self.method == "static":
            raise ValueError("budget global moves routed experts between layers: method static "
                             "has none to move (use budget uniform)")
        if self.budget == "global" and self.method == "dive":
            raise ValueError("budget global: DIVE's pruned experts overlap and carry a bias each, "
                             "which budget.py's loss estimate leaves out (use budget uniform)")
        if self.budget == "global" and self.compensate:
            raise ValueError("budget global changes which experts a token skips, which the "
                             "compensation was fitted to: use one or the other")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection {self.selection!r} is not one of {SELECTIONS}")
        if self.selection == "threshold":
            clash = "method static has no router" if self.method == "static" else \
                "DIVE's experts route their own way" if self.method == "dive" else \
                "budget global moves each layer's top-k" if self.budget == "global" else \
                "the compensation is fitted to top-k" if self.compensate else None
            if clash:
                raise ValueError(f"selection threshold: {clash} (use selection topk)")
        if self.first_dense < 0:
            raise ValueError(f"first_dense {self.first_dense} must be at least 0")
        # check_layers sets dense_layers to range(first_dense), which a copy of the spec keeps
        if self.first_dense and self.dense_layers not in ((), tuple(range(self.first_dense))):
            raise ValueError("first_dense pays for its dense layers and dense_layers does not: "
                             "give one or the other")
        if self.first_dense and self.method == "dive":
            raise ValueError("first_dense: DIVE's pruned experts are sized by --active, not by "
                             "a k to lower (use dense_layers)")
        self.check_n_shared()
        for name in ("kmeans_iters", "k_act", "marker_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")
        if self.router not in self.ROUTERS:
            raise ValueError(f"router {self.router!r} does not go with method {self.method!r}: "
                             f"choose one of {', '.join(self.ROUTERS)}")

    @property
    def k(self) -> int:
        """Experts active per token in a converted layer, shared ones included."""
        return self.paid_k or max(1, round(self.active * self.n_experts))

    def fixed_shared(self, k: int) -> int | None:
        """Experts a layer converted at k active ones shares, where the rule fixes it before
        calibration: static keeps all k, then --n-shared, CMoE's half of k, the uniform share;
        None under allocation cv, which reads it from the layer's specialisation (allocate)."""
        return k if self.router == "none" else self.n_shared if self.n_shared is not None else \
            k // 2 if self.method == "cmoe" else None if self.allocation == "cv" else \
            min(k, round(self.shared_fraction * k))

    def layer_flops(self, k: int, dim: int, ffn_dim: int) -> int:
        """FLOPs per token of one layer converted at k active experts: its k experts' neurons and
        its router, as experiments.ffn_flops counts them. Under allocation cv the shared count
        comes from calibration, so the router is counted over every expert, an upper bound."""
        d_e = self.expert_dim(ffn_dim)
        shared = self.fixed_shared(k) or 0
        routed = self.n_experts - shared
        router = ROUTER_FLOPS[self.router](dim, routed, routed * d_e) if k > shared else 0
        return 6 * dim * k * d_e + router

    def pay_for_dense(self, dim: int, ffn_dim: int, n_layers: int) -> None:
        """first_dense: the largest k for the other layers at which the model's FFN FLOPs stay at
        most those of every layer converted at --active; sets dense_layers and paid_k."""
        self.paid_k, n = None, self.first_dense
        budget = n_layers * self.layer_flops(self.k, dim, ffn_dim)
        dense = n * 6 * dim * ffn_dim
        fits = [k for k in range(1, self.n_experts + 1)
                if dense + (n_layers - n) * self.layer_flops(k, dim, ffn_dim) <= budget]
        if n >= n_layers or not fits:
            raise ValueError(f"first_dense {n}: {n} dense layers of the {n_layers} cost more than "
                             f"the whole model at --active {self.active}")
        self.dense_layers, self.paid_k = tuple(range(n)), max(fits)
        self.check_n_shared(f", the k left to the converted layers by first_dense {n}")

    def check_n_shared(self, why: str = "") -> None:
        if self.n_shared is not None and not 0 <= self.n_shared <= self.k:
            raise ValueError(f"n_shared {self.n_shared} must be in [0, k = {self.k}]{why}")

    def expert_dim(self, ffn_dim: int) -> int:
        """Neurons per routed expert: equal parts of d_ff."""
        return ffn_dim // self.n_experts

    def check_layers(self, ffn_dim: int, n_layers: int, dim: int) -> None:
        """What the spec needs of a model, checked before any calibration work; first_dense sets
        the converted layers' k here."""
        if ffn_dim % self.n_experts:
            divisors = [d for d in range(1, ffn_dim + 1) if ffn_dim % d == 0]
            near = [d for d in divisors if d < self.n_experts][-2:] + \
                [d for d in divisors if d > self.n_experts][:2]
            raise ValueError(f"intermediate_size {ffn_dim} is not divisible by --experts "
                             f"{self.n_experts}: experts must have equal size; valid counts near "
                             f"it: {', '.join(map(str, near))}")
        self.check_dense_layers(n_layers)
        if self.first_dense:
            self.pay_for_dense(dim, ffn_dim, n_layers)

    def check_dense_layers(self, n_layers: int) -> None:
        wrong = [i for i in self.dense_layers if not 0 <= i < n_layers]
        if wrong:
            raise ValueError(f"--dense-layers {', '.join(map(str, wrong))}: the model has layers "
                             f"0..{n_layers - 1}")

    def moe_section(self, ffn_dim: int) -> dict:
        """config.json's moe section, but for the per-layer entries the conversion adds."""
        return {"method": self.method, "num_experts": self.n_experts,
                "expert_dim": self.expert_dim(ffn_dim), "router": self.router,
                "router_bias": self.router_bias, "active": self.active,
                **({"first_dense": self.first_dense} if self.first_dense else {}),
                **({"budget": self.budget} if self.budget != "uniform" else {}),
                **({"selection": self.selection} if self.selection != "topk" else {}),
                **({"compensated": True} if self.compensate else {})}

    def check_tasks(self, n_tasks: int) -> None:
        """What the spec needs of the calibration text."""
        if self.method in ("expertweaver", "random") and n_tasks < 2 and self.n_shared is None \
                and self.allocation == "cv":
            raise ValueError(f"allocation cv sizes the shared expert from how neurons vary across "
                             f"tasks: give calibration text of at least 2 tasks (--calib FILE:TASK "
                             f"names one), --allocation uniform or --n-shared; got {n_tasks}")

# -----------------------------------------------------------------------------
# 1. profile: statistics of one FFN on its calibration inputs, never the activations themselves


@dataclass
class LayerStats:
    profile: torch.Tensor                # (S, d_ff) float32: a[i, j] transposed, a row per sample
    markers: torch.Tensor | None = None  # (M, d_ff) bool: CMoE's top-K_a neurons of M tokens
    contribution: torch.Tensor | None = None  # (d_ff,) float32: mean |silu(x W_gate) * (x W_up)|


@torch.no_grad()
def profile_layer(x: torch.Tensor, mlp, k_act: int | None = None,
                  marker_tokens: torch.Tensor | None = None, contribution: bool = False,
                  batch_tokens: int = BATCH_TOKENS) -> LayerStats:
    """x: (S, T, D) FFN inputs, taken in batches of about batch_tokens tokens, so memory grows with
    d_ff * batch, not with the calibration set. With k_act, also CMoE's markers of the tokens listed
    in marker_tokens (flat indices into S * T); with contribution, each neuron's mean contribution
    (which costs the up projection too)."""
    S, T, D = x.shape
    gate_w, up_w = mlp.gate_proj.weight, mlp.up_proj.weight  # (d_ff, D)
    act_fn = ACTIVATIONS[mlp.act]  # SiLU in the papers; Gemma's tanh-GELU
    profile = torch.empty(S, gate_w.shape[0], dtype=torch.float32, device=x.device)
    markers, total = [], torch.zeros(gate_w.shape[0], dtype=torch.float32, device=x.device)
    if k_act:  # CMoE scores neurons on unit-norm inputs and unit-norm weight rows
        gate_n, up_n = F.normalize(gate_w.float(), dim=1), F.normalize(up_w.float(), dim=1)
    step = max(1, batch_tokens // T)
    for i in range(0, S, step):
        xb = x[i: i + step]  # (b, T, D)
        act = act_fn(xb @ gate_w.T)  # (b, T, d_ff)
        profile[i: i + step] = act.float().abs().mean(dim=1)
        if contribution:
            h = (act * (xb @ up_w.T)).float()  # (b, T, d_ff)
            total += h.abs().sum(dim=(0, 1))
        if k_act:
            lo, hi = i * T, (i + len(xb)) * T
            here = marker_tokens[(marker_tokens >= lo) & (marker_tokens < hi)] - lo
            xn = F.normalize(xb.reshape(-1, D)[here].float(), dim=-1)  # (m, D)
            scores = (act_fn(xn @ gate_n.T) * (xn @ up_n.T)).abs()  # (m, d_ff)
            top = scores.topk(min(k_act, scores.shape[-1]), dim=-1).indices  # a small expert's
            markers.append(torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True))
    return LayerStats(profile, torch.cat(markers) if k_act else None,
                      total / (S * T) if contribution else None)

# -----------------------------------------------------------------------------
# 2. allocate and 3. share: how many experts of a layer are shared, and which neurons


def specialization(profile: torch.Tensor, task: torch.Tensor, tau: float, eps: float = 1e-6):
    """profile (S, d_ff), task (S,) -> CV per neuron (d_ff,) across the task means, and r = share of
    neurons with CV > tau (the layer's specialisation ratio)."""
    n_tasks = int(task.max()) + 1
    task = task.to(profile.device)
    sums = torch.zeros(n_tasks, profile.shape[1], device=profile.device)
    sums.index_add_(0, task, profile)
    task_mean = sums / torch.bincount(task, minlength=n_tasks)[:, None]  # (n_tasks, d_ff)
    cv = task_mean.std(dim=0, unbiased=False) / (task_mean.mean(dim=0) + eps)
    return cv, (cv > tau).float().mean().item()


def n_shared_experts(alpha: float, n_experts: int, k: int, alpha_max: float) -> int:
    """round(alpha * N_e), the paper's rule, while even the largest alpha leaves routed experts in
    the active budget k. Where alpha_max * N_e would reach k (any active below ~0.7 with the default
    alphas), that rule makes layers all-shared and routing dies, so alpha is read as a fraction of k
    instead, for every layer alike. At least one active expert stays routed whenever k < N_e."""
    n = round(alpha * n_experts) if alpha_max * n_experts < k else round(alpha * k)
    return min(n, k - 1) if k < n_experts else min(n, n_experts)


def importance(stats: LayerStats, shared_by: str) -> torch.Tensor:
    """(d_ff,) the score shared neurons are ranked by."""
    if shared_by == "activation":
        return stats.profile.mean(dim=0)
    assert stats.contribution is not None, \
        "shared_by 'contribution' needs profile_layer(..., contribution=True)"
    return stats.contribution


def split_shared(score: torch.Tensor, n_shared_neurons: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n highest-scoring neurons and the rest, each in ascending ids (the dense order, so a
    fully shared layer is the dense FFN bit for bit)."""
    shared = score.topk(n_shared_neurons).indices.sort().values
    rest = torch.ones_like(score, dtype=torch.bool)
    rest[shared] = False
    return shared, rest.nonzero().squeeze(1)

# -----------------------------------------------------------------------------
# 4. partition: balanced k-means, every cluster exactly `capacity` members


def balanced_assign_reference(cost: torch.Tensor, capacity: int) -> torch.Tensor:
    """The paper's greedy, written plainly: walk all (item, cluster) pairs by ascending cost and
    take a pair when the item is free and the cluster has room. cost: (n, K), n = K * capacity ->
    (n,)."""
    n, K = cost.shape
    assign = torch.full((n,), -1, dtype=torch.int64)
    size = [0] * K
    for p in cost.flatten().argsort(stable=True).tolist():
        i, c = divmod(p, K)
        if assign[i] < 0 and size[c] < capacity:
            assign[i] = c
            size[c] += 1
    return assign


# Why balanced_assign equals the greedy walk: it runs deferred acceptance, where free items propose
# and each cluster keeps its `capacity` cheapest proposers so far. When both sides rank by one pair
# cost, the stable matching is unique and is exactly what the greedy walk produces. A full cluster's
# worst holder only ever improves, so a free item skips the clusters that would surely turn it away
# and proposes straight to its cheapest cluster with room or with a worse holder: the same matching
# in a handful of rounds. Ties break by cluster index for an item and by item index for a cluster,
# the order of the reference's stable sort.
def balanced_assign(cost: torch.Tensor, capacity: int) -> torch.Tensor:
    """Same result as balanced_assign_reference, vectorised. cost: (n, K) -> (n,)."""
    n, K = cost.shape
    assert n == K * capacity, f"{n} items do not fill {K} clusters of {capacity}"
    items = torch.arange(n, device=cost.device)
    # each item's cluster (-1: free); each cluster's worst kept cost (inf: not full) and item
    target = torch.full((n,), -1, dtype=torch.int64, device=cost.device)
    worst_cost = torch.full((K,), float("inf"), dtype=cost.dtype, device=cost.device)
    worst_item = torch.full((K,), n, dtype=torch.int64, device=cost.device)
    free = items
    while len(free):
        c = cost[free]  # (f, K)
        beats = (c < worst_cost) | ((c == worst_cost) & (free[:, None] < worst_item))
        # lowest cluster index first
        target[free] = torch.where(beats, c, float("inf")).argmin(dim=1)
        # every cluster keeps its `capacity` best of holders and proposers, by (cost, item)
        by_cost = cost[items, target].argsort(stable=True)
        order = by_cost[target[by_cost].argsort(stable=True)]  # by cluster, then cost, then item
        counts = torch.bincount(target, minlength=K)
        first = torch.cumsum(counts, 0) - counts  # (K,) where each cluster's run starts in `order`
        rank = torch.empty_like(items)
        rank[order] = items - first[target[order]]
        free = (rank >= capacity).nonzero().squeeze(1)
        target[free] = -1
        full = counts >= capacity
        last = order[(first + capacity - 1).clamp(max=n - 1)]  # (K,) each cluster's worst kept item
        worst_cost = torch.where(full, cost[last, torch.arange(K, device=cost.device)], worst_cost)
        worst_item = torch.where(full, last, worst_item)
    return target


def balanced_kmeans(features: torch.Tensor, n_clusters: int, seed: int,
                    max_iter: int = 50) -> tuple[torch.Tensor, int]:
    """features (n, S) -> (cluster of each item (n,), iterations run). Squared Euclidean distance,
    centroids seeded from random items, iterated until no item moves or max_iter."""
    n = features.shape[0]
    capacity = n // n_clusters
    generator = torch.Generator().manual_seed(seed)
    seeds = torch.randperm(n, generator=generator)[:n_clusters].to(features.device)
    centroids = features[seeds].clone()
    assign = None
    for it in range(1, max_iter + 1):
        new = balanced_assign(torch.cdist(features, centroids).pow(2), capacity)
        if assign is not None and torch.equal(new, assign):
            return assign, it
        assign = new
        centroids = torch.zeros_like(centroids).index_add_(0, assign, features) / capacity
    return assign, max_iter


def groups_of(neurons: torch.Tensor, assign: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """neurons (n,), their clusters (n,) -> (K, n / K) neuron ids, each row ascending."""
    order = torch.argsort(assign * (int(neurons.max()) + 1) + neurons)
    return neurons[order].view(n_clusters, -1)

# -----------------------------------------------------------------------------
# 5. route: the paper's analytical router, from the built experts' weights


def centroid_router(experts) -> dict:
    """ExpertWeaver: the mean gate row of each expert's neurons, (E, D)."""
    return {"weight": experts.gate_up_proj[:, : experts.expert_dim].float().mean(dim=1)}

# -----------------------------------------------------------------------------
# a layer's plan: which neurons are shared, the routed groups and top-k; ExpertWeaver's


@dataclass
class LayerPlan:
    # (n_shared * d_e,) neuron ids, ascending (the dense order, for exactness)
    shared: torch.Tensor
    groups: torch.Tensor    # (E, d_e) neuron ids of each routed expert, each row ascending
    top_k: int
    info: dict              # what the report shows
    features: torch.Tensor | None = None  # (d_ff, M): the space the partition was made in
    p: float = 2.0          # and its distance, L_p (CMoE's representatives are chosen there)
    # how the chosen experts' outputs are weighted (model.ROUTINGS); the conversions here sum them
    routing: str = "sum"
    norm_topk: bool = False
    # (E, D) a bias added to each expert's output, or None. DIVE's pruned experts (dive.py) carry
    # one and may overlap: groups is then not a partition of the neurons
    bias: torch.Tensor | None = None


def allocate(stats: LayerStats, task: torch.Tensor, spec: ConvertSpec):
    """How many experts the layer shares: --n-shared, a fixed share of the active ones (uniform),
    or ExpertWeaver's rule, the layer's specialisation (cv); the shared neurons are the most
    important ones. -> (shared neurons, the rest, report info)."""
    d_e = stats.profile.shape[1] // spec.n_experts
    r = alpha = None
    n_se = spec.fixed_shared(spec.k)
    if n_se is None:
        _, r = specialization(stats.profile, task, spec.tau)
        alpha = spec.alpha_max - (spec.alpha_max - spec.alpha_min) * r
        n_se = n_shared_experts(alpha, spec.n_experts, spec.k, spec.alpha_max)
    shared, rest = split_shared(importance(stats, spec.shared_by), n_se * d_e)
    return shared, rest, {"r": r, "alpha": alpha}


def plan_expertweaver(stats: LayerStats, task: torch.Tensor, spec: ConvertSpec,
                      seed: int) -> LayerPlan:
    """ExpertWeaver: the allocation above; the other neurons clustered into equal experts by
    balanced k-means on their per-sample activation profiles."""
    shared, rest, info = allocate(stats, task, spec)
    d_e = stats.profile.shape[1] // spec.n_experts
    n_routed, iters = len(rest) // d_e, 0
    groups = rest.view(n_routed, d_e)  # no routed experts: (0, d_e)
    if n_routed:
        assign, iters = balanced_kmeans(stats.profile[:, rest].T.contiguous(), n_routed, seed,
                                        spec.kmeans_iters)
        groups = groups_of(rest, assign, n_routed)
    top_k = spec.k - len(shared) // d_e
    return LayerPlan(shared, groups, top_k, info | {"kmeans_iters": iters}, stats.profile.T, 2.0)

# -----------------------------------------------------------------------------
# building an MoE layer from a plan: the dense weights regrouped, nothing recomputed


def build_moe(mlp, plan: LayerPlan, router: str, router_bias: bool = True,
              compensated: bool = False) -> MoEMLP:
    """The MoE FFN of a plan, its router's parameters still unset (fit_router) and its
    compensation zero (compensate)."""
    gate_w, up_w, down_w = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    n_routed, d_e = plan.groups.shape
    compensated = compensated and n_routed > 0
    options = {"expert_dim": d_e, "router": router, "router_bias": router_bias,
               "routing": plan.routing, "norm_topk": plan.norm_topk,
               "pruned_experts": plan.bias is not None, "compensated": compensated}
    layer = {"shared_neurons": len(plan.shared), "routed_experts": n_routed, "top_k": plan.top_k}
    with torch.device("meta"):
        moe = MoEMLP(gate_w.shape[1], options, layer, mlp.act)
    state = {"neuron_index": torch.cat([plan.shared, plan.groups.flatten()])}
    if len(plan.shared):
        state |= {"shared.gate_proj.weight": gate_w[plan.shared],
                  "shared.up_proj.weight": up_w[plan.shared],
                  "shared.down_proj.weight": down_w[:, plan.shared]}
    if n_routed:
        state |= {"experts.gate_up_proj": torch.cat([gate_w[plan.groups], up_w[plan.groups]],
                                                    dim=1),  # (E, 2F, D)
                  "experts.down_proj": down_w[:, plan.groups].permute(1, 2, 0)}  # (E, F, D)
    if plan.bias is not None:
        state["experts.down_bias"] = plan.bias  # (E, D)
    if compensated:
        state |= {"experts.down_bias": down_w.new_zeros(n_routed, down_w.shape[0]),
                  "bias": down_w.new_zeros(down_w.shape[0])}
    state = {n: t.contiguous() for n, t in state.items()}
    result = moe.load_state_dict(state, strict=False, assign=True)
    assert all(n.startswith("router.") for n in result.missing_keys), result.missing_keys
    return moe.train(mlp.training)  # a model in eval mode stays so


def set_router(moe: MoEMLP, params: dict[str, torch.Tensor]) -> None:
    """The router's parameters, in the experts' dtype."""
    dtype = moe.experts.gate_up_proj.dtype
    params = {n: t.to(dtype).contiguous() for n, t in params.items()}
    moe.router.load_state_dict(params, strict=True, assign=True)

# -----------------------------------------------------------------------------
# this repository's router, lsq: a linear router fitted in closed form to what each expert
# contributes, on the layer's calibration inputs


def captured(scores: torch.Tensor, truth: torch.Tensor, top_k: int) -> float:
    """Share of the oracle's captured contribution that a router's top-k captures: per token, the
    true contribution of the experts it picks over that of the best top_k (1.0 = the oracle). (N, E)
    each."""
    picked = truth.gather(1, scores.topk(top_k, dim=-1).indices).sum()
    return (picked / truth.topk(top_k, dim=-1).values.sum()).item()


def validation_samples(task: torch.Tensor, every: int = 4) -> torch.Tensor:
    """(S,) bool: every `every`-th sample of each task (its 4th, 8th, ...), held out to choose a
    fit."""
    rank = torch.zeros_like(task)
    for t in task.unique():
        where = (task == t).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    return rank % every == every - 1


RIDGE = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # ridge strengths, relative to the mean of diag(X^T X)
UNVALIDATED = ("linear", 1e-3)  # target and strength when no calibration window can be held out


def rank_in_token(y: torch.Tensor) -> torch.Tensor:
    # (n, E) -> each expert's rank within its token, 0 = smallest contribution, as a fraction of E
    return y.argsort(dim=1).argsort(dim=1).float() / y.shape[1]


# what the regression predicts: the contribution, its log (which weighs the small contributions that
# decide which experts drop out), or only the experts' order within the token
TARGETS = {"linear": lambda y, s: y, "log": lambda y, s: torch.log1p(y / s),
           "rank": lambda y, s: rank_in_token(y)}


@dataclass
class NormalEquations:
    """X^T X and X^T Y of the rows [x, 1] against every target, for the fitting tokens and for the
    held-out ones apart (the final fit uses both), and a bounded sample of held-out tokens."""
    gram: dict          # "fit" / "val" -> (D+1, D+1) float64
    cross: dict         # "fit" / "val" -> target name -> (D+1, E) float64
    val_x: torch.Tensor  # (n, D+1) float64: the held-out sample, scored with `captured`
    val_y: torch.Tensor  # (n, E) float32: its true contributions


def accumulate(x: torch.Tensor, task: torch.Tensor, contributions, n_experts: int,
               batch_tokens: int, max_val_tokens: int, bias: bool = True) -> NormalEquations:
    """Streams the calibration inputs x (S, T, D) once; memory stays two (D+1)^2 matrices and at
    most max_val_tokens held-out tokens (evenly spaced), whatever the number of tokens. Without bias
    the rows are x alone."""
    S, T, D = x.shape
    held = validation_samples(task)
    width = D + 1 if bias else D
    zeros = lambda cols: torch.zeros(width, cols, dtype=torch.float64, device=x.device)
    parts = ("fit", "val")
    eq = NormalEquations({part: zeros(width) for part in parts},
                         {part: {name: zeros(n_experts) for name in TARGETS} for part in parts},
                         torch.empty(0), torch.empty(0))
    n_val = int(held.sum()) * T
    sampled = torch.zeros(n_val, dtype=torch.bool)  # the held-out tokens scored, evenly spaced
    sampled[torch.linspace(0, n_val - 1, min(n_val, max_val_tokens)).long()] = True
    val_x, val_y, scale, seen = [], [], None, 0
    step = max(1, batch_tokens // T)
    for i in range(0, S, step):
        xb = x[i: i + step].reshape(-1, D)  # (b*T, D)
        y = contributions(xb)  # (b*T, E)
        scale = scale if scale is not None else y.mean().clamp_min(1e-12)  # the log target's unit
        x1 = xb.double()  # (b*T, D), with a column of ones for the bias: (b*T, D+1)
        if bias:
            x1 = torch.cat([xb.float(), torch.ones(len(xb), 1, device=x.device)], dim=1).double()
        fit = (~held[i: i + step].to(x.device)).repeat_interleave(T)
        for part, rows in (("fit", fit), ("val", ~fit)):
            eq.gram[part] += x1[rows].T @ x1[rows]
            for name, target in TARGETS.items():
                eq.cross[part][name] += x1[rows].T @ target(y[rows], scale).double()
        kept = sampled[seen: seen + int((~fit).sum())].to(x.device)
        seen += len(kept)
        val_x.append(x1[~fit][kept])
        val_y.append(y[~fit][kept])
    eq.val_x, eq.val_y = torch.cat(val_x), torch.cat(val_y)
    return eq


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, lam: float, unit: torch.Tensor,
                bias: bool = True) -> torch.Tensor:
    """(gram + lam * unit * I') w = cross, I' leaving the bias (the last row) unshrunk. By Cholesky
    (positive definite for lam > 0): one factorisation serves every column, at half the cost of an
    LU."""
    penalty = torch.ones(len(gram), dtype=torch.float64, device=gram.device)
    if bias:
        penalty[-1] = 0
    factor = torch.linalg.cholesky(gram + torch.diag(lam * unit * penalty))
    return torch.cholesky_solve(cross, factor)


def choose_fit(eq: NormalEquations, top_k: int, unit: torch.Tensor,
               bias: bool) -> tuple[tuple, dict]:
    """The (target, ridge strength) whose fit on the fitting tokens captures most on the held-out
    ones."""
    E = eq.val_y.shape[1]
    scores = {}
    for lam in RIDGE:
        targets = torch.cat(list(eq.cross["fit"].values()), dim=1)  # every target at once
        w = ridge_solve(eq.gram["fit"], targets, lam, unit, bias)
        for j, name in enumerate(eq.cross["fit"]):
            predicted = (eq.val_x @ w[:, j * E:(j + 1) * E]).float()
            scores[(name, lam)] = captured(predicted, eq.val_y, top_k)
    best = max(scores, key=scores.get)
    return best, {"lsq_target": best[0], "lsq_ridge": best[1], "lsq_val_captured": scores[best]}


@torch.no_grad()
def lsq_router(x: torch.Tensor, task: torch.Tensor, contributions, n_experts: int, top_k: int,
               batch_tokens: int = BATCH_TOKENS, max_val_tokens: int = 4096,
               bias: bool = True) -> tuple[dict, dict]:
    """A linear router [x, 1] -> score per expert (x alone without bias), fitted by ridge regression
    (float64) to the experts' true contributions (contributions: (n, D) -> (n, E)) on the layer's
    calibration inputs x (S, T, D): accumulate the normal equations, choose a target and strength on
    held-out windows, solve on all."""
    eq = accumulate(x, task, contributions, n_experts, batch_tokens, max_val_tokens, bias)
    D = x.shape[-1]
    unit = eq.gram["fit"].diagonal()[:D].mean()
    if len(eq.val_x):
        (name, lam), info = choose_fit(eq, top_k, unit, bias)
    else:
        (name, lam), info = UNVALIDATED, {}
    gram, cross = eq.gram["fit"] + eq.gram["val"], eq.cross["fit"][name] + eq.cross["val"][name]
    w = ridge_solve(gram, cross, lam, unit, bias)  # (D+1, E), or (D, E)
    return {"weight": w[:D].T.float(), **({"bias": w[D].float()} if bias else {})}, info

# -----------------------------------------------------------------------------
# compensation (beyond the papers): FLAP's bias for pruned neurons, applied to the experts a token
# skips


@torch.no_grad()
def compensate(moe: MoEMLP, x: torch.Tensor, batch_tokens: int = BATCH_TOKENS) -> dict:
    """Each routed expert's mean output over the calibration tokens x (S, T, D) that the router
    does not send to it, m_e, stands in for it on every token that skips it: the layer adds
    sum_e m_e (moe.bias) and each chosen expert takes its own m_e back out (its down_bias). Per
    expert, m_e is the constant that leaves the least squared error on the calibration tokens that
    skip it. Returns the report's info: the stand-in's norm against the experts' mean output's."""
    flat = x.reshape(-1, x.shape[-1])  # (N, D)
    experts = moe.experts
    E, D = experts.down_proj.shape[0], flat.shape[1]
    sums = torch.zeros(E, D, dtype=torch.float32, device=flat.device)
    skipped = torch.zeros(E, dtype=torch.float32, device=flat.device)
    output_norm = 0.0
    for i in range(0, len(flat), batch_tokens):
        xb = flat[i: i + batch_tokens]
        idx, _ = moe.route(xb)
        skips = torch.ones(len(xb), E, device=flat.device).scatter_(1, idx, 0.0)  # (n, E)
        skipped += skips.sum(dim=0)
        for e in range(E):
            y = glu(xb, experts.gate_up_proj[e], experts.down_proj[e], moe.act).float()  # (n, D)
            sums[e] += skips[:, e] @ y
            output_norm += y.norm(dim=-1).sum().item()
    means = sums / skipped.clamp_min(1)[:, None]  # (E, D); 0 for an expert no token skips
    experts.down_bias.copy_(-means)
    moe.bias.copy_(means.sum(dim=0))
    return {"compensation_norm_over_output": means.sum(dim=0).norm().item()
            / max(output_norm / len(flat), 1e-30)}

# -----------------------------------------------------------------------------
# threshold selection (beyond the papers): a token takes the experts its router scores above a
# per-layer threshold, so compute follows the token at the same mean


def router_scores(moe: MoEMLP, x: torch.Tensor, batch_tokens: int = BATCH_TOKENS):
    """The router's scores (S T, E) float32 on the calibration inputs x (S, T, D)."""
    flat = x.reshape(-1, x.shape[-1])
    return torch.cat([moe.router(flat[i: i + batch_tokens], moe.experts)
                      for i in range(0, len(flat), batch_tokens)])


def mean_selected(scores: torch.Tensor, threshold: float, min_k: int) -> float:
    """Experts a token takes on average, scores (N, E), under threshold selection."""
    return (scores > threshold).sum(dim=-1).clamp(min=min_k).double().mean().item()


def fit_threshold_reference(scores: torch.Tensor, top_k: int, min_k: int) -> float:
    """fit_threshold by trying every candidate: slow, obvious, for the tests."""
    candidates = sorted(set(scores.flatten().tolist()))
    return next(t for t in candidates if mean_selected(scores, t, min_k) <= top_k)


@torch.no_grad()
def fit_threshold(scores: torch.Tensor, top_k: int, min_k: int) -> float:
    """The lowest threshold, among the scores (N, E) themselves, at which the tokens take at most
    top_k experts on average (each at least min_k, every one above the threshold): per-token
    selection at no more compute than top-k on these tokens. The mean only falls as the threshold
    rises, so a bisection over the sorted scores finds it."""
    assert 0 <= min_k <= top_k <= scores.shape[1], f"need 0 <= {min_k} <= {top_k} <= experts"
    values = scores.flatten().sort().values
    lo, hi = 0, len(values) - 1  # the highest score selects nothing, so it always qualifies
    while lo < hi:
        mid = (lo + hi) // 2
        if mean_selected(scores, values[mid].item(), min_k) <= top_k:
            hi = mid
        else:
            lo = mid + 1
    return values[lo].item()


@torch.no_grad()
def set_threshold(moe: MoEMLP, x: torch.Tensor, row: dict) -> dict:
    """Threshold selection for a converted FFN (its router fitted), on the inputs x (S, T, D) the
    calibration windows give it in the converted model (layer_loop's finish): the threshold, and
    the report row's updates (its config entry, the mean experts per token, the load)."""
    if not moe.top_k:
        return {}
    scores = router_scores(moe, x)
    moe.min_k = round(MIN_K_SHARE * moe.top_k)
    moe.threshold = fit_threshold(scores, moe.top_k, moe.min_k)
    return {"threshold": moe.threshold, "min_k": moe.min_k,
            "mean_top_k": mean_selected(scores, moe.threshold, moe.min_k),
            **load_fields(moe, scores),  # the load under the selection now in force
            "moe": {**row["moe"], "threshold": moe.threshold, "min_k": moe.min_k}}

# -----------------------------------------------------------------------------
# the methods beside it: a random partition, CMoE (with its router), static pruning


def plan_random(stats: LayerStats, task: torch.Tensor, spec: ConvertSpec, seed: int) -> LayerPlan:
    """ExpertWeaver's allocation with the other neurons split into equal experts at random."""
    shared, rest, info = allocate(stats, task, spec)
    d_e = stats.profile.shape[1] // spec.n_experts
    generator = torch.Generator().manual_seed(seed)
    groups = rest[torch.randperm(len(rest), generator=generator).to(rest.device)].view(-1, d_e)
    top_k = spec.k - len(shared) // d_e
    return LayerPlan(shared, groups.sort(dim=1).values, top_k, info | {"kmeans_iters": 0},
                     stats.profile.T, 2.0)


def representatives(features: torch.Tensor, groups: torch.Tensor, p: float) -> torch.Tensor:
    """Position within its expert of the member nearest the expert's centroid, in the space the
    partition was made in (features (d_ff, M), L_p distance). groups (E, F) -> (E,)."""
    members = features[groups].float()  # (E, F, M)
    return torch.cdist(members, members.mean(dim=1, keepdim=True), p=p).squeeze(-1).argmin(dim=1)


def cmoe_router(experts, position: torch.Tensor) -> dict:
    """CMoE: the unit-norm gate and up rows of each expert's representative neuron."""
    e = torch.arange(len(position), device=position.device)
    gate = experts.gate_up_proj[e, position].float()  # (E, D)
    up = experts.gate_up_proj[e, experts.expert_dim + position].float()
    return {"weight": F.normalize(gate, dim=1), "up": F.normalize(up, dim=1)}


def plan_cmoe(stats: LayerStats, task: torch.Tensor, spec: ConvertSpec, seed: int) -> LayerPlan:
    """CMoE as in its reference code: shared = the highest activation (marking) rates, half of the
    active experts; one balanced assignment of the other neurons' marker columns (L1) to centroids
    seeded from the highest-rate ones."""
    markers = stats.markers  # (M, d_ff) bool
    d_e = markers.shape[1] // spec.n_experts
    rate = markers.float().mean(dim=0)  # (d_ff,) share of tokens that mark each neuron
    n_se = spec.fixed_shared(spec.k)
    shared, rest = split_shared(rate, n_se * d_e)
    n_routed = spec.n_experts - n_se
    groups = rest.view(n_routed, d_e)  # no routed experts: (0, d_e)
    if n_routed:
        columns = markers[:, rest].T.float()  # (n_rest, M) binary
        seeds = columns[rate[rest].topk(n_routed).indices]  # (n_routed, M) binary
        # L1 between binary vectors: |a| + |b| - 2 a.b, one matmul, not an (n, K, M) difference
        cost = columns.sum(1, keepdim=True) + seeds.sum(1)[None, :] - 2 * columns @ seeds.T
        groups = groups_of(rest, balanced_assign(cost, d_e), n_routed)
    top_k = spec.k - n_se
    return LayerPlan(shared, groups, top_k, {"r": None, "alpha": None, "kmeans_iters": 1},
                     markers.T, 1.0)


def plan_static(stats: LayerStats, task: torch.Tensor, spec: ConvertSpec, seed: int) -> LayerPlan:
    """Structured pruning: the k * d_e most important neurons always on; the others kept in the
    checkpoint as experts that are never selected (top_k = 0): the index map covers every neuron."""
    d_e = stats.profile.shape[1] // spec.n_experts
    shared, rest = split_shared(importance(stats, spec.shared_by), spec.k * d_e)
    return LayerPlan(shared, rest.view(-1, d_e), 0, {"r": None, "alpha": None, "kmeans_iters": 0})


PLANS = {"expertweaver": plan_expertweaver, "random": plan_random, "cmoe": plan_cmoe,
         "static": plan_static}

# -----------------------------------------------------------------------------
# the per-layer loop: profile, plan, build and route each FFN on the inputs it really sees


def fit_router(moe: MoEMLP, plan: LayerPlan, x: torch.Tensor, task: torch.Tensor) -> dict:
    """Sets the router's parameters, from the experts (centroid, cmoe) or fitted on the layer's
    calibration inputs x (S, T, D) (lsq); gate and oracle have none. Returns the report's info."""
    if moe.router is None:
        return {}
    kind, experts, info = moe.router.kind, moe.experts, {}
    if kind == "centroid":
        params = centroid_router(experts)
    elif kind == "cmoe":
        params = cmoe_router(experts, representatives(plan.features, plan.groups, plan.p))
    elif kind == "lsq":
        params, info = lsq_router(x, task, experts.contributions, len(plan.groups), moe.top_k,
                                  bias=moe.router.bias is not None)
    else:
        params = {}
    set_router(moe, params)
    return info


@torch.no_grad()
def load_fields(moe: MoEMLP, scores: torch.Tensor, batch_tokens: int = BATCH_TOKENS) -> dict:
    """The report row's load: tokens routed to each expert, from the router's scores (N, E) on the
    calibration tokens, and the busiest expert's load over the mean."""
    counts = torch.zeros(scores.shape[1], dtype=torch.int64, device=scores.device)
    for part in scores.split(batch_tokens):
        idx = moe.choose(part)[0]
        counts += torch.bincount(idx[idx >= 0], minlength=len(counts))
    return {"load": counts.tolist(),
            "load_max_over_mean": (counts.max() / counts.float().mean()).item()}


@contextmanager
def timed(timings: dict, stage: str):
    t0 = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def run_batched(run, block, h: torch.Tensor, capture: bool = False):
    """run(block, .) over h (n, T, D) in batches of about BATCH_TOKENS tokens -> the block's output
    (n, T, D), and with capture also its FFN's inputs (n, T, D), taken by a hook while the block
    runs, so nothing of the block is re-implemented."""
    batch = max(1, BATCH_TOKENS // h.shape[1])  # windows per forward batch
    inputs = []
    hook = block.mlp.register_forward_pre_hook(lambda module, args: inputs.append(args[0])) \
        if capture else None
    out = torch.cat([run(block, h[j: j + batch]) for j in range(0, len(h), batch)])
    if hook is not None:
        hook.remove()
    return (out, torch.cat(inputs)) if capture else out


@torch.no_grad()
def convert_ffn(mlp, x: torch.Tensor, task: torch.Tensor, spec: ConvertSpec, seed: int,
                marker_tokens: torch.Tensor | None = None, timings: dict | None = None):
    """One dense FFN (gate_proj / up_proj / down_proj) and its calibration inputs x (S, T, D), task
    (S,) -> (its MoE FFN, the report's row). marker_tokens: CMoE's sampled tokens (into S * T)."""
    timings = {} if timings is None else timings
    cmoe = spec.method == "cmoe"
    with timed(timings, "profile"):
        stats = profile_layer(x, mlp, k_act=spec.k_act if cmoe else None,
                              marker_tokens=marker_tokens,
                              contribution=not cmoe and spec.shared_by == "contribution")
    with timed(timings, "partition"):
        plan = PLANS[spec.method](stats, task, spec, seed)
    with timed(timings, "build"):
        moe = build_moe(mlp, plan, spec.router, spec.router_bias, spec.compensate)
    with timed(timings, "router"):
        info = fit_router(moe, plan, x, task)
    if moe.bias is not None:
        with timed(timings, "compensate"):
            info |= compensate(moe, x)
    # threshold selection's load is counted once its threshold is set (set_threshold)
    return moe, layer_row(moe, plan, x, info, timings, with_load=spec.selection == "topk")


def layer_row(moe: MoEMLP, plan: LayerPlan, x: torch.Tensor, info: dict, timings: dict,
              with_load: bool = True) -> dict:
    """The report's row of a converted layer: its plan, its router's fit and (with_load) how the
    calibration tokens x (S, T, D) spread over its routed experts; "moe" is its entry in
    config.json."""
    with timed(timings, "build"):
        load = load_fields(moe, router_scores(moe, x)) if plan.top_k and with_load else \
            {"load": None, "load_max_over_mean": None}
    d_e = plan.groups.shape[1]
    return {**plan.info, **info, "shared_experts": len(plan.shared) // d_e,
            "routed_experts": len(plan.groups), "top_k": plan.top_k, **load,
            "moe": {"shared_neurons": len(plan.shared), "routed_experts": len(plan.groups),
                    "top_k": plan.top_k}}


def marker_tokens(spec: ConvertSpec, n_tokens: int, device) -> torch.Tensor | None:
    """CMoE: the calibration tokens (flat ids into S * T, ascending) whose markers are kept."""
    if spec.method != "cmoe":
        return None
    generator = torch.Generator().manual_seed(spec.seed)
    picked = torch.randperm(n_tokens, generator=generator)[: spec.marker_tokens]
    return picked.sort().values.to(device)


def layer_converter(spec: ConvertSpec, task: torch.Tensor, h: torch.Tensor, timings: dict):
    """convert_ffn for layer_loop: (dense FFN, its inputs x, layer) -> (MoE FFN, report row)."""
    spec.check_tasks(int(task.max()) + 1)
    markers = marker_tokens(spec, h.shape[0] * h.shape[1], h.device)
    return lambda mlp, x, i: convert_ffn(mlp, x, task, spec, spec.seed + i, markers, timings)


class Skipped(torch.nn.Module):
    """An FFN that adds nothing: stands in while a block runs only to capture its FFN's inputs."""

    def forward(self, x):
        return torch.zeros_like(x)


@torch.no_grad()
def layer_loop(blocks, run, h: torch.Tensor, convert_layer, dense_layers=(),
               sequential: bool = False, timings: dict | None = None, finish=None):
    """Walks the blocks once, carrying the calibration hidden states forward, and yields (layer,
    block with its FFN `.mlp` converted in place, report row, the FFN's calibration inputs x (S, T,
    D)). blocks: an iterable of modules, read lazily; run(block, h) -> block output; h: (S, T, D)
    the embedded calibration windows; convert_layer(mlp, x, layer) -> (MoE FFN, row), as
    layer_converter makes it. sequential: the next layer sees the converted layer's outputs.
    finish(mlp, x_moe, row) -> updates to the row: a last step on each converted FFN, given the
    inputs x_moe the windows give it in the converted model (every earlier layer converted and
    finished), which the loop then also carries forward unless sequential already does."""
    timings = {} if timings is None else timings
    blocks = iter(blocks)
    h_moe = h if finish is not None and not sequential else None  # the converted model's states
    for i in itertools.count():
        t0 = time.perf_counter()
        with timed(timings, "load"):
            block = next(blocks, None)
        if block is None:
            return
        with timed(timings, "forward"):
            h_dense, x = run_batched(run, block, h, capture=True)  # x: (S, T, D) the FFN's inputs
        row = {"layer": i, "dense": True}
        if i not in dense_layers:
            block.mlp, row = convert_layer(block.mlp, x, i)
            row = {"layer": i, "dense": False, **row}
        if finish is not None and not row["dense"]:
            x_moe = x
            if h_moe is not None:  # the FFN's inputs do not depend on it, so it sits this one out
                mlp, block.mlp = block.mlp, Skipped()
                try:
                    with timed(timings, "forward"):
                        x_moe = run_batched(run, block, h_moe, capture=True)[1]
                finally:
                    block.mlp = mlp
            row |= finish(block.mlp, x_moe, row)
            del x_moe
        if h_moe is not None:
            with timed(timings, "forward"):
                h_moe = run_batched(run, block, h_moe)
        if sequential and not row["dense"]:
            with timed(timings, "forward"):
                h_dense = run_batched(run, block, h)
        h = h_dense
        row["seconds"] = time.perf_counter() - t0
        yield i, block, row, x
        del x

"""
dive.py: DIVE (arXiv 2506.09351), dense FFNs -> MoE FFNs of pruned copies, one per group of related
calibration domains, then retrained (train.py).

    python convert.py --method dive --calib a.txt:prose --calib b.py:code ... --calib-samples 8
    python bench.py dive              # the RESULTS.md experiment: mined experts, then retraining

Imports model.py (MLP) and weaver.py (the settings, the plan, building an MoE layer, the lsq fit,
the per-layer loop). First a pass over the whole model mines which calibration domains go together:
the FFNs are pruned with each domain's text alone (FLAP) and every pruned model is scored on every
domain's held-out windows; domains whose pruned models behave alike form a group. Then per layer
each group's expert is the FFN pruned by FLAP on that group's text, with a bias standing in for the
pruned neurons; experts overlap, none is shared, and a token's chosen experts are weighted by the
softmax over them. Read top to bottom: the settings, FLAP, the plan and router, one layer, mining.
"""
import itertools
import time
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

import weaver
from flags import setting
from model import ACTIVATIONS, MLP

# -----------------------------------------------------------------------------
# the settings: weaver's, with DIVE's own


@dataclass
class DiveSpec(weaver.ConvertSpec):
    method: str = setting("dive", "dive: DIVE, one FLAP-pruned copy of the FFN per group of "
                          "related calibration tasks (mined), each --active / --dive-top-k of the "
                          "neurons")
    router: str | None = setting("lsq", "dive: lsq, fitted to how close each expert comes to the "
                                 "dense FFN, or random, DIVE's randomly initialised router (to be "
                                 "trained)")
    dive_groups: int = setting(4, "dive: experts per layer, one per group of calibration tasks (at "
                               "most the number of tasks; give many --calib FILE:TASK domains to "
                               "mine from)")
    dive_top_k: int = setting(1, "dive: experts per token, weighted by the softmax over the chosen "
                              "ones; each keeps active / top_k of d_ff")
    dive_assign: tuple | None = None  # the group of each calibration task (None: mined)
    METHODS: ClassVar[tuple] = ("dive",)
    ROUTERS: ClassVar[tuple] = ("lsq", "random")

    def __post_init__(self):
        super().__post_init__()
        if self.dive_groups < 1:
            raise ValueError(f"dive_groups {self.dive_groups} must be at least 1")
        if not 1 <= self.dive_top_k <= self.dive_groups:
            raise ValueError(f"dive_top_k {self.dive_top_k} must be in [1, dive_groups "
                             f"{self.dive_groups}]")

    def expert_dim(self, ffn_dim: int) -> int:
        """Each expert is a pruned copy of the FFN with active / top_k of its neurons."""
        return max(1, round(self.active / self.dive_top_k * ffn_dim))

    def check_layers(self, ffn_dim: int, n_layers: int, dim: int) -> None:
        self.check_dense_layers(n_layers)  # pruned copies need no equal split of d_ff

    def check_tasks(self, n_tasks: int, mined: bool = False, windows: int | None = None) -> None:
        """The groups fit the calibration domains; before mining (mined), their number does, and
        mining has a held-out window among each domain's `windows` calibration windows."""
        if self.dive_groups > n_tasks:
            raise ValueError(f"dive_groups {self.dive_groups} is more than the {n_tasks} "
                             f"calibration domain(s): DIVE builds one expert per group of domains")
        if mined:
            if windows is not None and windows < 4:
                raise ValueError(f"--calib-samples {windows}: DIVE's mining holds out every 4th "
                                 f"calibration window of each domain: give at least 4 windows per "
                                 f"domain")
            return
        assign = self.dive_assign
        if assign is None or len(assign) != n_tasks or set(assign) != set(range(self.dive_groups)):
            raise ValueError(f"dive_assign {assign} must give each of the {n_tasks} domains a "
                             f"group in 0..{self.dive_groups - 1}, every group used (or "
                             f"mine_domains)")

    def moe_section(self, ffn_dim: int) -> dict:
        return {**super().moe_section(ffn_dim), "num_experts": self.dive_groups,
                "routing": "softmax", "norm_topk": True, "pruned_experts": True}

# -----------------------------------------------------------------------------
# FLAP: per sample, the sums of each neuron's output h = silu(x W_gate) * (x W_up) and of h^2 over
# its tokens; a group of samples keeps the neurons whose output fluctuates most


@dataclass
class Moments:
    h_sum: torch.Tensor       # (S, d_ff) float64
    h_sq: torch.Tensor        # (S, d_ff) float64
    down_norm2: torch.Tensor  # (d_ff,) float32: each neuron's squared output-column norm
    tokens: int               # T


@torch.no_grad()
def moments(x: torch.Tensor, mlp, batch_tokens: int = weaver.BATCH_TOKENS) -> Moments:
    """x: (S, T, D) FFN inputs, in batches of about batch_tokens tokens."""
    S, T, D = x.shape
    gate_w, up_w = mlp.gate_proj.weight, mlp.up_proj.weight  # (d_ff, D)
    h_sum = torch.zeros(S, gate_w.shape[0], dtype=torch.float64, device=x.device)
    h_sq = torch.zeros_like(h_sum)
    step = max(1, batch_tokens // T)
    for i in range(0, S, step):
        xb = x[i: i + step]  # (b, T, D)
        h = (ACTIVATIONS[mlp.act](xb @ gate_w.T) * (xb @ up_w.T)).float()  # (b, T, d_ff)
        h_sum[i: i + step] = h.sum(dim=1, dtype=torch.float64)
        h_sq[i: i + step] = h.pow(2).sum(dim=1, dtype=torch.float64)
    return Moments(h_sum, h_sq, mlp.down_proj.weight.float().pow(2).sum(dim=0), T)



def flap_keep(stats: Moments, rows: torch.Tensor, n_kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP's structured pruning on the samples `rows` (S,) bool: keep the n_kept neurons of largest
    fluctuation, the variance of h over the tokens times the squared norm of the neuron's output
    column (WIFV). -> (kept ids ascending, (d_ff,) mean h, which stands in for the pruned ones)."""
    n = int(rows.sum()) * stats.tokens
    assert n > 0, "a DIVE group has no calibration tokens"
    mean = stats.h_sum[rows].sum(dim=0) / n
    var = (stats.h_sq[rows].sum(dim=0) / n - mean ** 2).clamp_min(0)
    kept = (var.float() * stats.down_norm2).topk(n_kept).indices.sort().values
    return kept, mean.float()


def flap_bias(down_w: torch.Tensor, kept: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """FLAP's compensation: what the neurons an expert lacks output on average, through down_proj.
    down_w (D, d_ff), kept (E, F) neuron ids, means (E, d_ff) mean h -> (E, D)."""
    pruned = torch.ones_like(means, dtype=torch.bool).scatter_(1, kept, False)
    return (means * pruned).to(down_w.dtype) @ down_w.T


def plan_dive(mlp, stats: Moments, task: torch.Tensor, spec: DiveSpec) -> weaver.LayerPlan:
    """One expert per group of domains, the FFN pruned by FLAP on that group's calibration samples.
    No shared expert; the experts overlap; each gets a bias for its pruned neurons; a token's top-k
    are weighted by their softmax, renormalised (exactly 1 at top-1)."""
    group_of = torch.tensor(spec.dive_assign, device=task.device)[task]  # (S,)
    n_kept = spec.expert_dim(stats.h_sum.shape[1])
    kept, means = zip(*(flap_keep(stats, (group_of == g).to(stats.h_sum.device), n_kept)
                        for g in range(spec.dive_groups)))
    kept = torch.stack(kept)  # (E, F)
    shared = torch.empty(0, dtype=torch.int64, device=kept.device)
    bias = flap_bias(mlp.down_proj.weight, kept, torch.stack(means))  # (E, D)
    return weaver.LayerPlan(shared, kept, spec.dive_top_k,
                            {"r": None, "alpha": None, "kmeans_iters": 0}, routing="softmax",
                            norm_topk=True, bias=bias)

# -----------------------------------------------------------------------------
# the router: DIVE's random one, or lsq fitted to how close each expert comes to the dense FFN



def random_router(n_experts: int, dim: int, seed: int) -> dict:
    """DIVE as published: a linear router drawn from N(0, 0.02^2), to be trained."""
    generator = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(n_experts, dim, generator=generator) * 0.02}


def closeness(mlp, experts):
    """DIVE's experts each stand in for the whole FFN, so the lsq router is fitted to how close each
    comes to the dense output: per token, 1 - its error / the largest error of the token's experts,
    (n, D) -> (n, E) in [0, 1]."""
    def score(x):
        dense = mlp(x).float()
        err = torch.stack([(dense - experts.output(x, e).float()).norm(dim=-1)
                           for e in range(len(experts.gate_up_proj))], dim=1)
        return 1 - err / err.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    return score


def fit_router(moe, plan: weaver.LayerPlan, x: torch.Tensor, task: torch.Tensor, dense,
               seed: int) -> dict:
    """Sets the router's parameters: drawn at random (kind 'random'), or fitted on the layer's
    calibration inputs x (S, T, D) (lsq). Returns the report's info."""
    info = {}
    if moe.router.kind == "random":
        params = random_router(len(plan.groups), x.shape[-1], seed)
    else:
        params, info = weaver.lsq_router(x, task, closeness(dense, moe.experts), len(plan.groups),
                                         moe.top_k, bias=moe.router.bias is not None)
    weaver.set_router(moe, params)
    return info

# -----------------------------------------------------------------------------
# one layer, and the converter layer_loop runs


@torch.no_grad()
def convert_ffn(mlp, x: torch.Tensor, task: torch.Tensor, spec: DiveSpec, seed: int,
                timings: dict):
    """One dense FFN and its calibration inputs x (S, T, D), task (S,) -> (its MoE FFN, the report's
    row)."""
    with weaver.timed(timings, "profile"):
        stats = moments(x, mlp)
    with weaver.timed(timings, "partition"):
        plan = plan_dive(mlp, stats, task, spec)
    with weaver.timed(timings, "build"):
        moe = weaver.build_moe(mlp, plan, spec.router, spec.router_bias)
    with weaver.timed(timings, "router"):
        info = fit_router(moe, plan, x, task, mlp, seed)
    return moe, weaver.layer_row(moe, plan, x, info, timings)


def layer_converter(spec: DiveSpec, task: torch.Tensor, h: torch.Tensor, timings: dict):
    """convert_ffn for weaver.layer_loop: (dense FFN, its inputs x, layer) -> (MoE FFN, row)."""
    spec.check_tasks(int(task.max()) + 1)
    return lambda mlp, x, i: convert_ffn(mlp, x, task, spec, spec.seed + i, timings)

# -----------------------------------------------------------------------------
# mining, a pass over the whole model before converting: the FFNs pruned with each domain's
# calibration text alone (FLAP), every pruned model scored on every domain's held-out windows, and
# the domains whose pruned models behave alike grouped



def pruned_ffn(mlp, kept: torch.Tensor, mean: torch.Tensor) -> MLP:
    """The FFN with only the `kept` neurons, plus a down_proj bias for what the others output on
    average (FLAP's compensation)."""
    gate_w, up_w, down_w = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    with torch.device("meta"):
        ffn = MLP(gate_w.shape[1], len(kept), mlp.act)
        ffn.down_proj = torch.nn.Linear(len(kept), gate_w.shape[1], bias=True)
    ffn.load_state_dict({"gate_proj.weight": gate_w[kept], "up_proj.weight": up_w[kept],
                         "down_proj.weight": down_w[:, kept].contiguous(),
                         "down_proj.bias": flap_bias(down_w, kept[None], mean[None])[0]},
                        assign=True)
    return ffn


@torch.no_grad()
def mine_domains(blocks, run, score, h: torch.Tensor, task: torch.Tensor,
                 spec: DiveSpec) -> torch.Tensor:
    """blocks, run, h (S, T, D), task (S,) as for weaver.layer_loop; score(h, rows) -> (n,) mean NLL
    of the windows rows ((S,) bool) from the last block's output h (n, T, D). Neurons are profiled
    on the dense model's inputs from 3 of every 4 windows of a domain and the pruned models scored
    on the 4th. -> (M, M) perplexity: row m the model pruned on domain m, column t domain t."""
    n_tasks, task = int(task.max()) + 1, task.to(h.device)
    held = weaver.validation_samples(task)
    if not all(held[task == t].any() for t in range(n_tasks)):
        raise ValueError("DIVE's mining holds out every 4th calibration window of each domain: "
                         "give at least 4 windows per domain (--calib-samples)")
    dense_h, pruned_h, fit_task = h[~held], [h[held]] * n_tasks, task[~held]
    for i, block in enumerate(blocks):
        dense = block.mlp
        dense_h, x = weaver.run_batched(run, block, dense_h, capture=True)
        if i in spec.dense_layers:
            pruned_h = [weaver.run_batched(run, block, p) for p in pruned_h]
            continue
        stats = moments(x, dense)
        n_kept = spec.expert_dim(dense.gate_proj.weight.shape[0])
        for m in range(n_tasks):
            block.mlp = pruned_ffn(dense, *flap_keep(stats, fit_task == m, n_kept))
            pruned_h[m] = weaver.run_batched(run, block, pruned_h[m])
        block.mlp = dense
    nll = torch.stack([score(x, held) for x in pruned_h])  # (M, held windows)
    held_task = task[held]
    return torch.stack([nll[:, held_task == t].mean(dim=1) for t in range(n_tasks)], dim=1).exp()


def affinity_groups(ppl: torch.Tensor, n_groups: int) -> list[int]:
    """DIVE's clustering of the cross-perplexity matrix (M, M): each column over its smallest entry
    (how much worse than the best pruned model on that text), logged; Pearson correlation between
    the rows; average-linkage merging until n_groups remain. -> each domain's group, numbered in
    order of the groups' first domain."""
    rel = (ppl / ppl.min(dim=0, keepdim=True).values).log().double()
    corr = torch.corrcoef(rel).nan_to_num(0.0) if len(rel) > 1 else torch.ones(1, 1)
    clusters = [[m] for m in range(len(ppl))]
    while len(clusters) > n_groups:
        link = lambda pair: corr[clusters[pair[0]]][:, clusters[pair[1]]].mean().item()
        a, b = max(itertools.combinations(range(len(clusters)), 2), key=link)
        clusters[a] += clusters.pop(b)
    group = [0] * len(ppl)
    for g, members in enumerate(sorted(clusters, key=min)):
        for m in members:
            group[m] = g
    return group


def mine(h: torch.Tensor, blocks, run, head, tokens: torch.Tensor, task: torch.Tensor,
         names: list[str], spec: DiveSpec, log=print) -> tuple[DiveSpec, dict]:
    """mine_domains over every block, then the grouping. tokens (S, T) the calibration windows, task
    (S,) their domain, named by names; head(h) -> logits after the last block. -> (the spec with its
    groups, what the report shows)."""
    spec.check_tasks(int(task.max()) + 1, mined=True)

    def score(x, rows):  # x: (n, T, D) -> (n,) mean NLL of each window
        targets = tokens[rows.cpu()].to(x.device)
        # a window's logits at a time (T, V): a 262k vocabulary's would not fit for every window
        return torch.stack([F.cross_entropy(head(x[j: j + 1])[0, :-1].float(), targets[j, 1:])
                            for j in range(len(x))])
    t0 = time.perf_counter()
    ppl = mine_domains(blocks, run, score, h, task, spec)
    groups = affinity_groups(ppl, spec.dive_groups)
    log(f"DIVE mining ({time.perf_counter() - t0:.1f}s): held-out ppl of the FFNs pruned on each "
        f"domain (rows) on each domain (columns); groups {groups}")
    width = max(len(n) for n in names)
    for m, name in enumerate(names):
        log(f"  {name:>{width}} -> group {groups[m]}: " +
            "  ".join(f"{t} {ppl[m, j]:.2f}" for j, t in enumerate(names)))
    return replace(spec, dive_assign=tuple(groups)), \
        {"domains": names, "cross_ppl": ppl.tolist(), "groups": groups}

"""
weaver.py: dense GLU FFNs -> MoE FFNs with no training (ExpertWeaver, arXiv 2602.15521), and the peers
it is measured against: CMoE (arXiv 2502.04416), static pruning, and a random partition.

    python convert.py            # the CLI over this file; see python convert.py --help

One layer at a time, on the calibration windows' hidden states:
  1. profile   a[i, j] = mean over sample j's tokens of |silu(x W_gate)_i|, x = the FFN input
  2. allocate  per neuron CV = std / mean of its task-averaged activation; r = share of neurons with
               CV > tau; alpha = alpha_max - (alpha_max - alpha_min) * r of the experts are shared
  3. shared    the alpha * N_e * d_e most important neurons, one dense GLU. The paper ranks neurons by
               mean activation |silu(x W_gate)|; by default here, by mean |silu(x W_gate) * (x W_up)|
               (--shared-by), which keeps more quality at the same sizes
  4. partition the rest into equal experts of d_e neurons by balanced k-means on their profiles
  5. route     the paper: router row of an expert = the mean gate row of its neurons ("centroid"); by
               default here: a linear router fitted in closed form to the norm of each expert's output
               ("lsq"), same cost per token, much closer to the oracle. Top-k per token, unweighted sum.
Read top to bottom: calibration data, profiling, allocation, partitioning, routers, per-method layer
plans, building an MoE layer, the conversion driver (in memory, or streaming a checkpoint layer by
layer), held-out evaluation and FLOPs accounting.
"""
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import (MLP, MoEMLP, ShardWriter, Transformer, atomic_dir, load_block, load_config, read_tensors,
                   read_text, tensor_locations, write_checkpoint_files)

# -----------------------------------------------------------------------------
# calibration data: windows of tokens, each labelled with its task

# used when no --calib file is given: the model writes its own calibration text, one task per family
TASK_PROMPTS = {
    "prose": "The history of the printing press in Europe begins",
    "dialogue": "ALICE: Where were you last night? We waited for hours.\nBOB:",
    "math": "Question: A baker sells 24 muffins in the morning and twice as many in the afternoon. "
            "How many muffins does she sell in total?\nAnswer: Let's think step by step.",
    "code": "import numpy as np\n\n\ndef moving_average(values, window):\n    \"\"\"",
    "instructions": "How to repot a houseplant, step by step:\n1.",
}


@dataclass
class Calibration:
    tokens: torch.Tensor    # (S, T) int64: S windows of T tokens
    task: torch.Tensor      # (S,) int64: index into names
    names: list[str]


def split_heldout(ids: list[int], holdout: float) -> tuple[list[int], list[int]]:
    """A file's tokens -> (calibration part, held-out tail). Evaluation only ever reads the tail."""
    n_tail = int(len(ids) * holdout)
    return ids[: len(ids) - n_tail], ids[len(ids) - n_tail:]


def parse_calib_spec(spec: str) -> tuple[str, str]:
    """FILE[:TASK] -> (file, task); the task defaults to the file name up to its first dot."""
    import os
    file, task = spec, None
    if not os.path.exists(spec) and ":" in spec:
        file, task = spec.rsplit(":", 1)
    return file, task or os.path.basename(file).split(".")[0]


def calibration_from_files(tokenizer, specs: list[str], samples: int, seqlen: int, seed: int,
                           holdout: float = 0.1, field: str | None = None) -> Calibration:
    """`samples` windows of `seqlen` tokens per task, drawn with the seed from the non-held-out part of
    the task's files (several files may share a task)."""
    pools: dict[str, list[torch.Tensor]] = {}
    for spec in specs:
        file, task = parse_calib_spec(spec)
        text = read_text(file, field)
        if not text.strip():
            raise ValueError(f"calibration file {file} is empty")
        head, _ = split_heldout(tokenizer.encode(text).ids, holdout)
        n = len(head) // seqlen
        if n == 0:
            raise ValueError(f"calibration file {file}: {len(head)} tokens (before the held-out {holdout:.0%}) "
                             f"make no window of --calib-seqlen {seqlen}")
        pools.setdefault(task, []).append(torch.tensor(head[: n * seqlen], dtype=torch.int64).view(n, seqlen))
    tokens, task_ids = [], []
    generator = torch.Generator().manual_seed(seed)
    for t, (task, windows) in enumerate(pools.items()):
        windows = torch.cat(windows)
        if len(windows) < samples:
            raise ValueError(f"task {task!r} has {len(windows)} windows of {seqlen} tokens, fewer than "
                             f"--calib-samples {samples}: give it more text or lower --calib-samples/--calib-seqlen")
        pick = torch.randperm(len(windows), generator=generator)[:samples].sort().values
        tokens.append(windows[pick])
        task_ids += [t] * samples
    return Calibration(torch.cat(tokens), torch.tensor(task_ids), list(pools))


def calibration_from_model(model: Transformer, tokenizer, samples: int, seqlen: int, seed: int,
                           log=print) -> Calibration:
    """Calibration text written by the model itself from TASK_PROMPTS (sampled, temperature 1, top-50). All
    tasks go in one batch, decode being per-step overhead on a CPU: prompts are left-padded with newlines to
    one length, and each row's window starts after its own padding, so the padding is never calibrated on."""
    log(f"calibration: no --calib file given, so the model writes its own: {len(TASK_PROMPTS)} tasks "
        f"({', '.join(TASK_PROMPTS)}) x {samples} samples x {seqlen} tokens")
    device = model.embed_tokens.weight.device
    prompts = [tokenizer.encode(p).ids[:seqlen] for p in TASK_PROMPTS.values()]
    newline = tokenizer.encode("\n").ids[-1]
    longest = max(map(len, prompts))
    pads = [longest - len(p) for p in prompts for _ in range(samples)]  # one per row
    batch = torch.tensor([[newline] * (longest - len(p)) + p for p in prompts for _ in range(samples)], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    new = seqlen - min(map(len, prompts))
    out = model.generate(batch, new, temperature=1.0, top_k=50, generator=generator).cpu()  # (rows, longest + new)
    tokens = torch.stack([row[pad: pad + seqlen] for row, pad in zip(out, pads)])
    task = torch.arange(len(TASK_PROMPTS)).repeat_interleave(samples)
    return Calibration(tokens, task, list(TASK_PROMPTS))

# -----------------------------------------------------------------------------
# profiling: statistics of one FFN on its calibration inputs, never the activations themselves


@dataclass
class LayerStats:
    profile: torch.Tensor                # (S, d_ff) float32: a[i, j] transposed, one row per sample
    markers: torch.Tensor | None = None  # (M, d_ff) bool: CMoE's top-K_a neurons of M calibration tokens
    contribution: torch.Tensor | None = None  # (d_ff,) float32: mean over tokens of |silu(x W_gate) * (x W_up)|


@torch.no_grad()
def profile_layer(x: torch.Tensor, mlp: MLP, batch_tokens: int = 8192, k_act: int | None = None,
                  marker_tokens: torch.Tensor | None = None, contribution: bool = False) -> LayerStats:
    """x: (S, T, D) FFN inputs. Works through the samples in batches of about batch_tokens tokens, so
    memory grows with d_ff * batch, not with the calibration set. With k_act, also CMoE's markers for the
    tokens listed in marker_tokens (flat indices into S * T); with contribution, each neuron's mean
    |silu(x W_gate) * (x W_up)|, its share of the FFN's output before W_down (costs the up projection)."""
    S, T, D = x.shape
    gate_w, up_w = mlp.gate_proj.weight, mlp.up_proj.weight  # (d_ff, D)
    profile = torch.empty(S, gate_w.shape[0], dtype=torch.float32, device=x.device)
    markers, total = [], torch.zeros(gate_w.shape[0], dtype=torch.float32, device=x.device)
    if k_act:
        # CMoE scores neurons on unit-norm inputs and unit-norm weight rows
        gate_n, up_n = F.normalize(gate_w.float(), dim=1), F.normalize(up_w.float(), dim=1)
    step = max(1, batch_tokens // T)
    for i in range(0, S, step):
        xb = x[i: i + step]  # (b, T, D)
        act = F.silu(xb @ gate_w.T)  # (b, T, d_ff)
        profile[i: i + step] = act.float().abs().mean(dim=1)
        if contribution:
            total += (act * (xb @ up_w.T)).float().abs().sum(dim=(0, 1))
        if k_act:
            lo, hi = i * T, (i + len(xb)) * T
            keep = marker_tokens[(marker_tokens >= lo) & (marker_tokens < hi)] - lo
            xn = F.normalize(xb.reshape(-1, D)[keep].float(), dim=-1)  # (m, D)
            scores = (F.silu(xn @ gate_n.T) * (xn @ up_n.T)).abs()  # (m, d_ff)
            top = scores.topk(k_act, dim=-1).indices
            markers.append(torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True))
    return LayerStats(profile, torch.cat(markers) if k_act else None, total / (S * T) if contribution else None)


# -----------------------------------------------------------------------------
# allocation: how many experts of a layer are shared


def specialization(profile: torch.Tensor, task: torch.Tensor, tau: float, eps: float = 1e-6):
    """profile (S, d_ff), task (S,) -> CV per neuron (d_ff,) across the task means, and r = share of
    neurons with CV > tau (the layer's specialisation ratio)."""
    n_tasks = int(task.max()) + 1
    task = task.to(profile.device)
    sums = torch.zeros(n_tasks, profile.shape[1], device=profile.device).index_add_(0, task, profile)
    task_mean = sums / torch.bincount(task, minlength=n_tasks)[:, None]  # (n_tasks, d_ff)
    cv = task_mean.std(dim=0, unbiased=False) / (task_mean.mean(dim=0) + eps)
    return cv, (cv > tau).float().mean().item()


def n_shared_experts(alpha: float, n_experts: int, k: int, alpha_max: float) -> int:
    """Shared experts of a layer: round(alpha * N_e), the paper's rule, while even the largest alpha leaves
    routed experts in the active budget k. When alpha_max * N_e would reach k (any active below ~0.7 with
    the default alphas) that rule makes layers all-shared and routing dies, so alpha is read as a fraction
    of the active budget instead, for every layer alike: round(alpha * k). At least one active expert stays
    routed whenever k < N_e."""
    n = round(alpha * n_experts) if alpha_max * n_experts < k else round(alpha * k)
    return min(n, k - 1) if k < n_experts else min(n, n_experts)

# -----------------------------------------------------------------------------
# partitioning: balanced k-means, every cluster exactly `capacity` members


def balanced_assign_reference(cost: torch.Tensor, capacity: int) -> torch.Tensor:
    """The paper's greedy, written plainly: walk all (item, cluster) pairs by ascending cost and take a
    pair when the item is free and the cluster has room. cost: (n, K), n = K * capacity -> (n,)."""
    n, K = cost.shape
    assign = torch.full((n,), -1, dtype=torch.int64)
    size = [0] * K
    for p in cost.flatten().argsort(stable=True).tolist():
        i, c = divmod(p, K)
        if assign[i] < 0 and size[c] < capacity:
            assign[i] = c
            size[c] += 1
    return assign


def balanced_assign(cost: torch.Tensor, capacity: int) -> torch.Tensor:
    """Same result as balanced_assign_reference, vectorised. Deferred acceptance: free items propose, each
    cluster keeps its `capacity` cheapest proposers so far and turns away the rest, who propose again. When
    both sides rank by one pair cost the stable matching is unique and is exactly what the greedy walk
    produces. A full cluster's worst holder only ever improves, so a free item skips the clusters that would
    surely turn it away and proposes straight to its cheapest cluster with room or with a worse holder:
    the same matching in a handful of rounds. Ties: by cluster index for an item, by item index for a
    cluster, the order of the reference's stable sort. cost: (n, K) -> (n,)."""
    n, K = cost.shape
    assert n == K * capacity, f"{n} items do not fill {K} clusters of {capacity}"
    items = torch.arange(n, device=cost.device)
    target = torch.full((n,), -1, dtype=torch.int64, device=cost.device)  # cluster holding each item, -1 = free
    worst_cost = torch.full((K,), float("inf"), dtype=cost.dtype, device=cost.device)  # inf while not full
    worst_item = torch.full((K,), n, dtype=torch.int64, device=cost.device)
    free = items
    while len(free):
        c = cost[free]  # (f, K)
        beats = (c < worst_cost) | ((c == worst_cost) & (free[:, None] < worst_item))
        target[free] = torch.where(beats, c, float("inf")).argmin(dim=1)  # first minimum: lowest cluster index
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


def balanced_kmeans(features: torch.Tensor, n_clusters: int, seed: int, max_iter: int = 50) -> tuple[torch.Tensor, int]:
    """features (n, S) -> (cluster of each item (n,), iterations run). Squared Euclidean distance,
    centroids seeded from random items, iterated until no item moves or max_iter."""
    n = features.shape[0]
    capacity = n // n_clusters
    generator = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(n, generator=generator)[:n_clusters].to(features.device)].clone()
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
# routers: from the dense weights and the partition (centroid, cmoe), or fitted to the layer's
# calibration inputs in closed form (lsq)


def centroid_router(gate_w: torch.Tensor, groups: torch.Tensor) -> dict:
    """ExpertWeaver: the mean gate row of each expert's neurons. gate_w (d_ff, D), groups (E, F)."""
    return {"weight": gate_w[groups].float().mean(dim=1)}  # (E, D)


def captured(scores: torch.Tensor, truth: torch.Tensor, top_k: int) -> float:
    """Share of the oracle's captured contribution that a router's top-k captures: for each token, the true
    contribution of the experts the router picks, over that of the best top_k experts (1.0 = the oracle).
    scores, truth: (N, E)."""
    picked = truth.gather(1, scores.topk(top_k, dim=-1).indices).sum()
    return (picked / truth.topk(top_k, dim=-1).values.sum()).item()


def expert_contributions(x: torch.Tensor, mlp: MLP, groups: torch.Tensor) -> torch.Tensor:
    """Each routed expert's true contribution: the norm of what it adds to the FFN output,
    y_e = || (silu(x W_gate) * (x W_up))[its neurons] @ W_down[its neurons] ||, which is what leaving it out
    costs; the oracle router's score. x: (n, D), groups (E, F) -> (n, E) float32."""
    gate_w, up_w, down_w = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    y = torch.empty(len(x), len(groups), dtype=torch.float32, device=x.device)
    for e, rows in enumerate(groups):  # one expert at a time: (n, D) in flight, not (n, E, D)
        act = F.silu(x @ gate_w[rows].T) * (x @ up_w[rows].T)  # (n, F)
        y[:, e] = (act @ down_w[:, rows].T).float().norm(dim=-1)
    return y


def validation_samples(task: torch.Tensor, every: int = 4) -> torch.Tensor:
    """(S,) bool: every `every`-th sample of each task (its 4th, 8th, ...) is held out to validate a router."""
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


# what the regression predicts: the contribution, its log, or only the order of the experts within a token
TARGETS = {"linear": lambda y, s: y, "log": lambda y, s: torch.log1p(y / s), "rank": lambda y, s: rank_in_token(y)}


@torch.no_grad()
def lsq_router(x: torch.Tensor, task: torch.Tensor, mlp: MLP, groups: torch.Tensor, top_k: int,
               batch_tokens: int = 8192, max_val_tokens: int = 4096) -> tuple[dict, dict]:
    """A linear router [x, 1] -> score per expert, fitted in closed form (ridge regression, float64) to the
    experts' true contributions on the calibration tokens of this layer, x (S, T, D). Every 4th sample of each
    task is held out; on it, each target (TARGETS: the contribution itself, its log, which weighs the small
    contributions that decide which experts to drop, or only the experts' order within the token) and ridge
    strength is scored by the share of the oracle's contribution its top-k captures, the best pair wins,
    and the fit is redone on every token. Memory: two (D+1)^2 float64 matrices and a bounded validation
    sample, whatever the number of calibration tokens."""
    S, T, D = x.shape
    held = validation_samples(task)
    # the normal equations of the fitting tokens and of the held-out ones, kept apart so that the final fit
    # can use both; of the held-out tokens, at most max_val_tokens (evenly spaced) are kept to score with
    gram = {part: torch.zeros(D + 1, D + 1, dtype=torch.float64, device=x.device) for part in ("fit", "val")}
    cross = {part: {name: torch.zeros(D + 1, len(groups), dtype=torch.float64, device=x.device) for name in TARGETS}
             for part in ("fit", "val")}
    n_val = int(held.sum()) * T
    keep = torch.zeros(n_val, dtype=torch.bool)
    keep[torch.linspace(0, n_val - 1, min(n_val, max_val_tokens)).long()] = True
    val_x, val_y, scale, seen = [], [], None, 0
    step = max(1, batch_tokens // T)
    for i in range(0, S, step):
        xb = x[i: i + step].reshape(-1, D)  # (b*T, D)
        y = expert_contributions(xb, mlp, groups)  # (b*T, E)
        scale = scale if scale is not None else y.mean().clamp_min(1e-12)  # fixes the log target's unit
        x1 = torch.cat([xb.float(), torch.ones(len(xb), 1, device=x.device)], dim=1).double()  # (b*T, D+1)
        fit = (~held[i: i + step].to(x.device)).repeat_interleave(T)
        for part, rows in (("fit", fit), ("val", ~fit)):
            gram[part] += x1[rows].T @ x1[rows]
            for name, target in TARGETS.items():
                cross[part][name] += x1[rows].T @ target(y[rows], scale).double()
        kept = keep[seen: seen + int((~fit).sum())].to(x.device)
        seen += len(kept)
        val_x.append(x1[~fit][kept])
        val_y.append(y[~fit][kept])
    val_x, val_y = torch.cat(val_x), torch.cat(val_y)
    xtx, xty = gram["fit"], cross["fit"]
    penalty = torch.ones(D + 1, dtype=torch.float64, device=x.device)
    penalty[D] = 0  # the bias is not shrunk
    ridge = xtx.diagonal()[:D].mean()

    def solve(xtx, lam, xty):
        # ridge normal equations by Cholesky (the matrix is positive definite for lam > 0): at D = 4096, one
        # factorisation serves every target, and it costs half an LU
        factor = torch.linalg.cholesky(xtx + torch.diag(lam * ridge * penalty))
        return torch.cholesky_solve(xty, factor)
    best, info, E = UNVALIDATED, {}, len(groups)
    if len(val_x):
        scores = {}
        for lam in RIDGE:
            w = solve(xtx, lam, torch.cat(list(xty.values()), dim=1))  # (D+1, targets*E)
            for j, name in enumerate(xty):
                scores[(name, lam)] = captured((val_x @ w[:, j * E:(j + 1) * E]).float(), val_y, top_k)
        best = max(scores, key=scores.get)
        info = {"lsq_target": best[0], "lsq_ridge": best[1], "lsq_val_captured": scores[best]}
        xtx = xtx + gram["val"]  # refit on every token
        xty = {name: xty[name] + cross["val"][name] for name in TARGETS}
    name, lam = best
    w = solve(xtx, lam, xty[name])  # (D+1, E)
    return {"weight": w[:D].T.float(), "bias": w[D].float()}, info


def cmoe_router(gate_w: torch.Tensor, up_w: torch.Tensor, reps: torch.Tensor) -> dict:
    """CMoE: the unit-norm gate and up rows of each expert's representative neuron. reps (E,)."""
    return {"weight": F.normalize(gate_w[reps].float(), dim=1), "up": F.normalize(up_w[reps].float(), dim=1)}


def representatives(features: torch.Tensor, groups: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """The member of each group nearest its centroid. features (d_ff, M), groups (E, F) -> (E,) neuron ids."""
    members = features[groups].float()  # (E, F, M)
    dist = torch.cdist(members, members.mean(dim=1, keepdim=True), p=p).squeeze(-1)  # (E, F)
    return groups.gather(1, dist.argmin(dim=1, keepdim=True)).squeeze(1)

# -----------------------------------------------------------------------------
# one layer's plan per method: which neurons are shared, the routed groups, top-k and the router

METHODS = ("expertweaver", "cmoe", "static", "random")
# lsq, not the paper's centroid router, by default: at the same cost per token it keeps much more quality
# (README, "Routers"); --router centroid gives the paper's
DEFAULT_ROUTER = {"expertweaver": "lsq", "random": "lsq", "cmoe": "cmoe", "static": "none"}


# what makes a neuron important enough to be shared, for expertweaver, random and static (CMoE ranks by
# its own activation rates): the paper's mean |silu(x W_gate)| ("activation"), or the mean
# |silu(x W_gate) * (x W_up)| ("contribution"), which also counts the up projection and keeps more quality
# (README, "Quality")
SHARED_BY = ("contribution", "activation")


def importance(stats: LayerStats, shared_by: str) -> torch.Tensor:
    """(d_ff,) the score split_shared ranks neurons by."""
    if shared_by == "activation":
        return stats.profile.mean(dim=0)
    assert stats.contribution is not None, "shared_by 'contribution' needs profile_layer(..., contribution=True)"
    return stats.contribution


@dataclass
class ConvertSpec:
    method: str = "expertweaver"
    n_experts: int = 64               # N_e: experts per layer, shared ones included
    active: float = 0.75              # fraction of the experts (= of FFN neurons) each token uses
    router: str | None = None         # None: the method's own (DEFAULT_ROUTER)
    tau: float = 0.6                  # CV above which a neuron counts as specialised
    alpha_min: float = 0.2
    alpha_max: float = 0.7
    n_shared: int | None = None       # shared experts in every layer, overriding the method's rule
    shared_by: str = "contribution"   # which neurons are shared (and kept by static): SHARED_BY
    kmeans_iters: int = 50
    k_act: int = 10                   # CMoE's K_a
    marker_tokens: int = 16384        # CMoE: calibration tokens whose markers are kept (CMoE uses 8 x 2048)
    dense_layers: tuple = ()          # layers left dense
    sequential: bool = False          # profile layer l on the outputs of converted layers < l
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {METHODS}")
        if not 0 < self.active <= 1:
            raise ValueError(f"active {self.active} must be in (0, 1]: the fraction of FFN neurons a token uses")
        if self.shared_by not in SHARED_BY:
            raise ValueError(f"shared_by {self.shared_by!r} is not one of {SHARED_BY}")
        if not 0 <= self.alpha_min <= self.alpha_max <= 1:
            raise ValueError(f"need 0 <= alpha_min {self.alpha_min} <= alpha_max {self.alpha_max} <= 1")
        self.router = self.router or DEFAULT_ROUTER[self.method]
        if (self.method == "static") != (self.router == "none"):
            raise ValueError(f"router {self.router!r} does not go with method {self.method!r}: static pruning "
                             f"has no router, every other method needs one")
        k = self.k
        if self.n_shared is not None and not 0 <= self.n_shared <= k:
            raise ValueError(f"n_shared {self.n_shared} must be in [0, k = {k}]")

    @property
    def k(self) -> int:
        """Experts active per token, shared ones included."""
        return max(1, round(self.active * self.n_experts))


@dataclass
class LayerPlan:
    shared: torch.Tensor    # (n_shared * d_e,) neuron ids, ascending (the dense order, for exactness)
    groups: torch.Tensor    # (E, d_e) neuron ids of each routed expert
    top_k: int
    router: dict            # Router parameter name -> tensor
    info: dict              # what the report shows


def split_shared(importance: torch.Tensor, n_shared_neurons: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n most important neurons (ascending ids), and the rest (ascending ids)."""
    shared = importance.topk(n_shared_neurons).indices.sort().values
    rest = torch.ones_like(importance, dtype=torch.bool)
    rest[shared] = False
    return shared, rest.nonzero().squeeze(1)


def plan_expertweaver(stats: LayerStats, x: torch.Tensor, task: torch.Tensor, mlp: MLP, spec: ConvertSpec, seed: int,
                      timings: dict) -> LayerPlan:
    d_ff = stats.profile.shape[1]
    d_e, k = d_ff // spec.n_experts, spec.k
    with timed(timings, "allocate"):
        cv, r = specialization(stats.profile, task, spec.tau)
        alpha = spec.alpha_max - (spec.alpha_max - spec.alpha_min) * r
        n_se = spec.n_shared if spec.n_shared is not None else n_shared_experts(alpha, spec.n_experts, k, spec.alpha_max)
        shared, rest = split_shared(importance(stats, spec.shared_by), n_se * d_e)
    n_routed = spec.n_experts - n_se
    iters = 0
    with timed(timings, "partition"):
        if n_routed == 0:
            groups = rest.view(0, d_e)
        elif spec.method == "random":
            generator = torch.Generator().manual_seed(seed)
            groups = rest[torch.randperm(len(rest), generator=generator).to(rest.device)].view(n_routed, d_e)
            groups = groups.sort(dim=1).values
        else:
            assign, iters = balanced_kmeans(stats.profile[:, rest].T.contiguous(), n_routed, seed, spec.kmeans_iters)
            groups = groups_of(rest, assign, n_routed)
    top_k = min(k, spec.n_experts) - n_se
    with timed(timings, "router"):
        router, router_info = make_router(spec.router, mlp, groups, top_k, x, task, stats.profile.T, p=2.0)
    info = {"r": r, "alpha": alpha, "kmeans_iters": iters, **router_info}
    return LayerPlan(shared, groups, top_k, router, info)


def plan_cmoe(stats: LayerStats, x: torch.Tensor, task: torch.Tensor, mlp: MLP, spec: ConvertSpec, seed: int,
              timings: dict) -> LayerPlan:
    """CMoE as in its reference code: shared = the highest activation rates; one balanced assignment of
    the other neurons' marker columns (L1) to centroids seeded from the highest-rate ones; representative
    = the member nearest its cluster mean."""
    markers = stats.markers  # (M, d_ff) bool
    d_ff = markers.shape[1]
    d_e, k = d_ff // spec.n_experts, spec.k
    with timed(timings, "allocate"):
        rate = markers.float().mean(dim=0)  # (d_ff,) share of tokens that mark each neuron
        n_se = spec.n_shared if spec.n_shared is not None else k // 2
        shared, rest = split_shared(rate, n_se * d_e)
    n_routed = spec.n_experts - n_se
    with timed(timings, "partition"):
        if n_routed:
            columns = markers[:, rest].T.float()  # (n_rest, M) binary
            seeds = columns[rate[rest].topk(n_routed).indices]  # (n_routed, M) binary
            # L1 between binary vectors: |a| + |b| - 2 a.b, one matmul instead of an (n, K, M) difference
            cost = columns.sum(1, keepdim=True) + seeds.sum(1)[None, :] - 2 * columns @ seeds.T
            groups = groups_of(rest, balanced_assign(cost, d_e), n_routed)
        else:
            groups = rest.view(0, d_e)
    top_k = min(k, spec.n_experts) - n_se
    with timed(timings, "router"):
        router, router_info = make_router(spec.router, mlp, groups, top_k, x, task, markers.T, p=1.0)
    info = {"r": None, "alpha": None, "kmeans_iters": 1, **router_info}
    return LayerPlan(shared, groups, top_k, router, info)


def plan_static(stats: LayerStats, x: torch.Tensor, task: torch.Tensor, mlp: MLP, spec: ConvertSpec, seed: int,
                timings: dict) -> LayerPlan:
    """Structured pruning: the k * d_e most active neurons always on; the others kept in the checkpoint as
    experts that are never selected (top_k = 0), so the index map still covers every neuron."""
    d_ff = stats.profile.shape[1]
    d_e, k = d_ff // spec.n_experts, spec.k
    with timed(timings, "allocate"):
        shared, rest = split_shared(importance(stats, spec.shared_by), k * d_e)
    info = {"r": None, "alpha": None, "kmeans_iters": 0}
    return LayerPlan(shared, rest.view(-1, d_e), 0, {}, info)


PLANNERS = {"expertweaver": plan_expertweaver, "random": plan_expertweaver, "cmoe": plan_cmoe,
            "static": plan_static}


def make_router(kind: str, mlp: MLP, groups: torch.Tensor, top_k: int, x: torch.Tensor, task: torch.Tensor,
                features: torch.Tensor, p: float) -> tuple[dict, dict]:
    """Router parameters for a partition, and what the report should show about them. x (S, T, D): the layer's
    calibration inputs; features (d_ff, M): the space the partition was made in, where CMoE's representative
    neurons are chosen."""
    if kind == "centroid":
        return centroid_router(mlp.gate_proj.weight, groups), {}
    if kind == "lsq":
        return lsq_router(x, task, mlp, groups, top_k)
    if kind == "cmoe":
        return cmoe_router(mlp.gate_proj.weight, mlp.up_proj.weight, representatives(features, groups, p)), {}
    return {}, {}  # gate, oracle: scores come from the experts' own weights

# -----------------------------------------------------------------------------
# building an MoE layer from a plan: the dense weights regrouped, nothing recomputed


def build_moe(mlp: MLP, plan: LayerPlan, expert_dim: int, router: str) -> MoEMLP:
    gate_w, up_w, down_w = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    dim = gate_w.shape[1]
    n_routed = plan.groups.shape[0]
    with torch.device("meta"):
        moe = MoEMLP(dim, expert_dim, router, len(plan.shared), n_routed, plan.top_k)
    state = {"neuron_index": torch.cat([plan.shared, plan.groups.flatten()])}
    if len(plan.shared):
        state |= {"shared.gate_proj.weight": gate_w[plan.shared], "shared.up_proj.weight": up_w[plan.shared],
                  "shared.down_proj.weight": down_w[:, plan.shared]}
    if n_routed:
        state |= {"experts.gate_up_proj": torch.cat([gate_w[plan.groups], up_w[plan.groups]], dim=1),  # (E, 2F, D)
                  "experts.down_proj": down_w[:, plan.groups].permute(1, 2, 0).contiguous()}  # (E, F, D)
    if plan.top_k:
        state |= {f"router.{name}": t.to(gate_w.dtype) for name, t in plan.router.items()}
    moe.load_state_dict({n: t.contiguous() for n, t in state.items()}, strict=True, assign=True)
    return moe


@torch.no_grad()
def expert_load(moe: MoEMLP, x: torch.Tensor, batch_tokens: int = 8192) -> torch.Tensor:
    """Tokens routed to each expert, over the calibration inputs x (S, T, D) -> (E,) int64."""
    flat = x.reshape(-1, x.shape[-1])
    counts = torch.zeros(moe.experts.gate_up_proj.shape[0], dtype=torch.int64, device=x.device)
    for i in range(0, len(flat), batch_tokens):
        counts += torch.bincount(moe.route(flat[i: i + batch_tokens]).flatten(), minlength=len(counts))
    return counts

# -----------------------------------------------------------------------------
# the conversion driver: walks the layers once, carrying the calibration hidden states forward


@contextmanager
def timed(timings: dict, stage: str):
    t0 = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def batched(fn, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i: i + batch]) for i in range(0, len(x), batch)])


def check_dense(cfg, path: str) -> None:
    if cfg.moe is not None:
        raise ValueError(f"{path} is already an MoE checkpoint (its config.json has a 'moe' section); "
                         f"converting an MoE again is not supported: convert the dense checkpoint instead")


def check_divisible(ffn_dim: int, n_experts: int) -> None:
    if ffn_dim % n_experts:
        divisors = [d for d in range(1, ffn_dim + 1) if ffn_dim % d == 0]
        near = [d for d in divisors if d < n_experts][-2:] + [d for d in divisors if d > n_experts][:2]
        raise ValueError(f"intermediate_size {ffn_dim} is not divisible by --experts {n_experts}: experts must "
                         f"have equal size; valid counts near it: {', '.join(map(str, near))}")


def convert_layers(cfg, h: torch.Tensor, window_inputs, get_block, put_block, calib: Calibration,
                   spec: ConvertSpec, log=print) -> tuple[dict, dict]:
    """The per-layer loop both drivers share. h: (S, T, D) embedded calibration windows. get_block(i) gives
    block i with its dense FFN; put_block(i, block) takes it back converted. Returns (moe config, report)."""
    check_divisible(cfg.ffn_dim, spec.n_experts)
    n_tasks = len(calib.names)
    if spec.method in ("expertweaver", "random") and n_tasks < 2 and spec.n_shared is None:
        raise ValueError(f"{spec.method} sizes the shared expert from how neurons vary across tasks, which "
                         f"needs calibration from at least 2 tasks; got {n_tasks} ({calib.names})")
    d_e = cfg.ffn_dim // spec.n_experts
    S, T, _ = h.shape
    batch = max(1, 8192 // T)  # windows per forward batch
    cos, sin, mask = window_inputs(T, h.dtype, h.device)
    timings: dict[str, float] = {}
    marker_tokens = None
    if spec.method == "cmoe":
        generator = torch.Generator().manual_seed(spec.seed)
        marker_tokens = torch.randperm(S * T, generator=generator)[: spec.marker_tokens].sort().values.to(h.device)
    moe_cfg = {"method": spec.method, "num_experts": spec.n_experts, "expert_dim": d_e, "router": spec.router,
               "active": spec.active, "layers": [None] * cfg.n_layers}
    layers = []
    for i in range(cfg.n_layers):
        t0 = time.perf_counter()
        with timed(timings, "load"):
            block = get_block(i)
        with timed(timings, "forward"):
            h = batched(lambda hb: hb + block.self_attn(block.input_layernorm(hb), cos, sin, mask), h, batch)
            x = batched(block.post_attention_layernorm, h, batch)  # (S, T, D) the FFN inputs
        dense = block.mlp
        assert isinstance(dense, MLP), f"layer {i} is already an MoE layer"
        row = {"layer": i, "dense": True}
        if i not in spec.dense_layers:
            with timed(timings, "profile"):
                cmoe = spec.method == "cmoe"
                stats = profile_layer(x, dense, k_act=spec.k_act if cmoe else None, marker_tokens=marker_tokens,
                                      contribution=not cmoe and spec.shared_by == "contribution")
            plan = PLANNERS[spec.method](stats, x, calib.task, dense, spec, spec.seed + i, timings)
            with timed(timings, "build"):
                block.mlp = build_moe(dense, plan, d_e, spec.router)
                load = expert_load(block.mlp, x) if plan.top_k else None
            moe_cfg["layers"][i] = {"shared_neurons": len(plan.shared), "routed_experts": plan.groups.shape[0],
                                    "top_k": plan.top_k}
            row = {"layer": i, "dense": False, **plan.info, "shared_experts": len(plan.shared) // d_e,
                   "routed_experts": plan.groups.shape[0], "top_k": plan.top_k,
                   "load_max_over_mean": (load.max() / load.float().mean()).item() if load is not None else None,
                   "load": load.tolist() if load is not None else None}
        with timed(timings, "forward"):
            ffn = block.mlp if spec.sequential else dense
            h = h + batched(ffn, x, batch)
        del dense, x
        with timed(timings, "write"):
            put_block(i, block)
        del block
        row["seconds"] = time.perf_counter() - t0
        layers.append(row)
        log(format_layer(row, cfg.n_layers))
    return moe_cfg, {"layers": layers, "timings": timings}


@torch.no_grad()
def convert(model: Transformer, calib: Calibration, spec: ConvertSpec, log=print) -> dict:
    """In memory: replaces the FFN of every layer not in spec.dense_layers by an MoE FFN, in place, and sets
    model.cfg.moe. Returns the report: per-layer allocation and expert load, and time per stage."""
    timings: dict[str, float] = {}
    with timed(timings, "embed"):
        h = model.embed_tokens(calib.tokens.to(model.embed_tokens.weight.device))  # (S, T, D)
    moe_cfg, report = convert_layers(model.cfg, h, model.window_inputs, lambda i: model.layers[i],
                                     lambda i, block: None, calib, spec, log)
    report["timings"] = timings | report["timings"]
    model.cfg.moe = moe_cfg
    return report


@torch.no_grad()
def convert_checkpoint(path: str, out: str, calib: Calibration, spec: ConvertSpec, dtype: torch.dtype,
                       device, save_dtype: torch.dtype, max_shard_bytes: int = 2 << 30,
                       extra: dict | None = None, log=print) -> dict:
    """Streaming: reads one block at a time from the checkpoint at `path` (lazily, per tensor), converts it,
    writes it to `out` in shards and lets it go, so memory holds the calibration hidden states, about two
    blocks and one output shard, whatever the depth. Produces the same tensors as convert() followed by
    save_checkpoint(). `extra` JSON files are written too; `out` appears atomically at the end."""
    cfg, hf_config = load_config(path)
    check_dense(cfg, path)
    where = tensor_locations(path)
    with torch.device("meta"):
        skeleton = Transformer(cfg)  # no memory: only for the names, shapes and rope of the real model
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        t0 = time.perf_counter()
        embed = read_tensors(path, {"model.embed_tokens.weight": skeleton.embed_tokens.weight}, dtype, "cpu", where)
        embed = embed["model.embed_tokens.weight"]
        h = F.embedding(calib.tokens, embed).to(device)  # (S, T, D)
        writer.add("model.embed_tokens.weight", embed.to(save_dtype))
        del embed
        timings = {"embed": time.perf_counter() - t0}

        def put_block(i, block):
            for name, tensor in block.state_dict().items():
                writer.add(f"model.layers.{i}.{name}", tensor.to(save_dtype) if tensor.is_floating_point() else tensor)
        moe_cfg, report = convert_layers(cfg, h, skeleton.window_inputs,
                                         lambda i: load_block(path, cfg, i, dtype, device, where), put_block,
                                         calib, spec, log)
        t0 = time.perf_counter()
        tail = {"model.norm.weight": skeleton.norm.weight}
        if not cfg.tie_embeddings:
            tail["lm_head.weight"] = skeleton.lm_head.weight
        for name, tensor in read_tensors(path, tail, dtype, "cpu", where).items():
            writer.add(name, tensor.to(save_dtype))
        writer.finish()
        write_checkpoint_files(tmp, hf_config, moe_cfg, copy_from=path, extra=extra)
        report["timings"] = timings | report["timings"]
        report["timings"]["write"] += time.perf_counter() - t0
    return report


def format_layer(row: dict, n_layers: int) -> str:
    head = f"layer {row['layer']:>{len(str(n_layers))}}/{n_layers}"
    if row["dense"]:
        return f"{head}  dense ({row['seconds']:.1f}s)"
    r = f"r {row['r']:.2f} alpha {row['alpha']:.2f}  " if row["r"] is not None else ""
    load = f"  load max/mean {row['load_max_over_mean']:.2f}" if row["load_max_over_mean"] is not None else ""
    return (f"{head}  {r}shared {row['shared_experts']:>3}  routed {row['routed_experts']:>3}  "
            f"top-k {row['top_k']:>3}{load}  ({row['seconds']:.1f}s)")

# -----------------------------------------------------------------------------
# held-out evaluation: the tail of each file that calibration never reads


def heldout_tokens(tokenizer, file: str, holdout: float, field: str | None = None) -> torch.Tensor:
    ids = tokenizer.encode(read_text(file, field)).ids
    tail = split_heldout(ids, holdout)[1] if holdout > 0 else ids
    return torch.tensor(tail, dtype=torch.int64)


def active_fraction(cfg) -> float:
    """Share of the FFN neurons a token uses, averaged over layers (dense layers count as 1)."""
    if cfg.moe is None:
        return 1.0
    d_e, fractions = cfg.moe["expert_dim"], []
    for layer in cfg.moe["layers"]:
        fractions.append(1.0 if layer is None else (layer["shared_neurons"] + layer["top_k"] * d_e) / cfg.ffn_dim)
    return sum(fractions) / len(fractions)


def ffn_flops(cfg) -> dict:
    """Per token, summed over layers: FLOPs of the dense FFNs, of the MoE FFNs' experts, and of their routers
    (multiply-adds x 2). gate and oracle routers compute projections of every routed neuron, so they cost
    what those neurons would."""
    D, d_ff = cfg.dim, cfg.ffn_dim
    per_router = {"centroid": lambda E, n: 2 * D * E, "lsq": lambda E, n: 2 * D * E + E,
                  "cmoe": lambda E, n: 4 * D * E, "gate": lambda E, n: 2 * D * n, "oracle": lambda E, n: 6 * D * n,
                  "none": lambda E, n: 0}
    dense = experts = router = 0
    for layer in (cfg.moe["layers"] if cfg.moe else [None] * cfg.n_layers):
        dense += 6 * D * d_ff
        if layer is None:
            experts += 6 * D * d_ff
            continue
        d_e, E = cfg.moe["expert_dim"], layer["routed_experts"]
        experts += 6 * D * (layer["shared_neurons"] + layer["top_k"] * d_e)
        router += per_router[cfg.moe["router"]](E, E * d_e) if layer["top_k"] else 0
    return {"dense": dense, "experts": experts, "router": router}


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))

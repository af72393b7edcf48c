"""
train.py: continue training a dense or converted MoE checkpoint. Light healing: LoRA adapters and
the router learn, as CMoE and DIVE do after converting. Downcycling: every parameter learns, with
softmax routing and a balance loss, as ExpertWeaver does. One process, or many with torchrun:
DDP, or FSDP2 for models whose training state does not fit one device (parallel.py).

    python train.py out/smollm2-135m-expertweaver-75 --data ../shared/data/wikitext2-valid.txt \\
        --data ../shared/data/tinyshakespeare.txt --train lora,router --routing scaled \\
        --out out/healed
    torchrun --nproc_per_node 2 train.py CHECKPOINT --data FILE --out DIR     # data-parallel
    torchrun --nproc_per_node 8 train.py CHECKPOINT --parallel fsdp --data FILE --out DIR

DIVE's retraining, two runs of this file on a `convert.py --method dive` checkpoint: stage 0 the
router alone over every expert (--train router --dense-routing 0.05 --out s0), then stage 1 on s0
(--train lora,router,norms --lora-alpha 16). At top-1 the router learns only in stage 0: DIVE
weighs the chosen expert by exactly 1.

Imports model.py (the model), data.py (text files, perplexity), checkpoint.py (output directories,
saving), demo.py (the demo's path), export.py (the score bounds --keep-function uses) and
parallel.py (the process group, DDP and FSDP2), flags.py (the flags of the specs).
Writes DIR: a checkpoint that model.py loads (adapters merged; config.json with the routing
trained), train_log.jsonl, and train_state.safetensors + train_state.json, from which --resume
continues. How each routing trains the router (model.py, ROUTINGS): `sum` gives it no gradient, only
--bias-balance moves its selection; `scaled` starts exactly at `sum` and trains it once gamma moves;
`softmax` trains it from the first step. Read top to bottom: the spec, data, LoRA, what learns,
routing, checkpoints, the loop, CLI.
"""
import contextlib
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from checkpoint import (check_out, check_space, exit_on_sigterm, output_dir, save_checkpoint,
                        save_safetensors, source_dtype)
from data import check_file, file_and_task, perplexity, read_text, split_heldout
from demo import DEMOS, cache_dir, resolve
from export import norm_output_bound, score_bound
from flags import HelpFormatter, add_flags, from_flags, setting
from model import (MLP, ROUTINGS, PARAMETRIC_ROUTERS, Experts, MoEMLP, RMSNorm, check_checkpoint,
                   check_device, load_config, load_model, load_tokenizer)
from parallel import (PARALLEL, clip_gradients, peak_memory, setup, shard_like, teardown, whole,
                      wrap)

# -----------------------------------------------------------------------------
# the spec: everything that decides the result (a resumed run must have the same)

TRAINABLE = ("router", "norms", "lora", "experts", "all")


@dataclass
class TrainSpec:
    data: tuple = setting((), "training text (.txt, or .jsonl with --field), repeatable; the last "
                          "--holdout of each file is held out as validation text, one task per "
                          "file (or per TASK name)", action="append", metavar="FILE[:TASK]")
    field: str | None = setting(None, ".jsonl field(s) to read, comma-separated (default: 'text', "
                                "or every string field)")
    holdout: float = setting(0.1, "fraction of each file held out: the validation text")
    train: tuple | None = setting(None, f"what learns, comma-separated: {', '.join(TRAINABLE)} "
                                  f"(experts: every FFN weight; all: every parameter; lora: "
                                  f"adapters on attention and every FFN projection, stacked "
                                  f"experts included). Default: lora,router for an MoE (lora "
                                  f"where nothing routes), lora for a dense model", nargs=None,
                                  type=lambda s: tuple(filter(None, s.split(","))))
    lora_rank: int = setting(8, "adapter rank r")
    lora_alpha: float = setting(32.0, "adapter scale (the update is alpha / r B A)")
    routing: str | None = setting(None, "MoE: the routing to train with (default: the "
                                  "checkpoint's, or scaled where the router learns from sum, "
                                  "which convert.py writes). scaled: 1 + gamma p, gamma = 0 at the "
                                  "start; softmax: p", choices=ROUTINGS)
    norm_topk: bool = setting(False, "softmax: renormalise over the top-k")
    keep_function: bool = setting(False, "softmax from a sum-routed MoE: scale the router and the "
                                  "experts so that step 0 computes the sum model's function")
    dense_routing: float | None = setting(None, "DIVE's stage 0: while training, every expert "
                                          "runs, weighted by softmax(scores / T); validation and "
                                          "the saved model still route top-k", metavar="T")
    balance: float = setting(0.0, "Switch balance loss coefficient, averaged over the MoE layers "
                             "(the paper: 0.01)")
    bias_balance: float = setting(0.0, "per-expert selection bias step per optimizer step, towards "
                                  "the mean load, without a loss (DeepSeek-V3; CMoE: 0.001)")
    seqlen: int = setting(512, "tokens per training window")
    batch: int = setting(8, "windows per micro-batch, per process")
    accum: int = setting(1, "micro-batches per optimizer step")
    tokens: int = setting(65536, "training tokens, all processes together")
    steps: int | None = setting(None, "optimizer steps (instead of --tokens)")
    lr: float = setting(2e-4, "peak learning rate (AdamW)")
    min_lr: float | None = setting(None, "learning rate at the end of the cosine (default lr / "
                                   "10)")
    warmup: int = setting(10, "linear warm-up steps")
    weight_decay: float = setting(0.0, "AdamW weight decay, on matrices")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this")
    checkpointing: bool = setting(False, "activation checkpointing: recompute each block in the "
                                  "backward pass (less memory, more time)")
    seed: int = setting(0, "seeds the data order and the adapters")

    def __post_init__(self):
        self.data = tuple(self.data)
        self.train = tuple(self.train) if self.train is not None else None
        for name in ("lr", "balance", "bias_balance", "warmup", "weight_decay", "lora_alpha",
                     "grad_clip"):
            value, low = getattr(self, name), "positive" if name == "lr" else "non-negative"
            if value < 0 or (value == 0 and name == "lr"):
                raise ValueError(f"--{name.replace('_', '-')} {value} must be {low}")
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"--beta2 {self.beta2} must be in [0, 1)")
        self.min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        if self.routing is not None and self.routing not in ROUTINGS:
            raise ValueError(f"--routing {self.routing!r} is not one of {', '.join(ROUTINGS)}")
        if self.keep_function and self.routing != "softmax":
            raise ValueError("--keep-function rescales a sum-routed MoE for --routing softmax")
        if self.dense_routing is not None and self.dense_routing <= 0:
            raise ValueError(f"--dense-routing {self.dense_routing} must be a positive temperature")
        for name in ("lora_rank", "seqlen", "batch", "accum", "tokens"):
            low = 2 if name == "seqlen" else 1
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at "
                                 f"least {low}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps {self.steps} must be at least 1")
        if not 0 < self.holdout < 1:
            raise ValueError(f"--holdout {self.holdout} must be in (0, 1): the tail is the "
                             f"validation text")
        if self.train is None:  # with_defaults chooses, and checks again
            return
        unknown = [name for name in self.train if name not in TRAINABLE]
        if unknown:
            raise ValueError(f"--train {','.join(unknown)}: not one of {', '.join(TRAINABLE)}")
        if not self.train:
            raise ValueError("--train names nothing to learn")
        if "lora" in self.train and ("all" in self.train or "experts" in self.train):
            raise ValueError("--train lora with experts or all: those already train the weights "
                             "the adapters would adapt")


@dataclass
class RunSpec:
    """How a run validates, logs and saves, and where it runs: what leaves the result as it is."""
    val_seqlen: int = setting(512, "tokens per validation window")
    val_windows: int = setting(4, "validation windows per task at most")
    val_every: int = setting(50, "validate every this many steps (and at the end)")
    log_every: int = setting(10, "a progress line every this many steps")
    save_every: int = setting(0, "also save every this many steps (0: only at the end)")
    resume: bool = setting(False, "continue the run saved in --out (same settings)")
    dtype: str = setting("float32", "weight dtype (float32 trains with bf16 autocast on a GPU)",
                         choices=["float32", "bfloat16"])
    save_dtype: str | None = setting(None, "dtype of the written weights (default: the "
                                     "checkpoint's); the training state that --resume reads keeps "
                                     "the trained parameters' own",
                                     choices=["float32", "bfloat16", "float16"])
    device: str = setting("cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda, ...")
    parallel: str = setting("ddp", "ddp: every process holds the whole model and its training "
                            "state; fsdp: FSDP2 shards them between the processes (parallel.py)",
                            choices=PARALLEL)
    cpu_offload: bool = setting(False, "fsdp on a GPU: keep the shards and AdamW state in CPU "
                                "memory")

    def __post_init__(self):
        if self.parallel not in PARALLEL:
            raise ValueError(f"--parallel {self.parallel!r} is not one of {', '.join(PARALLEL)}")
        if self.cpu_offload and not (self.parallel == "fsdp" and self.device.startswith("cuda")):
            raise ValueError("--cpu-offload moves FSDP2's shards off a GPU: it needs --parallel "
                             "fsdp and --device cuda")
        for name, low in (("val_seqlen", 2), ("val_windows", 1), ("val_every", 1),
                          ("log_every", 1), ("save_every", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at "
                                 f"least {low}")
        check_device(self.device)


def with_defaults(spec: TrainSpec, cfg) -> tuple[TrainSpec, str]:
    """What the flags left open, chosen for the common case of the checkpoint: healing for a
    converted MoE (LoRA and the router, with CMoE's `scaled` routing where the router would learn
    from `sum`, which gives it no gradient), LoRA for a dense model. -> (the spec, what was
    chosen, for the log)."""
    moe = cfg.moe
    routes = moe is not None and any(layer and layer["top_k"] for layer in moe["layers"])
    train, routing, chosen = spec.train, spec.routing, []
    if train is None:
        learnable = routes and moe["router"] in PARAMETRIC_ROUTERS
        train = ("lora", "router") if learnable else ("lora",)
        chosen.append(f"--train {','.join(train)}")
    own = moe.get("routing", "sum") if moe is not None else None
    if routing is None and "router" in train and own == "sum" and not spec.bias_balance:
        routing = "scaled"
        chosen.append("--routing scaled")
    spec = replace(spec, train=train, routing=routing)
    kind = "a dense" if moe is None else "an MoE"
    return spec, f"for {kind} checkpoint: {' '.join(chosen)}" if chosen else ""


def check_model(spec: TrainSpec, cfg) -> None:
    """What the spec needs of the checkpoint, before any slow work."""
    moe_only = {"--routing": spec.routing is not None, "--train router": "router" in spec.train,
                "--balance": spec.balance > 0, "--bias-balance": spec.bias_balance > 0,
                "--norm-topk": spec.norm_topk, "--dense-routing": spec.dense_routing is not None}
    if cfg.moe is None:
        given = [name for name, used in moe_only.items() if used]
        if given:
            raise ValueError(f"{given[0]} applies to an MoE checkpoint; this one is dense")
        return
    routing = spec.routing or cfg.moe.get("routing", "sum")
    if spec.keep_function and cfg.moe.get("routing", "sum") != "sum":
        raise ValueError(f"--keep-function starts from a sum-routed MoE; this one routes by "
                         f"{cfg.moe['routing']!r}")
    if spec.balance and routing == "sum":
        raise ValueError("--balance needs router probabilities: --routing scaled or softmax")
    if "router" in spec.train and routing == "sum":
        raise ValueError("--train router with sum routing: the router gets no gradient; use "
                         "--routing scaled or softmax (or move its selection with --bias-balance)")
    learns_router = "router" in spec.train or spec.keep_function
    if learns_router and cfg.moe["router"] not in PARAMETRIC_ROUTERS:
        raise ValueError(f"the {cfg.moe['router']!r} router has no parameters to train or rescale")

# -----------------------------------------------------------------------------
# data: each file's tokens, its tail held out for validation, the rest cut into windows


def load_data(tokenizer, spec: TrainSpec, val_seqlen: int) -> tuple[torch.Tensor, dict]:
    """-> training windows (W, seqlen) int64 of every file, and each task's held-out tokens."""
    windows, heldout = [], {}
    for entry in spec.data:  # FILE[:TASK]
        file, task = file_and_task(entry)
        ids = tokenizer.encode(read_text(file, spec.field)).ids
        head, tail = split_heldout(ids, spec.holdout)
        if len(head) < spec.seqlen:
            raise ValueError(f"{file}: {len(head)} tokens (before the held-out {spec.holdout:.0%}) "
                             f"make no window of --seqlen {spec.seqlen}")
        n = len(head) // spec.seqlen
        windows.append(torch.tensor(head[: n * spec.seqlen]).view(n, spec.seqlen))
        heldout.setdefault(task, []).extend(tail)
    heldout = {task: torch.tensor(ids, dtype=torch.int64) for task, ids in heldout.items()}
    for task, tokens in heldout.items():
        if len(tokens) < val_seqlen:
            raise ValueError(f"task {task!r}: its held-out tail has {len(tokens)} tokens, fewer "
                             f"than one window of --val-seqlen {val_seqlen}")
    return torch.cat(windows), heldout


def batch_windows(n_windows: int, step: int, micro: int, batch: int, accum: int, rank: int,
                  world: int, seed: int) -> torch.Tensor:
    """Window ids of one micro-batch of one process. The windows are read in a seeded permutation
    per epoch; an optimizer step takes the next batch * accum * world of them, micro-batch after
    micro-batch, each split between the processes, so one process with a world-times larger batch
    sees the same."""
    per_step = batch * accum * world
    first = step * per_step + micro * batch * world + rank * batch
    ids = []
    for position in range(first, first + batch):
        epoch, i = divmod(position, n_windows)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n_windows, generator=generator)
        ids.append(order[i])
    return torch.stack(ids)

# -----------------------------------------------------------------------------
# LoRA: a low-rank update of a weight, merged into it when saved


class LoRA(nn.Module):
    """W + (alpha / r) B @ A for a weight W (..., m, n), the leading dims batching it (stacked
    experts get an adapter each): A (..., r, n) random, B (..., m, r) zero, so training starts at W
    exactly. The merged weight is what every forward uses (torch parametrize), so a saved model is
    the trained one."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        *lead, m, n = weight.shape
        a = torch.randn(*lead, rank, n, generator=generator) / math.sqrt(n)
        self.A = nn.Parameter(a.to(weight.device, torch.float32))
        self.B = nn.Parameter(torch.zeros(*lead, m, rank, device=weight.device))
        self.scale = alpha / rank

    def forward(self, weight):
        return merge(weight, self.A, self.B, self.scale)


def merge(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    return weight + (scale * (B @ A)).to(weight.dtype)


def lora_targets(model) -> list[tuple[nn.Module, str]]:
    """Attention q/k/v/o and every FFN projection: dense, shared, and the stacked experts (a
    recursive conversion's too: each expert's whole part and the parts)."""
    targets = []
    for block in model.layers:
        attn = block.self_attn
        targets += [(getattr(attn, f"{p}_proj"), "weight") for p in "qkvo"]
        for module in block.mlp.modules():  # the shared GLU before the experts, as registered
            if isinstance(module, MLP):
                targets += [(getattr(module, f"{p}_proj"), "weight")
                            for p in ("gate", "up", "down")]
            elif isinstance(module, Experts):
                targets += [(module, "gate_up_proj"), (module, "down_proj")]
    return targets


def add_lora(model, rank: int, alpha: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module, name in lora_targets(model):
        adapter = LoRA(getattr(module, name), rank, alpha, generator)
        parametrize.register_parametrization(module, name, adapter)


def merged_state(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict of the model (whole tensors) with every adapter merged into its weight, under
    the weight's own name."""
    merged = {}
    for name, tensor in state.items():
        if ".parametrizations." not in name:
            merged[name] = tensor
        elif name.endswith(".original"):
            owner, weight = name.removesuffix(".original").split(".parametrizations.")
            adapter = f"{owner}.parametrizations.{weight}.0"
            scale = model.get_submodule(adapter).scale
            merged[f"{owner}.{weight}"] = merge(tensor, state[f"{adapter}.A"],
                                                state[f"{adapter}.B"], scale)
    return merged

# -----------------------------------------------------------------------------
# what learns


def set_trainable(model, names: tuple) -> dict[str, nn.Parameter]:
    """Freezes everything but the named sets (TRAINABLE; `experts` = every FFN weight, dense, shared
    or routed, and a compensated layer's biases) and the adapters; returns the trainable parameters
    by name."""
    model.requires_grad_("all" in names)
    for module in model.modules():
        ffn = "experts" in names and isinstance(module, (MLP, Experts))
        norm = "norms" in names and isinstance(module, RMSNorm)
        if ffn or norm or isinstance(module, LoRA):
            module.requires_grad_(True)
        if "router" in names and isinstance(module, MoEMLP) and module.router is not None:
            module.router.requires_grad_(True)
        if "experts" in names and isinstance(module, MoEMLP) and module.bias is not None:
            module.bias.requires_grad_(True)  # a compensated layer's stand-in for skipped experts
    return {name: p for name, p in model.named_parameters() if p.requires_grad}

# -----------------------------------------------------------------------------
# routing while training: a checkpoint's routing switched, and a route that records the load


@torch.no_grad()
def set_routing(model, routing: str, norm_topk: bool = False, keep_function: bool = False,
                eps: float = 1e-3) -> None:
    """Switches every MoE layer's routing (model.py, ROUTINGS). `scaled` gets gamma = 0, so the
    function stays the sum model's. keep_function (sum -> softmax): the router scores are scaled by
    c = eps / (a bound on their spread) and each routed expert's output by E (or top_k with
    norm_topk), so every weight E * p_e lies within exp(+-eps) of 1 for any input and the top-k
    order is unchanged."""
    for block in model.layers:
        mlp = block.mlp
        if not isinstance(mlp, MoEMLP) or mlp.router is None:
            continue
        router = mlp.router
        if routing == "scaled" and not hasattr(router, "gamma"):
            weight = mlp.experts.gate_up_proj
            router.gamma = nn.Parameter(torch.zeros(1, dtype=weight.dtype, device=weight.device))
        if routing != "scaled" and hasattr(router, "gamma"):
            del router.gamma
        if keep_function:
            bound = score_bound(router, norm_output_bound(block.ffn_norm))
            c = eps / max(bound, 1e-30)
            router.get_parameter("up" if router.kind == "cmoe" else "weight").mul_(c)
            if router.bias is not None:
                router.bias.mul_(c)
            mlp.experts.down_proj.mul_(mlp.top_k if norm_topk else mlp.experts.down_proj.shape[0])
        mlp.routing, mlp.norm_topk = routing, norm_topk
    model.cfg.moe = {**model.cfg.moe, "routing": routing, "norm_topk": norm_topk}


def add_select_bias(model) -> None:
    for block in model.layers:
        mlp = block.mlp
        if isinstance(mlp, MoEMLP) and mlp.router is not None and mlp.router.select_bias is None:
            weight = mlp.router.weight
            mlp.router.select_bias = torch.zeros(len(weight), device=weight.device)
    model.cfg.moe = {**model.cfg.moe, "select_bias": True}


def moe_layers(model) -> list[MoEMLP]:
    return [b.mlp for b in model.layers if isinstance(b.mlp, MoEMLP) and b.mlp.top_k]


def recording_route(mlp: MoEMLP, x: torch.Tensor, temperature: float | None = None):
    """MoEMLP.route in training mode, which also records each expert's load and the balance loss
    (record). temperature (DIVE's router warm-up, --dense-routing): every expert, weighted
    softmax(s / T), while the load logged is what top-k would pick. In evaluation, the model's own
    route."""
    if not mlp.training:
        return MoEMLP.route(mlp, x)
    scores = mlp.router(x, mlp.experts)  # (N, E) float32
    if temperature is not None:
        probs = (scores / temperature).softmax(dim=-1)
        record(mlp, scores.topk(mlp.top_k, dim=-1).indices, probs)
        return torch.arange(scores.shape[1], device=x.device).expand(len(x), -1), probs
    idx, weights, probs = mlp.choose(scores)
    record(mlp, idx, probs)
    return idx, weights


def record(mlp: MoEMLP, idx: torch.Tensor, probs: torch.Tensor | None) -> None:
    """mlp.load: tokens per expert (E,); mlp.balance_loss: the Switch balance loss E * sum_e f_e P_e
    (f_e: share of the selections that went to e, P_e: mean router probability of e), whose
    gradient flows through P."""
    E = probs.shape[1] if probs is not None else mlp.experts.gate_up_proj.shape[0]
    chosen = idx[idx >= 0]  # threshold selection leaves slots empty (-1)
    mlp.load = torch.bincount(chosen, minlength=E)
    if probs is not None:
        f = mlp.load.float() / max(chosen.numel(), 1)
        mlp.balance_loss = E * (f * probs.mean(dim=0)).sum()


def install_recording(model, temperature: float | None = None) -> None:
    """Puts recording_route in every routed layer, in place, as kernels.use_kernels puts its
    forward."""
    for mlp in moe_layers(model):
        mlp.route = functools.partial(recording_route, mlp, temperature=temperature)
        mlp.load = mlp.balance_loss = None

# -----------------------------------------------------------------------------
# checkpoints: the merged model to use, and the training state to resume from (safetensors + JSON)


def fingerprint(path: str) -> str:
    """SHA-256 of a checkpoint's config.json and tensor files (about 1 GB/s): a resumed run checks
    that the base it continues is the base it was trained from, not, say, a merged copy."""
    import hashlib
    digest = hashlib.sha256()
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    for name in ["config.json", *files]:
        digest.update(name.encode())
        with open(os.path.join(path, name), "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def resolved_data(spec: TrainSpec) -> TrainSpec:
    """The spec with every data file as its real path and task, so that a resumed run matches
    whichever way (relative, absolute, through a link) the files are named."""
    data = [file_and_task(d) for d in spec.data]
    return replace(spec, data=tuple(f"{os.path.realpath(file)}:{task}" for file, task in data))


def save_bytes(n_weights: int, trainable: dict, dtype: torch.dtype) -> int:
    """About what save() writes: the model's n_weights in `dtype` (adapters merged), the
    trainable parameters and AdamW's two moments of each, with 5% to spare."""
    state = sum(3 * p.numel() * p.element_size() for p in trainable.values())
    return int(1.05 * (n_weights * dtype.itemsize + state))


def gather(model, optimizer, trainable: dict, keep: bool) -> tuple[dict, dict]:
    """-> (the model's state_dict, the training state: param.*, buffer.* and optimizer.*), every
    tensor whole and on the CPU. Under FSDP2 each is gathered from its shards in turn: every rank
    calls this, and only the one that keeps them (rank 0) gets them."""
    def kept(tensor: torch.Tensor) -> torch.Tensor | None:
        tensor = whole(tensor.detach())
        return tensor.cpu().contiguous() if keep else None
    if hasattr(model, "reshard"):  # FSDP2's root stays gathered after a forward
        model.reshard()
    state = {n: kept(t) for n, t in model.state_dict().items()}
    tensors = {f"param.{n}": state[n] for n in trainable}
    tensors |= {f"buffer.{n}": state[n] for n in state if n.endswith("select_bias")}
    ids = {id(p): n for n, p in trainable.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optimizer.{ids[id(p)]}.{key}"] = kept(value)
    return state, tensors


def save(out: str, model, hf_config: dict, base: dict, optimizer, state: dict, tensors: dict,
         step: int, steps: int, spec: TrainSpec, world: int, log_rows: list[dict],
         dtype: torch.dtype, previous: str | None) -> None:
    """The merged model in `dtype` and the training state (gather's), replacing `out`
    atomically; a failed write (a full disk) says what `out` still holds."""
    with output_dir(out, previous) as tmp:
        save_checkpoint(model, hf_config, tmp, copy_from=base["path"],
                        state=merged_state(model, state), dtype=dtype)
        save_safetensors(tensors, os.path.join(tmp, "train_state.safetensors"))
        state = {"step": step, "steps": steps, "source": base["path"],
                 "source_sha256": base["sha256"], "world": world,
                 "spec": asdict(resolved_data(spec)),
                 "lr": [g["lr"] for g in optimizer.param_groups]}
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump(state, f, indent=2)
        with open(os.path.join(tmp, "train_log.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in log_rows)


def check_resume(out: str, spec: TrainSpec, base: dict, world: int) -> dict:
    """The training state save() wrote into `out`, checked to belong to the same training (the
    spec, the process count, the base's SHA-256) before any slow work."""
    file = os.path.join(out, "train_state.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"--resume: {file} not found (no earlier run of train.py saved "
                                f"into --out)")
    with open(file) as f:
        state = json.load(f)
    mine = json.loads(json.dumps(asdict(resolved_data(spec))))  # tuples as lists, as saved
    for key in sorted(set(mine) | set(state["spec"])):
        if mine.get(key) != state["spec"].get(key):
            raise ValueError(f"--resume: {out} was trained with {key} = "
                             f"{state['spec'].get(key)!r}, this run asks for {mine.get(key)!r}")
    if state["world"] != world:
        raise ValueError(f"--resume: {out} trained on {state['world']} processes, this run on "
                         f"{world}")
    if state.get("source_sha256") != base["sha256"]:
        raise ValueError(f"--resume: {base['path']} is not the checkpoint {out} was trained from "
                         f"({state['source']}; its tensors or config.json differ, or the state "
                         f"predates this check): resume from that one, or start afresh")
    return state


def load_state(out: str, state: dict, model, optimizer,
               trainable: dict) -> tuple[int, list[dict]]:
    """Restores what save() wrote (checked by check_resume), each rank its shards under FSDP2:
    -> (step, log rows)."""
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(out, "train_state.safetensors"))
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(shard_like(tensors[f"param.{n}"].reshape(p.shape), p))
        for n, b in model.named_buffers():
            if n.endswith("select_bias"):
                b.copy_(tensors[f"buffer.{n}"])
    for group, lr in zip(optimizer.param_groups, state["lr"]):
        group["lr"] = lr
        for p in group["params"]:
            name = next(n for n, q in trainable.items() if q is p)
            keys = [k.rsplit(".", 1)[1] for k in tensors if k.startswith(f"optimizer.{name}.")]
            saved = {k: tensors[f"optimizer.{name}.{k}"] for k in keys}  # AdamW's step stays whole
            optimizer.state[p] = {k: v if k == "step" else shard_like(v.reshape(p.shape), p)
                                  for k, v in saved.items()}
    with open(os.path.join(out, "train_log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return state["step"], rows

# -----------------------------------------------------------------------------
# the loop


def lr_at(step: int, spec: TrainSpec, steps: int) -> float:
    """Linear warm-up to lr over `warmup` steps, then a cosine down to min_lr at the last step."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, steps - 1 - spec.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return spec.min_lr + (spec.lr - spec.min_lr) * cosine


@torch.no_grad()
def validate(model, heldout: dict, seqlen: int, windows: int) -> dict:
    model.eval()
    ppl = {task: perplexity(model, tokens, seqlen, windows)[1] for task, tokens in heldout.items()}
    model.train()
    return ppl


def prepare(model, spec: TrainSpec) -> dict[str, nn.Parameter]:
    """Puts the loaded model in the spec's training shape (routing, selection bias, DIVE's dense
    routing, adapters, activation checkpointing); returns the trainable parameters by name."""
    if model.cfg.moe is not None and spec.routing is not None:
        set_routing(model, spec.routing, spec.norm_topk, spec.keep_function)
    if spec.bias_balance:
        add_select_bias(model)
    install_recording(model, spec.dense_routing)
    if "lora" in spec.train:
        add_lora(model, spec.lora_rank, spec.lora_alpha, spec.seed)
    trainable = set_trainable(model, spec.train)
    if spec.checkpointing:
        from torch.utils.checkpoint import checkpoint
        for block in model.layers:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return trainable


def adamw(trainable: dict[str, nn.Parameter], spec: TrainSpec) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only."""
    matrices = [p for p in trainable.values() if p.dim() >= 2]
    others = [p for p in trainable.values() if p.dim() < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": spec.weight_decay},
                              {"params": others, "weight_decay": 0.0}], lr=spec.lr,
                             betas=(0.9, spec.beta2), fused=False)


LOSS_LOGITS = 1 << 27  # float32 logits a micro-batch forms at once (512 MiB); more go in slices


class NextTokenLoss(nn.Module):
    """The model's mean next-token cross-entropy over a batch of windows (B, T): the module DDP
    wraps. While the batch's logits fit in LOSS_LOGITS floats (SmolLM2's 8 x 256 tokens do) they
    are formed whole. Gemma's 262k vocabulary makes them 2 GiB per 8 x 256 tokens, and their
    gradient as much again: there the output projection runs on slices of positions, each
    recomputed in backward (checkpointed), so that one slice's logits are alive at a time."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        targets = tokens[:, 1:].flatten()  # (B (T - 1),)
        vocab = self.model.lm_head.weight.shape[0]
        if len(targets) * vocab <= LOSS_LOGITS:
            logits = self.model(tokens)[:, :-1].float()
            return F.cross_entropy(logits.flatten(0, 1), targets)
        from torch.utils.checkpoint import checkpoint
        h = self.model.hidden(tokens)[:, :-1].flatten(0, 1)  # (B (T - 1), D)
        step = max(1, LOSS_LOGITS // vocab)
        total = sum(checkpoint(self.summed, h[s: s + step], targets[s: s + step],
                               use_reentrant=False) for s in range(0, len(targets), step))
        return total / len(targets)

    def summed(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model.lm_head(h).float(), targets, reduction="sum")


def train_step(objective, model, windows: torch.Tensor, step: int, spec: TrainSpec, optimizer,
               trainable: dict, rank: int, world: int, device: str, autocast) -> dict:
    """One optimizer step: spec.accum micro-batches of the objective (NextTokenLoss, DDP-wrapped
    on many processes: it averages the gradients on the last), the balance loss, clipping, and
    the selection biases moved towards the mean load. -> the log row's loss, balance loss,
    gradient norm and expert load."""
    layers = moe_layers(model)
    loss_sum, balance_sum, load = 0.0, 0.0, [0] * len(layers)
    for micro in range(spec.accum):
        ids = batch_windows(len(windows), step, micro, spec.batch, spec.accum, rank, world,
                            spec.seed)
        tokens = windows[ids].to(device)  # (batch, seqlen)
        last = micro == spec.accum - 1
        ddp_defers = hasattr(objective, "no_sync") and not last  # FSDP2 reduces every micro
        with objective.no_sync() if ddp_defers else contextlib.nullcontext(), \
                autocast:
            loss = objective(tokens)
            balance = torch.zeros(())
            if spec.balance:
                balance = torch.stack([m.balance_loss for m in layers]).mean()
            ((loss + spec.balance * balance) / spec.accum).backward()
        loss_sum += loss.item() / spec.accum
        balance_sum += balance.item() / spec.accum
        load = [counts + m.load.double() for counts, m in zip(load, layers)]  # (E,) per layer
    if world > 1:  # the step's loss and load over every process, not this one's share
        import torch.distributed as dist
        flat = torch.cat([torch.tensor([loss_sum, balance_sum], dtype=torch.float64, device=device),
                          *load])
        dist.all_reduce(flat)
        loss_sum, balance_sum = (flat[:2] / world).tolist()
        load = list(flat[2:].split([len(c) for c in load]))
    grad_norm = clip_gradients(list(trainable.values()), spec.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if spec.bias_balance:  # each expert's selection bias moves towards the mean load
        for counts, m in zip(load, layers):
            m.router.select_bias += (spec.bias_balance * torch.sign(counts.mean() - counts)).float()
    ratio = [(c.max() / c.mean()).item() for c in load if c.sum() > 0]
    return {"loss": loss_sum, "grad_norm": grad_norm, "balance": balance_sum,
            "load_max_over_mean": sum(ratio) / len(ratio) if ratio else None}


def memory_line(model, optimizer, device: str) -> str:
    """What this process holds of the training state (its shards under FSDP2; gradients counted
    at the size of the trainable parameters, as after a backward) and its peak memory so far."""
    from torch.distributed.tensor import DTensor
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    size = lambda tensors: sum(local(t).numel() * local(t).element_size() for t in tensors)
    weights = size(model.parameters())
    gradients = size(p for p in model.parameters() if p.requires_grad)
    adamw = size(v for s in optimizer.state.values() for v in s.values())
    gib = lambda n: f"{n / 2**30:.3f} GiB"
    return (f"memory per process: weights {gib(weights)}, gradients {gib(gradients)}, AdamW "
            f"{gib(adamw)}; peak {gib(peak_memory(device))}")


def train(checkpoint: str, out: str, spec: TrainSpec, run: RunSpec | None = None,
          log=print) -> list[dict]:
    """Trains the checkpoint as the spec says (with_defaults filling what it leaves open) and
    writes the result to `out` (at the end, and every run.save_every steps) with its float weights
    in run.save_dtype (default: the checkpoint's). Returns the log rows: training steps, and
    validation ppl per task."""
    run = run or RunSpec()
    rank, world, device, made_group = setup(run.device, run.parallel)
    say = log if rank == 0 else (lambda *_: None)
    for file in (file_and_task(d)[0] for d in spec.data):
        check_file(file)
    if not spec.data:
        raise ValueError("--data: give at least one text file to train on")
    reads = (("checkpoint", checkpoint if checkpoint not in DEMOS else cache_dir()),
             ("demo cache", cache_dir()), *(("--data file", file_and_task(d)[0])
                                           for d in spec.data))
    check_out(out, reads)
    path = resolve(checkpoint)
    cfg, hf_config = load_config(path)
    spec, chosen = with_defaults(spec, cfg)
    if chosen:
        say(f"defaults {chosen}")
    check_model(spec, cfg)
    check_checkpoint(path, cfg)
    base = {"path": path, "sha256": fingerprint(path)}
    state = check_resume(out, spec, base, world) if run.resume else None
    save_dtype = getattr(torch, run.save_dtype or source_dtype(hf_config))
    tokenizer = load_tokenizer(path)
    windows, heldout = load_data(tokenizer, spec, run.val_seqlen)
    per_step = spec.batch * spec.accum * world
    steps = spec.steps or max(1, spec.tokens // (per_step * spec.seqlen))
    say(f"data: {len(windows)} windows x {spec.seqlen} tokens to train on, held-out tasks "
        f"{', '.join(heldout)}; {steps} steps of {per_step} windows "
        f"({steps * per_step * spec.seqlen} tokens)")

    torch.manual_seed(spec.seed)
    sharded = run.parallel == "fsdp"
    # FSDP2 moves each group to the GPU as it shards it: a GPU never holds the whole model
    model = load_model(path, getattr(torch, run.dtype), "cpu" if sharded else device)
    n_weights = sum(p.numel() for p in model.parameters())  # before the adapters
    trainable = prepare(model, spec)
    check_space(out, save_bytes(n_weights, trainable, save_dtype),
                "saving the model and its training state")
    n_trainable = sum(p.numel() for p in trainable.values())
    mixed = device.startswith("cuda") and run.dtype == "float32"  # bf16 compute, fp32 weights
    objective = wrap(NextTokenLoss(model), model, run.parallel, world, device, mixed and sharded,
                     run.cpu_offload, unused_parameters=cfg.moe is not None)
    trainable = {n: p for n, p in model.named_parameters() if n in trainable}  # FSDP2's shards
    optimizer = adamw(trainable, spec)
    step, rows = 0, []
    if run.resume:
        step, rows = load_state(out, state, model, optimizer, trainable)
    saved = f"the state saved at step {step}" if run.resume else None
    how = f"{run.parallel.upper()} on {world} process{'es' if world > 1 else ''}" \
        if world > 1 or sharded else "1 process"
    say(f"training {n_trainable / 1e6:.2f}M parameters ({', '.join(spec.train)}) of {path} with "
        f"{how}, {device}" + (f", resuming at step {step}" if run.resume else ""))
    autocast = contextlib.nullcontext()
    if mixed and not sharded:  # FSDP2's policy casts instead
        autocast = torch.autocast("cuda", torch.bfloat16)

    def validate_into_log(at: int) -> None:  # rank 0 keeps the row
        t0 = time.perf_counter()
        row = {"step": at, "val_ppl": validate(model, heldout, run.val_seqlen, run.val_windows)}
        ppl = "  ".join(f"{t} {p:.3f}" for t, p in row["val_ppl"].items())
        say(f"step {at:>5}  val ppl {ppl}  ({time.perf_counter() - t0:.0f}s)")
        if rank == 0:
            rows.append(row)
    model.train()
    validates = rank == 0 or sharded  # FSDP2: every rank takes part in the forward
    if step == 0 and validates:
        validate_into_log(0)
    while step < steps:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, spec, steps)
        done = train_step(objective, model, windows, step, spec, optimizer, trainable, rank,
                          world, device, autocast)
        step += 1
        row = {"step": step, "loss": done["loss"], "lr": optimizer.param_groups[0]["lr"],
               "grad_norm": done["grad_norm"],
               "tok_s": per_step * spec.seqlen / (time.perf_counter() - t0),
               "balance": done["balance"], "load_max_over_mean": done["load_max_over_mean"]}
        rows.append(row)
        if step % run.log_every == 0 or step == 1 or step == steps:
            imbalance = row["load_max_over_mean"]
            load_text = f"  load max/mean {imbalance:.2f}" if imbalance is not None else ""
            balance_text = f"  balance {row['balance']:.4f}" if spec.balance else ""
            say(f"step {step:>5}/{steps}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                f"{row['tok_s']:.0f} tok/s{balance_text}{load_text}")
        if step == 1:
            say(memory_line(model, optimizer, device))
        if validates and (step % run.val_every == 0 or step == steps):
            validate_into_log(step)
        if (rank == 0 or sharded) and ((run.save_every and step % run.save_every == 0)
                                       or step == steps):
            model_state, tensors = gather(model, optimizer, trainable, keep=rank == 0)
            if rank == 0:
                save(out, model, hf_config, base, optimizer, model_state, tensors, step, steps,
                     spec, world, rows, save_dtype, saved)
            saved = f"the state saved at step {step}"
    teardown(made_group)
    say(f"wrote {out}")
    return rows

# -----------------------------------------------------------------------------
# CLI


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Continue training a dense or MoE checkpoint: healing "
                                "(LoRA + router) or downcycling (all parameters, softmax routing "
                                "+ balance loss).",
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory (dense or converted), or 'demo' / "
                   "'demo-gemma'")
    p.add_argument("--out", required=True, help="output directory: the trained checkpoint and its "
                   "training state")
    add_flags(p, TrainSpec)
    add_flags(p, RunSpec)
    a = p.parse_args()
    exit_on_sigterm()
    try:
        train(a.checkpoint, a.out, from_flags(a, TrainSpec), from_flags(a, RunSpec))
    except (ValueError, OSError) as e:  # bad input: the message names the file, flag or value
        sys.exit(f"train.py: error: {e}")

"""
kernels.py: fast forward passes for the MoE FFN, each tested against `reference`.

    python bench.py ffn          # times them against the dense FFN
    import kernels; kernels.use_kernels(model)   # route a loaded MoE model's FFNs through them

Imports model.py (its MoE FFN and the reference loop over experts). Semantics (model.MoEMLP): y =
shared GLU(x) + the sum, over the K experts selected for each token, of that expert's GLU(x),
unweighted. Weights as model.py stores them, every neuron's three vectors as contiguous rows of D:
w13 (E, 2F, D) = each expert's gate rows then up rows, w2 (E, F, D) = its neurons' output
directions; the shared GLU as (gate (S, D), up (S, D), down (D, S)) or None; act the gate's
nonlinearity by name (model.ACTIVATIONS: SiLU, or Gemma's tanh-GELU). w2 is (E, F, D), not
(E, D, F), because a CPU decode step streams a matrix of long rows (act @ W) several times faster
than one of F-long rows; grouped_mm takes either. DIVE's expert biases are added by layer_forward,
outside the paths. A recursive conversion's two levels (model.SplitExperts) are two calls of one
path: each chosen expert's whole part, then its chosen parts as a flat set of (expert, part)
pairs. Letters: N tokens, D model dim, E routed experts, F neurons per expert, K experts per token,
S shared. Expert id -1 marks a slot a token leaves empty (threshold selection): every path skips
it, computing nothing for it where the path can.

Paths:
  reference  model.routed_reference: a loop over all experts, the obvious version
  select     a loop over only the experts the tokens selected (one host sync to learn which): reads
             just the selected weights, in place, which is what a bandwidth-bound CPU decode needs;
             with many tokens, one GLU per expert on its run of token-slots: a CPU's prefill path
  gather     gpt-fast's mixtral einsums on per-token gathered weights: no data-dependent shape, no
             sync, so it compiles into one graph (CUDA graphs for decode); also a CPU decode's
             path when experts are too small to visit one by one
  grouped    token-slots sorted by expert, two grouped GEMMs (torch grouped_mm, int32 offsets), then
             un-permuted and summed: the prefill path on CUDA, and under torch.compile
"""
import functools

import torch
import torch.nn.functional as F

from model import ACTIVATIONS, MoEMLP, SplitExperts, expert_bias, glu, routed_reference


def shared_glu(x: torch.Tensor, shared, act: str = "silu") -> torch.Tensor:
    # x: (N, D) -> (N, D); zeros when there is no shared expert
    if shared is None:
        return torch.zeros_like(x)
    gate, up, down = shared
    return F.linear(ACTIVATIONS[act](F.linear(x, gate)) * F.linear(x, up), down)


def reference(x, idx, w13, w2, shared=None, weights=None, act="silu"):
    """x (N, D), idx (N, K) expert ids, weights (N, K) or None (unweighted) -> (N, D), as
    model.MoEMLP computes it."""
    return shared_glu(x, shared, act) + routed_reference(x, idx, w13, w2, weights, act=act)


def sort_by_expert(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """idx (N, K) -> (order (N*K,): the token-slot ids grouped by expert, offsets (E,) int32: the
    end of each expert's run). Counts come from scatter_add (no bincount, nonzero or .item()), so
    the shapes are static. Empty slots (-1) sort last, past the final offset."""
    expert = torch.where(idx >= 0, idx, n_experts).flatten()  # (N*K,) expert of each token-slot
    order = expert.argsort(stable=True)
    counts = torch.zeros(n_experts + 1, dtype=torch.int32, device=idx.device).scatter_add_(
        0, expert, torch.ones_like(expert, dtype=torch.int32))
    return order, counts[:n_experts].cumsum(0, dtype=torch.int32)


def select(x, idx, w13, w2, shared=None, weights=None, act="silu"):
    """Like reference, but visits only the experts some token selected; w13[e] is a view, so each
    selected expert's weights are read once and nothing is copied. Many tokens: the token-slots
    sorted by expert once (one host sync for the runs' ends), then one GLU per expert run, whose
    rows (n, D) are small enough that the CPU allocator reuses them, where grouped's (N K, D) slot
    buffers are fresh memory faulted in on every call (RESULTS.md, Speed)."""
    out = shared_glu(x, shared, act)
    if x.shape[0] == 1:  # decode: every selected expert serves the one token
        for k, e in enumerate(idx[0].tolist()):
            if e < 0:
                continue
            y = glu(x, w13[e], w2[e], act)
            out += y if weights is None else y * weights[0, k].to(y.dtype)
        return out
    K = idx.shape[1]
    order, offsets = sort_by_expert(idx, w13.shape[0])
    slot_weights = None if weights is None else weights.flatten()  # (N*K,) by slot id
    start = 0
    for e, end in enumerate(offsets.tolist()):  # each expert's run order[start:end]
        if end > start:
            slots = order[start:end]
            tokens = slots // K  # (n,) ascending: a stable sort keeps token order within a run
            y = glu(x[tokens], w13[e], w2[e], act)  # (n, D)
            if slot_weights is not None:
                y = y * slot_weights[slots, None].to(y.dtype)
            out.index_add_(0, tokens, y)
        start = end
    return out


def gather(x, idx, w13, w2, shared=None, weights=None, act="silu"):
    """gpt-fast's mixtral forward: each token's K experts gathered, then two einsums."""
    valid = idx >= 0  # (N, K); an empty slot gathers expert 0 and is zeroed
    idx = idx.clamp(min=0)
    gate, up = torch.einsum("nd,nkfd->nkf", x, w13[idx]).chunk(2, dim=-1)  # (N, K, F) each
    h = torch.where(valid[..., None], ACTIVATIONS[act](gate) * up, 0)
    if weights is not None:
        h = h * weights[..., None].to(x.dtype)
    routed = torch.einsum("nkf,nkfd->nd", h, w2[idx])  # (N, D), summed over k and f
    return shared_glu(x, shared, act) + routed


def grouped(x, idx, w13, w2, shared=None, weights=None, act="silu"):
    """Sorts the N*K token-slots by expert and runs each GLU matmul as one grouped GEMM over the
    experts' contiguous runs. Compiled, no host sync anywhere, so the whole function is one graph;
    eager, one sync learns how many slots are filled, so empty ones are never copied."""
    N, K = idx.shape
    order, offsets = sort_by_expert(idx, w13.shape[0])
    compiled = torch.compiler.is_compiling()
    if not compiled:  # eager: the empty slots (threshold selection) sort last; leave them out
        order = order[: int(offsets[-1])]
    xs = x[order // K]  # (M, D) one row per slot, in expert order (M <= N*K)
    # (M, F) each
    gate, up = F.grouped_mm(xs, w13.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
    ys = F.grouped_mm(ACTIVATIONS[act](gate) * up, w2, offs=offsets)  # (M, D)
    if compiled:  # the rows past the last offset (empty slots) are not computed: drop them
        ys = torch.where((idx.flatten()[order] >= 0)[:, None], ys, 0)
    if weights is not None:
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
    if x.device.type == "cpu":
        # each row added straight into its token's output: no (N*K, D) buffer to fault in and sum,
        # which halves the permutation at the demo's shapes (RESULTS.md, Speed). On CPU the adds
        # run in a fixed order (CUDA's are atomic, so there the slots are put back in order and
        # summed instead)
        routed = ys.new_zeros(N, ys.shape[1]).index_add_(0, order // K, ys)
    else:  # back to slot order, where a slot left out adds zero
        slots = torch.empty_like(ys) if len(order) == N * K else ys.new_zeros(N * K, ys.shape[1])
        routed = slots.index_copy_(0, order, ys).view(N, K, -1).sum(dim=1)
    return shared_glu(x, shared, act) + routed


PATHS = {"reference": reference, "select": select, "gather": gather, "grouped": grouped}

# -----------------------------------------------------------------------------
# choosing a path from static facts: device, dtype, token count vs experts


@functools.cache
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """grouped_mm exists for some devices and dtypes only (e.g. CUDA wants bf16 on sm90+): try it
    once on a tiny problem. choose_path announces the slower fallback when it is missing."""
    device = torch.device(device_type)
    try:
        a = torch.zeros(32, 16, device=device, dtype=dtype)
        b = torch.zeros(2, 32, 16, device=device, dtype=dtype).transpose(-2, -1)
        F.grouped_mm(a, b, offs=torch.tensor([16, 32], device=device, dtype=torch.int32))
        return True
    # unsupported here: choose_path says so
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


# decode on CPU: `select` pays a fixed cost per selected expert (a Python step and three small
# matmuls, about 20 us on the 2-core VM of RESULTS.md), `gather` copies the selected experts'
# weights once (about 9 GB/s there): below this many bytes an expert copies faster than it loops.
# Measured at the demo's shapes: 12-neuron experts (83 kB) 0.63 ms gathered against 0.88 selected,
# 24-neuron ones (166 kB) 0.63 against 0.55 (RESULTS.md, Speed)
SMALL_EXPERT_BYTES = 128 * 1024


# under torch.compile: decided eagerly, the probe never traced
@torch.compiler.assume_constant_result
def choose_path(device_type: str, dtype: torch.dtype, n_tokens: int, top_k: int, n_experts: int,
                dim: int, expert_dim: int, compiled: bool = False) -> str:
    """Few token-slots per expert (decode): read only the selected experts. On CUDA that is
    `gather`, which has no host sync and so fits a CUDA graph; on CPU a sync costs nothing and
    `select` reads each selected expert in place instead of copying it (eager only: the sync would
    break a compiled graph), unless the experts are so small that copying them costs less than
    visiting them one by one (SMALL_EXPERT_BYTES). Many tokens (prefill): on a CPU, eager,
    `select`, whose per-expert buffers the allocator reuses (1.6-2.2x faster than `grouped` at the
    demo's shapes, level at LLaMA-3-8B's: RESULTS.md, Speed); elsewhere `grouped`, where
    grouped_mm runs for this device and dtype, the rows are 16-byte aligned as it requires, and,
    under torch.compile, the dtype is bf16 (its meta function allows nothing else); otherwise
    `gather`."""
    size = torch.finfo(dtype).bits // 8
    if n_tokens * top_k <= n_experts:
        small = 3 * expert_dim * dim * size <= SMALL_EXPERT_BYTES
        return "gather" if device_type == "cuda" or compiled or small else "select"
    if device_type == "cpu" and not compiled:
        return "select"
    if (dim * size) % 16 or (expert_dim * size) % 16:
        return announce_fallback(f"rows of {dim} and {expert_dim} {dtype} values are not 16-byte "
                                 f"aligned")
    if not grouped_mm_works(device_type, dtype):
        return announce_fallback(f"grouped_mm is unavailable on {device_type}/{dtype}")
    if compiled and dtype != torch.bfloat16:
        return announce_fallback(f"compiled grouped_mm needs bfloat16, not {dtype}")
    return "grouped"


@functools.cache
def announce_fallback(reason: str) -> str:
    print(f"kernels: {reason}; prefill uses the slower gather path")
    return "gather"


def moe_ffn(x, idx, w13, w2, shared=None, weights=None, path: str | None = None, act="silu"):
    """The dispatcher: x (N, D), idx (N, K), weights (N, K) or None -> (N, D) by the path
    choose_path picks (or `path`)."""
    path = path or choose_path(x.device.type, x.dtype, x.shape[0], idx.shape[1], w13.shape[0],
                               x.shape[1], w2.shape[1])
    return PATHS[path](x, idx, w13, w2, shared, weights, act)

# -----------------------------------------------------------------------------
# model.py integration: one function per MoE layer (router + experts + shared), compiled


def layer_forward(mlp, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """What model.py's MoEMLP.forward computes, through moe_ffn. x: (..., D)."""
    y = experts_forward(mlp, x.reshape(-1, x.shape[-1]), path)  # (N, D)
    # a compensated layer's stand-in for the experts it leaves out
    return (y if mlp.bias is None else y + mlp.bias).view_as(x)


def experts_forward(mlp, flat: torch.Tensor, path: str | None) -> torch.Tensor:
    """layer_forward but for the compensation bias: flat (N, D) -> (N, D)."""
    # Qwen2-MoE's gated shared expert, or a shared expert converted in turn, runs beside the paths
    gated = mlp.shared_gate is not None or isinstance(mlp.shared, MoEMLP)
    shared, gated_out = None, mlp.shared_output(flat) if gated else None
    if mlp.shared is not None and not gated:
        ffn = mlp.shared
        shared = (ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight)
    if not mlp.top_k:
        return gated_out if gated else shared_glu(flat, shared, mlp.act)
    idx, weights = mlp.route(flat)
    if isinstance(mlp.experts, SplitExperts):
        y = split_forward(mlp.experts, flat, idx, weights, shared, path, mlp.act)
        return y if gated_out is None else gated_out + y
    w13, w2, bias = mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.experts.down_bias
    y = moe_ffn(flat, idx, w13, w2, shared, weights, path, mlp.act)
    y = y if gated_out is None else gated_out + y
    # DIVE's pruned experts, and a compensated layer's chosen ones, add a bias each: the same few
    # lines on every path
    return y if bias is None else y + expert_bias(idx, bias, weights)


def split_forward(split: SplitExperts, x, idx, weights, shared, path: str, act: str):
    """What SplitExperts computes, plus the shared GLU: x (N, D), idx and weights (N, K) of the
    outer experts -> (N, D). The whole parts of the K experts, then the K k chosen (expert, part)
    pairs, each weighted as its expert."""
    y = shared_glu(x, shared, act) if split.whole is None else \
        moe_ffn(x, idx, split.whole.gate_up_proj, split.whole.down_proj, shared, weights, path, act)
    if not split.top_k:
        return y
    parts = split.route(x, idx)  # (N, K k)
    part_weights = None if weights is None else weights.repeat_interleave(split.top_k, dim=1)
    return y + moe_ffn(x, parts, split.parts.gate_up_proj, split.parts.down_proj, None,
                       part_weights, path, act)


@functools.cache
def compiled_layer_forward(device_type: str, decode: bool):
    """torch.compile'd layer_forward, fullgraph (a graph break raises). Decode: static shapes, and
    CUDA graphs on CUDA; prefill: a dynamic token count."""
    if decode and device_type == "cuda":
        return torch.compile(layer_forward, fullgraph=True, dynamic=False, mode="reduce-overhead")
    return torch.compile(layer_forward, fullgraph=True, dynamic=not decode)


def use_kernels(model, compile: bool = True) -> None:
    """Installs the fast forward in every MoE layer of a model.py Transformer, in place; undo with
    use_kernels(model, None). compile=True runs each layer's forward torch.compile'd; compile=False
    runs the paths eagerly. Under an outer torch.compile of the whole model, the layers pick paths
    that trace (no host sync) and leave the compiling to it."""
    for block in model.layers:
        if isinstance(block.mlp, MoEMLP):
            block.mlp.kernel = None if compile is None else \
                functools.partial(kernel_for, compile=compile)


def kernel_for(mlp, x: torch.Tensor, compile: bool) -> torch.Tensor:
    tracing = torch.compiler.is_compiling()
    n_tokens = x.numel() // x.shape[-1]
    if mlp.experts is None:
        # no routed experts: only the shared GLU, nothing to choose
        return layer_forward(mlp, x, "select")
    experts, top_k = mlp.experts, max(mlp.top_k, 1)
    if isinstance(experts, SplitExperts):  # the path of its (expert, part) pairs serves both
        top_k *= max(experts.top_k, 1)
        experts = experts.parts if experts.parts is not None else experts.whole
    E, F_, D = experts.down_proj.shape
    path = choose_path(x.device.type, x.dtype, n_tokens, top_k, E, D, F_, compile or tracing)
    if tracing or not compile:
        return layer_forward(mlp, x, path)
    return compiled_layer_forward(x.device.type, n_tokens * top_k <= E)(mlp, x, path)

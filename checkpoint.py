"""
checkpoint.py: writing checkpoints safely. An output directory appears whole or not at all (written
beside it under a temporary name, renamed at the end), is refused before any slow work if it is not
ours to replace, would overwrite what the run reads, or does not fit on its disk; the sharded
safetensors writer never holds more than one shard.

    python convert.py --out moe     # and train.py --out, through output_dir and save_checkpoint

Imports model.py (tensor names, the MoE model_type). Read top to bottom: output directories, then
the writer and save_checkpoint.
"""
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager

import torch

from model import MOE_ARCHITECTURE, MOE_MODEL_TYPE, Transformer, hf_name

# -----------------------------------------------------------------------------
# output directories: written into a temporary directory beside the output and renamed into place at
# the end. A marker file says a directory is ours, so a later run may replace it; a directory
# without it is never touched.



MARKER = ".expertweaver"


def within(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies inside it, both resolved (links, .., relative)."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def check_out(out: str, reads: tuple = ()) -> None:
    """Refuses, before any slow work, an output path that is not ours to replace, that is, holds or
    lies inside a path the run reads (`reads`: (what, path) pairs: its checkpoint, its text, the
    demo cache), or that cannot be written; removes what killed runs left beside it."""
    for what, given in reads:
        inside, holds = within(out, given), within(given, out)
        if inside and holds:
            raise ValueError(f"--out {out} is the {what} this run reads: choose another output "
                             f"path")
        if inside or holds:
            relation = "holds" if holds else "lies inside"
            raise ValueError(f"--out {out} {relation} the {what} {given}, which this run reads: "
                             f"choose another output path")
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, MARKER)):
        raise ValueError(f"--out {out} exists and was not written by expertweaver (it has no "
                         f"{MARKER} file): choose another path, or remove it yourself")
    parent = existing_parent(out)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=parent))
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write in {parent} ({e.strerror})") from None
    if parent == os.path.dirname(os.path.abspath(out)):  # where this run's temporaries will go
        remove_stale_temporaries(parent)


def existing_parent(out: str) -> str:
    """The nearest directory above `out` that exists: where it will be written."""
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    return parent


def check_space(out: str, need: int, what: str) -> None:
    """Refuses, before any slow work, an output that the free space beside `out` cannot hold (the
    new output is complete before an old one is removed, so the old one does not count)."""
    parent = existing_parent(out)
    free = shutil.disk_usage(parent).free
    size = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
    if free < need:
        raise ValueError(f"--out {out}: {what} needs about {size(need)} and {parent} has "
                         f"{size(free)} free")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        return True
    return True


def remove_stale_temporaries(parent: str) -> None:
    """Removes the temporaries that killed runs of ours left in `parent`, for any output: a
    directory named as output_dir names them, whose process is gone, holding our marker (itself or
    in its one entry; an empty one is left by a kill between two steps)."""
    for entry in os.listdir(parent):
        match = re.fullmatch(r"\.(tmp|old)-.+-(\d+)-[a-z0-9_]{8}", entry)
        path = os.path.join(parent, entry)
        if not match or not os.path.isdir(path) or process_alive(int(match.group(2))):
            continue
        inside = os.listdir(path)
        ours = MARKER in inside or not inside or (
            len(inside) == 1 and os.path.isfile(os.path.join(path, inside[0], MARKER)))
        if ours:
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}, left by an interrupted earlier run (process "
                  f"{match.group(2)})", flush=True)


def ours_temporary(out: str, kind: str = "tmp") -> str:
    """A new empty directory beside `out`, named so that remove_stale_temporaries recognises it
    once this process is gone, and marked as ours."""
    parent, name = os.path.split(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=f".{kind}-{name}-{os.getpid()}-", dir=parent)
    if kind == "tmp":
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write("written by expertweaver; a later run with the same output path replaces it\n")
    return tmp


@contextmanager
def output_dir(out: str, previous: str | None = None):
    """Yields a temporary directory beside `out` that becomes `out` (replacing an earlier output of
    ours) when the block finishes, and is removed on any error, Ctrl-C or SIGTERM included (the CLIs
    turn SIGTERM into SystemExit): `out` is never half-written. A failed write (a full disk) says
    what `out` still holds: `previous`, or what it held before the run."""
    check_out(out)
    parent, name = os.path.split(os.path.abspath(out))
    made = []  # the parent directories this call creates, removed again on failure
    while not os.path.isdir(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(made):
        os.mkdir(d)
    parent = os.path.dirname(os.path.abspath(out))
    existed = os.path.exists(out)
    tmp = ours_temporary(out)
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        if existed:  # move the old one aside, rename, then delete the old one
            old = ours_temporary(out, "old")
            os.replace(out, os.path.join(old, name))
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except OSError as e:
        if made:
            shutil.rmtree(made[-1], ignore_errors=True)
        kept = f"{out} still holds {previous}" if previous and existed else \
            f"{out} is as it was before this run" if existed else f"nothing was written to {out}"
        raise OSError(f"{e}; {kept}") from e
    except BaseException:
        if made:
            shutil.rmtree(made[-1], ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit like Ctrl-C raises KeyboardInterrupt, so cleanup code runs."""
    import signal
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def source_dtype(hf_config: dict) -> str:
    name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"

# -----------------------------------------------------------------------------
# writing: sharded safetensors and JSON into a directory (output_dir makes it atomic)



def save_safetensors(tensors: dict[str, torch.Tensor], file: str) -> None:
    """safetensors' save_file, readable by others, with its errors (a full disk among them) raised
    as one OSError naming the file."""
    from safetensors.torch import save_file
    try:
        save_file(tensors, file, metadata={"format": "pt"})
    except Exception as e:  # SafetensorError is no OSError; its message says what the OS said
        raise OSError(f"cannot write {file}: {str(e).removeprefix('Error while serializing: ')}") \
            from e
    os.chmod(file, 0o644)  # safetensors creates it private; a checkpoint is read by others too


def checkpoint_config(hf_config: dict, moe: dict | None, dtype: torch.dtype) -> dict:
    """The config.json written beside the tensors: the source's entries, its dtype the one the
    tensors have, and for an MoE our own model_type (MOE_MODEL_TYPE) with the family kept in
    base_model_type, so no stock loader takes it for the dense model."""
    config = {k: v for k, v in hf_config.items() if k != "moe"}
    name = str(dtype).removeprefix("torch.")
    config |= {key: name for key in [k for k in ("torch_dtype", "dtype") if k in config]
               or ["torch_dtype"]}
    if moe is None:
        return config
    if config.get("model_type") != MOE_MODEL_TYPE:
        config["base_model_type"] = config.get("model_type")
    return config | {"model_type": MOE_MODEL_TYPE, "architectures": [MOE_ARCHITECTURE], "moe": moe}


class CheckpointWriter:
    """Fills a checkpoint directory: tensors in shards of at most max_bytes (a bigger tensor gets a
    shard of its own, so the writer never holds more than one shard), JSON files, tokenizer files.
    finish() names the shards model.safetensors when there is one, else model-0000k-of-0000n
    .safetensors with model.safetensors.index.json."""

    def __init__(self, directory: str, max_bytes: int = 2 << 30):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if self.pending:
            file = os.path.join(self.directory, f"shard-{len(self.shards)}.tmp")
            save_safetensors(self.pending, file)
            self.shards.append(list(self.pending))
            self.pending, self.pending_bytes = {}, 0

    def json(self, name: str, content: dict) -> None:
        with open(os.path.join(self.directory, name), "w") as f:
            json.dump(content, f, indent=2)

    def copy_tokenizer(self, source: str | None) -> None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "generation_config.json"):
            if source and os.path.isfile(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), self.directory)

    def finish(self) -> None:
        self.flush()
        n = len(self.shards)
        tmp = lambda k: os.path.join(self.directory, f"shard-{k}.tmp")
        if n == 1:
            os.replace(tmp(0), os.path.join(self.directory, "model.safetensors"))
            return
        weight_map = {}
        for k, names in enumerate(self.shards):
            shard = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp(k), os.path.join(self.directory, shard))
            weight_map |= {name: shard for name in names}
        self.json("model.safetensors.index.json",
                  {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})


def save_checkpoint(model: Transformer, hf_config: dict, directory: str,
                    copy_from: str | None = None, extra: dict[str, dict] | None = None,
                    max_shard_bytes: int = 2 << 30, state: dict[str, torch.Tensor] | None = None,
                    dtype: torch.dtype | None = None):
    """The model (config.json with its moe section, safetensors shards), the tokenizer files of
    `copy_from` and any `extra` JSON files, written into `directory`. `state` replaces the model's
    state_dict (train.py passes one with its adapters merged); float tensors are written in `dtype`
    (default: the model's), and config.json says which."""
    os.makedirs(directory, exist_ok=True)
    dtype = dtype or model.embed_tokens.weight.dtype
    writer = CheckpointWriter(directory, max_shard_bytes)
    for name, tensor in (model.state_dict() if state is None else state).items():
        if not (model.cfg.tie_embeddings and name == "lm_head.weight"):  # one tensor, written once
            writer.add(hf_name(name), tensor.to(dtype) if tensor.is_floating_point() else tensor)
    writer.finish()
    files = {"config.json": checkpoint_config(hf_config, model.cfg.moe, dtype), **(extra or {})}
    for name, content in files.items():
        writer.json(name, content)
    writer.copy_tokenizer(copy_from)

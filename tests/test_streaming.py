"""Layer-streaming conversion: the same checkpoint as the in-memory path, tensor for tensor, in
shards that load back to identical logits."""
import os

import torch
from safetensors.torch import load_file

import convert as C
import model as M
import weaver as W
from conftest import TOKENS, hf_config_of, random_calibration, tiny_model


def all_tensors(path: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(set(M.tensor_locations(path).values())):
        tensors |= load_file(file)
    return tensors


def streamed_equals_in_memory(source: str, tmp_path, calib, spec_kwargs, dtype, save_dtype,
                              shard_bytes):
    in_memory = M.load_model(source, dtype)
    C.convert(in_memory, calib, W.ConvertSpec(**spec_kwargs), log=lambda *_: None)
    in_memory.to(save_dtype)
    M.save_checkpoint(in_memory, M.load_config(source)[1], str(tmp_path / "memory"))
    C.convert_checkpoint(source, str(tmp_path / "stream"), calib, W.ConvertSpec(**spec_kwargs),
                         dtype, "cpu", save_dtype, max_shard_bytes=shard_bytes, log=lambda *_: None)
    a, b = all_tensors(str(tmp_path / "memory")), all_tensors(str(tmp_path / "stream"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    layout = lambda name: M.load_config(str(tmp_path / name))[0].moe
    assert layout("stream") == layout("memory")
    return str(tmp_path / "stream")


def test_streamed_tiny_models_equal_in_memory(tmp_path):
    for arch, spec in [("llama", dict(n_experts=8, active=0.5)),
                       ("qwen2",
                        dict(method="cmoe", n_experts=4, active=0.75, k_act=3, sequential=True)),
                       ("qwen3", dict(n_experts=8, active=0.75, dense_layers=(1,)))]:
        model = tiny_model(arch, ffn_dim=48, n_layers=3)
        source = tmp_path / arch / "dense"
        M.save_checkpoint(model, hf_config_of(model), str(source))
        out = streamed_equals_in_memory(str(source), tmp_path / arch, random_calibration(), spec,
                                        torch.float32, torch.bfloat16, shard_bytes=20_000)
        # it really was sharded
        assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))


def test_streamed_demo_equals_in_memory(demo_path, tmp_path):
    calib = random_calibration(vocab=49152, samples=1, seqlen=32)
    streamed_equals_in_memory(demo_path, tmp_path, calib, dict(n_experts=64, active=0.75),
                              torch.float32, torch.bfloat16, shard_bytes=100 << 20)


def test_sharded_round_trip(tmp_path):
    model = tiny_model("llama", n_layers=3)
    C.convert(model, random_calibration(), W.ConvertSpec(n_experts=8, active=0.5),
              log=lambda *_: None)
    expected = model(TOKENS)
    M.save_checkpoint(model, hf_config_of(model), str(tmp_path / "moe"), max_shard_bytes=10_000)
    files = sorted(os.listdir(tmp_path / "moe"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "model.safetensors.index.json" in files
    assert torch.equal(M.load_model(str(tmp_path / "moe"))(TOKENS), expected)


def test_shard_writer_limits(tmp_path):
    writer = M.CheckpointWriter(str(tmp_path), max_bytes=100)
    writer.add("a", torch.zeros(10))   # 40 bytes
    writer.add("b", torch.zeros(10))   # 80: fits
    writer.add("c", torch.zeros(100))  # 400: larger than a shard, gets its own
    writer.add("d", torch.zeros(5))
    writer.finish()
    index = __import__("json").load(open(tmp_path / "model.safetensors.index.json"))["weight_map"]
    shard = lambda k: f"model-0000{k}-of-00003.safetensors"
    assert index == {"a": shard(1), "b": shard(1), "c": shard(2), "d": shard(3)}

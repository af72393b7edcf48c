"""convert.py: the conversion drivers, in memory and streaming (the same tensors, in shards that
load back to identical logits), the checkpoint round trip, the CLI end to end and what a failure
leaves."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import convert
import model as modeling
import weaver
from checkpoint import CheckpointWriter, save_checkpoint
from data import Calibration
from conftest import (TOKENS, convert_main, converted, hf_config_of, make_hf, random_calibration,
                      save_hf, tiny_data, tiny_model)



def test_demo_full_shared_is_exact(demo_path):
    model = modeling.load_model(demo_path)
    tokens = torch.tensor(
        [modeling.load_tokenizer(demo_path).encode("The capital of France is").ids]
    )
    dense = model(tokens)
    calib = random_calibration(vocab=model.cfg.vocab_size, samples=1, seqlen=8)
    # every expert shared, by the default rule and by the paper's
    for spec in (weaver.ConvertSpec(active=1.0, shared_fraction=1.0),
                 weaver.ConvertSpec(active=1.0, allocation="cv", alpha_min=1.0, alpha_max=1.0)):
        moe = modeling.load_model(demo_path)
        convert.convert_model(moe, calib, spec, log=lambda *_: None)
        assert torch.equal(moe(tokens), dense)


def test_sequential_and_dense_layers():
    a = converted(tiny_model(n_layers=3), n_experts=8, active=0.5, dense_layers=(1,))
    assert isinstance(a.layers[1].mlp, modeling.MLP) and a.cfg.moe["layers"][1] is None
    b = converted(tiny_model(n_layers=3), n_experts=8, active=0.5, dense_layers=(1,),
                  sequential=True)
    # layer 0 sees the same inputs either way; layer 2 sees the outputs of an MoE layer 0 when
    # sequential, so its profile, partition and router differ
    first, second = a.layers[0].mlp.state_dict(), b.layers[0].mlp.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(a.layers[2].mlp.router.weight, b.layers[2].mlp.router.weight)
    # and layer 2 of the sequential conversion was fitted on what the converted model feeds it
    calib = random_calibration(64)
    inputs = []
    hook = b.layers[2].mlp.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    b(calib.tokens)
    hook.remove()
    moe = b.layers[2].mlp
    refit, _ = weaver.lsq_router(inputs[0], calib.task, moe.experts.contributions,
                                 moe.experts.gate_up_proj.shape[0], moe.top_k,
                                 bias=moe.router.bias is not None)
    torch.testing.assert_close(refit["weight"], b.layers[2].mlp.router.weight, rtol=1e-4, atol=1e-5)


def test_moe_checkpoint_round_trip_and_corruption(tmp_path):
    model = converted(tiny_model("qwen2", n_layers=2), n_experts=8, active=0.75, dense_layers=(0,))
    expected = model(TOKENS)
    hf_config = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32,
                 "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "tie_word_embeddings": True}
    good = tmp_path / "moe"
    save_checkpoint(model, hf_config, str(good))
    loaded = modeling.load_model(str(good))
    assert isinstance(loaded.layers[0].mlp, modeling.MLP) and isinstance(
        loaded.layers[1].mlp, modeling.MoEMLP
    )
    assert torch.equal(loaded(TOKENS), expected)

    def variant(name, config_change=None, tensor_change=None):
        from safetensors.torch import load_file, save_file
        path = tmp_path / name
        shutil.copytree(good, path)
        cfg = json.loads((path / "config.json").read_text())
        if config_change:
            config_change(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
        if tensor_change:
            tensors = load_file(path / "model.safetensors")
            tensor_change(tensors)
            save_file(tensors, path / "model.safetensors")
        return str(path)

    def more_experts(cfg):
        cfg["moe"]["layers"][1]["routed_experts"] += 1
        cfg["moe"]["layers"][1]["shared_neurons"] -= cfg["moe"]["expert_dim"]
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.(shared|experts)\.\S+' has shape "
                                         r".*, config.json implies"):
        modeling.load_model(variant("count", more_experts))
    with pytest.raises(ValueError, match=r"moe.layers\[1\]: .* != intermediate_size 48"):
        modeling.load_model(
            variant("sizes", lambda c: c["moe"]["layers"][1].update(shared_neurons=6))
        )
    with pytest.raises(ValueError, match=r"moe.layers\[1\]: top_k 99"):
        modeling.load_model(variant("topk", lambda c: c["moe"]["layers"][1].update(top_k=99)))

    def duplicate(tensors):
        index = tensors["model.layers.1.mlp.neuron_index"]
        index[0] = index[1]
    with pytest.raises(ValueError,
                       match="model.layers.1.mlp.neuron_index' is not a permutation of the 48"):
        modeling.load_model(variant("index", tensor_change=duplicate))
    with pytest.raises(ValueError, match="lacks 1 tensor.*model.layers.1.mlp.router.weight"):
        drop_router = lambda t: t.pop("model.layers.1.mlp.router.weight")
        modeling.load_model(variant("router", tensor_change=drop_router))


def test_spec_and_input_errors():
    with pytest.raises(ValueError, match=r"active 1.5 must be in \(0, 1\]"):
        weaver.ConvertSpec(active=1.5)
    with pytest.raises(ValueError, match=r"active 0 must be in \(0, 1\]"):
        weaver.ConvertSpec(active=0)
    with pytest.raises(ValueError, match="does not go with method 'static'"):
        weaver.ConvertSpec(method="static", router="centroid")
    with pytest.raises(ValueError, match="intermediate_size 48 is not divisible by --experts 5: "
                                         ".*valid counts near it: 3, 4, 6, 8"):
        converted(tiny_model(ffn_dim=48), n_experts=5)
    one_task = Calibration(
        torch.zeros(2, 8, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), ["only"]
    )
    with pytest.raises(ValueError, match="at least 2 tasks .*--allocation uniform or --n-shared; "
                                         "got 1"):
        convert.convert_model(tiny_model(), one_task,
                              weaver.ConvertSpec(n_experts=8, allocation="cv"))
    for bad, message in ((dict(allocation="alpha"), "allocation 'alpha' is not one of"),
                         (dict(shared_fraction=1.5), r"shared_fraction 1.5 must be in \[0, 1\]")):
        with pytest.raises(ValueError, match=message):
            weaver.ConvertSpec(**bad)


def test_convert_cli_end_to_end(tiny_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "moe")
    prose = os.path.join(tiny_checkpoint, "prose.txt")
    report = convert_main(tiny_checkpoint, out, data=tiny_data(tiny_checkpoint, evals=(prose,)),
                          save_dtype="bfloat16", prompt="w1 w2")
    printed = capsys.readouterr().out
    # dense was loaded for --eval
    assert "dense greedy: 'w1 w2 " in printed and "moe greedy:   'w1 w2 " in printed
    assert sorted(os.listdir(out)) == [".expertweaver", "config.json", "model.safetensors",
                                       "report.json", "tokenizer.json"]
    moe = modeling.load_model(out)
    assert next(moe.parameters()).dtype == torch.float32  # bf16 on disk, loaded as asked
    assert report["active_fraction"] == pytest.approx(0.75)
    result = report["eval"][prose]
    assert result["ratio"] == pytest.approx(result["moe_ppl"] / result["dense_ppl"])
    assert json.load(open(os.path.join(out, "report.json")))["layers"][0]["routed_experts"] > 0
    assert moe.generate(torch.tensor([[1, 2, 3]]), 5).shape == (1, 8)
    # converting it again splits its experts (recursive.py), which 8 sub-experts cannot
    with pytest.raises(ValueError, match="--experts 8 does not divide the expert's 6 neurons"):
        convert_main(out, str(tmp_path / "again"), data=tiny_data(tiny_checkpoint))


@pytest.mark.parametrize("where", ["writing a shard", "converting layer 1"])
def test_convert_failure_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch, where):
    import safetensors.torch
    if where == "writing a shard":
        def broken(*args, **kwargs):
            raise RuntimeError("disk full")
        monkeypatch.setattr(safetensors.torch, "save_file", broken)
    else:
        build, calls = weaver.build_moe, []

        def broken(*args):  # converts layer 0, fails on layer 1
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("interrupted")
            return build(*args)
        monkeypatch.setattr(weaver, "build_moe", broken)
    # a failed write names the file and says what became of --out
    error = (OSError, "shard-0.tmp: disk full; nothing was written to .*moe$") \
        if where == "writing a shard" else (RuntimeError, "interrupted")
    with pytest.raises(error[0], match=error[1]):
        convert_main(tiny_checkpoint, str(tmp_path / "moe"))
    assert os.listdir(tmp_path) == []


def test_convert_refuses_a_foreign_out_dir(tiny_checkpoint, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and was not written by expertweaver"):
        convert_main(tiny_checkpoint, str(tmp_path / "mine"))
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def all_tensors(path: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(set(modeling.tensor_locations(path).values())):
        tensors |= load_file(file)
    return tensors


def streamed_equals_in_memory(source: str, tmp_path, calib, spec_kwargs, dtype, save_dtype,
                              shard_bytes):
    in_memory = modeling.load_model(source, dtype)
    convert.convert_model(in_memory, calib, weaver.ConvertSpec(**spec_kwargs), log=lambda *_: None)
    in_memory.to(save_dtype)
    save_checkpoint(in_memory, modeling.load_config(source)[1], str(tmp_path / "memory"))
    convert.convert_checkpoint(
        source,
        str(tmp_path / "stream"),
        calib,
        weaver.ConvertSpec(**spec_kwargs),
        dtype,
        "cpu",
        save_dtype,
        max_shard_bytes=shard_bytes,
        log=lambda *_: None,
    )
    a, b = all_tensors(str(tmp_path / "memory")), all_tensors(str(tmp_path / "stream"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    layout = lambda name: modeling.load_config(str(tmp_path / name))[0].moe
    assert layout("stream") == layout("memory")
    return str(tmp_path / "stream")


def test_streamed_tiny_models_equal_in_memory(tmp_path):
    for arch, spec in [("llama", dict(n_experts=8, active=0.5)),
                       ("qwen2",
                        dict(method="cmoe", n_experts=4, active=0.75, k_act=3, sequential=True)),
                       ("qwen3", dict(n_experts=8, active=0.75, dense_layers=(1,))),
                       ("gemma3_text", dict(n_experts=8, active=0.5)),  # its scaled embedding
                       # threshold selection carries the converted model's states beside
                       ("mistral", dict(n_experts=8, active=0.75, dense_layers=(1,),
                                        selection="threshold"))]:
        model = tiny_model(arch, ffn_dim=48, n_layers=3)
        source = tmp_path / arch / "dense"
        save_checkpoint(model, hf_config_of(model), str(source))
        out = streamed_equals_in_memory(str(source), tmp_path / arch, random_calibration(), spec,
                                        torch.float32, torch.bfloat16, shard_bytes=20_000)
        # it really was sharded
        assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))


def test_multimodal_gemma_converts_its_language_model(tmp_path):
    source = save_hf(make_hf("gemma3-vision"), tmp_path / "source")
    out = streamed_equals_in_memory(source, tmp_path, random_calibration(vocab=120),
                                    dict(n_experts=8, active=0.5), torch.float32, torch.float32,
                                    shard_bytes=1 << 30)
    cfg, config = modeling.load_config(out)
    assert config["base_model_type"] == "gemma3_text" and "text_config" not in config
    assert cfg.moe is not None and not cfg.text_of_multimodal
    assert all(name.startswith("model.layers.") or name in ("model.embed_tokens.weight",
                                                             "model.norm.weight")
               for name in all_tensors(out))


def test_streamed_demo_equals_in_memory(demo_path, tmp_path):
    calib = random_calibration(vocab=49152, samples=1, seqlen=32)
    streamed_equals_in_memory(demo_path, tmp_path, calib, dict(n_experts=64, active=0.75),
                              torch.float32, torch.bfloat16, shard_bytes=100 << 20)


def test_sharded_round_trip(tmp_path):
    model = tiny_model("llama", n_layers=3)
    convert.convert_model(model, random_calibration(), weaver.ConvertSpec(n_experts=8, active=0.5),
              log=lambda *_: None)
    expected = model(TOKENS)
    save_checkpoint(model, hf_config_of(model), str(tmp_path / "moe"), max_shard_bytes=10_000)
    files = sorted(os.listdir(tmp_path / "moe"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "model.safetensors.index.json" in files
    assert torch.equal(modeling.load_model(str(tmp_path / "moe"))(TOKENS), expected)


def test_shard_writer_limits(tmp_path):
    writer = CheckpointWriter(str(tmp_path), max_bytes=100)
    writer.add("a", torch.zeros(10))   # 40 bytes
    writer.add("b", torch.zeros(10))   # 80: fits
    writer.add("c", torch.zeros(100))  # 400: larger than a shard, gets its own
    writer.add("d", torch.zeros(5))
    writer.finish()
    index = __import__("json").load(open(tmp_path / "model.safetensors.index.json"))["weight_map"]
    shard = lambda k: f"model-0000{k}-of-00003.safetensors"
    assert index == {"a": shard(1), "b": shard(1), "c": shard(2), "d": shard(3)}

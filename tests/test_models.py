"""cdist.models: Llama checkpoints <-> HookedTransformer, checked against transformers on tiny
Llamas."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import LLAMA_SHAPES
from transformers import LlamaForCausalLM

from cdist.errors import FileFormatError, RunFolderError
from cdist.models import (
    CheckpointNotFoundError,
    HookedTransformer,
    grouped_query,
    head_weights,
    hf_to_hooked_state_dict,
    hook_attn_out,
    hook_input,
    hook_pattern,
    hook_resid_mid,
    hook_resid_pre,
    hook_z,
    hooked_to_hf_state_dict,
    keep_layers,
    load_llama,
    new_llama,
    save_llama,
)
from cdist.tokenizers import word_tokenizer

TOL = 1e-4
# longer than the llama3_rope shape's original context (64), so rope scaling changes the logits
SEQ = 96


def _tokens(vocab: int = 101, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _max_diff(hf_model, model, tokens) -> float:
    return (hf_model(tokens).logits - model(tokens)).abs().max().item()


@pytest.mark.parametrize("shape", sorted(LLAMA_SHAPES))
def test_logits_match_transformers(shape, hf_llama_dir, record_property):
    path, hf_model = hf_llama_dir(shape)
    model = load_llama(path)
    diff = _max_diff(hf_model, model, _tokens())
    record_property("max_abs_logit_diff", diff)
    print(f"{shape}: max |logit diff| = {diff:.2e}")
    assert diff <= TOL
    assert not model.training


def test_llama3_rope_scaling_is_exercised(hf_llama_dir):
    """Without the NTK-by-parts fields the same weights give clearly different logits."""
    path, hf_model = hf_llama_dir("llama3_rope")
    model = load_llama(path)
    cfg = model.cfg
    assert (cfg.use_NTK_by_parts_rope, cfg.NTK_by_parts_factor,
            cfg.NTK_original_ctx_len) == (True, 8.0, 64)
    assert (cfg.NTK_by_parts_low_freq_factor, cfg.NTK_by_parts_high_freq_factor,
            cfg.rotary_base) == (
        1.0,
        4.0,
        500000.0,
    )
    with pytest.warns(DeprecationWarning):
        plain = HookedTransformer(dataclasses.replace(cfg, use_NTK_by_parts_rope=False))
    # its own rotary tables stay
    plain.load_state_dict(dict(model.named_parameters()), strict=False)
    assert _max_diff(hf_model, plain, _tokens()) > 0.1


@pytest.mark.parametrize("shape", ["gqa", "wide_heads"])
def test_gqa_hook_shapes(shape, hf_llama_dir):
    path, hf_model = hf_llama_dir(shape)
    model = load_llama(path)
    n_heads, n_kv = hf_model.config.num_attention_heads, hf_model.config.num_key_value_heads
    d_head = hf_model.config.head_dim
    _, cache = model.run_with_cache(_tokens(batch=3))
    assert cache["blocks.0.attn.hook_k"].shape == (3, SEQ, n_kv, d_head)
    assert cache["blocks.0.attn.hook_v"].shape == (3, SEQ, n_kv, d_head)
    assert cache["blocks.0.attn.hook_q"].shape == (3, SEQ, n_heads, d_head)
    assert cache["blocks.0.attn.hook_z"].shape == (3, SEQ, n_heads, d_head)
    assert model.blocks[0].attn._W_K.shape == (n_kv, model.cfg.d_model, d_head)


@pytest.mark.parametrize("shape", sorted(LLAMA_SHAPES))
def test_state_dict_conversion_is_an_exact_inverse(shape, hf_llama_dir):
    path, hf_model = hf_llama_dir(shape)
    cfg = load_llama(path).cfg
    hf_sd = {
        k: v
        for k, v in hf_model.state_dict().items()
        if not (shape == "tied" and k == "lm_head.weight")
    }
    back = hooked_to_hf_state_dict(hf_to_hooked_state_dict(hf_sd, cfg), cfg)
    assert back.keys() == hf_sd.keys()
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)


@pytest.mark.parametrize("shape", ["gqa", "tied", "llama3_rope"])
def test_save_round_trip(shape, hf_llama_dir, tmp_path):
    path, hf_model = hf_llama_dir(shape)
    model = load_llama(path)
    out = save_llama(model, tmp_path / "saved")
    tokens = _tokens()
    with torch.no_grad():
        assert torch.equal(load_llama(out)(tokens), model(tokens))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == (shape == "tied")
    reloaded_hf = LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert _max_diff(reloaded_hf, model, tokens) <= TOL
    # no temporary folders left behind
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]


def test_save_replaces_a_checkpoint_but_not_other_folders(hf_llama_dir, tmp_path):
    model = load_llama(hf_llama_dir("gqa")[0])
    out = tmp_path / "ckpt"
    save_llama(model, out)
    save_llama(model, out)  # its own checkpoint, as it wrote it: replaced
    (out / "notes.txt").write_text("added by the user")
    with pytest.raises(RunFolderError, match=r"holds files cdist did not write \(notes.txt\)"):
        save_llama(model, out)
    assert (out / "notes.txt").read_text() == "added by the user"
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(RunFolderError):
        save_llama(model, precious)
    assert (precious / "notes.txt").exists()


def test_export_refuses_nonzero_bias(hf_llama_dir, tmp_path):
    model = load_llama(hf_llama_dir("gqa")[0])
    with torch.no_grad():
        model.blocks[1].attn.b_O[0] = 1.0
    with pytest.raises(ValueError, match="blocks.1.attn.b_O"):
        save_llama(model, tmp_path / "out")


def test_sharded_checkpoint(tmp_path):
    from conftest import make_hf_llama

    hf_model = make_hf_llama("gqa", seed=3)
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert _max_diff(hf_model, load_llama(tmp_path), _tokens()) <= TOL


def test_tokenizer_travels_with_the_checkpoint(hf_llama_dir, tmp_path):
    path, _ = hf_llama_dir("gqa")
    ckpt = tmp_path / "with-tok"
    shutil.copytree(path, ckpt)
    word_tokenizer(["Box", "F", "contains", "the", "apple"], save_dir=ckpt)
    model = load_llama(ckpt)
    # one <bos>, then the words
    assert model.to_tokens("Box F contains the").tolist() == [[0, 4, 5, 6, 7]]
    out = save_llama(model, tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert load_llama(out).tokenizer.convert_ids_to_tokens([8]) == ["apple"]


def test_bos_follows_the_checkpoints_tokenizer(hf_llama_dir, tmp_path):
    """A tokenizer that adds no BOS (SmolLM2's) stays so: TransformerLens would prepend one."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    path, _ = hf_llama_dir("gqa")
    ckpt = tmp_path / "no-bos"
    shutil.copytree(path, ckpt)
    tok = word_tokenizer(["Box", "F", "contains", "the", "apple"])
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    tok.save_pretrained(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "unk_token_id": 3}
    (ckpt / "config.json").write_text(json.dumps(config | ids))

    model = load_llama(ckpt)
    assert not model.cfg.default_prepend_bos
    assert model.to_tokens("Box F contains the").tolist() == [[4, 5, 6, 7]]
    out = save_llama(model, tmp_path / "saved")
    saved = json.loads((out / "config.json").read_text())
    assert {k: saved[k] for k in ids} == ids  # pad and unk kept, not nulled or dropped
    text = "Box F contains the apple"
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded(text).input_ids == tok(text).input_ids == [4, 5, 6, 7, 8]


def test_a_tokenizer_without_pad_is_saved_without_one(hf_llama_dir, tmp_path):
    """TransformerLens needs a pad token to tokenize; the model gets a copy that has one, and the
    checkpoint keeps the tokenizer as it was."""
    path, _ = hf_llama_dir("gqa")
    ckpt = tmp_path / "no-pad"
    shutil.copytree(path, ckpt)
    tok = word_tokenizer(["Box", "F"])
    tok.pad_token = None
    tok.save_pretrained(ckpt)
    model = load_llama(ckpt)
    assert model.to_tokens(["Box F", "F"]).shape == (2, 3)
    assert model.checkpoint_tokenizer.pad_token is None
    assert load_llama(save_llama(model, tmp_path / "saved")).checkpoint_tokenizer.pad_token is None


def test_incomplete_checkpoint_is_named(hf_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = hf_llama_dir("gqa")
    ckpt = tmp_path / "incomplete"
    shutil.copytree(path, ckpt)
    weights = load_file(ckpt / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(FileFormatError,
                       match=r"incomplete lacks 1 weights.*model.layers.1.mlp.up_proj.weight"):
        load_llama(ckpt)
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"up_proj.weight has shape \(3, 3\)"):
        load_llama(ckpt)


def test_truncated_or_garbled_safetensors_are_named(hf_llama_dir, tmp_path):
    path, _ = hf_llama_dir("gqa")
    ckpt = tmp_path / "broken"
    shutil.copytree(path, ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(FileFormatError, match=r"model.safetensors is truncated: .* re-save"):
        load_llama(ckpt)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(FileFormatError,
                       match="model.safetensors is not a readable safetensors file"):
        load_llama(ckpt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_reads_one_tensor_at_a_time(dtype, hf_llama_dir):
    """The checkpoint's tensors come cast one by one; the loaded model is the converted state dict
    exactly, in the requested dtype."""
    from safetensors.torch import load_file

    from cdist.llama_files import open_llama

    path, _ = hf_llama_dir("tied")
    source = open_llama(path)
    stream = source.tensors(dtype)
    first_name, first = next(stream)
    assert first.dtype == dtype and first_name in load_file(path / "model.safetensors")
    model = load_llama(path, dtype=dtype)
    whole = {k: v.to(dtype) for k, v in load_file(path / "model.safetensors").items()}
    expected = hf_to_hooked_state_dict(whole, model.cfg)
    for key, value in expected.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_missing_directory_says_where_it_looked():
    with pytest.raises(CheckpointNotFoundError) as err:
        load_llama("/nonexistent")
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "/nonexistent" in message and "\n" not in message


def test_official_name_missing_from_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointNotFoundError) as err:
        load_llama("Llama-3.2-1B")
    message = str(err.value)
    assert str(tmp_path / "hub" / "models--meta-llama--Llama-3.2-1B") in message
    assert "\n" not in message


@pytest.mark.parametrize("use_hf_home", [False, True])
def test_official_name_found_in_cache(use_hf_home, hf_llama_dir, tmp_path, monkeypatch):
    path, hf_model = hf_llama_dir("tied")
    snapshot = tmp_path / "hub" / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "abc"
    shutil.copytree(path, snapshot)
    if use_hf_home:
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path))
    else:
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for name in ("Llama-3.2-1B", "meta-llama/Llama-3.2-1B", "3.2-1b"):
        assert _max_diff(hf_model, load_llama(name), _tokens()) <= TOL
    with pytest.raises(CheckpointNotFoundError, match="Llama-3.1-8B-Instruct"):
        load_llama("3.1-8B-Instruct")


def test_not_a_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        load_llama(tmp_path)


def test_new_llama_is_seeded_and_exportable(tmp_path):
    shape = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=48, vocab_size=50, n_ctx=64)
    rng_before = torch.random.get_rng_state()
    model = new_llama(**shape, seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert torch.equal(new_llama(**shape, seed=7).embed.W_E, model.embed.W_E)
    assert not torch.equal(new_llama(**shape, seed=8).embed.W_E, model.embed.W_E)
    assert model.cfg.d_head == 8 and model.cfg.n_key_value_heads == 2
    assert not model.cfg.tie_word_embeddings
    out = save_llama(model, tmp_path / "organism")
    hf_model = LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert _max_diff(hf_model, model.eval(), _tokens(vocab=50)[:, :64]) <= TOL


def test_keep_layers_is_the_model_with_the_other_blocks_skipped(tmp_path):
    shape = dict(n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=48, vocab_size=50, n_ctx=64)
    model = new_llama(**shape, seed=3, tokenizer=word_tokenizer([f"w{i}" for i in range(40)]))
    tokens = _tokens(vocab=50)[:, :64]
    stash = {}

    def skip(layer):  # block ``layer`` passes its input through unchanged
        def keep_input(resid, hook):
            stash[layer] = resid
        return [(f"blocks.{layer}.hook_resid_pre", keep_input),
                (f"blocks.{layer}.hook_resid_post", lambda resid, hook: stash[layer])]

    with torch.no_grad():
        for layers in ([0, 1], [0, 3], [0, 2, 3]):
            short = keep_layers(model, layers)
            assert short.cfg.n_layers == len(layers) and model.cfg.n_layers == 4
            hooks = [h for i in range(4) if i not in layers for h in skip(i)]
            expected = model.run_with_hooks(tokens, fwd_hooks=hooks)
            assert torch.allclose(short(tokens), expected, atol=1e-5), layers
        short.blocks[0].attn.W_Q.add_(1.0)  # a copy: the source model is untouched
    assert not torch.equal(short.blocks[0].attn.W_Q, model.blocks[0].attn.W_Q)
    assert torch.equal(short.blocks[1].attn.W_Q, model.blocks[2].attn.W_Q)
    assert short.cfg.n_params == model.cfg.n_params * 3 // 4
    reordered = keep_layers(model, [3, 0])  # in the order given
    assert torch.equal(reordered.blocks[0].mlp.W_in, model.blocks[3].mlp.W_in)
    assert torch.equal(reordered.blocks[1].mlp.W_in, model.blocks[0].mlp.W_in)
    assert short.tokenizer is not None
    hf_model = LlamaForCausalLM.from_pretrained(save_llama(short, tmp_path / "short"),
                                                local_files_only=True).eval()
    assert hf_model.config.num_hidden_layers == 3
    assert _max_diff(hf_model, short, tokens) <= TOL
    for bad in ([], [0, 0], [4], [-1]):
        with pytest.raises(ValueError, match="distinct layer numbers from 0 to 3"):
            keep_layers(model, bad)


def test_frozen_head_residuals_rebuild_the_clean_stream(model):
    """Given a run's own z, the one-position recomputation reproduces that run's residual stream
    and logits."""
    from cdist.models import attention_inputs, frozen_head_residuals, unembed

    ids = torch.randint(4, model.cfg.d_vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    names = [f"blocks.{i}.attn.hook_{n}" for i in range(model.cfg.n_layers) for n in "zqkv"]
    names += ([f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)]
              + ["ln_final.hook_normalized"])
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=names)
        pos = 6
        z = [cache[f"blocks.{i}.attn.hook_z"][:, pos] for i in range(model.cfg.n_layers)]
        resid = frozen_head_residuals(model, cache["blocks.0.hook_resid_pre"][:, pos], z)
        for layer in range(model.cfg.n_layers):
            assert torch.allclose(resid[layer], cache[f"blocks.{layer}.hook_resid_pre"][:, pos],
                                  atol=1e-5)
            inputs = attention_inputs(model, layer, resid[layer])
            for n in "qkv":
                assert torch.allclose(inputs[n], cache[f"blocks.{layer}.attn.hook_{n}"][:, pos],
                                      atol=1e-5)
        assert torch.allclose(unembed(model, resid[-1]), logits[:, pos], atol=1e-4)


@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "plain"])
def test_hook_and_weight_names_are_the_models_own(n_kv_heads):
    """Every name ``cdist.models`` hands out is a hook or a parameter of the model, with the
    documented head axis: query heads for z, q, W_Q and W_O; key/value heads for k, v, W_K, W_V."""
    model = new_llama(n_layers=2, d_model=16, n_heads=4, n_kv_heads=n_kv_heads, d_mlp=32,
                      vocab_size=20)
    assert grouped_query(model.cfg) == (n_kv_heads != 4)
    params = dict(model.named_parameters())
    heads = {"z": 4, "q": 4, "o": 4, "k": n_kv_heads, "v": n_kv_heads}
    names = [hook_z(1)] + [hook_input(1, which) for which in "qkv"]
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.arange(5)[None], names_filter=names)
    assert [cache[name].shape[2] for name in names] == [heads[k] for k in "zqkv"]
    for layer in range(2):
        hooks = [hook_z(layer), hook_pattern(layer), hook_resid_pre(layer), hook_resid_mid(layer),
                 hook_attn_out(layer)] + [hook_input(layer, which) for which in "qkv"]
        assert [name for name in hooks if name not in model.hook_dict] == []
        weights = head_weights(model.cfg, layer, kinds=("q", "k", "v", "o"))
        assert set(weights.values()) <= set(params), sorted(set(weights.values()) - set(params))
        assert {kind: params[name].shape[0] for kind, name in weights.items()} == {
            kind: heads[kind] for kind in weights}
    with pytest.raises(ValueError, match="choose 'q', 'k' or 'v'"):
        hook_input(0, "z")
    with pytest.raises(ValueError, match="head weight kinds"):
        head_weights(model.cfg, 0, kinds=("q", "x"))


@pytest.mark.slow
def test_bench_loading_measures_each_loader_in_its_own_process(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "bench_loading.py"
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(script), "--shape", "tiny", "--out", str(out)],
                   cwd=tmp_path, check=True, capture_output=True, text=True)
    saved = json.loads(out.read_text())
    assert saved["shape"] == "tiny" and saved["load_dtype"] == "bfloat16" and saved["commit"]
    assert [r["loader"] for r in saved["runs"]] == ["cdist", "transformers"]
    for run in saved["runs"]:
        assert run["peak_rss_gb"] >= run["rss_before_gb"] > 0
        assert run["ratio"] == pytest.approx(run["load_increase_gb"] / run["model_gb"], rel=1e-3)
    ours = saved["runs"][0]
    # TransformerLens keeps the tied unembedding as a second matrix: larger than the file
    assert saved["checkpoint_file_gb"] < ours["model_gb"] < 1.6 * saved["checkpoint_file_gb"]


def test_a_broken_config_json_is_named(hf_llama_dir, tmp_path):
    from cdist.errors import FileFormatError

    path, _ = hf_llama_dir("gqa")
    broken = tmp_path / "ckpt"
    shutil.copytree(path, broken)
    for text, message in (('{"model_type": "llama", ', "config.json is not valid JSON"),
                          ("[1, 2]", "config.json holds no JSON object"),
                          ('{"model_type": "gpt2"}', "model_type='gpt2'; cdist loads 'llama'")):
        (broken / "config.json").write_text(text)
        with pytest.raises(FileFormatError, match=message) as caught:
            load_llama(broken)
        assert "\n" not in str(caught.value)


def test_transformer_lens_4_is_refused_in_one_line_naming_the_fix():
    """TransformerLens 4 removed HookedTransformer: cdist says so before importing it."""
    from cdist.errors import CdistError
    from cdist.models import requirements

    assert requirements.check_transformer_lens().startswith("3.")  # this environment's
    assert requirements.check_transformer_lens("3.12.1") == "3.12.1"
    for version in ("4.0.0", "3.8.2", "2.11.0", "dev"):
        with pytest.raises(requirements.TransformerLensVersionError,
                           match=f"has {version}: pip install 'transformer_lens>=3.9,<4'"):
            requirements.check_transformer_lens(version)
    assert issubclass(requirements.TransformerLensVersionError, (CdistError, ImportError))

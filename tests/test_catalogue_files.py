"""The catalogue of files: cdist writes only what it made, a full disk or an I/O error ends in one
line that names the file and leaves no partial file a later run could take for a finished one, and
a checkpoint is checked before it is used. Like ``test_bad_inputs.py``, each case asserts its exact
outcome: exit status 2 and one line from ``cdist``, or the typed ``cdist.errors`` exception from
the API, with a fragment of the message; and every file of the user's unchanged, byte for byte.

A case is ``(id, what it does, fragment of the message)``. The outcome of each on the code before
issue 31, as its probe found it: writing into a folder of the user's destroyed files (a
``save_llama``, ``export_run`` or ``zoo.export_hf`` into a folder holding a ``config.json`` replaced
it whole; ``cdist discover --out`` rewrote the user's ``config.yaml`` and deleted their
``.draft.tmp``; a Llama-3 tokenizer cache given as a user's folder was deleted); a full disk was a
traceback or a line without the file's name, and a ``plotly.min.js`` cut short was kept by every
later run; a NaN weight, a regrouped config, two weight files and a short context were silently
accepted (or failed later as an unrelated traceback), a named pipe hung the load forever, and a
GGUF cut in its metadata was a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pathlib
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_inputs import SMALL, _main, _tree

from cdist import report_page, run_folder
from cdist.checkpoints import TMP_PREFIX, atomic_torch_save, atomic_write_json
from cdist.errors import CdistError, FileFormatError, MismatchError, RunFolderError, WriteError
from cdist.models import load_llama, new_llama, save_llama
from cdist.report_page import write_run_page
from cdist.tokenizers import word_tokenizer

USER_FILES = {"config.json": '{"my": "own config"}\n', "notes.md": "# my notes\n",
              "data.csv": "a,b\n1,2\n"}
# a folder of the user's that looks like a run folder's: settings with comments, a draft
USER_RUN = {"config.yaml": "# my experiment\nlearning_rate: 0.1  # keep this\n",
            ".draft.tmp": "half a thought\n"}


def _user_folder(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


@contextlib.contextmanager
def _within(seconds: int):
    """Fail, rather than hang the suite, when the body blocks (a read from a named pipe)."""
    def stop(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    before = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    """A tiny checkpoint written by cdist (4 heads of 8, 2 key/value heads), one with a context of
    16 positions, and a Llama of transformers' own (no record of its files)."""
    root = tmp_path_factory.mktemp("ckpt")
    shape = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, vocab_size=len(tok),
                 tokenizer=tok)
    made = {"good": save_llama(new_llama(**shape, seed=1), root / "good", tokenizer=tok),
            "short": save_llama(new_llama(**shape, seed=1, n_ctx=16), root / "short",
                                tokenizer=tok)}
    theirs = shutil.copytree(made["good"], root / "theirs")
    (theirs / ".cdist-checkpoint").unlink()
    made["theirs"] = theirs
    return made


# ------------------------------------------------------------------------- checkpoints checked
def _tensors(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _poke(name: str, value: float):
    def change(tensors):
        tensors[name][0, 0] = value
    return lambda d: _tensors(d, change)


def _config(**changes):
    def change(folder: Path):
        config = json.loads((folder / "config.json").read_text())
        config |= changes
        for key in [k for k, v in changes.items() if v is None]:
            del config[key]
        (folder / "config.json").write_text(json.dumps(config))
    return change


def _smaller_vocabulary(folder: Path) -> None:
    rows = json.loads((folder / "config.json").read_text())["vocab_size"] - 5
    _config(vocab_size=rows)(folder)

    def change(tensors):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = tensors[name][:rows].clone()
    _tensors(folder, change)


def _pipe(name: str):
    def change(folder: Path):
        (folder / name).unlink()
        os.mkfifo(folder / name)
    return change


def _gguf(root: Path, cut: int | None) -> Path:
    """A tiny Llama GGUF (gguf's own writer), cut after ``cut`` bytes: inside its metadata."""
    import gguf
    import numpy as np

    path = root / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_context_length, 64), (w.add_embedding_length, 32),
                       (w.add_block_count, 1), (w.add_feed_forward_length, 64),
                       (w.add_head_count, 4), (w.add_head_count_kv, 2),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, 16),
                       (w.add_tokenizer_model, "gpt2"),
                       (w.add_token_list, [f"t{i}" for i in range(16)])):
        add(value)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if cut is not None:
        path.write_bytes(path.read_bytes()[:cut])
    return path


def _gguf_pipe(root: Path) -> Path:
    os.mkfifo(root / "pipe.gguf")
    return root / "pipe.gguf"


Q = "model.layers.0.self_attn.q_proj.weight"
# (id, how the good checkpoint is changed, exception, message fragment)
CHECKPOINTS = [
    ("weight-nan", _poke(Q, float("nan")), FileFormatError, f"{Q} holds 1 NaN and 0 infinite"),
    ("weight-inf", _poke(Q, float("inf")), FileFormatError, f"{Q} holds 0 NaN and 1 infinite"),
    ("config-regroups-heads", _config(num_attention_heads=2, num_key_value_heads=1, head_dim=16),
     FileFormatError, "makes the attention 2 heads of 16, 1 key/value heads, but its weights "
     "were saved as 4 heads of 8, 2 key/value heads"),
    ("config-kv-heads-not-dividing", _config(num_key_value_heads=3), FileFormatError,
     "num_key_value_heads = 3 does not divide num_attention_heads = 4"),
    ("config-heads-not-dividing-hidden", _config(num_attention_heads=3, num_key_value_heads=1,
                                                 head_dim=None), FileFormatError,
     "hidden_size = 32 is not a multiple of num_attention_heads = 3"),
    ("config-odd-head-dim", _config(head_dim=7), FileFormatError,
     "is not a config transformers accepts"),
    ("two-weight-files", lambda d: shutil.copy(d / "model.safetensors",
                                               d / "model_old.safetensors"), FileFormatError,
     "holds 2 weight files and no index naming them (model.safetensors, "
     "model_old.safetensors)"),
    ("tokenizer-past-embedding", _smaller_vocabulary, MismatchError,
     "the tokenizer makes ids up to"),
    ("weights-a-named-pipe", _pipe("model.safetensors"), FileFormatError,
     "model.safetensors is a named pipe, not a file"),
    ("config-a-named-pipe", _pipe("config.json"), FileFormatError,
     "config.json is a named pipe, not a file"),
]


@pytest.mark.parametrize(("damage", "error", "message"), [c[1:] for c in CHECKPOINTS],
                         ids=[c[0] for c in CHECKPOINTS])
def test_a_checkpoint_is_checked_before_use(damage, error, message, ckpt, tmp_path):
    folder = shutil.copytree(ckpt["good"], tmp_path / "ckpt")
    damage(folder)
    before = _tree(tmp_path) if not any(p.is_fifo() for p in folder.iterdir()) else None
    with _within(60), pytest.raises(error) as err:
        load_llama(folder)
    assert "\n" not in str(err.value) and message in str(err.value), str(err.value)
    assert before is None or _tree(tmp_path) == before


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: _gguf(root, cut=100), "is not a GGUF file transformers can read (cut short"),
    (_gguf_pipe, "pipe.gguf is a named pipe, not a file"),
], ids=["gguf-cut-in-its-metadata", "gguf-a-named-pipe"])
def test_a_gguf_cut_short_or_a_pipe_is_refused_in_one_line(make, message, tmp_path):
    path = make(tmp_path)
    with _within(60), pytest.raises(FileFormatError) as err:
        load_llama(path)
    assert "\n" not in str(err.value) and message in str(err.value), str(err.value)


def test_an_intact_gguf_still_opens(tmp_path):
    from cdist.llama_files import open_llama

    assert open_llama(_gguf(tmp_path, cut=None)).hf_config.num_attention_heads == 4


def test_prompts_past_the_context_are_refused_before_the_folder(ckpt, tmp_path, capsys):
    argv = ["discover", *SMALL, "--roles", "student", "--student", str(ckpt["short"]),
            "--out", str(tmp_path / "out")]
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes prompts of at most 16 tokens (its context: " \
        "max_position_embeddings, capped at 8192), but the training items run to" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("call", ["head_means", "activation_patching_scan", "run_with_hooks",
                                  "run_with_cache", "forward"])
def test_the_api_refuses_prompts_past_the_context_in_one_typed_line(call, tok):
    """Through the API (no run folder's check before it), every way into the model stops a
    prompt past the context at the embedding, where TransformerLens would fail later on a shape."""
    from cdist import tasks
    from cdist.discovery import ablation, activation_patching
    from cdist.errors import InputError

    short = new_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                      vocab_size=len(tok), n_ctx=8, seed=0, tokenizer=tok)
    items = tasks.entity_tracking(4, tokenizer=tok, n_boxes=3, seed=0)
    tokens = torch.as_tensor(items["input_ids"][:1])
    calls = {"head_means": lambda: ablation.head_means(short, items),
             "activation_patching_scan": lambda: activation_patching.activation_patching_scan(
                 short, items),
             "run_with_hooks": lambda: short.run_with_hooks(tokens, fwd_hooks=[]),
             "run_with_cache": lambda: short.run_with_cache(tokens),
             "forward": lambda: short(tokens)}
    with pytest.raises(InputError) as err:
        calls[call]()
    assert str(err.value) == (f"prompts of {tokens.shape[1]} tokens are longer than the model's "
                              "context (cfg.n_ctx = 8); shorten the prompts, or load the model "
                              f"with n_ctx={tokens.shape[1]} or more")
    assert short(tokens[:, :8]).shape == (1, 8, len(tok))  # within the context it runs


def test_generating_past_the_context_with_a_cache_is_refused_in_one_typed_line():
    """``generate`` with a KV cache feeds one token at a time, which the embedding's check cannot
    place; before the fix TransformerLens failed on a tensor shape (RuntimeError)."""
    from cdist.errors import InputError
    from cdist.models import keep_layers

    short = new_llama(n_layers=2, d_model=16, n_heads=2, n_kv_heads=1, d_mlp=32, vocab_size=50,
                      n_ctx=8, seed=0)
    prompt = torch.arange(6).unsqueeze(0)

    def generate(model, new):
        return model.generate(prompt, max_new_tokens=new, use_past_kv_cache=True,
                              stop_at_eos=False, verbose=False)

    # the last new token is sampled, never fed: 6 + 3 tokens feed positions 0-7 only
    assert generate(short, 3).shape == (1, 9)
    for model in (short, keep_layers(short, [1])):
        with pytest.raises(InputError) as err:
            generate(model, 4)
        assert str(err.value) == ("generating to 9 tokens runs past the model's context "
                                  "(cfg.n_ctx = 8); ask for fewer new tokens, shorten the "
                                  "prompt, or load the model with n_ctx=9 or more")


# ------------------------------------------------------------- cdist writes only what it made
def _export_run(fx):
    from cdist.distill import export_run

    return export_run(fx["run"], fx["model"], fx["folder"])


def _export_hf(fx):
    from cdist import zoo

    return zoo.export_hf("et-student", fx["folder"])


def _llama3_cache(fx):
    pytest.importorskip("llama_models")
    from cdist.tokenizers import llama3_tokenizer

    return llama3_tokenizer(cache_dir=fx["folder"])


def _ours_added_to(root: Path, ckpt: dict) -> Path:
    folder = shutil.copytree(ckpt["good"], root)
    (folder / "notes.md").write_text("mine\n")
    return folder


# The folder a case writes into: root -> the folder, made
FOLDERS = {
    "users": lambda root, ckpt: _user_folder(root, USER_FILES),
    "users-run": lambda root, ckpt: _user_folder(root, USER_RUN),
    "users-checkpoint": lambda root, ckpt: shutil.copytree(ckpt["theirs"], root),
    "users-tokenizer": lambda root, ckpt: _user_folder(root, {**USER_FILES,
                                                              "tokenizer.json": "{}\n"}),
    "ours-added-to": _ours_added_to,
}


def _save(fx):
    return save_llama(fx["model"], fx["folder"])


# (id, the folder (FOLDERS), call(fixtures), message fragment)
API = [
    ("save-llama-into-a-users-folder", "users", _save, "holds files cdist did not write"),
    ("save-llama-into-a-users-checkpoint", "users-checkpoint", _save,
     "holds files cdist did not write"),
    ("save-llama-into-its-checkpoint-the-user-added-to", "ours-added-to", _save,
     "holds files cdist did not write (notes.md)"),
    ("export-run-into-a-users-folder", "users", _export_run, "holds files cdist did not write"),
    ("zoo-export-hf-into-a-users-folder", "users", _export_hf, "holds files cdist did not write"),
    ("llama3-tokenizer-cache-a-users-folder", "users", _llama3_cache,
     "holds files cdist did not write"),
    ("claim-a-users-folder", "users-run", lambda fx: run_folder.claim(fx["folder"]),
     "is not a run folder cdist made"),
    ("figures-into-a-users-folder", "users", lambda fx: run_folder.claim_figures(fx["folder"]),
     "is not a run folder cdist made"),
    ("word-tokenizer-over-a-users-tokenizer", "users-tokenizer",
     lambda fx: word_tokenizer(["apple"], save_dir=fx["folder"]),
     "already holds tokenizer.json, which the tokenizer would replace"),
    ("report-page-over-a-users-file", "users",
     lambda fx: write_run_page(fx["run"], fx["folder"] / "notes.md"),
     "notes.md exists and is not a page cdist wrote"),
]


@pytest.mark.parametrize(("kind", "call", "message"), [c[1:] for c in API],
                         ids=[c[0] for c in API])
def test_a_folder_cdist_did_not_make_is_refused(kind, call, message, ckpt, model, tmp_path):
    run = _user_folder(tmp_path / "run", {})
    (run / "state.pt").write_bytes(b"")  # refused before it is read
    folder = FOLDERS[kind](tmp_path / "folder", ckpt)
    before = _tree(tmp_path)
    with pytest.raises(RunFolderError) as err:
        call({"model": model, "folder": folder, "run": run})
    assert "\n" not in str(err.value) and message in str(err.value), str(err.value)
    assert _tree(tmp_path) == before
    assert {p.name for p in tmp_path.iterdir()} == {"run", "folder"}  # no temporary left


def test_a_tokenizer_is_saved_beside_a_checkpoint_and_again_over_itself(tmp_path):
    folder = _user_folder(tmp_path / "ckpt", USER_FILES)
    word_tokenizer(["apple"], save_dir=folder)
    assert word_tokenizer(["apple"], save_dir=folder).convert_tokens_to_ids("apple") == 4
    assert all((folder / name).read_text() == text for name, text in USER_FILES.items())
    with pytest.raises(RunFolderError, match="already holds tokenizer.json"):
        word_tokenizer(["apple", "ball"], save_dir=folder)  # another vocabulary: not over it
    assert word_tokenizer(["x"], save_dir=tmp_path / "new" / "tok").convert_tokens_to_ids("x") == 4


def test_figures_and_pages_cdist_made_are_drawn_again(tmp_path):
    figures = run_folder.claim_figures(tmp_path / "figures")
    assert run_folder.made_by_cdist(figures)
    (figures / "table1.html").write_text("a figure")
    assert run_folder.claim_figures(figures) == figures  # its own: accepted again
    run = run_folder.claim(tmp_path / "run")
    run.release()
    (tmp_path / "run" / "commands.log").write_text("cdist discover\n")
    page = write_run_page(tmp_path / "run")
    assert "cdist discover" in page.read_text()
    write_run_page(tmp_path / "run")  # its own page: replaced
    # a page written before pages named their generator is known by its style sheet
    page.write_text(page.read_text().replace(report_page._GENERATOR, ""))
    assert write_run_page(tmp_path / "run") == page and report_page._GENERATOR in page.read_text()


def test_a_checkpoint_cdist_wrote_is_replaced(ckpt, model, tmp_path):
    out = shutil.copytree(ckpt["good"], tmp_path / "out")
    save_llama(model, out)
    assert torch.equal(load_llama(out).W_Q, model.W_Q)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# (id, argv, the folder (FOLDERS), message fragment); {folder} is that folder
CLI = [
    ("discover-into-a-users-folder", ["discover", *SMALL, "--roles", "student", "--student",
                                      "{good}", "--out", "{folder}"], "users-run",
     "is not a run folder cdist made (it holds .draft.tmp, config.yaml)"),
    ("match-into-a-users-folder", ["match", *SMALL, "--out", "{folder}"], "users",
     "is not a run folder cdist made"),
    ("export-into-a-users-folder", ["export", "{run}", "--to", "{folder}", "--student",
                                    "{good}"], "users", "holds files cdist did not write"),
    ("export-into-a-users-checkpoint", ["export", "{run}", "--to", "{folder}", "--student",
                                        "{good}"], "users-checkpoint",
     "holds files cdist did not write"),
    ("zoo-export-into-a-users-folder", ["zoo", "export", "et-student", "{folder}"], "users",
     "holds files cdist did not write"),
    ("zoo-figures-into-a-users-folder", ["zoo", "circuits", "--draw-only", "--figures",
                                         "{folder}"], "users",
     "is not a run folder cdist made (it holds config.json, data.csv, notes.md)"),
    ("table-figures-into-a-users-folder", ["table", *SMALL, "--student", "{good}", "--teacher",
                                           "{good}", "--figures", "{folder}", "--out", "{run}"],
     "users", "is not a run folder cdist made (it holds config.json, data.csv, notes.md)"),
    ("report-page-over-a-users-file", ["report", "--out", "{run}", "--page", "{folder}/notes.md"],
     "users", "notes.md exists and is not a page cdist wrote; give another path with --page"),
]


@pytest.mark.parametrize(("argv", "kind", "message"), [c[1:] for c in CLI],
                         ids=[c[0] for c in CLI])
def test_the_command_line_refuses_a_folder_it_did_not_make(argv, kind, message, ckpt, tmp_path,
                                                          capsys):
    folder = FOLDERS[kind](tmp_path / "folder", ckpt)
    run = _user_folder(tmp_path / "run", {})
    (run / "state.pt").write_bytes(b"")
    names = {"folder": folder, "run": run, "good": ckpt["good"]}
    argv = [a.format(**names) if a.startswith("{") else a for a in argv]
    before = _tree(tmp_path)
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cdist: error:") and message in err[0], err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("sign", [".cdist-run", ".cdist.lock", "identity.json", "config.yaml"])
def test_a_run_folder_of_cdist_is_claimed_and_only_its_own_temporaries_go(sign, tmp_path):
    """Made now (``.cdist-run``) or by an earlier cdist, known by what only cdist writes there;
    a claim removes the temporary files of a killed writer, and a user's look-alikes stay."""
    sign_text = ("# cdist run folder settings, last written by `cdist discover`\ntask: x\n"
                 if sign == "config.yaml" else "{}\n")
    folder = _user_folder(tmp_path / "run", {sign: sign_text, "notes.md": "mine\n",
                                             ".draft.tmp": "mine too\n"})
    (folder / "runs").mkdir()
    theirs = {"runs/.state.pt.abc.tmp": b"a look-alike of an earlier cdist's"}
    for name, data in theirs.items():
        (folder / name).write_bytes(data)
    orphans = [folder / f"{TMP_PREFIX}results.json-x1.tmp",
               folder / "runs" / f"{TMP_PREFIX}state.pt-x2.tmp"]
    for path in orphans:
        path.write_bytes(b"half")
    (folder / f"{TMP_PREFIX}student-x3").mkdir()  # a checkpoint's temporary folder
    before = {k: v for k, v in _tree(folder).items() if TMP_PREFIX not in k}
    with run_folder.claim(folder):
        pass
    after = _tree(folder)
    assert not any(TMP_PREFIX in k for k in after)
    assert not (folder / f"{TMP_PREFIX}student-x3").exists()
    assert {k: v for k, v in after.items() if k not in (".cdist.lock", ".cdist-run")} \
        == {k: v for k, v in before.items() if k not in (".cdist.lock", ".cdist-run")}
    assert (folder / ".cdist-run").is_file()


# ------------------------------------------------------------------------ full disks, I/O errors
def _full_disk(monkeypatch, after: int = 0):
    """Make every ``Path.write_bytes`` of more than ``after`` bytes write half of them and then
    fail as a full disk does (ENOSPC)."""
    write = pathlib.Path.write_bytes

    def full(self, data):
        if len(data) <= after:
            return write(self, data)
        write(self, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)


def test_a_full_disk_keeps_the_old_result_and_names_the_file(monkeypatch, tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json({"old": 1}, path)
    before = _tree(tmp_path)
    _full_disk(monkeypatch)
    with pytest.raises(WriteError) as err:
        atomic_write_json({"new": 2}, path)
    assert str(err.value) == (f"{path} could not be written (No space left on device); free "
                              "some space or write elsewhere") and err.value.errno == errno.ENOSPC
    assert _tree(tmp_path) == before  # the old version, and no temporary file


class _FullDisk(io.FileIO):
    """A file on a disk with room for ``room`` more bytes: a write past it is cut short, and the
    next fails (ENOSPC), as the system's write does."""

    room = 600

    def write(self, data) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = super().write(memoryview(data)[:self.room])
        self.room -= written
        return written


def test_a_full_disk_in_torch_save_is_one_line(monkeypatch, tmp_path):
    """torch's zip writer meets the full disk as a short write ("unexpected pos"); the error
    the write met is what is said."""
    from cdist import checkpoints

    monkeypatch.setattr(checkpoints, "open", lambda path, mode: io.BufferedWriter(
        _FullDisk(path, "w")), raising=False)
    with pytest.raises(WriteError, match="state.pt could not be written \\(No space left"):
        atomic_torch_save({"weights": torch.zeros(50_000)}, tmp_path / "state.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_saving_a_checkpoint_keeps_the_old_one(ckpt, model, monkeypatch, tmp_path):
    from safetensors import SafetensorError

    from cdist.models import loading

    out = shutil.copytree(ckpt["good"], tmp_path / "out")
    before = _tree(tmp_path)

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(loading, "save_file", full)
    with pytest.raises(WriteError) as err:
        save_llama(model, out)
    assert str(err.value).startswith(f"{out} could not be written (No space left on device)")
    assert _tree(tmp_path) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_plotly_js_cut_by_a_full_disk_is_repaired_by_the_next_run(monkeypatch, tmp_path):
    from plotly.offline import get_plotlyjs

    from cdist import plots

    figure = plots.head_heatmap(torch.randn(2, 4), title="scores", colorbar="drop")
    whole = get_plotlyjs().encode()
    _full_disk(monkeypatch, after=len(whole) - 1)
    with pytest.raises(WriteError, match="plotly.min.js could not be written \\(No space left"):
        plots.save_figure(figure, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    monkeypatch.undo()
    # a copy cut short by an earlier cdist (which let plotly write it in place) is not kept
    (tmp_path / "plotly.min.js").write_bytes(whole[:196_608])
    plots.save_figure(figure, tmp_path / "a")
    assert (tmp_path / "plotly.min.js").read_bytes() == whole
    assert {p.name for p in tmp_path.iterdir()} == {"a.html", "a.png", "plotly.min.js"}


def test_a_full_disk_in_a_step_is_one_line_naming_the_file(ckpt, monkeypatch, tmp_path, capsys):
    _full_disk(monkeypatch)
    out = tmp_path / "out"
    argv = ["discover", *SMALL, "--roles", "student", "--student", str(ckpt["good"]),
            "--out", str(out)]
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cdist: error: {out / 'identity.json'} could not be written (No space left on "
                   "device); free some space or write elsewhere"], err
    assert [p.name for p in out.iterdir()] == [".cdist.lock"]  # no half-written file


def test_the_command_line_names_an_os_error_it_did_not_expect(monkeypatch, capsys):
    from cdist import cli

    def broken(argv=None):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "/data/run/commands.log")

    monkeypatch.setattr(cli, "run", broken)
    assert cli.main([]) == 2
    assert capsys.readouterr().err.strip() == (
        "cdist: error: /data/run/commands.log: Input/output error; check the path and the disk, "
        "then run the command again")
    assert issubclass(WriteError, CdistError) and issubclass(WriteError, OSError)

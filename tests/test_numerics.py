"""``cdist.numerics``: pinned CPU arithmetic makes the same weights whatever kernels the machine
would have chosen, and a process that cannot be pinned, or a portable fine-tune in an unpinned
one, is refused.

A second machine is out of reach here, so another machine is what torch's kernel choice
(``ATEN_CPU_CAPABILITY``) and the thread count make of this one: each run is a fresh process,
since torch fixes its choice at the first kernel."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_bad_inputs import _main

from cdist import numerics
from cdist.errors import ConfigError
from cdist.finetune import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parents[1]
x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                         reason="portable numerics pin x86-64 kernels (AVX2)")

# a fine-tune of et-student in a fresh process; prints the model's fingerprint
_FINETUNE = """
import sys
from cdist import numerics
portable = sys.argv[2] == "portable"
if portable:
    numerics.pin()
import torch
from cdist import zoo
from cdist.cli.common import organism_kwargs
from cdist import tasks
from cdist.finetune import FinetuneConfig, finetune
own = organism_kwargs(tasks.get_task("entity_tracking"), zoo.manifest("et-student")["config"])
cfg = FinetuneConfig(task_kwargs=own, train_items=32, val_items=16, steps=3, eval_every=3,
                     batch_size=16, lr=1e-3, numerics=sys.argv[2])
model = zoo.load("et-student", device="cpu")[0]
record = finetune(model, cfg, sys.argv[1], progress=False)
print(record["fingerprint"], torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
"""


def _python(code: str, *args: str, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh process, with ``env`` over this one's minus what the suite pins
    (tests/conftest.py), so that it starts as an unpinned process on this machine would."""
    clean = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT,
                          env={**clean, "PYTHONPATH": str(ROOT), **env}, capture_output=True,
                          text=True, timeout=300)


def _run(tmp_path: Path, name: str, mode: str, **env) -> list[str]:
    out = _python(_FINETUNE, str(tmp_path / name), mode, **env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[-3:]


@x86
def test_pinned_weights_do_not_depend_on_the_kernels_or_threads_the_machine_would_choose(
        tmp_path):
    if "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX2")
    # a machine whose torch would pick AVX-512 kernels and two threads, pinned ...
    pinned = _run(tmp_path, "a", "portable", ATEN_CPU_CAPABILITY="avx512", OMP_NUM_THREADS="2")
    # ... is the same as one started with those settings (MKL's among them: without
    # MKL_CBWR, AVX2 kernels on one thread made other weights of this very model here)
    native = _run(tmp_path, "b", "native", **numerics.PORTABLE, OMP_NUM_THREADS="1")
    assert pinned == native[:1] + ["AVX2", "1"] and native[1:] == ["AVX2", "1"]
    record = json.loads((tmp_path / "a" / "finetune.json").read_text())
    assert record["numerics"]["portable"] and record["numerics"]["env"] == numerics.PORTABLE
    assert record["identity"]["finetune"]["numerics"] == "portable"
    assert "numerics" not in json.loads(
        (tmp_path / "b" / "finetune.json").read_text())["identity"]["finetune"]
    if "avx512f" in Path("/proc/cpuinfo").read_text():
        # the control: left to choose, this machine's AVX-512 kernels make other weights, so
        # the equality above is the pin's doing
        wide = _run(tmp_path, "c", "native", ATEN_CPU_CAPABILITY="avx512", OMP_NUM_THREADS="1")
        assert wide[1] == "AVX512" and wide[0] != pinned[0]


def test_a_process_past_its_first_kernel_is_not_pinned_in_silence():
    out = _python("import torch\n"
                  "torch.ones(3).sum()  # the process chooses its kernels here\n"
                  "print(torch.backends.cpu.get_cpu_capability())\n"
                  "from cdist import numerics\n"
                  "numerics.pin()\n")
    if out.stdout.split()[:1] == ["AVX2"]:
        pytest.skip("this machine runs AVX2 kernels of its own accord: there is nothing to refuse")
    assert out.returncode != 0
    assert "ConfigError: portable numerics need torch's CPU kernels at AVX2" in out.stderr
    assert "before any model loads" in out.stderr.splitlines()[-1]


def test_a_portable_fine_tune_in_an_unpinned_process_is_refused(tmp_path):
    from cdist import zoo

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # unpinned whatever the suite's threads: a pinned process runs one
    try:
        with pytest.raises(ConfigError, match="pin"):
            finetune(zoo.load("et-student", device="cpu")[0],
                     FinetuneConfig(steps=1, numerics="portable"), tmp_path / "ft")
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "ft").exists()  # refused before the folder is made
    with pytest.raises(ConfigError, match="native"):
        FinetuneConfig(numerics="fast")


def test_portable_fine_tuning_refuses_threads_and_gpus_in_one_line(tmp_path, capsys):
    code = _main(["finetune", "--model", "et-student", "--portable", "--threads", "2",
                  "--out", str(tmp_path / "ft")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--portable runs on one thread" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ft").exists()

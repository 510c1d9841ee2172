"""Every command of README.md runs as pasted, in order, in a copy of the repository.

The commands are read from the README's ```bash blocks, in order, and run with the repository copy as the
working directory (so `runs/`, `corpus.txt` … land there, as on a fresh clone). What the test changes:

* training commands get overrides that shrink them (tiny model, short blocks, few steps): the same code
  paths in seconds. Keys a command sets itself keep the command's value;
* `data.tokenizer=gpt2` (the Hub's GPT-2 BPE; there is no network here) becomes the local copy in
  ../shared/data, or the byte tokenizer when that is absent;
* launchers run as pasted (one process per GPU: one here; test_launch_script_reproduces_ddp runs them on
  two), `make` uses the test's own venv, and `llmtrain-*` lines run forked after the first of each kind.

A command that cannot run here is listed in SKIP with the reason and the test that covers it instead.
Each command must exit 0 without a traceback, without launcher chatter, and show what the README promises.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, SHARED_DATA, base_env, fork_cli, run_cmd

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"
SKIP = {  # command prefix -> why it does not run here (and what covers it)
    "make test": "this is the test suite",
    "pip install": "installing: make does it for every test run; test_installed_package_runs_outside_the_repo",
    "sbatch": "no SLURM here; test_launch_script_reproduces_ddp[slurm.sbatch] runs the template under stand-ins",
    "make dashboard": "a server that runs until Ctrl-C; test_dashboard_serves_the_runs starts it and asks its API",
    "make bench": "minutes of timing; test_overhead_benchmark_prints_its_ratio runs bench/overhead.py, shortened",
    "launch/deepspeed.sh": "test_deepspeed_launcher_on_cpu runs this script on 2 processes and checks its losses",
    "launch/accelerate.sh": "test_launch_script_reproduces_ddp[accelerate.sh] runs it on 2 processes, bit for bit",
    "llmtrain-train -m hydra/launcher=torchrun": "two torchrun jobs; test_distributed_trials_through_the_torchrun_"
                                                "launcher runs this command (shrunk) and checks both trials",
    "llmtrain-train experiment=llama_finetune": "needs a downloaded SmolLM2 dir; test_chat.py's "
                                                "test_a_chat_model_learns_a_mapping_and_answers_through_the_cli "
                                                "fine-tunes a tiny chat model of the family and asks it, chat=true",
    "llmtrain-generate source=runs/llama_finetune": "the run of the command above; see there",
}
GPT_SHRINK = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.n_positions=256", "data.seq_len=32",
              "data.embedded_max_bytes=100000", "trainer.micro_batch_size=2", "trainer.grad_accum_steps=1",
              "trainer.max_steps=4", "trainer.eval_every=2", "trainer.ckpt_every=2", "trainer.eval_batches=1",
              "trainer.sample_tokens=8", "logger.progress=false"]
PLAIN_SHRINK = ["trainer.max_steps=4", "logger.progress=false"]
PLAIN_EXPERIMENTS = ("linear_regression", "mlp_regression", "resnet_images", "cnn_images")
TRAINS = ("make train", "llmtrain-train", "python -m llmtrain.train", "launch/", "torchrun", "deepspeed",
          "accelerate launch")
PYTHON_BLOCK = "#python\n"  # marks a ```python block among the commands
SCRIPTS = {"llmtrain-train": "llmtrain.train", "llmtrain-generate": "llmtrain.generate", "llmtrain-eval":
           "llmtrain.generation.eval", "llmtrain-export": "llmtrain.export", "llmtrain-prepare": "llmtrain.prepare",
           "llmtrain-plan": "llmtrain.plan"}
_SEEN: set[str] = set()
NOISE = ("Traceback", "FutureWarning", "[INFO]", "Setting OMP_NUM_THREADS", "were not passed", "Retrying in")


def readme_commands(text: str) -> list[str]:
    """Every command line of the ```bash blocks, as shell text (continuations joined, comments dropped),
    and every ```python block whole, in README order."""
    out: list[str] = []
    for lang, block in re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S):
        if lang == "python":
            out.append(PYTHON_BLOCK + block)
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#|^#", line, maxsplit=1)[0].strip()
            if line:
                out.append(" ".join(line.split()))
    return out


def _keys(words: list[str]) -> set[str]:
    return {w.split("=", 1)[0] for w in words if "=" in w and not w.startswith("-")}


def adapt(cmd: str) -> str:
    """The command as run here (shell text): offline, shrunk."""
    tok = str(GPT2_TOKENIZER) if GPT2_TOKENIZER.is_dir() else "byte"
    line = re.sub(r"(?<!\S)data\.tokenizer=gpt2(?!\S)", f"data.tokenizer={tok}", cmd)
    words = shlex.split(line)
    program = " ".join(w for w in words if not re.match(r"[A-Z_][A-Z0-9_]*=", w))  # without VAR=value
    if not program.startswith(TRAINS) or "--help" in words or "--cfg" in words:
        return line
    args = re.search(r'ARGS="([^"]*)"', line)
    overrides = shlex.split(args.group(1)) if args else words
    plain = any(f"experiment={e}" in overrides for e in PLAIN_EXPERIMENTS)
    extra = [o for o in (PLAIN_SHRINK if plain else GPT_SHRINK) if o.split("=", 1)[0] not in _keys(overrides)]
    if "model=hf" in overrides:  # the pretrained dir's shape: no model keys to shrink
        extra = [o for o in extra if not o.startswith("model.")]
    if "experiment=gpt2_finetune" in overrides:  # prompt/completion data: no embedded corpus
        extra = [o for o in extra if not o.startswith("data.embedded_max_bytes")]
    if not plain and "data.tokenizer" not in _keys(overrides) and any(
            f"experiment=gpt2_{s}" in overrides for s in ("small", "medium", "large", "xl")):
        extra.append(f"data.tokenizer={tok}")  # those presets use the Hub's GPT-2 BPE
    if program.startswith("make"):
        if args:
            return f'{line[:args.start()]}ARGS="{args.group(1)} {" ".join(extra)}"{line[args.end():]}'
        return f'{line} ARGS="{" ".join(extra)}"'
    return f"{line} {shlex.join(extra)}"


def _copy_repo(dest: Path) -> None:
    """The files a fresh clone has (tracked, plus new ones not ignored): no runs/, no .venv."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def test_readme_commands_run_as_pasted(tmp_path: Path) -> None:
    commands = readme_commands((REPO / "README.md").read_text())
    assert commands[:2] == ["make train", "make test"], commands[:2]
    clone = tmp_path / "clone"
    _copy_repo(clone)
    env = base_env(tmp_path / "cache")
    for k in ("OMP_NUM_THREADS", "HYDRA_FULL_ERROR"):  # as on a user's shell: the launchers must cope
        env.pop(k, None)
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}", PYTHONPATH=str(clone))
    ran = []
    for cmd in commands:
        if any(cmd.startswith(prefix) for prefix in SKIP):
            continue
        if cmd.startswith(PYTHON_BLOCK):
            line = "python -"  # the block on stdin
            res = run_cmd(["python", "-c", cmd], env=env, cwd=clone, timeout=240)
        else:
            line = adapt(cmd)
            if line.startswith("make "):  # the venv this test runs in, not a new one
                line = f"make -o {VENV_BIN.parent}/.installed VENV={VENV_BIN.parent} {line[5:]}"
            res = _run(line, env, clone)
        out = res.stdout + res.stderr
        assert res.returncode == 0, f"{cmd}\n→ {line}\nexit {res.returncode}\n{out[-5000:]}"
        for noise in NOISE:
            assert noise not in out, f"{cmd}: {noise!r} in its output\n{out[-5000:]}"
        check_promise(cmd, res.stdout, res.stderr, clone)
        ran.append(cmd)
    assert len(ran) >= 12, ran


def _run(line: str, env: dict[str, str], clone: Path) -> subprocess.CompletedProcess:
    """A shell line; an `llmtrain-*` command without pipes or redirections runs forked (fork_cli: the same
    main() with the same argv, cwd and environment, without 6 s of imports), the first of each kind for
    real through its console script."""
    words = shlex.split(line)
    if words and words[0] in SCRIPTS and not set("|<>;&") & set(line) and words[0] in _SEEN:
        return fork_cli(SCRIPTS[words[0]], words[1:], env=env, cwd=clone, timeout=240)
    _SEEN.add(words[0] if words else "")
    return run_cmd(["bash", "-c", line], env=env, cwd=clone, timeout=240)


def test_console_scripts_name_the_modules_the_tests_fork() -> None:
    """pyproject's entry points are the modules `_run` forks into (so the forked commands are the scripts')."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name, module in SCRIPTS.items():
        assert scripts[name].split(":")[0] in (module, module.replace(".generate", ".generation.cli")), name
        assert scripts[name].endswith(":main")


def check_promise(cmd: str, stdout: str, stderr: str, clone: Path) -> None:
    """What the README says each command shows or leaves behind."""
    if cmd == "make train":
        assert "--- sample at step 4 (8 tokens) ---" in stdout and "llmtrain: exporting" in stdout
        assert (clone / "runs" / "gpt2_tiny" / "final" / "model.safetensors").is_file()
    elif cmd.startswith("make train ARGS="):  # same configuration, longer: continues runs/gpt2_tiny
        assert "resuming from" in stdout and re.search(r"run dir \S*/runs/gpt2_tiny$", stdout, re.M), stdout
    elif "experiment=linear_regression" in cmd:
        assert "max |w - true w|" in stdout and "true" in stdout
    elif cmd.startswith("llmtrain-train model=gpt2_small"):  # runs/gpt2_tiny holds the tiny run
        assert "holds a run of another configuration" in stderr and "runs/gpt2_tiny-2" in stdout
    elif "trainer=debug" in cmd:
        assert "runs/gpt2_small-debug" in stdout
    elif "--help" in cmd:
        assert "experiment:" in stdout and "schema" not in stdout
    elif "--cfg job" in cmd:
        assert "name: gpt2_small" in stdout and not (clone / "runs" / "gpt2_small").exists()
    elif cmd.startswith("llmtrain-export"):
        assert (clone / "exported" / "gpt2_tiny" / "model.safetensors").is_file()
    elif cmd.startswith("launch/"):
        assert "× 1 on cpu" in stdout, stdout  # one process per GPU: none here
    elif cmd.startswith("OMP_NUM_THREADS=1 torchrun --nproc_per_node=2"):
        assert "× 2 on cpu" in stdout, stdout
    elif cmd.startswith("llmtrain-generate") and "output=jsonl" in cmd:
        recs = [json.loads(ln) for ln in stdout.splitlines()]
        assert len(recs) == 3 and all(r["prompt"] == "import " for r in recs), stdout
    elif "experiment=gpt2_finetune" in cmd:
        run = clone / "runs" / re.search(r"name=(\S+)", cmd).group(1)
        assert "instruct data: " in stdout and (run / "best" / "config.json").is_file(), stdout
        if "model.lora.enabled=true" in cmd:
            assert (run / "final" / "adapter" / "adapter_model.safetensors").is_file()
    elif "experiment=llama_tiny" in cmd:
        assert "llmtrain: llama (" in stdout, stdout
        cfg = json.loads((clone / "runs" / "llama_tiny" / "final" / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"], cfg
    elif "model=hf" in cmd:
        assert "llmtrain: hf (" in stdout and (clone / "runs" / "llama_as_hf" / "final" / "config.json").is_file()
    elif cmd.startswith("python -c") and "AutoModelForCausalLM" in cmd:
        assert stdout == "['LlamaForCausalLM']\n", stdout
    elif cmd.startswith("llmtrain-generate"):
        prompt = next(p for p in ("def main(", "class Tree:", "the standard library module") if p in cmd)
        assert stdout.startswith(prompt) and stdout.endswith("\n") and "llmtrain: loaded" in stderr
    elif cmd.startswith("llmtrain-train -m optim.lr="):
        assert len([d for d in (clone / "multirun" / "gpt2_tiny").iterdir() if (d / "run.json").is_file()]) == 4
    elif cmd.startswith("llmtrain-report"):
        assert len([ln for ln in stdout.splitlines() if ln.startswith("| optim.lr=")]) == 4
        assert (clone / "multirun" / "gpt2_tiny" / "sweep.png").is_file()
    elif cmd.startswith("llmtrain-train -m hydra/sweeper=lr_search"):
        assert (clone / "multirun" / "gpt2_tiny" / "optimization_results.yaml").is_file()
    elif "logger.wandb_mode=offline" in cmd:
        assert list((clone / "runs").glob("*/wandb/offline-run-*/run-*.wandb")), stdout
    elif cmd.startswith("llmtrain-plan"):
        assert "| zero3 |" in stdout and "fits:" in stdout and "8 h100" in stdout, stdout
        if "cluster.gpus" in cmd:  # the tensor-parallel and HSDP layouts, and the one strategy=auto would take
            assert "| fsdp dp8×tp2 |" in stdout and "| hsdp 2×8 |" in stdout and "\nchoice: " in stdout, stdout
    elif cmd.startswith("llmtrain-eval"):
        assert re.fullmatch(r"eval_loss=\S+ perplexity=\S+ tokens=\d+ blocks=\d+\n", stdout), stdout
    elif cmd.startswith(PYTHON_BLOCK):
        assert stdout.startswith("def main(") and ("length" in stdout or "eos" in stdout), stdout

"""Adding a model family or a data kind is one module and one YAML file, with no edit to llmtrain: the toy family
`quadratic` and kind `parabola` of tests/plugins, found through LLMTRAIN_PLUGINS or an entry point, train, resume,
export and show in --help through the real CLI; the registries are the only list of families, kinds and tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import REPO, base_env, fork_cli, losses, train_cli
from omegaconf import OmegaConf

from llmtrain import checkpoint as ckpt
from llmtrain.config import REGISTRIES, conf_dir
from llmtrain.registry import registering_modules

PLUGINS = REPO / "tests" / "plugins"
TRAIN, EXPORT = "llmtrain.train", "llmtrain.export"
TOY = ["model=quadratic", "data=parabola", "optim=adam", "optim.lr=0.03", "optim.weight_decay=0", "scheduler=constant",
       "trainer.micro_batch_size=32", "trainer.eval_every=20", "trainer.ckpt_every=20", "trainer.device=cpu",
       "logger.log_every=1", "logger.progress=false", "logger.tensorboard=false", "logger.plots=false"]


def _env(tmp_path: Path, plugins: str | None = "quadratic,parabola", path: tuple[Path, ...] = ()) -> dict[str, str]:
    """The CLI's environment: tests/plugins (and `path`) on PYTHONPATH, LLMTRAIN_PLUGINS naming `plugins`."""
    env = base_env(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (REPO, PLUGINS, *path))
    env.pop("LLMTRAIN_PLUGINS", None)
    if plugins is not None:
        env["LLMTRAIN_PLUGINS"] = plugins
    return env


def _one_error_line(res, key: str) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, (res.returncode, res.stderr[-3000:])
    assert lines[0].startswith(f"llmtrain: error: {key}: "), lines
    return lines[0]


def _options(help_text: str, group: str) -> list[str]:
    line = next(ln for ln in help_text.splitlines() if ln.startswith(f"{group}: "))
    return line.split(": ", 1)[1].split(", ")


def test_plugin_family_and_kind_train_resume_and_export(tmp_path: Path) -> None:
    """model=quadratic data=parabola: the loss falls, checkpoints are written, a resumed run continues with the
    losses of an uninterrupted one, and llmtrain-export writes the fitted quadratic (the paraboloid's curvature)."""
    env = _env(tmp_path)
    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    train_cli([*TOY, "trainer.max_steps=60"], ref, env=env)
    res = train_cli([*TOY, "trainer.max_steps=40"], run_dir, env=env)
    assert "llmtrain: quadratic (" in res.stdout
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, 41))
    assert sum(loss[s] for s in range(36, 41)) < sum(loss[s] for s in range(1, 6)) / 4, loss
    assert [c.name for c in ckpt.list_checkpoints(run_dir)] == ["step_00000020", "step_00000040"]
    res = train_cli([*TOY, "trainer.max_steps=60"], run_dir, env=env)
    assert "resuming from" in res.stdout and "at step 40" in res.stdout, res.stdout[-2000:]
    assert losses(run_dir) == losses(ref)  # bit for bit, also after the resume
    assert [c.name for c in ckpt.list_checkpoints(run_dir)] == ["step_00000040", "step_00000060"]

    out = tmp_path / "export"
    res = fork_cli(EXPORT, [str(run_dir), "--out", str(out)], env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    from safetensors.torch import load_file

    meta = json.loads((out / "config.json").read_text())
    assert meta["model"] == {"family": "quadratic", "init_std": 0.01, "linear_term": True}
    assert meta["data_info"]["in_features"] == 3 and meta["data_info"]["out_features"] == 1
    weights = load_file(str(out / "model.safetensors"))
    final = load_file(str(run_dir / "final" / "model.safetensors"))  # the run's own export of step 60
    assert weights.keys() == final.keys() and all((weights[k] == final[k]).all() for k in weights)
    curvature = OmegaConf.load(PLUGINS / "parabola.yaml").curvature  # y = curvature * mean(x*x) + x w + noise
    assert (weights["square.weight"] - curvature / 3).abs().max() < 0.1, weights


def test_help_lists_plugin_options_only_when_named(tmp_path: Path) -> None:
    res = fork_cli(TRAIN, ["--help"], env=_env(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "quadratic" in _options(res.stdout, "model") and "parabola" in _options(res.stdout, "data")
    assert "schema" not in res.stdout
    res = fork_cli(TRAIN, ["--help"], env=_env(tmp_path, plugins=None))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "quadratic" not in _options(res.stdout, "model") and "parabola" not in _options(res.stdout, "data")


@pytest.mark.parametrize("overrides,key,says", [
    (["model.init_sdt=0.1"], "model.init_sdt", "no such key in model; did you mean model.init_std?"),
    (["+data.curvatur=1"], "data.curvatur", "no such key in data; did you mean data.curvature?"),
    (["data=text"], "model", "model family 'quadratic' trains on regression data, but data.kind 'text' is lm data; "
                             "pick data=parabola or data=regression or an experiment="),
    (["model=gpt2_tiny"], "model", "model family 'gpt2' trains on lm data, but data.kind 'parabola' is regression "
                                   "data; pick data=instruct or data=text or an experiment="),
    (["data.n_train=0"], "data.n_train", "must be > 0 (got 0)"),
])
def test_plugin_config_errors_are_one_line(tmp_path: Path, overrides: list[str], key: str, says: str) -> None:
    args = [*TOY, "trainer.max_steps=2", *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    line = _one_error_line(fork_cli(TRAIN, args, env=_env(tmp_path)), key)
    assert says in line, line


def test_a_plugin_not_named_is_no_option(tmp_path: Path) -> None:
    res = fork_cli(TRAIN, ["model=quadratic", f"hydra.run.dir={tmp_path / 'run'}"], env=_env(tmp_path, plugins=None))
    assert "no option 'quadratic'; choose one of cnn, gpt2_large" in _one_error_line(res, "model")


def test_entry_points_name_plugins(tmp_path: Path) -> None:
    """An installed distribution's `llmtrain.plugins` entry points are imported without LLMTRAIN_PLUGINS; one that
    names a missing module is one line naming the distribution."""
    site = tmp_path / "site"
    dist = site / "toy_plugins-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[llmtrain.plugins]\nquadratic = quadratic\nparabola = parabola\n")
    env = _env(tmp_path, plugins=None, path=(site,))
    res = fork_cli(TRAIN, ["--help"], env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "quadratic" in _options(res.stdout, "model") and "parabola" in _options(res.stdout, "data")
    (dist / "entry_points.txt").write_text("[llmtrain.plugins]\nquadratic = quadratc\n")
    line = _one_error_line(fork_cli(TRAIN, ["--help"], env=env), "llmtrain.plugins")
    assert "no module named 'quadratc' (entry point 'quadratic' of toy-plugins)" in line, line


def _plugin(where: Path, name: str, schema_default: str, yaml: str | None, preset: str | None = None) -> None:
    """A model family module `name` (registering family `name`, schema family default `schema_default`) and its
    preset `preset` (default <name>.yaml) holding `yaml`."""
    preset = preset or f"{name}.yaml"
    (where / f"{name}.py").write_text(f'''
from dataclasses import dataclass

from llmtrain.models.base import register_model
from llmtrain.models.regression import RegressionSpec


@dataclass
class Config:
    family: str = "{schema_default}"


@register_model("{name}", config=Config, task="regression", presets=("{preset}",))
class Spec(RegressionSpec):
    pass
''')
    if yaml is not None:
        (where / preset).write_text(yaml)


@pytest.mark.parametrize("case,key,says", [
    ("missing", "LLMTRAIN_PLUGINS", "no module named 'no_such_plugin'; the directory holding it must be on sys.path"),
    ("twice", "model.family", "model family 'regression' is registered twice: by llmtrain.models.regression and "
                              "by twice"),
    ("schema", "model.family", "schema registers model family 'schema' with config='Config', which must be a "
                               "dataclass with the field `family: str = 'schema'`"),
    ("untyped", "model", "untyped.yaml must begin with `defaults: [/schema_model_untyped@_here_, _self_]`"),
    ("nowhere", "model", "nowhere registers the preset 'nowhere.yaml', which is neither beside it nor in"),
    ("shadow", "model", "option 'linear' is a preset of both llmtrain.models.regression and shadow"),
])
def test_broken_plugins_are_one_line(tmp_path: Path, case: str, key: str, says: str) -> None:
    where = tmp_path / "plugins"
    where.mkdir()
    typed = "defaults:\n  - /schema_model_{0}@_here_\n  - _self_\n"
    if case == "twice":
        _plugin(where, "twice", "regression", None)
        (where / "twice.py").write_text((where / "twice.py").read_text().replace('register_model("twice"',
                                                                                  'register_model("regression"'))
    elif case == "schema":
        _plugin(where, "schema", "other", typed.format("schema"))
    elif case == "untyped":
        _plugin(where, "untyped", "untyped", "hidden: 3\n")
    elif case == "nowhere":
        _plugin(where, "nowhere", "nowhere", None)
    elif case == "shadow":
        _plugin(where, "shadow", "shadow", typed.format("shadow"), preset="linear.yaml")
    plugins = "no_such_plugin" if case == "missing" else case
    line = _one_error_line(fork_cli(TRAIN, ["--help"], env=_env(tmp_path, plugins=plugins, path=(where,))), key)
    assert says in line, line


def test_data_that_contradicts_its_registered_task_is_one_line(tmp_path: Path) -> None:
    """The registered task is what the run is checked against; a DataModule whose DataInfo says another is
    refused before training."""
    where = tmp_path / "plugins"
    where.mkdir()
    (where / "liar.py").write_text('''
from dataclasses import dataclass

from llmtrain.data.base import register_data
from llmtrain.data.synthetic import RegressionDataModule


@dataclass
class Config:
    kind: str = "liar"
    n_train: int = 64
    n_val: int = 64
    in_features: int = 2
    out_features: int = 1
    noise_std: float = 0.1
    target: str = "linear"
    seed: int = 0
    nonlinear_scale: float = 1.0


@register_data("liar", config=Config, task="classification", presets=("liar.yaml",))
class Liar(RegressionDataModule):
    pass
''')
    (where / "liar.yaml").write_text("defaults:\n  - /schema_data_liar@_here_\n  - _self_\n")
    args = ["model=cnn", "data=liar", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"]
    line = _one_error_line(fork_cli(TRAIN, args, env=_env(tmp_path, plugins="liar", path=(where,))), "data.kind")
    assert "data kind 'liar' is registered with task 'classification' but its DataInfo says 'regression'" in line


def test_shipped_presets_belong_to_one_registered_family_or_kind() -> None:
    """Every conf/model and conf/data option is a preset of exactly one built-in family or kind and is typed by
    its schema; every preset a built-in registers is shipped."""
    for registry in REGISTRIES:
        shipped = sorted(p.stem for p in (conf_dir() / registry.group).glob("*.yaml"))
        builtin = [e for e in registry.entries() if e.module.startswith("llmtrain.")]
        assert sorted(o for e in builtin for o in e.options) == shipped
        for e in builtin:
            for option in e.options:
                defaults = list(OmegaConf.load(conf_dir() / registry.group / f"{option}.yaml").defaults)
                assert defaults[0] == f"/{registry.schema_name(e.name)}@_here_", (option, defaults)


def test_discovery_imports_only_the_modules_that_register() -> None:
    for registry in REGISTRIES:
        found = registering_modules(registry.package, registry._marker)
        assert found == sorted({e.module for e in registry.entries() if e.module.startswith(f"{registry.package}.")})
    assert {e.task for e in REGISTRIES[0].entries()} <= {e.task for e in REGISTRIES[1].entries()}


def test_a_plugin_causal_lm_trains_evaluates_exports_and_generates(tmp_path: Path) -> None:
    """model=bigram (tests/plugins/bigram.py, a causal LM outside llmtrain) on text: it learns the corpus's one
    successor per letter; llmtrain-eval scores it, llmtrain-export exports it with its tokenizer, and
    llmtrain-generate continues a prompt greedily from the run, from its export and from its checkpoint alone."""
    env = _env(tmp_path, plugins="bigram")
    corpus = tmp_path / "abc.txt"
    corpus.write_text("abc" * 400)
    run_dir, out = tmp_path / "run", tmp_path / "export"
    train_cli(["model=bigram", f"data.source={corpus}", "data.tokenizer=byte", "data.seq_len=16",
               "optim=adam", "optim.lr=0.1", "optim.weight_decay=0", "scheduler=constant", "trainer.max_steps=60",
               "trainer.micro_batch_size=8", "trainer.eval_every=60", "trainer.ckpt_every=60",
               "trainer.sample_tokens=8", "trainer.sample_temperature=0", "trainer.sample_prompt=ab",
               "logger.log_every=1", "logger.progress=false", "logger.tensorboard=false", "logger.plots=false"],
              run_dir, env=env)
    loss = losses(run_dir)
    assert loss[60] < loss[1] / 10, loss
    assert (run_dir / "samples.txt").read_text().startswith("abcabcabca")  # the run's own end-of-run sample
    res = fork_cli("llmtrain.generation.eval", [f"source={run_dir}", f"data.source={corpus}", "data.seq_len=16"],
                   env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    scored = dict(kv.split("=") for kv in res.stdout.split())
    assert float(scored["eval_loss"]) < 0.1, res.stdout
    res = fork_cli(EXPORT, [str(run_dir), "--out", str(out)], env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["model"]["family"] == "bigram"
    assert (out / "tokenizer.json").is_file()
    (run_dir / "final").rename(tmp_path / "final-aside")  # the run's checkpoint alone
    for source in (out, run_dir):
        res = fork_cli("llmtrain.generation.cli", [f"source={source}", "prompt=ab", "max_new_tokens=7",
                                                   "do_sample=false", "stop_at_eos=false"], env=env)
        assert res.returncode == 0 and res.stdout == "abcabcabc\n", (source, res.stdout, res.stderr[-2000:])

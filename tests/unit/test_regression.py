"""Regression family and synthetic regression data: recovery of w and b, MLP vs linear, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose, read_metrics

from llmtrain.data.base import build_data
from llmtrain.data.synthetic import RegressionDataConfig, RegressionDataModule
from llmtrain.errors import ConfigError
from llmtrain.models.base import DataInfo, get_model_spec
from llmtrain.models.regression import MLP, RegressionModelConfig
from llmtrain.train import run

QUIET = ["logger.progress=false", "logger.log_every=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(overrides: list[str], run_dir: Path):
    cfg = compose(overrides + QUIET)
    last = run(cfg, run_dir)
    spec = get_model_spec(cfg.model.family)
    model = spec.load(cfg.model, None, run_dir / "final")  # rebuilt from final/ alone
    return cfg, last, model


def _val_mse(model: torch.nn.Module, data: RegressionDataModule) -> float:
    val = data.split("val")
    batch = val.get(np.arange(len(val)))
    with torch.no_grad():
        return float(((model(batch["x"]) - batch["y"]) ** 2).mean())


def test_linear_regression_recovers_true_w_and_b(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg, last, model = _train(["experiment=linear_regression"], tmp_path / "run")
    data = build_data(cfg.data)
    # the run ends by showing the learnt w and b beside the true ones
    out = capsys.readouterr().out
    for i in range(cfg.data.in_features):
        learnt, true = float(model.weight[0, i]), float(data.true_w[i, 0])
        assert f"w[{i}]     {learnt:+.4f}  true {true:+.4f}" in out, out
    assert f"b        {float(model.bias[0]):+.4f}  true {float(data.true_b[0]):+.4f}" in out
    assert "max |w - true w| = 0.0" in out and "(9 params)" in out
    assert isinstance(model, torch.nn.Linear)
    w = model.weight.detach().numpy().T  # [F, out]
    b = model.bias.detach().numpy()
    assert w.shape == data.true_w.shape == (cfg.data.in_features, cfg.data.out_features)
    assert np.abs(w - data.true_w).max() < 0.05, (w, data.true_w)
    assert np.abs(b - data.true_b).max() < 0.05, (b, data.true_b)
    assert np.allclose(data.info.true_w, data.true_w)
    assert np.allclose(data.info.true_b, data.true_b)

    noise_var = cfg.data.noise_std**2
    assert abs(last["eval_loss"] - noise_var) < 0.2 * noise_var, (last["eval_loss"], noise_var)
    # eval_loss is the per-sample MSE of the exported model over the whole val split
    assert last["eval_loss"] == pytest.approx(_val_mse(model, data), rel=1e-4)
    first = read_metrics(tmp_path / "run")[0]
    assert first["loss"] > 100 * noise_var  # it started far from the answer


def test_mlp_beats_linear_on_nonlinear_target(tmp_path: Path) -> None:
    _, lin, _ = _train(["experiment=linear_regression", "data.target=nonlinear"], tmp_path / "lin")
    cfg, mlp, model = _train(["experiment=mlp_regression"], tmp_path / "mlp")
    assert cfg.data.target == "nonlinear"
    assert isinstance(model, MLP)
    noise_var = cfg.data.noise_std**2
    assert lin["eval_loss"] > 20 * noise_var  # the nonlinearity is real: a line cannot fit it
    assert mlp["eval_loss"] < 0.3 * lin["eval_loss"], (mlp["eval_loss"], lin["eval_loss"])


def test_loss_is_per_sample_mse_averaged_over_outputs() -> None:
    spec = get_model_spec("regression")
    model = spec.build(RegressionModelConfig(arch="linear"), DataInfo(task="regression", in_features=4,
                                                                      out_features=3))
    x, y = torch.randn(10, 4), torch.randn(10, 3)
    loss_sum, count = spec.loss(model, {"x": x, "y": y})
    assert int(count) == spec.count({"x": x, "y": y}) == 10
    expected = ((model(x) - y) ** 2).mean(dim=1).sum()
    assert torch.allclose(loss_sum, expected)
    assert spec.block_classes(model) == ()


def test_regression_data_is_seeded_and_has_the_promised_noise() -> None:
    cfg = RegressionDataConfig(n_train=4000, n_val=100, in_features=5, out_features=2, noise_std=0.3, seed=7)
    a, b = RegressionDataModule(cfg), RegressionDataModule(cfg)
    other = RegressionDataModule(RegressionDataConfig(**{**cfg.__dict__, "seed": 8}))
    idx = np.array([3, 0, 99])
    ba, bb = a.split("val").get(idx), b.split("val").get(idx)
    assert torch.equal(ba["x"], bb["x"]) and torch.equal(ba["y"], bb["y"])
    assert not np.allclose(a.true_w, other.true_w)
    assert ba["x"].shape == (3, 5) and ba["y"].shape == (3, 2)
    assert ba["x"].dtype == ba["y"].dtype == torch.float32
    assert a.info.task == "regression" and (a.info.in_features, a.info.out_features) == (5, 2)
    train = a.split("train").get(np.arange(4000))
    resid = train["y"].numpy() - (train["x"].numpy() @ a.true_w + a.true_b)
    assert resid.std() == pytest.approx(0.3, rel=0.05)  # y = Xw + b + N(0, noise_std^2)
    assert abs(resid.mean()) < 0.02


@pytest.mark.parametrize("arch", ["linear", "mlp"])
def test_export_load_roundtrip(tmp_path: Path, arch: str) -> None:
    spec = get_model_spec("regression")
    cfg = RegressionModelConfig(arch=arch, hidden=16)
    info = DataInfo(task="regression", in_features=6, out_features=2)
    model = spec.build(cfg, info)
    spec.export(model, cfg, info, tmp_path / "final")
    assert (tmp_path / "final" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "final" / "config.json").read_text())
    assert meta["model"]["arch"] == arch and meta["data_info"]["in_features"] == 6
    loaded = spec.load(None, None, tmp_path / "final")
    x = torch.randn(5, 6)
    assert torch.equal(model(x), loaded(x))
    if arch == "mlp":
        assert [type(m) for m in loaded] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
        assert loaded[0].out_features == 16


def test_unknown_arch_and_target_are_config_errors() -> None:
    spec = get_model_spec("regression")
    with pytest.raises(ConfigError) as e:
        spec.build(RegressionModelConfig(arch="quadratic"), DataInfo(task="regression", in_features=2,
                                                                     out_features=1))
    assert e.value.key == "model.arch"
    with pytest.raises(ConfigError) as e:
        RegressionDataModule(RegressionDataConfig(target="cubic"))
    assert e.value.key == "data.target"

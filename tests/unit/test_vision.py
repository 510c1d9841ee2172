"""Vision family (LeNet CNN, ResNet) and image data (synthetic, CIFAR-10 archive)."""

from __future__ import annotations

import io
import math
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose, read_metrics
from torch import nn

from llmtrain.data.base import build_data
from llmtrain.data.images import ImageDataConfig, ImageDataModule
from llmtrain.errors import ConfigError
from llmtrain.models.base import DataInfo, get_model_spec
from llmtrain.models.vision import BasicBlock, LeNet, ResNet, VisionModelConfig
from llmtrain.train import run

INFO10 = DataInfo(task="classification", num_classes=10, image_shape=(3, 32, 32))


pytestmark = pytest.mark.usefixtures("one_thread")


# --- models ---------------------------------------------------------------------------------------
def test_lenet_is_the_classic_cifar10_cnn() -> None:
    model = get_model_spec("vision").build(VisionModelConfig(arch="cnn"), INFO10)
    assert isinstance(model, LeNet)
    assert sum(p.numel() for p in model.parameters()) == 62006
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight")}
    assert shapes == {"conv1.weight": (6, 3, 5, 5), "conv2.weight": (16, 6, 5, 5), "fc1.weight": (120, 400),
                      "fc2.weight": (84, 120), "fc3.weight": (10, 84)}
    seen: dict[str, tuple[int, ...]] = {}
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape)))
    out = model(torch.randn(2, 3, 32, 32))
    assert seen == {"conv1": (2, 6, 28, 28), "conv2": (2, 16, 10, 10), "fc1": (2, 120), "fc2": (2, 84),
                    "fc3": (2, 10)}
    assert out.shape == (2, 10)
    assert isinstance(model.pool, nn.MaxPool2d) and model.pool.kernel_size == 2
    assert get_model_spec("vision").block_classes(model) == ()


def test_basic_block_skip_and_projection() -> None:
    torch.manual_seed(0)
    same = BasicBlock(8, 8).eval()
    assert isinstance(same.shortcut, nn.Identity)
    nn.init.zeros_(same.bn2.weight)  # residual branch off: the block is relu(x + 0)
    x = torch.randn(2, 8, 16, 16)
    assert torch.allclose(same(x), torch.relu(x))

    down = BasicBlock(8, 16, stride=2).eval()
    conv, bn = down.shortcut
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    assert (conv.in_channels, conv.out_channels) == (8, 16) and isinstance(bn, nn.BatchNorm2d)
    assert down(x).shape == (2, 16, 8, 8)
    nn.init.zeros_(down.bn2.weight)
    assert torch.allclose(down(x), torch.relu(down.shortcut(x)))  # output = relu(projection(x))
    assert [type(m) for m in (down.conv1, down.bn1, down.conv2, down.bn2)] == [nn.Conv2d, nn.BatchNorm2d,
                                                                               nn.Conv2d, nn.BatchNorm2d]
    assert down.conv1.kernel_size == down.conv2.kernel_size == (3, 3) and down.conv1.stride == (2, 2)


def test_resnet_stages_and_block_classes() -> None:
    spec = get_model_spec("vision")
    model = spec.build(VisionModelConfig(arch="resnet", widths=[8, 16, 32], blocks_per_stage=2), INFO10)
    assert isinstance(model, ResNet)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 6
    assert [b.conv2.out_channels for b in blocks] == [8, 8, 16, 16, 32, 32]
    assert [b.conv1.stride[0] for b in blocks] == [1, 1, 2, 1, 2, 1]  # stride 2 between stages
    assert [not isinstance(b.shortcut, nn.Identity) for b in blocks] == [False, False, True, False, True, False]
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert spec.block_classes(model) == (BasicBlock,)
    with pytest.raises(ConfigError) as e:
        spec.build(VisionModelConfig(arch="vgg"), INFO10)
    assert e.value.key == "model.arch"


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_export_load_roundtrip(tmp_path: Path, arch: str) -> None:
    spec = get_model_spec("vision")
    cfg = VisionModelConfig(arch=arch, widths=[8, 16], blocks_per_stage=1)
    model = spec.build(cfg, INFO10)
    model(torch.randn(8, 3, 32, 32))  # train-mode pass: BN running stats move off their defaults
    model.eval()
    spec.export(model, cfg, INFO10, tmp_path / "final")
    loaded = spec.load(None, None, tmp_path / "final").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_loss_is_summed_cross_entropy_over_samples() -> None:
    spec = get_model_spec("vision")
    model = spec.build(VisionModelConfig(arch="cnn"), INFO10)
    batch = {"x": torch.randn(5, 3, 32, 32), "y": torch.tensor([0, 1, 2, 3, 9])}
    loss_sum, count = spec.loss(model, batch)
    assert int(count) == spec.count(batch) == 5
    assert loss_sum.item() == pytest.approx(5 * nn.functional.cross_entropy(model(batch["x"]), batch["y"]).item(),
                                            rel=1e-5)


# --- training -------------------------------------------------------------------------------------
TRAIN = {
    "cnn": ["experiment=cnn_images", "trainer.max_steps=120", "trainer.eval_every=0", "trainer.ckpt_every=0"],
    "resnet": ["experiment=resnet_images", "model.widths=[8,16,32]", "trainer.max_steps=80",
               "trainer.eval_every=0", "trainer.ckpt_every=0"],
}


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_trains_on_synthetic_images(tmp_path: Path, arch: str) -> None:
    cfg = compose(TRAIN[arch] + ["logger.progress=false", "logger.log_every=1"])
    last = run(cfg, tmp_path / "run")
    first_loss = read_metrics(tmp_path / "run")[0]["loss"]
    assert first_loss == pytest.approx(math.log(10), abs=0.3)  # starts at chance
    assert last["eval_loss"] < 0.5 * first_loss, (first_loss, last["eval_loss"])

    spec = get_model_spec(cfg.model.family)
    model = spec.load(cfg.model, None, tmp_path / "run" / "final").eval()
    val = build_data(cfg.data).split("val")
    batch = val.get(np.arange(len(val)))
    with torch.no_grad():
        acc = (model(batch["x"]).argmax(dim=1) == batch["y"]).float().mean().item()
    assert acc > 0.6, acc  # chance is 0.1
    assert 0.6 < last["accuracy"] <= 1 and abs(last["accuracy"] - acc) < 0.15, (last["accuracy"], acc)  # eval's


# --- data -----------------------------------------------------------------------------------------
def test_synthetic_images_are_seeded_normalised_batches() -> None:
    cfg = ImageDataConfig(n_train=300, n_val=50, num_classes=4, seed=3)
    a, b = ImageDataModule(cfg), ImageDataModule(cfg)
    assert a.info.task == "classification" and a.info.num_classes == 4 and a.info.image_shape == (3, 32, 32)
    assert (len(a.split("train")), len(a.split("val"))) == (300, 50)
    batch = a.split("train").get(np.arange(300))
    assert batch["x"].shape == (300, 3, 32, 32) and batch["x"].dtype == torch.float32
    assert batch["y"].shape == (300,) and batch["y"].dtype == torch.int64
    assert set(batch["y"].tolist()) == {0, 1, 2, 3}
    per_channel = batch["x"].transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(per_channel.std(1), torch.ones(3), atol=1e-3)
    assert torch.equal(batch["x"], b.split("train").get(np.arange(300))["x"])
    other = ImageDataModule(ImageDataConfig(n_train=300, n_val=50, num_classes=4, seed=4))
    assert not torch.equal(batch["x"], other.split("train").get(np.arange(300))["x"])


def _fake_cifar(root: Path, per_batch: int = 6, n_test: int = 5) -> tuple[Path, np.ndarray, np.ndarray,
                                                                            np.ndarray, np.ndarray]:
    """A cifar-10-python.tar.gz in the official layout and pickle format, with random contents."""
    g = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    blobs, xs, ys = {}, [], []
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        x = g.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = g.integers(0, 10, size=n).tolist()
        blobs[name] = {b"batch_label": name.encode(), b"labels": y, b"data": x,
                       b"filenames": [f"{i}.png".encode() for i in range(n)]}
        xs.append(x)
        ys.append(np.array(y))
    blobs["batches.meta"] = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, obj in blobs.items():
            raw = pickle.dumps(obj, protocol=2)
            ti = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            ti.size = len(raw)
            tar.addfile(ti, io.BytesIO(raw))
    return archive, np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


def test_cifar10_archive_and_extracted_dir(tmp_path: Path) -> None:
    archive, xt, yt, xv, yv = _fake_cifar(tmp_path)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    extracted = tmp_path / "extracted" / "cifar-10-batches-py"
    mods = [ImageDataModule(ImageDataConfig(path=str(p))) for p in (archive, extracted, extracted.parent)]
    dm = mods[0]
    assert dm.info.num_classes == 10 and dm.info.classes[3] == "class3"
    assert (len(dm.split("train")), len(dm.split("val"))) == (30, 5)
    train, val = dm.split("train").get(np.arange(30)), dm.split("val").get(np.arange(5))
    assert train["x"].shape == (30, 3, 32, 32) and train["x"].dtype == torch.float32
    assert train["y"].dtype == torch.int64
    assert train["y"].tolist() == yt.tolist() and val["y"].tolist() == yv.tolist()
    # un-normalise: the channel-major rows come back pixel for pixel (row[:1024] is the red plane)
    mean, std = torch.tensor(dm.mean).view(1, 3, 1, 1), torch.tensor(dm.std).view(1, 3, 1, 1)
    raw = (train["x"].double() * std + mean).round().numpy().astype(np.uint8)
    assert np.array_equal(raw, xt.reshape(30, 3, 32, 32))
    assert np.array_equal(raw[:, 0].reshape(30, -1), xt[:, :1024])
    raw_val = (val["x"].double() * std + mean).round().numpy().astype(np.uint8)
    assert np.array_equal(raw_val.reshape(5, -1), xv)
    # normalised with the train split's per-channel statistics
    per_channel = train["x"].double().transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4)
    assert np.allclose(dm.mean, xt.reshape(30, 3, -1).transpose(1, 0, 2).reshape(3, -1).mean(1))
    for other in mods[1:]:
        got = other.split("train").get(np.arange(30))
        assert torch.equal(got["x"], train["x"]) and torch.equal(got["y"], train["y"])


def test_cifar10_bad_paths_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere" / "cifar-10-python.tar.gz"
    with pytest.raises(ConfigError) as e:
        ImageDataModule(ImageDataConfig(path=str(missing)))
    assert e.value.key == "data.path" and str(missing) in e.value.message and "\n" not in str(e.value)

    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(ConfigError) as e:
        ImageDataModule(ImageDataConfig(path=str(junk)))
    assert e.value.key == "data.path"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as e:
        ImageDataModule(ImageDataConfig(path=str(empty)))
    assert e.value.key == "data.path" and "data_batch_1" in e.value.message

    # through the entry point: exit 2 and one line on stderr
    cfg = compose(["experiment=cnn_images", f"data.path={missing}", "logger.progress=false"])
    with pytest.raises(SystemExit) as ex:
        run(cfg, tmp_path / "run")
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmtrain: error: data.path:")

"""MONAI bundle training: train.json end to end, resume, best/atomic checkpoints, multi-GPU
(2 gloo processes), quick override, metadata schema, verify_net_in_out and TorchScript export.

Configs run on tiny real data (18 LC25000 lung tiles, 3 classes) with a 1-block network at
32x32 pixels, so each training run takes seconds on a 2-core CPU.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import monai.bundle
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

import equivit_plugin.bundle.training as training
from equivit_plugin.bundle.training import (
    BestCheckpointSaver,
    MetricsJSONWriter,
    TrainingStateSaver,
    adamw_param_groups,
    resolve_resume,
    warmup_cosine_schedule,
)
from equivit_plugin.models import create_model, load_checkpoint, load_model
from equivit_plugin.networks import create_network

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "monai_bundle"
CONFIGS = BUNDLE / "configs"
TRAIN = CONFIGS / "train.json"
MULTI_GPU = CONFIGS / "multi_gpu_train.json"
QUICK = CONFIGS / "quick_train.json"
META = CONFIGS / "metadata.json"
SCHEMA = BUNDLE / "schema" / "metadata_schema.json"
LUNG = ["lung_aca", "lung_n", "lung_scc"]
NAME = "equivit_disc_tiny_patch16_224"  # train.json's default network
TILES_PER_CLASS = 6
# 6 tiles per class, val_fraction 0.34: 2 per class held out -> 12 train, 6 val tiles.
TINY: dict[str, Any] = {"img_size": 32, "network_def#depth": 1, "model_kwargs#depth": 1,
                        "batch_size": 4, "num_workers": 0, "val_fraction": 0.34, "max_epochs": 1}
ITERS_PER_EPOCH = 3  # 12 training tiles / batch 4

pytestmark = pytest.mark.filterwarnings(
    "ignore:parsing config_file", "ignore:.*tile is 224x224", "ignore:NvImgCodec",
    "ignore:Logging file is set to False",
    # MONAI >= 1.4 renames optional_packages_version to required_packages_version when it parses
    # metadata; metadata.json keeps both keys identical so nothing is lost (see the test below).
    "ignore:Detected deprecated name 'optional_packages_version'",
)


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def tiny_data(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 real lung tiles: the first 6 of each LC25000 class, copied into a class-per-folder set."""
    root = tmp_path_factory.mktemp("lung_tiny")
    for name in LUNG:
        files = sorted((shared_data / "lc25000_lung_train" / name).glob("*.jpeg"))
        assert len(files) >= TILES_PER_CLASS, f"too few tiles in {name}"
        (root / name).mkdir()
        for f in files[:TILES_PER_CLASS]:
            shutil.copy(f, root / name / f.name)
    return root


def _run(configs: list[Path], **override: Any) -> None:
    """``monai.bundle.run`` in this process with the bundle's metadata and no logging config."""
    monai.bundle.run(config_file=[str(c) for c in configs], meta_file=str(META),
                     logging_file=False, **override)


def _train(root: Path, data: Path, **override: Any) -> None:
    _run([TRAIN], bundle_root=str(root), dataset_dir=str(data), **{**TINY, **override})


def _metrics(root: Path) -> list[dict[str, Any]]:
    return json.loads((root / "logs" / "train_metrics.json").read_text())["epochs"]


def _error_chain(error: BaseException) -> str:
    """All messages of an exception and its causes (MONAI wraps instantiation errors)."""
    messages = []
    seen: BaseException | None = error
    while seen is not None:
        messages.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    return "\n".join(messages)


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle root after one epoch of train.json on the tiny data."""
    root = tmp_path_factory.mktemp("trained")
    old = os.umask(0o022)  # so that owner-only (0600) temporary files would show
    try:
        _train(root, tiny_data)
    finally:
        os.umask(old)
    return root


def _tiny_net() -> torch.nn.Module:
    return create_network(NAME, num_classes=3, img_size=32, depth=1)


def _fake_evaluator(values: list[float], net: torch.nn.Module) -> Engine:
    """An ignite engine whose epoch ``e`` reports ``val_acc = values[e - 1]`` and sets the head
    bias of ``net`` to ``e`` (so a saved file tells which epoch's weights it holds)."""
    engine = Engine(lambda _engine, _batch: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _report(e: Engine) -> None:
        e.state.metrics["val_acc"] = values[e.state.epoch - 1]
        with torch.no_grad():
            net.head.bias.fill_(float(e.state.epoch))

    return engine


# ----------------------------------------------------------------------- configs: end to end


def _documented_defaults() -> dict[str, str]:
    """``{key: default}`` from the key table of ``monai_bundle/docs/README.md`` (cells like
    ``| `max_epochs`, `batch_size` | `10`, `64` | ... |``)."""
    import re

    lines = (BUNDLE / "docs" / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| key | default |"))
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        keys, values = re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([^`]+)`", cells[1])
        if len(keys) == len(values):
            table.update(zip(keys, values))
    return table


def test_documented_defaults_are_the_config_values() -> None:
    train = json.loads(TRAIN.read_text())
    documented = _documented_defaults()
    checked = 0
    for key, text in documented.items():
        value = train[key]
        if isinstance(value, (dict, list)) or (isinstance(value, str) and value[:1] in "$@"):
            continue  # an expression, documented in words
        try:
            expected = json.loads(text)
        except json.JSONDecodeError:
            expected = text
        assert value == expected, f"train.json {key}={value!r}, docs say {text}"
        checked += 1
    assert checked >= 15 and {"max_epochs", "batch_size", "network_name", "tile_fit"} <= \
        set(documented)


def test_train_config_builds_what_its_values_say(tiny_data: Path) -> None:
    """train.json's values drive the network: name, classes from the folders, input size, and
    model_kwargs rebuild the same architecture (what model.pt is loaded with)."""
    parser = ConfigParser(json.loads(TRAIN.read_text()))
    parser.update({"dataset_dir": str(tiny_data), "img_size": 32, "network_def#depth": 1,
                   "model_kwargs#depth": 1})
    assert "$import equivit_plugin.networks" in parser["imports"]  # MONAI door, imported
    net = parser.get_parsed_content("network_def")
    assert net.default_cfg["architecture"] == parser["network_name"]
    assert parser.get_parsed_content("class_names") == LUNG
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, len(LUNG))
    rebuilt = create_model(parser["network_name"], **parser.get_parsed_content("model_kwargs"))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in net.state_dict().items()}
    assert parser.get_parsed_content("device").type == ("cuda" if torch.cuda.is_available()
                                                         else "cpu")
    assert parser.get_parsed_content("amp") is torch.cuda.is_available()
    fit = parser["tile_fit"]
    for part in ("train", "validate"):
        assert parser.get_parsed_content(f"{part}#preprocessing#fit") == fit
    # The multi-GPU file only overrides: it must not replace train.json's imports.
    multi = json.loads(MULTI_GPU.read_text())
    assert {"initialize", "finalize", "network", "device"} <= set(multi)
    assert "imports" not in multi, "overriding imports would drop train.json's"
    # TensorBoard handlers are switched off exactly when tensorboard is not installed.
    try:
        importlib.import_module("torch.utils.tensorboard")
        installed = True
    except ImportError:
        installed = False
    assert parser.get_parsed_content("use_tensorboard") is installed


def test_train_writes_self_describing_checkpoint_and_metrics(trained: Path) -> None:
    model, loaded = load_model(trained / "models" / "model.pt", require_class_names=True)
    info = {**loaded.extra, "class_names": list(loaded.class_names or []),
            "model_name": loaded.name, "model_kwargs": dict(loaded.model_kwargs)}
    assert info["class_names"] == LUNG and info["model_name"] == NAME
    assert info["model_kwargs"] == {"num_classes": 3, "img_size": 32, "depth": 1}
    assert info["epoch"] == 1 and 0.0 <= info["metrics"]["val_acc"] <= 1.0
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)

    (record,) = _metrics(trained)
    assert record["epoch"] == 1 and record["iteration"] == ITERS_PER_EPOCH
    assert math.isfinite(record["train_loss"]) and record["lr"] > 0 and record["time_s"] > 0
    assert record["val_acc"] == pytest.approx(info["metrics"]["val_acc"])
    assert record["best_val_acc"] == record["val_acc"] and "train_acc" in record

    state = torch.load(trained / "models" / "checkpoint_last.pt", weights_only=True)
    assert set(state) == {"network", "optimizer", "lr_scheduler", "best", "metrics", "trainer"}
    assert state["trainer"]["iteration"] == ITERS_PER_EPOCH
    assert not [p for p in (trained / "models").iterdir() if p.name.endswith(".tmp")]
    events = list((trained / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events), "no TensorBoard events written"
    # Every file has the permissions open() gives (written under umask 022 by the fixture),
    # not mkstemp's owner-only 0600.
    modes = {p.relative_to(trained).as_posix(): oct(p.stat().st_mode & 0o777)
             for p in trained.rglob("*") if p.is_file()}
    assert len(modes) >= 4 and set(modes.values()) == {oct(0o644)}, modes


def test_resume_continues_from_the_saved_epoch(trained: Path, tiny_data: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "bundle"
    shutil.copytree(trained, root)
    first = _metrics(root)
    started: list[int] = []
    original = MetricsJSONWriter._epoch_started

    def spy(self: MetricsJSONWriter, engine: Engine) -> None:
        started.append(engine.state.epoch)
        original(self, engine)

    monkeypatch.setattr(MetricsJSONWriter, "_epoch_started", spy)
    _train(root, tiny_data, max_epochs=2, resume=True)

    assert started == [2], "resume must run only the epochs after the saved one"
    history = _metrics(root)
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[0] == first[0], "the epoch-1 record must be the restored one"
    assert history[1]["iteration"] == 2 * ITERS_PER_EPOCH
    state = torch.load(root / "models" / "checkpoint_last.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 * ITERS_PER_EPOCH
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {2 * ITERS_PER_EPOCH}, "optimizer state must continue, not restart"
    assert state["lr_scheduler"]["last_epoch"] == 2 * ITERS_PER_EPOCH
    # model.pt only moves on if epoch 2 beat epoch 1.
    saved = load_checkpoint(root / "models" / "model.pt")
    improved = history[1]["val_acc"] > history[0]["val_acc"]
    assert saved["epoch"] == (2 if improved else 1)


def test_resume_without_a_state_file_is_a_clear_error(tmp_path: Path) -> None:
    assert resolve_resume(False, "x") == "" and resolve_resume("false", "x") == ""
    assert resolve_resume(None, "x") == "" and resolve_resume("", "x") == ""
    state = tmp_path / "state.pt"
    with pytest.raises(FileNotFoundError, match="no training state at .*state.pt"):
        resolve_resume(True, str(state))
    state.write_bytes(b"x")
    assert resolve_resume(True, str(state)) == str(state)
    assert resolve_resume("true", str(state)) == str(state)
    assert resolve_resume(str(state), "elsewhere") == str(state)


def test_dataset_with_one_class_fails_with_a_clear_message(tiny_data: Path,
                                                           tmp_path: Path) -> None:
    data = tmp_path / "one_class"
    shutil.copytree(tiny_data / "lung_aca", data / "lung_aca")
    with pytest.raises(Exception) as error:  # noqa: PT011  (MONAI wraps the ValueError)
        _train(tmp_path / "bundle", data)
    assert "a classifier needs at least 2 classes, found ['lung_aca']" in _error_chain(error.value)
    assert not (tmp_path / "bundle" / "models" / "model.pt").exists()


def test_quick_override_parses_and_starts(shared_data: Path, tmp_path: Path) -> None:
    parser = ConfigParser()
    parser.read_config([str(TRAIN), str(QUICK)])
    parser["bundle_root"] = str(BUNDLE)
    dataset = Path(parser.get_parsed_content("dataset_dir")).resolve()
    assert dataset == (REPO_ROOT.parent / "shared" / "data" / "lc25000_lung_train").resolve()
    parser["dataset_dir"] = str(shared_data / "lc25000_lung_train")
    assert parser.get_parsed_content("class_names") == LUNG
    quick = json.loads(QUICK.read_text())
    assert parser["network_name"] == quick["network_name"]
    assert parser["img_size"] == quick["img_size"]
    # Start it: one training and one validation iteration of the real network on the real data,
    # writing outside the repository.
    _run([TRAIN, QUICK], bundle_root=str(BUNDLE), dataset_dir=parser["dataset_dir"], max_epochs=1,
         epoch_length=1, val_epoch_length=1, batch_size=8, cache_rate=0.0,
         ckpt_path=str(tmp_path / "model.pt"), state_path=str(tmp_path / "last.pt"),
         output_dir=str(tmp_path / "logs"))
    _, info = load_model(tmp_path / "model.pt")
    assert list(info.class_names or []) == LUNG and info.img_size == quick["img_size"]
    assert info.name == quick["network_name"]


# ------------------------------------------------------------------------- handlers (units)


def test_best_checkpoint_only_changes_when_val_accuracy_improves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = _tiny_net()
    path = tmp_path / "model.pt"
    saver = BestCheckpointSaver(path, net, NAME, LUNG, {"img_size": 32, "depth": 1})
    saves: list[int] = []
    real_save = training.save_checkpoint

    def recording_save(*args: Any, **kwargs: Any) -> Path:
        saves.append(kwargs["epoch"])
        return real_save(*args, **kwargs)

    monkeypatch.setattr(training, "save_checkpoint", recording_save)
    values = [math.nan, 0.5, 0.5, 0.4, 0.75, 0.6]
    engine = _fake_evaluator(values, net)
    saver.attach(engine)
    engine.run([0], max_epochs=len(values))

    assert saves == [2, 5], "NaN, ties and worse values must not overwrite the best model"
    model, info = load_model(path)
    assert info.extra["epoch"] == 5 and info.extra["metrics"] == {"val_acc": 0.75}
    assert torch.all(model.head.bias == 5.0), "model.pt must hold the epoch-5 weights"
    assert saver.state_dict()["best_metric"] == 0.75 and saver.best_epoch == 5


def test_best_saver_state_survives_a_restart(tmp_path: Path) -> None:
    net = _tiny_net()
    first = BestCheckpointSaver(tmp_path / "m.pt", net, NAME, LUNG, {"img_size": 32, "depth": 1})
    engine = _fake_evaluator([0.8], net)
    first.attach(engine)
    engine.run([0], max_epochs=1)

    again = BestCheckpointSaver(tmp_path / "m.pt", net, NAME, LUNG, {"img_size": 32, "depth": 1})
    again.load_state_dict(copy.deepcopy(first.state_dict()))
    engine = _fake_evaluator([0.7, 0.9], net)
    again.attach(engine)
    engine.run([0], max_epochs=2)  # epoch 1 (0.7) is worse than the restored 0.8; epoch 2 wins
    assert load_checkpoint(tmp_path / "m.pt")["epoch"] == 2


def test_disabled_best_saver_tracks_but_never_writes(tmp_path: Path) -> None:
    net = _tiny_net()
    saver = BestCheckpointSaver(tmp_path / "m.pt", net, NAME, LUNG, {"img_size": 32},
                                enabled=False)
    engine = _fake_evaluator([0.3, 0.6], net)
    saver.attach(engine)
    engine.run([0], max_epochs=2)
    assert not (tmp_path / "m.pt").exists() and saver.best_metric == 0.6


def test_architecture_missing_from_model_kwargs_fails_before_training(tmp_path: Path) -> None:
    net = _tiny_net()  # depth 1, but model_kwargs says nothing about depth
    saver = BestCheckpointSaver(tmp_path / "m.pt", net, NAME, LUNG, {"img_size": 32})
    engine = _fake_evaluator([0.5], net)
    saver.attach(engine)
    with pytest.raises(ValueError, match="give every architecture argument of network_def"):
        engine.run([0], max_epochs=1)
    assert not (tmp_path / "m.pt").exists()


def _failing_torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    if isinstance(f, (str, os.PathLike)):
        Path(f).write_bytes(b"half a checkpoint")
    else:
        f.write(b"half a checkpoint")
    raise OSError("disk full")


def test_a_crash_while_saving_never_truncates_model_pt(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    net = _tiny_net()
    path = tmp_path / "model.pt"
    saver = BestCheckpointSaver(path, net, NAME, LUNG, {"img_size": 32, "depth": 1})
    engine = _fake_evaluator([0.5, 0.9], net)
    saver.attach(engine)

    @engine.on(Events.EPOCH_COMPLETED(once=1))
    def _break_torch_save(_engine: Engine) -> None:  # runs after the saver wrote epoch 1
        monkeypatch.setattr(torch, "save", _failing_torch_save)

    with pytest.raises(OSError, match="disk full"):
        engine.run([0], max_epochs=2)
    monkeypatch.undo()
    model, info = load_model(path)
    assert info.extra["epoch"] == 1 and torch.all(model.head.bias == 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"], "temporary file left"
    assert saver.best_epoch == 1, "a failed save must not count as the best"


def test_a_crash_while_saving_keeps_the_training_state_and_metrics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = _tiny_net()
    optimizer = torch.optim.AdamW(adamw_param_groups(net, 0.05), lr=1e-3)
    state_saver = TrainingStateSaver(tmp_path / "last.pt", {"network": net,
                                                             "optimizer": optimizer})
    writer = MetricsJSONWriter(tmp_path / "metrics.json", loss_transform=lambda _: 1.0)
    engine = Engine(lambda _engine, _batch: None)
    writer.attach(engine)
    state_saver.attach(engine)
    engine.run([0, 1], max_epochs=1)
    before_state = (tmp_path / "last.pt").read_bytes()
    before_json = (tmp_path / "metrics.json").read_text()

    monkeypatch.setattr(torch, "save", _failing_torch_save)
    with pytest.raises(OSError, match="disk full"):
        state_saver(engine)

    def failing_write(self: Path, text: str, *_args: Any, **_kwargs: Any) -> int:
        with open(self, "w") as handle:
            handle.write(text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", failing_write)
    with pytest.raises(OSError, match="disk full"):
        writer(engine)  # the handler's own rewrite of the metrics file
    monkeypatch.undo()
    assert (tmp_path / "last.pt").read_bytes() == before_state
    assert (tmp_path / "metrics.json").read_text() == before_json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.json"]
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 and set(state) == {"network", "optimizer",
                                                                 "trainer"}


def test_warmup_cosine_schedule_and_param_groups() -> None:
    net = _tiny_net()
    groups = adamw_param_groups(net, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in net.named_parameters() if id(p) in decayed}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert "blocks.0.attn.qkv.weight" in names
    assert not {"cls_token", "blocks.0.attn.qkv.bias", "norm.weight"} & names
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))

    optimizer = torch.optim.AdamW(groups, lr=1.0)
    schedule = warmup_cosine_schedule(optimizer, total_steps=10, warmup_steps=2,
                                      min_lr_ratio=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])), "cosine part must not increase"
    with pytest.raises(ValueError, match="warmup_steps <= total_steps"):
        warmup_cosine_schedule(optimizer, total_steps=2, warmup_steps=3)


# ------------------------------------------------------------------------------- multi-GPU


def test_multi_gpu_config_with_two_gloo_processes(tiny_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "bundle"
    # Per-rank output paths prove which ranks write; "finalize" records what each rank saw.
    probe = {
        "ckpt_path": "$@bundle_root + '/models/model_rank%d.pt' % dist.get_rank()",
        "state_path": "$@bundle_root + '/models/last_rank%d.pt' % dist.get_rank()",
        "metrics_path": "$@bundle_root + '/logs/metrics_rank%d.json' % dist.get_rank()",
        "finalize": [
            "$equivit_plugin.utils.atomic.atomic_write_json({"
            "'rank': dist.get_rank(), 'world': dist.get_world_size(),"
            "'network': type(@network).__name__,"
            "'train_sampler_used': @train#dataloader.sampler is @train#sampler,"
            "'val_sampler_used': @validate#dataloader.sampler is @validate#sampler,"
            "'train': [@train#dataset.data[i]['image'] for i in @train#sampler],"
            "'val': [@validate#dataset.data[i]['image'] for i in @validate#sampler],"
            "'train_handlers': [type(h).__name__ for h in @train#handlers],"
            "'val_handlers': [type(h).__name__ for h in @validate#handlers],"
            "'best_saver_enabled': @validate#best_saver.enabled,"
            "'metrics_writer_enabled': @train#metrics_writer.enabled,"
            "'param_sum': float(sum(p.double().sum() for p in @network_def.parameters())),"
            "}, @bundle_root + '/rank%d.json' % dist.get_rank())",
            "$dist.is_initialized() and dist.destroy_process_group()",
        ],
    }
    probe_file = tmp_path / "probe.json"
    probe_file.write_text(json.dumps(probe))
    overrides = {**TINY, "bundle_root": str(root), "dataset_dir": str(tiny_data)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "monai.bundle", "run", "--config_file",
               str([str(TRAIN), str(MULTI_GPU), str(probe_file)])]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=BUNDLE, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Setting logging properties based on config" in result.stdout + result.stderr

    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}
    assert {r["network"] for r in ranks} == {"DistributedDataParallel"}
    assert all(r["train_sampler_used"] and r["val_sampler_used"] for r in ranks)
    for part, total in (("train", 12), ("val", 6)):
        shares = [set(r[part]) for r in ranks]
        assert len(shares[0]) == len(shares[1]) == total // 2, part
        assert not shares[0] & shares[1], f"{part} shares of the two ranks overlap"
        assert len(shares[0] | shares[1]) == total
    assert ranks[0]["param_sum"] == pytest.approx(ranks[1]["param_sum"], rel=1e-9), \
        "DDP must keep the weights identical on both ranks"

    # Only rank 0 logs and writes.
    assert {"StatsHandler", "TrainingStateSaver"} <= set(ranks[0]["train_handlers"])
    assert {"StatsHandler", "TrainingStateSaver"}.isdisjoint(ranks[1]["train_handlers"])
    assert "StatsHandler" in ranks[0]["val_handlers"]
    assert "StatsHandler" not in ranks[1]["val_handlers"]
    assert ranks[0]["best_saver_enabled"] and not ranks[1]["best_saver_enabled"]
    assert ranks[0]["metrics_writer_enabled"] and not ranks[1]["metrics_writer_enabled"]
    written = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                     if p.is_file() and not p.name.startswith("rank"))
    events = [name for name in written if name.startswith("logs/tensorboard/")]
    # events.out.tfevents.<time>.<host>.<pid>.<n>: one writer per handler, all in one process.
    writers = {name.split(".")[-2] for name in events}
    assert events and len(writers) == 1, f"TensorBoard must be written by rank 0 only: {events}"
    assert sorted(set(written) - set(events)) == ["logs/metrics_rank0.json",
                                                  "models/last_rank0.pt", "models/model_rank0.pt"]
    _, info = load_model(root / "models" / "model_rank0.pt")
    assert list(info.class_names or []) == LUNG
    (record,) = json.loads((root / "logs" / "metrics_rank0.json").read_text())["epochs"]
    assert record["iteration"] == 2  # 6 training tiles per rank, batch 4


# ------------------------------------------------------------- metadata, verify and export


def test_verify_metadata_offline_with_the_repository_schema(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    import monai.apps.utils

    def no_network(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("verify_metadata tried to download the schema")

    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    monkeypatch.setattr(monai.apps.utils, "urlretrieve", no_network, raising=False)
    before = SCHEMA.read_bytes()
    monai.bundle.verify_metadata(meta_file=str(META), filepath=str(SCHEMA))
    assert SCHEMA.read_bytes() == before

    meta = json.loads(META.read_text())
    assert meta["version"] in meta["changelog"]
    import equivit_plugin

    assert meta["required_packages_version"]["equivit-plugin"] == equivit_plugin.__version__
    assert {"equivit-plugin", "timm"} <= set(meta["required_packages_version"])
    # MONAI's parser replaces required_packages_version by optional_packages_version when both
    # exist, so they must be the same for the parsed (and exported) metadata to keep them.
    assert meta["optional_packages_version"] == meta["required_packages_version"]
    parser = ConfigParser()
    parser.read_meta(str(META))
    assert parser["_meta_"]["required_packages_version"] == meta["required_packages_version"]
    for tensor in (meta["network_data_format"]["inputs"]["image"],
                   meta["network_data_format"]["outputs"]["pred"]):
        assert tensor["num_channels"] == len(tensor["channel_def"])
    assert list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == LUNG

    # The schema must be able to fail: a missing mandatory key and a malformed tensor spec.
    for broken in ({k: v for k, v in meta.items() if k != "authors"},
                   {**meta, "network_data_format": {
                       "inputs": {"image": {**meta["network_data_format"]["inputs"]["image"],
                                            "num_channels": "3"}},
                       "outputs": meta["network_data_format"]["outputs"]}}):
        path = tmp_path / "metadata.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match="Failed validating"):
            monai.bundle.verify_metadata(meta_file=str(path), filepath=str(SCHEMA))


def test_verify_net_in_out(tiny_data: Path, tmp_path: Path) -> None:
    small = {"dataset_dir": str(tiny_data), "network_def#depth": 1}
    monai.bundle.verify_net_in_out(net_id="network_def", meta_file=str(META),
                                   config_file=str(TRAIN), device="cpu", **small)
    two_classes = tmp_path / "two"
    for name in LUNG[:2]:
        shutil.copytree(tiny_data / name, two_classes / name)
    with pytest.raises(ValueError, match="output channel number `2` doesn't match"):
        monai.bundle.verify_net_in_out(net_id="network_def", meta_file=str(META),
                                       config_file=str(TRAIN), device="cpu",
                                       **{**small, "dataset_dir": str(two_classes)})


def test_ckpt_export_torchscript_matches_the_checkpoint(trained: Path, tiny_data: Path,
                                                        tmp_path: Path) -> None:
    exported = tmp_path / "model.ts"
    command = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
               "--filepath", str(exported), "--ckpt_file", str(trained / "models" / "model.pt"),
               "--meta_file", "configs/metadata.json", "--config_file", "configs/train.json",
               "--key_in_ckpt", "model", "--use_trace", "True",
               "--input_shape", "[1, 3, 32, 32]",
               "--class_names", "['lung_aca', 'lung_n', 'lung_scc']",
               "--img_size", "32", "--network_def#depth", "1"]
    result = subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    extra = {"metadata.json": "", "train.json": ""}
    scripted = torch.jit.load(str(exported), map_location="cpu", _extra_files=extra)
    exported_meta = json.loads(extra["metadata.json"])
    assert exported_meta["version"] == json.loads(META.read_text())["version"]
    assert "equivit-plugin" in exported_meta["required_packages_version"]
    assert json.loads(extra["train.json"])["network_name"] == NAME
    model, _ = load_model(trained / "models" / "model.pt")
    images = torch.stack([d["image"] for d in _tiles(tiny_data)])
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), model(images), rtol=1e-5, atol=1e-5)
        noise = torch.randn(3, 3, 32, 32)
        torch.testing.assert_close(scripted(noise), model(noise), rtol=1e-5, atol=1e-5)


def _tiles(data: Path) -> list[dict[str, Any]]:
    """Every tiny-data tile through the bundle's own validation transforms, at 32 pixels."""
    from equivit_plugin.bundle.data import discover_tiles, tile_transforms

    transform = tile_transforms(img_size=32)
    return [transform(item) for item in discover_tiles(str(data))]


def test_train_json_any_angle_augmentation_with_the_robust_variant(tiny_data: Path,
                                                                   tmp_path: Path) -> None:
    """train.json with ``--augment any_angle`` and ``equivit_ric``: the checkpoint rebuilds the
    conv-stem model, which is invariant to the 8 rotations/flips."""
    from equivit_plugin.bundle.data import tile_transforms

    _train(tmp_path, tiny_data, network_name="equivit_ric_tiny_patch16_224",
           augment="any_angle", max_shift=4)
    net, info = load_model(tmp_path / "models" / "model.pt")
    assert info.name == "equivit_ric_tiny_patch16_224" and len(net.blocks) == 1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for k in (1, 2, 3):
            assert torch.allclose(net(torch.rot90(x, k, (-2, -1))), net(x), atol=1e-5)
    # The augmentation draws a new angle and shift per call; "none" is deterministic.
    item = {"image": str(sorted((tiny_data / "lung_n").glob("*.jpeg"))[0])}
    augment = tile_transforms(32, "any_angle")
    augment.set_random_state(0)
    first, second = augment(dict(item))["image"], augment(dict(item))["image"]
    plain = tile_transforms(32, "none")(dict(item))["image"]
    assert first.shape == plain.shape == (3, 32, 32)
    assert (first - second).abs().max() > 0.1 and (first - plain).abs().max() > 0.1
    with pytest.raises(ValueError, match="augment must be one of"):
        tile_transforms(32, "rotate")

"""FSDP2 (models.parallel): the meta-device build, sharding and rank-0 loading, activation
checkpointing, gradient clipping by global norm, and the global batch -- each checked against one
unsharded process on CPU (2 processes, gloo)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from itertools import chain
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities import GradClipAlgorithmType
from safetensors.torch import load_file, save_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, CheckpointWrapper

from run.cli import compose_config
from models.config import ModelConfig
from models.factory import build_model
from models.lit_module import LumenLitModule as LumenModule
from models.parallel import accumulation, clip_grad_norm
from run.tiny_base import ensure_tiny_base
from tests.helpers import PLAIN, TINY_LLM, WORLD_SUBJECTS, assert_same_up_to_summation_order, model_inputs, model_labels
from run.train import accumulate_grad_batches, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TOWER = {"type": "hf", "layer": -1}  # both layers of the tiny tower: two vision blocks
MAX_NORM = 0.5  # below the tiny model's first gradient norm (~5), so clipping acts


# --- the global batch --------------------------------------------------------------------------------


@pytest.mark.parametrize(("global_batch_size", "micro_batch_size", "world_size", "steps"),
                         [(128, 4, 4, 8), (128, 4, 32, 1), (8, 2, 2, 2), (None, 4, 4, 1)])
def test_accumulation_is_the_global_batch_over_micro_batch_times_processes(global_batch_size, micro_batch_size,
                                                                           world_size, steps):
    assert accumulation(global_batch_size, micro_batch_size, world_size) == steps


@pytest.mark.parametrize(("global_batch_size", "micro_batch_size", "world_size"), [(130, 4, 4), (8, 4, 4), (0, 1, 1)])
def test_a_global_batch_that_does_not_divide_names_the_keys_and_the_numbers(global_batch_size, micro_batch_size,
                                                                            world_size):
    per_step = micro_batch_size * world_size
    with pytest.raises(ValueError, match=rf"data.global_batch_size={global_batch_size} is not a positive multiple of "
                                         rf"data.batch_size={micro_batch_size} x world size {world_size} .* = {per_step}"):
        accumulation(global_batch_size, micro_batch_size, world_size)


def test_lumen_on_four_gpus_accumulates_eight_micro_batches_of_four():
    cfg = compose_config("train", ["experiment=lumen", "trainer.devices=4"])
    assert (cfg.data.global_batch_size, cfg.data.batch_size) == (128, 4)
    assert "accumulate_grad_batches" not in cfg.trainer  # derived, not written down
    assert accumulate_grad_batches(cfg, world_size=cfg.trainer.devices * cfg.trainer.get("num_nodes", 1)) == 8


def test_the_demo_has_no_global_batch_and_does_not_accumulate():
    cfg = compose_config("train", [])
    assert cfg.data.global_batch_size is None
    assert accumulate_grad_batches(cfg, world_size=1) == 1


def test_an_explicit_accumulation_that_contradicts_the_global_batch_is_refused():
    cfg = compose_config("train", ["experiment=lumen", "+trainer.accumulate_grad_batches=4"])
    with pytest.raises(ValueError, match=r"trainer.accumulate_grad_batches=4 conflicts with data.global_batch_size=128, "
                                         r"which with data.batch_size=4 on 4 processes means 8"):
        accumulate_grad_batches(cfg, world_size=4)


def test_an_explicit_accumulation_without_a_global_batch_is_kept():
    cfg = compose_config("train", ["+trainer.accumulate_grad_batches=3"])
    assert accumulate_grad_batches(cfg, world_size=2) == 3


# --- the meta-device build ---------------------------------------------------------------------------


def test_the_meta_build_reads_no_weights_and_matches_the_loaded_architecture(tiny_base, tmp_path):
    configs_only = tmp_path / "base"
    shutil.copytree(tiny_base, configs_only, ignore=shutil.ignore_patterns("*.safetensors"))
    with torch.device("meta"):
        skeleton = build_model(ModelConfig(base=str(configs_only), vision=TOWER, tune_vision=False), weights=False)
    loaded = build_model(ModelConfig(base=str(tiny_base), vision=TOWER, tune_vision=False))
    assert all(tensor.is_meta for tensor in chain(skeleton.parameters(), skeleton.buffers()))
    described = [{name: (tuple(p.shape), p.dtype, p.requires_grad) for name, p in model.named_parameters()}
                 for model in (skeleton, loaded)]
    assert described[0] == described[1]


# --- activation checkpointing in one process ---------------------------------------------------------


def forward_calls_per_step(module: LumenModule) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients and how often the first decoder layer started its forward in one training step
    (a forward hook would miss a recomputation, which stops once it has what the backward needs)."""
    model = module.model
    layer = model.llm.model.layers[0]
    layer = layer._checkpoint_wrapped_module if isinstance(layer, CheckpointWrapper) else layer
    calls = []
    hook = layer.register_forward_pre_hook(lambda *_: calls.append(1))
    batch = model_inputs(model)
    loss = model(**batch, labels=model_labels(model, batch)).loss
    loss.backward()
    hook.remove()
    gradients = {name: p.grad for name, p in module.state_dict(keep_vars=True).items() if getattr(p, "grad", None) is not None}
    return loss.detach(), gradients, len(calls)


def test_gradient_checkpointing_wraps_each_block_once_and_keeps_loss_and_gradients(tiny_base):
    results = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = LumenModule(net={"base": str(tiny_base), "vision": TOWER, "gradient_checkpointing": checkpointing},
                             optimizer={}, scheduler={})
        module.configure_model()
        results[checkpointing] = forward_calls_per_step(module)
    wrappers = [m for m in module.model.modules() if isinstance(m, CheckpointWrapper)]
    assert len(wrappers) == len(module.model.vision.blocks) + len(module.model.llm.model.layers) == 4
    assert {wrapper.checkpoint_impl for wrapper in wrappers} == {CheckpointImpl.NO_REENTRANT}
    # One mechanism: no module has Hugging Face's (or timm's) own checkpointing switched on.
    assert not [name for name, m in module.model.named_modules()
                if getattr(m, "gradient_checkpointing", False) or getattr(m, "grad_checkpointing", False)]
    assert (results[False][2], results[True][2]) == (1, 2)  # the forward, then its recomputation in the backward
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    assert_same_up_to_summation_order(results[True][1], results[False][1])


def test_clipping_by_norm_returns_the_norm_before_clipping_and_scales_to_the_limit(tiny_base):
    model = build_model(ModelConfig(base=str(tiny_base), vision=TOWER)).train()
    batch = model_inputs(model)
    model(**batch, labels=model_labels(model, batch)).loss.backward()
    parameters = [p for p in model.parameters() if p.requires_grad]
    expected = torch.cat([p.grad.flatten() for p in parameters]).norm()
    assert clip_grad_norm(parameters, None) == pytest.approx(float(expected), rel=1e-5)  # measuring changes nothing
    assert clip_grad_norm(parameters, MAX_NORM) == pytest.approx(float(expected), rel=1e-5)
    assert float(torch.cat([p.grad.flatten() for p in parameters]).norm()) == pytest.approx(MAX_NORM, rel=1e-5)


def test_one_process_lets_the_fusion_skip_absent_priors_and_several_do_not(tiny_base):
    """Processes that reduce gradients together must agree on every step's graph (TemporalFusion)."""
    module = LumenModule(net={"base": str(tiny_base), "vision": TOWER}, optimizer={}, scheduler={})
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    module.configure_model()
    assert module.model.fusion.every_parameter_every_step is False
    alone = LumenModule(net={"base": str(tiny_base), "vision": TOWER}, optimizer={}, scheduler={})
    alone.configure_model()  # no trainer: nothing says it is alone
    assert alone.model.fusion.every_parameter_every_step is True


def test_clipping_by_value_is_refused_naming_the_key(tiny_base):
    module = LumenModule(net={"base": str(tiny_base), "vision": TOWER}, optimizer={}, scheduler={})
    module.configure_model()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="trainer.gradient_clip_algorithm=value: lumen clips by global norm"):
        module.configure_gradient_clipping(optimizer, 1.0, GradClipAlgorithmType.VALUE)


# --- FSDP2 in two processes against one --------------------------------------------------------------


CASES = {
    "plain": {},
    "checkpointed_frozen_tower": {"gradient_checkpointing": True, "tune_vision": False},
    "tied_embeddings": {},  # on a base whose LLM ties its LM head to the token embeddings
    # On a tiny ResNet base (the demo's kind): a convnet whose stages are FSDP units, its batch norms their own.
    "resnet_tower": {"gradient_checkpointing": True, "tune_vision": True},
}
# Run by the worker but not compared with one process: the ResNet case with bfloat16 compute.
BFLOAT16 = {"resnet_bfloat16": {"tune_vision": True}}


def tied_base(tiny_base: Path, out: Path) -> Path:
    """The tiny base with tied embeddings, saved as Hugging Face saves such a model (no lm_head.weight)."""
    shutil.copytree(tiny_base, out)
    config = json.loads((out / "llm" / "config.json").read_text())
    (out / "llm" / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    weights = load_file(out / "llm" / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, out / "llm" / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def nets(world, tiny_base, tmp_path_factory) -> dict[str, dict]:
    tied = tied_base(tiny_base, tmp_path_factory.mktemp("tied") / "base")
    resnet = ensure_tiny_base(tmp_path_factory.mktemp("resnet") / "base", world, llm=TINY_LLM, vision_pretrain_steps=2,
                              vision={"image_size": 32, "channels": [8, 16, 16, 16]})
    bases = {"tied_embeddings": (tied, TOWER), "resnet_tower": (resnet, {}), "resnet_bfloat16": (resnet, {})}
    return {name: {"base": str(bases.get(name, (tiny_base,))[0]), "vision": bases.get(name, (None, TOWER))[1],
                   **overrides} for name, overrides in {**CASES, **BFLOAT16}.items()}


@pytest.fixture(scope="module")
def sharded(nets, tmp_path_factory) -> dict[tuple[str, int], dict]:
    """Every case run once by tests/fsdp_worker.py in two processes: (case, rank) -> what it measured."""
    out = tmp_path_factory.mktemp("fsdp-worker")
    cases = out / "cases.json"
    cases.write_text(json.dumps([{"name": name, "net": net, "max_norm": MAX_NORM,
                                  "param_dtype": "bfloat16" if name in BFLOAT16 else None} for name, net in nets.items()]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "tests/fsdp_worker.py", str(cases), str(out)]
    result = subprocess.run(command, cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {(name, rank): torch.load(out / f"{name}.rank{rank}.pt") for name in nets for rank in (0, 1)}


@pytest.fixture(scope="module")
def unsharded(nets) -> dict[str, dict]:
    """The same step in one process, on the model as build_model loads it (no checkpointing)."""
    results = {}
    for name, net in nets.items():
        if name in BFLOAT16:
            continue
        torch.manual_seed(0)  # the worker's rank 0 seed
        model = build_model(ModelConfig(**{**net, "gradient_checkpointing": False})).train()
        fusion = {n: p.detach().clone() for n, p in model.fusion.named_parameters()}
        batch = model_inputs(model)
        loss = model(**batch, labels=model_labels(model, batch)).loss
        loss.backward()
        norm = clip_grad_norm([p for p in model.parameters() if p.requires_grad], MAX_NORM)
        results[name] = {"loss": loss.detach(), "grad_norm": norm, "fusion": fusion, "buffers": dict(model.named_buffers()),
                         "gradients": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    return results


CASE_RANKS = [(name, rank) for name in CASES for rank in (0, 1)]


@pytest.mark.parametrize(("case", "rank"), CASE_RANKS)
def test_the_sharded_model_computes_the_unsharded_loss(sharded, unsharded, case, rank):
    assert_same_up_to_summation_order(sharded[case, rank]["loss"], unsharded[case]["loss"])


@pytest.mark.parametrize(("case", "rank"), CASE_RANKS)
def test_the_gradient_norm_over_shards_is_the_unsharded_norm(sharded, unsharded, case, rank):
    assert unsharded[case]["grad_norm"] > 2 * MAX_NORM  # so the clipping below is real
    assert_same_up_to_summation_order(sharded[case, rank]["grad_norm"], unsharded[case]["grad_norm"])


@pytest.mark.parametrize(("case", "rank"), CASE_RANKS)
def test_clipped_sharded_gradients_are_the_clipped_unsharded_ones(sharded, unsharded, case, rank):
    gradients, expected = sharded[case, rank]["gradients"], unsharded[case]["gradients"]
    assert_same_up_to_summation_order(gradients, expected)


@pytest.mark.parametrize("rank", [0, 1])
def test_buffers_outside_the_state_dict_are_restored_after_materialising(sharded, unsharded, rank):
    buffers = sharded["plain", rank]["unsaved_buffers"]
    assert {"llm.model.rotary_emb.inv_freq", "fusion.interval.angular_frequency"} <= buffers.keys()
    for name, buffer in buffers.items():
        assert torch.equal(buffer, unsharded["plain"]["buffers"][name]), name


@pytest.mark.parametrize("rank", [0, 1])
def test_a_fresh_fusion_gets_rank_0_initialisation_on_every_rank(sharded, unsharded, rank):
    # The tiny base has no temporal_fusion/: its weights are drawn at build time, with another seed on rank 1.
    fusion = sharded["plain", rank]["fusion"]
    assert fusion.keys() == unsharded["plain"]["fusion"].keys()
    for name, value in unsharded["plain"]["fusion"].items():
        assert torch.equal(fusion[name], value), name


def test_each_block_is_its_own_unit_and_a_frozen_tower_shares_none_with_trained_parameters(sharded):
    units = sharded["checkpointed_frozen_tower", 0]["units"]
    assert set(units) == {"", "vision", "vision.model.encoder.layers.0", "vision.model.encoder.layers.1",
                          "llm.model.layers.0", "llm.model.layers.1", "projector", "fusion"}
    assert {unit: trainable for unit, trainable in units.items() if unit.startswith("vision")} == {
        "vision": [False], "vision.model.encoder.layers.0": [False], "vision.model.encoder.layers.1": [False]}
    assert units["llm.model.layers.0"] == units["projector"] == units[""] == [True]


def test_activation_checkpointing_under_fsdp_wraps_each_block_once(sharded):
    assert sharded["checkpointed_frozen_tower", 0]["checkpoint_wrappers"] == 4  # 2 vision blocks + 2 decoder layers
    assert sharded["plain", 0]["checkpoint_wrappers"] == 0
    # A ResNet's stages hold batch norm, which a recompute would update twice: only the decoder layers.
    assert sharded["resnet_tower", 0]["checkpoint_wrappers"] == 2


def test_a_resnet_towers_stages_and_batch_norms_are_units_and_train_in_bfloat16(sharded):
    units = sharded["resnet_tower", 0]["units"]
    norms = {unit for unit in units if ".bn" in unit}
    assert {"vision.model.layer1", "vision.model.layer2", "vision.model.bn1"} <= set(units)
    assert {"vision.model.layer1.0.bn1", "vision.model.layer2.0.bn2"} <= norms
    for rank in (0, 1):
        result = sharded["resnet_bfloat16", rank]
        assert torch.isfinite(result["loss"]) and torch.isfinite(result["grad_norm"])
        assert result["loss"] == sharded["resnet_bfloat16", 0]["loss"]  # the same batch on both ranks
        assert any(name.startswith("vision.model.layer1") for name in result["gradients"])  # the tower trained


def test_tied_embeddings_stay_tied_after_sharding(sharded, unsharded):
    assert sharded["tied_embeddings", 0]["lm_head_is_embedding"]
    assert not sharded["plain", 0]["lm_head_is_embedding"]
    # One parameter, so one gradient, which holds both uses.
    assert "llm.lm_head.weight" not in sharded["tied_embeddings", 0]["gradients"]


# --- Lightning: the global batch in two processes against one ----------------------------------------


def csv_metric(run: Path, name: str) -> list[float]:
    with open(run / "csv" / "version_0" / "metrics.csv") as file:
        return [float(row[name]) for row in csv.DictReader(file) if row[name]]


@pytest.fixture(scope="module")
def global_batch_runs(world, tiny_base, tmp_path_factory) -> dict[str, dict]:
    """Global batch 8 from micro-batches of 2: FSDP2 on 2 processes (with activation checkpointing) and
    one process, on the same 16 samples (8 micro-batches), with a frozen tower and clipping at 1.0."""
    common = [f"paths.world_dir={world}", f"paths.tiny_base={tiny_base}", f"prepare.world.subjects={WORLD_SUBJECTS}",
              "prepare.tiny_base=null", *PLAIN, "data.global_batch_size=8", "data.batch_size=2", "data.limit.train=16",
              "data.limit.val=4", "model.net.tune_vision=false", "trainer.gradient_clip_val=1.0",
              "trainer.log_every_n_steps=1", "logger=csv"]
    sharded_run = tmp_path_factory.mktemp("global-batch-fsdp")
    command = [sys.executable, "train.py", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
               "model.net.gradient_checkpointing=true", f"paths.output_dir={sharded_run}", f"hydra.run.dir={sharded_run}",
               *common]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = torch.load(sharded_run / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)
    single_run = tmp_path_factory.mktemp("global-batch-one")
    trainer = train(compose_config("train", [f"paths.output_dir={single_run}", f"paths.cache_dir={single_run / 'cache'}",
                                             *common]))
    return {
        "fsdp": {"steps": meta["global_step"], "grad_norm": csv_metric(sharded_run, "train/grad_norm"),
                 "batches": meta["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]},
        "one": {"steps": trainer.global_step, "grad_norm": csv_metric(single_run, "train/grad_norm"),
                "batches": trainer.fit_loop.epoch_loop.batch_progress.total.completed},
    }


def test_two_processes_step_once_per_two_micro_batches_of_two_for_a_global_batch_of_8(global_batch_runs):
    assert global_batch_runs["fsdp"]["batches"] == 4  # per process: 8 micro-batches over 2 processes
    assert global_batch_runs["fsdp"]["steps"] == 2
    assert (global_batch_runs["one"]["batches"], global_batch_runs["one"]["steps"]) == (8, 2)


def test_the_logged_gradient_norms_under_fsdp_are_those_of_one_process(global_batch_runs):
    # The same 8 samples per step on both; the second step's norm also follows from the first (clipped) update.
    sharded, one = global_batch_runs["fsdp"]["grad_norm"], global_batch_runs["one"]["grad_norm"]
    assert len(sharded) == len(one) == 2 and one[0] > 1.0
    assert sharded == pytest.approx(one, rel=1e-5)

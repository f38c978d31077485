"""The training payload: the state a job writes, every strategy saving it whole, and a resume bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import psutil
import pytest
import tensorstore as ts
import torch

import ckptbench
from ckptbench import bitwise, checkpoint, docs, manifest, pytree, training
from ckptbench.formatting import sig
from ckptbench.local import Folder
from ckptbench.measure import measure, return_freed_memory
from ckptbench.strategies import STRATEGIES

from conftest import load_checkpoint, one_line_error, rows, run, save_checkpoint


@pytest.fixture(scope="module")
def trained() -> training.TrainingCheckpoint:
    return training.build("tiny", seed=0)


def _copy(tensors: pytree.Flat) -> pytree.Flat:
    copied = pytree.Flat((name, tensor.clone()) for name, tensor in tensors.items())
    copied.structure = tensors.structure
    return copied


def test_flatten_keeps_every_number_and_the_structure() -> None:
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3)}},
        "groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1], "fused": None, "amsgrad": False}],
        "rng": (3, (7, 8, 9), None),
        "name": "MT19937",
        "last_epoch": -1,
    }
    flat = pytree.flatten(tree)
    assert all(isinstance(t, torch.Tensor) for t in flat.values())
    assert flat["groups/0/betas"].dtype == torch.float64
    assert flat["rng/1"].tolist() == [7, 8, 9]
    restored = pytree.unflatten(flat, json.loads(json.dumps(flat.structure)))
    assert restored == {**tree, "state": restored["state"]}
    assert list(restored["state"]) == [0]
    assert torch.equal(restored["state"][0]["exp_avg"], torch.ones(2, 3))
    assert type(restored["groups"][0]["amsgrad"]) is bool
    assert type(restored["rng"][1]) is tuple
    with pytest.raises(ValueError, match="cannot name a leaf"):
        pytree.flatten({"a/b": 1})


def test_training_state_is_real_and_seven_times_the_weights(trained: training.TrainingCheckpoint) -> None:
    weights = ckptbench.model.build("tiny")
    names = list(trained.tensors)
    model = [n for n in names if n.startswith("model/")]
    master = [n for n in names if n.startswith("master/")]
    moments = [n for n in names if n.startswith("optimizer/state/") and n.endswith(("exp_avg", "exp_avg_sq"))]
    assert len(model) == len(master) == len(weights.tensors) - 1  # the rotary buffer is not persistent
    assert {trained.tensors[n].dtype for n in model} == {torch.float16}
    assert {trained.tensors[n].dtype for n in master + moments} == {torch.float32}
    assert len(moments) == 2 * len(master)
    assert all(trained.tensors[n].abs().sum() > 0 for n in moments)
    steps = {trained.tensors[n].item() for n in names if n.startswith("optimizer/state/") and n.endswith("/step")}
    assert steps == {trained.recipe.steps} == {trained.tensors["step"].item()}
    assert not torch.equal(trained.tensors[master[1]].half(), weights.tensors[master[1].removeprefix("master/")])
    assert trained.nbytes / weights.nbytes == pytest.approx(7, rel=0.01)


def test_same_seed_same_state_and_a_damaged_moment_does_not_resume(trained: training.TrainingCheckpoint) -> None:
    again = training.build("tiny", seed=0)
    assert manifest.digests(again.tensors) == manifest.digests(trained.tensors)
    assert training.resume_problem(again, _copy(trained.tensors)) is None
    damaged = _copy(trained.tensors)
    damaged["optimizer/state/5/exp_avg_sq"].view(-1)[0] *= 2
    found = training.resume_problem(again, damaged)
    assert found is not None
    assert "differ from the run that never stopped" in found


def _resume_after_saving(name: str, trained: training.TrainingCheckpoint, tmp_path: Path) -> None:
    strategy = STRATEGIES[name]
    path = tmp_path / name
    save_checkpoint(strategy, trained.tensors, path)
    assert manifest.Manifest.read(Folder(path)).structure == trained.structure
    loaded = load_checkpoint(strategy, path)
    bitwise.check_identical(loaded, trained.tensors, name)
    assert training.resume_problem(trained, loaded) is None


@pytest.mark.parametrize("name", ["pytorch", "safetensors", "dcp", "ts+best"])
def test_a_saved_state_resumes_bit_for_bit(name: str, trained: training.TrainingCheckpoint, tmp_path: Path) -> None:
    _resume_after_saving(name, trained, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in STRATEGIES if n not in ("pytorch", "safetensors", "dcp", "ts+best")])
def test_every_strategy_resumes_bit_for_bit(name: str, trained: training.TrainingCheckpoint, tmp_path: Path) -> None:
    _resume_after_saving(name, trained, tmp_path)


def test_an_async_tensorstore_save_holds_one_copy_of_the_state(
    trained: training.TrainingCheckpoint, tmp_path: Path
) -> None:
    """ts+best+async holds one copy of the state, its snapshot, handed to TensorStore tensor by tensor.

    The tiny state is far below ``inflight_bytes``, so every byte is in flight at once: the save must still stay
    well under two copies of the state. (The old save, which kept its snapshot whole beside TensorStore's copies,
    passes this bound too at this size; docs/results/.../memory-trials.txt shows the difference on a larger state.)
    """
    strategy = STRATEGIES["ts+best+async"]
    assert trained.nbytes < strategy.options.inflight_bytes
    save_checkpoint(strategy, trained.tensors, tmp_path / "started")  # TensorStore starts its pools unmeasured
    with measure() as saving:
        save_checkpoint(strategy, trained.tensors, tmp_path / "ckpt")
    assert saving.peak_rss < 1.5 * trained.nbytes, f"{saving.peak_rss / trained.nbytes:.2f} copies of the state"
    bitwise.check_identical(load_checkpoint(strategy, tmp_path / "ckpt"), trained.tensors, strategy.name)


def test_a_resumed_load_is_freed_before_the_next_memory_check(
    trained: training.TrainingCheckpoint, tmp_path: Path
) -> None:
    """A state loaded with ``pytorch`` and resumed is left in reference cycles: ``return_freed_memory`` (before
    every memory check and timed region) must free it, or the next load's check counts a second copy of the state."""
    strategy = STRATEGIES["pytorch"]
    save_checkpoint(strategy, trained.tensors, tmp_path / "ckpt")
    return_freed_memory()
    before = psutil.Process().memory_info().rss
    loaded = load_checkpoint(strategy, tmp_path / "ckpt")
    assert training.resume_problem(trained, loaded) is None
    del loaded
    return_freed_memory()
    left = psutil.Process().memory_info().rss - before
    assert left < trained.nbytes / 2, f"{left / trained.nbytes:.2f} of the state is still resident"


def test_dcp_keys_the_optimizer_by_parameter_and_resumes_into_a_live_state(
    trained: training.TrainingCheckpoint, tmp_path: Path
) -> None:
    """get_state_dict's form on disk (AdamW's state under the master's parameter names, not its indices), and
    set_state_dict into a job's existing tensors: the moments read in place, the numbers copied back."""
    path = tmp_path / "dcp"
    save_checkpoint(STRATEGIES["dcp"], trained.tensors, path)
    keys = set(torch.distributed.checkpoint.FileSystemReader(path).read_metadata().state_dict_metadata)
    assert "optimizer.state.model.layers.0.mlp.up_proj.weight.exp_avg_sq" in keys
    assert not [k for k in keys if k.startswith("optimizer.state.0.")]
    into = _copy(trained.tensors)
    for tensor in into.values():
        if tensor.is_floating_point():  # a live job's integers (its optimizer's parameter ids) are its own
            tensor.zero_()
    moment = "optimizer/state/4/exp_avg"
    memory = into[moment].data_ptr()
    checkpoint.load(STRATEGIES["dcp"], path, lambda n: None, into=into)
    bitwise.check_identical(into, trained.tensors, "dcp into a live state")
    assert into[moment].data_ptr() == memory
    assert training.resume_problem(trained, into) is None


def test_a_moment_damaged_before_a_dcp_save_does_not_resume(
    trained: training.TrainingCheckpoint, tmp_path: Path
) -> None:
    """The check sees through set_state_dict: a state that is not the job's fails, naming a leaf."""
    damaged = _copy(trained.tensors)
    damaged["optimizer/state/5/exp_avg_sq"].view(-1)[0] *= 2
    save_checkpoint(STRATEGIES["dcp"], damaged, tmp_path / "dcp")
    loaded = load_checkpoint(STRATEGIES["dcp"], tmp_path / "dcp")
    bitwise.check_identical(loaded, damaged, "dcp")
    found = training.resume_problem(trained, loaded)
    assert found is not None
    assert "first " in found


@pytest.mark.slow  # measured 8 s CPU
def test_verify_covers_the_scalars(trained: training.TrainingCheckpoint, tmp_path: Path) -> None:
    """The scheduler's epoch is a leaf like any tensor: changing it on disk is damage ``verify`` names."""
    path = tmp_path / "ts"
    save_checkpoint(STRATEGIES["tensorstore"], trained.tensors, path)
    store = ts.open({"driver": "zarr", "kvstore": f"file://{path}/scheduler/last_epoch/"}).result()
    store.write(store.read().result() + 1).result()
    found = checkpoint.verify(path)
    assert [d.tensor for d in found.damage] == ["scheduler/last_epoch"]


def test_a_run_whose_resume_differs_is_a_failed_row_naming_the_leaf(
    trained: training.TrainingCheckpoint, make_bench
) -> None:
    leaf = "optimizer/state/3/exp_avg"
    wrong = training.TrainingCheckpoint(
        trained.source,
        trained.config,
        trained.tensors,
        trained.params,
        trained.recipe,
        {**trained.continued, leaf: "0"},
    )
    bench = make_bench(payload="training")
    bench.checkpoint = wrong
    (phase,) = bench.run(["safetensors"])
    assert not phase.ok
    assert leaf in phase.error
    assert "does not resume" in phase.error
    assert phase.rows[0].payload == "training"


@pytest.mark.slow  # a run as a process
def test_a_preset_whose_state_does_not_fit_is_refused_in_one_line(tmp_path: Path) -> None:
    needed = training.needed_bytes(ckptbench.model.get_preset("openllama-3b"))
    result = run("run", "--preset", "openllama-3b", "--payload", "training", "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 1
    line = one_line_error(result.stderr)
    assert "openllama-3b training state" in line
    assert f"{needed / 1e9:.2f} GB" in line
    assert not (tmp_path / "out" / "results.csv").exists()


@pytest.mark.slow
def test_the_issue_run_verifies_every_row_at_seven_times_the_bytes(tmp_path: Path) -> None:
    strategies = "all,safetensors,dcp,orbax,ts+best"
    common = ("--preset", "tiny", "--strategies", strategies, "--no-drift")
    state = run("run", *common, "--payload", "training", "--out", tmp_path / "training", cwd=tmp_path)
    assert state.returncode == 0, state.stderr[-3000:]
    weights = run("run", *common, "--out", tmp_path / "weights", cwd=tmp_path)
    assert weights.returncode == 0, weights.stderr[-3000:]
    trained, plain = rows(tmp_path / "training" / "results.csv"), rows(tmp_path / "weights" / "results.csv")
    assert len(trained) == 12
    assert trained["verified"].all()
    assert set(trained["payload"]) == {"training"}
    assert plain["verified"].all()
    # Measured, not assumed: no save or load holds more than the state, one copy of it and 1 GB.
    assert (trained[["peak_rss_save", "peak_rss_load"]].max(axis=1) <= trained["model_bytes"] + 1e9).all()
    ratio = trained.set_index("strategy")["bytes"] / plain.set_index("strategy")["bytes"]
    # Those that store each tensor in its own dtype, uncompressed: the state's 14 bytes a parameter against 2.
    same_dtypes = ratio[["pytorch", "safetensors", "dcp", "ts+best"]]
    assert all(math.isfinite(r) and 6.5 < r < 7.5 for r in same_dtypes), ratio
    table = docs.render(f"payloads {tmp_path / 'training' / 'results.csv'} {tmp_path / 'weights' / 'results.csv'}")
    (line,) = [row for row in table.splitlines() if row.startswith("| `dcp` ")]
    assert f"| {sig(ratio['dcp'])} | training | weights |" in line

"""Model files and resume states: plain state-dict keys, also from a ``--compile`` run."""

import numpy as np
import pytest
import torch

from tumorseg.checkpoint import load_model
from tumorseg.config import TrainConfig
from tumorseg.data import load_dataset
from tumorseg.engine import train
from tumorseg.inference import predict_logits
from tumorseg.train import write_run_outputs

FAST = dict(resize_px=64, batch_size=8, lr=5e-3, warmup_epochs=0, encoder_weights="none", num_workers=0)


@pytest.fixture(scope="module")
def data64(synthetic_dir, session_tmp):
    return load_dataset(synthetic_dir, 64, cache_dir=session_tmp / "cache")


def assert_plain(state: dict):
    assert state and not [k for k in state if "_orig_mod" in k]


def test_compiled_run_saves_loads_and_resumes(data64, synthetic_dir, tmp_path, monkeypatch):
    # Inductor needs minutes to compile a UNet on a CPU. Any backend wraps the model the same way
    # (torch._dynamo's OptimizedModule, whose state_dict keys start with "_orig_mod."), which is what
    # breaks model files; so the test compiles with the "eager" backend.
    real_compile = torch.compile
    compiled = []

    def eager_compile(model, **kwargs):
        compiled.append(real_compile(model, backend="eager"))
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", eager_compile)
    cfg = TrainConfig(epochs=2, compile=True, **FAST)
    states = []
    result = train(cfg.replace(epochs=1), data64, on_epoch=lambda m, state: states.append(state()), log=None)
    assert len(compiled) == 1 and list(compiled[0].state_dict())[0].startswith("_orig_mod.")  # the wrapper was there
    assert_plain(states[0]["model"])
    assert_plain(states[0]["best_model"])

    write_run_outputs(tmp_path, result, cfg, data64["test"], synthetic_dir)
    model, _, payload = load_model(tmp_path / "model.pt")
    assert_plain(payload["model"])
    images = data64["test"].images[:4]
    assert torch.equal(predict_logits(model, images, cfg), predict_logits(result.model, images, cfg))

    resumed = train(cfg, data64, resume_state=states[0], log=None)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert np.isfinite(resumed.history[1]["train_loss"])

"""Save and load: safetensors + JSON, atomic, no pickle, every bad folder a clear error."""

import json
import os
import re

import pytest
import torch

import reftlens
from reftlens import DII, Intervention, LoReFT, MeanAblation, ReftModel, Steer
from reftlens.interventions import Phi, register
from reftlens.errors import SaveError
from reftlens.saving import CONFIG_FILE, WEIGHTS_FILE, LoadError, atomic_dir


def trained_set(model):
    torch.manual_seed(0)
    d = model.cfg.d_model
    tied = LoReFT(d, 4, init="random")
    return ReftModel(model, [
        Intervention(tied, layers=[0, 2], positions="f2+l2"),
        Intervention(LoReFT(d, 2, init="random"), layers=[1, 3], positions="f3+l3", untied=True, overlap="clamp"),
        Intervention(Steer(torch.randn(d)), layers=1, positions=slice(2, 4), hook="mlp_out"),
        Intervention(MeanAblation(torch.randn(d)), layers=3, positions=[-4]),
        Intervention(DII(d, 3), layers=2, positions="l1", hook="attn_out"),
    ])


def run(reft, model):
    tokens, mask = reft.tokenize(["the quick brown fox jumps", "a lazy dog"])
    return reft(tokens, sources=tokens, attention_mask=mask, source_attention_mask=mask)


def test_round_trip_is_bit_identical(model, tmp_path):
    reft = trained_set(model)
    reft.save(tmp_path / "r")
    loaded = ReftModel.load(tmp_path / "r", model)
    assert len(loaded.phis) == len(reft.phis) == 1 + 4 + 1 + 1 + 1
    for a, b in zip(reft.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert [u.name for u in loaded.units] == [u.name for u in reft.units]
    assert torch.equal(run(reft, model), run(loaded, model))
    # tied stays tied: one Φ object at two layers
    assert loaded.units[0].phi is loaded.units[0].phi and loaded.units[0].layers == (0, 2)


def test_the_folder_holds_no_pickle(model, tmp_path):
    trained_set(model).save(tmp_path / "r")
    assert sorted(os.listdir(tmp_path / "r")) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((tmp_path / "r" / CONFIG_FILE).read_text())
    assert config["schema_version"] == 1 and config["phis"][0]["type"] == "loreft"
    assert config["base_model"]["d_model"] == model.cfg.d_model
    assert (tmp_path / "r" / WEIGHTS_FILE).read_bytes()[8:9] == b"{"  # safetensors: a JSON header, not a pickle


def test_wrong_base_model(tiny_models, tmp_path):
    reft = ReftModel(tiny_models["tiny-llama"], Intervention(LoReFT(64, 4), layers=1))
    reft.save(tmp_path / "r")
    with pytest.raises(LoadError, match="different base model.*architecture: saved 'LlamaForCausalLM', model 'GPT2LMHeadModel'"):
        ReftModel.load(tmp_path / "r", tiny_models["tiny-gpt2"])


def test_missing_truncated_and_tampered_files(model, tmp_path):
    path = tmp_path / "r"
    trained_set(model).save(path)
    weights = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(LoadError, match="truncated or was modified"):
        ReftModel.load(path, model)
    os.remove(path / WEIGHTS_FILE)
    with pytest.raises(LoadError, match="reft_weights.safetensors is missing"):
        ReftModel.load(path, model)
    with pytest.raises(LoadError, match="reft_config.json is missing"):
        ReftModel.load(tmp_path / "nothing", model)


def edit_config(path, fn):
    cfg = json.loads((path / CONFIG_FILE).read_text())
    fn(cfg)
    (path / CONFIG_FILE).write_text(json.dumps(cfg))


def test_newer_schema_unknown_type_and_wrong_dtype(model, tmp_path):
    path = tmp_path / "r"
    ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 4), layers=1)).save(path)
    edit_config(path, lambda c: c.update(schema_version=99))
    with pytest.raises(LoadError, match="schema version 99.*Upgrade reftlens"):
        ReftModel.load(path, model)
    edit_config(path, lambda c: (c.update(schema_version=1), c["phis"][0].update(type="evil")))
    with pytest.raises(LoadError, match="Unknown Φ type 'evil'"):
        ReftModel.load(path, model)
    edit_config(path, lambda c: c["phis"][0].update(type="loreft", dtype="float16"))
    with pytest.raises(LoadError, match="is torch.float32 but the config says float16"):
        ReftModel.load(path, model)


def test_dtype_conversion_on_load(model, tmp_path):
    path = tmp_path / "r"
    ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 4).double(), layers=1), cast=False, move=True).save(path)
    with pytest.raises(LoadError, match=r"saved Φs are \['torch.float64'\] but the model is torch.float32"):
        ReftModel.load(path, model, cast=False)
    loaded = ReftModel.load(path, model, dtype=torch.float32)
    assert loaded.phis[0].W.weight.dtype == torch.float32


def test_user_defined_phi_saves_only_when_registered(model, tmp_path):
    class Unregistered(torch.nn.Module):
        def forward(self, h):
            return h

    with pytest.raises(reftlens.ReftError, match="not registered"):
        ReftModel(model, Intervention(Unregistered(), layers=1)).save(tmp_path / "a")
    with pytest.raises(reftlens.ReftError, match="plain function and cannot be saved"):
        ReftModel(model, Intervention(lambda h: h, layers=1)).save(tmp_path / "b")

    @register("test_scaled")
    class Scaled(Phi):
        def __init__(self, d_model: int, scale: float = 1.0):
            super().__init__()
            self.d_model, self.scale = d_model, scale
            self.gain = torch.nn.Parameter(torch.ones(d_model))

        def config(self):
            return {"d_model": self.d_model, "scale": self.scale}

        def forward(self, h):
            return self.scale * self.gain * h

    reft = ReftModel(model, Intervention(Scaled(model.cfg.d_model, 0.5), layers=1, positions="l2"))
    reft.save(tmp_path / "c")
    loaded = ReftModel.load(tmp_path / "c", model)
    assert isinstance(loaded.phis[0], Scaled) and loaded.phis[0].scale == 0.5


def test_a_crash_mid_save_leaves_the_previous_save(model, tmp_path):
    path = tmp_path / "r"
    reft = trained_set(model)
    reft.save(path)
    before = (path / WEIGHTS_FILE).read_bytes()

    def crash(folder):
        (folder / WEIGHTS_FILE).write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_dir(path, crash)
    assert (path / WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary folders left
    ReftModel.load(path, model)


def test_saving_onto_a_file_leaves_it_untouched(model, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(SaveError, match=rf"cannot save to {re.escape(str(notes))}: it is a file.*Choose a new folder"):
        trained_set(model).save(notes)
    assert notes.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no temporary folders left
    with pytest.raises(reftlens.ReftError):  # one error family, and still a ValueError
        atomic_dir(notes, lambda folder: None)


def test_saving_onto_a_folder_of_other_files_leaves_them(model, tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "data.csv").write_text("a,b\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.txt").write_text("x")
    with pytest.raises(SaveError, match=r"holds other files \(data.csv, sub\) and is not an earlier save.*"
                                        r"has no reft_config.json\).*new or empty folder"):
        trained_set(model).save(folder)
    assert (folder / "data.csv").read_text() == "a,b\n" and (folder / "sub" / "x.txt").read_text() == "x"
    assert sorted(p.name for p in folder.iterdir()) == ["data.csv", "sub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_saving_onto_an_earlier_save_or_an_empty_folder_replaces_it(model, tmp_path):
    path = tmp_path / "r"
    path.mkdir()  # an empty folder is fine
    ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 4), layers=1)).save(path)
    reft = trained_set(model)
    reft.save(path)  # its own earlier save: replaced whole
    loaded = ReftModel.load(path, model)
    assert len(loaded.phis) == len(reft.phis)
    assert sorted(os.listdir(path)) == [CONFIG_FILE, WEIGHTS_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_each_writer_replaces_only_its_own_kind(model, tmp_path):
    # the default markers recognise every kind reftlens writes (save_hf, to_pyreft and training
    # checkpoints call atomic_dir without markers=); ReftModel.save recognises only its own
    kinds = {"reft": [CONFIG_FILE], "export": ["reftlens_export.json", "config.json"],
             "checkpoint": ["trainer_state.json", "optimizer.safetensors"], "pyreft": ["config.json", "intkey_a.bin"]}
    for kind, files in kinds.items():
        folder = tmp_path / kind
        folder.mkdir()
        for f in files:
            (folder / f).write_text("{}")
        if kind != "reft":
            with pytest.raises(SaveError, match="not an earlier save"):
                trained_set(model).save(folder)
            assert sorted(os.listdir(folder)) == sorted(files)
        atomic_dir(folder, lambda tmp: (tmp / "new.txt").write_text("new"))
        assert os.listdir(folder) == ["new.txt"]
    hf_model_folder = tmp_path / "hf"  # a plain save_pretrained folder is not a pyreft save
    hf_model_folder.mkdir()
    (hf_model_folder / "config.json").write_text("{}")
    with pytest.raises(SaveError, match=r"has no reft_config.json or reftlens_export.json or trainer_state.json "
                                        r"or config.json with intkey_\*.bin"):
        atomic_dir(hf_model_folder, lambda tmp: None)
    assert os.listdir(hf_model_folder) == ["config.json"]
    atomic_dir(hf_model_folder, lambda tmp: None, markers=["config.json"])  # a caller can name its own marker
    assert os.listdir(hf_model_folder) == []

"""Save and load: safetensors + JSON, atomic, no pickle, every bad folder a clear error."""

import json
import os
import re

import pytest
import torch

import reftlens
import reftlens.saving as saving
from reftlens import DII, Intervention, LoReFT, MeanAblation, ReftModel, Steer
from reftlens.errors import SaveError
from reftlens.interventions import Phi, register
from reftlens.saving import CONFIG_FILE, WEIGHTS_FILE, LoadError, atomic_dir


def trained_set(model):
    torch.manual_seed(0)
    d = model.cfg.d_model
    tied = LoReFT(d, 4, init="random")
    return ReftModel(
        model,
        [
            Intervention(tied, layers=[0, 2], positions="f2+l2"),
            Intervention(LoReFT(d, 2, init="random"), layers=[1, 3], positions="f3+l3", untied=True, overlap="clamp"),
            Intervention(Steer(torch.randn(d)), layers=1, positions=slice(2, 4), hook="mlp_out"),
            Intervention(MeanAblation(torch.randn(d)), layers=3, positions=[-4]),
            Intervention(DII(d, 3), layers=2, positions="l1", hook="attn_out"),
        ],
    )


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
    with pytest.raises(
        LoadError, match="different base model.*architecture: saved 'LlamaForCausalLM', model 'GPT2LMHeadModel'"
    ):
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
    with pytest.raises(
        SaveError,
        match=r"holds other files \(data.csv, sub\) and is not an earlier save.*"
        r"has no reft_config.json or reft_bank.json\).*new or empty folder",
    ):
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
    # the default markers recognise every kind reftlens writes; each writer passes its own kind alone
    # (ReftModel.save here; save_hf, save_pyreft and checkpoints are tested in their own modules)
    kinds = {
        "reft": [CONFIG_FILE],
        "export": ["reftlens_export.json", "config.json"],
        "checkpoint": ["trainer_state.json", "optimizer.safetensors"],
        "pyreft": ["config.json", "intkey_a.bin"],
    }
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
    with pytest.raises(
        SaveError,
        match=r"has no reft_config.json or reft_bank.json or reftlens_export.json or trainer_state.json "
        r"or config.json with intkey_\*.bin",
    ):
        atomic_dir(hf_model_folder, lambda tmp: None)
    assert os.listdir(hf_model_folder) == ["config.json"]
    atomic_dir(hf_model_folder, lambda tmp: None, markers=["config.json"])  # a caller can name its own marker
    assert os.listdir(hf_model_folder) == []


def set_unit(i, **fields):
    return lambda c: c["units"][i].update(fields)


CORRUPTIONS = {
    "phis[0].type a list": (
        lambda c: c["phis"][0].update(type=["loreft"]),
        r"phis\[0\].type must be a string naming a registered Φ type; got a list \[\"loreft\"\]",
    ),
    "phis[0].config unknown key": (
        lambda c: c["phis"][0]["config"].update(bogus=1),
        r"phis\[0\].config has unknown key\(s\) \['bogus'\] for Φ type 'loreft', whose constructor takes \['d_model', 'rank'",
    ),
    "phis[0].config missing key": (
        lambda c: c["phis"][0]["config"].pop("rank"),
        r"phis\[0\].config has missing key\(s\) \['rank'\] for Φ type 'loreft'.*damaged or was written for another version",
    ),
    "phis[0].config bad value": (
        lambda c: c["phis"][0]["config"].update(rank="four"),
        r"phis\[0\].config cannot build Φ type 'loreft': ConfigError: LoReFT\(d_model, rank\) takes integers",
    ),
    "phis[0].config not an object": (
        lambda c: c["phis"][0].update(config=[64, 4]),
        r"phis\[0\].config must be an object of 'loreft''s constructor arguments; got a list",
    ),
    "phis[0].dtype": (
        lambda c: c["phis"][0].update(dtype="int8"),
        r"phis\[0\].dtype must be null or one of \['bfloat16', 'float16', 'float32', 'float64'\]; got a string \"int8\"",
    ),
    "phis[0] lacks dtype": (
        lambda c: c["phis"][0].pop("dtype"),
        r"phis\[0\] lacks dtype; a Φ record needs type, config and dtype",
    ),
    "phis[0] not an object": (
        lambda c: c.update(phis=["loreft"]),
        r"phis\[0\] must be an object with type, config and dtype",
    ),
    "phis not a list": (lambda c: c.update(phis={"0": {}}), r"phis must be a list of Φ records; got an object"),
    "base_model not an object": (
        lambda c: c.update(base_model="gpt2"),
        r"base_model must be an object with the base model's architecture",
    ),
    "units not a list": (lambda c: c.update(units=None), r"units must be a list of intervention records; got null"),
    "units[0] lacks layers": (
        lambda c: c["units"][0].pop("layers"),
        r"units\[0\] lacks layers; a unit needs name, phi, layers",
    ),
    "units[0].layers out of range": (
        set_unit(0, layers=[1, 9]),
        r"units\[0\].layers \[1, 9\] name a layer the model lacks; the model has layers 0..3",
    ),
    "units[0].layers a string": (
        set_unit(0, layers="1"),
        r"units\[0\].layers must be a non-empty list of distinct layer indices; got a string \"1\"",
    ),
    "units[0].phi out of range": (
        set_unit(0, phi=3),
        r"units\[0\].phi must be the index of one of the 1 saved Φs \(0..0\); got a number 3",
    ),
    "units[0].positions selects nothing": (
        set_unit(0, positions={"first": 0, "last": 0}),
        r"units\[0\].positions: position spec .* selects no position",
    ),
    "units[0].positions unknown": (
        set_unit(0, positions="middle"),
        r"units\[0\].positions: cannot read saved positions 'middle'; expected 'all'",
    ),
    "units[0].positions bad slice": (
        set_unit(0, positions={"slice": [0, 2]}),
        r"units\[0\].positions: saved positions .* must be \{'slice': \[start, stop, step\]\}",
    ),
    "units[0].hook": (
        set_unit(0, hook=3),
        r"units\[0\].hook must be a TransformerLens hook name such as 'resid_post'; got a number 3",
    ),
    "units[0].stack": (set_unit(0, stack="first"), r"units\[0\].stack must be null or an int"),
    "cast": (lambda c: c.update(cast="yes"), r"cast must be true or false; got a string \"yes\""),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_config_field_of_the_wrong_type_names_the_file_and_the_field(tiny_models, tmp_path, case):
    model = tiny_models["tiny-gpt2"]
    path = tmp_path / "r"
    ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 4), layers=1, positions="l1")).save(path)
    corrupt, message = CORRUPTIONS[case]
    edit_config(path, corrupt)  # the weights checksum covers only the weights file: the config loads this far
    with pytest.raises(LoadError, match=re.escape(str(path / CONFIG_FILE)) + ": " + message):
        ReftModel.load(path, model)


def test_a_config_that_is_not_an_object(model, tmp_path):
    path = tmp_path / "r"
    ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 4), layers=1)).save(path)
    (path / CONFIG_FILE).write_text('["reftlens"]')
    with pytest.raises(LoadError, match=re.escape(str(path / CONFIG_FILE)) + r" must hold a JSON object .*got a list"):
        ReftModel.load(path, model)


def test_interventions_checks_the_units_it_is_given(tiny_models, tmp_path):
    model = tiny_models["tiny-gpt2"]
    path = tmp_path / "r"
    ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 4), layers=1, positions="l1")).save(path)
    config, phis = saving.read(path, saving.fingerprint(model))
    assert [iv.layers for iv in saving.interventions(config, phis)] == [(1,)]
    bad = json.loads(json.dumps(config))
    bad["units"][0]["layers"] = [7]
    with pytest.raises(LoadError, match=r"reft_config.json: units\[0\].layers \[7\] name a layer the model lacks"):
        saving.interventions(bad, phis)
    bad["units"][0].update(layers=[1], positions={"indices": []})
    with pytest.raises(
        LoadError, match=r"reft_config.json: units\[0\].positions: saved positions .* non-empty list of ints"
    ):
        saving.interventions(bad, phis)
    bad["units"][0].update(positions="all", source_positions="all")  # LoReFT takes no source
    with pytest.raises(
        LoadError, match=r"reft_config.json: units\[0\] \('loreft\(rank=4\)'\): source_positions given for"
    ):
        saving.interventions(bad, phis)


# --------------------------------------------------------------------------- loads stay inside their folder


def _bank_of_two(model):
    torch.manual_seed(0)
    d = model.cfg.d_model
    return ReftModel(
        model,
        {
            "a": Intervention(LoReFT(d, 2, init="random"), layers=0, positions="l1"),
            "b": Intervention(LoReFT(d, 2, init="random"), layers=1, positions="l1"),
        },
    )


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_a_bank_index_cannot_lead_out_of_its_folder(model, tmp_path, where):
    other = tmp_path / "other"
    trained_set(model).save(other)  # a set elsewhere, which the index must not make the load read
    bank = tmp_path / "bank"
    _bank_of_two(model).save(bank)
    index = json.loads((bank / saving.BANK_FILE).read_text())
    if where == "absolute":
        index["sets"][1]["folder"] = str(other)
    elif where == "dotdot":
        index["sets"][1]["folder"] = "../other"
    else:
        import shutil

        shutil.rmtree(bank / "sets/0001")
        os.symlink(other, bank / "sets/0001")
    (bank / saving.BANK_FILE).write_text(json.dumps(index))
    want = "leads out of" if where != "symlink" else "is a link to .*outside"
    with pytest.raises(LoadError, match=rf"reft_bank.json: set 'b' folder.*{want}"):
        ReftModel.load(bank, model)


def test_a_config_linked_from_outside_the_folder_is_refused(model, tmp_path):
    trained_set(model).save(tmp_path / "other")
    path = tmp_path / "r"
    trained_set(model).save(path)
    (path / CONFIG_FILE).unlink()
    os.symlink(tmp_path / "other" / CONFIG_FILE, path / CONFIG_FILE)
    with pytest.raises(LoadError, match=rf"{CONFIG_FILE}: .*is a link to .*outside .*Nothing was read"):
        ReftModel.load(path, model)


def test_saving_inside_refuses_every_escape(tmp_path):
    (tmp_path / "x").mkdir()
    assert saving.inside(tmp_path, "x", "w") == tmp_path / "x"
    for bad in ["/etc/passwd", "../x", "x/../../y", ""]:
        with pytest.raises(LoadError, match="^w "):
            saving.inside(tmp_path, bad, "w")
    with pytest.raises(LoadError, match="must be a non-empty relative path"):
        saving.inside(tmp_path, 3, "w")


# --------------------------------------------------------------------------- sizes and fingerprints


@pytest.mark.parametrize(
    "phi, key",
    [
        (lambda d: LoReFT(d, 2), "d_model"),
        (lambda d: LoReFT(d, 2), "rank"),
        (lambda d: Steer(torch.ones(d)), "vector"),
        (lambda d: MeanAblation(torch.ones(d)), "mean"),
        (lambda d: reftlens.ProjectOut(torch.ones(1, d)), "directions"),
        (lambda d: reftlens.ProjectOut(torch.ones(1, d)), "rank"),
    ],
)
def test_a_huge_size_in_a_config_is_refused_before_anything_is_allocated(model, tmp_path, phi, key):
    path = tmp_path / "r"
    ReftModel(model, Intervention(phi(model.cfg.d_model), layers=1, positions="l1")).save(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    config["phis"][0]["config"][key] = 10**12  # 4 TB as float32: building it would fail or kill the process
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(
        LoadError,
        match=rf"phis\[0\]\.config\.{key} is {10**12}, but the base model's widths are d_model {model.cfg.d_model}.*"
        "nothing was allocated",
    ):
        ReftModel.load(path, model)


def test_a_same_shape_model_with_other_weights_is_refused(model, tmp_path):
    path = tmp_path / "r"
    trained_set(model).save(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    assert set(config["base_model"]["weights"]) == {"embedding", "layer 0"}
    W = model.original_model.get_input_embeddings().weight
    saved = W.detach().clone()
    try:
        with torch.no_grad():
            W.mul_(1 + 1e-3)  # a rounding-sized change (bf16 is ~4e-3): the same model
        ReftModel.load(path, model)
        with torch.no_grad():
            W.add_(torch.randn_like(W))  # other weights, same shapes
        with pytest.raises(
            LoadError, match=r"different base model \(the weights of its embedding differ \(same shapes"
        ):
            ReftModel.load(path, model)
    finally:
        with torch.no_grad():
            W.copy_(saved)
    ReftModel.load(path, model)
    del config["base_model"]["weights"]  # a save from before the weight check: shapes only, still loads
    (path / CONFIG_FILE).write_text(json.dumps(config))
    ReftModel.load(path, model)


def test_the_weight_check_names_the_layer_that_differs(model, tmp_path):
    path = tmp_path / "r"
    trained_set(model).save(path)
    from reftlens.runtime.hf_backend import decoder_layers

    w = next(decoder_layers(model.original_model)[0].parameters())
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_(1.0)
        with pytest.raises(LoadError, match=r"the weights of its layer 0 differ"):
            ReftModel.load(path, model)
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_saving_over_a_link_to_an_earlier_save_leaves_no_leftover(model, tmp_path):
    real = tmp_path / "real"
    trained_set(model).save(real)
    os.symlink(real, tmp_path / "link")
    trained_set(model).save(tmp_path / "link")
    assert not (tmp_path / "link").is_symlink() and ReftModel.load(tmp_path / "link", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # the link's target is untouched
    assert (real / CONFIG_FILE).is_file()


def _caught_between_the_renames(model, tmp_path):
    """What a writer killed between its two renames leaves: the earlier save moved aside, no destination."""
    dest = tmp_path / "save"
    trained_set(model).save(dest)
    aside = tmp_path / ".save.old-dead"
    aside.mkdir()
    os.replace(dest, aside / "save")
    (tmp_path / ".save.tmp-dead").mkdir()
    return dest


def test_a_load_restores_a_save_caught_between_the_renames(model, tmp_path):
    dest = _caught_between_the_renames(model, tmp_path)
    ReftModel.load(dest, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save"]  # restored, leftovers deleted


def test_a_load_during_a_write_or_without_write_access(model, tmp_path, monkeypatch):
    dest = _caught_between_the_renames(model, tmp_path)
    with saving._locked(dest.absolute()):  # another writer holds the folder (flock: per open file)
        with pytest.raises(LoadError, match=rf"{dest} is being written by another process right now"):
            ReftModel.load(dest, model)

    def read_only(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(saving, "_locked", read_only)
    ReftModel.load(dest, model)  # no lock to take (a read-only folder): the moved-aside save is read in place
    assert not dest.exists()


# ---- settings travel with a set ----------------------------------------------------------------------


def steering_set(model):
    torch.manual_seed(0)
    phi = LoReFT(model.cfg.d_model, 4, init="random")
    with torch.no_grad():
        phi.W.bias.mul_(2)  # mild: editing the generated tokens too changes the greedy tokens
    return ReftModel(model, Intervention(phi, layers=[1, 2], positions="l3"))


def test_a_saved_set_restores_its_settings_and_runs_with_them(model, tmp_path):
    reft = steering_set(model)
    reft.settings["default"] = reftlens.SetSettings(intervene_on="all", chat_template=False, prepend_bos=True)
    reft.save(tmp_path / "r")
    config = json.loads((tmp_path / "r" / CONFIG_FILE).read_text())
    assert (config["intervene_on"], config["chat_template"], config["prepend_bos"]) == ("all", False, True)
    loaded = ReftModel.load(tmp_path / "r", model)
    assert loaded.settings == reft.settings and loaded.adapters == []  # a plain save stays a plain set
    prompts = ["the quick brown fox", "one two three"]
    kw = dict(eos_token_id=None)
    assert loaded.generate(prompts, 8, **kw) == reft.generate(prompts, 8, intervene_on="all", **kw)
    assert loaded.generate(prompts, 8, **kw) != reft.generate(prompts, 8, intervene_on="prompt", **kw)
    assert loaded.generate(prompts, 8, intervene_on="prompt", **kw) == reft.generate(
        prompts, 8, intervene_on="prompt", **kw
    )


def test_a_save_without_settings_loads_with_the_defaults(model, tmp_path):
    steering_set(model).save(tmp_path / "r")
    path = tmp_path / "r" / CONFIG_FILE
    config = json.loads(path.read_text())
    for key in ("intervene_on", "chat_template", "prepend_bos"):
        del config[key]  # as saves written before settings were recorded
    path.write_text(json.dumps(config))
    loaded = ReftModel.load(tmp_path / "r", model)
    assert loaded.settings == {"default": reftlens.SetSettings()}
    assert loaded.generate(["a b c d"], 4, eos_token_id=None) == loaded.generate(
        ["a b c d"], 4, eos_token_id=None, intervene_on="prompt"
    )


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("intervene_on", "every", r"intervene_on must be null or one of \('prompt', 'all', 'generated'\); got 'every'"),
        ("prepend_bos", "yes", r"prepend_bos must be null, true or false; got 'yes'"),
    ],
)
def test_a_damaged_setting_is_named(model, tmp_path, key, value, words):
    steering_set(model).save(tmp_path / "r")
    path = tmp_path / "r" / CONFIG_FILE
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(LoadError, match=re.escape(str(path)) + ": " + words):
        ReftModel.load(tmp_path / "r", model)

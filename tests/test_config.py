import pytest

from pipeline.config.loading import ConfigError, config_hash, load_config


def test_override_sets_dotted_key_with_yaml_types(tmp_path):
    cfg = load_config(None, ["folds.n_splits=3", "train.folds=[0, 2]", "train.lr=0.001", "competition.group=writer",
                             "train.weight_decay=1e-4", "lr_find.end=2E+1"])
    assert cfg["train"]["weight_decay"] == pytest.approx(1e-4) and cfg["lr_find"]["end"] == 20.0
    assert cfg["folds"]["n_splits"] == 3
    assert cfg["train"]["folds"] == [0, 2]
    assert cfg["train"]["lr"] == pytest.approx(0.001)
    assert cfg["competition"]["group"] == "writer"


def test_unknown_override_key_suggests_close_name():
    with pytest.raises(ConfigError, match=r"unknown config key 'folds.n_split'.*folds.n_splits"):
        load_config(None, ["folds.n_split=3"])


def test_unknown_yaml_key_names_file_and_suggests(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"x.yaml.*train.epochz.*train.epochs"):
        load_config(p)


def test_base_inheritance_and_override_order(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nfolds:\n  n_splits: 4\n  seed: 1\n")
    (tmp_path / "exp.yaml").write_text("base: base.yaml\nname: exp\nfolds:\n  seed: 7\ntrain:\n  lr: 3e-4\n")
    cfg = load_config(tmp_path / "exp.yaml", ["folds.seed=9"])
    assert cfg["train"]["lr"] == pytest.approx(3e-4)
    assert (cfg["name"], cfg["folds"]["n_splits"], cfg["folds"]["seed"]) == ("exp", 4, 9)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override_syntax_and_bad_values():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["folds.n_splits"])
    with pytest.raises(ConfigError, match="competition.task"):
        load_config(None, ["competition.task=segmentation"])
    with pytest.raises(ConfigError, match="metric"):
        load_config(None, ["competition.metric=f2"])


def test_hash_is_stable_and_sensitive():
    a = load_config(None, ["folds.n_splits=3"])
    b = load_config(None, ["folds.n_splits=3"])
    c = load_config(None, ["folds.n_splits=4"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(c)
    assert len(config_hash(a)) == 12


def test_the_loaded_config_is_typed_frozen_and_derived_only_by_revalidation():
    from pydantic import ValidationError

    from pipeline.config.schema import Config, Train

    cfg = load_config(None, ["train.lr=0.02"])
    assert isinstance(cfg, Config) and isinstance(cfg.train, Train) and cfg.train.lr == 0.02
    with pytest.raises(ValidationError):  # frozen: no stage can splice keys into another's config
        cfg.train.lr = 0.5
    with pytest.raises(ValidationError):
        cfg.name = "other"
    derived = cfg.updated({"train.lr": 0.5, "folds.seed": 7})
    assert (derived.train.lr, derived.folds.seed, cfg.train.lr) == (0.5, 7, 0.02)  # a new config; the old one stands
    with pytest.raises(ConfigError, match="train.lr"):  # a derived config is checked like a loaded one
        cfg.updated({"train.lr": -1.0})
    # hashes and saved files see the plain dict the config used to be, so old keys stay valid
    assert config_hash(cfg) == config_hash(cfg.model_dump()) and config_hash([cfg.train]) == config_hash([cfg.train.model_dump()])
    assert cfg["train"]["lr"] == 0.02 and cfg.train.get("nope", 3) == 3  # notebooks' dict reads still work
    with pytest.raises(KeyError):
        cfg["train"]["nope"]


def test_a_stage_receives_the_validated_config_even_when_given_a_dict(tmp_path, monkeypatch):
    import pipeline.stages.folds as folds_stage
    from pipeline.config.schema import Config
    from pipeline.stages import run_stage

    seen = []
    monkeypatch.setattr(folds_stage, "run", lambda cfg, force=False: seen.append(cfg))
    plain = load_config(None, [f"workdir={tmp_path}"]).model_dump()
    run_stage("folds", plain)
    assert isinstance(seen[0], Config) and seen[0].workdir == str(tmp_path)
    plain["train"]["lr"] = "fast"
    with pytest.raises(ConfigError, match="train.lr"):
        run_stage("folds", plain)

"""Config and CLI: valid params load; typos, wrong types and unknown steps name the key."""

from __future__ import annotations

import pytest

from components.cli import main, run_step
from components.config import (
    SECTIONS,
    ConfigError,
    Params,
    StepPaths,
    ValidateConfig,
    load_params,
)
from components.contract import STEPS
from tests.conftest import REPO_ROOT

PARAMS = REPO_ROOT / "params.yaml"


def test_repository_params_load_and_cover_every_section():
    params = load_params(PARAMS)

    assert params.paths.workdir == "artifacts"
    assert params.validate_.max_bad_fraction == 0.05
    for name in SECTIONS:
        assert params.section(name) is not None
    assert params == Params()  # params.yaml states the defaults, nothing hidden


def test_overrides_are_parsed_as_yaml_and_validated():
    params = load_params(
        PARAMS,
        [
            "validate.max_bad_fraction=0.5",
            "catalog.max_listings=12",
            "validate.allowed_buckets=[a, b]",
            "paths.catalog=s3://bucket/prefix",
            "catalog.max_listings=null",
        ],
    )

    assert params.validate_.max_bad_fraction == 0.5
    assert params.validate_.allowed_buckets == ["a", "b"]
    assert params.paths.catalog == "s3://bucket/prefix"
    assert params.catalog.max_listings is None


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (
            "validate.max_bad_fractio=0.1",
            "unknown key 'validate.max_bad_fractio' (did you mean 'validate.max_bad_fraction'?)",
        ),
        ("valdate.max_bad_fraction=0.1", "unknown key 'valdate' (did you mean 'validate'?)"),
        (  # a nested section's key gets the same hint
            "evaluate.gates.min_queris=3",
            "unknown key 'evaluate.gates.min_queris' (did you mean 'evaluate.gates.min_queries'?)",
        ),
        ("validate.max_bad_fraction=lots", "key 'validate.max_bad_fraction'"),
        ("validate.max_bad_fraction=2.0", "key 'validate.max_bad_fraction'"),
        ("catalog.max_listings=1.5", "key 'catalog.max_listings'"),
        ("catalog.vendors=[twemoji, apple]", "key 'catalog.vendors.1'"),
        ("catalog.skin_tones=yes please", "key 'catalog.skin_tones'"),
        ("seed.value=1", "'seed' is not a section"),
        ("no_equals_sign", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, named):
    with pytest.raises(ConfigError) as error:
        load_params(PARAMS, [override])

    assert named in str(error.value)


def test_typo_in_params_file_names_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("validate:\n  max_bad_fraction: 0.1\n  alowed_schemes: [file]\n")

    with pytest.raises(ConfigError, match="unknown key 'validate.alowed_schemes'"):
        load_params(path)


def test_wrong_type_in_params_file_names_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("validate:\n  workers: '8'\n")

    with pytest.raises(ConfigError, match="key 'validate.workers'"):
        load_params(path)


def test_unreadable_params_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("validate: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_params(bad)


def test_sections_are_frozen():
    config = ValidateConfig()

    with pytest.raises(ValueError, match="frozen"):
        config.max_bad_fraction = 0.9  # type: ignore[misc]


def test_step_paths_default_to_the_sample_catalog():
    paths = StepPaths.from_params(load_params(PARAMS))

    assert paths.catalog == "artifacts/catalog"
    assert paths.step_dir("validate").as_posix() == "artifacts/validate"


def test_unknown_step_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])

    assert exit_info.value.code == 2
    assert "trian" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown step 'trian'"):
        run_step("trian", Params())


def test_cli_bad_override_exits_2_naming_the_key(capsys):
    code = main(["validate", "--params", str(PARAMS), "--set", "validate.max_bad_fractio=1"])

    assert code == 2
    assert "validate.max_bad_fractio" in capsys.readouterr().err


def test_help_lists_steps_and_their_params(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    validate_help = capsys.readouterr().out

    assert all(step in top for step in STEPS)
    assert "workdir" in top  # the shared paths section
    for key in ValidateConfig.model_fields:
        assert key in validate_help


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.lr=3e-4", "lr", 3e-4),
        ("train.lr=1e-3", "lr", 1e-3),
        ("train.lr=.5", "lr", 0.5),
        ("train.epochs=010", "epochs", 10),  # YAML 1.1 would read octal 8
        ("train.epochs=1_000", "epochs", 1000),
        ("train.epochs=0o12", "epochs", 10),
        ("train.weight_decay=0", "weight_decay", 0.0),  # an int where a float goes
    ],
)
def test_set_parses_numbers_as_people_write_them(override, key, expected):
    assert getattr(load_params(PARAMS, [override]).train, key) == expected


def test_yes_and_no_are_strings_not_booleans_and_dates_stay_text():
    params = load_params(PARAMS, ["paths.catalog=2026-11-01", "catalog.query_languages=[en, fr]"])

    assert params.paths.catalog == "2026-11-01"
    with pytest.raises(ConfigError, match="key 'catalog.skin_tones'"):
        load_params(PARAMS, ["catalog.skin_tones=yes"])  # only true/false are booleans


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("curent", "did you mean 'current'?"),
        ("None", "write null unquoted"),
        ("champion", "is not one of current, null or a registry URI"),
        ("models:/listing-encoder", "is not one of current, null or a registry URI"),
    ],
)
def test_a_champion_that_is_not_current_null_or_a_registry_uri_is_refused(value, hint):
    with pytest.raises(ConfigError) as error:
        load_params(PARAMS, [f"evaluate.champion={value}"])

    assert "key 'evaluate.champion'" in str(error.value) and hint in str(error.value)


def test_a_champion_and_an_embed_model_take_registry_uris():
    params = load_params(
        PARAMS,
        [
            "evaluate.champion=models:/listing-encoder@champion",
            "embed.model=models:/listing-encoder/3",
        ],
    )

    assert params.evaluate.champion == "models:/listing-encoder@champion"
    assert params.embed.model == "models:/listing-encoder/3"
    assert load_params(PARAMS, ["evaluate.champion=null"]).evaluate.champion is None
    with pytest.raises(ConfigError, match="key 'embed.model'"):
        load_params(PARAMS, ["embed.model=champion"])


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("workdir=elsewhere", "did you mean 'paths.workdir'?"),
        ("embed.champion=null", "did you mean 'evaluate.champion'?"),
        ("serve.uri=s3://x/y", "did you mean 'storage.uri'?"),
    ],
)
def test_a_key_set_in_the_wrong_section_names_where_it_lives(override, hint):
    with pytest.raises(ConfigError) as error:
        load_params(PARAMS, [override])

    assert hint in str(error.value)


def test_a_workdir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    occupied = tmp_path / "a-file"
    occupied.write_text("not a folder")

    code = main(["versions", "--params", str(PARAMS), "--set", f"paths.workdir={occupied}"])

    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"paths.workdir '{occupied}' is a file, not a folder" in err


def test_each_command_help_shows_the_params_it_reads(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    serve_help = capsys.readouterr().out

    assert "params (serve section" in serve_help
    assert all(key in serve_help for key in SECTIONS["serve"].model_fields)


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def test_help_names_every_section_a_command_reads_and_what_it_sets(capsys):
    refresh_help = _help(capsys, "refresh")
    for section in ("validate", "featurize", "embed", "index", "evaluate", "promote", "storage"):
        assert f"params ({section} section" in refresh_help, section
    assert "embed.reuse_current (bool, this command sets true)" in refresh_help
    assert "validate.verify_content (bool, this command sets false)" in refresh_help
    promote_help = _help(capsys, "promote")
    assert "params (storage section" in promote_help and "params (registry section" in promote_help
    evaluate_help = _help(capsys, "evaluate")
    assert "gates.min_queries (int, default 30)" in evaluate_help  # nested keys, not a repr
    assert "GatesConfig(" not in evaluate_help
    top = _help(capsys)
    assert "paths.workdir" in top and "seed (int, default 0)" in top and "--set" in top


def test_set_before_the_command_name_counts(tmp_path, capsys):
    store = tmp_path / "store"
    code = main(["--set", f"storage.uri={store}", "--set", "train.epochs=3", "create-store"])

    assert code == 0 and str(store) in capsys.readouterr().out
    assert store.is_dir()  # the store the --set before the name pointed at


def test_remove_without_ids_says_so_once(capsys):
    code = main(["remove", "--params", str(PARAMS)])

    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == "error: remove: no listing id given: name them, or pass --from FILE"


def test_a_gate_typed_with_mlflow_s_metric_name_gates_the_same_metric():
    typed = load_params(
        PARAMS,
        [
            'evaluate.gates.min={"query_to_listing/recall_at_10": 0.5}',
            'evaluate.gates.max_regression={"view_to_listing/ndcg_at_10": 0.01}',
        ],
    ).evaluate.gates

    assert typed.min == {"query_to_listing/recall@10": 0.5}
    assert typed.max_regression == {"view_to_listing/ndcg@10": 0.01}

import pytest

from compress.core.errors import CompressError
from compress.recipe import load_recipe, parse_recipe, shipped_recipes
from compress.stages import REGISTRY


def test_every_shipped_recipe_parses_and_cpu_default_exists():
    names = shipped_recipes()
    assert "cpu-default" in names
    for name in names:
        r = load_recipe(name)
        assert all(s.type is REGISTRY[s.name] for s in r.stages)


def test_unknown_stage_type_lists_valid_ones():
    with pytest.raises(CompressError) as e:
        parse_recipe({"stages": [{"type": "quant.magic"}]}, "x", "x.toml")
    msg = str(e.value)
    assert "quant.magic" in msg and "quant.dynamic" in msg and "\n" not in msg


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(CompressError, match=r"no parameter 'bits'.*valid: .*per_channel"):
        parse_recipe({"stages": [{"type": "quant.dynamic", "bits": 4}]}, "x", "x.toml")


@pytest.mark.parametrize(
    "params, pattern",
    [
        ({"per_channel": "yes"}, "must be bool"),
        ({"weight_type": "int3"}, "weight_type='int3' is not one of"),
        ({"samples": 0}, "samples=0 must be >= 1"),
        ({"op_types": "MatMul"}, "list of strings"),
    ],
)
def test_bad_parameter_values_are_refused(params, pattern):
    with pytest.raises(CompressError, match=pattern):
        parse_recipe({"stages": [{"type": "quant.static", **params}]}, "x", "x.toml")


def test_unknown_top_level_key_and_missing_recipe(tmp_path):
    with pytest.raises(CompressError, match="unknown top-level"):
        parse_recipe({"stage": []}, "x", "x.toml")
    with pytest.raises(CompressError, match="unknown recipe 'nope'.*cpu-default"):
        load_recipe("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[stages]\ntype=")
    with pytest.raises(CompressError, match="not valid TOML"):
        load_recipe(str(bad))


def test_recipe_from_a_user_file(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('name = "mine"\n[[stages]]\ntype = "quant.dynamic"\nper_channel = false\n')
    r = load_recipe(str(p))
    assert r.name == "mine" and r.stages[0].config.per_channel is False
    assert r.as_dict()["stages"][0]["params"]["per_channel"] is False


def test_genai_export_is_for_causal_lms_and_torch_stages_only(tmp_path):
    from compress.recipe import check_applicable
    from profiles import load_profile

    bad = {"export": "genai", "stages": [{"type": "quant.int4"}, {"type": "quant.dynamic"}]}
    with pytest.raises(CompressError, match="torch-level stages only"):
        parse_recipe(bad, "x", "x.toml")
    with pytest.raises(CompressError, match="must be one of optimum, genai"):
        parse_recipe({"export": "tflite", "stages": []}, "x", "x.toml")
    recipe = load_recipe("lm-int4-eora-genai")
    assert recipe.export == "genai" and recipe.as_dict()["export"] == "genai"
    with pytest.raises(CompressError, match="for causal LMs only"):
        check_applicable(recipe, "encoder", load_profile("cpu"))


def test_lm_head_block_size_is_checked_when_the_recipe_is_read():
    bad = {"stages": [{"type": "quant.int4", "lm_head": "int4", "lm_head_block_size": 100}]}
    with pytest.raises(CompressError, match="lm_head_block_size=100 must be 0"):
        parse_recipe(bad, "x", "x.toml")
    ok = parse_recipe({"stages": [{"type": "quant.int4", "lm_head": "int4", "lm_head_block_size": 128}]}, "x", "x")
    assert ok.stages[0].config.lm_head_block_size == 128
    with pytest.raises(CompressError, match="lm_head_grid='sym' must be one of body, symmetric, asymmetric"):
        parse_recipe({"stages": [{"type": "quant.int4", "lm_head_grid": "sym"}]}, "x", "x.toml")

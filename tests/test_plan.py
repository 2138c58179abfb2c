import json
import re

import pytest

from sparsediff.layout import TokenLayout
from sparsediff.patterns import get_pattern
from sparsediff.plan import ModelFingerprint, SparsePlan, StepRange

MODEL = ModelFingerprint("WanTransformer3DModel", num_layers=3, num_heads=4, head_dim=64, config_hash="abc123")


def mixed_plan() -> SparsePlan:
    early = tuple(tuple(get_pattern(n) for n in ["full", "diagonal_w1", "skip", "topk_blocks_k0.25"]) for _ in range(3))
    late = tuple(
        tuple(get_pattern(n) for n in ["multi_diagonal_w1", "vertical_stripe_f1", "skip", "diagonal_w0.5"]) for _ in range(3)
    )
    return SparsePlan(
        model=MODEL,
        ranges=[StepRange(0.0, 0.5, early), StepRange(0.5, 1.0, late)],
        block_size=32,
        dense_steps=0.2,
        dense_layers=(0,),
        layout="text:8+video:4x8x8",
        search={"error_budget": 0.05},
    )


def test_save_load_round_trip(tmp_path):
    plan = mixed_plan()
    path = plan.save(tmp_path / "plan.json")
    loaded = SparsePlan.load(path)
    assert loaded == plan
    assert loaded.to_dict() == json.loads(path.read_text())


def test_lookup_honours_dense_steps_layers_and_ranges():
    plan = mixed_plan()
    full = get_pattern("full")
    assert plan.layer_patterns(step=1, num_steps=10, layer=2) == (full,) * 4  # dense step (0.2 of 10 = 2)
    assert plan.layer_patterns(step=3, num_steps=10, layer=0) == (full,) * 4  # dense layer
    assert plan.layer_patterns(step=3, num_steps=10, layer=1)[1].name == "diagonal_w1"
    assert plan.layer_patterns(step=5, num_steps=10, layer=1)[1].name == "vertical_stripe_f1"
    assert plan.num_dense_steps(50) == 10
    assert SparsePlan.dense(MODEL).is_all_dense and not plan.is_all_dense


def test_summary_reports_density_and_flops_share():
    plan = mixed_plan()
    s = plan.summary(num_steps=10)
    assert s["layer_density"][0] == 1.0
    assert 0.0 < s["layer_density"][1] < 1.0
    assert s["dense_steps"] == 2
    assert 0.2 < s["predicted_flops_share"] < 1.0
    assert SparsePlan.dense(MODEL).summary(TokenLayout.parse("video:4x8x8"))["predicted_flops_share"] == 1.0


def _broken(edit):
    data = mixed_plan().to_dict()
    edit(data)
    return data


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d["ranges"][0]["layers"][1].__setitem__(2, "spiral_w2"), r"ranges\[0\]\.layers\[1\]\[2\].*Unknown pattern 'spiral_w2'"),
        (lambda d: d["ranges"][1]["layers"][0].__setitem__(0, "diagonal_w-3"), r"ranges\[1\]\.layers\[0\]\[0\].*w=-3"),
        (lambda d: d["ranges"][0]["layers"][2].pop(), r"ranges\[0\]\.layers\[2\]' has 3 heads but model.num_heads is 4"),
        (lambda d: d["ranges"][0]["layers"].pop(), r"ranges\[0\]\.layers' has 2 layers but model.num_layers is 3"),
        (lambda d: d["ranges"][1].__setitem__("start", 0.4), r"ranges\[1\]\.start' is 0.4 and overlaps"),
        (lambda d: d["ranges"][1].__setitem__("start", 0.6), r"ranges\[1\]\.start' is 0.6 and leaves a gap"),
        (lambda d: d["ranges"][1].__setitem__("end", 0.9), r"ranges\[1\]\.end' is 0.9; the last range must end at 1.0"),
        (lambda d: d.__setitem__("schema_version", 99), r"'schema_version' is 99"),
        (lambda d: d.__setitem__("dense_steps", 1.5), r"'dense_steps' is 1.5"),
        (lambda d: d.__setitem__("dense_layers", [7]), r"'dense_layers' holds 7"),
        (lambda d: d.__setitem__("block_size", 0), r"'block_size' is 0"),
        (lambda d: d.pop("ranges"), r"'ranges' is missing"),
        (lambda d: d["model"].pop("head_dim"), r"'model' is .* needs exactly the keys"),
    ],
)
def test_validation_names_the_bad_field(edit, words):
    with pytest.raises(ValueError, match=words):
        SparsePlan.from_dict(_broken(edit))


def test_a_plan_for_another_model_is_refused(tmp_path):
    path = mixed_plan().save(tmp_path / "plan.json")
    other = ModelFingerprint("WanTransformer3DModel", 3, 4, 64, "fff000")
    with pytest.raises(ValueError, match="another model: model.config_hash is 'abc123' in the plan but 'fff000'"):
        SparsePlan.load(path, model=other)
    assert SparsePlan.load(path, model=MODEL).model == MODEL


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        SparsePlan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SparsePlan.load(bad)


def test_failed_save_leaves_existing_file(tmp_path):
    path = mixed_plan().save(tmp_path / "plan.json")
    before = path.read_text()
    broken = mixed_plan()
    broken.block_size = -1
    with pytest.raises(ValueError):
        broken.save(path)
    assert path.read_text() == before


def test_config_hash_ignores_private_keys_and_order():
    a = ModelFingerprint.hash_config({"num_layers": 2, "heads": 4, "_name_or_path": "x"})
    b = ModelFingerprint.hash_config({"heads": 4, "num_layers": 2, "_name_or_path": "y"})
    assert a == b and a != ModelFingerprint.hash_config({"heads": 5, "num_layers": 2})


def test_a_plan_holds_across_the_dtype_and_library_version_a_model_is_loaded_with(tmp_path):
    """transformers' config dict carries the loaded dtype and the running version: neither is hashed. A plan saved
    with the earlier hash (which had them) still matches the model it was made for."""
    config = {"num_layers": 2, "heads": 4, "dtype": "float32", "transformers_version": "5.24.0"}
    fp32 = ModelFingerprint.of("Llama", 2, 4, 16, config)
    bf16 = ModelFingerprint.of("Llama", 2, 4, 16, {**config, "dtype": "bfloat16", "transformers_version": "5.30.0"})
    assert fp32 == bf16 and fp32.mismatch(bf16) is None
    earlier = ModelFingerprint("Llama", 2, 4, 16, fp32.earlier_hash)  # as a plan saved before this change holds it
    assert fp32.earlier_hash != fp32.config_hash and earlier.mismatch(fp32) is None
    assert earlier.mismatch(ModelFingerprint.of("Llama", 2, 4, 16, {**config, "heads": 8})) is not None
    path = SparsePlan.dense(fp32).save(tmp_path / "plan.json")  # files hold the current hash only
    saved = json.loads(path.read_text())["model"]
    assert saved == {"model_class": "Llama", "num_layers": 2, "num_heads": 4, "head_dim": 16, "config_hash": fp32.config_hash}
    assert SparsePlan.load(path).model == bf16


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d.__setitem__("ranges", None), r"'ranges' is None; it must be a list"),
        (lambda d: d.__setitem__("ranges", 3), r"'ranges' is 3; it must be a list"),
        (lambda d: d.__setitem__("ranges", {"start": 0}), r"'ranges' is \{'start': 0\}; it must be a list"),
        (lambda d: d["ranges"].__setitem__(0, "full"), r"'ranges\[0\]' is 'full'; it needs 'start', 'end' and 'layers'"),
        (lambda d: d["ranges"][0].__setitem__("layers", None), r"'ranges\[0\]\.layers' is None; it must be a list"),
        (lambda d: d["ranges"][0].__setitem__("layers", "full"), r"'ranges\[0\]\.layers' is 'full'; it must be a list"),
        (lambda d: d["ranges"][0]["layers"].__setitem__(1, None), r"'ranges\[0\]\.layers\[1\]' is None; it must be a list"),
        (lambda d: d["ranges"][0]["layers"].__setitem__(1, "full"), r"'ranges\[0\]\.layers\[1\]' is 'full'; it must be a list"),
        (lambda d: d["ranges"][0]["layers"][1].__setitem__(0, 3), r"'ranges\[0\]\.layers\[1\]\[0\]'.*not 3"),
        (lambda d: d["ranges"][0]["layers"][1].__setitem__(0, None), r"'ranges\[0\]\.layers\[1\]\[0\]'.*not None"),
        (lambda d: d["ranges"][0].__setitem__("start", None), r"'ranges\[0\]\.start' is None; it must be a number"),
        (lambda d: d["ranges"][0].__setitem__("start", "0"), r"'ranges\[0\]\.start' is '0'; it must be a number"),
        (lambda d: d["ranges"][1].__setitem__("end", True), r"'ranges\[1\]\.end' is True; it must be a number"),
        (lambda d: d.__setitem__("dense_layers", None), r"'dense_layers' is None; it must be a list of layer indices"),
        (lambda d: d.__setitem__("dense_layers", 1), r"'dense_layers' is 1; it must be a list of layer indices"),
        (lambda d: d.__setitem__("dense_layers", "01"), r"'dense_layers' is '01'; it must be a list"),
        (lambda d: d.__setitem__("dense_layers", [None]), r"'dense_layers' holds None"),
        (lambda d: d.__setitem__("dense_layers", [True]), r"'dense_layers' holds True"),
        (lambda d: d.__setitem__("dense_steps", None), r"'dense_steps' is None"),
        (lambda d: d.__setitem__("dense_steps", float("nan")), r"'dense_steps' is nan"),
        (lambda d: d.__setitem__("block_size", "64"), r"'block_size' is '64'; use a positive integer"),
        (lambda d: d.__setitem__("block_size", None), r"'block_size' is None; use a positive integer"),
        (lambda d: d.__setitem__("layout", 5), r"'layout' is 5; it must be a layout string"),
        (lambda d: d.__setitem__("search", []), r"'search' is \[\]; it must be an object"),
        (lambda d: d.__setitem__("model", None), r"'model' is None; it needs exactly the keys"),
        (lambda d: d["model"].__setitem__("num_heads", "4"), r"'model.num_heads' is '4'; it must be a positive integer"),
        (lambda d: d["model"].__setitem__("model_class", None), r"'model.model_class' is None; it must be a string"),
    ],
)
def test_a_field_of_the_wrong_type_is_named(tmp_path, edit, words):
    with pytest.raises(ValueError, match=words):
        SparsePlan.from_dict(_broken(edit))
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_broken(edit)))
    with pytest.raises(ValueError, match=f"Plan file '{path}': .*{words}"):
        SparsePlan.load(path)


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\xff\xfe{\x00}\x00", r"is not UTF-8 text \(byte 0xff at offset 0\); pass a plan JSON file"),
        ("{}".encode("utf-16"), r"is not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, r"nests JSON too deeply to read"),
        (b"\x89PNG\r\n\x1a\n", r"is not UTF-8 text"),
        (b"ranges: []\n", r"is not valid JSON"),
        (b"", r"is not valid JSON"),
        (b"[1, 2]", r"A plan is a JSON object, not list"),
        (b"null", r"A plan is a JSON object, not NoneType"),
    ],
)
def test_a_file_that_is_not_a_plan_is_named(tmp_path, content, words):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"Plan file '{path}'.*{words}" if "Plan" not in words else words) as info:
        SparsePlan.load(path)
    assert str(path) in str(info.value) and info.value.__cause__ is None


@pytest.mark.parametrize("path", [None, 3, ["plan.json"], b"plan.json"])
def test_load_needs_a_path(path):
    with pytest.raises(ValueError, match=re.escape(f"SparsePlan.load takes the path of a plan JSON file, not {path!r}; pass")):
        SparsePlan.load(path)


def test_step_range_takes_pattern_names():
    from sparsediff.patterns import get_pattern
    from sparsediff.plan import StepRange

    r = StepRange(0.0, 1.0, [["diagonal_w1", get_pattern("skip")]])
    assert r.layers == ((get_pattern("diagonal_w1"), get_pattern("skip")),)
    with pytest.raises(ValueError, match="Unknown pattern 'wobbly'"):
        StepRange(0.0, 1.0, [["wobbly"]])

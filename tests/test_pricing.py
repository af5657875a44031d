import ast
import math
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import proxy.pricing as pricing
from proxy.pricing import (
    UNLIMITED,
    ModelPrice,
    PriceTable,
    PricingError,
    Rates,
    cost_nanos,
    input_cost_nanos,
    output_nanos_per_token,
    output_tokens_affordable,
    output_tokens_within,
    parse_price_table,
)
from proxy.usage import Usage

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "pricing.yaml"

ANTHROPIC_IDS = [
    "claude-fable-5-1", "claude-mythos-5-1", "claude-fable-5", "claude-mythos-5", "claude-opus-5-5",
    "claude-opus-5", "claude-opus-4-8", "claude-opus-4-7", "claude-opus-4-6", "claude-opus-4-5",
    "claude-opus-4-1", "claude-opus-4", "claude-sonnet-5-5", "claude-sonnet-5", "claude-sonnet-4-6",
    "claude-sonnet-4-5", "claude-sonnet-4", "claude-3-7-sonnet", "claude-haiku-5-5", "claude-haiku-4-5",
    "claude-3-5-haiku", "claude-3-opus", "claude-3-haiku",
]
OPENAI_IDS = [
    "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o4-mini",
    "gpt-5", "gpt-5-mini", "gpt-5.4", "gpt-5.5",
]
D = Decimal


@pytest.fixture(scope="module")
def shipped() -> PriceTable:
    return parse_price_table(yaml.safe_load(SHIPPED.read_text()))


def table(**models: dict) -> PriceTable:
    return parse_price_table({"models": models})


def price(**fields: object) -> ModelPrice:
    return table(m={"input": 0, "output": 0, **fields}).models["m"]


# --- the shipped table -------------------------------------------------------------


def test_shipped_table_parses_with_its_date(shipped):
    assert shipped.checked == date(2026, 11, 30)
    assert set(shipped) == set(ANTHROPIC_IDS) | set(OPENAI_IDS)
    assert len(shipped) == len(ANTHROPIC_IDS) + len(OPENAI_IDS)


def test_every_shipped_model_resolves_to_itself(shipped):
    for model in shipped:
        assert model in shipped
        assert shipped.lookup(model) is shipped.models[model]


def test_shipped_web_search_is_anthropic_only(shipped):
    for model in ANTHROPIC_IDS:
        assert shipped.models[model].web_search_per_1k == D("10.00")
    for model in OPENAI_IDS:
        assert shipped.models[model].web_search_per_1k == 0


@pytest.mark.parametrize("model, expected", [
    ("claude-fable-5-1", ("10", "12.5", "20", "0.25", "50")),
    ("claude-fable-5", ("10", "12.5", "20", "1", "50")),
    ("claude-opus-5-5", ("4", "5", "8", "0.2", "20")),
    ("claude-opus-4-6", ("5", "6.25", "10", "0.5", "25")),
    ("claude-opus-4-1", ("15", "18.75", "30", "1.5", "75")),
    ("claude-sonnet-5-5", ("2", "2.5", "4", "0.1", "10")),
    ("claude-sonnet-5", ("2", "2.5", "4", "0.2", "10")),
    ("claude-3-7-sonnet", ("3", "3.75", "6", "0.3", "15")),
    ("claude-haiku-5-5", ("0.1", "0.125", "0.2", "0.01", "0.5")),
    ("claude-haiku-4-5", ("1", "1.25", "2", "0.1", "5")),
    ("claude-3-5-haiku", ("0.8", "1", "1.6", "0.08", "4")),
    ("claude-3-haiku", ("0.25", "0.3", "0.5", "0.03", "1.25")),
    ("gpt-4o-mini", ("0.15", None, None, "0.075", "0.6")),
    ("gpt-5.5", ("5", None, None, "0.5", "30")),
])
def test_shipped_rates(shipped, model, expected):
    r = shipped.models[model].rates
    for got, want in zip((r.input, r.cache_write_5m, r.cache_write_1h, r.cache_read, r.output), expected):
        if want is not None:
            assert got == D(want)


@pytest.mark.parametrize("model, above, long_input, long_output", [
    ("claude-haiku-5-5", 100_000, "0.5", "2.5"),
    ("gpt-5.4", 272_000, "5", "22.5"),
    ("gpt-5.5", 272_000, "10", "45"),
])
def test_shipped_long_context(shipped, model, above, long_input, long_output):
    p = shipped.models[model]
    assert p.long_context_above == above
    assert p.long_context.input == D(long_input) and p.long_context.output == D(long_output)


def test_shipped_haiku_5_5_long_context_cache_rates(shipped):
    lc = shipped.models["claude-haiku-5-5"].long_context
    assert (lc.cache_write_5m, lc.cache_write_1h, lc.cache_read) == (D("0.625"), D("1.00"), D("0.05"))


# --- lookup ------------------------------------------------------------------------


@pytest.mark.parametrize("model, expected", [
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("claude-opus-4-5-20251101", "claude-opus-4-5"),
    ("claude-opus-4-5", "claude-opus-4-5"),
    ("claude-opus-4-20250514", "claude-opus-4"),
    ("claude-opus-4-1-20250805", "claude-opus-4-1"),
    ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
    ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
    ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),
    ("claude-sonnet-5-5", "claude-sonnet-5-5"),
    ("claude-sonnet-5-20260101", "claude-sonnet-5"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
    ("gpt-5.4-2026-03-05", "gpt-5.4"),
])
def test_lookup_exact_then_longest_prefix(shipped, model, expected):
    assert shipped.lookup(model) is shipped.models[expected]


@pytest.mark.parametrize("model", [
    "unknown-model", "", "claude", "claude-opus", "claude-opus-45", "gpt-5.6", "gpt-5x", "o3x", "anthropic.claude-opus-4",
])
def test_lookup_unknown_is_none(shipped, model):
    assert shipped.lookup(model) is None
    assert model not in shipped


def test_lookup_non_string_is_none(shipped):
    assert shipped.lookup(None) is None  # type: ignore[arg-type]
    assert 42 not in shipped


def test_shorter_prefix_does_not_swallow_longer_one():
    t = table(**{"claude-opus-4": {"input": 15, "output": 75}, "claude-opus-4-5": {"input": 5, "output": 25}})
    assert t.lookup("claude-opus-4-5-20251101").rates.input == 5
    assert t.lookup("claude-opus-4-20250514").rates.input == 15
    assert t.lookup("claude-opus-4-5").rates.input == 5


def test_prefix_ending_in_separator_matches_anything_after_it():
    t = table(**{"claude-": {"input": 1, "output": 1}, "gpt-5.": {"input": 2, "output": 2}})
    assert t.lookup("claude-anything").rates.input == 1
    assert t.lookup("gpt-5.6").rates.input == 2


def test_lookup_results_are_cached_and_the_cache_is_bounded(shipped):
    t = table(**{"a": {"input": 1, "output": 1}})
    for i in range(pricing._LOOKUP_CACHE_SIZE + 10):
        assert t.lookup(f"a-{i}") is t.models["a"]
    assert len(t._cache) <= pricing._LOOKUP_CACHE_SIZE
    assert t.lookup("a-x") is t.lookup("a-x")


# --- parsing -----------------------------------------------------------------------


def test_cache_rates_default_from_input():
    r = price(input="3.00", output=15).rates
    assert (r.cache_write_5m, r.cache_write_1h, r.cache_read) == (D("3.75"), D("6.00"), D("0.300"))


def test_long_context_cache_rates_default_from_its_input():
    p = price(input=3, output=15, cache_read="0.2",
              long_context={"above_input_tokens": 200000, "input": 6, "output": "22.50"})
    assert p.long_context == Rates(D(6), D("22.50"), D("7.50"), D(12), D("0.6"))
    assert p.rates.cache_read == D("0.2")


def test_explicit_cache_rates_win():
    r = price(input=1, output=5, cache_write_5m="1.2", cache_write_1h=3, cache_read="0.025").rates
    assert (r.cache_write_5m, r.cache_write_1h, r.cache_read) == (D("1.2"), D(3), D("0.025"))


def test_floats_from_yaml_are_exact_decimals():
    r = parse_price_table(yaml.safe_load("models:\n  m: {input: 0.1, output: 0.075}\n")).models["m"].rates
    assert r.input == D("0.1") and r.output == D("0.075")
    assert r.cache_read == D("0.01")


def test_optional_fields_absent():
    t = parse_price_table({"models": {"m": {"input": 1, "output": 2}}})
    assert t.checked is None
    p = t.models["m"]
    assert p.web_search_per_1k == 0 and p.long_context is None and p.long_context_above is None


def test_empty_model_table_is_allowed():
    assert len(parse_price_table({"checked": "2026-11-30", "models": {}})) == 0


def problems_of(data: object) -> list[tuple[str, str]]:
    with pytest.raises(PricingError) as info:
        parse_price_table(data)
    assert isinstance(info.value, ValueError)
    return info.value.problems


def test_every_problem_listed_with_its_path():
    problems = problems_of({
        "checked": "not a date",
        "colour": "blue",
        "models": {
            "claude-neg": {"input": -1, "output": 15, "cache_read": "-0.1"},
            "claude-extra": {"input": 1, "output": 2, "discount": 0.5},
            "claude-missing": {"cache_read": 0.1},
            "claude-lc": {"input": 1, "output": 2, "long_context": {"input": 2, "output": 4, "bogus": 1}},
            "claude-lc-neg": {"input": 1, "output": 2,
                              "long_context": {"above_input_tokens": -5, "input": 2, "output": -4}},
            "claude-lc-type": {"input": 1, "output": 2, "long_context": [1, 2]},
            "claude-null": None,
            "claude-nan": {"input": "nan", "output": True},
        },
    })
    paths = {path for path, _ in problems}
    assert ("models.claude-neg.input", "must be >= 0") in problems
    assert ("models.claude-neg.cache_read", "must be >= 0") in problems
    assert ("models.claude-extra.discount", "unknown field") in problems
    assert ("models.claude-missing.input", "required") in problems
    assert ("models.claude-missing.output", "required") in problems
    assert ("models.claude-lc.long_context.above_input_tokens", "required") in problems
    assert ("models.claude-lc.long_context.bogus", "unknown field") in problems
    assert ("models.claude-lc-neg.long_context.above_input_tokens", "must be >= 0") in problems
    assert ("models.claude-lc-neg.long_context.output", "must be >= 0") in problems
    assert ("models.claude-lc-type.long_context", "must be a mapping") in problems
    assert ("models.claude-null", "must be a mapping") in problems
    assert ("colour", "unknown field") in problems
    assert {"checked", "models.claude-nan.input", "models.claude-nan.output"} <= paths
    assert "models.claude-neg.input: must be >= 0" in str(PricingError(problems))


@pytest.mark.parametrize("data, path", [
    (None, ""),
    ([], ""),
    ({}, "models"),
    ({"models": []}, "models"),
    ({"models": {"m": {"input": 1, "output": 2, "long_context": {"above_input_tokens": 1.5, "input": 1, "output": 1}}}},
     "models.m.long_context.above_input_tokens"),
    ({"models": {"m": {"input": 1, "output": 2, "long_context": {"above_input_tokens": True, "input": 1, "output": 1}}}},
     "models.m.long_context.above_input_tokens"),
    ({"models": {"m": {"input": "1e7", "output": 2}}}, "models.m.input"),
    ({"models": {"m": {"input": "0.0000000000001", "output": 2}}}, "models.m.input"),
    ({"models": {" ": {"input": 1, "output": 2}}}, "models"),
    ({"models": {"m": {"input": 1, "output": 2, "web_search_per_1k": -10}}}, "models.m.web_search_per_1k"),
])
def test_single_problem_paths(data, path):
    assert [p for p, _ in problems_of(data)] == [path]


def test_non_string_model_id_refused():
    assert problems_of({"models": {3: {"input": 1, "output": 2}}}) == [("models.3", "model id must be a string")]


# --- cost --------------------------------------------------------------------------


def test_cost_of_each_usage_field_sonnet_4_5(shipped):
    p = shipped.lookup("claude-sonnet-4-5-20250929")
    # 1000 x $3 + 2000 x $3.75 + 3000 x $6 + 4000 x $0.30 + 500 x $15 per Mtok = $0.0372
    # plus 2 searches x $10 / 1000 = $0.02
    usage = Usage(input_tokens=1000, cache_write_5m_tokens=2000, cache_write_1h_tokens=3000,
                  cache_read_tokens=4000, output_tokens=500, web_search_requests=2)
    assert cost_nanos(p, usage) == 57_200_000
    assert cost_nanos(p, Usage(input_tokens=1000)) == 3_000_000
    assert cost_nanos(p, Usage(cache_write_5m_tokens=2000)) == 7_500_000
    assert cost_nanos(p, Usage(cache_write_1h_tokens=3000)) == 18_000_000
    assert cost_nanos(p, Usage(cache_read_tokens=4000)) == 1_200_000
    assert cost_nanos(p, Usage(output_tokens=500)) == 7_500_000
    assert cost_nanos(p, Usage(web_search_requests=2)) == 20_000_000
    assert cost_nanos(p, Usage()) == 0


def test_cost_is_exact_for_many_small_rates(shipped):
    p = shipped.lookup("gpt-4o-mini")      # $0.15 / $0.075 cached / $0.60
    usage = Usage(input_tokens=123_457, cache_read_tokens=98_765, output_tokens=4_321)
    # 123457 x 150 + 98765 x 75 + 4321 x 600 nanos
    assert cost_nanos(p, usage) == 18_518_550 + 7_407_375 + 2_592_600


def test_fractional_nanos_round_up_once_on_the_total():
    p = price(input="0.0001", output="0.0004")         # 0.1 and 0.4 nanos per token
    assert cost_nanos(p, Usage(input_tokens=1)) == 1
    assert cost_nanos(p, Usage(input_tokens=10)) == 1
    assert cost_nanos(p, Usage(input_tokens=11)) == 2
    # 0.1 + 0.4 = 0.5 nanos: one nano, not two rounded separately
    assert cost_nanos(p, Usage(input_tokens=1, output_tokens=1)) == 1
    assert cost_nanos(price(input="0.000000000001", output=0), Usage(input_tokens=1)) == 1


def test_long_context_switch_at_threshold():
    p = price(input=1, output=10, long_context={"above_input_tokens": 1000, "input": 2, "output": 20})
    at = Usage(input_tokens=400, cache_write_5m_tokens=100, cache_write_1h_tokens=100,
               cache_read_tokens=400, output_tokens=100)
    assert at.total_input_tokens == 1000
    # at the threshold: base rates (1 x 400 + 1.25 x 100 + 2 x 100 + 0.1 x 400 + 10 x 100) x 1000 nanos
    assert cost_nanos(p, at) == 1_765_000
    above = Usage(input_tokens=401, cache_write_5m_tokens=100, cache_write_1h_tokens=100,
                  cache_read_tokens=400, output_tokens=100)
    # one more token: every token, output included, at the long rates (defaults 2.5 / 4 / 0.2)
    assert cost_nanos(p, above) == (2 * 401 + 2.5 * 100 + 4 * 100 + 0.2 * 400 + 20 * 100) * 1000
    assert p.rates_for(1000) is p.rates and p.rates_for(1001) is p.long_context


def test_web_search_not_affected_by_long_context():
    p = price(input=0, output=0, web_search_per_1k=10,
              long_context={"above_input_tokens": 0, "input": 0, "output": 0})
    assert cost_nanos(p, Usage(input_tokens=5, web_search_requests=3)) == 30_000_000


def test_haiku_5_5_long_context(shipped):
    p = shipped.lookup("claude-haiku-5-5")
    short = Usage(input_tokens=50_000, cache_read_tokens=50_000, output_tokens=1000)
    assert cost_nanos(p, short) == 50_000 * 100 + 50_000 * 10 + 1000 * 500
    long = Usage(input_tokens=50_001, cache_read_tokens=50_000, output_tokens=1000)
    assert cost_nanos(p, long) == 50_001 * 500 + 50_000 * 50 + 1000 * 2500


def test_input_cost_nanos_by_kind(shipped):
    p = shipped.lookup("claude-sonnet-4-5")
    assert input_cost_nanos(p, 1000) == 3_000_000
    assert input_cost_nanos(p, 1000, "cache_write_5m") == 3_750_000
    assert input_cost_nanos(p, 1000, "cache_write_1h") == 6_000_000
    assert input_cost_nanos(p, 7, "cache_read") == 2_100
    assert input_cost_nanos(p, 0) == 0
    with pytest.raises(ValueError):
        input_cost_nanos(p, 1, "output")


def test_input_cost_nanos_uses_the_rate_for_that_input_size(shipped):
    p = shipped.lookup("gpt-5.4")
    assert input_cost_nanos(p, 272_000) == 272_000 * 2_500
    assert input_cost_nanos(p, 272_001) == 272_001 * 5_000
    assert input_cost_nanos(price(input="0.0001", output=0), 1) == 1   # rounded up


def test_output_nanos_per_token(shipped):
    p = shipped.lookup("claude-haiku-5-5")
    assert output_nanos_per_token(p, 100_000) == 500
    assert output_nanos_per_token(p, 100_001) == 2500


# --- output_tokens_affordable --------------------------------------------------------


def test_output_tokens_affordable_boundaries():
    p = price(input=0, output=15)                       # 15,000 nanos per token
    assert output_tokens_affordable(p, 15_000, 0) == 1
    assert output_tokens_affordable(p, 14_999, 0) == 0
    assert output_tokens_affordable(p, 30_000, 0) == 2
    assert output_tokens_affordable(p, 29_999, 0) == 1
    assert output_tokens_affordable(p, 0, 0) == 0
    assert output_tokens_affordable(p, -5, 0) == 0


def test_output_tokens_affordable_fractional_rate():
    p = price(input=0, output="0.0004")                 # 0.4 nanos per token
    assert output_tokens_affordable(p, 1, 0) == 2        # 0.8 -> 1 nano; 3 tokens = 1.2 -> 2
    assert output_tokens_affordable(p, 2, 0) == 5


def test_output_tokens_affordable_at_long_context_rate():
    p = price(input=0, output=10, long_context={"above_input_tokens": 100, "input": 0, "output": 20})
    assert output_tokens_affordable(p, 100_000, 100) == 10
    assert output_tokens_affordable(p, 100_000, 101) == 5


def test_output_tokens_affordable_when_output_is_free():
    assert output_tokens_affordable(price(input=1, output=0), 1, 0) == UNLIMITED
    assert output_tokens_affordable(price(input=1, output=0), 0, 0) == 0


rates = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)


@given(out=rates, long_out=rates, above=st.integers(0, 10**6), total_input=st.integers(0, 2 * 10**6),
       budget=st.integers(1, 10**15))
def test_output_tokens_affordable_is_the_exact_floor(out, long_out, above, total_input, budget):
    p = price(input=0, output=out,
              long_context={"above_input_tokens": above, "input": 0, "output": long_out})
    n = output_tokens_affordable(p, budget, total_input)
    if p.rates_for(total_input).output == 0:
        assert n == UNLIMITED
        return

    def cost(k: int) -> int:  # input rates are 0, so the input tokens only pick the rate
        return cost_nanos(p, Usage(input_tokens=total_input, output_tokens=k))

    assert n >= 0
    assert cost(n) <= budget < cost(n + 1)


@given(out=st.decimals(min_value=0, max_value=10**6, places=12, allow_nan=False, allow_infinity=False),
       long_out=rates, above=st.integers(0, 10**6), total_input=st.integers(0, 2 * 10**6),
       spare=st.integers(-10**15, 10**15))
def test_output_tokens_within_is_spare_over_the_rate_truncated_toward_zero(out, long_out, above, total_input, spare):
    """What the relay's hold_room computed with Decimal: int(spare // rate), in integers."""
    p = price(input=0, output=out, long_context={"above_input_tokens": above, "input": 0, "output": long_out})
    rate = output_nanos_per_token(p, total_input)
    got = output_tokens_within(p, spare, total_input)
    assert got == (None if rate == 0 else int(Decimal(spare) // rate))


def test_output_tokens_within_boundaries():
    p = price(input=0, output="0.0004")                 # 0.4 nanos per token
    assert [output_tokens_within(p, n, 0) for n in (0, 1, 2, -1, -2)] == [0, 2, 5, -2, -5]
    assert output_tokens_within(price(input=1, output=0), 10, 0) is None


@given(tokens=st.lists(st.integers(0, 10**9), min_size=6, max_size=6), rate_list=st.lists(rates, min_size=6, max_size=6))
def test_cost_matches_exact_rational_arithmetic(tokens, rate_list):
    from fractions import Fraction
    i, w5, w1, r, o, s = tokens
    p = price(input=rate_list[0], output=rate_list[1], cache_write_5m=rate_list[2],
              cache_write_1h=rate_list[3], cache_read=rate_list[4], web_search_per_1k=rate_list[5])
    u = Usage(i, w5, w1, r, o, s)
    F = Fraction
    exact = (F(i) * F(rate_list[0]) + F(o) * F(rate_list[1]) + F(w5) * F(rate_list[2])
             + F(w1) * F(rate_list[3]) + F(r) * F(rate_list[4])) * 1000 + F(s) * F(rate_list[5]) * 10**6
    assert cost_nanos(p, u) == math.ceil(exact)


# --- purity --------------------------------------------------------------------------


def test_pricing_is_pure():
    tree = ast.parse(Path(pricing.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    assert imported <= {"__future__", "sys", "collections", "dataclasses", "datetime", "decimal", "typing", "pydantic"}


# --- cost_nanos in integers against an exact rational reference ------------------------------

_rate = st.decimals(min_value=0, max_value=10**6, places=12, allow_nan=False, allow_infinity=False)


@given(st.tuples(_rate, _rate, _rate, _rate, _rate), _rate,
       st.tuples(*[st.integers(0, 10**9)] * 5), st.integers(0, 10**4))
def test_cost_nanos_is_the_exact_rational_cost_rounded_up(rates, search_rate, tokens, searches):
    from fractions import Fraction
    from proxy.usage import Usage

    price = pricing.ModelPrice(pricing.Rates(*rates), web_search_per_1k=search_rate)
    u = Usage(tokens[0], tokens[1], tokens[2], tokens[3], tokens[4], searches)
    r = pricing.Rates(*rates)
    exact = (Fraction(u.input_tokens) * Fraction(r.input) + Fraction(u.cache_write_5m_tokens) * Fraction(r.cache_write_5m)
             + Fraction(u.cache_write_1h_tokens) * Fraction(r.cache_write_1h)
             + Fraction(u.cache_read_tokens) * Fraction(r.cache_read)
             + Fraction(u.output_tokens) * Fraction(r.output)) * 1000 + Fraction(searches) * Fraction(search_rate) * 10**6
    assert pricing.cost_nanos(price, u) == math.ceil(exact)
    for i, kind in enumerate(pricing.INPUT_KINDS):
        rate = (r.input, r.cache_write_5m, r.cache_write_1h, r.cache_read)[i]
        assert pricing.input_cost_nanos(price, tokens[0], kind) == math.ceil(Fraction(tokens[0]) * Fraction(rate) * 1000)

import ast
import math
import re
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import proxy.pricing as pricing
from proxy.config import load_config
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
    strip_date_suffix,
)
from proxy.usage import Usage

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "pricing.yaml"

ANTHROPIC_IDS = [
    "claude-fable-5-2", "claude-mythos-5-2", "claude-fable-5-1", "claude-mythos-5-1", "claude-fable-5",
    "claude-mythos-5", "claude-opus-5-5", "claude-opus-5", "claude-opus-4-8", "claude-opus-4-7", "claude-opus-4-6",
    "claude-opus-4-5", "claude-opus-4-1", "claude-opus-4", "claude-sonnet-5-5", "claude-sonnet-5", "claude-sonnet-4-6",
    "claude-sonnet-4-5", "claude-sonnet-4", "claude-3-7-sonnet", "claude-haiku-5-5", "claude-haiku-4-5",
    "claude-3-5-haiku", "claude-3-opus", "claude-3-haiku",
]
OPENAI_IDS = [
    "gpt-6.2-astra", "gpt-6.2-sol", "gpt-6.1-sol", "gpt-6.1-terra", "gpt-6-astra", "gpt-6-sol", "gpt-6-luna",
    "gpt-5.6-sol", "gpt-5.6-terra", "gpt-5.6-luna", "gpt-5.5", "gpt-5.5-pro", "gpt-5.4", "gpt-5.4-pro",
    "gpt-5.4-mini", "gpt-5.4-nano", "gpt-5.3-codex", "gpt-5.2", "gpt-5.2-codex", "gpt-5.2-pro", "gpt-5.1",
    "gpt-5.1-codex", "gpt-5.1-codex-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-5-pro",
    "o4-mini", "o3", "o3-pro", "o3-mini", "o1", "o1-pro",
    "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-4o", "gpt-4o-2024-05-13", "gpt-4o-mini",
]
SHIPPED_ALIASES = {
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet", "claude-3-5-haiku-latest": "claude-3-5-haiku",
    "claude-3-opus-latest": "claude-3-opus", "claude-opus-4-0": "claude-opus-4", "claude-sonnet-4-0": "claude-sonnet-4",
    "gpt-5.6": "gpt-5.6-sol",
}
D = Decimal


@pytest.fixture(scope="module")
def shipped() -> PriceTable:
    return parse_price_table(yaml.safe_load(SHIPPED.read_text()))


def table(aliases: dict | None = None, **models: dict) -> PriceTable:
    return parse_price_table({"models": models, **({"aliases": aliases} if aliases is not None else {})})


def price(**fields: object) -> ModelPrice:
    return table(m={"input": 0, "output": 0, **fields}).models["m"]


ONE = {"input": 1, "output": 1}


# --- the shipped table -------------------------------------------------------------


def test_shipped_table_parses_with_its_date(shipped):
    assert shipped.checked == date(2026, 12, 7)
    assert set(shipped) == set(ANTHROPIC_IDS) | set(OPENAI_IDS)
    assert len(shipped) == len(ANTHROPIC_IDS) + len(OPENAI_IDS)
    assert dict(shipped.aliases) == SHIPPED_ALIASES


def test_every_shipped_model_resolves_to_itself(shipped):
    for model in shipped:
        assert model in shipped
        assert shipped.lookup(model) is shipped.models[model]
        assert shipped.models[model].model_id == model


def test_every_shipped_entry_has_max_output_tokens_a_source_and_a_date(shipped):
    raw = yaml.safe_load(SHIPPED.read_text())["models"]
    for model, p in shipped.models.items():
        assert isinstance(raw[model]["max_output_tokens"], int), model
        assert p.max_output_tokens == raw[model]["max_output_tokens"] >= 4096, model
        assert p.source and len(p.source) > 20, model
        assert p.checked == date(2026, 12, 7), model


def test_shipped_file_names_no_machine_path_and_no_url_in_its_comments():
    text = SHIPPED.read_text()
    assert not re.search(r"(/work/|/home/|/Users/|/tmp/|[A-Z]:\\)", text)
    comments = [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]
    assert comments and not any("://" in c for c in comments)


def test_shipped_unverified_figures_say_so(shipped):
    # every source that rests on a recalled or inferred figure says UNVERIFIED; spot-check some
    for model in ("gpt-6.2-astra", "gpt-6.1-sol", "gpt-5-pro", "gpt-4o-2024-05-13", "claude-3-opus"):
        assert "UNVERIFIED" in shipped.models[model].source, model
    for model in ("claude-fable-5-2", "claude-sonnet-5-5", "gpt-5.5"):
        assert "3P" in shipped.models[model].source, model


def test_shipped_web_search_is_anthropic_only(shipped):
    for model in ANTHROPIC_IDS:
        assert shipped.models[model].web_search_per_1k == D("10.00")
    for model in OPENAI_IDS:
        assert shipped.models[model].web_search_per_1k == 0


@pytest.mark.parametrize("model, expected", [
    # input, 5m write, 1h write, cache read, output; None = not checked (an unused default)
    ("claude-fable-5-2", ("8", "10", "16", "0.2", "40")),
    ("claude-mythos-5-2", ("8", "10", "16", "0.2", "40")),
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
    ("gpt-4o", ("2.5", None, None, "1.25", "10")),
    ("gpt-4o-2024-05-13", ("5", None, None, "5", "15")),
    ("gpt-5", ("1.25", None, None, "0.125", "10")),
    ("gpt-5-nano", ("0.05", None, None, "0.005", "0.4")),
    ("gpt-5-pro", ("15", None, None, "15", "120")),
    ("o3", ("2", None, None, "0.5", "8")),
    ("o3-mini", ("1.1", None, None, "0.55", "4.4")),
    ("o3-pro", ("20", None, None, "20", "80")),
    ("o1-pro", ("150", None, None, "150", "600")),
    ("gpt-5.5", ("5", None, None, "0.5", "30")),
    ("gpt-5.5-pro", ("30", None, None, "30", "180")),
    ("gpt-5.6-sol", ("5", "6.25", None, "0.5", "30")),
    ("gpt-5.6-luna", ("0.2", "0.25", None, "0.02", "1.2")),
    ("gpt-6-astra", ("10", "12.5", None, "1", "50")),
    ("gpt-6-luna", ("0.1", "0.125", None, "0.01", "0.5")),
    ("gpt-6.2-sol", ("2", "2.5", None, "0.1", "10")),
])
def test_shipped_rates(shipped, model, expected):
    r = shipped.models[model].rates
    for got, want in zip((r.input, r.cache_write_5m, r.cache_write_1h, r.cache_read, r.output), expected):
        if want is not None:
            assert got == D(want)


@pytest.mark.parametrize("model, above, long_input, long_output", [
    ("claude-haiku-5-5", 100_000, "0.5", "2.5"),
    ("claude-sonnet-4-5", 200_000, "6", "22.5"),
    ("claude-sonnet-4", 200_000, "6", "22.5"),
    ("gpt-5.4", 272_000, "5", "22.5"),
    ("gpt-5.5", 272_000, "10", "45"),
    ("gpt-5.6-terra", 272_000, "4", "18"),
    ("gpt-6-sol", 272_000, "4", "15"),
    ("gpt-6.1-terra", 272_000, "2", "7.5"),
])
def test_shipped_long_context(shipped, model, above, long_input, long_output):
    p = shipped.models[model]
    assert p.long_context_above == above
    assert p.long_context.input == D(long_input) and p.long_context.output == D(long_output)


def test_shipped_long_context_beta(shipped):
    """Sonnet 4 / 4.5 reach their long tier only through the 1M-context beta; the other
    long tiers need none; a model without a tier has no beta."""
    for model in ("claude-sonnet-4-5", "claude-sonnet-4"):
        assert shipped.models[model].long_context_beta == "context-1m-2025-08-07"
    for model in ("claude-haiku-5-5", "gpt-5.5", "gpt-6-astra", "claude-opus-5-5", "gpt-4o"):
        assert shipped.models[model].long_context_beta is None
    assert all(p.long_context is not None for p in shipped.models.values() if p.long_context_beta)


def test_shipped_haiku_5_5_long_context_cache_rates(shipped):
    lc = shipped.models["claude-haiku-5-5"].long_context
    assert (lc.cache_write_5m, lc.cache_write_1h, lc.cache_read) == (D("0.625"), D("1.00"), D("0.05"))


@pytest.mark.parametrize("model, limit", [
    ("claude-opus-5-5", 128_000), ("claude-haiku-4-5", 64_000), ("claude-opus-4-1", 32_000),
    ("claude-3-5-haiku", 8192), ("gpt-5-pro", 272_000), ("o3", 100_000), ("gpt-4.1", 32_768),
    ("gpt-4o", 16_384), ("gpt-4o-2024-05-13", 4096), ("gpt-6-astra", 128_000),
])
def test_shipped_max_output_tokens(shipped, model, limit):
    assert shipped.models[model].max_output_tokens == limit


# --- lookup ------------------------------------------------------------------------


@pytest.mark.parametrize("model, expected", [
    ("claude-opus-4-5", "claude-opus-4-5"),                  # 1. exact
    ("claude-sonnet-5-5", "claude-sonnet-5-5"),
    ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),              # exact, though it ends in a date
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),     # 2. without -YYYYMMDD
    ("claude-opus-4-5-20251101", "claude-opus-4-5"),
    ("claude-opus-4-20250514", "claude-opus-4"),
    ("claude-opus-4-1-20250805", "claude-opus-4-1"),
    ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
    ("claude-sonnet-5-20260101", "claude-sonnet-5"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),               # 2. without -YYYY-MM-DD
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
    ("gpt-5.4-2026-03-05", "gpt-5.4"),
    ("gpt-5-nano-2025-08-07", "gpt-5-nano"),
    ("gpt-5-pro-2025-10-06", "gpt-5-pro"),
    ("o3-mini-2025-01-31", "o3-mini"),
    ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),       # 3. aliases
    ("claude-opus-4-0", "claude-opus-4"),
    ("gpt-5.6", "gpt-5.6-sol"),
    ("gpt-5.6-2026-07-09", "gpt-5.6-sol"),                   # an alias, once undated
])
def test_lookup_exact_then_date_suffix_then_alias(shipped, model, expected):
    found = shipped.lookup(model)
    assert found is shipped.models[expected]
    assert found.model_id == expected                        # the metric label is the table's id
    assert model in shipped


@pytest.mark.parametrize("model, own, not_this", [
    ("gpt-5-nano", "0.05", "gpt-5"),
    ("gpt-5-mini", "0.25", "gpt-5"),
    ("gpt-5-pro", "15", "gpt-5"),
    ("o3-mini", "1.1", "o3"),
    ("o3-pro", "20", "o3"),
    ("o1-pro", "150", "o1"),
    ("gpt-5.2-pro", "21", "gpt-5.2"),
    ("gpt-5.4-pro", "30", "gpt-5.4"),
    ("gpt-5.5-pro", "30", "gpt-5.5"),
    ("gpt-4o-2024-05-13", "5", "gpt-4o"),
    ("gpt-4o-mini", "0.15", "gpt-4o"),
])
def test_variants_have_their_own_price_not_their_base_models(shipped, model, own, not_this):
    found = shipped.lookup(model)
    assert found.model_id == model and found.rates.input == D(own)
    assert found.rates.input != shipped.models[not_this].rates.input


def test_gpt_4o_2024_05_13_costs_its_own_price(shipped):
    u = Usage(input_tokens=1000, output_tokens=1000)
    assert cost_nanos(shipped.lookup("gpt-4o-2024-05-13"), u) == 1000 * 5_000 + 1000 * 15_000
    assert cost_nanos(shipped.lookup("gpt-4o-2024-08-06"), u) == 1000 * 2_500 + 1000 * 10_000


@pytest.mark.parametrize("model", [
    "unknown-model", "", "claude", "claude-opus", "claude-opus-45", "gpt-5.7", "gpt-5x", "o3x", "o3-",
    "anthropic.claude-opus-4", "claude-sonnet-4-5@20250929", "claude-sonnet-4-5-20250929-v1",
    "claude-sonnet-4-5-latest", "claude-sonnet-4-5-2025092", "claude-sonnet-4-5-20251399",
    "gpt-4o-2024-13-01", "gpt-4o-2024-05", "gpt-5-codex", "gpt-5.6-sol-fast", "-20250929",
])
def test_lookup_unknown_is_none(shipped, model):
    assert shipped.lookup(model) is None
    assert model not in shipped


def test_lookup_non_string_is_none(shipped):
    assert shipped.lookup(None) is None  # type: ignore[arg-type]
    assert 42 not in shipped


def test_never_by_prefix():
    t = table(**{"gpt-5": ONE, "o3": ONE, "claude-opus-4": ONE, "claude-": ONE, "gpt-5.": ONE, "gpt-4o": ONE})
    for model in ("gpt-5-nano", "gpt-5-pro", "gpt-5.6", "o3-mini", "o3-pro", "claude-opus-4-5",
                  "claude-opus-4-5-20251101", "claude-anything", "gpt-5.6-sol", "gpt-4o-mini"):
        assert t.lookup(model) is None, model
    assert t.lookup("claude-opus-4-20250514") is t.models["claude-opus-4"]


def test_the_date_suffix_strips_only_at_the_end_and_only_once():
    t = table(**{"m": ONE, "m-20250101": ONE})
    assert t.lookup("m-20250101-20250202") is t.models["m-20250101"]
    assert t.lookup("m-20250101-x") is None
    assert t.lookup("m-2025-01-01") is t.models["m"]


def test_exact_row_wins_over_the_undated_one():
    t = table(**{"gpt-4o": {"input": "2.5", "output": 10}, "gpt-4o-2024-05-13": {"input": 5, "output": 15}})
    assert t.lookup("gpt-4o-2024-05-13").rates.input == 5
    assert t.lookup("gpt-4o-2024-11-20").rates.input == D("2.5")


def test_an_alias_naming_the_exact_dated_id_wins_over_the_undated_model():
    """An alias is explicit about one exact id; removing a date is a rule of thumb."""
    t = table(aliases={"m-2024-05-13": "old"}, m={"input": 1, "output": 1}, old={"input": 9, "output": 9})
    assert t.lookup("m-2024-05-13") is t.models["old"]
    assert t.lookup("m-2024-08-06") is t.models["m"]


def test_alias_lookup_and_alias_after_the_date():
    t = table(aliases={"fam": "fam-sol", "short": "long-name"}, **{"fam-sol": ONE, "long-name": ONE})
    assert t.lookup("fam") is t.models["fam-sol"]
    assert t.lookup("fam-20260709") is t.models["fam-sol"]
    assert t.lookup("fam-2026-07-09").model_id == "fam-sol"
    assert t.lookup("fam-sol-x") is None and t.lookup("famx") is None
    assert "fam" in t and len(t) == 2 and set(t) == {"fam-sol", "long-name"}   # aliases are no models


@pytest.mark.parametrize("model, undated", [
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("gpt-5-2025-08-07", "gpt-5"),
    ("x-20240229", "x"),                                     # a leap day
    ("x-2024-02-29", "x"),
    ("x-20230229", None),                                    # not a date
    ("x-2025-02-30", None),
    ("x-20251301", None),
    ("x-2025-1-01", None),
    ("x-2025_01_01", None),
    ("x-202501011", None),
    ("x-٢٠٢٥٠١٠١", None),                                     # non-ASCII digits
    ("x20250101", None),
    ("-20250101", None),
    ("x-0000-01-01", None),
    ("", None),
])
def test_strip_date_suffix(model, undated):
    assert strip_date_suffix(model) == undated


def test_lookup_results_are_cached_and_the_cache_is_bounded():
    t = table(a=ONE)
    start = date(2000, 1, 1)
    for i in range(pricing._LOOKUP_CACHE_SIZE + 10):
        day = (start + timedelta(days=i)).strftime("%Y%m%d")
        assert t.lookup(f"a-{day}") is t.models["a"]          # hits through the date rule
        assert t.lookup(f"client-chosen-{i}") is None         # and misses
        assert len(t._cache) <= pricing._LOOKUP_CACHE_SIZE
    assert t.lookup("a-20250101") is t.lookup("a-20250101")
    assert "a-20250101" in t._cache
    assert "a" not in t._cache                                # exact ids never reach the cache


def test_lookup_cache_does_not_outlive_its_table():
    one = table(**{"a": {"input": 1, "output": 1}})
    two = table(**{"a": {"input": 2, "output": 2}})
    assert one.lookup("a-20250101").rates.input == 1
    assert two.lookup("a-20250101").rates.input == 2


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
    assert t.checked is None and dict(t.aliases) == {}
    p = t.models["m"]
    assert p.web_search_per_1k == 0 and p.long_context is None and p.long_context_above is None
    assert p.max_output_tokens is None and p.long_context_beta is None
    assert p.source is None and p.checked is None


def test_model_metadata_fields():
    p = parse_price_table(yaml.safe_load(
        "models:\n"
        "  m:\n"
        "    input: 3\n"
        "    output: 15\n"
        "    max_output_tokens: 64000\n"
        "    source: the provider's pricing page\n"
        "    checked: 2026-12-07\n"
        "    long_context: {above_input_tokens: 200000, requires_beta: context-1m-2025-08-07, input: 6, output: 22.5}\n"
    )).models["m"]
    assert p.max_output_tokens == 64000
    assert p.source == "the provider's pricing page" and p.checked == date(2026, 12, 7)
    assert p.long_context_beta == "context-1m-2025-08-07" and p.long_context_above == 200000
    assert p.model_id == "m"


def test_long_context_without_a_beta():
    p = price(long_context={"above_input_tokens": 100_000, "input": 1, "output": 1})
    assert p.long_context is not None and p.long_context_beta is None


def test_empty_model_table_is_allowed():
    assert len(parse_price_table({"checked": "2026-11-30", "models": {}, "aliases": {}})) == 0


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
            "claude-meta": {"input": 1, "output": 2, "max_output_tokens": 0, "source": "", "checked": "soon",
                            "requires_beta": "x",
                            "long_context": {"above_input_tokens": 1, "input": 1, "output": 1, "requires_beta": ""}},
        },
        "aliases": {"claude-alias": "claude-nowhere", "claude-neg": "claude-extra"},
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
    assert ("models.claude-meta.max_output_tokens", "must be >= 1") in problems
    assert ("models.claude-meta.source", "must not be empty") in problems
    assert ("models.claude-meta.requires_beta", "unknown field") in problems   # it belongs to long_context
    assert ("models.claude-meta.long_context.requires_beta", "must not be empty") in problems
    assert ("colour", "unknown field") in problems
    assert ("aliases.claude-neg", "shadows a model id: an alias may not replace a model's price") in problems
    assert {"checked", "models.claude-nan.input", "models.claude-nan.output", "models.claude-meta.checked",
            "aliases.claude-alias"} <= paths
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
    ({"models": {"m": {"input": 1, "output": 2, "max_output_tokens": True}}}, "models.m.max_output_tokens"),
    ({"models": {"m": {"input": 1, "output": 2, "max_output_tokens": 1.5}}}, "models.m.max_output_tokens"),
    ({"models": {"m": {"input": 1, "output": 2, "max_output_tokens": "64000"}}}, "models.m.max_output_tokens"),
    ({"models": {"m": {"input": 1, "output": 2, "max_output_tokens": -1}}}, "models.m.max_output_tokens"),
    ({"models": {"m": {"input": 1, "output": 2, "source": 7}}}, "models.m.source"),
    ({"models": {"m": {"input": 1, "output": 2, "checked": "2026-13-01"}}}, "models.m.checked"),
    ({"models": {"m": ONE}, "aliases": []}, "aliases"),
    ({"models": {"m": ONE}, "aliases": {"a": 7}}, "aliases.a"),
    ({"models": {"m": ONE}, "aliases": {"a": "z"}}, "aliases.a"),
    ({"models": {"m": ONE}, "aliases": {"m": "m"}}, "aliases.m"),
    ({"models": {"m": ONE}, "aliases": {" ": "m"}}, "aliases"),
])
def test_single_problem_paths(data, path):
    assert [p for p, _ in problems_of(data)] == [path]


def test_non_string_model_id_refused():
    assert problems_of({"models": {3: {"input": 1, "output": 2}}}) == [("models.3", "model id must be a string")]


def test_non_string_alias_refused():
    assert problems_of({"models": {"m": ONE}, "aliases": {3: "m"}}) == [("aliases.3", "alias must be a string")]


def test_alias_target_must_be_a_model_of_the_table():
    assert problems_of({"models": {"m": ONE}, "aliases": {"a": "nowhere"}}) == [
        ("aliases.a", "its target 'nowhere' is not a model in this table")]


def test_alias_may_not_shadow_a_model():
    problems = problems_of({"models": {"m": ONE, "n": ONE}, "aliases": {"m": "n"}})
    assert problems == [("aliases.m", "shadows a model id: an alias may not replace a model's price")]


def test_alias_may_not_point_at_another_alias():
    problems = problems_of({"models": {"m": ONE}, "aliases": {"a": "m", "b": "a"}})
    assert problems == [("aliases.b", "its target 'a' is not a model in this table")]


def test_alias_problems_are_listed_with_the_other_problems():
    problems = problems_of({"models": {"m": {"input": -1, "output": 1}}, "aliases": {"a": "z"}})
    assert problems == [("models.m.input", "must be >= 0"), ("aliases.a", "its target 'z' is not a model in this table")]


def test_aliases_of_an_invalid_models_section_are_not_judged():
    assert problems_of({"models": [], "aliases": {"a": "z"}}) == [("models", "must be a mapping")]


# --- check-config (docs/configuration.md `pricing`: the file, its date, unpriced allowed models) 


def write_config(tmp_path: Path, models: list[str], extra: str = "") -> Path:
    f = tmp_path / "proxy.yaml"
    f.write_text(f"{extra}teams:\n  research:\n    keys:\n      ci-bot:\n        key: test-secret-0123456789\n"
                 f"        models: {models!r}\n      notebook:\n        key: test-secret-9876543210\n")
    return f


def test_check_config_names_the_shipped_pricing_file_and_its_date(tmp_path):
    from proxy.__main__ import pricing_report

    lines = pricing_report(load_config(write_config(tmp_path, ["claude-sonnet-*", "gpt-5.6"])))
    assert lines == [f"pricing {SHIPPED} (shipped): checked 2026-12-07, {len(ANTHROPIC_IDS) + len(OPENAI_IDS)} "
                     f"models, {len(SHIPPED_ALIASES)} aliases"]


def test_check_config_lists_allowed_models_it_cannot_price(tmp_path):
    from proxy.__main__ import pricing_report

    models = ["claude-sonnet-*", "claude-sonnet-4-5-20250929", "claude-haiku-?-5", "gpt-[45]", "gpt-5-nano",
              "claude-nonexistent-9", "gpt-5.7", "gpt-4o-2024-05-13"]
    lines = pricing_report(load_config(write_config(tmp_path, models)))
    assert lines[1:] == [
        "  no price for 'claude-nonexistent-9', allowed to research/ci-bot",
        "  no price for 'gpt-5.7', allowed to research/ci-bot",
        "2 allowed model(s) have no price: requests for them are refused where a cost budget applies "
        "(admission.unpriced_models: deny)",
    ]


def test_check_config_with_a_pricing_file_of_its_own(tmp_path, capsys):
    from proxy.__main__ import main

    (tmp_path / "prices.yaml").write_text("checked: 2026-10-01\nmodels:\n  m: {input: 1, output: 2}\n"
                                          "aliases:\n  m-latest: m\n")
    cfg = write_config(tmp_path, ["m-latest", "m-20260101", "n"],
                       extra="pricing: prices.yaml\nadmission: {unpriced_models: allow}\n")
    assert main(["check-config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"pricing {tmp_path / 'prices.yaml'}: checked 2026-10-01, 1 models, 1 aliases\n" in out
    assert "  no price for 'n', allowed to research/ci-bot\n" in out
    assert "m-latest" not in out and "m-20260101" not in out
    assert "requests for them cost 0 (admission.unpriced_models: allow)" in out
    assert "test-secret" not in out


def test_check_config_pricing_file_without_a_date(tmp_path, capsys):
    from proxy.__main__ import main

    (tmp_path / "prices.yaml").write_text("models:\n  m: {input: 1, output: 2}\n")
    cfg = write_config(tmp_path, ["m"], extra="pricing: prices.yaml\n")
    assert main(["check-config", str(cfg)]) == 0
    assert "checked no date, 1 models, 0 aliases" in capsys.readouterr().out



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

"""Config loading and validation (docs/configuration.md): ${VAR} expansion, strict fields, YAML paths
in every error, every error listed at once, and never a secret in an error."""
from __future__ import annotations

import copy
import hashlib
import math
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, key_digest, load_config, parse_config, parse_duration
from proxy.config import expand_env

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "proxy.example.yaml"
SECRET = "sk-secret-7f3a9c1e5b2d4806aa11"
OTHER_SECRET = "sk-secret-other-0b9e8d7c6a5f4e3d"
KEY_PATH = "teams.research.keys.ci-bot"


def base(**key_fields: Any) -> dict[str, Any]:
    """A minimal valid config whose ci-bot key can be amended."""
    ci_bot: dict[str, Any] = {"key": SECRET}
    ci_bot.update(key_fields)
    return {"teams": {"research": {"keys": {"ci-bot": ci_bot}}}}


def problems_of(data: Any, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, {} if env is None else env)
    return info.value


def paths(err: ConfigError) -> list[str]:
    return [p for p, _ in err.problems]


def assert_no_secret(err: ConfigError, *secrets: str) -> None:
    text = str(err) + repr(err.problems)
    for s in secrets or (SECRET, OTHER_SECRET):
        assert s not in text


# --- the shipped example ---------------------------------------------------------


def test_example_config_parses_with_empty_environment() -> None:
    loaded = load_config(EXAMPLE, env={})
    cfg = loaded.proxy
    assert loaded.path == EXAMPLE
    assert set(cfg.teams) == {"research", "support"}
    assert set(cfg.teams["research"].keys) == {"ci-bot", "notebook"}
    assert set(cfg.teams["support"].keys) == {"agent"}
    ci = cfg.teams["research"].keys["ci-bot"]
    assert ci.budget.tokens == 2_000_000
    assert ci.budget.steps == 500
    assert ci.budget.wall_clock == 7200
    assert ci.budget.period == "day"
    assert ci.models == ["claude-sonnet-*", "claude-haiku-*"]
    assert cfg.teams["research"].budget.cost_usd == Decimal(50)
    assert cfg.teams["research"].budget.period == "month"
    assert cfg.teams["support"].budget.period == "week"
    assert cfg.store == "sqlite:///data/ledger.db"
    assert cfg.admin_key.get_secret_value() == ""
    assert cfg.upstreams["anthropic"].base_url == "https://api.anthropic.com"
    assert cfg.upstreams["anthropic"].api_key.get_secret_value() == ""
    assert cfg.limits.max_body_bytes == 33554432


def test_example_config_takes_values_from_environment() -> None:
    env = {
        "RESEARCH_CI_KEY": SECRET,
        "BUDGET_PROXY_STORE": "memory://",
        "ANTHROPIC_UPSTREAM_URL": "http://127.0.0.1:9999/",
        "BUDGET_PROXY_ADMIN_KEY": OTHER_SECRET,
    }
    cfg = load_config(EXAMPLE, env=env).proxy
    assert cfg.teams["research"].keys["ci-bot"].digest == key_digest(SECRET)
    assert cfg.store == "memory://"
    assert cfg.upstreams["anthropic"].base_url == "http://127.0.0.1:9999"
    assert cfg.admin_key.get_secret_value() == OTHER_SECRET


# --- ${VAR} expansion ------------------------------------------------------------


def test_var_set_is_expanded() -> None:
    cfg = parse_config({"store": "${STORE}"}, {"STORE": "memory://"}).proxy
    assert cfg.store == "memory://"


def test_var_embedded_and_multiple_in_one_string() -> None:
    cfg = parse_config({"store": "sqlite:///${DIR}/${NAME}.db"}, {"DIR": "/var/lib", "NAME": "l"}).proxy
    assert cfg.store == "sqlite:////var/lib/l.db"


def test_var_set_wins_over_default() -> None:
    cfg = parse_config({"store": "${STORE:-sqlite:///x.db}"}, {"STORE": "memory://"}).proxy
    assert cfg.store == "memory://"


def test_var_unset_uses_default_even_with_colons_and_slashes() -> None:
    cfg = parse_config({"store": "${STORE:-sqlite:///data/other.db}"}, {}).proxy
    assert cfg.store == "sqlite:///data/other.db"


def test_var_unset_with_empty_default_is_empty() -> None:
    cfg = parse_config({"admin_key": "${ADMIN:-}"}, {}).proxy
    assert cfg.admin_key.get_secret_value() == ""


def test_var_expands_secrets_into_keys() -> None:
    cfg = parse_config(base(key="${CI_KEY}"), {"CI_KEY": SECRET}).proxy
    assert cfg.teams["research"].keys["ci-bot"].digest == key_digest(SECRET)


def test_var_reads_process_environment_when_env_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BP_TEST_STORE_URL", "memory://")
    assert parse_config({"store": "${BP_TEST_STORE_URL}"}).proxy.store == "memory://"


def test_var_unset_without_default_names_variable_and_path() -> None:
    err = problems_of({"store": "${NO_SUCH_STORE_VAR}"})
    assert any(p == "store" and "NO_SUCH_STORE_VAR" in m for p, m in err.problems), err.problems
    assert "store" in str(err) and "NO_SUCH_STORE_VAR" in str(err)


def test_var_unset_in_key_names_variable_and_key_path_without_secret() -> None:
    err = problems_of(base(key="${RESEARCH_CI_KEY}"), {"OTHER": SECRET})
    assert any(p == f"{KEY_PATH}.key" and "RESEARCH_CI_KEY" in m for p, m in err.problems), err.problems
    assert_no_secret(err)


def test_var_unset_inside_list_reports_list_index_path() -> None:
    err = problems_of(base(models=["claude-*", "${MODEL_GLOB}"]))
    assert any(p == f"{KEY_PATH}.models.1" and "MODEL_GLOB" in m for p, m in err.problems), err.problems


def test_every_missing_variable_is_reported() -> None:
    err = problems_of({"store": "${A_MISSING}", "admin_key": "${B_MISSING}", "pricing": "${C_MISSING}"})
    text = str(err)
    for name in ("A_MISSING", "B_MISSING", "C_MISSING"):
        assert name in text


def test_var_set_but_empty_uses_default() -> None:
    cfg = parse_config({"store": "${STORE:-memory://}"}, {"STORE": ""}).proxy
    assert cfg.store == "memory://"


# --- unknown fields --------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, path",
    [
        (lambda d: d.update(stor="memory://"), "stor"),
        (lambda d: d.update(limits={"max_body": 1}), "limits.max_body"),
        (lambda d: d.update(admission={"clamp": True}), "admission.clamp"),
        (lambda d: d.update(upstreams={"anthropic": {"apikey": "x"}}), "upstreams.anthropic.apikey"),
        (lambda d: d["teams"]["research"].update(kys={}), "teams.research.kys"),
        (lambda d: d["teams"]["research"].update(budget={"costusd": 1}), "teams.research.budget.costusd"),
        (lambda d: d["teams"]["research"]["keys"]["ci-bot"].update(modelz=["x"]), f"{KEY_PATH}.modelz"),
        (lambda d: d["teams"]["research"]["keys"]["ci-bot"].update(budget={"tokenz": 5}), f"{KEY_PATH}.budget.tokenz"),
    ],
)
def test_unknown_field_refused_with_its_path(mutate: Any, path: str) -> None:
    data = base()
    mutate(data)
    err = problems_of(data)
    assert paths(err) == [path], err.problems
    assert path in str(err)
    assert_no_secret(err)


def test_unknown_upstream_name_refused() -> None:
    err = problems_of({"upstreams": {"azure": {}}})
    assert len(err.problems) == 1
    assert err.problems[0][0].startswith("upstreams.azure")


# --- limits ----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["tokens", "input_tokens", "output_tokens", "cost_usd", "steps", "wall_clock"])
def test_negative_key_limit_refused(field: str) -> None:
    err = problems_of(base(budget={field: -1}))
    assert paths(err) == [f"{KEY_PATH}.budget.{field}"], err.problems
    assert_no_secret(err)


@pytest.mark.parametrize("field", ["tokens", "cost_usd", "steps"])
def test_negative_team_limit_refused(field: str) -> None:
    data = base()
    data["teams"]["research"]["budget"] = {field: -5}
    err = problems_of(data)
    assert paths(err) == [f"teams.research.budget.{field}"], err.problems


def test_negative_limit_example_path() -> None:
    err = problems_of(base(budget={"tokens": -2000000}))
    assert "teams.research.keys.ci-bot.budget.tokens" in str(err)


def test_fractional_cost_accepted_exactly() -> None:
    cfg = parse_config(base(budget={"cost_usd": "0.10"}), {}).proxy
    assert cfg.teams["research"].keys["ci-bot"].budget.cost_usd == Decimal("0.10")


def test_key_without_budget_is_unlimited() -> None:
    b = parse_config(base(), {}).proxy.teams["research"].keys["ci-bot"].budget
    assert (b.tokens, b.input_tokens, b.output_tokens, b.cost_usd, b.steps, b.wall_clock) == (None,) * 6
    assert b.period == "none"


# --- durations and periods -------------------------------------------------------


GOOD_DURATIONS = [("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), (3600, 3600), ("3600", 3600),
                  ("1.5h", 5400), (0, 0), (2.5, 2.5)]


@pytest.mark.parametrize("text, seconds", GOOD_DURATIONS)
def test_good_duration_parsed_to_seconds(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds
    cfg = parse_config(base(budget={"wall_clock": text}), {}).proxy
    assert cfg.teams["research"].keys["ci-bot"].budget.wall_clock == seconds


BAD_DURATIONS = ["2x", "h", "", "-5s", "1.5.5h", "10 minutes", "abc", "s90", True, [1], {"h": 1}]


@pytest.mark.parametrize("value", BAD_DURATIONS)
def test_bad_duration_refused_with_path(value: Any) -> None:
    err = problems_of(base(budget={"wall_clock": value}))
    assert paths(err) == [f"{KEY_PATH}.budget.wall_clock"], err.problems
    assert_no_secret(err)


def test_nan_duration_refused() -> None:
    err = problems_of(base(budget={"wall_clock": math.nan}))
    assert paths(err) == [f"{KEY_PATH}.budget.wall_clock"]


@pytest.mark.parametrize("period", ["none", "hour", "day", "week", "month"])
def test_good_period(period: str) -> None:
    cfg = parse_config(base(budget={"period": period}), {}).proxy
    assert cfg.teams["research"].keys["ci-bot"].budget.period == period


@pytest.mark.parametrize("period", ["daily", "year", "", "monthly", 7, None])
def test_bad_period_refused_with_path(period: Any) -> None:
    data = base()
    data["teams"]["research"]["budget"] = {"period": period}
    err = problems_of(data)
    assert paths(err) == ["teams.research.budget.period"], err.problems


# --- key secrets -----------------------------------------------------------------


def two_keys(first: dict[str, Any], second: dict[str, Any], second_team: str = "research") -> dict[str, Any]:
    data: dict[str, Any] = {"teams": {"research": {"keys": {"ci-bot": first}}}}
    data["teams"].setdefault(second_team, {"keys": {}})["keys"]["notebook"] = second
    return data


@pytest.mark.parametrize("second_team", ["research", "support"])
def test_duplicate_raw_secrets_refused_naming_both_paths(second_team: str) -> None:
    err = problems_of(two_keys({"key": SECRET}, {"key": SECRET}, second_team))
    assert len(err.problems) == 1, err.problems
    text = str(err)
    assert KEY_PATH in text and f"teams.{second_team}.keys.notebook" in text
    assert_no_secret(err)


def test_duplicate_key_and_key_sha256_of_same_secret_refused_naming_both_paths() -> None:
    err = problems_of(two_keys({"key": SECRET}, {"key_sha256": key_digest(SECRET)}))
    assert len(err.problems) == 1, err.problems
    text = str(err)
    assert KEY_PATH in text and "teams.research.keys.notebook" in text
    assert_no_secret(err)


def test_duplicate_digests_refused() -> None:
    d = key_digest(SECRET)
    err = problems_of(two_keys({"key_sha256": d}, {"key_sha256": d}))
    assert KEY_PATH in str(err) and "teams.research.keys.notebook" in str(err)


def test_admin_key_equal_to_a_proxy_key_refused() -> None:
    data = base()
    data["admin_key"] = SECRET
    err = problems_of(data)
    assert "admin_key" in str(err) and KEY_PATH in str(err)
    assert_no_secret(err)


def test_distinct_secrets_accepted() -> None:
    cfg = parse_config(two_keys({"key": SECRET}, {"key_sha256": key_digest(OTHER_SECRET)}), {}).proxy
    keys = cfg.teams["research"].keys
    assert keys["ci-bot"].digest == "sha256:" + hashlib.sha256(SECRET.encode()).hexdigest()
    assert keys["notebook"].digest == key_digest(OTHER_SECRET)


def test_key_and_key_sha256_both_refused() -> None:
    err = problems_of(base(key_sha256=key_digest(OTHER_SECRET)))
    assert paths(err) == [KEY_PATH], err.problems
    assert_no_secret(err)


@pytest.mark.parametrize("entry", [{}, {"key": ""}, {"budget": {"tokens": 5}}])
def test_neither_key_nor_key_sha256_refused(entry: dict[str, Any]) -> None:
    err = problems_of({"teams": {"research": {"keys": {"ci-bot": entry}}}})
    assert paths(err) == [KEY_PATH], err.problems


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:abc",
        hashlib.sha256(SECRET.encode()).hexdigest(),  # no prefix
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "g" * 64,
        "md5:" + "a" * 64,
        SECRET,  # the raw secret pasted into the digest field
    ],
)
def test_malformed_key_sha256_refused(digest: str) -> None:
    err = problems_of({"teams": {"research": {"keys": {"ci-bot": {"key_sha256": digest}}}}})
    assert paths(err) == [f"{KEY_PATH}.key_sha256"], err.problems
    assert_no_secret(err)


# --- every problem at once -------------------------------------------------------


def test_four_problems_listed_at_once() -> None:
    data = base(budget={"tokenz": 1, "steps": -1, "wall_clock": "2 fortnights"})
    data["teams"]["research"]["budget"] = {"period": "daily"}
    err = problems_of(data)
    assert sorted(paths(err)) == sorted([
        f"{KEY_PATH}.budget.tokenz",
        f"{KEY_PATH}.budget.steps",
        f"{KEY_PATH}.budget.wall_clock",
        "teams.research.budget.period",
    ]), err.problems
    assert len(str(err).splitlines()) == 4
    assert_no_secret(err)


def test_problems_across_sections_listed_at_once() -> None:
    data = base(key_sha256="sha256:nothex")
    data.update(store="postgres://db", limits={"max_body_bytes": -1}, admission={"unpriced_models": "maybe"})
    err = problems_of(data, {})
    assert {"store", "limits.max_body_bytes", "admission.unpriced_models", f"{KEY_PATH}.key_sha256"} <= set(paths(err))


def test_duplicate_listed_together_with_other_problems() -> None:
    data = two_keys({"key": SECRET}, {"key": SECRET})
    data["teams"]["research"]["budget"] = {"tokens": -1}
    err = problems_of(data)
    assert "teams.research.budget.tokens" in paths(err)
    assert "teams.research.keys.notebook" in str(err) and KEY_PATH in str(err)


# --- secrets never in error text ---------------------------------------------------


def _with(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    *parents, leaf = path.split("/")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return data


SECRET_CASES = {
    "tokens": _with(base(), "teams/research/keys/ci-bot/budget/tokens", SECRET),
    "steps": _with(base(), "teams/research/keys/ci-bot/budget/steps", SECRET),
    "cost_usd": _with(base(), "teams/research/keys/ci-bot/budget/cost_usd", SECRET),
    "wall_clock": _with(base(), "teams/research/keys/ci-bot/budget/wall_clock", SECRET),
    "period": _with(base(), "teams/research/keys/ci-bot/budget/period", SECRET),
    "models": _with(base(), "teams/research/keys/ci-bot/models", SECRET),
    "budget": _with(base(), "teams/research/keys/ci-bot/budget", SECRET),
    "key_entry": _with(base(), "teams/research/keys/ci-bot", SECRET),
    "keys": _with(base(), "teams/research/keys", SECRET),
    "key_sha256": {"teams": {"research": {"keys": {"ci-bot": {"key_sha256": SECRET}}}}},
    "key_list": _with(base(), "teams/research/keys/ci-bot/key", [SECRET]),
    "key_and_digest": base(key_sha256=key_digest(SECRET)),
    "store": _with(base(), "store", SECRET),
    "base_url": _with(base(), "upstreams/anthropic/base_url", SECRET),
    "timeout": _with(base(), "upstreams/anthropic/timeout_seconds", SECRET),
    "max_body_bytes": _with(base(), "limits/max_body_bytes", SECRET),
    "input_estimate": _with(base(), "admission/input_estimate", SECRET),
    "admin_key_list": _with(base(), "admin_key", [SECRET]),
    "duplicate": two_keys({"key": SECRET}, {"key": SECRET}),
    "duplicate_digest": two_keys({"key": SECRET}, {"key_sha256": key_digest(SECRET)}),
    "admin_duplicate": _with(base(), "admin_key", SECRET),
}


@pytest.mark.parametrize("case", sorted(SECRET_CASES))
def test_secret_never_in_error_text(case: str) -> None:
    err = problems_of(SECRET_CASES[case])
    assert err.problems
    assert_no_secret(err)


def test_secret_from_environment_in_wrong_typed_field_not_in_error_text() -> None:
    data = base(budget={"tokens": "${RESEARCH_CI_KEY}", "wall_clock": "${RESEARCH_CI_KEY}"})
    err = problems_of(data, {"RESEARCH_CI_KEY": OTHER_SECRET})
    assert set(paths(err)) == {f"{KEY_PATH}.budget.tokens", f"{KEY_PATH}.budget.wall_clock"}
    assert_no_secret(err)


def test_secret_on_a_line_with_a_yaml_error_not_in_error_text(tmp_path: Path) -> None:
    f = tmp_path / "proxy.yaml"
    f.write_text(f'teams:\n  research:\n    keys:\n      ci-bot:\n        key: "{SECRET}\n')
    with pytest.raises(ConfigError) as info:
        load_config(f, env={})
    assert_no_secret(info.value)


# --- files -------------------------------------------------------------------------


@pytest.mark.parametrize("text,problem",
                         [(t, "YAML") for t in ["teams: {research: [\n", "a: b: c\n", "key: [1, 2\n", "\tteams: {}\n"]]
                         + [(t, "mapping") for t in ["- a\n- b\n", "just a string\n", "42\n"]])
def test_not_yaml_or_non_mapping_file_refused(tmp_path: Path, text: str, problem: str) -> None:
    f = tmp_path / "proxy.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(f, env={})
    assert len(info.value.problems) == 1
    assert problem in info.value.problems[0][1]


def test_missing_file_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml", env={})
    assert len(info.value.problems) == 1


def test_relative_paths_resolve_against_config_file(tmp_path: Path) -> None:
    f = tmp_path / "proxy.yaml"
    f.write_text("pricing: prices.yaml\nstore: memory://\n")
    loaded = load_config(f, env={})
    assert loaded.resolve(loaded.proxy.pricing) == tmp_path.resolve() / "prices.yaml"  # type: ignore[arg-type]
    assert loaded.resolve("/abs/p.yaml") == Path("/abs/p.yaml")


# --- store and upstreams -----------------------------------------------------------


def test_default_store() -> None:
    assert parse_config({}, {}).proxy.store == "sqlite:///data/ledger.db"


@pytest.mark.parametrize("url", ["memory://", "sqlite:///data/ledger.db", "sqlite:////var/lib/ledger.db",
                                 "redis://localhost:6379/0"])
def test_good_store_url(url: str) -> None:
    assert parse_config({"store": url}, {}).proxy.store == url


@pytest.mark.parametrize("url", ["postgres://db/x", "sqlite://relative.db", "data/ledger.db", "memory", "",
                                 "REDIS://h:1/0", 5])
def test_bad_store_url_refused(url: Any) -> None:
    err = problems_of({"store": url})
    assert paths(err) == ["store"], err.problems


def test_default_anthropic_upstream_when_none_given() -> None:
    ups = parse_config({}, {}).proxy.upstreams
    assert set(ups) == {"anthropic"}
    assert ups["anthropic"].base_url == "https://api.anthropic.com"
    assert ups["anthropic"].api_key.get_secret_value() == ""
    assert ups["anthropic"].timeout_seconds == 600


@pytest.mark.parametrize("upstreams", [{}, {"openai": {"base_url": "https://api.openai.com", "api_key": "x"}}])
def test_anthropic_upstream_added_when_missing(upstreams: dict[str, Any]) -> None:
    ups = parse_config({"upstreams": upstreams}, {}).proxy.upstreams
    assert ups["anthropic"].base_url == "https://api.anthropic.com"


def test_anthropic_upstream_defaults_fill_partial_entry() -> None:
    a = parse_config({"upstreams": {"anthropic": {"api_key": OTHER_SECRET}}}, {}).proxy.upstreams["anthropic"]
    assert a.base_url == "https://api.anthropic.com"
    assert a.api_key.get_secret_value() == OTHER_SECRET
    assert OTHER_SECRET not in repr(a)


def test_upstream_base_url_trailing_slash_stripped_and_scheme_required() -> None:
    ups = parse_config({"upstreams": {"anthropic": {"base_url": "http://sim:8000/"}}}, {}).proxy.upstreams
    assert ups["anthropic"].base_url == "http://sim:8000"
    err = problems_of({"upstreams": {"anthropic": {"base_url": "api.anthropic.com"}}})
    assert paths(err) == ["upstreams.anthropic.base_url"]


def test_openai_upstream_defaults_to_openai_base_url() -> None:
    ups = parse_config({"upstreams": {"openai": {"api_key": "x"}}}, {}).proxy.upstreams
    assert ups["openai"].base_url == "https://api.openai.com"


# --- ${VAR}_FILE secrets (docs/configuration.md) -------------------------------------------------


def secret_file(tmp_path: Path, content: str | bytes, name: str = "secret") -> str:
    f = tmp_path / name
    f.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(f)


def test_var_file_used_when_var_unset(tmp_path: Path) -> None:
    env = {"CI_KEY_FILE": secret_file(tmp_path, SECRET + "\n")}
    cfg = parse_config(base(key="${CI_KEY}"), env).proxy
    assert cfg.teams["research"].keys["ci-bot"].digest == key_digest(SECRET)


def test_var_file_used_when_var_empty(tmp_path: Path) -> None:
    env = {"CI_KEY": "", "CI_KEY_FILE": secret_file(tmp_path, SECRET)}
    cfg = parse_config(base(key="${CI_KEY}"), env).proxy
    assert cfg.teams["research"].keys["ci-bot"].digest == key_digest(SECRET)


def test_var_file_takes_the_place_of_the_default(tmp_path: Path) -> None:
    env = {"STORE_FILE": secret_file(tmp_path, "memory://\n")}
    assert parse_config({"store": "${STORE:-sqlite:///x.db}"}, env).proxy.store == "memory://"
    env["STORE"] = ""  # empty counts as unset, as for the default
    assert parse_config({"store": "${STORE:-sqlite:///x.db}"}, env).proxy.store == "memory://"


def test_var_file_embedded_in_a_longer_string(tmp_path: Path) -> None:
    env = {"DIR_FILE": secret_file(tmp_path, "/var/lib\n")}
    assert parse_config({"store": "sqlite:///${DIR}/l.db"}, env).proxy.store == "sqlite:////var/lib/l.db"


def test_var_set_and_var_file_empty_takes_var() -> None:
    cfg = parse_config({"store": "${STORE}"}, {"STORE": "memory://", "STORE_FILE": ""}).proxy
    assert cfg.store == "memory://"


@pytest.mark.parametrize(("content", "value"), [
    ("s3cret", "s3cret"),
    ("s3cret\n", "s3cret"),
    ("s3cret\r\n", "s3cret"),
    ("s3cret\n\n", "s3cret\n"),          # one newline only
    ("s3cret\r\n\r\n", "s3cret\r\n"),
    ("s3cret\r", "s3cret\r"),            # a lone CR is not a newline here
    (" s3cret \n", " s3cret "),          # no other whitespace is touched
    ("\n", ""),
    ("", ""),
])
def test_var_file_strips_one_trailing_newline(tmp_path: Path, content: str, value: str) -> None:
    problems: list[tuple[str, str]] = []
    assert expand_env("${V}", {"V_FILE": secret_file(tmp_path, content)}, "p", problems) == value
    assert problems == []


def test_var_file_content_is_not_expanded_again(tmp_path: Path) -> None:
    problems: list[tuple[str, str]] = []
    assert expand_env("${V}", {"V_FILE": secret_file(tmp_path, "${OTHER}\n")}, "p", problems) == "${OTHER}"
    assert problems == []


def test_var_and_var_file_both_set_is_an_error_naming_both(tmp_path: Path) -> None:
    env = {"CI_KEY": OTHER_SECRET, "CI_KEY_FILE": secret_file(tmp_path, SECRET)}
    err = problems_of(base(key="${CI_KEY}"), env)
    msg = dict(err.problems)[f"{KEY_PATH}.key"]
    assert "both CI_KEY and CI_KEY_FILE" in msg
    assert_no_secret(err)


def test_var_and_var_file_both_set_is_an_error_even_with_a_default(tmp_path: Path) -> None:
    env = {"STORE": "memory://", "STORE_FILE": secret_file(tmp_path, "memory://")}
    err = problems_of({"store": "${STORE:-memory://}"}, env)
    assert any(p == "store" and "STORE_FILE" in m for p, m in err.problems), err.problems


def test_var_file_missing_is_an_error_naming_the_variable(tmp_path: Path) -> None:
    err = problems_of(base(key="${CI_KEY:-bp-fallback-key-000000}"), {"CI_KEY_FILE": str(tmp_path / "nope")})
    msg = dict(err.problems)[f"{KEY_PATH}.key"]
    assert "CI_KEY_FILE" in msg
    assert "bp-fallback-key-000000" not in str(err)  # the default is not used in its place


def test_var_file_that_is_a_directory_is_an_error(tmp_path: Path) -> None:
    err = problems_of({"store": "${STORE}"}, {"STORE_FILE": str(tmp_path)})
    assert paths(err)[0] == "store" and "STORE_FILE" in err.problems[0][1], err.problems


def test_var_file_unreadable_or_not_text_never_shows_the_content(tmp_path: Path) -> None:
    def unreadable(path: str) -> str:
        raise PermissionError(13, "Permission denied", path)

    problems: list[tuple[str, str]] = []
    assert expand_env({"k": "${V}"}, {"V_FILE": "/run/secrets/v"}, "", problems, unreadable) == {"k": ""}
    assert len(problems) == 1 and problems[0][0] == "k"
    assert "V_FILE" in problems[0][1] and "Permission denied" in problems[0][1]

    binary = SECRET.encode() + b"\xff\xfe"
    err = problems_of({"store": "${STORE}"}, {"STORE_FILE": secret_file(tmp_path, binary)})
    assert paths(err)[0] == "store" and "STORE_FILE" in err.problems[0][1], err.problems
    assert_no_secret(err)


def test_var_file_content_in_a_wrong_typed_field_not_in_error_text(tmp_path: Path) -> None:
    env = {"CI_TOKENS_FILE": secret_file(tmp_path, SECRET + "\n")}
    err = problems_of(base(budget={"tokens": "${CI_TOKENS:-100}"}), env)
    assert paths(err) == [f"{KEY_PATH}.budget.tokens"]
    assert_no_secret(err)


def test_var_file_reads_go_through_the_given_reader() -> None:
    files = {"/run/secrets/store": "memory://\r\n", "/run/secrets/key": SECRET + "\n"}
    calls: list[str] = []

    def reader(path: str) -> str:
        calls.append(path)
        return files[path]

    env = {"STORE_FILE": "/run/secrets/store", "KEY_FILE": "/run/secrets/key", "ADMIN": OTHER_SECRET,
           "ADMIN_FILE": ""}
    problems: list[tuple[str, str]] = []
    node = {"store": "${STORE:-x}", "keys": ["${KEY}"], "admin": "${ADMIN}", "n": 3}
    out = expand_env(node, env, "", problems, reader)
    assert out == {"store": "memory://", "keys": [SECRET], "admin": OTHER_SECRET, "n": 3}
    assert problems == []
    assert sorted(calls) == ["/run/secrets/key", "/run/secrets/store"]


def test_var_file_not_read_when_var_and_var_file_both_set() -> None:
    calls: list[str] = []
    problems: list[tuple[str, str]] = []
    expand_env("${V}", {"V": "a", "V_FILE": "/f"}, "p", problems, lambda p: calls.append(p) or "b")
    assert calls == [] and len(problems) == 1


def test_example_config_reads_docker_secrets(tmp_path: Path) -> None:
    env = {"ANTHROPIC_API_KEY_FILE": secret_file(tmp_path, OTHER_SECRET + "\n", "anthropic_api_key"),
           "RESEARCH_CI_KEY_FILE": secret_file(tmp_path, SECRET + "\n", "research_ci_key"),
           "BUDGET_PROXY_STORE": "memory://"}
    cfg = load_config(EXAMPLE, env=env).proxy
    assert cfg.upstreams["anthropic"].api_key.get_secret_value() == OTHER_SECRET
    assert cfg.teams["research"].keys["ci-bot"].digest == key_digest(SECRET)

"""User-defined formats: config loading, clear startup errors naming the pattern, glob, units, and a property test
that random numbers and spacing through a user regex come back exactly."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwatch.config import ConfigError
from rankwatch.formats.user import compile_format, compile_formats, load_user_formats
from rankwatch.parsing import ContextResolver, ParseError, SourceContext, parse_line

CONFIG = r'''
[[formats]]
name = "my-trainer"
regex = 'step=(?P<step>\d+) loss=(?P<loss>\S+) dt=(?P<dt>[\d.]+)ms mem=(?P<mem>[\d.]+)MiB'
fields = { dt = "step_time_s", mem = "memory_gib" }
units = { dt = "ms", mem = "MiB" }
glob = "*/train*.log"

[[formats]]
name = "restart"
regex = 'RESTART attempt (?P<attempt>\d+) reason=(?P<reason>\w+)'
kind = "log"
'''


def write(tmp_path, text):
    p = tmp_path / "rw.toml"
    p.write_text(text)
    return str(p)


def test_config_formats_are_tried_first_and_limited_to_their_glob(tmp_path):
    formats = load_user_formats(write(tmp_path, CONFIG), env={})
    assert [f.name for f in formats] == ["my-trainer", "restart"]
    (tmp_path / "job" / "rank1").mkdir(parents=True)
    r = ContextResolver([str(tmp_path / "job")], formats=formats)
    c = r.context("a", str(tmp_path / "job" / "rank1" / "train.log"))
    rec = parse_line("2024-01-01T00:00:00Z step=12 loss=2.5e-1 dt=1500.5ms mem=2048MiB", c)
    assert rec.kind == "metrics" and rec.rank == 1 and c.last_format == "my-trainer"
    assert rec.data == {"step": 12, "loss": 0.25, "step_time_s": 1.5005, "memory_gib": 2.0}
    ev = parse_line("RESTART attempt 3 reason=oom", c)
    assert ev.kind == "log" and ev.data["event"] == "restart" and ev.data["fields"] == {"attempt": 3.0,
                                                                                          "reason": "oom"}
    other = r.context("b", str(tmp_path / "job" / "rank1" / "eval.log"))  # glob does not match: built-ins only
    assert parse_line("step=12 loss=0.25 dt=1.0ms mem=1MiB", other).kind == "log"
    assert [f.name for f in other.user_formats] == ["restart"]


def test_user_formats_come_before_builtin_ones(tmp_path):
    formats = compile_formats([{"name": "mine", "regex": r"iteration (?P<step>\d+)/.*lm loss: (?P<loss>\S+) \|"}])
    c = SourceContext(path="/x.log", job="j", user_formats=formats)
    rec = parse_line(" iteration 5/ 10 | lm loss: 2.0 | grad norm: 1.0 |", c)
    assert c.last_format == "mine" and rec.data == {"step": 5, "loss": 2.0}  # not Megatron's reading
    c2 = SourceContext(path="/x.log", job="j", user_formats=formats)
    assert parse_line('{"step": 1, "loss": 3.0}', c2).data == {"step": 1, "loss": 3.0}  # JSON still works


def test_lines_without_a_step_group_use_the_file_counter():
    c = SourceContext(path="/x.log", job="j", user_formats=compile_formats(
        [{"name": "nostep", "regex": r"train loss (?P<loss>\S+)"}]))
    assert [parse_line(f"train loss {v}", c).data["step"] for v in (1, 2, 3)] == [0, 1, 2]


def test_a_matched_group_that_is_not_a_number_is_a_dead_letter():
    c = SourceContext(path="/x.log", job="j", user_formats=compile_formats(
        [{"name": "m", "regex": r"loss=(?P<loss>\S+)"}]))
    with pytest.raises(ParseError, match="format m: loss is not a number"):
        parse_line("loss=high", c)


@pytest.mark.parametrize(("spec", "message"), [
    ({"name": "bad", "regex": "step (?P<step"}, "format 'bad': bad regex 'step (?P<step'"),
    ({"name": "nogroups", "regex": r"loss \d+"}, "has no named group"),
    ({"name": "u", "regex": r"t=(?P<t>\d+)", "units": {"t": "fortnights"}}, "unknown unit 'fortnights'"),
    ({"name": "g", "regex": r"t=(?P<t>\d+)", "fields": {"x": "loss"}}, "'x' is not a named group"),
    ({"name": "k", "regex": r"t=(?P<t>\d+)", "kind": "ops"}, "kind must be"),
    ({"name": "typo", "regex": r"t=(?P<t>\d+)", "unit": {"t": "ms"}}, "unknown keys ['unit']"),
    ({"name": "onlystep", "regex": r"s=(?P<step>\d+)"}, "no metric group besides step"),
    ({"regex": r"t=(?P<t>\d+)"}, "name must be"),
])
def test_bad_formats_are_clear_startup_errors_naming_the_format(spec, message):
    with pytest.raises(ConfigError) as exc:
        compile_format(spec, 0)
    assert message in str(exc.value)


def test_bad_pattern_in_a_config_file_stops_analyze_and_the_shipper_with_the_pattern_named(tmp_path):
    from rankwatch.producers.shipper import main as producer_main

    from rankwatch.cli import main

    cfg = write(tmp_path, "[[formats]]\nname = 'broken'\nregex = 'loss=(?P<loss>[0-9'\n")
    (tmp_path / "a.log").write_text("x\n")
    assert main(["analyze", str(tmp_path / "a.log"), "--config", cfg]) == 2
    assert main(["inspect", str(tmp_path / "a.log"), "--config", cfg]) == 2
    assert producer_main(["--tail", str(tmp_path / "a.log"), "--config", cfg, "--once"]) == 2


def test_formats_from_the_environment_as_json():
    formats = load_user_formats(None, env={"RANKWATCH_FORMATS": '[{"name": "e", "regex": "l=(?P<loss>\\\\S+)"}]'})
    assert formats[0].name == "e"
    with pytest.raises(ConfigError):
        load_user_formats(None, env={"RANKWATCH_FORMATS": "not json"})


# ---- property: any numbers, any spacing, through a user's regex --------------------------------------------
numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=64), st.integers(-10**12, 10**12),
                    st.sampled_from([math.nan, math.inf, -math.inf]))
styles = st.sampled_from(["{!r}", "{:.3e}", "{:.6f}", "{:g}", "{:E}"])


def _text(x, style: str) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return {True: "nan"}.get(math.isnan(x), "inf" if x > 0 else "-inf")
    return style.format(x) if isinstance(x, float) else str(x)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**9), numbers, numbers, styles, st.integers(1, 5), st.sampled_from(["ms", "s", "us"]),
       st.sampled_from(["\x1b[32m", "", "\x1b[0m"]))
def test_property_user_regex_returns_exactly_the_printed_numbers(step, loss, dt, style, pad, unit, colour):
    fmt = compile_formats([{"name": "p", "regex": r"it=(?P<step>\d+)\s+loss=(?P<loss>\S+)\s+dt=(?P<dt>\S+)",
                            "fields": {"dt": "step_time_s"}, "units": {"dt": unit}}])
    c = SourceContext(path="/x.log", job="j", user_formats=fmt)
    lt, dtt = _text(loss, style), _text(dt, style)
    sep = " " * pad
    rec = parse_line(f"{colour}it={step}{sep}loss={lt}{colour}{sep}dt={dtt}", c)
    assert rec.kind == "metrics" and rec.data["step"] == step
    want_loss, want_dt = float(lt), float(dtt) * {"ms": 1e-3, "s": 1.0, "us": 1e-6}[unit]
    assert (math.isnan(want_loss) and math.isnan(rec.data["loss"])) or rec.data["loss"] == want_loss
    got = rec.data["step_time_s"]
    assert (math.isnan(want_dt) and math.isnan(got)) or got == want_dt or math.isclose(got, want_dt)

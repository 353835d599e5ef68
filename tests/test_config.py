from __future__ import annotations

import pytest
from rankwatch.processors.pipeline import DetectionConfig

from rankwatch.config import ConfigError, Settings, load_config


def test_precedence_cli_over_env_over_file_over_default(tmp_path):
    f = tmp_path / "rankwatch.toml"
    f.write_text('bootstrap = "file:1"\npartitions = 3\njob = "fromfile"\nmetrics_port = 1\n'
                 '[detection]\nwindow = 30\nloss_threshold_factor = 2.0\n')
    env = {"RANKWATCH_BOOTSTRAP": "env:2", "RANKWATCH_PARTITIONS": "5"}
    s = load_config(Settings, {"bootstrap": "cli:3", "job": None}, env=env, path=f)
    assert s.bootstrap == "cli:3"  # CLI wins
    assert s.partitions == 5  # env beats file
    assert s.job == "fromfile"  # file beats default; CLI None means "not given"
    assert s.metrics_port == 1
    assert s.topic_anomalies == "anomalies"  # default
    d = load_config(DetectionConfig, {}, env={}, path=f, section="detection")
    assert d.window == 30 and d.loss_threshold_factor == 2.0 and d.factor("loss") == 2.0


def test_config_file_from_env_and_bad_values(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('topic_anomalies = "alerts"\n')
    s = load_config(Settings, {}, env={"RANKWATCH_CONFIG": str(f)})
    assert s.topic_anomalies == "alerts"
    with pytest.raises(ConfigError, match="partitions"):
        load_config(Settings, {}, env={"RANKWATCH_PARTITIONS": "many"})
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(Settings, {}, env={}, path=bad)


def test_security_settings_reach_both_clients():
    s = load_config(Settings, {}, env={
        "RANKWATCH_BOOTSTRAP": "k1:9093,k2:9093", "RANKWATCH_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "RANKWATCH_SASL_MECHANISM": "SCRAM-SHA-512", "RANKWATCH_SASL_USERNAME": "u",
        "RANKWATCH_SASL_PASSWORD": "p"})
    kw = s.kafka_kwargs()
    assert kw["bootstrap_servers"] == ["k1:9093", "k2:9093"]
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512" and kw["sasl_plain_password"] == "p"
    assert s.faust_broker() == ["kafka://k1:9093", "kafka://k2:9093"]
    creds = s.faust_credentials()
    assert creds.username == "u" and creds.mechanism.value == "SCRAM-SHA-512"
    with pytest.raises(ConfigError):
        Settings().kafka_kwargs()


def test_threshold_factor_overrides_every_signal():
    d = DetectionConfig(threshold_factor=2.0)
    assert d.factor("loss") == d.factor("grad_norm") == 2.0
    assert DetectionConfig().factor("grad_norm") > DetectionConfig().factor("loss")

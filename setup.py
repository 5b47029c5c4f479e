"""Build hook: the wheel carries the repository's ablations/*.yaml as harness/examples/ (`harness examples`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithExamples(build_py):
    """build_py, then a copy of ablations/*.yaml (their one source) into the built package."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "harness" / "examples"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted((ROOT / "ablations").glob("*.yaml")):
            shutil.copyfile(source, target / source.name)


setup(cmdclass={"build_py": BuildWithExamples})

"""What is installed against what the suite last passed with (``constraints.txt``), and the package's ranges
against both. A fresh venv without ``-c constraints.txt`` takes the newest releases pyproject.toml admits; this
test then says which differ and what to do, instead of a failure somewhere deep in a parallel run."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from helpers.launch import ROOT
from lightning_mp import _compat

# Packages whose internals lightning_mp reads (private torch and Lightning names, transformers' plans): a release
# other than the tested one may change behaviour without an error.
READ_INSIDE = ("torch", "transformers", "lightning")


def tested_versions() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if match := re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip()):
            pins[match.group(1).lower().replace("_", "-")] = Version(match.group(2))
    return pins


def installed(name: str) -> Version | None:
    try:
        return Version(version(name))
    except PackageNotFoundError:
        return None


def test_the_packages_read_inside_are_the_tested_releases():
    tested = tested_versions()
    differ = {name: (installed(name), tested[name]) for name in READ_INSIDE
              if installed(name) is None or installed(name).release != tested[name].release}
    assert not differ, (
        "installed " + ", ".join(f"{n} {have}" for n, (have, _) in differ.items()) + "; the suite last passed with "
        + ", ".join(f"{n} {want}" for n, (_, want) in differ.items()) + " (constraints.txt). Install those"
        " (`pip install -c constraints.txt -e '.[test,assets,llm]'`), or, to move to the new release, run the whole"
        " suite on it (README, second command) and update constraints.txt and the bounds in pyproject.toml.")


def test_the_package_ranges_admit_the_tested_releases():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    tested = tested_versions()
    for line in project["dependencies"]:
        requirement = Requirement(line)
        name = requirement.name.lower()
        assert name in tested, f"{name} (a dependency) has no line in constraints.txt"
        assert requirement.specifier.contains(tested[name], prereleases=True), (
            f"pyproject.toml asks for {line}, which excludes the tested {name} {tested[name]}")
        if name in READ_INSIDE:  # a newer release may break what lightning_mp reads: bounded above
            assert any(spec.operator in ("<", "<=", "==") for spec in requirement.specifier), (
                f"{line}: {name} is read inside, so its range needs an upper bound")


def test_compat_names_the_tested_releases():
    tested = tested_versions()
    assert str(tested["torch"]).startswith(_compat.TESTED_TORCH + ".")
    assert str(tested["lightning"]).startswith(_compat.TESTED_LIGHTNING + ".")


def test_ci_runs_the_readme_test_command_with_the_tested_versions():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2, "README starts with two commands: the NER recipe, then the whole test suite"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()[-1]
    assert ci == commands[1], f".ci/run must run exactly the README's test command:\n{ci}\n{commands[1]}"
    for command in commands:
        installs = [step for step in command.split(" && ") if step.startswith("pip install") and "torch==" not in step]
        assert installs and all("-c constraints.txt" in step for step in installs), command

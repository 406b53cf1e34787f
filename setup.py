"""Only the package list, which pyproject.toml cannot express: every lightning_mp subpackage (found, so a new
one is never left out of the wheel) plus conf/ and recipes/, mapped there to lightning_mp.conf / .recipes."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["lightning_mp", "lightning_mp.*"])
      + ["lightning_mp.recipes", "lightning_mp.conf"])

"""Fixtures shared by the test modules."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: on a shared 2-core machine extra intra-op threads mostly wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_tmp_path(request, tmp_path_factory) -> Iterator[Path]:
    """A folder for the shared fixtures of one test module, removed after the module's last test.

    Bundle runs write checkpoints of tens of MB and CI machines can have little free disk; the folders of
    single tests are removed when they pass (``tmp_path_retention_policy`` in ``pyproject.toml``).
    """
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    shutil.rmtree(path, ignore_errors=True)

"""Roles and labels of the TRA tables: what the user names full-OOD is full-OOD, and two
datasets never share one row."""

from __future__ import annotations

import shutil

import pytest
from cir.cli.analyze import _table_datasets
from cir.cli.common import CliError
from cir.router.analysis import role_of


def test_role_of_follows_the_full_ood_list():
    assert role_of("code", "code") == "in-domain"
    assert role_of("code", "random") == "full-OOD"
    assert role_of("code", "docs") == "semi-OOD"
    assert role_of("code", "man-pages", full_ood=("random", "man-pages")) == "full-OOD"


def test_two_datasets_with_one_label_are_refused(tiny_dataset, tiny_prose_dataset, tmp_path):
    a, b = tmp_path / "a" / "set", tmp_path / "b" / "set"
    shutil.copytree(tiny_dataset, a)
    shutil.copytree(tiny_prose_dataset, b)
    with pytest.raises(CliError, match="two datasets are labelled 'set'"):
        _table_datasets(None, [str(a)], [str(b)], [], "test")

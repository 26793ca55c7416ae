"""What counts as a change of what the ZEO server runs: not the order in which a recipe
happened to write the same eggs (plone.recipe.zeoserver follows a set)."""

from __future__ import annotations

from agent.adapters.programrecords import _order_free


def test_the_same_path_list_in_another_order_is_the_same_file() -> None:
    one = b'#!/bin/sh\nPYTHONPATH="/e/ZODB.egg:/e/ZEO.egg:/venv/site-packages:"\nexec "$@"\n'
    two = b'#!/bin/sh\nPYTHONPATH="/venv/site-packages:/e/ZEO.egg:/e/ZODB.egg:"\nexec "$@"\n'
    assert _order_free(one) == _order_free(two)


def test_a_list_of_egg_paths_one_per_line_is_compared_as_a_set() -> None:
    assert _order_free(b"/e/b.egg\n/e/a.egg\n") == _order_free(b"/e/a.egg\n/e/b.egg\n")


def test_a_different_egg_is_a_change() -> None:
    assert _order_free(b'PYTHONPATH="/e/ZEO-6.2.egg"') != _order_free(
        b'PYTHONPATH="/e/ZEO-6.3.egg"'
    )


def test_other_lines_keep_their_order() -> None:
    assert _order_free(b"stop\nstart\n") != _order_free(b"start\nstop\n")

"""What the test suites share: real components (Mosquitto, supervisord, git, agent
processes) and the small helpers around them, one of each.

``tests/`` is on sys.path (pytest's ``prepend`` import mode puts the rootdir conftest's
directory there), so test modules import ``from support.broker import ...``.
"""

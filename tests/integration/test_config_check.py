"""`deploy-agent config check` as a subprocess: its exit status and what it prints."""

from __future__ import annotations

from support.cli import run_cli


def test_config_check_exits_0_on_a_good_file():
    result = run_cli("config", "check", "config/agent.example.yaml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_config_check_exits_2_and_lists_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stack: s\napps:\n  a: {repository: /r, keep_releases: many}\nextra: 1\n")
    result = run_cli("config", "check", str(bad))
    assert result.returncode == 2
    assert "apps.a.keep_releases" in result.stderr
    assert "extra: unknown key" in result.stderr
    assert "Traceback" not in result.stderr

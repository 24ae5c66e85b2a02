"""The README's two commands are the ones CI and a new user run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    blocks, inside = [], False
    for line in lines:
        if line.startswith("```"):
            inside = not inside
        elif inside:
            blocks.append(line.strip())
        if len(blocks) == 2 and not inside:
            break
    return blocks


def test_readme_starts_with_the_two_commands():
    main_job, tests = _readme_commands()
    assert main_job == "./setup.sh && python scripts/train.py --net lenet --backend jax"
    assert tests.startswith("./setup.sh && python -m pytest")


def test_ci_runs_the_readme_test_command():
    _, tests = _readme_commands()
    ci = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()
          if l.strip() and not l.startswith("#")]
    assert ci[-1] == tests

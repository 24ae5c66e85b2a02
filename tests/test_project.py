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


def test_the_readme_is_short_and_no_file_reads_like_a_diary():
    """Users get at most 200 README lines; the repo describes the product as it is, so no
    comment, docstring or page counts work periods or names issue numbers or days."""
    import re
    import subprocess

    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    diary = re.compile(r"\b(session|sessions|work period) \d|\bissue #?\d|\b20\d\d-\d\d-\d\d\b", re.I)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    texts = [p for p in tracked if p.endswith((".py", ".md", ".toml", ".sh"))]
    result_file = re.compile(r"[\w.-]+\.json")  # measured runs are named by machine and day
    assert len(texts) > 40
    hits = [f"{p}:{i}" for p in texts for i, line in enumerate((ROOT / p).read_text().splitlines(), 1)
            if diary.search(result_file.sub("", line))]
    assert hits == []

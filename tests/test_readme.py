"""README names only paths that exist: every `trainer/…`, `models/…`, `data/…`, `scripts/…`, `slurm/…`,
`tests/…` path in backticks, and the bare file names of the Design section's layout table (relative to the
folder their row names)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOTS = ("trainer/", "models/", "data/", "scripts/", "slurm/", "tests/")
# A file (it has an extension) or a folder (trailing slash); `data/skipped_samples` is a stats key, not a path.
PATH = re.compile(r"(?<![\w/.~-])((?:%s)[\w./-]*(?:\.\w+|/))" % "|".join(re.escape(r) for r in ROOTS))


def named_paths(text: str) -> list[tuple[int, str]]:
    """(line number, path) for every repository path inside backticks, and for each bare `name.py` in a
    layout-table row whose first cell is a folder (`| \\`trainer/run/\\` | … (\\`launch.py\\`) … |`)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        spans = re.findall(r"`([^`]+)`", line)
        for span in spans:
            found += [(number, path) for path in PATH.findall(span)]
        folder = re.match(r"\|\s*`((?:%s)[\w/]*/)`\s*\|" % "|".join(map(re.escape, ROOTS)), line)
        if folder:
            found += [(number, folder.group(1) + span) for span in spans if re.fullmatch(r"[\w.]+\.py", span)]
    return found


def test_named_paths_are_found():
    """The extraction sees commands, plain paths and table rows (so the test below cannot pass by finding none)."""
    text = ("run `python scripts/train_nvae.py --config x` with `slurm/accelerate/cpu.yaml`,\n"
            "not `data/skipped_samples`\n| `trainer/run/` | the launch (`launch.py`) |")
    assert [path for _, path in named_paths(text)] == [
        "scripts/train_nvae.py", "slurm/accelerate/cpu.yaml", "trainer/run/", "trainer/run/launch.py"]


def test_every_path_readme_names_exists():
    named = named_paths((ROOT / "README.md").read_text())
    assert len(named) > 30
    missing = [f"README.md:{number}: {path}" for number, path in named if not (ROOT / path).exists()]
    assert not missing, "\n".join(missing)

"""The docs: the README fits on a screen, every relative link and image in it and in docs/
resolves, the generated config reference is current, and every results table is dated."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_the_readme_is_at_most_200_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_every_relative_link_and_image_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold commands
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_config_reference_is_current():
    from diffusion_cli.reference import reference

    current = (ROOT / "docs" / "reference" / "config.md").read_text()
    assert current == reference(), "stale: python -m diffusion_cli.reference > docs/reference/config.md"


PROVENANCE = re.compile(r"^<sub>Measured \d{4}-\d{2}-\d{2} at commit `[0-9a-f]{7}` on .+: .*`.+`.*</sub>$")
NUMBER_CELL = re.compile(r"\|\s*\**-?\d+\.\d+\**\s*(?=\|)")


def test_every_results_table_says_when_where_and_how_it_was_measured():
    """A table with measured numbers (a cell that is a decimal number) is followed by its
    provenance: the date, the commit and the command."""
    missing = []
    for page in [*ROOT.glob("docs/guide/*.md"), *ROOT.glob("docs/results/*.md")]:
        lines, inside_code = page.read_text().splitlines(), False
        for i, line in enumerate(lines):
            inside_code ^= line.startswith("```")
            starts = line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|"))
            if inside_code or not starts:
                continue
            end = next((j for j in range(i, len(lines)) if not lines[j].startswith("|")), len(lines))
            if any(NUMBER_CELL.search(row) for row in lines[i:end]) and \
                    not (end < len(lines) and PROVENANCE.match(lines[end])):
                missing.append(f"{page.relative_to(ROOT)}:{i + 1}")
    assert not missing, f"results tables without a 'Measured DATE at commit `X` on ...: `command`' line: {missing}"

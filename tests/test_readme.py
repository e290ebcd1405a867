"""The README is the contract: its example suite is valid and CI runs exactly its commands."""

import re

from kdbench.planning.suite import load_suite

from conftest import REPO

README = (REPO / "README.md").read_text()


def test_readme_example_suite_is_valid(tmp_path):
    block = README.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "mysuite.yaml"
    path.write_text(block)
    suite = load_suite(path)
    assert suite.name == "mysuite" and len(suite.runs) > 0


def test_ci_runs_the_readme_install_and_test_commands():
    main, tests = re.findall(r"```bash\n(.+?)\n```", README, flags=re.S)[:2]
    install = main.split(" && ")[0]
    ci = (REPO / ".ci/run").read_text().splitlines()
    assert install in ci and tests in ci
    assert main.endswith("snakemake --cores 2")


DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def links(text: str) -> list[str]:
    """Link targets of a markdown text, outside code blocks and code spans."""
    return LINK.findall(re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S)))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a `# comment` in a code block is no heading
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_readme_is_short():
    assert len(README.splitlines()) <= 200


def test_slug_follows_github():
    assert slug("4. Seeds as a budget: sequential looks") == "4-seeds-as-a-budget-sequential-looks"
    assert slug("Transfer protocols (two, named apart)") == "transfer-protocols-two-named-apart"
    assert slug("Adding a model, a dataset or a table") == "adding-a-model-a-dataset-or-a-table"


def test_every_relative_link_points_at_a_file_and_heading_in_the_repository():
    checked = 0
    for page in PAGES:
        for target in links(page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)} links {target}"
            assert file.is_relative_to(REPO), f"{where}: outside the repository"
            assert file.is_file(), f"{where}: no such file"
            if anchor:
                assert anchor in anchors(file), f"{where}: no such heading in {file.relative_to(REPO)}"
            checked += 1
    assert checked >= len(DOCS)  # the README reaches every page at least


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(README)}
    assert set(DOCS) - {REPO / "docs/README.md"} <= linked
    assert REPO / "docs/statistics.md" in linked


def test_no_page_names_a_path_outside_the_repository():
    for page in PAGES:
        assert not re.search(r"\.\./shared|shared/reference", page.read_text()), page


def test_every_suite_schema_key_is_documented():
    import yaml
    schema = yaml.safe_load((REPO / "kdbench/schemas/suite.schema.yaml").read_text())["properties"]
    keys = {*schema, *schema["experiments"]["items"]["properties"], *schema["tables"]["items"]["properties"]}
    suites = (REPO / "docs/suites.md").read_text()
    assert not {k for k in keys if f"`{k}`" not in suites}


def test_every_path_module_and_test_the_pages_name_exists():
    """`kdbench/...`, `tests/...`, `workflow/...` paths, `kdbench.x.y` names and the tests named
    as `test_file.py::test_name` (or `::test_name` after one), in code spans, as the pages give them."""
    import importlib
    code = re.compile(r"`([^`\n]+)`")
    names = 0
    for page in PAGES:
        test_file = None  # a `::test_name` span names a test of the file named before it
        for span in code.findall(page.read_text()):
            for file_name, test in re.findall(r"(?<![\w/])(?:tests/)?(test_\w+\.py)(?:::(\w+))?", span):
                test_file = REPO / "tests" / file_name
                assert test_file.is_file(), f"{page.name}: {file_name}"
                assert not test or f"def {test}(" in test_file.read_text(), f"{page.name}: {file_name}::{test}"
                names += 1
            if re.fullmatch(r"::\w+", span):
                assert test_file and f"def {span[2:]}(" in test_file.read_text(), f"{page.name}: {span}"
            for token in re.findall(r"(?:kdbench|tests|workflow|benchmarks|\.ci)/[\w./-]+(?:::\w+)?", span):
                path, _, test = token.partition("::")
                file = REPO / path.rstrip(".")
                if "<" in span and not file.exists():
                    continue  # a pattern such as tests/<file>
                assert file.exists(), f"{page.name}: {token}"
                if test:
                    assert f"def {test}(" in file.read_text(), f"{page.name}: {token}"
                names += 1
            for dotted in re.findall(r"\bkdbench(?:\.\w+)+", span):
                parts = dotted.split(".")
                for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
                    try:
                        obj = importlib.import_module(".".join(parts[:i]))
                        break
                    except ImportError:
                        continue
                for attr in parts[i:]:
                    assert hasattr(obj, attr), f"{page.name}: {dotted}"
                    obj = getattr(obj, attr)
                names += 1
    assert names > 50

"""Shared pytest configuration: markers (pyproject.toml is owned by the lead)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "browser: drives headless system Chromium through Playwright against a Voilà server "
        "(skipped when chromium, playwright or voila is missing; deselect with -m 'not browser')",
    )


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_manifest(tmp_path_factory):
    """The `smoke` profile's synthetic data set (12 small phantom volumes), generated once per run."""
    from igrpn.config import get_profile
    from igrpn.phantom import ensure_dataset

    folder = tmp_path_factory.mktemp("smoke_data")
    return ensure_dataset(folder / "data_manifest.csv", get_profile("smoke"), data_dir=folder, progress=False)

"""Finding an Odoo for the real-Odoo tests: kits by file name, a source tree by its release file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.lab import odoo as lab_odoo


def kit(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_bytes(b"")
    return path


def test_versions_are_the_tarballs_found(tmp_path, monkeypatch):
    for name in ("odoo-17.0-mail.tar.gz", "odoo-18.0-mail.tar.gz", "odoo-18.0-mass_mailing.tar.gz",
                 "odoo-19.0-mass_mailing.tar.gz", "odoo-20.0-crm.tar.gz", "notes.txt"):
        kit(tmp_path, name)
    monkeypatch.delenv(lab_odoo.SOURCE_VARIABLE, raising=False)
    monkeypatch.setenv(lab_odoo.KITS_VARIABLE, str(tmp_path))
    found = lab_odoo.discover()
    assert list(found) == ["17.0", "18.0", "19.0"]
    assert found["17.0"].modules == {"mail"}
    assert found["18.0"].tarball == tmp_path / "odoo-18.0-mass_mailing.tar.gz"
    assert found["19.0"].modules == {"mail", "mass_mailing"} and found["19.0"].major == 19


def test_a_source_tree_wins_and_its_stubs_are_not_installable(tmp_path, monkeypatch):
    (tmp_path / "odoo").mkdir()
    (tmp_path / "odoo" / "release.py").write_text("version_info = (18, 0, 0, FINAL, 0, '')\n")
    (tmp_path / "odoo" / "addons" / "mail" / "models").mkdir(parents=True)
    (tmp_path / "odoo" / "addons" / "mass_mailing").mkdir()  # a manifest-only stub
    monkeypatch.setenv(lab_odoo.SOURCE_VARIABLE, str(tmp_path))
    [(series, source)] = lab_odoo.discover().items()
    assert series == "18.0" and source.tree == tmp_path and source.modules == {"mail"}
    assert lab_odoo.unpacked_tree(source) == tmp_path


def test_nothing_found_says_how_to_provide_one(tmp_path, monkeypatch):
    monkeypatch.delenv(lab_odoo.SOURCE_VARIABLE, raising=False)
    monkeypatch.setenv(lab_odoo.KITS_VARIABLE, str(tmp_path / "missing"))
    reason = lab_odoo.unavailable_reason()
    assert reason is not None and lab_odoo.SOURCE_VARIABLE in reason and lab_odoo.KITS_VARIABLE in reason


def test_a_module_the_source_lacks_is_refused(tmp_path):
    source = lab_odoo.OdooSource("17.0", frozenset({"mail"}), tarball=tmp_path / "odoo-17.0-mail.tar.gz")
    with pytest.raises(ValueError, match="mass_mailing"):
        lab_odoo.LabOdoo(tmp_path, source, postgres=None, module=lab_odoo.MASS_MAILING)  # type: ignore[arg-type]

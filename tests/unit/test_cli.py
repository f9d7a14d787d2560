"""The CLI's Ray-facing commands point at real entry points, and the library never imports Ray."""

import importlib
import subprocess
import sys

import pytest

from draftsmith.cli import RAY_COMMANDS, main


@pytest.mark.parametrize("words,target", sorted(RAY_COMMANDS.items()))
def test_ray_commands_resolve_to_main_functions(words, target):
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function)), f"draftsmith {' '.join(words)}"


def test_library_does_not_import_ray():
    code = ("import sys, importlib, pkgutil, draftsmith\n"
            "for m in pkgutil.iter_modules(draftsmith.__path__): importlib.import_module('draftsmith.' + m.name)\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "bench", "serve", "distill", "registry", "drafter"):
        assert command in out


def test_drafter_derive_saves_a_feature_drafter(tmp_path, capsys):
    from draftsmith.models import FEATURE_FC_FILE, load_drafter, load_model

    assert main(["drafter", "derive", "--target", "tiny", "--layers", "last1", "--feature", "--out",
                 str(tmp_path / "f")]) == 0
    assert "1-layer feature drafter" in capsys.readouterr().out
    assert (tmp_path / "f" / FEATURE_FC_FILE).exists()
    assert load_drafter(tmp_path / "f", load_model("tiny")).reads_target_features

"""``kdtune list`` reads a static index of the registries; it must say what the registries say."""

import subprocess
import sys

from kdtune.catalogue import live_catalogue, load_catalogue


def test_the_static_catalogue_matches_the_registries():
    # On failure: regenerate it with `.venv/bin/python -m kdtune.catalogue`.
    assert load_catalogue() == live_catalogue()


def test_help_and_list_do_not_import_torch():
    code = ("import sys\nfrom kdtune.cli import main\n"
            "for argv in (['list', 'losses'], ['list', 'teachers']):\n    main(argv)\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fitnets" in out.stdout and "weight 100" in out.stdout and "resnet56_fashion_mnist" in out.stdout

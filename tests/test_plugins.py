"""The user's own models in configs and the CLI: --plugin / plugins: modules, module:callable names."""

import sys
import textwrap

import pytest
import torch
import yaml

from kdtune.cli import main
from kdtune.models import MODELS, create_model
from kdtune.plugins import PluginError, import_plugins, resolve_callable

PLUGIN = "byo_user_models"
SOURCE = textwrap.dedent('''
    import torch
    from torch import nn
    import kdtune

    @kdtune.register_model("sep_student")
    class SepStudent(nn.Module):
        """A depthwise-separable student that only takes num_classes (no in_channels)."""

        def __init__(self, num_classes, width=8):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
            self.sep = nn.Sequential(nn.Conv2d(width, width, 3, 2, 1, groups=width), nn.Conv2d(width, 2 * width, 1),
                                     nn.ReLU())
            self.head = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            return self.head(self.sep(self.stem(x)).mean((2, 3)))

    def big_teacher():
        return SepStudent(10, width=16)
''')


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """The plugin module in the current directory (where `kdtune` looks first)."""
    (tmp_path / f"{PLUGIN}.py").write_text(SOURCE)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop(PLUGIN, None)
    MODELS._items.pop("sep_student", None)


def config(tmp_path, **extra):
    torch.manual_seed(0)
    import_plugins([PLUGIN])
    teacher = resolve_callable(f"{PLUGIN}:big_teacher")()
    torch.save({"epoch": 3, "state_dict": teacher.state_dict()}, tmp_path / "teacher.pt")  # a user's own layout
    sys.modules.pop(PLUGIN, None)  # kdtune run must import it itself
    MODELS._items.pop("sep_student", None)
    cfg = {"seed": 0, "output_dir": str(tmp_path / "runs"),
           "data": {"dataset": "fashion_mnist", "train_per_class": 2, "test_limit": 20},
           "student": {"name": "sep_student"},
           "teacher": {"name": f"{PLUGIN}:big_teacher", "checkpoint": str(tmp_path / "teacher.pt")},
           "distill": {"logit_losses": [{"name": "kd"}],
                       "pathways": [{"teacher": "sep", "student": "sep", "method": "fitnets"}]},
           "train": {"epochs": 1, "progress": False}, **extra}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_with_plugin_imports_the_users_models_and_resume_imports_them_again(plugin_dir, capsys):
    path = config(plugin_dir)
    assert main(["run", "--plugin", PLUGIN, str(path)]) == 0
    (run_dir,) = (plugin_dir / "runs").iterdir()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["plugins"] == [PLUGIN]
    assert "final test accuracy" in capsys.readouterr().out
    sys.modules.pop(PLUGIN, None)
    MODELS._items.pop("sep_student", None)
    assert main(["run", "--resume", str(run_dir)]) == 0  # finished: nothing to train, but names resolve


def test_plugins_listed_in_the_yaml(plugin_dir):
    assert main(["run", str(config(plugin_dir, plugins=[PLUGIN]))]) == 0


def test_without_the_plugin_the_name_is_unknown(plugin_dir, capsys):
    assert main(["run", str(config(plugin_dir))]) == 2
    assert "unknown model 'sep_student'" in capsys.readouterr().err


def test_unknown_plugin_is_a_one_line_error(plugin_dir, capsys):
    assert main(["run", "--plugin", "no_such_models", str(config(plugin_dir))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot import plugin 'no_such_models': no such module" in err


def test_list_and_probe_see_plugin_models(plugin_dir, capsys):
    assert main(["list", "models", "--plugin", PLUGIN]) == 0
    assert "sep_student        A depthwise-separable student" in capsys.readouterr().out
    assert main(["probe", "sep_student", "--plugin", PLUGIN]) == 0
    out = capsys.readouterr().out
    assert "sep.1" in out and "[2, 16, 7, 7]" in out.replace("(", "[").replace(")", "]")


def test_module_callable_names_and_their_errors(plugin_dir):
    model = create_model(f"{PLUGIN}:SepStudent", in_channels=1, num_classes=4)  # in_channels not taken: dropped
    assert model.head.out_features == 4
    with pytest.raises(PluginError, match="has no 'SepStudnet'. Did you mean: SepStudent"):
        create_model(f"{PLUGIN}:SepStudnet")
    with pytest.raises(PluginError, match="write a callable as module:name"):
        resolve_callable(f"{PLUGIN}:")

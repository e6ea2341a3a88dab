"""The command line: published defaults, config layering, and one-line errors for bad input."""

import dataclasses
import shlex
from pathlib import Path

import pytest

from cli import main, resolve_config
from config import (BUDGET_FIELDS, EVALUATION_FIELDS, FIELDS, INERT_FLAGS, NOT_PROTOCOL, RESUME_MAY_CHANGE,
                    Config, reference_config, saved_settings)
from helpers import CODE_DIR, run_script, write_image_folder

COMMANDS = [line for line in (CODE_DIR.parent / "Command.txt").read_text().splitlines() if line.startswith("python")]
PUBLISHED_ROWS = {("MNIST", 1), ("MNIST", 10), ("MNIST", 50), ("FashionMNIST", 1), ("FashionMNIST", 10),
                  ("FashionMNIST", 50), ("SVHN", 1), ("SVHN", 10), ("SVHN", 50), ("CIFAR10", 1), ("CIFAR10", 10),
                  ("CIFAR10", 50), ("CIFAR100", 1), ("CIFAR100", 10), ("CIFAR100", 50), ("TinyImageNet", 1),
                  ("TinyImageNet", 10)}


def command_args(line: str) -> tuple[str, list[str]]:
    words = shlex.split(line)
    return words[2], words[3:]  # python3 -u SCRIPT ARGS...


def test_command_txt_has_every_published_row_and_its_scripts_exist() -> None:
    rows = set()
    for line in COMMANDS:
        script, args = command_args(line)
        assert (CODE_DIR / script).is_file()
        config = resolve_config(args, {}).config
        rows.add((config.dataset, config.ipc))
    assert rows == PUBLISHED_ROWS


@pytest.mark.parametrize("line", COMMANDS)
def test_each_published_command_equals_the_bare_dataset_and_ipc_run(line: str) -> None:
    _, args = command_args(line)
    invocation = resolve_config(args, {})
    config = invocation.config
    bare = resolve_config(["--dataset", config.dataset, "--ipc", str(config.ipc)], {}).config
    assert not invocation.print_only and invocation.resume is None
    assert config == bare == reference_config(config.dataset, config.ipc, "bacon")


def test_published_rows_set_their_extra_flags() -> None:
    cifar100 = resolve_config(["--dataset", "CIFAR100", "--ipc", "10"], {}).config
    assert (cifar100.ce_weight, cifar100.model_train_steps, cifar100.net_num) == (0.1, 50, 100)
    cifar10_ipc1 = resolve_config(["--dataset", "CIFAR10", "--ipc", "1"], {}).config
    assert (cifar10_ipc1.batch_real, cifar10_ipc1.net_generate_interval, cifar10_ipc1.ipc1_rules) == (5000, 5, True)
    mnist_ipc1 = resolve_config(["--dataset", "MNIST", "--ipc", "1"], {}).config
    assert not mnist_ipc1.ipc1_rules


def test_paper_settings_are_the_defaults() -> None:
    config = resolve_config(["--dataset", "MNIST", "--ipc", "10"], {}).config
    assert (config.model, config.init, config.lr_img, config.num_exp, config.num_eval) == ("ConvNet", "real", 0.2, 5, 5)
    assert (config.aug, config.syn_ce, config.net_decay, config.embed_last) == (True, True, True, 1000)
    assert (config.Iteration, config.eval_interval, config.ce_weight, config.train_net_num) == (20000, 100, 0.5, 1)


def test_entry_script_sets_the_default_dataset() -> None:
    config = resolve_config([], {"dataset": "SVHN"}).config
    assert config.dataset == "SVHN"


def test_config_file_overrides_defaults_and_command_line_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("dataset: CIFAR100\nipc: 10\nIteration: 7\nlr_img: 1\naug: false\n")
    config = resolve_config(["--config", str(path), "--Iteration", "9"], {}).config
    assert (config.dataset, config.ipc, config.Iteration, config.lr_img, config.aug) == ("CIFAR100", 10, 9, 1.0, False)
    assert config.model_train_steps == 50  # the published CIFAR100 IPC-10 row still applies


@pytest.mark.parametrize("flag", ["--no-aug", "--no_aug"])
def test_booleans_have_no_forms(flag: str) -> None:
    config = resolve_config(["--dataset", "MNIST", flag], {}).config
    assert config.aug is False


@pytest.mark.parametrize("argv, value", [([], "auto"), (["--compile"], "on"), (["--no-compile"], "off"),
                                         (["--compile", "off"], "off"), (["--compile", "auto"], "auto")])
def test_on_off_auto_settings_take_a_bare_flag_as_on(argv: list[str], value: str) -> None:
    assert resolve_config(argv, {}).config.compile == value


def test_yaml_booleans_are_on_and_off(tmp_path: Path) -> None:
    """YAML reads ``off`` as false; an on/off/auto setting takes it as "off" rather than failing."""
    path = tmp_path / "speed.yaml"
    path.write_text("compile: true\neval_batched: off\n")
    config = resolve_config(["--config", str(path)], {}).config
    assert (config.compile, config.eval_batched) == ("on", "off")


def test_a_saved_configuration_is_read_in_todays_terms() -> None:
    """Checkpoints saved before --compile took auto held a boolean, and none held --memory_format."""
    saved = saved_settings({"compile": False, "ipc": 10})
    assert (saved["compile"], saved["memory_format"], saved["ipc"]) == ("off", "auto", 10)
    assert Config(**saved).compile == "off"


def test_the_reference_flags_without_effect_are_accepted_and_kept_out_of_the_config(tmp_path: Path) -> None:
    """Every published command passes --net_train_real and --mismatch_lambda; they parse (and --aug_num
    still refuses what the reference cannot do), but Config has no such fields, and a configuration
    saved when it had them (a checkpoint, a --config file) still loads."""
    invocation = resolve_config(["--dataset", "FashionMNIST", "--ipc", "10", "--net_train_real",
                                 "--mismatch_lambda", "0", "--dis_metric", "ours"], {})
    assert not INERT_FLAGS.keys() & invocation.config.to_dict().keys()
    saved = saved_settings({**invocation.config.to_dict(), "net_train_real": True, "aug_num": 1})
    assert Config(**saved) == invocation.config
    config_file = tmp_path / "old.yaml"
    config_file.write_text("ipc: 10\nlocal_num: 10\ninner_loop: 1\n")
    assert resolve_config(["--config", str(config_file), "--dataset", "FashionMNIST"], {}).config == \
        invocation.config


def test_every_schema_list_is_read_from_the_field_metadata() -> None:
    """Budget, protocol, resumable and evaluation flags are roles on the fields, not lists kept by hand."""
    for name, spec in FIELDS.items():
        role = spec.metadata["role"]
        assert (name in BUDGET_FIELDS) == role.budget and (name in NOT_PROTOCOL) == (not role.protocol)
        assert (name in RESUME_MAY_CHANGE) == role.resumable
        assert (name in EVALUATION_FIELDS) == spec.metadata["evaluation"]
    assert BUDGET_FIELDS <= FIELDS.keys() - NOT_PROTOCOL  # a budget is part of the protocol
    assert RESUME_MAY_CHANGE <= NOT_PROTOCOL  # what may change on resume changes no result


def test_print_config_prints_yaml_and_exits(capsys: pytest.CaptureFixture) -> None:
    assert main({}, ["--dataset", "FashionMNIST", "--ipc", "10", "--print_config"]) == 0
    assert "dataset: FashionMNIST" in capsys.readouterr().out


def run_main(argv: list[str]) -> int:
    """main()'s exit code, whether it returns it or argparse exits with it."""
    try:
        return main({}, argv)
    except SystemExit as exit:
        return exit.code


def fails_with(argv: list[str], message: str, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """Bad input: exit code 2, one line on stderr naming the problem, nothing saved."""
    save_path = tmp_path / "runs"
    code = run_main([*argv, "--save_path", str(save_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in err
    assert not save_path.exists() or not any(save_path.iterdir())


def image_folder_args(folder: Path, *more: str) -> list[str]:
    return ["--dataset", "ImageFolder", "--data_path", str(folder), "--im_size", "16", *more]


BAD_FLAGS = [
    (["--dataset", "Imagenette"], "unknown dataset 'Imagenette'; valid datasets: MNIST, FashionMNIST"),
    (["--model", "ResNet99"], "unknown model 'ResNet99'; valid models:"),
    (["--ipc", "0"], "--ipc must be at least 1"),
    (["--lr_img", "0"], "--lr_img must be positive"),
    (["--lr_net", "-1"], "--lr_net must be positive"),
    (["--Iteration", "-5"], "--Iteration must not be negative"),
    (["--eval_interval", "0"], "--eval_interval must be at least 1"),
    (["--num_eval", "0"], "--num_eval must be at least 1"),
    (["--num_exp", "0"], "--num_exp must be at least 1"),
    (["--test_fraction", "1"], "--test_fraction must be between 0 and 1, got 1.0"),
    (["--dataset", "ImageFolder", "--im_size", "1"], "--im_size must be at least 2, got 1"),
    (["--dsa_strategy", "color_blur"], "unknown DSA op 'blur'"),
    (["--eval_mode", "Q"], "unknown eval mode 'Q'"),
    (["--method", "gm"], "unknown method 'gm'; valid methods: bacon, idm"),
    (["--aug_num", "2"], "argument --aug_num: invalid choice: 2 (choose from 1)"),
    (["--batch_real", "1"], "--batch_real must be at least 2"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS)
def test_bad_settings_fail_before_any_work(argv: list[str], message: str, capsys: pytest.CaptureFixture,
                                           tmp_path: Path) -> None:
    fails_with(argv, message, capsys, tmp_path)


def test_argparse_errors_are_one_line_with_exit_code_2(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    fails_with(["--ipc", "ten"], "argument --ipc: invalid int value: 'ten'", capsys, tmp_path)
    fails_with(["--init", "mtt"], "argument --init: invalid choice: 'mtt'", capsys, tmp_path)


def test_ipc_larger_than_the_smallest_class(image_folder: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    fails_with(image_folder_args(image_folder, "--ipc", "9"),
               "--ipc 9 is larger than the smallest class of ImageFolder (8 images)", capsys, tmp_path)


def test_aug_with_an_odd_image_side(image_folder: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    fails_with(["--dataset", "ImageFolder", "--data_path", str(image_folder), "--im_size", "15", "--ipc", "1"],
               "--aug needs an even image side", capsys, tmp_path)


def test_missing_data_names_the_paths(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    fails_with(["--dataset", "ImageFolder", "--data_path", str(missing)], str(missing), capsys, tmp_path)


def test_unreadable_data(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    raw = tmp_path / "data"
    raw.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08\x03\x00\x00")
    fails_with(["--dataset", "FashionMNIST", "--data_path", str(raw)], "idx", capsys, tmp_path)


def test_an_image_folder_with_one_class_or_an_empty_class(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    one_class = write_image_folder(tmp_path / "one", classes=1, per_class=3)
    fails_with(["--dataset", "ImageFolder", "--data_path", str(one_class)], "holds 1 class directories; add at least 2",
               capsys, tmp_path)
    empty_class = write_image_folder(tmp_path / "empty", classes=2, per_class=3)
    (empty_class / "train" / "class9").mkdir()
    fails_with(["--dataset", "ImageFolder", "--data_path", str(empty_class)], "class9 holds no images", capsys,
               tmp_path)


def test_a_tinyimagenet_file_that_is_not_the_expected_dict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    (tmp_path / "tiny").mkdir()
    torch.save({"images": torch.zeros(1)}, tmp_path / "tiny" / "tinyimagenet.pt")
    fails_with(["--dataset", "TinyImageNet", "--data_path", str(tmp_path / "tiny")],
               "is not the expected Tiny-ImageNet dict", capsys, tmp_path)


def test_unwritable_save_path(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code = run_main(["--dataset", "MNIST", "--save_path", str(blocker / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write to --save_path" in err and len(err.strip().splitlines()) == 1


def test_cuda_requested_without_cuda(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fails_with(["--device", "cuda"], "--device cuda was given but this machine has no usable CUDA device",
               capsys, tmp_path)


@pytest.mark.parametrize("content, message", [
    ("ipc: [1, 2\n", "is not valid YAML"),
    ("lr_imgg: 0.1\n", "unknown key 'lr_imgg'"),
    ("ipc: ten\n", "ipc in"),
    ("- 1\n- 2\n", "must hold a mapping"),
])
def test_bad_config_files(content: str, message: str, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    fails_with(["--config", str(path)], message, capsys, tmp_path)


def test_unknown_config_key_suggests_the_closest(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("lr_imgg: 0.1\n")
    fails_with(["--config", str(path)], "did you mean 'lr_img'?", capsys, tmp_path)


def test_a_real_process_reports_one_line_and_exit_code_2() -> None:
    result = run_script("BACON_mnist.py", "--dataset", "Imagenette")
    assert result.returncode == 2
    assert result.stderr.strip() == ("BACON_mnist.py: error: unknown dataset 'Imagenette'; valid datasets: "
                                     "MNIST, FashionMNIST, SVHN, CIFAR10, CIFAR100, TinyImageNet, ImageFolder")


def test_help_shows_effective_defaults() -> None:
    result = run_script("BACON_cifar.py", "--dataset", "CIFAR100", "--ipc", "10", "--help")
    assert result.returncode == 0
    assert "--model_train_steps MODEL_TRAIN_STEPS\n" in result.stdout
    help_text = result.stdout.split("--model_train_steps MODEL_TRAIN_STEPS\n")[1].split("\n  --")[0]
    assert help_text.split() == "SGD steps per trained pool net (default: 50)".split()


def test_config_object_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().ipc = 3  # type: ignore[misc]


@pytest.mark.parametrize("script, args", [("BACON_mnist.py", ("--help",)), ("BACON_cifar.py", ("--dataset", "Nope")),
                                          ("evaluate.py", ("--help",))])
def test_help_and_user_errors_import_neither_torchvision_nor_the_compiler(script: str, args: tuple[str, ...]) -> None:
    """Start-up stays the cost of importing torch: torchvision (which pulls in torch._dynamo) is
    imported only where a torchvision dataset is loaded or a PNG is written, so --help and a
    one-line error never pay for it (docs/benchmarks.md has the times)."""
    result = run_script("-X", "importtime", script, *args)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert imported, result.stderr[-500:]
    assert not {name for name in imported if name == "torchvision" or name.startswith("torch._dynamo")}

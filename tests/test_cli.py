"""Flags generated from dataclass fields (``tumorseg.cli.add_dataclass_arguments``)."""

import argparse
import dataclasses
from pathlib import Path

import pytest

from tumorseg.cli import ArgumentParser, add_dataclass_arguments, parse_int_list
from tumorseg.config import TrainConfig, field_names
from tumorseg.data import add_data_arguments
from tumorseg.train import build_parser, config_from_args


def test_every_train_config_field_is_a_flag_with_help():
    parser = build_parser()
    dests = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
        assert f.name in dests and "(default: " in dests[f.name].help, f.name
    assert config_from_args(parser.parse_args([])) == TrainConfig()


def test_todays_flag_names_keep_working():
    args = build_parser().parse_args(
        ["--resize", "64", "--loss", "dice_focal", "--no-channels-last", "--compile", "--encoder-weights", "none",
         "--precision", "fp32", "--dice-weight", "0.5", "--warmup-epochs", "0", "--threshold", "0.8"]
    )
    cfg = config_from_args(args)
    assert (cfg.resize_px, cfg.loss_type, cfg.channels_last, cfg.compile) == (64, "dice_focal", False, True)
    assert (cfg.encoder_weights, cfg.precision, cfg.dice_weight, cfg.warmup_epochs, cfg.threshold) == ("none", "fp32", 0.5, 0, 0.8)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--loss", "focal"])  # choices come from the field metadata


@dataclasses.dataclass
class Settings:
    size_px: int = dataclasses.field(default=64, metadata={"help": "size", "flag": "--size"})
    sizes: list = dataclasses.field(default_factory=lambda: [1, 2], metadata={"help": "sizes", "type": parse_int_list})
    out: Path | None = dataclasses.field(default=None, metadata={"help": "folder"})
    fast: bool = dataclasses.field(default=False, metadata={"help": "go fast"})
    mode: str = dataclasses.field(default="a", metadata={"help": "mode", "choices": ("a", "b")})


def parse(argv, **kwargs):
    parser = ArgumentParser(prog="t")
    added = add_dataclass_arguments(parser, Settings, **kwargs)
    return added, parser, parser.parse_args(argv)


def test_types_include_exclude_and_defaults():
    added, _, args = parse(["--size", "96", "--sizes", "3,4", "--out", "/x", "--fast", "--mode", "b"])
    assert added == ["size_px", "sizes", "out", "fast", "mode"]
    assert Settings(**vars(args)) == Settings(96, [3, 4], Path("/x"), True, "b")
    added, parser, args = parse([], include=["mode", "size_px"], exclude=["mode"], defaults={"size_px": 128})
    assert added == ["size_px"] and vars(args) == {"size_px": 128}
    assert "(default: 128)" in parser.format_help()
    _, _, args = parse(["--no-fast"], defaults={"fast": True})
    assert args.fast is False
    with pytest.raises(ValueError, match="no field.*colour"):
        add_dataclass_arguments(argparse.ArgumentParser(), Settings, defaults={"colour": 1})


def test_unsupported_field_type_needs_metadata_type():
    @dataclasses.dataclass
    class Bad:
        sizes: list[int] = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match="Bad.sizes"):
        add_dataclass_arguments(argparse.ArgumentParser(), Bad)
    data_flags = argparse.ArgumentParser()
    add_data_arguments(data_flags)
    not_config = {a.dest for a in data_flags._actions} | {"help", "data", "out", "cache_dir", "threads"}
    assert set(field_names()) == {a.dest for a in build_parser()._actions} - not_config

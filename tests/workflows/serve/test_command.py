"""``mav serve``: its arguments and its one-line errors (a whole run in its own process, to SIGTERM, is in
test_nodes.py)."""


def test_serve_subcommand_parses():
    import argparse

    from workflows.serve import add_parser, cmd_serve

    parser = argparse.ArgumentParser(prog="mav")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve"])
    assert args.func is cmd_serve and args.host is None and args.port is None and args.address is None
    args = parser.parse_args(["serve", "--config", "c.yaml", "--host", "0.0.0.0", "--port", "9000",
                              "--checkpoint", "s3://b/m", "--preset", "paper", "--address", "ray://h:10001"])
    assert (args.config, args.host, args.port, args.checkpoint, args.preset, args.address) == (
        "c.yaml", "0.0.0.0", 9000, "s3://b/m", "paper", "ray://h:10001")


def test_bad_arguments_are_one_line_and_exit_2(tmp_path, tiny_preset_file, capsys):
    """Refused before Ray starts."""
    from workflows.cli import main

    for argv, message in (
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml: no such file"),
        (["--preset", tiny_preset_file, "--port", "70000"], "--port must be in 1..65535, got 70000"),
        (["--preset", str(tmp_path / "nope.yaml")], "nope.yaml"),
    ):
        assert main(["serve", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("mav: error: ") and message in err and err.count("\n") == 1, err

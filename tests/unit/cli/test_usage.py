"""`clusterlm --help`: every command and subcommand is listed."""


def test_help_lists_every_command_and_subcommand(capsys):
    from clusterlm.cli import COMMANDS, SUBCOMMANDS, main
    from clusterlm.cli.bench import MAINS

    assert set(MAINS) == set(SUBCOMMANDS["bench"])
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in COMMANDS)
    assert all(
        f"{command} {sub} " in shown for command, subs in SUBCOMMANDS.items() for sub in subs
    )

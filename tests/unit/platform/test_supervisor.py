"""supervisord's configuration as data: what supervisord itself reads back is what was written."""

import pytest
from supervisor.options import ServerOptions

from flywheel.core.settings import Settings
from flywheel.platform import supervisor


@pytest.fixture
def settings(tmp_path):
    # A state folder whose path has a space and a percent sign, as a user's home may.
    return Settings.load({"FLYWHEEL_STATE_DIR": str(tmp_path / "my state 100%"), "MINIO_ROOT_USER": "u"})


def read_back(settings, sections) -> dict:
    """The programs as supervisord's own parser builds them from the rendered file."""
    path = settings.state / "supervisord.conf"
    settings.logs.mkdir(parents=True, exist_ok=True)
    path.write_text(supervisor.render(supervisor.main_conf(settings, sections)))
    options = ServerOptions()
    options.configfile = str(path)
    options.process_config(do_usage=False)
    return {group.name: group for group in options.process_group_configs}


def test_commands_and_environments_arrive_as_written(settings):
    env = {
        "WEBHOOK": "http://127.0.0.1:9/hook?a=1,b=%20x",  # a comma, a percent sign
        "QUOTED": 'say "hi" twice',  # a double quote
        "EMPTY": "",
    }
    command = ["/usr/bin/printf", "%s and %(name)s", "two words", "semi;colon"]
    groups = read_back(settings, supervisor.program(settings, "demo", command, env, cpus="0"))
    [process] = groups["demo"].process_configs
    assert process.command.endswith(" -- " + " ".join(supervisor.shlex.quote(a) for a in command))
    assert {k: process.environment[k] for k in env} == env
    assert process.stdout_logfile == str(settings.logs / "demo.log")


@pytest.mark.parametrize(
    ("value", "reason"), [('it\'s "odd" here', "both kinds of quote"), ('ends "quoted"', "starts or ends with a quote")]
)
def test_a_value_supervisord_cannot_read_back_is_refused(value, reason):
    with pytest.raises(supervisor.ConfigError, match=reason):
        supervisor.environment_value({"X": value})


def test_a_group_is_its_programs(settings):
    sections = {
        **supervisor.program(settings, "bento-iris-blue-0", ["/bin/true"]),
        **supervisor.program(settings, "bento-iris-blue-1", ["/bin/true"]),
        **supervisor.group("bento-iris-blue", ["bento-iris-blue-0", "bento-iris-blue-1"]),
    }
    groups = read_back(settings, sections)
    assert sorted(p.name for p in groups["bento-iris-blue"].process_configs) == [
        "bento-iris-blue-0",
        "bento-iris-blue-1",
    ]
